"""The relay's deadlines: one heap for everything that can expire.

Upstream keeps them in ``time_events.rs``; here allocations, permissions,
channels and port reservations are ``Timed`` records, and ``Deadlines`` holds
``(deadline, sequence, record)`` entries for them.  A record remembers the
deadline of its live heap entry (``scheduled``), so a refresh that pushes its
``deadline`` out costs no heap operation: the old entry is found stale when
it reaches the top and the record is pushed again at its new deadline.  Dead
records' entries are skipped the same way, and the heap is rebuilt from the
live records when stale entries pile up, so it stays within a constant
factor of what is alive.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

_NEVER = float("inf")


@dataclass(slots=True, eq=False, repr=False)
class Timed:
    """Something with a deadline: ``dead`` once it is gone for good.

    A record class: ``deadline`` is given by keyword, after the subclass's
    own fields.  Compared and hashed by identity."""

    deadline: float = field(kw_only=True)
    scheduled: float = field(default=_NEVER, init=False)
    dead: bool = field(default=False, init=False)


class Deadlines:
    """A lazy min-heap of ``Timed`` records.

    ``live`` returns every live record and ``live_count`` how many there are;
    they are asked for when the heap has grown past ``64 + 4 × live_count``.
    """

    __slots__ = ("_heap", "_seq", "_live", "_live_count")

    def __init__(self, live: Callable[[], Iterable[Timed]], live_count: Callable[[], int]) -> None:
        self._heap: list[tuple[float, int, Timed]] = []
        self._seq = 0
        self._live = live
        self._live_count = live_count

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, obj: Timed) -> None:
        """Make sure ``obj`` comes out of ``pop_due`` by its ``deadline``."""
        if obj.deadline < obj.scheduled:
            obj.scheduled = obj.deadline
            self._seq += 1
            heapq.heappush(self._heap, (obj.deadline, self._seq, obj))
            if len(self._heap) > 64 + 4 * self._live_count():
                self._rebuild()

    def next_deadline(self) -> Optional[float]:
        """The earliest deadline of a live record, or ``None``."""
        heap = self._heap
        while heap:
            deadline, _, obj = heap[0]
            if obj.dead or obj.scheduled != deadline:
                heapq.heappop(heap)
            elif obj.deadline > deadline:  # pushed out since: requeue
                heapq.heappop(heap)
                obj.scheduled = _NEVER
                self.schedule(obj)
            else:
                return deadline
        return None

    def pop_due(self, now: float) -> Optional[Timed]:
        """The next live record whose deadline is ``now`` or earlier, taken
        off the heap; ``None`` when nothing is due."""
        deadline = self.next_deadline()
        if deadline is None or deadline > now:
            return None
        obj = heapq.heappop(self._heap)[2]
        obj.scheduled = _NEVER
        return obj

    def clear(self) -> None:
        """Forget every entry (nothing is alive any more)."""
        self._heap.clear()

    def _rebuild(self) -> None:
        self._heap = []
        for obj in self._live():
            obj.scheduled = _NEVER
            self.schedule(obj)
