"""The SIGTERM drain of a real ``twistd firezone-relay`` process.

The relay binds 127.0.0.1 and advertises 203.0.113.1 (the 1:1 NAT case, as
in test_udp), so a peer on loopback is an ordinary peer.  Clients and peers
are ``tests.helpers`` protocols on the trial reactor; the relay's log goes to
a file (a pipe nobody reads could fill up and stall it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from firezone_relay.adapters.drain import DrainController, ProcessControl
from firezone_relay.core import stun
from tests.helpers import Collector, TurnClient, error_code, free_udp_port, listen, port_range
from tests.test_tap import TWISTD, twistd_env

SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"
PUBLIC_IP4 = "203.0.113.1"


def sleep(seconds: float) -> "defer.Deferred[None]":
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        yield sleep(0.02)


class RelayProcess:
    """``twistd -n firezone-relay`` on loopback, for one test case."""

    def __init__(
        self,
        case: unittest.TestCase,
        extra: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
        public_ip4: Optional[str] = PUBLIC_IP4,
    ) -> None:
        self.listen_port = free_udp_port((4,))
        low, high = port_range(32, avoid=[self.listen_port])
        cwd = Path(case.mktemp())
        cwd.mkdir(parents=True)
        self.log_path = cwd / "relay.log"
        self._log = open(self.log_path, "wb")
        case.addCleanup(self._log.close)
        args = TWISTD + [
            "-n",
            "--pidfile=",
            "firezone-relay",
            "--listen-port=%d" % self.listen_port,
            "--lowest-port=%d" % low,
            "--highest-port=%d" % high,
            "--bind-ip4-addr=127.0.0.1",
            "--allow-loopback-peers",
            "--health-check-addr=127.0.0.1:0",
            "--socket-buffer=0",
        ] + (["--public-ip4-addr=" + public_ip4] if public_ip4 else []) + list(extra)
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=twistd_env(**(env or {})), stdout=self._log, stderr=subprocess.STDOUT
        )
        case.addCleanup(self.kill)

    @property
    def server(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.listen_port)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def running(self) -> bool:
        return self.proc.poll() is None

    @defer.inlineCallbacks
    def wait_exit(self, timeout: float = 10.0) -> Any:
        yield wait_until(lambda: not self.running(), timeout, "the relay process to exit")
        return self.proc.returncode

    @defer.inlineCallbacks
    def wait_log(self, fragment: str, timeout: float = 10.0) -> Any:
        yield wait_until(lambda: fragment in self.output(), timeout, "log line %r" % fragment)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@defer.inlineCallbacks
def binding_answered(client: TurnClient, timeout: float = 20.0) -> Any:
    """Retry a Binding until the relay (still starting) answers it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = yield client.send_raw_request(*_binding(), timeout=0.3)
        except defer.TimeoutError:
            continue
        return response
    raise AssertionError("the relay never answered a Binding")


def _binding() -> Tuple[bytes, bytes]:
    t = os.urandom(12)
    return t, stun.encode(stun.BINDING, stun.REQUEST, t, [])


class Endpoint:
    """A TURN client with a channel to a peer, and the peer: counts both ways."""

    def __init__(self, case: unittest.TestCase, server: Tuple[str, int], channel: int) -> None:
        self.client = TurnClient(server)
        self.peer = Collector()
        case.addCleanup(listen(self.client).stopListening)
        case.addCleanup(listen(self.peer).stopListening)
        self.channel = channel
        self.relay_port = 0
        self.to_peer = 0
        self.to_client = 0

    @defer.inlineCallbacks
    def allocate(self, lifetime: Optional[int] = None) -> Any:
        attributes = [(stun.LIFETIME, lifetime)] if lifetime is not None else []
        _, response = yield self.client.allocate(SECRET, int(time.time()) + 3600, attributes)
        assert response.msg_class == stun.SUCCESS, response
        ip, self.relay_port = response.get_address(stun.XOR_RELAYED_ADDRESS)
        assert ip == PUBLIC_IP4
        peer = ("127.0.0.1", self.peer.transport.getHost().port)
        response = yield self.client.request(
            stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, self.channel), (stun.XOR_PEER_ADDRESS, peer)]
        )
        assert response.msg_class == stun.SUCCESS, response
        return response

    @defer.inlineCallbacks
    def client_to_peer(self, n: int) -> Any:
        """Send ``n`` ChannelData messages; the peer must get every one, in order."""
        for i in range(n):
            self.client.send(stun.encode_channel_data(self.channel, b"up %06d" % (self.to_peer + i)))
        for i in range(n):
            data, _ = yield self.peer.next()
            assert data == b"up %06d" % (self.to_peer + i), data
        self.to_peer += n

    @defer.inlineCallbacks
    def peer_to_client(self, n: int) -> Any:
        """The peer sends ``n`` datagrams; the client must get each as ChannelData."""
        for i in range(n):
            self.peer.send(b"down %06d" % (self.to_client + i), ("127.0.0.1", self.relay_port))
        for i in range(n):
            data = yield self.client.next_other()
            assert stun.decode_channel_data(data) == (self.channel, b"down %06d" % (self.to_client + i)), data
        self.to_client += n

    @defer.inlineCallbacks
    def both_ways(self, n: int) -> Any:
        yield self.client_to_peer(n)
        yield self.peer_to_client(n)


class DrainProcessTests(unittest.TestCase):
    timeout = 60

    def start(self, *extra: str) -> RelayProcess:
        return RelayProcess(self, ["--auth-secret", SECRET] + list(extra))

    @defer.inlineCallbacks
    def ready(self, relay: RelayProcess) -> Any:
        probe = TurnClient(relay.server)
        self.addCleanup(listen(probe).stopListening)
        yield binding_answered(probe)

    @defer.inlineCallbacks
    def test_drain_keeps_relaying_refuses_allocates_and_exits_0_when_released(self) -> Any:
        relay = self.start()
        yield self.ready(relay)
        alice = Endpoint(self, relay.server, 0x4000)
        bob = Endpoint(self, relay.server, 0x4001)
        yield alice.allocate()
        yield bob.allocate()
        yield alice.both_ways(50)
        yield bob.both_ways(50)

        relay.signal(signal.SIGTERM)
        yield relay.wait_log("SIGTERM: draining 2 allocations")
        # Still relaying every packet, both ways, for both.
        yield alice.both_ways(200)
        yield bob.both_ways(200)
        # New allocations are refused with 508 ...
        carol = TurnClient(relay.server)
        self.addCleanup(listen(carol).stopListening)
        _, response = yield carol.allocate(SECRET, int(time.time()) + 3600)
        self.assertEqual(error_code(response), 508)
        # ... while Refresh, ChannelBind and CreatePermission go on.
        response = yield alice.client.request(stun.REFRESH, [(stun.LIFETIME, 600)])
        self.assertEqual((response.msg_class, response.get_int(stun.LIFETIME)), (stun.SUCCESS, 600))
        peer = ("127.0.0.1", alice.peer.transport.getHost().port)
        response = yield alice.client.request(
            stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, peer)]
        )
        self.assertEqual(response.msg_class, stun.SUCCESS)
        response = yield alice.client.request(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, peer)])
        self.assertEqual(response.msg_class, stun.SUCCESS)

        # Alice leaves: one allocation left, the process stays.
        response = yield alice.client.request(stun.REFRESH, [(stun.LIFETIME, 0)])
        self.assertEqual(response.msg_class, stun.SUCCESS)
        yield sleep(0.5)
        self.assertTrue(relay.running())
        yield bob.both_ways(100)

        # Bob's last packets and his release go out back to back: every packet
        # is relayed before the process exits, and the Refresh is answered.
        for i in range(100):
            bob.client.send(stun.encode_channel_data(0x4001, b"up %06d" % (bob.to_peer + i)))
        response = yield bob.client.request(stun.REFRESH, [(stun.LIFETIME, 0)])
        self.assertEqual(response.msg_class, stun.SUCCESS)
        for i in range(100):
            data, _ = yield bob.peer.next()
            self.assertEqual(data, b"up %06d" % (bob.to_peer + i))
        bob.to_peer += 100
        code = yield relay.wait_exit(10)
        self.assertEqual(code, 0, relay.output())
        self.assertEqual((alice.to_peer, alice.to_client, bob.to_peer, bob.to_client), (250, 250, 450, 350))
        output = relay.output()
        for line in ("SIGTERM: draining 2 allocations", "drained: no allocation left", "Main loop terminated"):
            self.assertEqual(output.count(line), 1, output)
        self.assertNotIn("Traceback", output)

    @defer.inlineCallbacks
    def test_drain_ends_when_the_last_allocation_expires(self) -> Any:
        relay = self.start()
        yield self.ready(relay)
        alice = Endpoint(self, relay.server, 0x4000)
        yield alice.allocate()
        # RFC 8656 §7.2 gives a new allocation at least 600 s; a Refresh may shorten it.
        response = yield alice.client.request(stun.REFRESH, [(stun.LIFETIME, 3)])
        self.assertEqual(response.get_int(stun.LIFETIME), 3, response)
        started = time.monotonic()
        relay.signal(signal.SIGTERM)
        yield relay.wait_log("draining 1 allocations")
        yield alice.both_ways(20)
        code = yield relay.wait_exit(10)
        elapsed = time.monotonic() - started
        self.assertEqual(code, 0, relay.output())
        self.assertTrue(1.5 < elapsed < 8, elapsed)
        self.assertIn("(expired)", relay.output())
        self.assertIn("drained: no allocation left", relay.output())

    @defer.inlineCallbacks
    def test_second_sigterm_stops_at_once(self) -> Any:
        relay = self.start()
        yield self.ready(relay)
        alice = Endpoint(self, relay.server, 0x4000)
        yield alice.allocate()
        relay.signal(signal.SIGTERM)
        yield relay.wait_log("draining 1 allocations")
        yield alice.both_ways(10)
        started = time.monotonic()
        relay.signal(signal.SIGTERM)
        code = yield relay.wait_exit(10)
        self.assertEqual(code, 0, relay.output())
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertIn("SIGTERM again: stopping now with 1 allocations", relay.output())

    @defer.inlineCallbacks
    def test_no_allocation_exits_0_at_once(self) -> Any:
        for signum in (signal.SIGTERM, signal.SIGINT):
            relay = self.start()
            yield self.ready(relay)
            started = time.monotonic()
            relay.signal(signum)
            code = yield relay.wait_exit(10)
            self.assertEqual(code, 0, relay.output())
            self.assertLess(time.monotonic() - started, 5.0)  # generous: parallel tests load the machine
            self.assertIn("%s: draining 0 allocations" % signal.Signals(signum).name, relay.output())
            self.assertIn("drained: no allocation left", relay.output())

    @defer.inlineCallbacks
    def test_drain_timeout_exits_0(self) -> Any:
        relay = self.start("--drain-timeout", "1")
        yield self.ready(relay)
        alice = Endpoint(self, relay.server, 0x4000)
        yield alice.allocate()
        started = time.monotonic()
        relay.signal(signal.SIGTERM)
        code = yield relay.wait_exit(6)
        self.assertEqual(code, 0, relay.output())
        self.assertTrue(0.8 < time.monotonic() - started < 6)
        self.assertIn("drain timeout (1.0 s): stopping with 1 allocations left", relay.output())


class _FakeRelay:
    def __init__(self) -> None:
        self.allocation_count = 0
        self.draining = False

    def start_draining(self) -> None:
        self.draining = True


class _FakeService:
    def __init__(self) -> None:
        self.relay = _FakeRelay()
        self.on_allocations_changed: Optional[Callable[[], None]] = None

    def watch_allocations(self, watcher: Callable[[], None]) -> None:
        self.on_allocations_changed = watcher


class _FakeReactor:
    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)

    def callWhenRunning(self, f: Callable[[], Any]) -> None:
        f()


class _FakePortal:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class DrainControllerTests(unittest.SynchronousTestCase):
    """The controller in-process, with a fake reactor and a ``task.Clock``."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.fake = _FakeReactor()
        self.service = _FakeService()
        self.portal = _FakePortal()
        self.process = ProcessControl(self.fake)
        self.drain = DrainController(
            self.service, self.process, portal=self.portal, reactor=self.fake, clock=self.clock, drain_timeout=30
        )

    def test_drains_until_zero_then_stops_once(self) -> None:
        from firezone_relay.adapters.http import Readiness

        readiness = Readiness()
        self.drain.readiness = readiness
        self.service.relay.allocation_count = 2
        self.drain.handle_signal(signal.SIGTERM)
        self.assertTrue(self.service.relay.draining and self.drain.draining and readiness.draining)
        self.assertEqual((self.portal.closed, self.fake.stops), (1, 0))
        self.service.relay.allocation_count = 1
        self.service.on_allocations_changed()  # type: ignore[misc]
        self.clock.advance(0)
        self.assertEqual(self.fake.stops, 0)
        self.service.relay.allocation_count = 0
        self.service.on_allocations_changed()  # type: ignore[misc]
        self.assertEqual(self.fake.stops, 0)  # not inside the pump that deleted it
        self.clock.advance(0)
        self.assertEqual((self.fake.stops, self.process.exit_code), (1, 0))
        self.drain.handle_signal(signal.SIGTERM)
        self.clock.advance(60)
        self.assertEqual(self.fake.stops, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_poll_catches_unreported_deletions(self) -> None:
        self.service.relay.allocation_count = 1
        self.drain.handle_signal(signal.SIGINT)
        self.service.relay.allocation_count = 0
        self.clock.advance(1.0)
        self.assertEqual(self.fake.stops, 1)

    def test_timeout_and_second_signal(self) -> None:
        self.service.relay.allocation_count = 5
        self.drain.handle_signal(signal.SIGTERM)
        self.clock.advance(29.9)
        self.assertEqual(self.fake.stops, 0)
        self.clock.advance(0.1)
        self.assertEqual((self.fake.stops, self.process.exit_code), (1, 0))
        other = DrainController(_FakeService(), ProcessControl(self.fake), reactor=self.fake, clock=self.clock)
        other.relay.allocation_count = 5
        other.handle_signal(signal.SIGTERM)
        other.handle_signal(signal.SIGTERM)
        self.assertEqual(self.fake.stops, 2)

    def test_install_and_uninstall_restore_the_handlers(self) -> None:
        before = signal.getsignal(signal.SIGTERM)
        self.drain.startService()
        self.assertNotEqual(signal.getsignal(signal.SIGTERM), before)
        self.drain.stopService()
        self.assertEqual(signal.getsignal(signal.SIGTERM), before)
