"""The shape of a decoded config document, checked against the config's tables, then built.

The config's tables are NamedTuples (see supervisor/config.py): their annotations say what
each key takes. `check` walks a decoded TOML document against them and gives every shape error
vmsuper's own message naming the key; `build` then makes the tables from a document `check`
has accepted, so it meets no surprise.

Keys are dotted paths: "vm.vcpus", "plugin.args[1]", "plugin.mounts[0].src".
"""

from __future__ import annotations

import ipaddress
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

Table = TypeVar("Table", bound=NamedTuple)


class Description(NamedTuple):
    """`Annotated` metadata: what a field takes, in words, for the message when it gets
    something else (``Annotated[int | str, Description('a size ("512M") or ...')]``)."""

    text: str


def is_table(annotation: object) -> bool:
    """Whether `annotation` is a table of the config (a NamedTuple class)."""
    return (
        isinstance(annotation, type)
        and issubclass(annotation, tuple)
        and (hasattr(annotation, "_fields"))
    )


class ShapeError(Exception):
    """The document does not fit the structs. `key` is empty when the message names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class MissingKey(ShapeError):
    """A required key is not there."""


def check(document: object, table: type[tuple[Any, ...]]) -> None:
    """Raise `ShapeError` for the first part of `document` that `table` cannot take: the first
    wrong value in the tables' order, else the first missing key."""
    _check(document, table, "")


def build(document: dict[str, Any], table: type[Table]) -> Table:
    """The `table` that `document` (accepted by `check`) describes: arrays become tuples,
    paths `Path`s, addresses `IPv4Address`es, integers given for a number floats."""
    built = _build(document, table)
    assert isinstance(built, table)
    return built


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
    elif is_table(annotation):
        _check_table(value, annotation, key)
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
    """`Annotated[T, Description(...)]`: the description says what is expected."""
    inner, *extras = typing.get_args(annotation)
    described = [m.text for m in extras if isinstance(m, Description)]
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


def _check_table(value: object, table: type[tuple[Any, ...]], key: str) -> None:
    if not isinstance(value, dict):
        raise ShapeError(key, f"expected a table, got {_got(value)}")
    names: tuple[str, ...] = table._fields  # type: ignore[attr-defined]
    defaults: dict[str, object] = table._field_defaults  # type: ignore[attr-defined]
    hints = typing.get_type_hints(table, include_extras=True)
    for name in value:
        if name not in names:
            if not key:
                raise ShapeError("", f"unknown table [{name}]")
            raise ShapeError("", f"unknown key {key_label(key)} {name}")
    missing: MissingKey | None = None
    for name in names:
        if name in value:
            try:
                _check(value[name], hints[name], f"{key}.{name}" if key else name)
            except MissingKey as exc:
                missing = missing or exc
        elif name not in defaults:
            where = f"{key_label(key)} {name}" if key else f"[{name}]"
            missing = missing or MissingKey("", f"{where} is required")
    if missing is not None:
        raise missing


def _build(value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _build(value, typing.get_args(annotation)[0])
    if is_table(annotation):
        hints = typing.get_type_hints(annotation)
        return annotation(**{name: _build(item, hints[name]) for name, item in value.items()})
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            if member is not type(None):
                try:
                    _check(value, member, "")
                except ShapeError:
                    continue
                return _build(value, member)
        raise TypeError(f"{value!r} fits no member of {annotation!r}")  # pragma: no cover
    if origin is tuple:
        return tuple(_build(item, typing.get_args(annotation)[0]) for item in value)
    if origin is list:
        return [_build(item, typing.get_args(annotation)[0]) for item in value]
    if origin is dict:
        item_type = typing.get_args(annotation)[1]
        return {name: _build(item, item_type) for name, item in value.items()}
    if annotation is Path:
        return Path(value)
    if annotation is ipaddress.IPv4Address:
        return ipaddress.IPv4Address(value)
    if annotation is float:
        return float(value)
    return value
