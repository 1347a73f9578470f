"""The HTTP endpoint, spoken to over real loopback TCP.

A scripted relay session (driven sans-IO, like the core tests) is scraped
with a real HTTP client and every value checked exactly; then health and
readiness in each state, 404/405, a stalled client, and the real twistd
process.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any, Dict, FrozenSet, Optional, Tuple

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from firezone_relay.adapters.http import HealthService, Readiness, ServingFlag
from firezone_relay.adapters.metrics import make_registry
from firezone_relay.core import stun
from tests.core.harness import CLIENT, PEER, Driver, build, credentials, error_code, make_relay, tid
from tests.test_tap import TWISTD, twistd_env

Samples = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]

CLIENT2 = ("198.51.100.8", 40001)
PEER2 = ("8.8.8.8", 6000)


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> Optional[float]:
    return samples.get((name, frozenset(labels.items())))


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpFixture:
    """A relay core, its registry and the HTTP service on 127.0.0.1:<any>."""

    def start_http(self: Any, timeout: float = 10.0, limits: Optional[Dict[str, Any]] = None, **relay_options: Any) -> None:
        self.relay = make_relay(**relay_options)
        self.driver = Driver(self.relay)
        self.readiness = Readiness(self.relay)
        self.registry, self.collector = make_registry(self.relay, self.readiness)
        self.http = HealthService("127.0.0.1", 0, self.registry, self.readiness, timeout=timeout, **(limits or {}))
        self.http.startService()
        self.addCleanup(self.stop_http)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)

    @defer.inlineCallbacks
    def stop_http(self: Any) -> Any:
        yield self.pool.closeCachedConnections()
        yield self.http.stopService()
        # Wait for the server side of every connection to be gone (clean reactor).
        for _ in range(200):
            if self.http.site.open_connections == 0:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)

    @defer.inlineCallbacks
    def get(self: Any, path: str, method: bytes = b"GET", headers: Optional[Dict[bytes, list[bytes]]] = None) -> Any:
        host, port = self.http.address
        url = ("http://%s:%d%s" % (host, port, path)).encode("ascii")
        d = self.agent.request(method, url, Headers(headers or {}))
        d.addTimeout(5, reactor)
        response = yield d
        body = yield readBody(response)
        return response, body

    @defer.inlineCallbacks
    def scrape(self: Any) -> Any:
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        return parse_samples(body.decode("utf-8"))


class ScrapeTests(HttpFixture, unittest.TestCase):
    timeout = 15

    def run_session(self) -> None:
        """A scripted session; every count it causes is spelled out in the test."""
        d = self.driver
        # 1. The normal first round trip: 401 without credentials.
        d.nonce_for()
        # 2. Allocate.
        reply = d.allocate()
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        port = d.relayed_port(reply)
        # 3. A wrong password (another client): 401 bad_integrity.
        username, _ = credentials()
        reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], CLIENT2, (username, "wrong")), CLIENT2)
        self.assertEqual(error_code(reply), 401)
        # 4. A nonce the relay never issued: 438.
        reply = d.request(d.signed(stun.REFRESH, [], nonce="bogus"))
        self.assertEqual(error_code(reply), 438)
        # 5. A denied peer: 403.
        reply = d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, ("10.0.0.1", 1))]))
        self.assertEqual(error_code(reply), 403)
        # 6. A channel to PEER and a permission for PEER2.
        reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)]))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        reply = d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, PEER2)]))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        # 7. Data: client -> peer 100 and 101 bytes (ChannelData) ...
        for size in (100, 101):
            out, _ = d.client(b"\x40\x00" + size.to_bytes(2, "big") + b"x" * size)
            self.assertIsNotNone(out)
        # ... peer -> client 0, 1500 and 1501 bytes on the channel, 50 as a Data indication.
        for size in (0, 1500, 1501):
            out, _ = d.peer(b"y" * size, PEER, port)
            self.assertIsNotNone(out)
        out, _ = d.peer(b"z" * 50, PEER2, port)
        self.assertIsNotNone(out)
        # 8. Dropped: garbage, an unbound channel, an unpermitted peer.
        self.assertEqual(d.client(b"\xff\xff\xff\xff"), (None, []))
        self.assertEqual(d.client(b"\x40\x01\x00\x00")[0], None)
        self.assertEqual(d.peer(b"w", ("1.1.1.1", 53), port)[0], None)
        # 9. A Binding.
        reply = d.request(build(stun.BINDING, tid(99), []))
        self.assertEqual(reply.msg_class, stun.SUCCESS)

    @defer.inlineCallbacks
    def test_every_metric_after_a_scripted_session(self) -> Any:
        self.start_http()
        self.readiness.serving = True
        # The UDP adapter's drop counters are merged, summed per reason.
        adapter_drops = {"send_eagain": 3, "not_stun": 1}
        self.collector.add_drop_source(adapter_drops)
        self.run_session()
        s = yield self.scrape()

        self.assertEqual(value(s, "relay_active_allocations", family="ipv4"), 1)
        self.assertEqual(value(s, "relay_active_allocations", family="ipv6"), 0)
        self.assertEqual(value(s, "relay_allocated_ports"), 1)
        self.assertEqual(value(s, "relay_port_range_size"), 65535 - 49152 + 1)
        self.assertEqual(value(s, "relay_allocations_total"), 1)
        self.assertEqual(value(s, "relay_channels_active"), 1)
        self.assertEqual(value(s, "relay_permissions_active"), 2)

        responses = {
            (labels["message_type"], labels["response_class"], labels["error_code"]): v
            for (name, frozen), v in s.items()
            if name == "relay_responses_total"
            for labels in [dict(frozen)]
        }
        self.assertEqual(
            responses,
            {
                ("allocate", "error", "401"): 2,
                ("allocate", "success", ""): 1,
                ("refresh", "error", "438"): 1,
                ("createpermission", "error", "403"): 1,
                ("createpermission", "success", ""): 1,
                ("channelbind", "success", ""): 1,
                ("binding", "success", ""): 1,
            },
        )

        def relayed(kind: str, direction: str) -> Optional[float]:
            return value(s, "relay_data_relayed_%s_total" % kind, direction=direction, datapath="userspace")

        self.assertEqual(relayed("packets", "client_to_peer"), 2)
        self.assertEqual(relayed("bytes", "client_to_peer"), 201)
        self.assertEqual(relayed("packets", "peer_to_client"), 4)
        self.assertEqual(relayed("bytes", "peer_to_client"), 3051)

        # Sizes 100, 101, 0, 1500, 1501, 50: le is "value <= bound".
        buckets = {
            dict(frozen)["le"]: v
            for (name, frozen), v in s.items()
            if name == "relay_packet_size_bytes_bucket" and dict(frozen)["datapath"] == "userspace"
        }
        expected = {str(b): 4 for b in range(200, 1500, 100)}
        expected.update({"100": 3, "1500": 5, "+Inf": 6})
        self.assertEqual(buckets, expected)
        self.assertEqual(value(s, "relay_packet_size_bytes_count", datapath="userspace"), 6)
        self.assertEqual(value(s, "relay_packet_size_bytes_sum", datapath="userspace"), 3252)

        drops = {dict(frozen)["reason"]: v for (name, frozen), v in s.items() if name == "relay_dropped_packets_total"}
        self.assertEqual(drops, {"not_stun": 2, "unbound_channel": 1, "no_permission": 1, "send_eagain": 3})
        failures = {dict(frozen)["reason"]: v for (name, frozen), v in s.items() if name == "relay_auth_failures_total"}
        self.assertEqual(failures, {"missing_credentials": 1, "bad_integrity": 1, "stale_nonce": 1})

        self.assertEqual(value(s, "relay_portal_connected"), 0)
        self.assertEqual(value(s, "relay_draining"), 0)
        self.assertEqual(value(s, "relay_ready"), 1)
        # The default collectors are there too.
        self.assertIsNotNone(value(s, "process_cpu_seconds_total"))
        self.assertTrue(any(name == "python_info" for name, _ in s))

    @defer.inlineCallbacks
    def test_counts_follow_the_relay_between_scrapes(self) -> Any:
        self.start_http()
        s = yield self.scrape()
        self.assertEqual(value(s, "relay_allocations_total"), 0)
        self.assertEqual(value(s, "relay_ready"), 0)  # not serving yet
        self.driver.allocate()
        s = yield self.scrape()
        self.assertEqual(value(s, "relay_allocations_total"), 1)
        self.assertEqual(value(s, "relay_active_allocations", family="ipv4"), 1)
        self.driver.advance(600)  # the allocation expires
        s = yield self.scrape()
        self.assertEqual(value(s, "relay_allocations_total"), 1)
        self.assertEqual(value(s, "relay_active_allocations", family="ipv4"), 0)
        self.assertEqual(value(s, "relay_allocated_ports"), 0)

    @defer.inlineCallbacks
    def test_dual_stack_allocation_counts_once_in_ports(self) -> Any:
        self.start_http(public_ip6="2001:db8::1")
        reply = self.driver.allocate(extra=[(stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6)])
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        s = yield self.scrape()
        self.assertEqual(value(s, "relay_active_allocations", family="ipv4"), 1)
        self.assertEqual(value(s, "relay_active_allocations", family="ipv6"), 1)
        self.assertEqual(value(s, "relay_allocated_ports"), 1)

    @defer.inlineCallbacks
    def test_content_type_and_openmetrics_negotiation(self) -> Any:
        self.start_http()
        response, body = yield self.get("/metrics")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain; version=0.0.4; charset=utf-8"])
        self.assertIn(b"# TYPE relay_allocations_total counter", body)
        response, body = yield self.get(
            "/metrics", headers={b"Accept": [b"application/openmetrics-text; version=1.0.0"]}
        )
        content_type = response.headers.getRawHeaders(b"content-type")[0]
        self.assertTrue(content_type.startswith(b"application/openmetrics-text"), content_type)
        self.assertTrue(body.endswith(b"# EOF\n"))


class HealthTests(HttpFixture, unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_healthz_always_200(self) -> Any:
        self.start_http()
        for setup in (lambda: None, lambda: setattr(self.readiness, "serving", True), self.relay.start_draining):
            setup()
            response, body = yield self.get("/healthz")
            self.assertEqual((response.code, body), (200, b"ok\n"))

    @defer.inlineCallbacks
    def test_readyz_standalone(self) -> Any:
        self.start_http()
        response, body = yield self.get("/readyz")
        self.assertEqual((response.code, body), (503, b"not serving yet\n"))
        # As in makeService: the flag service after the UDP service.
        flag = ServingFlag(self.readiness)
        flag.startService()
        response, body = yield self.get("/readyz")
        self.assertEqual((response.code, body), (200, b"ready\n"))
        flag.stopService()
        response, _ = yield self.get("/readyz")
        self.assertEqual(response.code, 503)

    @defer.inlineCallbacks
    def test_readyz_draining(self) -> Any:
        self.start_http()
        self.readiness.serving = True
        self.relay.start_draining()  # the core's drain alone is enough
        response, body = yield self.get("/readyz")
        self.assertEqual((response.code, body), (503, b"draining\n"))
        s = yield self.scrape()
        self.assertEqual((value(s, "relay_draining"), value(s, "relay_ready")), (1, 0))

    @defer.inlineCallbacks
    def test_readyz_draining_flag(self) -> Any:
        self.start_http()
        self.readiness.serving = True
        self.readiness.draining = True
        response, _ = yield self.get("/readyz")
        self.assertEqual(response.code, 503)
        self.readiness.draining = False
        response, _ = yield self.get("/readyz")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_readyz_portal_mode(self) -> Any:
        self.start_http()
        self.readiness.portal_required = True
        self.readiness.serving = True
        response, body = yield self.get("/readyz")
        self.assertEqual((response.code, body), (503, b"not joined to the portal\n"))
        self.readiness.portal_joined = True
        response, _ = yield self.get("/readyz")
        self.assertEqual(response.code, 200)
        s = yield self.scrape()
        self.assertEqual((value(s, "relay_portal_connected"), value(s, "relay_ready")), (1, 1))

    @defer.inlineCallbacks
    def test_unknown_paths_are_404(self) -> Any:
        self.start_http()
        for path in ("/", "/nope", "/metrics/x", "/healthz/", "/readyz/deep/er"):
            response, _ = yield self.get(path)
            self.assertEqual(response.code, 404, path)
            response, _ = yield self.get(path, method=b"POST")
            self.assertEqual(response.code, 404, path)

    @defer.inlineCallbacks
    def test_wrong_methods_are_405_with_allow(self) -> Any:
        self.start_http()
        for path in ("/healthz", "/readyz", "/metrics"):
            for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"):
                response, _ = yield self.get(path, method=method)
                self.assertEqual(response.code, 405, (path, method))
                self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])

    @defer.inlineCallbacks
    def test_head(self) -> Any:
        self.start_http()
        response, body = yield self.get("/metrics", method=b"HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.assertGreater(int(response.headers.getRawHeaders(b"content-length")[0]), 100)
        response, body = yield self.get("/readyz", method=b"HEAD")
        self.assertEqual((response.code, body), (503, b""))


class _Stalled(protocol.Protocol):
    """Sends part of a request, then nothing."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.data)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class SlowClientTests(HttpFixture, unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def stalled(self, data: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ") -> Any:
        host, port = self.http.address
        client = yield protocol.ClientCreator(reactor, _Stalled, data).connectTCP(host, port)
        self.addCleanup(lambda: client.transport.loseConnection() or client.lost)
        return client

    @defer.inlineCallbacks
    def test_half_request_does_not_block_others_and_is_timed_out(self) -> Any:
        self.start_http(timeout=1.0)
        clients = []
        for _ in range(5):
            clients.append((yield self.stalled()))
        started = time.monotonic()
        for path in ("/healthz", "/metrics", "/readyz"):
            response, _ = yield self.get(path)
            self.assertIn(response.code, (200, 503))
        self.assertLess(time.monotonic() - started, 0.9)  # answered while the stalled ones wait
        self.assertFalse(any(c.lost.called for c in clients))
        yield defer.gatherResults([c.lost for c in clients])  # the idle timeout closes them
        self.assertLess(time.monotonic() - started, 5)

    @defer.inlineCallbacks
    def test_connection_cap(self) -> Any:
        self.start_http()
        self.http.site.max_connections = 2
        first = yield self.stalled()
        second = yield self.stalled()
        for _ in range(100):
            if self.http.site.open_connections == 2:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        third = yield self.stalled()
        yield third.lost  # refused at once
        self.assertFalse(first.lost.called or second.lost.called)
        first.transport.loseConnection()
        yield first.lost
        for _ in range(100):
            if self.http.site.open_connections < 2:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        response, _ = yield self.get("/healthz")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_garbage_request_line(self) -> Any:
        self.start_http()
        client = yield self.stalled(b"\x00\xff garbage \r\n\r\n")
        yield client.lost  # the server answers 400 and closes
        response, _ = yield self.get("/healthz")
        self.assertEqual(response.code, 200)


class _Dribbler(protocol.Protocol):
    """Sends a request head that never ends, ``step`` bytes at a time every
    ``interval`` seconds (a slowloris client); records when it is closed."""

    def __init__(self, interval: float, prefix: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\n") -> None:
        self.interval = interval
        self.prefix = prefix
        self.lost: defer.Deferred[float] = defer.Deferred()
        self.opened = 0.0
        self.sent = 0
        self._loop: Optional[task.LoopingCall] = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.opened = time.monotonic()
        self.transport.write(self.prefix)
        self._loop = task.LoopingCall(self._drip)
        self._loop.start(self.interval, now=False)

    def _drip(self) -> None:
        assert self.transport is not None
        self.transport.write(b"X-%d: y\r\n" % self.sent)
        self.sent += 1

    def connectionLost(self, reason: Any) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.lost.callback(time.monotonic() - self.opened)


@defer.inlineCallbacks
def dribblers(case: Any, host: str, port: int, sources: list[str], per_source: int, interval: float) -> Any:
    """Open ``per_source`` dribbling connections from each source address."""
    clients = []
    for source in sources:
        for _ in range(per_source):
            try:
                client = yield protocol.ClientCreator(reactor, _Dribbler, interval).connectTCP(
                    host, port, timeout=5, bindAddress=(source, 0)
                )
            except Exception:
                continue  # refused at once: counted by the caller through the survivors
            case.addCleanup(lambda c=client: c.transport.abortConnection() if not c.lost.called else None)
            clients.append(client)
    return clients


class SlowlorisTests(HttpFixture, unittest.TestCase):
    """Issue 14 item 2: bytes that keep arriving do not keep a request alive."""

    timeout = 30

    @defer.inlineCallbacks
    def test_request_deadline_is_absolute_whatever_bytes_arrive(self) -> Any:
        self.start_http(timeout=10.0, limits={"request_deadline": 1.0})
        host, port = self.http.address
        (client,) = yield dribblers(self, host, port, ["127.0.0.1"], 1, 0.1)
        held = yield client.lost
        self.assertGreater(client.sent, 5)  # it kept sending (and the idle timeout kept restarting)
        self.assertTrue(0.9 <= held < 3.0, held)
        self.assertEqual(self.http.site.refused["deadline"], 1)
        s = yield self.scrape()
        self.assertEqual(value(s, "relay_http_connections_refused_total", reason="deadline"), 1)

    @defer.inlineCallbacks
    def test_deadline_restarts_per_request_on_a_kept_alive_connection(self) -> Any:
        self.start_http(timeout=10.0, limits={"request_deadline": 1.0})
        host, port = self.http.address
        received = []

        class KeepAlive(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        client = yield protocol.ClientCreator(reactor, KeepAlive).connectTCP(host, port)
        self.addCleanup(client.transport.abortConnection)
        started = time.monotonic()
        for _ in range(4):  # 4 requests 0.6 s apart: 2.4 s on one connection, each within its deadline
            client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            yield task.deferLater(reactor, 0.6, lambda: None)
        answers = b"".join(received).count(b"HTTP/1.1 200 OK")
        self.assertEqual(answers, 4)
        self.assertGreater(time.monotonic() - started, 2.0)
        self.assertEqual(self.http.site.refused["deadline"], 0)
        # Then silence (a client that never reads or sends): closed by the deadline.
        client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        yield wait_for(lambda: self.http.site.refused["deadline"] == 1, 3.0)

    @defer.inlineCallbacks
    def test_per_source_cap(self) -> Any:
        self.start_http(limits={"max_connections_per_source": 3})
        host, port = self.http.address
        mine = yield dribblers(self, host, port, ["127.0.0.1"], 4, 1.0)
        yield wait_for(lambda: self.http.site.open_connections == 3 and any(c.lost.called for c in mine), 3.0)
        self.assertEqual(sum(1 for c in mine if not c.lost.called), 3)
        self.assertEqual(self.http.site.refused["per_source"], 1)
        other = yield dribblers(self, host, port, ["127.0.0.2"], 1, 1.0)
        yield wait_for(lambda: self.http.site.open_connections == 4, 3.0)
        self.assertFalse(other[0].lost.called)

    @defer.inlineCallbacks
    def test_a_full_server_gives_way_to_a_source_with_fewer_connections(self) -> Any:
        self.start_http(limits={"max_connections_per_source": 8})
        self.http.site.max_connections = 8
        host, port = self.http.address
        attackers = yield dribblers(self, host, port, ["127.0.0.1"], 8, 1.0)
        yield wait_for(lambda: self.http.site.open_connections == 8, 3.0)
        # A client from another source is served: it takes an attacker's place.
        response, body = yield self.get_from("127.0.0.2", "/healthz")
        self.assertEqual((response, body), (200, b"ok\n"))
        self.assertEqual(self.http.site.refused["evicted"], 1)
        self.assertEqual(sum(1 for c in attackers if c.lost.called), 1)

    @defer.inlineCallbacks
    def get_from(self, source: str, path: str) -> Any:
        """GET from a given loopback source address (http.client in a thread)."""
        import http.client

        from twisted.internet.threads import deferToThread

        host, port = self.http.address

        def get() -> Tuple[int, bytes]:
            conn = http.client.HTTPConnection(host, port, timeout=5, source_address=(source, 0))
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                return r.status, r.read()
            finally:
                conn.close()

        result = yield deferToThread(get)
        return result


@defer.inlineCallbacks
def wait_for(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s" % timeout)
        yield task.deferLater(reactor, 0.02, lambda: None)


class SourceKeyTests(unittest.SynchronousTestCase):
    def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4(self) -> None:
        from firezone_relay.adapters.sourcekey import source_key

        self.assertEqual(source_key("192.0.2.7"), "192.0.2.7")
        self.assertEqual(source_key("2001:db8:1:2:aaaa::1"), source_key("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        self.assertEqual(source_key("2001:db8:1:2::9"), "2001:db8:1:2::/64")
        self.assertNotEqual(source_key("2001:db8:1:2::1"), source_key("2001:db8:1:3::1"))
        self.assertEqual(source_key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(source_key("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(source_key("not an address"), "not an address")


class MakeServiceTests(HttpFixture, unittest.TestCase):
    """The composition root wires the HTTP service, the readiness flag and the adapter's drops."""

    timeout = 15

    @defer.inlineCallbacks
    def test_wiring(self) -> Any:
        from firezone_relay import tap
        from tests.helpers import free_udp_port, port_range
        from tests.test_tap import parse

        listen_port = free_udp_port((4,))
        low, high = port_range(8, avoid=[listen_port])
        options = parse(
            [
                "--listen-port=%d" % listen_port,
                "--lowest-port=%d" % low,
                "--highest-port=%d" % high,
                "--public-ip4-addr=127.0.0.1",
                "--bind-ip4-addr=127.0.0.1",
                "--socket-buffer=0",
                "--auth-secret=%s" % ("s3cret" * 6),
                "--health-check-addr=127.0.0.1:0",
            ]
        )
        top = tap.makeService(options)
        self.http = top.getServiceNamed("http")
        self.assertFalse(self.http.readiness.ready)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.pool)
        response, body = yield self.get("/readyz")
        self.assertEqual((response.code, body), (200, b"ready\n"))
        top.getServiceNamed("shell").drops["send_enobufs"] += 2
        s = yield self.scrape()
        self.assertEqual(value(s, "relay_dropped_packets_total", reason="send_enobufs"), 2)
        self.assertEqual(value(s, "relay_port_range_size"), 8)
        self.assertEqual(value(s, "relay_ready"), 1)
        # The UDP reader in use, and (batched) what it read: exactly our datagrams.
        udp = top.getServiceNamed("shell")
        self.assertEqual(value(s, "relay_udp_batched_io"), int(udp.io is not None))
        if udp.io is not None:
            self.assertEqual(value(s, "relay_udp_read_datagrams_total"), 0)
            from tests.helpers import TurnClient, listen

            client = TurnClient(("127.0.0.1", listen_port))
            port = listen(client)
            self.addCleanup(port.stopListening)
            for _ in range(3):
                response = yield client.request(stun.BINDING, signed=False)
                self.assertEqual(response.msg_class, stun.SUCCESS)
            s = yield self.scrape()
            self.assertEqual(value(s, "relay_udp_read_datagrams_total"), 3)
            self.assertGreaterEqual(value(s, "relay_udp_read_batches_total"), 1)
            self.assertLessEqual(value(s, "relay_udp_read_batches_total"), 3)
            # The replies are queued by the core and leave at the end of the pump, by sendmmsg (io.send).
            self.assertEqual(value(s, "relay_udp_sent_datagrams_total"), 3)


# --- the real process --------------------------------------------------------


def http_get(url: str, deadline: float) -> Tuple[int, bytes, Dict[str, str]]:
    """GET until the server answers at all or the deadline passes."""
    last: Optional[BaseException] = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError("no HTTP answer from %s: %r" % (url, last))


class ProcessTests(unittest.TestCase):
    timeout = 60

    def test_twistd_serves_health_and_metrics(self) -> None:
        from tests.helpers import free_udp_port, port_range

        listen_port = free_udp_port((4,))
        low, high = port_range(32, avoid=[listen_port])
        http_port = free_tcp_port()
        cwd = self.mktemp()
        os.makedirs(cwd)
        proc = subprocess.Popen(
            TWISTD
            + [
                "-n",
                "--pidfile=",
                "firezone-relay",
                "--listen-port=%d" % listen_port,
                "--lowest-port=%d" % low,
                "--highest-port=%d" % high,
                "--public-ip4-addr=127.0.0.1",
                "--bind-ip4-addr=127.0.0.1",
                "--health-check-addr=127.0.0.1:%d" % http_port,
                "--socket-buffer=0",
            ],
            cwd=cwd,
            env=twistd_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def stop() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)

        self.addCleanup(stop)
        base = "http://127.0.0.1:%d" % http_port
        deadline = time.time() + 30
        status, body, _ = http_get(base + "/healthz", deadline)
        self.assertEqual((status, body), (200, b"ok\n"))
        status, body, _ = http_get(base + "/readyz", deadline)
        self.assertEqual((status, body), (200, b"ready\n"))
        status, body, headers = http_get(base + "/metrics", deadline)
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/plain"))
        s = parse_samples(body.decode("utf-8"))
        self.assertEqual(value(s, "relay_active_allocations", family="ipv4"), 0)
        self.assertEqual(value(s, "relay_port_range_size"), 32)
        self.assertEqual(value(s, "relay_ready"), 1)
        self.assertIsNotNone(value(s, "process_resident_memory_bytes"))


class SlowlorisProcessTests(unittest.TestCase):
    """Issue 14 item 2 against ``twistd firezone-relay`` with its default HTTP limits."""

    timeout = 90

    @defer.inlineCallbacks
    def test_healthz_answers_while_many_sources_dribble(self) -> Any:
        import http.client

        from twisted.internet.threads import deferToThread

        from tests.adapters.test_drain import RelayProcess, wait_until

        relay = RelayProcess(self)
        found = yield wait_until(
            lambda: re.search(r"HTTP health and metrics on 127\.0\.0\.1:(\d+)", relay.output()), 30, "HTTP port"
        )
        port = int(found.group(1))

        def get(source: str, path: str = "/healthz") -> Tuple[int, bytes, float]:
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                return r.status, r.read(), time.monotonic() - started
            finally:
                conn.close()

        status, _, _ = yield deferToThread(get, "127.0.0.2")
        self.assertEqual(status, 200)
        # 20 sources x 16 (the per-source cap) = 320 slow connections > 256 (the total).
        sources = ["127.0.0.%d" % n for n in range(10, 30)]
        attackers = yield dribblers(self, "127.0.0.1", port, sources, 16, 1.0)
        self.assertGreaterEqual(len(attackers), 256)
        yield task.deferLater(reactor, 1.5, lambda: None)  # every one has dribbled
        self.assertGreaterEqual(sum(1 for c in attackers if not c.lost.called), 200)
        for source in ("127.0.0.200", "127.0.0.201", "127.0.0.202"):
            status, body, took = yield deferToThread(get, source)
            self.assertEqual((status, body), (200, b"ok\n"))
            self.assertLess(took, 2.0)
        # Every dribbler is closed by the 10 s deadline although it kept sending.
        held = yield defer.gatherResults([c.lost for c in attackers])
        self.assertLess(max(held), 10.0 + 3.0)
        self.assertGreater(min(c.sent for c in attackers if c.lost.result >= 9.0), 5)
        status, body, _ = yield deferToThread(get, "127.0.0.2", "/metrics")
        samples = parse_samples(body.decode("utf-8"))
        self.assertGreaterEqual(value(samples, "relay_http_connections_refused_total", reason="deadline") or 0, 200)
        self.assertGreaterEqual(value(samples, "relay_http_connections_refused_total", reason="evicted") or 0, 3)
        self.assertTrue(relay.running())
