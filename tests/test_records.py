"""shared/records.py: the base of the small immutable classes a run imports."""

from __future__ import annotations

from typing import Final

from vmsuper.shared.records import Record


class Point(Record):
    __slots__ = __match_args__ = ("x", "y")
    x: Final[int]
    y: Final[int]

    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y


class OtherPoint(Point):
    __slots__ = ()


def test_records_compare_and_hash_by_their_fields_in_order() -> None:
    assert Point(1, 2) == Point(1, 2)
    assert Point(1, 2) != Point(2, 1)
    assert hash(Point(1, 2)) == hash(Point(1, 2))
    assert len({Point(1, 2), Point(1, 2), Point(2, 1)}) == 2


def test_records_of_other_classes_or_tuples_are_never_equal() -> None:
    assert Point(1, 2) != OtherPoint(1, 2)
    assert OtherPoint(1, 2) != Point(1, 2)
    assert Point(1, 2) != (1, 2)


def test_records_print_and_match_as_dataclasses_did() -> None:
    assert repr(Point(1, "a")) == "Point(x=1, y='a')"  # type: ignore[arg-type]
    match Point(3, 4):
        case Point(x, y):
            assert (x, y) == (3, 4)
        case _:
            raise AssertionError("no match")
    assert not hasattr(Point(1, 2), "__dict__")
