"""The config's shape walk on its own: messages are vmsuper's, whatever msgspec says."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec
import pytest

from vmsuper.supervisor import config, config_shape
from vmsuper.supervisor.config import Config, LimitsConfig


class Inner(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    size: int | str = 0


class Outer(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mode: Literal["a", "b"] = "a"
    ratio: float = 1.0
    path: Path = Path("x")
    items: tuple[Inner, ...] = ()
    env: dict[str, str] = {}
    inner: Inner | None = None


@pytest.mark.parametrize(
    ("document", "key", "message"),
    [
        ({"mode": "c"}, "mode", "expected one of 'a', 'b', got 'c'"),
        ({"mode": 1}, "mode", "expected one of 'a', 'b', got 1"),
        ({"ratio": True}, "ratio", "expected a number, got boolean"),
        ({"ratio": "1"}, "ratio", "expected a number, got string"),
        ({"path": ""}, "path", "must not be empty"),
        ({"path": []}, "path", "expected a string, got array"),
        ({"items": {}}, "items", "expected an array, got table"),
        ({"items": [{"name": "x"}, {}]}, "", "[items[1]] name is required"),
        ({"items": [{"name": 1}]}, "items[0].name", "expected a string, got integer"),
        (
            {"items": [{"name": "x", "size": 1.5}]},
            "items[0].size",
            "expected an integer or a string, got number",
        ),
        ({"env": {"A": 2}}, "env.A", "expected a string, got integer"),
        ({"inner": 3}, "inner", "expected a table, got integer"),
        ({"inner": {"name": "n", "colour": 1}}, "", "unknown key [inner] colour"),
        ({"other": 1}, "", "unknown table [other]"),
    ],
)
def test_errors(document: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(config_shape.ShapeError) as info:
        config_shape.check(document, Outer)
    assert (info.value.key, info.value.message) == (key, message)


def test_accepted_documents_convert() -> None:
    document = {
        "mode": "b",
        "ratio": 2,
        "path": "p",
        "items": [{"name": "x", "size": "1M"}, {"name": "y", "size": 3}],
        "env": {"A": "1"},
        "inner": {"name": "n"},
    }
    config_shape.check(document, Outer)
    assert msgspec.convert(document, Outer, dec_hook=lambda _, v: Path(v)).items[0].size == "1M"


def test_every_config_field_type_is_known() -> None:
    """A field type the walk cannot check would raise TypeError on the first config using it."""
    full = {
        "vm": {"vcpus": 1, "low_latency": False, "poll_us": 1},
        "plugin": {
            "path": "p",
            "args": ["a"],
            "env": {"A": "b"},
            "vcpu_transport": "pipes",
            "grace_period": 1,
            "sandbox": True,
            "mounts": [{"src": "s", "dst": "/d", "writable": True}],
        },
        "net": {"host_ip": "10.0.0.1", "netmask": "255.255.255.0", "mac": "02:00:00:00:00:01"},
        "log": {"dir": "d", "level": "debug"},
        "limits": {f.name: 1 for f in msgspec.structs.fields(LimitsConfig)},
    }
    config_shape.check(full, Config)


class Described(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    size: Annotated[int | str, msgspec.Meta(description="a size or a count")] = 0


def test_a_description_names_what_is_expected() -> None:
    with pytest.raises(config_shape.ShapeError) as info:
        config_shape.check({"size": True}, Described)
    assert info.value.message == "expected a size or a count, got boolean"
    config_shape.check({"size": "1M"}, Described)


def test_prepare_resolves_every_struct_a_config_can_hold() -> None:
    """`vmsuper serve` prepares them all, so that no fork resolves a table's annotations."""
    tables = {config.VmConfig, config.PluginConfig, config.NetConfig, config.LogConfig}
    assert config_shape.prepare(Config) == {Config, *tables, LimitsConfig, config.MountConfig}
    assert config_shape.prepare(Outer) >= {Outer}
