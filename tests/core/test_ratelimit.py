"""Token buckets (core/ratelimit.py): the reflection guard and --max-bps."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core.ratelimit import MAX_BUCKETS, ReflectionGuard, over_budget


class ReflectionGuardTests(SynchronousTestCase):
    def test_burst_then_refill(self) -> None:
        guard = ReflectionGuard(burst=3, rate=2.0)
        self.assertEqual([guard.allow("192.0.2.1", 100.0) for _ in range(4)], [True, True, True, False])
        self.assertTrue(guard.allow("192.0.2.2", 100.0))  # per IP
        self.assertFalse(guard.allow("192.0.2.1", 100.4))  # 0.8 token: not yet
        self.assertTrue(guard.allow("192.0.2.1", 100.6))  # 1.2 tokens
        self.assertFalse(guard.allow("192.0.2.1", 100.6))

    def test_refill_stops_at_the_burst(self) -> None:
        guard = ReflectionGuard(burst=2, rate=100.0)
        guard.allow("192.0.2.1", 0.0)
        self.assertEqual([guard.allow("192.0.2.1", 1000.0) for _ in range(3)], [True, True, False])

    def test_zero_rate_admits_everything_and_stores_nothing(self) -> None:
        guard = ReflectionGuard(burst=1, rate=0)
        self.assertTrue(all(guard.allow("192.0.2.1", 0.0) for _ in range(10)))
        self.assertEqual(guard.buckets, {})

    def test_changed_limits_apply_to_the_next_reply(self) -> None:
        guard = ReflectionGuard(burst=1, rate=1.0)
        self.assertTrue(guard.allow("192.0.2.1", 0.0))
        self.assertFalse(guard.allow("192.0.2.1", 0.0))
        guard.rate = 0
        self.assertTrue(guard.allow("192.0.2.1", 0.0))

    def test_table_is_bounded(self) -> None:
        guard = ReflectionGuard(burst=5, rate=1.0)
        for i in range(MAX_BUCKETS + 10):
            guard.allow("10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 0.0)
        self.assertLessEqual(len(guard.buckets), MAX_BUCKETS)
        # Refilled buckets go first: a pruning after 5 s forgets them all.
        for i in range(MAX_BUCKETS - len(guard.buckets)):
            guard.allow("11.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 0.0)
        guard.allow("12.0.0.1", 10.0)
        self.assertEqual(len(guard.buckets), 1)


class OverBudgetTests(SynchronousTestCase):
    def test_first_second_gets_a_full_bucket_of_at_least_one_datagram(self) -> None:
        meter = [0.0, 0.0]
        self.assertFalse(over_budget(meter, 0, 65535, 10.0, 1000.0))  # capacity max(rate, 65535)
        self.assertTrue(over_budget(meter, 0, 1, 10.0, 1000.0))
        self.assertFalse(over_budget(meter, 0, 1000, 11.0, 1000.0))  # one second refills 1000
        self.assertTrue(over_budget(meter, 0, 1, 11.0, 1000.0))

    def test_directions_are_separate(self) -> None:
        meter = [0.0] * 8
        self.assertFalse(over_budget(meter, 4, 65535, 1.0, 10.0))
        self.assertTrue(over_budget(meter, 4, 100, 1.0, 10.0))
        self.assertFalse(over_budget(meter, 6, 65535, 1.0, 10.0))
        self.assertEqual(meter[:4], [0.0] * 4)

    def test_rate_above_a_datagram_is_the_capacity(self) -> None:
        meter = [0.0, 0.0]
        self.assertFalse(over_budget(meter, 0, 100000, 1.0, 200000.0))
        self.assertFalse(over_budget(meter, 0, 100000, 1.0, 200000.0))
        self.assertTrue(over_budget(meter, 0, 1, 1.0, 200000.0))
