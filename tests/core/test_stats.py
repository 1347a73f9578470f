"""Counters and the payload size histogram (core/stats.py)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core.stats import SIZE_BUCKET, SIZE_BUCKETS, RelayStats, size_bucket


class SizeBucketTests(SynchronousTestCase):
    def test_edges(self) -> None:
        cases = {0: 0, 1: 0, 100: 0, 101: 1, 200: 1, 1400: 13, 1401: 14, 1500: 14, 1501: 15, 65535: 15}
        for size, bucket in cases.items():
            self.assertEqual((size, size_bucket(size)), (size, bucket))
            self.assertEqual((size, SIZE_BUCKET[size]), (size, bucket))

    def test_table_covers_every_payload_size(self) -> None:
        self.assertEqual(len(SIZE_BUCKET), 0x10000)
        self.assertEqual(list(SIZE_BUCKET), [size_bucket(n) for n in range(0x10000)])
        self.assertEqual(max(SIZE_BUCKET), SIZE_BUCKETS - 1)


class RelayStatsTests(SynchronousTestCase):
    def test_counters(self) -> None:
        stats = RelayStats()
        self.assertEqual(stats.packet_sizes, [0] * 16)
        stats.drop("malformed")
        stats.drop("malformed")
        stats.auth_failure("stale_nonce")
        stats.response("Allocate", 0)
        stats.response("Allocate", 401)
        stats.response("Allocate", 401)
        self.assertEqual(stats.dropped, {"malformed": 2})
        self.assertEqual(stats.auth_failures, {"stale_nonce": 1})
        self.assertEqual(stats.responses, {("Allocate", "success", 0): 1, ("Allocate", "error", 401): 2})
