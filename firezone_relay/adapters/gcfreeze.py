"""Start-up objects out of the garbage collector's way.

By the time the reactor runs, the process holds ~100,000 objects that live
as long as it does (Twisted, the modules, the configuration).  CPython's
full collections scan every one of them each time; with 10,000 allocations
being made that was about a tenth of the relay's CPU (issue 19, measured
with ``gc.callbacks``).  ``gc.freeze()`` moves them to the permanent
generation, which collections skip; objects made later (allocations, their
sockets) are collected as before.  One ``gc.collect()`` first, so that
start-up garbage is not frozen with them.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.logger import Logger

from firezone_relay.adapters._twisted import WhenRunningService

log = Logger(namespace="firezone_relay.adapters.gcfreeze")


#: Collection thresholds once frozen (CPython's default: 700, 10, 10).  A
#: young collection every 7,000 new container objects instead of 700 (the
#: short-lived ones of a request die before being scanned), and a full one
#: considered after 100 middle-generation collections instead of 10 (and,
#: as always, only once the old generation grew by a quarter).  With 12,500
#: allocations being made the collector took 0.25 s of 2.2 s of CPU with the
#: defaults and 0.025 s with these (``gc.callbacks``, loaded machine).
THRESHOLDS = (7000, 10, 100)


def freeze_startup_objects() -> int:
    """Collect, freeze everything alive, set ``THRESHOLDS``; how many
    objects are frozen."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    return gc.get_freeze_count()


class StartupFreeze(WhenRunningService):
    """Freezes the start-up objects once the reactor runs (after every
    other service has started)."""

    name = "gc-freeze"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.frozen = 0

    def when_running(self) -> None:
        self.frozen = freeze_startup_objects()
        log.info(
            "garbage collector: {count} start-up objects frozen (full collections skip them), thresholds {thresholds}",
            count=self.frozen,
            thresholds=gc.get_threshold(),
        )
