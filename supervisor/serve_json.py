"""The JSON of the hand-over to `vmsuper serve`, written and read without the json module.

The served `vmsuper run` imports next to nothing before its run is handed over
(supervisor/serve_client.py): the json module would bring `re` (and with it `enum`), about a
sixth of that command's start. Its messages are small and of a few shapes: the request it
sends (strings, a list and a map of strings, an integer) and the server's answers (an object
of integers, strings and booleans). So `dumps` writes exactly what ``json.dumps`` writes (ASCII,
the default separators; lone surrogates, which undecodable bytes in the environment or the
command line become, escaped as ``\\udcXX``), and `loads` reads any JSON value but numbers
other than integers. Both are checked against the json module (tests/test_serve_json.py); the
server, which has every module imported anyway, reads requests with json and msgspec.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import TypeAlias

    Value: TypeAlias = "str | int | bool | Sequence[Value] | Mapping[str, Value] | None"

__all__ = ["dumps", "loads"]

_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SHORT_ESCAPES.update({"\b": "\\b", "\f": "\\f"})
_UNESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r"}
_UNESCAPES["t"] = "\t"
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
_SPACE = frozenset(" \t\n\r")
_WORDS = (("true", True), ("false", False), ("null", None))


def dumps(value: Value) -> bytes:
    """`value` as ``json.dumps(value).encode()`` gives it."""
    return _write(value).encode("ascii")


def _write(value: Value) -> str:
    if isinstance(value, str):
        return _quote(value)
    if value is None or isinstance(value, bool):
        return "null" if value is None else "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_write(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{_quote(key)}: {_write(item)}" for key, item in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _quote(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'  # most of an environment: nothing to escape
    out = ['"']
    for char in text:
        code = ord(char)
        if 0x20 <= code < 0x7F and char not in '"\\':
            out.append(char)
        elif char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:  # a surrogate pair, as UTF-16 writes it
            code -= 0x10000
            out.append(f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}")
    out.append('"')
    return "".join(out)


def loads(data: bytes) -> Value:
    """The JSON value in `data` (UTF-8); raises ValueError for anything else, and for numbers
    other than integers."""
    text = data.decode("utf-8")
    value, end = _read(text, _skip(text, 0))
    if _skip(text, end) != len(text):
        raise ValueError(f"extra data at {end}")
    return value


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in _SPACE:
        at += 1
    return at


def _read(text: str, at: int) -> tuple[Value, int]:
    """The value that starts at `at` (no space before it), and where it ends."""
    char = text[at : at + 1]
    if char == '"':
        return _read_string(text, at + 1)
    if char == "{":
        return _read_object(text, at + 1)
    if char == "[":
        return _read_array(text, at + 1)
    for word, value in _WORDS:
        if text.startswith(word, at):
            return value, at + len(word)
    return _read_integer(text, at)


def _read_integer(text: str, at: int) -> tuple[int, int]:
    start = at + 1 if text.startswith("-", at) else at
    end = start
    while end < len(text) and text[end] in _DIGITS:
        end += 1
    if end == start or (text[start] == "0" and end > start + 1):
        raise ValueError(f"expected a value at {at}")
    if text[end : end + 1] in (".", "e", "E"):
        raise ValueError(f"a number other than an integer at {at}")
    return int(text[at:end]), end


def _read_string(text: str, at: int) -> tuple[str, int]:
    """The string whose opening quote is just before `at`."""
    parts = []
    while True:
        end = at
        while end < len(text) and text[end] not in '"\\' and text[end] >= " ":
            end += 1
        parts.append(text[at:end])
        char = text[end : end + 1]
        if char == '"':
            return "".join(parts), end + 1
        if char != "\\":
            raise ValueError(f"unterminated string at {end}")
        escape = text[end + 1 : end + 2]
        if escape in _UNESCAPES:
            parts.append(_UNESCAPES[escape])
            at = end + 2
        elif escape == "u":
            code, at = _read_hex(text, end + 2)
            if 0xD800 <= code < 0xDC00 and text.startswith("\\u", at):
                low, after = _read_hex(text, at + 2)
                if 0xDC00 <= low < 0xE000:
                    code, at = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00), after
            parts.append(chr(code))
        else:
            raise ValueError(f"invalid escape at {end}")


def _read_hex(text: str, at: int) -> tuple[int, int]:
    digits = text[at : at + 4]
    if len(digits) != 4 or not _HEX.issuperset(digits):
        raise ValueError(f"invalid \\u escape at {at - 2}")
    return int(digits, 16), at + 4


def _read_object(text: str, at: int) -> tuple[dict[str, Value], int]:
    """The object whose opening brace is just before `at`."""
    found: dict[str, Value] = {}
    at = _skip(text, at)
    if text.startswith("}", at):
        return found, at + 1
    while True:
        if not text.startswith('"', at):
            raise ValueError(f"expected a name at {at}")
        key, at = _read_string(text, at + 1)
        at = _skip(text, at)
        if not text.startswith(":", at):
            raise ValueError(f"expected ':' at {at}")
        found[key], at = _read(text, _skip(text, at + 1))
        done, at = _after_item(text, at, "}")
        if done:
            return found, at


def _read_array(text: str, at: int) -> tuple[list[Value], int]:
    """The array whose opening bracket is just before `at`."""
    found: list[Value] = []
    at = _skip(text, at)
    if text.startswith("]", at):
        return found, at + 1
    while True:
        item, at = _read(text, at)
        found.append(item)
        done, at = _after_item(text, at, "]")
        if done:
            return found, at


def _after_item(text: str, at: int, closer: str) -> tuple[bool, int]:
    """Past a member or element that ends at `at`: (True, past `closer`) at the end of its
    object or array, else (False, where the next one starts)."""
    at = _skip(text, at)
    if text.startswith(closer, at):
        return True, at + 1
    if not text.startswith(",", at):
        raise ValueError(f"expected ',' or {closer!r} at {at}")
    return False, _skip(text, at + 1)
