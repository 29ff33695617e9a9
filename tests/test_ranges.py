"""Reserved ranges and the call hint: crosvm's rules, checked case by case and against a model."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsuper.shared.ranges import (
    U64_LIMIT,
    CallHint,
    Range,
    RangeError,
    RangeTable,
    RegHint,
    Space,
)

IO = Space.IOPORT
MMIO = Space.MMIO


def reserve_errno(table: RangeTable, space: Space, start: int, length: int) -> int:
    """0 when the reservation (or release) succeeds, else its errno."""
    try:
        table.reserve(space, start, length)
    except RangeError as exc:
        assert exc.errno is not None
        return exc.errno
    return 0


def test_space_values_match_the_schema() -> None:
    from vmsuper.shared import plugin_pb2

    assert Space.IOPORT == plugin_pb2.IOPORT
    assert Space.MMIO == plugin_pb2.MMIO


def test_crosvm_reserve_sequence() -> None:
    table = RangeTable()
    cases = [
        (0x10, 0, errno.ENOENT),  # length 0 releases, and nothing starts at 0x10
        (0x10, 0x10, 0),
        (0x0F, 0x10, errno.EPERM),
        (0x10, 0x10, errno.EPERM),
        (0x10, 0x15, errno.EPERM),
        (0x12, 0x15, errno.EPERM),
        (0x12, 0x01, errno.EPERM),
        (0x00, 0x20, errno.EPERM),
        (0x20, 0x05, 0),
        (0x25, 0x05, 0),
        (0x00, 0x10, 0),
    ]
    for start, length, expected in cases:
        assert reserve_errno(table, IO, start, length) == expected, (start, length)
    assert [(r.start, r.length) for r in table.ranges()] == [
        (0x00, 0x10),
        (0x10, 0x10),
        (0x20, 0x05),
        (0x25, 0x05),
    ]
    assert len(table) == 4


def test_error_is_an_oserror_with_errno_and_message() -> None:
    table = RangeTable()
    table.reserve(IO, 0x10, 0x10)
    with pytest.raises(OSError) as info:
        table.reserve(IO, 0x18, 4)
    assert isinstance(info.value, RangeError)
    assert info.value.errno == errno.EPERM
    assert "0x10" in str(info.value)


def test_spaces_are_independent() -> None:
    table = RangeTable()
    table.reserve(IO, 0x3F8, 8)
    table.reserve(MMIO, 0x3F8, 8, async_write=True)
    assert table.lookup(IO, 0x3F8) == Range(IO, 0x3F8, 8, False)
    assert table.lookup(MMIO, 0x3FF) == Range(MMIO, 0x3F8, 8, True)
    table.reserve(IO, 0x3F8, 0)
    assert table.lookup(IO, 0x3F8) is None
    assert table.lookup(MMIO, 0x3F8) is not None
    assert reserve_errno(table, IO, 0x3F8, 0) == errno.ENOENT
    assert list(table.ranges(IO)) == []
    assert list(table.ranges(MMIO)) == [Range(MMIO, 0x3F8, 8, True)]


def test_release_needs_the_exact_start_then_allows_reuse() -> None:
    table = RangeTable()
    table.reserve(MMIO, 0x1000, 0x100)
    assert reserve_errno(table, MMIO, 0x1001, 0) == errno.ENOENT
    assert reserve_errno(table, MMIO, 0x0FFF, 0) == errno.ENOENT
    table.reserve(MMIO, 0x1000, 0)
    assert len(table) == 0
    table.reserve(MMIO, 0x1080, 0x100)
    table.reserve(MMIO, 0x1000, 0x80)
    assert [r.start for r in table.ranges()] == [0x1000, 0x1080]


def test_overflow_at_2_pow_64() -> None:
    table = RangeTable()
    # crosvm computes start + length in 64 bits: reaching 2**64 exactly already overflows.
    assert reserve_errno(table, MMIO, U64_LIMIT - 1, 1) == errno.EINVAL
    assert reserve_errno(table, MMIO, 1, U64_LIMIT - 1) == errno.EINVAL
    assert reserve_errno(table, MMIO, U64_LIMIT - 0x10, 0x20) == errno.EINVAL
    assert reserve_errno(table, MMIO, U64_LIMIT - 2, 1) == 0
    assert table.lookup(MMIO, U64_LIMIT - 2) is not None
    assert table.lookup(MMIO, U64_LIMIT - 1) is None
    # A start inside a range is refused as an overlap before the overflow is looked at.
    assert reserve_errno(table, MMIO, U64_LIMIT - 2, 8) == errno.EPERM


@pytest.mark.parametrize(
    ("space", "start", "length"),
    [(2, 0, 1), (-1, 0, 1), (IO, -1, 1), (IO, U64_LIMIT, 1), (IO, 0, -1), (IO, 0, U64_LIMIT)],
)
def test_malformed_input_is_einval(space: int, start: int, length: int) -> None:
    table = RangeTable()
    with pytest.raises(RangeError) as info:
        table.reserve(space, start, length)
    assert info.value.errno == errno.EINVAL
    assert len(table) == 0


def test_lookup_at_boundaries() -> None:
    table = RangeTable()
    table.reserve(IO, 0x60, 1)
    table.reserve(IO, 0x70, 0x10)
    assert table.lookup(IO, 0x5F) is None
    assert table.lookup(IO, 0x60) == Range(IO, 0x60, 1)
    assert table.lookup(IO, 0x61) is None
    assert table.lookup(IO, 0x6F) is None
    found = table.lookup(IO, 0x70)
    assert found is not None and found.end == 0x80
    assert table.lookup(IO, 0x7F) == found
    assert table.lookup(IO, 0x80) is None
    assert table.lookup(IO, 0) is None
    assert found.contains(0x7F) and not found.contains(0x80) and not found.contains(0x6F)


def test_max_ranges_gives_enospc_but_release_still_works() -> None:
    table = RangeTable(max_ranges=2)
    table.reserve(IO, 0, 1)
    table.reserve(MMIO, 0, 1)
    assert reserve_errno(table, IO, 0x10, 1) == errno.ENOSPC
    # Overlap is reported before fullness, as the more precise error.
    assert reserve_errno(table, IO, 0, 1) == errno.EPERM
    table.reserve(IO, 0, 0)
    table.reserve(IO, 0x10, 1)
    assert len(table) == 2


def test_negative_max_ranges_is_refused() -> None:
    with pytest.raises(ValueError):
        RangeTable(max_ranges=-1)


# A small address universe so that random sequences collide often.
ops = st.lists(
    st.tuples(
        st.sampled_from([IO, MMIO]),
        st.integers(0, 40),
        st.integers(0, 12),
        st.booleans(),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_sequences_match_a_brute_force_model(
    sequence: list[tuple[Space, int, int, bool]],
) -> None:
    table = RangeTable(max_ranges=8)
    model: dict[tuple[Space, int], tuple[int, bool]] = {}  # (space, start) -> (length, async)
    for space, start, length, async_write in sequence:
        if length == 0:
            expected = 0 if (space, start) in model else errno.ENOENT
        else:
            wanted = set(range(start, start + length))
            taken = any(
                wanted & set(range(s, s + n)) for (sp, s), (n, _) in model.items() if sp == space
            )
            if taken:
                expected = errno.EPERM
            elif len(model) >= 8:
                expected = errno.ENOSPC
            else:
                expected = 0
        try:
            table.reserve(space, start, length, async_write)
            got = 0
        except RangeError as exc:
            got = exc.errno or -1
        assert got == expected
        if got == 0 and length == 0:
            del model[(space, start)]
        elif got == 0:
            model[(space, start)] = (length, async_write)
        assert len(table) == len(model)
    assert sorted(table.ranges(), key=lambda r: (r.space, r.start)) == [
        Range(sp, s, n, a) for (sp, s), (n, a) in sorted(model.items())
    ]
    for space in Space:
        for addr in range(0, 54):
            holders = [
                Range(space, s, n, a)
                for (sp, s), (n, a) in model.items()
                if sp == space and s <= addr < s + n
            ]
            assert table.lookup(space, addr) == (holders[0] if holders else None)


def test_hint_matches_space_address_and_direction() -> None:
    hint = CallHint(IO, 0x80, on_write=True)
    assert hint.matches(IO, 0x80, True)
    assert not hint.matches(IO, 0x80, False)
    assert not hint.matches(MMIO, 0x80, True)
    assert not hint.matches(IO, 0x81, True)
    # Registers always go on a match; nothing more without a RegHint.
    assert hint.extra_state(1, 2, 3, 4) == (False, False)


def test_hint_address_zero_matches_nothing() -> None:
    hint = CallHint(IO, 0, on_write=False, hints=(RegHint(send_sregs=True),))
    assert not hint.is_set
    assert not hint.matches(IO, 0, False)


def test_hint_first_matching_reg_hint_wins() -> None:
    hint = CallHint(
        MMIO,
        0xFEE0_0000,
        on_write=False,
        hints=(
            RegHint(match_rax=True, rax=1, match_rcx=True, rcx=7, send_debugregs=True),
            RegHint(match_rax=True, rax=1, send_sregs=True),
            RegHint(match_rdx=True, rdx=9, send_sregs=True, send_debugregs=True),
            RegHint(send_sregs=True, send_debugregs=True),  # matches anything
        ),
    )
    assert hint.extra_state(1, 0, 7, 0) == (False, True)
    assert hint.extra_state(1, 0, 8, 9) == (True, False)
    assert hint.extra_state(2, 0, 0, 9) == (True, True)
    assert hint.extra_state(2, 5, 5, 5) == (True, True)
    narrow = CallHint(MMIO, 1, False, (RegHint(match_rbx=True, rbx=3, send_sregs=True),))
    assert narrow.extra_state(0, 3, 0, 0) == (True, False)
    assert narrow.extra_state(0, 4, 0, 0) == (False, False)


def test_hint_coerces_and_validates() -> None:
    hint = CallHint(1, 0x10, False, [RegHint()])  # type: ignore[arg-type]
    assert hint.space is Space.MMIO
    assert hint.hints == (RegHint(),)
    with pytest.raises(RangeError):
        CallHint(Space.IOPORT, U64_LIMIT, False)
    with pytest.raises(RangeError):
        CallHint(5, 1, False)  # type: ignore[arg-type]
    with pytest.raises(RangeError):
        RegHint(rax=-1)


def test_ranges_and_hints_are_values_of_every_field() -> None:
    """Equal (and of equal hashes) when every field is, different when any one differs;
    printed field by field."""
    samples: list[tuple[Callable[[], object], list[object]]] = [
        (
            lambda: Range(IO, 0x3F8, 8),
            [
                Range(MMIO, 0x3F8, 8),
                Range(IO, 0x3F9, 8),
                Range(IO, 0x3F8, 9),
                Range(IO, 0x3F8, 8, True),
            ],
        ),
        (RegHint, [RegHint(**{name: True}) for name in RegHint.__match_args__]),
        (
            lambda: CallHint(IO, 0x80, True, (RegHint(),)),
            [
                CallHint(MMIO, 0x80, True, (RegHint(),)),
                CallHint(IO, 0x81, True, (RegHint(),)),
                CallHint(IO, 0x80, False, (RegHint(),)),
                CallHint(IO, 0x80, True),
            ],
        ),
    ]
    for make, others in samples:
        value, twin = make(), make()
        assert twin == value and hash(twin) == hash(value) and twin is not value
        for other in others:
            assert other != value, other
    assert repr(Range(MMIO, 1, 2, True)) == (
        "Range(space=<Space.MMIO: 1>, start=1, length=2, async_write=True)"
    )
    assert repr(CallHint(IO, 0x80, True)) == (
        "CallHint(space=<Space.IOPORT: 0>, address=128, on_write=True, hints=())"
    )
    assert repr(RegHint(rax=1)).startswith("RegHint(match_rax=False, match_rbx=False,")
    assert Range(IO, 1, 2) != (IO, 1, 2, False)
