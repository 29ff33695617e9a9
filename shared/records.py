"""`Record`: equality, hash and repr for small immutable classes, by the fields their
`__match_args__` names.

`@dataclass` compiles each class's methods with exec when the class is made: on the modules a
run imports that cost about a millisecond a class, every start-up. Records written as plain
slotted classes on this base cost nothing to make. (msgspec's Struct would too, but the plugin
SDK imports shared/kvm.py, and must not pay for msgspec.)
"""

from __future__ import annotations


class Record:
    """Compare, hash and print by the fields `__match_args__` names, in order; a subclass sets
    `__slots__ = __match_args__ = (field, ...)` and assigns each in its `__init__`. Instances
    of different classes are never equal. The fields are `Final` by convention (mypy holds
    code to it); nothing stops an assignment at run time."""

    __slots__ = ()
    __match_args__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self) or not isinstance(other, Record):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
        return f"{type(self).__qualname__}({fields})"
