"""The hand-over's JSON (supervisor/serve_json.py), checked against the json module."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsuper.supervisor import serve_json

# Every code point, lone surrogates included (what undecodable bytes become in os.environ).
TEXT = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF))
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(VALUES)
def test_it_writes_what_json_dumps_writes(value: object) -> None:
    assert serve_json.dumps(value) == json.dumps(value).encode()  # type: ignore[arg-type]


@settings(max_examples=500, deadline=None)
@given(VALUES)
def test_it_reads_back_what_json_writes(value: object) -> None:
    assert serve_json.loads(json.dumps(value).encode()) == value
    spaced = json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if b"\xed" not in spaced:  # a lone surrogate has no UTF-8 form: json writes it escaped only
        assert serve_json.loads(spaced) == value


def test_a_run_request_with_undecodable_bytes_goes_through() -> None:
    request: dict[str, serve_json.Value] = {
        "argv": ["run", "vm-\udcff.toml"],
        "env": {"LANG": "C", "X": "\udcfe\udcff"},
    }
    written = serve_json.dumps(request)
    assert written == json.dumps(request).encode()
    assert b"\\udcfe\\udcff" in written
    assert json.loads(written) == request  # as the server reads it


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"{",
        b'{"a": 1,}',
        b'{"a" 1}',
        b"{a: 1}",
        b"[1 2]",
        b"[1,]",
        b'"open',
        b'"a\\x"',
        b'"\\u12"',
        b'"\\u12g4"',
        b'"tab\there"',
        b"1.5",
        b"1e3",
        b"01",
        b"-",
        b"tru",
        b'{"exit": 0} {"exit": 1}',
        b'"\xff"',
    ],
)
def test_anything_else_is_a_value_error(text: bytes) -> None:
    with pytest.raises(ValueError):
        serve_json.loads(text)


def test_what_the_server_answers_is_read() -> None:
    for answer in (
        {"started": 4321},
        {"exit": 130},
        {"refused": 'the server is vmsuper 9.9 \u2014 "quoted"\n', "local": True},
        {"refused": "cannot read the request", "local": False},
    ):
        assert serve_json.loads(json.dumps(answer).encode()) == answer


def test_only_json_values_are_written() -> None:
    with pytest.raises(TypeError, match="float"):
        serve_json.dumps([1.5])  # type: ignore[list-item]
