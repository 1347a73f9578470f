"""TURN over TCP and TLS (SPEC §8): the stream adapter with the real core.

Real loopback connections; the timers (idle, handshake, allocation expiry)
run on a ``task.Clock`` that the test advances, so nothing here waits for
wall-clock time except the I/O itself.
"""

from __future__ import annotations

import random
import socket
import ssl
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from firezone_relay.adapters.metrics import StreamCollector
from firezone_relay.adapters.stream import StreamLimits, StreamService, TLSContext
from firezone_relay.adapters.shell import Shell
from firezone_relay.adapters.udp import RelayService
from firezone_relay.core import stun
from firezone_relay.core.framing import Deframer
from firezone_relay.core.relay import Relay, RelayConfig
from tests.certs import common_name, make_certificate
from tests.helpers import Collector, TurnClient, error_code, free_udp_port, ipv6_available, listen, loopback, port_range

SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"
PUBLIC = {4: "203.0.113.1", 6: "2001:db8::1"}


def sleep(seconds: float) -> "defer.Deferred[None]":
    return task.deferLater(reactor, seconds, lambda: None)


def free_port_for_udp_and_tcp(families: Sequence[int]) -> int:
    """A port free for UDP (every family) and for TCP on 127.0.0.1 right now."""
    for _ in range(100):
        port = free_udp_port(families)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free for both UDP and TCP")


def channel_data(channel: int, payload: bytes) -> bytes:
    """Unpadded: ``StreamTurnClient.send`` pads, as a stream client must."""
    return channel.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload


class StreamTurnClient(TurnClient):
    """``TurnClient`` over one TCP or TLS connection: every message it sends is
    padded to 4 bytes, and what arrives is cut into frames (kept raw in
    ``frames``, so the tests can look at the padding)."""

    def __init__(self) -> None:
        super().__init__(("stream", 0))
        self.deframer = Deframer()
        self.frames: List[bytes] = []
        self.lost: defer.Deferred[Any] = defer.Deferred()
        self.connected = False

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        for frame in self.deframer.feed(data):
            self.frames.append(frame)
            self.datagramReceived(frame, self.server)

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        self.lost_reason = reason
        if not self.lost.called:
            self.lost.callback(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data + b"\0" * (-len(data) % 4))

    def local(self) -> Tuple[str, int]:
        host = self.transport.getHost()
        return (host.host, host.port)


class StreamFixture:
    families: Sequence[int] = (4,)

    def start(
        self: Any,
        families: Optional[Sequence[int]] = None,
        tls: bool = False,
        limits: StreamLimits = StreamLimits(max_connections_per_ip=64),
        fake_clock: bool = True,
        size: int = 64,
        batched_io: Optional[bool] = None,
        **overrides: Any,
    ) -> StreamService:
        families = tuple(families or self.families)
        if 6 in families and not ipv6_available():
            raise unittest.SkipTest("IPv6 loopback (::1) is not available")
        listen_port = free_port_for_udp_and_tcp(families)
        low, high = port_range(size, avoid=[listen_port])
        settings: dict[str, Any] = dict(
            auth_secret=SECRET,
            public_ip4=PUBLIC[4] if 4 in families else None,
            public_ip6=PUBLIC[6] if 6 in families else None,
            listen_port=listen_port,
            lowest_port=low,
            highest_port=high,
            allow_loopback_peers=True,
            software="firezone-relay (python) test",
        )
        settings.update(overrides)
        self.clock: Any = None
        if fake_clock:
            self.clock = task.Clock()
            self.clock.advance(time.time())
        self.relay = Relay(RelayConfig(**settings), random.Random(11))
        bind4 = "127.0.0.1" if 4 in families else None
        bind6 = "::1" if 6 in families else None
        self.shell = Shell(self.relay, clock=self.clock, batched_io=batched_io)
        self.udp = RelayService(self.shell, listen_port, bind_ip4=bind4, bind_ip6=bind6)
        self.tls_context: Optional[TLSContext] = None
        if tls:
            cert, key = make_certificate(Path(self.mktemp()), "relay one")
            self.cert_path, self.key_path = cert, key
            self.tls_context = TLSContext(str(cert), str(key))
        self.stream = StreamService(
            self.shell,
            bind_ip4=bind4,
            bind_ip6=bind6,
            tls=self.tls_context,
            tls_port=0,
            limits=limits,
        )
        self.shell.startService()
        self.addCleanup(self.shell.stopService)
        return self.stream

    def expiry(self: Any, seconds: int = 3600) -> int:
        return int(time.time()) + seconds

    @defer.inlineCallbacks
    def connect(self: Any, family: int = 4, tls: bool = False, client: Optional[StreamTurnClient] = None) -> Any:
        client = client or StreamTurnClient()
        host = loopback(family)
        if tls:
            trust = Certificate.loadPEM(self.cert_path.read_bytes())
            endpoint: Any = SSL4ClientEndpoint(
                reactor, host, self.stream.tls_port, optionsForClientTLS("localhost", trustRoot=trust)
            )
        elif family == 6:
            endpoint = TCP6ClientEndpoint(reactor, host, self.stream.tcp_port)
        else:
            endpoint = TCP4ClientEndpoint(reactor, host, self.stream.tcp_port)
        yield connectProtocol(endpoint, client)
        self.addCleanup(self.disconnect, client)
        return client

    def disconnect(self: Any, client: StreamTurnClient) -> Any:
        if client.connected:
            client.transport.abortConnection()
        return client.lost

    def peer(self: Any, family: int = 4) -> Tuple[Collector, Tuple[str, int]]:
        peer = Collector()
        port = listen(peer, family)
        self.addCleanup(port.stopListening)
        return peer, (loopback(family), port.getHost().port)

    @defer.inlineCallbacks
    def allocate(self: Any, client: StreamTurnClient, salt: str = "testsalt") -> Any:
        _, final = yield client.allocate(SECRET, self.expiry(), salt=salt)
        self.assertEqual(final.msg_class, stun.SUCCESS, final.get(stun.ERROR_CODE))
        return final.get_address(stun.XOR_RELAYED_ADDRESS)

    @defer.inlineCallbacks
    def bind_channel(self: Any, client: StreamTurnClient, channel: int, peer_addr: Any) -> Any:
        response = yield client.request(
            stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, channel), (stun.XOR_PEER_ADDRESS, peer_addr)]
        )
        self.assertEqual(response.msg_class, stun.SUCCESS)

    def wait_until(self: Any, predicate: Any, timeout: float = 5.0) -> "defer.Deferred[None]":
        @defer.inlineCallbacks
        def poll() -> Any:
            deadline = time.monotonic() + timeout
            while not predicate():
                if time.monotonic() > deadline:
                    self.fail("condition not met within %.0f s" % timeout)
                yield sleep(0.01)

        return poll()


class TcpTests(StreamFixture, unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_direct_read_reads_and_closes_at_end_of_file(self) -> Any:
        """``_StreamServer.direct_read`` (what a dispatch that skips
        Twisted's _doReadOrWrite calls on a read event): the data reaches
        the connection, and end of file closes it as Twisted would."""
        self.start()
        client = yield self.connect()
        yield self.wait_until(lambda: len(self.stream.connections) == 1)
        (conn,) = self.stream.connections.values()
        server = conn.transport
        server.stopReading()  # from here only direct_read reads it
        answered = client.request(stun.BINDING, signed=False)
        yield sleep(0.1)
        server.direct_read()
        response = yield answered
        self.assertEqual(response.msg_class, stun.SUCCESS)
        client.transport.loseConnection()
        yield sleep(0.1)
        server.direct_read()
        yield self.wait_until(lambda: not self.stream.connections)
        self.assertEqual(self.stream.closed[("tcp", "client")], 1)

    @defer.inlineCallbacks
    def test_binding_reports_the_tcp_address(self) -> Any:
        self.start()
        self.assertEqual(self.stream.tcp_port, self.udp.listen_port)
        client = yield self.connect()
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        self.assertEqual(response.get_address(stun.XOR_MAPPED_ADDRESS), client.local())

    @defer.inlineCallbacks
    def test_ipv6(self) -> Any:
        self.start(families=(4, 6))
        client = yield self.connect(6)
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.get_address(stun.XOR_MAPPED_ADDRESS), ("::1", client.local()[1]))
        relayed = yield self.allocate(client)
        self.assertEqual(relayed[0], PUBLIC[4])  # an IPv6 client, an IPv4 relayed address by default
        client4 = yield self.connect(4)
        response = yield client4.request(stun.BINDING, signed=False)
        self.assertEqual(response.get_address(stun.XOR_MAPPED_ADDRESS)[0], "127.0.0.1")

    @defer.inlineCallbacks
    def test_channel_data_both_ways_padded_on_the_stream_only(self) -> Any:
        self.start()
        client = yield self.connect()
        relayed = yield self.allocate(client)
        peer, peer_addr = self.peer()
        yield self.bind_channel(client, 0x4001, peer_addr)
        for size in (0, 1, 2, 3, 4, 5, 1199, 1200):
            payload = bytes(range(256)) * 5
            payload = payload[:size]
            client.send(channel_data(0x4001, payload))
            data, source = yield peer.next()
            self.assertEqual(data, payload)  # the relayed leg is UDP: no padding
            self.assertEqual(source[1], relayed[1])
            peer.send(payload[::-1], ("127.0.0.1", relayed[1]))
            frame = yield client.next_other()
            self.assertEqual(frame[:4], b"\x40\x01" + size.to_bytes(2, "big"))
            self.assertEqual(frame[4 : 4 + size], payload[::-1])
            self.assertEqual(len(frame) % 4, 0)  # padded on the stream
            self.assertEqual(frame[4 + size :], b"\0" * (-size % 4))

    @defer.inlineCallbacks
    def test_a_burst_is_relayed_in_order_each_way_in_few_calls(self) -> Any:
        """One read of many ChannelData frames leaves towards the peer in
        sendmmsg calls (batched UDP I/O), and what one batched UDP read brings
        for the client is written when that read ends, with no 0-second call."""
        self.start()
        client = yield self.connect()
        relayed = yield self.allocate(client)
        peer, peer_addr = self.peer()
        yield self.bind_channel(client, 0x4002, peer_addr)
        io = self.shell.io
        before = io.stats() if io is not None else None
        payloads = [b"%03d" % i * (1 + i % 5) for i in range(40)]
        frames = [channel_data(0x4002, p) for p in payloads]
        client.transport.write(b"".join(f + b"\0" * (-len(f) % 4) for f in frames))
        got = []
        for _ in payloads:
            data, _source = yield peer.next()
            got.append(data)
        self.assertEqual(got, payloads)

        zero_delay: List[Any] = []

        class Recording:
            def __init__(self, real: Any) -> None:
                self.real = real

            def callLater(self, delay: float, *args: Any) -> Any:
                if delay == 0:
                    zero_delay.append(args)
                return self.real.callLater(delay, *args)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.real, name)

        self.patch(self.stream, "reactor", Recording(self.stream.reactor))
        for p in payloads:
            peer.send(p[::-1], ("127.0.0.1", relayed[1]))
        back = []
        for _ in payloads:
            frame = yield client.next_other()
            back.append(frame[4 : 4 + int.from_bytes(frame[2:4], "big")])
        self.assertEqual(back, [p[::-1] for p in payloads])
        if io is not None:
            after = io.stats()
            self.assertEqual(after["sent"] - before["sent"], len(payloads))  # the 40 towards the peer
            self.assertLess(after["send_calls"] - before["send_calls"], len(payloads))
            self.assertEqual(zero_delay, [])

    @defer.inlineCallbacks
    def test_send_and_data_indications(self) -> Any:
        self.start()
        client = yield self.connect()
        relayed = yield self.allocate(client)
        peer, peer_addr = self.peer()
        response = yield client.request(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, peer_addr)])
        self.assertEqual(response.msg_class, stun.SUCCESS)
        client.send(
            stun.encode(stun.SEND, stun.INDICATION, b"s" * 12, [(stun.XOR_PEER_ADDRESS, peer_addr), (stun.DATA, b"ping!")])
        )
        data, _ = yield peer.next()
        self.assertEqual(data, b"ping!")
        peer.send(b"pong", ("127.0.0.1", relayed[1]))
        frame = yield client.next_other()
        message = stun.decode(frame)
        self.assertEqual((message.method, message.msg_class), (stun.DATA_METHOD, stun.INDICATION))
        self.assertEqual(message.get_bytes(stun.DATA), b"pong")

    @defer.inlineCallbacks
    def test_partial_frames_wait_and_batched_frames_all_count(self) -> Any:
        self.start()
        client = yield self.connect()
        ids = [bytes([i]) * 12 for i in range(1, 6)]
        requests = [stun.encode(stun.BINDING, stun.REQUEST, t, []) for t in ids]
        waits = []
        for t in ids:
            d: defer.Deferred[Any] = defer.Deferred()
            client.pending[t] = d
            waits.append(d)
        # The first one a byte at a time, the others in one write.
        for i in range(len(requests[0])):
            client.transport.write(requests[0][i : i + 1])
            yield sleep(0.002)
        client.transport.write(b"".join(requests[1:]))
        responses = yield defer.gatherResults(waits)
        self.assertEqual([r.transaction_id for r in responses], ids)

    @defer.inlineCallbacks
    def test_garbage_costs_that_connection_only(self) -> Any:
        self.start()
        good = yield self.connect()
        yield self.allocate(good)
        garbage = [
            b"\x80" * 32,  # neither STUN nor ChannelData
            b"\x00\x01\x00\x05" + b"\x21\x12\xa4\x42" + b"\0" * 16,  # STUN length not a multiple of 4
            b"\x00\x01\x00\x00GET / HTTP/1.1\r\n",  # STUN without the cookie
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40,  # a TLS ClientHello on the TCP port
        ]
        for data in garbage:
            bad = yield self.connect()
            yield self.allocate(bad, salt="bad")
            bad.transport.write(data)
            yield bad.lost
        yield self.wait_until(lambda: self.stream.closed[("tcp", "bad_frame")] == len(garbage))
        self.assertEqual(self.relay.allocation_count, 1)  # their allocations went with them
        response = yield good.request(stun.REFRESH, [(stun.LIFETIME, 600)])
        self.assertEqual(response.msg_class, stun.SUCCESS)

    @defer.inlineCallbacks
    def test_closing_deletes_the_allocation_at_once(self) -> Any:
        self.start()
        client = yield self.connect()
        relayed = yield self.allocate(client)
        self.assertIn((relayed[1], 4), self.udp.port_numbers())
        self.assertEqual(self.stream.allocations["tcp"], 1)
        client.transport.loseConnection()
        yield client.lost
        yield self.wait_until(lambda: self.relay.allocation_count == 0)
        self.assertNotIn((relayed[1], 4), self.udp.port_numbers())
        self.assertEqual(self.stream.connections, {})
        self.assertEqual(self.stream.per_ip, {})
        self.assertEqual(self.stream.allocations["tcp"], 0)
        self.assertEqual(self.stream.closed[("tcp", "client")], 1)
        footprint = self.relay.memory_footprint()
        self.assertEqual([k for k, v in footprint.items() if v], [], footprint)

    @defer.inlineCallbacks
    def test_a_huge_length_field_waits_boundedly_then_idles_out(self) -> Any:
        self.start(limits=StreamLimits(idle_timeout=30.0))
        client = yield self.connect()
        client.transport.write(b"\x40\x01\xff\xff" + b"x" * 1000)  # 64 KiB announced, 1000 sent
        yield self.wait_until(lambda: any(c.bytes_in for c in self.stream.connections.values()))
        (conn,) = self.stream.connections.values()
        self.assertEqual(len(conn._buffer), 1004)
        self.clock.advance(29)
        self.assertTrue(client.connected)
        client.transport.write(b"x" * 1000)  # more bytes, still no complete frame
        yield self.wait_until(lambda: conn.bytes_in == 2004)
        self.clock.advance(2)
        yield client.lost
        self.assertEqual(self.stream.closed[("tcp", "idle")], 1)

    @defer.inlineCallbacks
    def test_idle_timeout_only_without_an_allocation(self) -> Any:
        self.start(limits=StreamLimits(idle_timeout=20.0))
        silent = yield self.connect()
        busy = yield self.connect()
        yield self.allocate(busy)  # lifetime 600 s
        self.clock.advance(21)
        yield silent.lost
        self.assertTrue(busy.connected)
        self.clock.advance(500)
        yield sleep(0.05)
        self.assertTrue(busy.connected)
        # The allocation expires (a client gone without a FIN stops
        # refreshing): the core deletes it and the connection goes too.
        self.clock.advance(100)
        yield busy.lost
        self.assertEqual(self.relay.allocation_count, 0)
        self.assertEqual(self.stream.closed[("tcp", "idle")], 2)

    @defer.inlineCallbacks
    def test_refresh_zero_then_the_idle_timeout_applies_again(self) -> Any:
        self.start(limits=StreamLimits(idle_timeout=20.0))
        client = yield self.connect()
        yield self.allocate(client)
        self.clock.advance(100)
        response = yield client.request(stun.REFRESH, [(stun.LIFETIME, 0)])
        self.assertEqual(response.msg_class, stun.SUCCESS)
        self.clock.advance(19)
        yield sleep(0.05)
        self.assertTrue(client.connected)
        self.clock.advance(2)
        yield client.lost

    @defer.inlineCallbacks
    def test_connection_limits(self) -> Any:
        self.start(limits=StreamLimits(max_connections=3, max_connections_per_ip=2))
        a = yield self.connect()
        b = yield self.connect()
        c = yield self.connect()  # refused at accept: closed before any byte
        yield c.lost
        self.assertEqual(self.stream.rejected[("tcp", "max_connections_per_ip")], 1)
        a.transport.loseConnection()
        yield a.lost
        yield self.wait_until(lambda: len(self.stream.connections) == 1)
        d = yield self.connect()
        response = yield d.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        self.assertTrue(b.connected)

    @defer.inlineCallbacks
    def test_total_connection_limit(self) -> Any:
        self.start(limits=StreamLimits(max_connections=1))
        a = yield self.connect()
        b = yield self.connect()
        yield b.lost
        self.assertEqual(self.stream.rejected[("tcp", "max_connections")], 1)
        self.assertTrue(a.connected)

    @defer.inlineCallbacks
    def test_a_client_that_never_reads_is_disconnected(self) -> Any:
        self.start(limits=StreamLimits(write_buffer=64 * 1024))
        slow = yield self.connect()
        relayed = yield self.allocate(slow)
        other = yield self.connect()
        yield self.allocate(other, salt="other")
        peer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(peer_sock.close)
        peer_sock.bind(("127.0.0.1", 0))
        yield self.bind_channel(slow, 0x4002, peer_sock.getsockname())
        # Small kernel buffers on both ends, then the client stops reading.
        slow.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        (conn,) = [c for c in self.stream.connections.values() if c.client[1] == slow.local()[1]]
        conn.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        slow.transport.pauseProducing()
        sent = 0
        while not self.stream.closed[("tcp", "write_buffer")] and sent < 5000:
            for _ in range(50):
                peer_sock.sendto(b"z" * 1200, ("127.0.0.1", relayed[1]))
                sent += 1
            yield sleep(0.001)
        self.assertEqual(self.stream.closed[("tcp", "write_buffer")], 1)
        # What the kernel took (small buffers: tens of KiB), Twisted's own
        # buffer (64 KiB), our bound (64 KiB), and nothing more.
        self.assertLessEqual(conn.bytes_out, 3 * 64 * 1024)
        slow.transport.resumeProducing()  # it notices the reset once it reads
        yield slow.lost
        yield self.wait_until(lambda: self.relay.allocation_count == 1)
        response = yield other.request(stun.REFRESH, [(stun.LIFETIME, 600)])
        self.assertEqual(response.msg_class, stun.SUCCESS)

    @defer.inlineCallbacks
    def test_hairpin_between_stream_clients_and_a_udp_client(self) -> Any:
        self.start()
        a = yield self.connect()
        b = yield self.connect()
        relayed_a = yield self.allocate(a, salt="a")
        relayed_b = yield self.allocate(b, salt="b")
        u = TurnClient(("127.0.0.1", self.udp.listen_port))
        port = listen(u)
        self.addCleanup(port.stopListening)
        _, final = yield u.allocate(SECRET, self.expiry(), salt="u")
        relayed_u = final.get_address(stun.XOR_RELAYED_ADDRESS)
        bindings = [(a, 0x4000, relayed_b), (b, 0x4000, relayed_a), (b, 0x4001, relayed_u), (u, 0x4000, relayed_b)]
        for client, number, target in bindings:
            response = yield client.request(
                stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, number), (stun.XOR_PEER_ADDRESS, target)]
            )
            self.assertEqual(response.msg_class, stun.SUCCESS, error_code(response))
        a.send(channel_data(0x4000, b"a to b"))  # stream -> stream
        frame = yield b.next_other()
        self.assertEqual(frame, b"\x40\x00\x00\x06a to b\0\0")
        b.send(channel_data(0x4001, b"b to u"))  # stream -> UDP: not padded
        data = yield u.next_other()
        self.assertEqual(data, b"\x40\x00\x00\x06b to u")
        u.send(channel_data(0x4000, b"u to b!"))  # UDP -> stream: padded
        frame = yield b.next_other()
        self.assertEqual(frame, b"\x40\x01\x00\x07u to b!\0")

    @defer.inlineCallbacks
    def test_log_and_metrics_carry_the_transport(self) -> Any:
        events: List[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.start()
        client = yield self.connect()
        yield self.allocate(client)
        created = [e for e in events if e.get("log_format", "").startswith("allocation created")]
        self.assertEqual([e["transport"] for e in created], ["tcp"])
        metrics = {m.name: m for m in StreamCollector(self.stream).collect()}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics.values() for s in m.samples}
        self.assertEqual(samples[("relay_active_allocations_by_transport", (("transport", "tcp"),))], 1)
        self.assertEqual(samples[("relay_active_allocations_by_transport", (("transport", "udp"),))], 0)
        self.assertEqual(samples[("relay_stream_connections", (("transport", "tcp"),))], 1)
        self.assertEqual(samples[("relay_stream_connections_accepted_total", (("transport", "tcp"),))], 1)
        client.transport.loseConnection()
        yield client.lost
        yield self.wait_until(lambda: self.relay.allocation_count == 0)
        deleted = [e for e in events if e.get("log_format", "").startswith("allocation deleted")]
        self.assertEqual([(e["transport"], e["reason"]) for e in deleted], [("tcp", "connection closed")])
        self.assertEqual([e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)], [])

    @defer.inlineCallbacks
    def test_max_connections_zero_turns_tcp_off(self) -> Any:
        self.start(limits=StreamLimits(max_connections=0))
        self.assertEqual(self.stream.listening, {})  # max_connections 0: TCP is off
        client = StreamTurnClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.udp.listen_port)
        with self.assertRaises(Exception):
            yield connectProtocol(endpoint, client)


class PortalModeTests(unittest.TestCase):
    def test_listeners_wait_for_start_serving(self) -> None:
        listen_port = free_udp_port((4,))
        low, high = port_range(8, avoid=[listen_port])
        relay = Relay(
            RelayConfig(auth_secret=SECRET, public_ip4=PUBLIC[4], listen_port=listen_port, lowest_port=low, highest_port=high),
            random.Random(1),
        )
        shell = Shell(relay, serve_at_start=False)
        udp = RelayService(shell, listen_port, bind_ip4="127.0.0.1")
        stream = StreamService(shell, bind_ip4="127.0.0.1")
        shell.startService()
        self.addCleanup(shell.stopService)
        self.assertEqual(stream.listening, {})
        shell.start_serving()
        self.assertEqual(list(stream.listening), [("tcp", 4)])
        self.assertEqual(stream.tcp_port, udp.listen_port)


class TlsTests(StreamFixture, unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_allocate_and_relay_over_tls(self) -> Any:
        self.start(tls=True)
        self.assertNotEqual(self.stream.tls_port, self.stream.tcp_port)
        client = yield self.connect(tls=True)
        relayed = yield self.allocate(client)
        peer, peer_addr = self.peer()
        yield self.bind_channel(client, 0x7FFF, peer_addr)
        client.send(channel_data(0x7FFF, b"over tls"))
        data, _ = yield peer.next()
        self.assertEqual(data, b"over tls")
        peer.send(b"back", ("127.0.0.1", relayed[1]))
        frame = yield client.next_other()
        self.assertEqual(frame, b"\x7f\xff\x00\x04back")
        self.assertEqual(self.stream.allocations["tls"], 1)
        self.assertEqual(self.stream.transport_of(client_key(self.stream)), "tls")
        client.transport.loseConnection()  # TLS close_notify first, then FIN
        yield client.lost
        yield self.wait_until(lambda: self.relay.allocation_count == 0)
        self.assertEqual(dict(self.stream.closed), {("tls", "client"): 1})

    @defer.inlineCallbacks
    def test_ipv6(self) -> Any:
        self.start(families=(4, 6), tls=True)
        self.assertIn(("tls", 6), self.stream.listening)
        client = yield self.connect(6, tls=True)
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.get_address(stun.XOR_MAPPED_ADDRESS), ("::1", client.local()[1]))
        yield self.allocate(client)
        self.assertEqual(self.stream.allocations["tls"], 1)

    @defer.inlineCallbacks
    def test_a_burst_of_several_records_arrives_whole_and_in_order(self) -> Any:
        # What one reactor turn produces leaves in one flush; past 16 KiB that
        # is several TLS records, all in one send.
        self.start(tls=True)
        client = yield self.connect(tls=True)
        relayed = yield self.allocate(client)
        peer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(peer_sock.close)
        peer_sock.bind(("127.0.0.1", 0))
        yield self.bind_channel(client, 0x4003, peer_sock.getsockname())
        payloads = [bytes([i]) * (1197 + i % 4) for i in range(60)]  # ~70 KiB
        for payload in payloads:
            peer_sock.sendto(payload, ("127.0.0.1", relayed[1]))
        for payload in payloads:
            frame = yield client.next_other()
            self.assertEqual(frame, b"\x40\x03" + len(payload).to_bytes(2, "big") + payload + b"\0" * (-len(payload) % 4))

    @defer.inlineCallbacks
    def test_a_tls_client_that_never_reads_is_disconnected(self) -> Any:
        self.start(tls=True, limits=StreamLimits(write_buffer=64 * 1024))
        slow = yield self.connect(tls=True)
        relayed = yield self.allocate(slow)
        peer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(peer_sock.close)
        peer_sock.bind(("127.0.0.1", 0))
        yield self.bind_channel(slow, 0x4002, peer_sock.getsockname())
        tcp = slow.transport.transport  # under the client's TLS layer
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        (conn,) = self.stream.connections.values()
        conn.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        tcp.pauseProducing()
        sent = 0
        while not self.stream.closed[("tls", "write_buffer")] and sent < 5000:
            for _ in range(50):
                peer_sock.sendto(b"z" * 1200, ("127.0.0.1", relayed[1]))
                sent += 1
            yield sleep(0.001)
        self.assertEqual(self.stream.closed[("tls", "write_buffer")], 1)
        self.assertLessEqual(conn.bytes_out, 3 * 64 * 1024)
        tcp.resumeProducing()
        yield slow.lost
        yield self.wait_until(lambda: self.relay.allocation_count == 0)

    def handshake(self, **context_options: Any) -> Tuple[str, str]:
        """A blocking stdlib TLS client: ``(version, cipher)``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        for key, value in context_options.items():
            if key == "ciphers":
                ctx.set_ciphers(value)
            else:
                setattr(ctx, key, value)
        with socket.create_connection(("127.0.0.1", self.stream.tls_port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls_sock:
                version, cipher = tls_sock.version() or "", tls_sock.cipher()[0]
        return version, cipher

    def bindings_over_split_records(self, count: int) -> Tuple[List[bytes], List[bytes]]:
        """A blocking stdlib TLS client on memory BIOs: ``count`` Binding
        requests, one TLS record each, the first half of the bytes sent 7 at
        a time (records and their headers split anywhere), the rest at once.
        Returns (transaction ids sent, transaction ids answered)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing)
        with socket.create_connection(("127.0.0.1", self.stream.tls_port), timeout=5) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    data = raw.recv(65536)
                    self.assertTrue(data, "the relay closed during the handshake")
                    incoming.write(data)
            raw.sendall(outgoing.read())
            ids = [bytes([i]) * 12 for i in range(1, count + 1)]
            wire = b""
            for t in ids:
                tls.write(stun.encode(stun.BINDING, stun.REQUEST, t, []))
                wire += outgoing.read()
            half = len(wire) // 2
            for i in range(0, half, 7):
                raw.sendall(wire[i : min(i + 7, half)])
                time.sleep(0.001)
            raw.sendall(wire[half:])
            deframer = Deframer()
            answered: List[bytes] = []
            while len(answered) < count:
                data = raw.recv(65536)
                if not data:
                    break
                incoming.write(data)
                while True:
                    try:
                        plain = tls.read(65536)
                    except ssl.SSLWantReadError:
                        break
                    answered += [stun.decode(frame).transaction_id for frame in deframer.feed(plain)]
        return ids, answered

    def send_raw_and_wait_for_close(self, data: bytes) -> bytes:
        """Send ``data`` on a plain TCP connection to the TLS port; return
        what the relay answered before it closed the connection."""
        answer = b""
        with socket.create_connection(("127.0.0.1", self.stream.tls_port), timeout=5) as raw:
            raw.sendall(data)
            while True:
                chunk = raw.recv(65536)
                if not chunk:
                    return answer
                answer += chunk

    @defer.inlineCallbacks
    def test_garbage_on_the_tls_port_costs_that_connection_only(self) -> Any:
        self.start(tls=True)
        good = yield self.connect(tls=True)
        yield self.allocate(good)
        garbage = [
            b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n",  # not TLS at all
            b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"t" * 12,  # plain STUN on the TLS port
            b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a ClientHello too short for its body
            bytes(random.Random(5).getrandbits(8) for _ in range(3000)),
        ]
        for data in garbage:
            answer = yield deferToThread(self.send_raw_and_wait_for_close, data)
            # Closed, after at most a TLS alert (content type 21), never a STUN answer.
            self.assertTrue(answer == b"" or answer[0] == 21, answer[:16])
        response = yield good.request(stun.REFRESH, [(stun.LIFETIME, 600)])
        self.assertEqual(response.msg_class, stun.SUCCESS)
        self.assertEqual(self.relay.allocation_count, 1)
        self.assertEqual(dict(self.shell.errors), {})

    @defer.inlineCallbacks
    def test_records_split_across_reads_or_many_in_one(self) -> Any:
        self.start(tls=True)
        sent, answered = yield deferToThread(self.bindings_over_split_records, 30)
        self.assertEqual(answered, sent)

    @defer.inlineCallbacks
    def test_protocol_versions_and_ciphers(self) -> Any:
        self.start(tls=True)
        version, _ = yield deferToThread(self.handshake)
        self.assertEqual(version, "TLSv1.3")
        version, cipher = yield deferToThread(self.handshake, maximum_version=ssl.TLSVersion.TLSv1_2)
        self.assertEqual(version, "TLSv1.2")
        self.assertTrue(cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher)
        for options in (
            {"maximum_version": ssl.TLSVersion.TLSv1_1, "minimum_version": ssl.TLSVersion.MINIMUM_SUPPORTED},
            {"maximum_version": ssl.TLSVersion.TLSv1_2, "ciphers": "AES128-SHA:AES256-SHA256"},  # no forward secrecy
        ):
            with self.assertRaises((ssl.SSLError, ConnectionError)):
                yield deferToThread(self.handshake, **options)

    @defer.inlineCallbacks
    def test_a_slow_handshake_is_cut_off(self) -> Any:
        self.start(tls=True, limits=StreamLimits(handshake_timeout=5.0))
        client = StreamTurnClient()  # plain TCP to the TLS port: never says hello
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.stream.tls_port), client)
        client.transport.write(b"\x16\x03\x01")  # a ClientHello's first bytes, then nothing
        self.clock.advance(4.9)
        yield sleep(0.05)
        self.assertTrue(client.connected)
        self.clock.advance(0.2)
        yield client.lost
        self.assertEqual(self.stream.closed[("tls", "handshake_timeout")], 1)

    @defer.inlineCallbacks
    def test_reload_serves_the_new_certificate_and_keeps_connections(self) -> Any:
        self.start(tls=True)
        before = yield self.connect(tls=True)
        yield self.allocate(before)
        self.assertEqual(peer_common_name(before), "relay one")
        make_certificate(self.cert_path.parent, "relay two")  # same paths, new files
        self.assertTrue(self.tls_context.reload())  # what SIGHUP runs (reload.Reloader)
        after = yield self.connect(tls=True)
        yield after.request(stun.BINDING, signed=False)  # the handshake is done
        self.assertEqual(peer_common_name(after), "relay two")
        response = yield before.request(stun.REFRESH, [(stun.LIFETIME, 600)])  # the old connection still works
        self.assertEqual(response.msg_class, stun.SUCCESS)
        # A broken file is refused and the current certificate stays.
        self.key_path.write_text("not a key")
        self.assertFalse(self.tls_context.reload())
        again = yield self.connect(tls=True)
        yield again.request(stun.BINDING, signed=False)
        self.assertEqual(peer_common_name(again), "relay two")
        self.flushLoggedErrors()


    @defer.inlineCallbacks
    def test_without_batched_udp_io_peer_data_leaves_at_the_next_turn(self) -> Any:
        """Python's UDP path writes to the connection outside a stream read:
        ``flush_soon``'s call (at 0 s) encrypts and sends it, in order."""
        self.start(tls=True, batched_io=False)
        self.assertIsNone(self.shell.io)
        client = yield self.connect(tls=True)
        relayed = yield self.allocate(client)
        peer, peer_addr = self.peer()
        yield self.bind_channel(client, 0x4002, peer_addr)
        for i in range(3):
            peer.send(b"back %d" % i, ("127.0.0.1", relayed[1]))
        for i in range(3):
            frame = yield client.next_other()
            self.assertEqual(frame, b"\x40\x02\x00\x06back %d\x00\x00" % i)
        self.assertIsNone(self.stream._flush_call)
        self.assertEqual(self.stream.dirty, [])


class HostileStreamTests(StreamFixture, unittest.TestCase):
    """Issue 14 item 3: what an unauthenticated stream connection may cost."""

    timeout = 30

    @defer.inlineCallbacks
    def test_bindings_do_not_keep_an_unallocated_connection_past_the_auth_timeout(self) -> Any:
        self.start(limits=StreamLimits(max_connections_per_ip=64, idle_timeout=60.0, auth_timeout=30.0))
        binder = yield self.connect()
        allocator = yield self.connect()
        for second in range(0, 28, 2):  # a Binding every 2 s for 28 s: complete frames, so never idle
            response = yield binder.request(stun.BINDING, signed=False)
            self.assertEqual(response.msg_class, stun.SUCCESS)
            if second == 10:
                yield self.allocate(allocator)  # allocated within the bound
            self.clock.advance(2)
        yield sleep(0.05)
        self.assertTrue(binder.connected)  # 30 s not reached yet
        response = yield binder.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        self.clock.advance(2.5)
        yield binder.lost
        self.assertEqual(self.stream.closed[("tcp", "auth_timeout")], 1)
        self.clock.advance(100)
        yield sleep(0.05)
        self.assertTrue(allocator.connected)
        response = yield allocator.request(stun.REFRESH, [(stun.LIFETIME, 600)])
        self.assertEqual(response.msg_class, stun.SUCCESS)

    @defer.inlineCallbacks
    def test_auth_timeout_applies_to_tls_too(self) -> Any:
        self.start(tls=True, limits=StreamLimits(max_connections_per_ip=64, auth_timeout=5.0))
        client = yield self.connect(tls=True)
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        self.clock.advance(5.1)
        yield client.lost
        self.assertEqual(self.stream.closed[("tls", "auth_timeout")], 1)

    def test_per_ip_limit_counts_an_ipv6_64_as_one_source(self) -> None:
        self.start(limits=StreamLimits(max_connections_per_ip=2))
        admitted = []
        for ip in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::2", "2001:db8:1:2::3", "2001:db8:1:3::1",
                   "::ffff:192.0.2.1", "192.0.2.1", "192.0.2.1", "192.0.2.2"):  # fmt: skip
            conn = self.stream.admit("tcp", ip, 40000)
            admitted.append(conn is not None)
            if conn is not None:
                self.addCleanup(conn.connectionLost)
        self.assertEqual(admitted, [True, True, False, True, True, True, False, True])
        self.assertEqual(self.stream.rejected[("tcp", "max_connections_per_ip")], 2)
        self.assertEqual(self.stream.per_ip["2001:db8:1:2::/64"], 2)

    @defer.inlineCallbacks
    def test_per_ip_limit_between_ipv4_sources(self) -> Any:
        self.start(limits=StreamLimits(max_connections_per_ip=1))
        first = yield self.connect()
        other = StreamTurnClient()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.stream.tcp_port, bindAddress=("127.0.0.2", 0)), other
        )
        self.addCleanup(self.disconnect, other)
        response = yield other.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        second = yield self.connect()
        yield second.lost  # the same source as first
        self.assertTrue(first.connected)

    @defer.inlineCallbacks
    def test_partial_frames_are_bounded_in_total(self) -> Any:
        self.start(limits=StreamLimits(max_connections_per_ip=64, max_buffered=100_000))
        partial = b"\x40\x01\xfd\xe8" + b"x" * 60_000  # ChannelData announcing 65,000 bytes
        a = yield self.connect()
        a.transport.write(partial)
        yield self.wait_until(lambda: self.stream.buffered == 60_004)
        b = yield self.connect()
        b.transport.write(partial)  # 120,008 > 100,000: b goes, a stays
        yield b.lost
        self.assertEqual(self.stream.closed[("tcp", "buffer_budget")], 1)
        self.assertEqual(self.stream.buffered, 60_004)
        self.assertTrue(a.connected)
        small = yield self.connect()  # a small partial frame still fits
        small.transport.write(b"\x00\x01\x00\x08")
        yield self.wait_until(lambda: self.stream.buffered == 60_008)
        a.transport.write(b"x" * 5_000)  # a's frame completes (an unbound channel: dropped)
        yield self.wait_until(lambda: self.stream.buffered == 4)
        self.assertTrue(a.connected)
        c = yield self.connect()
        c.transport.write(partial)
        yield self.wait_until(lambda: self.stream.buffered == 60_008)
        small.transport.abortConnection()
        yield small.lost
        yield self.wait_until(lambda: self.stream.buffered == 60_004)
        self.assertTrue(c.connected)
        self.assertEqual(self.stream.closed[("tcp", "buffer_budget")], 1)

    @defer.inlineCallbacks
    def test_partial_tls_records_count_against_the_budget(self) -> Any:
        """OpenSSL keeps a partial record in its own buffer: it is counted from the record headers."""
        self.start(tls=True, limits=StreamLimits(max_connections_per_ip=64, max_buffered=15_000))
        record = b"\x16\x03\x01\x40\x00" + b"\x01" * 10_000  # a 16 KiB handshake record, 10,000 bytes of it
        first = StreamTurnClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.stream.tls_port), first)
        self.addCleanup(self.disconnect, first)
        first.transport.write(record)
        yield self.wait_until(lambda: self.stream.buffered == 10_005)
        second = StreamTurnClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.stream.tls_port), second)
        second.transport.write(record)
        yield second.lost
        self.assertEqual(self.stream.closed[("tls", "buffer_budget")], 1)
        self.assertTrue(first.connected)
        first.transport.abortConnection()
        yield first.lost
        yield self.wait_until(lambda: self.stream.buffered == 0)

    def test_record_tracking_counts_the_incomplete_record_for_any_split(self) -> None:
        from firezone_relay.adapters.stream import TLSStreamProtocol

        rng = random.Random(7)
        for _ in range(500):
            lengths = [rng.choice([0, 1, 4, 5, 100, 1229, 16401]) for _ in range(rng.randint(1, 5))]
            stream = b"".join(bytes([23, 3, 3]) + n.to_bytes(2, "big") + b"r" * n for n in lengths)
            ends = [0]
            for n in lengths:
                ends.append(ends[-1] + 5 + n)
            cut = rng.randint(0, len(stream))
            conn = TLSStreamProtocol.__new__(TLSStreamProtocol)
            conn._record_header, conn._record_missing, conn._record_received = b"", 0, 0
            i = 0
            while i < cut:  # in pieces of 1 byte to 20 KiB
                j = min(cut, i + rng.choice([1, 3, 7, 300, 20000]))
                conn._track_records(stream[i:j])
                i = j
            self.assertEqual(conn._record_received, cut - max(e for e in ends if e <= cut), (lengths, cut))

    @defer.inlineCallbacks
    def test_tls_traffic_leaves_nothing_counted(self) -> Any:
        self.start(tls=True)
        client = yield self.connect(tls=True)
        yield self.allocate(client)
        for _ in range(5):
            response = yield client.request(stun.BINDING, signed=False)
            self.assertEqual(response.msg_class, stun.SUCCESS)
        self.assertEqual(self.stream.buffered, 0)

    @defer.inlineCallbacks
    def test_buffered_bytes_metric(self) -> Any:
        from prometheus_client import CollectorRegistry

        self.start()
        registry = CollectorRegistry()
        registry.register(StreamCollector(self.stream))
        client = yield self.connect()
        client.transport.write(b"\x40\x01\x01\x00" + b"x" * 100)
        yield self.wait_until(lambda: self.stream.buffered == 104)
        self.assertEqual(registry.get_sample_value("relay_stream_buffered_bytes"), 104)


def client_key(stream: StreamService) -> Tuple[str, int, int]:
    (conn,) = stream.connections.values()
    return conn.client


def peer_common_name(client: StreamTurnClient) -> str:
    return common_name(client.transport.getPeerCertificate().to_cryptography().public_bytes(Encoding.PEM))


class HostileStreamProcessTests(unittest.TestCase):
    """Issue 14 item 3 against ``twistd firezone-relay`` over real TCP."""

    timeout = 60

    @defer.inlineCallbacks
    def test_auth_timeout_and_buffer_budget_in_the_real_process(self) -> Any:
        import re
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        from tests.adapters.test_drain import RelayProcess, wait_until

        relay = RelayProcess(
            self, ["--auth-secret=" + SECRET, "--stream-auth-timeout=2", "--stream-buffer-budget=1000000"]
        )
        found = yield wait_until(
            lambda: re.search(r"HTTP health and metrics on 127\.0\.0\.1:(\d+)", relay.output()), 30, "HTTP port"
        )
        yield wait_until(lambda: "TURN over TCP on" in relay.output(), 30, "the TCP listener")
        metrics_url = "http://127.0.0.1:%s/metrics" % found.group(1)

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            with urllib.request.urlopen(metrics_url, timeout=5) as r:
                text = r.read().decode("utf-8")
            return {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            }

        @defer.inlineCallbacks
        def connect(source: str = "127.0.0.1") -> Any:
            client = StreamTurnClient()
            yield connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", relay.listen_port, bindAddress=(source, 0)), client
            )
            self.addCleanup(lambda: client.transport.abortConnection() if client.connected else None)
            return client

        # 1. Bindings every 0.25 s do not keep an unallocated connection; an allocation does.
        binder = yield connect()
        allocator = yield connect()
        _, final = yield allocator.allocate(SECRET, int(time.time()) + 3600)
        self.assertEqual(final.msg_class, stun.SUCCESS, final.get(stun.ERROR_CODE))
        opened = time.monotonic()
        answers = 0
        while binder.connected and time.monotonic() - opened < 10:
            try:
                response = yield binder.request(stun.BINDING, signed=False)
                answers += response.msg_class == stun.SUCCESS
            except Exception:
                break
            yield sleep(0.25)
        yield binder.lost
        held = time.monotonic() - opened
        self.assertGreaterEqual(answers, 5)
        self.assertTrue(1.5 <= held < 4.0, held)
        self.assertTrue(allocator.connected)
        response = yield allocator.request(stun.REFRESH, [(stun.LIFETIME, 600)])
        self.assertEqual(response.msg_class, stun.SUCCESS)

        # 2. 40 partial frames of 60,000 bytes from 4 sources (2.4 MB asked) against a 1 MB budget.
        partial = b"\x40\x01\xfd\xe8" + b"x" * 60_000
        holders = []
        for n in range(40):
            client = yield connect("127.0.0.%d" % (2 + n % 4))
            client.transport.write(partial)
            holders.append(client)
        yield wait_until(lambda: sum(1 for c in holders if not c.connected) >= 24, 10, "closes")
        samples = yield deferToThread(scrape)
        buffered = samples[("relay_stream_buffered_bytes", ())]
        closed = samples[("relay_stream_connections_closed_total", (("reason", "buffer_budget"), ("transport", "tcp")))]
        self.assertLessEqual(buffered, 1_000_000)
        self.assertGreaterEqual(buffered, 60_004)
        self.assertEqual(closed + sum(1 for c in holders if c.connected), 40)
        self.assertGreaterEqual(closed, 24)
        # 3. The auth timeout ends the rest, and the budget is free again.
        yield defer.gatherResults([c.lost for c in holders])
        samples = yield deferToThread(scrape)
        self.assertEqual(samples[("relay_stream_buffered_bytes", ())], 0)
        self.assertGreaterEqual(
            samples[("relay_stream_connections_closed_total", (("reason", "auth_timeout"), ("transport", "tcp")))], 1
        )
        self.assertTrue(allocator.connected)
        self.assertNotIn("Traceback", relay.output())
