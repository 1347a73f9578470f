"""The collector's edge cases and the periodic stats log line (a test-owned clock)."""

from __future__ import annotations

from typing import Any, Dict, List

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from firezone_relay.adapters.metrics import RelayCollector, StatsLogger, format_rate, make_registry
from firezone_relay.core import stun
from tests.adapters.test_http import parse_samples, value
from tests.core.harness import PEER, Driver, make_relay


class FormatRateTests(unittest.SynchronousTestCase):
    def test_units_base_1000(self) -> None:
        cases = {
            0.5: "0.50 B/s",
            5: "5.00 B/s",
            999: "999 B/s",
            999.6: "1.00 kB/s",
            1234: "1.23 kB/s",
            12345: "12.3 kB/s",
            123456: "123 kB/s",
            1_500_000: "1.50 MB/s",
            2.5e9: "2.50 GB/s",
            3e12: "3.00 TB/s",
            4e15: "4000 TB/s",
        }
        for rate, text in cases.items():
            self.assertEqual(format_rate(rate), text, rate)


class CollectorTests(unittest.SynchronousTestCase):
    def test_without_readiness(self) -> None:
        relay = make_relay()
        registry, _ = make_registry(relay, process_metrics=False)
        s = parse_samples(generate_latest(registry).decode())
        self.assertEqual((value(s, "relay_ready"), value(s, "relay_draining"), value(s, "relay_portal_connected")), (1, 0, 0))
        relay.start_draining()
        s = parse_samples(generate_latest(registry).decode())
        self.assertEqual((value(s, "relay_ready"), value(s, "relay_draining")), (0, 1))
        self.assertFalse(any(name.startswith("process_") for name, _ in s))

    def test_drop_sources_change_between_scrapes(self) -> None:
        relay = make_relay()
        drops: Dict[str, int] = {}
        registry = CollectorRegistry()
        registry.register(RelayCollector(relay, drop_sources=[drops]))
        drops["send_enobufs"] = 2
        s = parse_samples(generate_latest(registry).decode())
        self.assertEqual(value(s, "relay_dropped_packets_total", reason="send_enobufs"), 2)
        drops["send_enobufs"] += 1
        s = parse_samples(generate_latest(registry).decode())
        self.assertEqual(value(s, "relay_dropped_packets_total", reason="send_enobufs"), 3)

    def test_histogram_bucket_edges(self) -> None:
        """``le`` means "value <= bound" (Prometheus' rule)."""
        relay = make_relay()
        d = Driver(relay)
        port = d.relayed_port(d.allocate())
        d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)]))
        sizes = [0, 1, 99, 100, 101, 200, 201, 1400, 1499, 1500, 1501, 1600, 9000]
        for size in sizes:
            self.assertIsNotNone(d.peer(b"x" * size, PEER, port)[0])
        registry, _ = make_registry(relay, process_metrics=False)
        s = parse_samples(generate_latest(registry).decode())
        for bound in list(range(100, 1501, 100)):
            self.assertEqual(
                value(s, "relay_packet_size_bytes_bucket", datapath="userspace", le=str(bound)),
                sum(1 for n in sizes if n <= bound),
                bound,
            )
        self.assertEqual(value(s, "relay_packet_size_bytes_bucket", datapath="userspace", le="+Inf"), len(sizes))
        self.assertEqual(value(s, "relay_packet_size_bytes_sum", datapath="userspace"), sum(sizes))


class StatsLoggerTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.observe)
        self.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event: Dict[str, Any]) -> None:
        if event.get("log_namespace") == "firezone_relay.adapters.metrics":
            self.events.append(event)

    def test_logs_only_while_bytes_move(self) -> None:
        relay = make_relay()
        d = Driver(relay)
        port = d.relayed_port(d.allocate())
        d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)]))
        clock = task.Clock()
        service = StatsLogger(relay, clock=clock)
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(10)
        self.assertEqual(self.events, [])  # idle: nothing
        for _ in range(10):
            d.peer(b"x" * 1000, PEER, port)
        d.client(b"\x40\x00\x03\xe8" + b"y" * 1000)
        clock.advance(10)
        self.assertEqual(len(self.events), 1)
        event = self.events[0]
        self.assertEqual((event["allocations"], event["channels"]), (1, 1))
        self.assertEqual(event["throughput"], "1.10 kB/s")  # 11000 bytes in 10 s
        self.assertEqual(event["log_format"], "allocations={allocations} channels={channels} throughput={throughput}")
        clock.advance(10)
        self.assertEqual(len(self.events), 1)  # idle again
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
