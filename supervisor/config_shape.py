"""The shape of a decoded config document, checked against the config's structs.

msgspec converts the document, but its error text is not an interface: a message built by
parsing it breaks when a release rewords it. So the document is walked here first, against
the same struct definitions and annotations, and every shape error gets vmsuper's own message
naming the key. Conversion then only meets documents this walk has accepted.

Keys are dotted paths: "vm.vcpus", "plugin.args[1]", "plugin.mounts[0].src".
"""

from __future__ import annotations

import functools
import ipaddress
import types
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from vmsuper.supervisor.msgspec_import import msgspec


class ShapeError(Exception):
    """The document does not fit the structs. `key` is empty when the message names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def check(document: object, struct: type[msgspec.Struct]) -> None:
    """Raise `ShapeError` for the first part of `document` that `struct` cannot take."""
    _check(document, struct, "")


def prepare(struct: type[msgspec.Struct]) -> set[type[msgspec.Struct]]:
    """Resolve the annotations of `struct` and of every struct its fields can hold, ahead of
    the first `check` (see `_shape`): a check resolves only the tables its document has.
    Returns the structs resolved."""
    seen: set[type[msgspec.Struct]] = set()
    pending = [struct]
    while pending:
        current = pending.pop()
        if current not in seen:
            seen.add(current)
            pending.extend(_structs_in(_shape(current)[1].values()))
    return seen


def _structs_in(annotations: Iterable[Any]) -> Iterator[type[msgspec.Struct]]:
    for annotation in annotations:
        if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
            yield annotation
        yield from _structs_in(typing.get_args(annotation))


def key_label(key: str) -> str:
    """ "vm.vcpus" -> "[vm] vcpus"; "plugin.args[1]" -> "[plugin] args[1]"; "" -> ""."""
    if not key:
        return ""
    table, _, rest = key.partition(".")
    return f"[{table}] {rest}" if rest else f"[{table}]"


# What a TOML value is called in messages, by its Python type after decoding.
_GOT = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "table"}
_SIMPLE: dict[object, tuple[str, tuple[type, ...]]] = {
    int: ("an integer", (int,)),
    float: ("a number", (int, float)),
    str: ("a string", (str,)),
    bool: ("a boolean", (bool,)),
}


def _got(value: object) -> str:
    return _GOT.get(type(value), "array" if isinstance(value, list) else type(value).__name__)


def _check(value: object, annotation: Any, key: str) -> None:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        _check_described(value, annotation, key)
    elif isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        _check_struct(value, annotation, key)
    elif origin in (typing.Union, types.UnionType):
        # TOML has no null, so `T | None` is just T when present.
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        _check_union(value, members, key)
    elif origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed or type(value) not in {type(a) for a in allowed}:
            listed = ", ".join(repr(a) for a in allowed)
            raise ShapeError(key, f"expected one of {listed}, got {value!r}")
    elif origin in (tuple, list):
        if not isinstance(value, list):
            raise ShapeError(key, f"expected an array, got {_got(value)}")
        item = typing.get_args(annotation)[0]
        for i, element in enumerate(value):
            _check(element, item, f"{key}[{i}]")
    elif origin is dict:
        if not isinstance(value, dict):
            raise ShapeError(key, f"expected a table, got {_got(value)}")
        item = typing.get_args(annotation)[1]
        for name, element in value.items():
            _check(element, item, f"{key}.{name}")
    elif annotation is Path:
        _check_simple(value, str, key)
        if not value:
            raise ShapeError(key, "must not be empty")
    elif annotation is ipaddress.IPv4Address:
        _check_simple(value, str, key)
        try:
            ipaddress.IPv4Address(typing.cast(str, value))
        except ValueError:
            raise ShapeError(key, f"expected an IPv4 address, got {value!r}") from None
    elif annotation in _SIMPLE:
        _check_simple(value, annotation, key)
    else:  # pragma: no cover - a field type this walk does not know yet
        raise TypeError(f"config_shape cannot check {annotation!r} at {key}")


def _check_described(value: object, annotation: Any, key: str) -> None:
    """`Annotated[T, msgspec.Meta(description=...)]`: the description says what is expected."""
    inner, *extras = typing.get_args(annotation)
    described = [m.description for m in extras if isinstance(m, msgspec.Meta) and m.description]
    try:
        _check(value, inner, key)
    except ShapeError as exc:
        if not described or exc.key != key:
            raise
        raise ShapeError(key, f"expected {described[0]}, got {_got(value)}") from None


def _check_simple(value: object, annotation: object, key: str) -> None:
    name, accepted = _SIMPLE[annotation]
    # bool is an int in Python, never in TOML.
    if (isinstance(value, bool) and annotation is not bool) or not isinstance(value, accepted):
        raise ShapeError(key, f"expected {name}, got {_got(value)}")


def _check_union(value: object, members: list[Any], key: str) -> None:
    if len(members) == 1:
        _check(value, members[0], key)
        return
    errors = []
    for member in members:
        try:
            _check(value, member, key)
        except ShapeError as exc:
            errors.append(exc)
        else:
            return
    wanted = " or ".join(e.message.removeprefix("expected ").split(", got")[0] for e in errors)
    raise ShapeError(key, f"expected {wanted}, got {_got(value)}")


@functools.cache
def _shape(struct: type[msgspec.Struct]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A struct's fields by their name in the document, and its resolved annotations. Resolving
    them compiles every string annotation: once per struct, not once per config, so that the
    runs `vmsuper serve` forks (which loaded a config to prepare) do not pay it again."""
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    return fields, typing.get_type_hints(struct, include_extras=True)


def _check_struct(value: object, struct: type[msgspec.Struct], key: str) -> None:
    if not isinstance(value, dict):
        raise ShapeError(key, f"expected a table, got {_got(value)}")
    fields, hints = _shape(struct)
    for name in value:
        if name not in fields:
            if not key:
                raise ShapeError("", f"unknown table [{name}]")
            raise ShapeError("", f"unknown key {key_label(key)} {name}")
    for name, field in fields.items():
        if name in value:
            _check(value[name], hints[field.name], f"{key}.{name}" if key else name)
        elif field.required:
            where = f"{key_label(key)} {name}" if key else f"[{name}]"
            raise ShapeError("", f"{where} is required")
