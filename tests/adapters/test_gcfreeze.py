"""``gcfreeze.StartupFreeze``: start-up objects frozen once the reactor runs."""

from __future__ import annotations

import gc
from typing import Any, List

from twisted.application.service import MultiService
from twisted.trial import unittest

from firezone_relay.adapters.gcfreeze import StartupFreeze


class FakeReactor:
    def __init__(self) -> None:
        self.calls: List[Any] = []

    def callWhenRunning(self, f: Any) -> None:
        self.calls.append(f)


class StartupFreezeTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)  # the test process must not keep its objects frozen
        self.addCleanup(gc.set_threshold, *gc.get_threshold())

    def test_freezes_once_the_reactor_runs(self) -> None:
        gc.unfreeze()
        reactor = FakeReactor()
        top = MultiService()
        service = StartupFreeze(reactor)
        service.setServiceParent(top)
        top.startService()
        self.assertEqual(gc.get_freeze_count(), 0)  # not before the reactor runs
        self.assertEqual(len(reactor.calls), 1)
        marker = object()
        holder = [marker]
        reactor.calls[0]()
        self.assertGreater(gc.get_freeze_count(), 1000)
        self.assertEqual(service.frozen, gc.get_freeze_count())
        self.assertEqual(gc.get_threshold(), (7000, 10, 100))
        self.assertFalse(gc.is_tracked(marker))  # untracked object: stays as it was
        self.assertNotIn(holder, gc.get_objects())  # frozen objects are out of every generation

    def test_stopped_before_the_reactor_runs_freezes_nothing(self) -> None:
        gc.unfreeze()
        reactor = FakeReactor()
        service = StartupFreeze(reactor)
        service.startService()
        service.stopService()
        thresholds = gc.get_threshold()
        reactor.calls[0]()
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold(), thresholds)
