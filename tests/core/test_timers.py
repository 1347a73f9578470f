"""The deadline heap (core/timers.py): lazy refresh, stale entries, rebuild."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

import tests.hypothesis_profile  # noqa: F401
from firezone_relay.core.timers import Deadlines, Timed


class Records:
    """A table of live records, as the relay keeps its allocations."""

    def __init__(self) -> None:
        self.live: list[Timed] = []
        self.heap = Deadlines(lambda: list(self.live), lambda: len(self.live))

    def add(self, deadline: float) -> Timed:
        obj = Timed(deadline=deadline)
        self.live.append(obj)
        self.heap.schedule(obj)
        return obj

    def kill(self, obj: Timed) -> None:
        obj.dead = True
        self.live.remove(obj)

    def due(self, now: float) -> list[Timed]:
        out = []
        while (obj := self.heap.pop_due(now)) is not None:
            out.append(obj)
        return out


class DeadlinesTests(SynchronousTestCase):
    def test_empty(self) -> None:
        heap = Deadlines(list, lambda: 0)
        self.assertIsNone(heap.next_deadline())
        self.assertIsNone(heap.pop_due(1e9))
        self.assertEqual(len(heap), 0)

    def test_earliest_first_and_only_when_due(self) -> None:
        r = Records()
        late, early = r.add(20.0), r.add(10.0)
        self.assertEqual(r.heap.next_deadline(), 10.0)
        self.assertEqual(r.due(9.9), [])
        self.assertEqual(r.due(10.0), [early])
        self.assertEqual(r.heap.next_deadline(), 20.0)
        self.assertEqual(r.due(100.0), [late])

    def test_pushed_out_deadline_costs_no_push_and_is_honoured(self) -> None:
        r = Records()
        obj = r.add(10.0)
        obj.deadline = 30.0
        r.heap.schedule(obj)  # later than its live entry: nothing pushed
        self.assertEqual(len(r.heap), 1)
        self.assertEqual(r.heap.next_deadline(), 30.0)
        self.assertEqual(r.due(29.0), [])
        self.assertEqual(r.due(30.0), [obj])

    def test_earlier_deadline_is_pushed(self) -> None:
        r = Records()
        obj = r.add(30.0)
        obj.deadline = 5.0
        r.heap.schedule(obj)
        self.assertEqual(r.due(5.0), [obj])
        self.assertEqual(r.due(100.0), [])  # the stale 30 s entry is skipped

    def test_dead_records_never_come_out(self) -> None:
        r = Records()
        obj = r.add(1.0)
        r.kill(obj)
        self.assertIsNone(r.heap.next_deadline())
        self.assertEqual(r.due(10.0), [])

    def test_stale_entries_are_bounded(self) -> None:
        r = Records()
        keep = r.add(1e9)
        for i in range(2000):
            r.kill(r.add(float(i)))
        self.assertLessEqual(len(r.heap), 64 + 4 * len(r.live) + 1)
        self.assertEqual(r.heap.next_deadline(), 1e9)
        self.assertEqual(r.due(1e9), [keep])

    def test_clear(self) -> None:
        r = Records()
        r.add(1.0)
        r.heap.clear()
        self.assertEqual(len(r.heap), 0)
        self.assertIsNone(r.heap.next_deadline())

    @settings(max_examples=50)
    @given(st.lists(st.tuples(st.sampled_from("arkt"), st.integers(0, 50), st.integers(0, 100)), max_size=120), st.integers(0, 2**32))
    def test_matches_a_sorted_model(self, steps: list[tuple[str, int, int]], seed: int) -> None:
        """Add, refresh (either way), kill and tick in any order: what comes
        out, and when, is what a plain list of deadlines says."""
        r = Records()
        rng = random.Random(seed)
        now = 0.0
        for op, pick, value in steps:
            if op == "a":
                r.add(now + value)
            elif op in "rk" and r.live:
                obj = r.live[pick % len(r.live)]
                if op == "r":
                    obj.deadline = now + value
                    r.heap.schedule(obj)
                else:
                    r.kill(obj)
            else:
                now += value * rng.random()
                expected = sorted((o for o in r.live if o.deadline <= now), key=lambda o: o.deadline)
                got = r.due(now)
                self.assertEqual(sorted(id(o) for o in got), sorted(id(o) for o in expected))
                self.assertEqual([o.deadline for o in got], sorted(o.deadline for o in got))
                for obj in got:
                    r.live.remove(obj)
                    obj.dead = True
            pending = [o.deadline for o in r.live]
            self.assertEqual(r.heap.next_deadline(), min(pending) if pending else None)
