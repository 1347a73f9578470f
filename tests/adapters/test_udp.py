"""The UDP adapter with the real core, over real loopback sockets.

The relay binds loopback but advertises documentation addresses as its public
ones (the 1:1 NAT case): peers live on loopback too, and a peer on the
relay's own public address would be the hairpin case, which these tests do
not mean to exercise.
"""

from __future__ import annotations

import errno
import random
import socket
import time
from typing import Any, List, Optional, Sequence, Tuple

from twisted.internet import defer, reactor, task
from twisted.internet.error import CannotListenError
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from firezone_relay.adapters.udp import RelayService
from firezone_relay.core import commands as C
from firezone_relay.core import stun
from firezone_relay.core.relay import Relay, RelayConfig
from tests.helpers import (
    Collector,
    TurnClient,
    error_code,
    free_udp_port,
    ipv6_available,
    listen,
    loopback,
    port_range,
    tid,
)

SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"
PUBLIC = {4: "203.0.113.1", 6: "2001:db8::1"}


def sleep(seconds: float) -> "defer.Deferred[None]":
    return task.deferLater(reactor, seconds, lambda: None)


class RelayFixture:
    """Starts a relay (core + adapter) on loopback for a test case."""

    families: Sequence[int] = (4,)
    #: RelayService(batched_io=...): None uses the C extension when built;
    #: the PythonIO* classes at the end run the same tests with False.
    batched_io: Optional[bool] = None

    def start_relay(
        self: Any,
        families: Optional[Sequence[int]] = None,
        size: int = 64,
        clock: Any = None,
        port_range_: Optional[Tuple[int, int]] = None,
        **overrides: Any,
    ) -> RelayService:
        families = tuple(families or self.families)
        if 6 in families and not ipv6_available():
            raise unittest.SkipTest("IPv6 loopback (::1) is not available")
        listen_port = free_udp_port(families)
        low, high = port_range_ or port_range(size, avoid=[listen_port])
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
        self.relay = Relay(RelayConfig(**settings), random.Random(7))
        self.service = RelayService(
            self.relay,
            listen_port,
            bind_ip4="127.0.0.1" if 4 in families else None,
            bind_ip6="::1" if 6 in families else None,
            clock=clock,
            batched_io=self.batched_io,
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service

    def client(self: Any, family: int = 4) -> TurnClient:
        client = TurnClient((loopback(family), self.service.listen_port))
        port = listen(client, family)
        self.addCleanup(port.stopListening)
        return client

    def peer(self: Any, family: int = 4) -> Tuple[Collector, Tuple[str, int]]:
        peer = Collector()
        port = listen(peer, family)
        self.addCleanup(port.stopListening)
        return peer, (loopback(family), port.getHost().port)

    def expiry(self: Any, seconds: int = 3600) -> int:
        return int(time.time()) + seconds


class BindingTests(RelayFixture, unittest.TestCase):
    timeout = 10

    @defer.inlineCallbacks
    def test_binding(self) -> Any:
        self.start_relay()
        client = self.client()
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        host = client.transport.getHost()
        self.assertEqual(response.get_address(stun.XOR_MAPPED_ADDRESS), ("127.0.0.1", host.port))

    @defer.inlineCallbacks
    def test_binding_ipv6(self) -> Any:
        self.start_relay(families=(4, 6))
        client = self.client(6)
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.get_address(stun.XOR_MAPPED_ADDRESS), ("::1", client.transport.getHost().port))
        # ... and IPv4 on the same port number (IPV6_V6ONLY sockets).
        client4 = self.client(4)
        response = yield client4.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)


class _FullExchange(RelayFixture):
    """Allocate → CreatePermission → Send/Data → ChannelBind → ChannelData both ways → Refresh 0."""

    family = 4
    timeout = 15

    @defer.inlineCallbacks
    def test_full_exchange(self) -> Any:
        family = self.family
        service = self.start_relay(families=(family,))
        client = self.client(family)
        peer, peer_addr = self.peer(family)

        # RFC 8656 §7.2: without REQUESTED-ADDRESS-FAMILY the relayed address is IPv4.
        wanted = [(stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV6)] if family == 6 else []
        first, response = yield client.allocate(SECRET, self.expiry(), wanted)
        self.assertEqual(error_code(first), 401)
        self.assertTrue(first.get_str(stun.NONCE))
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        relayed = response.get_address(stun.XOR_RELAYED_ADDRESS)
        assert relayed is not None
        self.assertEqual(relayed[0], PUBLIC[family])
        port = relayed[1]
        low, high = self.relay.config.lowest_port, self.relay.config.highest_port
        self.assertTrue(low <= port <= high)
        self.assertEqual(response.get_int(stun.LIFETIME), 600)
        self.assertIn((port, family), service.port_numbers())
        self.assertEqual(self.relay.allocation_count, 1)
        relay_socket = (loopback(family), port)

        # CreatePermission, then the peer's datagram arrives as a Data indication.
        response = yield client.request(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, peer_addr)])
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        peer.send(b"hello client", relay_socket)
        data = yield client.next_other()
        indication = stun.decode(data)
        self.assertEqual((indication.method, indication.msg_class), (stun.DATA_METHOD, stun.INDICATION))
        self.assertEqual(indication.get_bytes(stun.DATA), b"hello client")
        self.assertEqual(indication.get_address(stun.XOR_PEER_ADDRESS), peer_addr)

        # Send indication → the peer, from the allocation port.
        client.send(
            stun.encode(
                stun.SEND,
                stun.INDICATION,
                tid(),
                [(stun.XOR_PEER_ADDRESS, peer_addr), (stun.DATA, b"hello peer")],
            )
        )
        data, source = yield peer.next()
        self.assertEqual((data, source), (b"hello peer", relay_socket))

        # ChannelBind and ChannelData in both directions.
        response = yield client.request(
            stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, peer_addr)]
        )
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        client.send(stun.encode_channel_data(0x4000, b"over the channel"))
        data, source = yield peer.next()
        self.assertEqual((data, source), (b"over the channel", relay_socket))
        big = bytes(range(256)) * 40  # 10 KiB: more than Twisted's default 8192-byte read
        client.send(stun.encode_channel_data(0x4000, big))
        data, source = yield peer.next()
        self.assertEqual(data, big)
        peer.send(b"back again", relay_socket)
        data = yield client.next_other()
        self.assertEqual(stun.decode_channel_data(data), (0x4000, b"back again"))
        peer.send(big, relay_socket)
        data = yield client.next_other()
        self.assertEqual(stun.decode_channel_data(data), (0x4000, big))

        # Refresh with LIFETIME 0 deletes the allocation and closes its port.
        response = yield client.request(stun.REFRESH, [(stun.LIFETIME, 0)])
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        self.assertEqual(self.relay.allocation_count, 0)
        self.assertNotIn((port, family), service.port_numbers())
        yield sleep(0.05)  # the reactor closes the socket on its next turn
        with socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((loopback(family), port))  # free again
        self.assertEqual(dict(service.drops), {})
        self.assertEqual(dict(service.errors), {})


class FullExchangeIPv4Tests(_FullExchange, unittest.TestCase):
    family = 4


class FullExchangeIPv6Tests(_FullExchange, unittest.TestCase):
    family = 6


class DualAllocationTests(RelayFixture, unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_additional_address_family(self) -> Any:
        service = self.start_relay(families=(4, 6))
        client = self.client(4)
        peer6, peer6_addr = self.peer(6)
        first, response = yield client.allocate(
            SECRET, self.expiry(), [(stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6)]
        )
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        relayed = response.get_all(stun.XOR_RELAYED_ADDRESS)
        self.assertEqual(sorted(ip for ip, _ in relayed), sorted([PUBLIC[4], PUBLIC[6]]))
        ports = {port for _, port in relayed}
        self.assertEqual(len(ports), 1)
        port = ports.pop()
        self.assertIn((port, 4), service.port_numbers())
        self.assertIn((port, 6), service.port_numbers())

        # An IPv6 peer reaches the IPv4 client through the IPv6 relayed socket.
        response = yield client.request(
            stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4001), (stun.XOR_PEER_ADDRESS, peer6_addr)]
        )
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        client.send(stun.encode_channel_data(0x4001, b"to v6"))
        data, source = yield peer6.next()
        self.assertEqual((data, source), (b"to v6", ("::1", port)))
        peer6.send(b"from v6", ("::1", port))
        data = yield client.next_other()
        self.assertEqual(stun.decode_channel_data(data), (0x4001, b"from v6"))

        response = yield client.request(stun.REFRESH, [(stun.LIFETIME, 0)])
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        self.assertNotIn((port, 4), service.port_numbers())
        self.assertNotIn((port, 6), service.port_numbers())


class HairpinTests(RelayFixture, unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_two_clients_of_this_relay(self) -> Any:
        """Both ends use this relay: the core delivers internally (SPEC §5),
        the adapter just sends what comes back from the listen port."""
        self.start_relay()
        alice, bob = self.client(), self.client()
        _, a = yield alice.allocate(SECRET, self.expiry(), salt="alice")
        _, b = yield bob.allocate(SECRET, self.expiry(), salt="bob")
        a_relayed = a.get_address(stun.XOR_RELAYED_ADDRESS)
        b_relayed = b.get_address(stun.XOR_RELAYED_ADDRESS)
        response = yield bob.request(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, a_relayed)])
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        response = yield alice.request(
            stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x5000), (stun.XOR_PEER_ADDRESS, b_relayed)]
        )
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        alice.send(stun.encode_channel_data(0x5000, b"hi bob"))
        data = yield bob.next_other()
        indication = stun.decode(data)
        self.assertEqual(indication.get_bytes(stun.DATA), b"hi bob")
        self.assertEqual(indication.get_address(stun.XOR_PEER_ADDRESS), a_relayed)


class ExpiryTests(RelayFixture, unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_short_lifetime_with_the_real_clock(self) -> Any:
        service = self.start_relay()
        client = self.client()
        _, response = yield client.allocate(SECRET, self.expiry(), [(stun.LIFETIME, 1)])
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        self.assertEqual(response.get_int(stun.LIFETIME), 600)  # RFC 8656 §7.2: below the default, the default
        port = response.get_address(stun.XOR_RELAYED_ADDRESS)[1]
        response = yield client.request(stun.REFRESH, [(stun.LIFETIME, 1)])  # a Refresh may shorten it
        self.assertEqual(response.get_int(stun.LIFETIME), 1)
        self.assertIn((port, 4), service.port_numbers())
        deadline = time.time() + 5
        while self.relay.allocation_count and time.time() < deadline:
            yield sleep(0.1)
        self.assertEqual(self.relay.allocation_count, 0)
        self.assertNotIn((port, 4), service.port_numbers())

    @defer.inlineCallbacks
    def test_task_clock_drives_expiry(self) -> Any:
        clock = task.Clock()
        clock.advance(time.time())  # credentials carry a wall-clock expiry
        service = self.start_relay(clock=clock)
        client = self.client()
        _, response = yield client.allocate(SECRET, self.expiry(), [(stun.LIFETIME, 600)])
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        port = response.get_address(stun.XOR_RELAYED_ADDRESS)[1]
        calls = clock.getDelayedCalls()
        self.assertEqual(len(calls), 1)  # one timer, whatever the core holds
        self.assertAlmostEqual(calls[0].getTime(), clock.seconds() + 600, delta=1)

        clock.advance(599)
        self.assertEqual(self.relay.allocation_count, 1)
        clock.advance(1)
        self.assertEqual(self.relay.allocation_count, 0)
        self.assertNotIn((port, 4), service.port_numbers())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timer_is_rearmed_only_when_the_deadline_changes(self) -> None:
        clock = task.Clock()
        fake = _FakeRelay()
        service = RelayService(fake, 0, bind_ip4=None, clock=clock)
        fake.deadline = 10.0
        service._pump()
        first = clock.getDelayedCalls()
        self.assertEqual(len(first), 1)
        service._pump()
        self.assertEqual(clock.getDelayedCalls(), first)
        fake.deadline = 5.0
        service._pump()
        self.assertEqual(clock.getDelayedCalls(), first)  # reset(), not a new call
        self.assertEqual(first[0].getTime(), 5.0)
        clock.advance(5)
        self.assertEqual(fake.timeouts, [5.0])
        fake.deadline = None
        service._pump()
        self.assertEqual(clock.getDelayedCalls(), [])


class _FakeRelay:
    """Just enough of the core's surface for pump-level unit tests."""

    def __init__(self) -> None:
        self.deadline: Optional[float] = None
        self.timeouts: List[float] = []
        self.commands: List[Any] = []
        self.port_results: List[Tuple[int, int, bool]] = []

    def handle_client_input(self, data: bytes, sender: Any, now: float) -> Any:
        raise ValueError("core bug")

    def handle_peer_traffic(self, *args: Any) -> Any:
        return None

    def handle_timeout(self, now: float) -> None:
        self.timeouts.append(now)
        if self.deadline is not None and self.deadline <= now:
            self.deadline = None

    def handle_port_result(self, port: int, family: int, ok: bool, now: float) -> None:
        self.port_results.append((port, family, ok))

    def next_command(self) -> Any:
        return self.commands.pop(0) if self.commands else None

    def poll_timeout(self) -> Optional[float]:
        return self.deadline


class PortTests(RelayFixture, unittest.TestCase):
    timeout = 15

    def occupy(self, ports: Sequence[int]) -> None:
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(s.close)
            s.bind(("127.0.0.1", port))

    def occupied_range(self, size: int, leave_free: int = 0) -> Tuple[int, int, list[int]]:
        """A port range of ``size`` whose ports this test holds, all but
        ``leave_free`` of them (returned, checked free just now).  Another
        window is tried when any port of one is taken by someone else (other
        test workers bind in the same region)."""
        for _ in range(50):
            low, high = port_range(size)
            ports = list(range(low, high + 1))
            free = random.Random().sample(ports, leave_free)
            held: list[socket.socket] = []
            try:
                for port in ports:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    held.append(s)
                    s.bind(("127.0.0.1", port))
            except OSError:
                for s in held:
                    s.close()
                continue
            for s in held:
                if s.getsockname()[1] in free:
                    s.close()
                else:
                    self.addCleanup(s.close)
            return low, high, free
        raise AssertionError("no window of %d free UDP ports found" % size)

    @defer.inlineCallbacks
    def test_taken_ports_are_skipped(self) -> Any:
        low, high, (free,) = self.occupied_range(8, leave_free=1)
        service = self.start_relay(port_range_=(low, high))
        client = self.client()
        _, response = yield client.allocate(SECRET, self.expiry())
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        self.assertEqual(response.get_address(stun.XOR_RELAYED_ADDRESS), (PUBLIC[4], free))
        self.assertIn((free, 4), service.port_numbers())

    @defer.inlineCallbacks
    def test_no_free_port_is_508(self) -> Any:
        low, high, _ = self.occupied_range(4)
        service = self.start_relay(port_range_=(low, high))
        client = self.client()
        _, response = yield client.allocate(SECRET, self.expiry())
        self.assertEqual(error_code(response), 508)
        self.assertEqual(self.relay.allocation_count, 0)
        self.assertEqual([p for p in service.port_numbers() if p[0] != service.listen_port], [])
        # The listener keeps working.
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)

    def test_allocation_ports_cost_little_memory(self) -> None:
        """No per-port 64 KiB buffer: 500 open ports grow RSS by far less than 500 x 64 KiB."""

        def rss_kb() -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

        fake = _FakeRelay()
        service = RelayService(fake, 0, bind_ip4="127.0.0.1", clock=task.Clock(), batched_io=self.batched_io)
        self.addCleanup(service.stopService)
        low, high = port_range(500)
        before = rss_kb()
        fake.commands = [C.OpenPort(port, 4) for port in range(low, high + 1)]
        service._pump()
        opened = sum(1 for _, _, ok in fake.port_results if ok)
        self.assertGreater(opened, 400)  # a few may be taken by other tests
        grown = rss_kb() - before
        self.assertLess(grown / opened, 16, "%d kB for %d ports" % (grown, opened))

    def test_open_port_failure_is_reported_to_the_core(self) -> None:
        fake = _FakeRelay()
        service = RelayService(fake, 0, bind_ip4="127.0.0.1", clock=task.Clock())
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        fake.commands = [C.OpenPort(taken, 4), C.OpenPort(taken, 6)]  # 6: family not served
        service._pump()
        self.assertEqual(fake.port_results, [(taken, 4, False), (taken, 6, False)])
        self.assertEqual(service.port_numbers(), [])

    def test_dont_fragment_sets_pmtu_discovery(self) -> None:
        fake = _FakeRelay()
        v6 = ipv6_available()
        service = RelayService(fake, 0, bind_ip4="127.0.0.1", bind_ip6="::1" if v6 else None, clock=task.Clock())
        self.addCleanup(service.stopService)
        port = free_udp_port((4, 6))
        fake.commands = [C.OpenPort(port, 4, dont_fragment=True)]
        service._pump()
        self.assertEqual(fake.port_results, [(port, 4, True)])
        sock = service._sockets[4][port]
        self.assertEqual(sock.getsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MTU_DISCOVER", 10)), 2)
        if v6:
            fake.commands = [C.OpenPort(port, 6, dont_fragment=True)]
            service._pump()
            self.assertEqual(fake.port_results[-1], (port, 6, True))
            sock = service._sockets[6][port]
            self.assertEqual(sock.getsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_MTU_DISCOVER", 23)), 2)
            self.assertEqual(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 1)

    def test_listener_bind_failure_is_fatal_and_clear(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        service = RelayService(_FakeRelay(), taken, bind_ip4="127.0.0.1", clock=task.Clock())
        error = self.assertRaises(CannotListenError, service.privilegedStartService)
        self.assertEqual((error.interface, error.port), ("127.0.0.1", taken))
        self.assertEqual(service.port_numbers(), [])


class RobustnessTests(RelayFixture, unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_garbage_never_breaks_the_listener(self) -> Any:
        service = self.start_relay()
        client = self.client()
        rng = random.Random(1)
        junk = [
            b"",
            b"\x00",
            b"\xff" * 10,
            b"\x00\x01\x00\x00",  # truncated STUN header
            stun.encode(stun.BINDING, stun.REQUEST, tid(), [])[:-1],
            stun.encode(stun.ALLOCATE, stun.REQUEST, tid(), [(stun.LIFETIME, 5)])[:22],
            b"\x40\x00\xff\xff" + b"x" * 10,  # ChannelData longer than the datagram
            b"\x7f\xff\x00\x00",
            b"\x00" * 65507,  # the largest IPv4 UDP payload
            b"\x40\x00" + b"\xff" * 65505,
        ] + [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))) for _ in range(50)]
        for data in junk:
            client.send(data)
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        self.assertEqual(dict(service.errors), {})

    @defer.inlineCallbacks
    def test_core_exception_is_counted_not_fatal(self) -> Any:
        service = self.start_relay()
        client = self.client()
        real = service._handle_client_input
        calls = []

        def boom(data: bytes, sender: Any, now: float) -> Any:
            calls.append(data)
            if data == b"boom":
                raise ZeroDivisionError("core bug")
            return real(data, sender, now)

        service._handle_client_input = boom
        client.send(b"boom")
        client.send(b"boom")
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        self.assertEqual(service.errors["client:ZeroDivisionError"], 2)
        logged = self.flushLoggedErrors(ZeroDivisionError)
        self.assertEqual(len(logged), 1)  # rate limited: once per kind

    @defer.inlineCallbacks
    def test_a_failed_send_on_the_per_packet_path_is_a_counted_drop(self) -> Any:
        """A Transmit the kernel refuses (EMSGSIZE here) is counted by its
        errno, through either reader, and is not an internal error."""
        service = self.start_relay()
        client = self.client()
        real = service._handle_client_input
        listen_port = service.listen_port

        def too_big(data: bytes, sender: Any, now: float) -> Any:
            if bytes(data) == b"big":
                return (listen_port, 4, sender, b"x" * 70000)
            return real(data, sender, now)

        service._handle_client_input = too_big
        client.send(b"big")
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        self.assertEqual(service.drops["send_too_big"], 1)
        self.assertEqual(dict(service.errors), {})

    def test_send_errors_are_counted(self) -> None:
        fake = _FakeRelay()
        service = RelayService(fake, 0, bind_ip4="127.0.0.1", clock=task.Clock())
        self.addCleanup(service.stopService)
        port = free_udp_port((4,))
        fake.commands = [C.OpenPort(port, 4)]
        service._pump()
        service._transmit((port, 4, ("::1", 9), b"x"))  # wrong family for the socket
        service._transmit((port + 1, 4, ("127.0.0.1", 9), b"x"))  # no such socket
        service._transmit((port, 4, ("127.0.0.1", 9), b"x" * 70000))  # too big
        self.assertEqual(service.drops["no_socket"], 1)
        self.assertEqual(service.drops["send_too_big"], 1)
        self.assertEqual(sum(service.drops.values()), 3)
        protocol = service._ports[(port, 4)].protocol
        protocol.connectionRefused()
        self.assertEqual(service.drops["refused"], 1)

    @defer.inlineCallbacks
    def test_stop_closes_every_socket(self) -> Any:
        service = self.start_relay()
        client = self.client()
        _, response = yield client.allocate(SECRET, self.expiry())
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        self.assertEqual(len(service.port_numbers()), 2)
        yield service.stopService()
        self.assertEqual(service.port_numbers(), [])
        self.assertIsNone(service._timer)

    @defer.inlineCallbacks
    def test_no_twisted_port_lines_per_allocation(self) -> Any:
        """Twisted's "starting on N" / "(UDP Port N Closed)" are not logged for our ports."""
        events: List[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = self.start_relay()
        client = self.client()
        _, response = yield client.allocate(SECRET, self.expiry())
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        ours = [p for p, _ in service.port_numbers()]
        response = yield client.request(stun.REFRESH, [(stun.LIFETIME, 0)])
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        yield sleep(0.05)  # the port closes on the next reactor turn
        yield service.stopService()
        texts = [formatEvent(e) or "" for e in events]
        self.assertTrue([t for t in texts if t.startswith("allocation created")], texts)
        self.assertTrue([t for t in texts if t.startswith("allocation deleted")], texts)
        port_lines = [t for t in texts for p in ours if t.endswith("starting on %d" % p) or "UDP Port %d Closed" % p in t]
        self.assertEqual(port_lines, [])


# The same end-to-end tests on the pure-Python reader (``--udp-io python``);
# the classes above use the C extension's batched reader whenever it is built.


for _case in (
    BindingTests,
    FullExchangeIPv4Tests,
    FullExchangeIPv6Tests,
    DualAllocationTests,
    HairpinTests,
    RobustnessTests,
    PortTests,
):
    _name = "PythonIO" + _case.__name__
    globals()[_name] = type(_name, (_case,), {"batched_io": False, "__module__": __name__})
del _case, _name
