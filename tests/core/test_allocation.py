"""Allocation records and the port picker (core/allocation.py)."""

from __future__ import annotations

import random
from typing import Callable

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

import tests.hypothesis_profile  # noqa: F401
from firezone_relay.core.allocation import Allocation, Reservation, pick_port


def picker(seed: int = 1) -> Callable[[int], int]:
    return random.Random(seed).getrandbits


class PickPortTests(SynchronousTestCase):
    def test_in_range_and_not_used_or_tried(self) -> None:
        for seed in range(50):
            port = pick_port(50000, 50009, {50000, 50001}, {50002}, False, False, picker(seed))
            self.assertIsNotNone(port)
            self.assertIn(port, range(50003, 50010))

    def test_full_range_gives_none(self) -> None:
        self.assertIsNone(pick_port(50000, 50003, {50000, 50001}, {50002, 50003}, False, False, picker()))

    def test_the_last_free_port_is_found_by_the_sweep(self) -> None:
        used = set(range(40000, 50000)) - {44444}
        self.assertEqual(pick_port(40000, 49999, used, set(), False, False, picker()), 44444)

    def test_even_port(self) -> None:
        for seed in range(50):
            port = pick_port(50000, 50099, set(), set(), True, False, picker(seed))
            assert port is not None
            self.assertEqual(port % 2, 0)

    def test_even_port_with_reservation_needs_the_next_port_free(self) -> None:
        # 50000's neighbour is used and 50002's neighbour is past the range.
        self.assertIsNone(pick_port(50000, 50002, {50001}, set(), True, True, picker()))
        self.assertEqual(pick_port(50000, 50003, {50001}, set(), True, True, picker()), 50002)
        self.assertIn(pick_port(50000, 50002, {50001}, set(), True, False, picker()), (50000, 50002))  # no R bit: no neighbour needed

    @given(st.integers(1024, 65000), st.integers(0, 40), st.sets(st.integers(0, 40)), st.booleans(), st.booleans(), st.integers(0, 2**32))
    def test_any_answer_is_usable_and_none_only_when_nothing_is(
        self, low: int, span: int, taken: set[int], even: bool, reserve: bool, seed: int
    ) -> None:
        high = low + span
        used = {low + t for t in taken}

        def usable(p: int) -> bool:
            if p in used:
                return False
            return not even or (p % 2 == 0 and (not reserve or (p + 1 <= high and p + 1 not in used)))

        port = pick_port(low, high, used, set(), even, reserve, picker(seed))
        if port is None:
            self.assertFalse(any(usable(p) for p in range(low, high + 1)))
        else:
            self.assertTrue(low <= port <= high and usable(port))


class RecordTests(SynchronousTestCase):
    def test_reservation_detach_cuts_both_links(self) -> None:
        alloc = Allocation(("198.51.100.7", 40000), "u", (4,), 600)
        reservation = Reservation(b"t" * 8, 50001, 4, deadline=30.0)
        reservation.owner, alloc.reserved = alloc, reservation
        reservation.detach()
        self.assertIsNone(reservation.owner)
        self.assertIsNone(alloc.reserved)
        reservation.detach()  # twice is harmless
        self.assertIsNone(alloc.reserved)

    def test_a_new_allocation_is_empty(self) -> None:
        alloc = Allocation(("198.51.100.7", 40000), "u", (4, 6), 600)
        self.assertEqual((alloc.port, alloc.active, alloc.dead), (0, False, False))
        self.assertEqual((alloc.permissions, alloc.channels, alloc.chan_in), ({}, {}, {}))
        self.assertEqual(alloc.meter, [0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0])
