"""``--workers N`` (SPEC §9, issue 17) through real twistd processes.

Every test starts ``twistd -n firezone-relay --workers 2`` (a supervisor and
two worker processes) on loopback, with its own listen, allocation and HTTP
ports, and talks to it with real TURN clients and peers.  The supervisor's
log (stdout and stderr, workers included) goes to a file the tests read for
the workers' pids.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from firezone_relay import tap
from firezone_relay.core import stun
from firezone_relay.workers.options import slices
from tests.helpers import Collector, TurnClient, error_code, free_udp_port, listen, port_range, kill_if_running, tid, unavailable

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
SECRET = "workers-test-secret-0123456789abcdef"


def sleep(seconds: float) -> "defer.Deferred[None]":
    return deferLater(reactor, seconds, lambda: None)


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistd_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREZONE_", "LISTEN_", "PUBLIC_", "BIND_", "WORKERS"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def http_get(port: int, path: str) -> Tuple[int, str]:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def has_metric(text: str, name: str, value: float, **labels: str) -> bool:
    """True when the sample is there with ``value`` (the supervisor reads
    the workers' counters every second)."""
    try:
        return metric(text, name, **labels) == value
    except KeyError:
        return False


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` with exactly ``labels`` in Prometheus text."""
    wanted = ",".join('%s="%s"' % item for item in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, value = line.rsplit(" ", 1)
        if "{" in sample:
            sample_name, rest = sample.split("{", 1)
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest.rstrip("}") else ""
        else:
            sample_name, got = sample, ""
        if sample_name == name and got == wanted:
            return float(value)
    raise KeyError("%s%s not in metrics" % (name, labels))


class Relay:
    """One supervisor process and what the tests need to know about it."""

    def __init__(self, proc: Any, log_path: str, listen_port: int, http_port: int, low: int, high: int, workers: int) -> None:
        self.proc = proc
        self.log_path = log_path
        self.listen_port = listen_port
        self.http_port = http_port
        self.low, self.high = low, high
        self.slices = slices(low, high, workers)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def ready_pids(self) -> Dict[int, int]:
        """worker slot -> pid of its latest ready run."""
        pids: Dict[int, int] = {}
        for slot, pid in re.findall(r"worker (\d+) ready \(pid (\d+)\)", self.log()):
            pids[int(slot)] = int(pid)
        return pids

    def started_pids(self) -> List[int]:
        return [int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", self.log())]

    def slot_of(self, port: int) -> int:
        for index, (low, high) in enumerate(self.slices):
            if low <= port <= high:
                return index
        raise AssertionError("port %d is in no slice of %s" % (port, self.slices))

    def metrics(self) -> str:
        return http_get(self.http_port, "/metrics")[1]


class WorkersFixture:
    timeout = 90

    def start_relay(
        self: Any,
        workers: int = 2,
        extra: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
        public: str = "127.0.0.1",
        size: int = 64,
        wait_ready: bool = True,
        loopback_peers: bool = True,
        secret: bool = True,
        ipv6: bool = False,
        attempt: int = 1,
    ) -> Relay:
        listen_port = free_udp_port((4, 6) if ipv6 else (4,))
        # Above the 20000-29999 most other tests' relays use (some of them
        # assert that no allocation port was taken): fewer collisions.
        low, high = port_range(size, avoid=[listen_port], base=40000)
        http_port = free_tcp_port()
        cwd = self.mktemp()
        os.makedirs(cwd)
        log_path = os.path.join(cwd, "relay.log")
        out = open(log_path, "w")
        self.addCleanup(out.close)
        args = TWISTD + [
            "-n", "--pidfile=", "firezone-relay",
            "--workers=%d" % workers,
            "--listen-port=%d" % listen_port,
            "--lowest-port=%d" % low,
            "--highest-port=%d" % high,
            "--public-ip4-addr=%s" % public,
            "--bind-ip4-addr=127.0.0.1",
            "--health-check-addr=127.0.0.1:%d" % http_port,
            "--control-endpoint=off",
        ] + (["--auth-secret=%s" % SECRET] if secret else []) + (
            ["--public-ip6-addr=::1", "--bind-ip6-addr=::1"] if ipv6 else []
        ) + (["--allow-loopback-peers"] if loopback_peers else []) + list(extra)
        proc = subprocess.Popen(args, cwd=cwd, env=twistd_env(**(env or {})), stdout=out, stderr=subprocess.STDOUT)
        relay = Relay(proc, log_path, listen_port, http_port, low, high, workers)

        def kill() -> None:
            kill_if_running(proc)
            deadline = time.time() + 10  # the workers follow (closed pipe, PDEATHSIG)
            for pid in relay.started_pids():
                while alive(pid) and time.time() < deadline:
                    time.sleep(0.05)

        self.addCleanup(kill)
        if wait_ready:
            if attempt < 3 and self.exited_on_a_taken_port(relay):
                # Another parallel test took a port between our check and
                # the relay's bind: try other ports.
                return self.start_relay(workers, extra, env, public, size, wait_ready, loopback_peers, secret, ipv6,
                                        attempt + 1)
            self.wait_ready(relay)
        return relay

    def exited_on_a_taken_port(self, relay: Relay, timeout: float = 30.0) -> bool:
        """True when the relay exited at start-up because a port was taken;
        False once it is ready (or exited otherwise: ``wait_ready`` says so)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if relay.proc.poll() is not None:
                return "Address already in use" in relay.log()
            try:
                if http_get(relay.http_port, "/readyz")[0] == 200:
                    return False
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def wait_ready(self: Any, relay: Relay, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if relay.proc.poll() is not None:
                self.fail("the relay exited (%s):\n%s" % (relay.proc.returncode, relay.log()))
            try:
                if http_get(relay.http_port, "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.fail("the relay did not become ready:\n" + relay.log())

    @defer.inlineCallbacks
    def wait_ready_async(self: Any, relay: Relay, timeout: float = 30.0) -> Any:
        """``wait_ready`` without blocking the reactor (a stand-in portal runs in it)."""
        from twisted.internet.threads import deferToThread

        deadline = time.time() + timeout
        while time.time() < deadline:
            if relay.proc.poll() is not None:
                self.fail("the relay exited (%s):\n%s" % (relay.proc.returncode, relay.log()))
            status = yield deferToThread(lambda: http_get(relay.http_port, "/readyz")[0])
            if status == 200:
                return
            yield sleep(0.1)
        self.fail("the relay did not become ready:\n" + relay.log())

    def expiry(self: Any) -> int:
        return int(time.time()) + 3600

    @defer.inlineCallbacks
    def client(self: Any, relay: Relay, salt: str = "testsalt", family: int = 4, secret: str = SECRET) -> Any:
        """A UDP client with an allocation: ``(client, relayed address)``."""
        client = TurnClient(("::1" if family == 6 else "127.0.0.1", relay.listen_port))
        port = listen(client, family)
        self.addCleanup(port.stopListening)
        _, final = yield client.allocate(secret, self.expiry(), salt=salt)
        self.assertEqual(final.msg_class, stun.SUCCESS, final.get(stun.ERROR_CODE))
        return client, final.get_address(stun.XOR_RELAYED_ADDRESS)

    def peer(self: Any) -> Tuple[Collector, Tuple[str, int]]:
        peer = Collector()
        port = listen(peer)
        self.addCleanup(port.stopListening)
        return peer, ("127.0.0.1", port.getHost().port)

    @defer.inlineCallbacks
    def permit(self: Any, client: TurnClient, peer_addr: Any) -> Any:
        response = yield client.request(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, peer_addr)])
        self.assertEqual(response.msg_class, stun.SUCCESS, response.get(stun.ERROR_CODE))

    def send_indication(self, client: TurnClient, peer_addr: Any, payload: bytes) -> None:
        client.send(stun.encode(stun.SEND, stun.INDICATION, tid(), [(stun.XOR_PEER_ADDRESS, peer_addr), (stun.DATA, payload)]))

    @defer.inlineCallbacks
    def data_indication(self: Any, client: TurnClient) -> Any:
        """``(peer address, payload)`` of the next Data indication to ``client``."""
        raw = yield client.next_other()
        message = stun.decode(raw)
        return message.get_address(stun.XOR_PEER_ADDRESS), message.get_bytes(stun.DATA)

    @defer.inlineCallbacks
    def relays_both_ways(self: Any, client: TurnClient, relayed: Any, peer: Collector, peer_addr: Any, tag: bytes) -> Any:
        self.send_indication(client, peer_addr, b"out " + tag)
        data, source = yield peer.next()
        self.assertEqual((data, source), (b"out " + tag, tuple(relayed)))
        peer.send(b"back " + tag, tuple(relayed))
        got = yield self.data_indication(client)
        self.assertEqual(got, (tuple(peer_addr), b"back " + tag))

    @defer.inlineCallbacks
    def clients_in_both_slices(
        self: Any, relay: Relay, count: int = 12, salt: str = "testsalt", family: int = 4, secret: str = SECRET
    ) -> Any:
        """``count`` allocations from as many source ports; at least one in each worker's slice."""
        out = []
        used = set()
        # The kernel hashes each source to a worker: with two workers, all of
        # ``count`` on one is a 2^-(count-1) chance, so a few more are made then.
        for i in range(3 * count):
            if i >= count and len(used) == len(relay.slices):
                break
            client, relayed = yield self.client(relay, salt="%s%d" % (salt, i), family=family, secret=secret)
            out.append((client, relayed))
            used.add(relay.slot_of(relayed[1]))
        self.assertEqual(
            used, set(range(len(relay.slices))),
            "every worker gets clients (kernel SO_REUSEPORT hashing); sources %s; log:\n%s"
            % ([c.transport.getHost().port for c, _ in out], relay.log()),
        )
        return out

    def wait_for(self: Any, predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        self.fail("timed out waiting for %s" % what)

    @defer.inlineCallbacks
    def wait_for_async(self: Any, predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            yield sleep(0.1)
        self.fail("timed out waiting for %s" % what)


class OptionTests(unittest.SynchronousTestCase):
    def test_workers_values(self) -> None:
        def parse(*args: str, environ: Optional[Dict[str, str]] = None) -> Any:
            options = tap.Options(environ=environ or {})
            options.parseOptions(["--auth-secret", SECRET] + list(args))
            return options["workers"]

        self.assertEqual(parse(), 1)
        self.assertEqual(parse("--workers", "3"), 3)
        self.assertEqual(parse(environ={"WORKERS": "2"}), 2)
        self.assertEqual(parse("--workers", "auto"), len(os.sched_getaffinity(0)))
        for bad, message in (("0", "between 1 and 1024"), ("many", "a number of processes or auto")):
            with self.assertRaises(tap.usage.UsageError) as caught:
                parse("--workers", bad)
            self.assertIn(message, str(caught.exception))

    def test_slices_are_disjoint_and_cover_the_range(self) -> None:
        for low, high, count in ((49152, 65535, 2), (20000, 20002, 3), (30000, 30100, 7)):
            parts = slices(low, high, count)
            self.assertEqual(len(parts), count)
            self.assertEqual(parts[0][0], low)
            self.assertEqual(parts[-1][1], high)
            for (a_low, a_high), (b_low, _) in zip(parts, parts[1:]):
                self.assertLessEqual(a_low, a_high)
                self.assertEqual(a_high + 1, b_low)

    def test_more_workers_than_ports_is_one_clear_error(self) -> None:
        from firezone_relay.service import build

        options = tap.Options(environ={})
        options.parseOptions([
            "--auth-secret", SECRET, "--workers", "4", "--public-ip4-addr", "127.0.0.1",
            "--lowest-port", "40000", "--highest-port", "40002", "--control-endpoint", "off",
        ])
        with self.assertRaises(SystemExit) as caught:
            build(options, reactor)
        self.assertEqual(
            str(caught.exception),
            "firezone-relay: --workers 4 needs at least 4 allocation ports; --lowest-port..--highest-port has 3",
        )

    def test_port_zero_with_workers_is_one_clear_line_at_parsing(self) -> None:
        """Each worker's listener is its own socket: with port 0 each would get
        its own port (a client would reach one worker per port).  The option
        parser refuses port 0 before any socket or worker exists."""
        for flag in ("--listen-port=0", "--tls-port=0"):
            args = TWISTD + [
                "-n", "--pidfile=", "firezone-relay", "--workers=2", flag, "--auth-secret=%s" % SECRET,
                "--public-ip4-addr=127.0.0.1", "--bind-ip4-addr=127.0.0.1", "--control-endpoint=off",
            ]
            done = subprocess.run(args, env=twistd_env(), capture_output=True, text=True, timeout=60)
            self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
            self.assertEqual(done.stdout, "")
            self.assertEqual(
                done.stderr,
                "firezone-relay: error: %s must be between 1 and 65535 (got 0) (--help lists the options)\n"
                % flag.split("=")[0],
            )

    def test_listeners_bind_the_one_port_of_each_kind(self) -> None:
        """Every worker's UDP and TCP listener is on --listen-port, TLS on
        --tls-port, in both families."""
        from firezone_relay.workers.pool import Slot
        from firezone_relay.workers.listeners import Listeners
        from tests.certs import make_certificate
        from tests.helpers import ipv6_available

        if not ipv6_available():
            unavailable(self, "no IPv6 loopback on this host")
        cert, key = make_certificate(Path(self.mktemp()).resolve())
        port = free_udp_port((4, 6))
        tls_port = free_tcp_port()
        options = tap.Options(environ={})
        options.parseOptions([
            "--auth-secret", SECRET, "--workers", "2", "--public-ip4-addr", "127.0.0.1", "--bind-ip4-addr", "127.0.0.1",
            "--public-ip6-addr", "::1", "--bind-ip6-addr", "::1", "--listen-port", str(port),
            "--tls-port", str(tls_port), "--tls-cert", str(cert), "--tls-key", str(key), "--control-endpoint", "off",
            "--lowest-port", "40000", "--highest-port", "40099",
        ])
        listeners = Listeners(options)
        slots = [Slot(0, 40000, 40049), Slot(1, 40050, 40099)]
        listeners.make(slots)
        self.addCleanup(listeners.close)
        self.assertEqual(len(listeners.sockets), 12)
        for slot in slots:
            self.assertEqual(sorted(slot.fds), ["tcp:4", "tcp:6", "tls:4", "tls:6", "udp:4", "udp:6"])
        got = {(s.family, s.type, s.getsockname()[1]) for s in listeners.sockets}
        self.assertEqual(got, {
            (family, type_, p) for family in (socket.AF_INET, socket.AF_INET6)
            for type_, p in ((socket.SOCK_DGRAM, port), (socket.SOCK_STREAM, port), (socket.SOCK_STREAM, tls_port))
        })

    def test_one_worker_is_todays_relay(self) -> None:
        from firezone_relay.service import build

        options = tap.Options(environ={})
        options.parseOptions([
            "--auth-secret", SECRET, "--workers", "1", "--public-ip4-addr", "127.0.0.1",
            "--control-endpoint", "off", "--listen-port", "3478",
        ])
        top = build(options, reactor)
        names = {service.name for service in top}
        self.assertIn("shell", names)
        self.assertNotIn("workers", names)
        options = tap.Options(environ={})
        options.parseOptions([
            "--auth-secret", SECRET, "--workers", "2", "--public-ip4-addr", "127.0.0.1",
            "--control-endpoint", "off",
        ])
        names = {service.name for service in build(options, reactor)}
        self.assertIn("workers", names)
        self.assertNotIn("shell", names)


class WorkerProcessTests(WorkersFixture, unittest.TestCase):
    @defer.inlineCallbacks
    def test_two_workers_share_the_listener_and_every_allocation_relays(self) -> Any:
        relay = self.start_relay()
        pids = relay.ready_pids()
        self.assertEqual(sorted(pids), [0, 1])
        self.assertEqual(len(set(pids.values()) | {relay.proc.pid}), 3, "two worker processes beside the supervisor")
        clients = yield self.clients_in_both_slices(relay)
        peer, peer_addr = self.peer()
        for i, (client, relayed) in enumerate(clients):
            yield self.permit(client, peer_addr)
            yield self.relays_both_ways(client, relayed, peer, peer_addr, b"%d" % i)
        # /metrics sums the workers (fetched every second).
        yield self.wait_for_async(
            lambda: has_metric(relay.metrics(), "relay_allocations_total", len(clients)), what="summed allocations"
        )
        text = relay.metrics()
        self.assertEqual(metric(text, "relay_active_allocations", family="ipv4"), len(clients))
        self.assertEqual(metric(text, "relay_port_range_size"), relay.high - relay.low + 1)
        self.assertEqual(
            metric(text, "relay_data_relayed_packets_total", direction="client_to_peer", datapath="userspace"),
            len(clients),
        )
        self.assertEqual(metric(text, "relay_workers"), 2)
        self.assertEqual(metric(text, "relay_worker_restarts_total"), 0)
        self.assertGreater(metric(text, "relay_worker_cpu_seconds_total"), 0)
        self.assertGreater(metric(text, "relay_worker_resident_memory_bytes"), 2 * 10_000_000)
        self.assertEqual(metric(text, "relay_ready"), 1)

    @defer.inlineCallbacks
    def test_a_killed_worker_is_restarted_and_the_other_never_stops(self) -> Any:
        relay = self.start_relay()
        clients = yield self.clients_in_both_slices(relay)
        peer, peer_addr = self.peer()
        for client, relayed in clients:
            yield self.permit(client, peer_addr)
        yield self.wait_for_async(
            lambda: has_metric(relay.metrics(), "relay_allocations_total", len(clients)), what="counters"
        )
        before = relay.metrics()
        victim = relay.ready_pids()[0]
        survivors = [(c, r) for c, r in clients if relay.slot_of(r[1]) == 1]
        received: Dict[Any, int] = {}
        sent = 0
        # Peer -> client traffic to every allocation of worker 1, before,
        # during and after worker 0 is killed: none of it may be lost.
        for round_ in range(60):
            if round_ == 20:
                os.kill(victim, signal.SIGKILL)
            for client, relayed in survivors:
                peer.send(b"r%d" % round_, tuple(relayed))
                sent += 1
            yield sleep(0.02)
        deadline = time.time() + 10
        for client, relayed in survivors:
            while received.get(tuple(relayed), 0) < 60 and time.time() < deadline:
                yield self.data_indication(client)
                received[tuple(relayed)] = received.get(tuple(relayed), 0) + 1
        self.assertEqual(sum(received.values()), sent, "worker 1 relayed everything while worker 0 died")
        # Worker 0 is back within seconds, with a new pid, and ready.
        self.wait_for(lambda: relay.ready_pids().get(0, victim) != victim, timeout=10, what="worker 0 restarted")
        self.wait_ready(relay, timeout=10)
        log = relay.log()
        self.assertIn("worker 0 (pid %d) was killed by SIGKILL; restarting it in 0.5 s" % victim, log)
        self.assertFalse(alive(victim))
        # The dead worker's clients keep their 5-tuples on worker 0's socket:
        # a new Allocate from the same source lands in slice 0 again.
        lost = [(c, r) for c, r in clients if relay.slot_of(r[1]) == 0]
        client = lost[0][0]
        _, final = yield client.allocate(SECRET, self.expiry(), salt="again")
        self.assertEqual(final.msg_class, stun.SUCCESS, final.get(stun.ERROR_CODE))
        self.assertEqual(relay.slot_of(final.get_address(stun.XOR_RELAYED_ADDRESS)[1]), 0)
        # Counters never go back: the dead worker's counts are kept.
        yield self.wait_for_async(
            lambda: has_metric(relay.metrics(), "relay_allocations_total", len(clients) + 1), what="counters after restart"
        )
        after = relay.metrics()
        for name, labels in (
            ("relay_allocations_total", {}),
            ("relay_data_relayed_packets_total", {"direction": "peer_to_client", "datapath": "userspace"}),
            ("relay_responses_total", {"message_type": "allocate", "response_class": "success", "error_code": ""}),
            ("relay_worker_cpu_seconds_total", {}),
        ):
            self.assertGreaterEqual(metric(after, name, **labels), metric(before, name, **labels), name)
        self.assertEqual(metric(after, "relay_worker_restarts_total"), 1)
        self.assertEqual(metric(after, "relay_workers"), 2)


class FamilyAndPortalTests(WorkersFixture, unittest.TestCase):
    @defer.inlineCallbacks
    def test_ipv6_listeners_are_shared_too(self) -> Any:
        from tests.helpers import ipv6_available

        if not ipv6_available():
            unavailable(self, "no IPv6 loopback on this host")
        relay = self.start_relay(ipv6=True)
        clients = yield self.clients_in_both_slices(relay, family=6)
        peer, peer_addr = self.peer()
        for i, (client, relayed) in enumerate(clients):
            yield self.permit(client, peer_addr)
            yield self.relays_both_ways(client, relayed, peer, peer_addr, b"v6 %d" % i)

    @defer.inlineCallbacks
    def test_portal_mode_starts_the_workers_on_the_first_init(self) -> Any:
        from tests.portal_stub import TOKEN, StubPortal

        stub = StubPortal()
        stub.push_init = False
        stub.start()
        self.addCleanup(stub.stop)
        relay = self.start_relay(
            extra=["--api-url", stub.url(), "--name", "workers-under-test"],
            env={"FIREZONE_TOKEN": TOKEN},
            secret=False,
            wait_ready=False,
        )
        join = yield stub.wait("join", 1, timeout=30)
        secret = join["payload"]["stamp_secret"]
        yield sleep(1.0)
        self.assertNotIn("worker 0 started", relay.log(), "no worker before the portal's init")
        from twisted.internet.threads import deferToThread

        status = yield deferToThread(lambda: http_get(relay.http_port, "/readyz")[0])
        self.assertEqual(status, 503)
        stub.push("relay", "init", {})
        yield self.wait_ready_async(relay)
        clients = yield self.clients_in_both_slices(relay, count=10, secret=secret)
        for client, _ in clients:
            response = yield client.request(stun.REFRESH, [(stun.LIFETIME, 0)])
            self.assertEqual(response.msg_class, stun.SUCCESS)
        self.assertNotIn(secret, relay.log())
        relay.proc.send_signal(signal.SIGTERM)
        closed = yield stub.wait("close", 1)
        yield self.wait_for_async(lambda: relay.proc.poll() is not None, timeout=15, what="exit")
        self.assertEqual(relay.proc.returncode, 0, relay.log())
        self.assertEqual(closed[:2], (True, 1000))


class DrainTests(WorkersFixture, unittest.TestCase):
    def wait_draining(self, relay: Relay) -> None:
        self.wait_for(lambda: relay.log().count("draining") >= 3, what="both workers draining")
        self.wait_for(lambda: len(re.findall(r"worker \d draining", relay.log())) == 2, what="both workers draining")

    @defer.inlineCallbacks
    def test_sigterm_drains_every_worker_then_exits_zero(self) -> Any:
        relay = self.start_relay()
        clients = yield self.clients_in_both_slices(relay, count=8)
        peer, peer_addr = self.peer()
        for client, _ in clients:
            yield self.permit(client, peer_addr)
        relay.proc.send_signal(signal.SIGTERM)
        self.wait_draining(relay)
        status, body = http_get(relay.http_port, "/readyz")
        self.assertEqual((status, body.strip()), (503, "draining"))
        # New allocations are refused by every worker ...
        for i in range(6):
            fresh = TurnClient(("127.0.0.1", relay.listen_port))
            port = listen(fresh)
            self.addCleanup(port.stopListening)
            _, final = yield fresh.allocate(SECRET, self.expiry(), salt="late%d" % i)
            self.assertEqual(error_code(final), 508)
        # ... existing ones keep relaying, in both workers ...
        for i, (client, relayed) in enumerate(clients):
            yield self.relays_both_ways(client, relayed, peer, peer_addr, b"drain%d" % i)
        self.assertIsNone(relay.proc.poll())
        # ... and once the last one is gone, the relay exits 0 and no worker is left.
        for client, _ in clients:
            self.assertIsNone(relay.proc.poll(), "exited before the last allocation went")
            response = yield client.request(stun.REFRESH, [(stun.LIFETIME, 0)])
            self.assertEqual(response.msg_class, stun.SUCCESS)
        self.assertEqual(relay.proc.wait(timeout=15), 0, relay.log())
        self.assertIn("drained: no allocation left, stopping", relay.log())
        for pid in relay.started_pids():
            self.wait_for(lambda: not alive(pid), timeout=5, what="worker %d gone" % pid)

    @defer.inlineCallbacks
    def test_a_second_sigterm_stops_at_once(self) -> Any:
        relay = self.start_relay()
        yield self.clients_in_both_slices(relay, count=8)
        relay.proc.send_signal(signal.SIGTERM)
        self.wait_draining(relay)
        self.assertIsNone(relay.proc.poll())
        relay.proc.send_signal(signal.SIGTERM)
        self.assertEqual(relay.proc.wait(timeout=15), 0, relay.log())
        self.assertIn("SIGTERM again: stopping now with 8 allocations", relay.log())
        for pid in relay.started_pids():
            self.wait_for(lambda: not alive(pid), timeout=STOP_WAIT, what="worker %d gone" % pid)

    def test_a_taken_listen_port_is_one_line_and_exit_1(self) -> None:
        """A port held by another process is refused, as without workers, not
        silently shared through SO_REUSEPORT (which the holder may also use)."""
        for reuseport in (False, True):
            holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(holder.close)
            if reuseport:
                holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind(("127.0.0.1", 0))
            port = holder.getsockname()[1]
            relay = self.start_relay(extra=["--listen-port=%d" % port], wait_ready=False)
            self.assertEqual(relay.proc.wait(timeout=30), 1, relay.log())
            self.assertIn("firezone-relay: error: cannot listen on 127.0.0.1:%d: Address already in use" % port, relay.log())
            self.assertNotIn("Traceback", relay.log())
            self.assertEqual(relay.started_pids(), [])

    def test_sighup_is_ignored_with_a_warning(self) -> None:
        relay = self.start_relay()
        relay.proc.send_signal(signal.SIGHUP)
        self.wait_for(lambda: "SIGHUP: reloading is not supported with --workers above 1 yet; ignored" in relay.log(),
                      what="the SIGHUP warning")
        self.assertIsNone(relay.proc.poll())
        self.assertEqual(http_get(relay.http_port, "/readyz")[0], 200)
        self.assertEqual(sorted(relay.ready_pids()), [0, 1])
        self.assertEqual(len(relay.started_pids()), 2, "no worker restarted")

    def test_a_supervisor_killed_with_sigkill_leaves_no_worker(self) -> None:
        relay = self.start_relay()
        pids = list(relay.ready_pids().values())
        self.assertEqual(len(pids), 2)
        self.assertTrue(all(alive(pid) for pid in pids))
        relay.proc.kill()
        relay.proc.wait(timeout=10)
        for pid in pids:
            self.wait_for(lambda: not alive(pid), timeout=5, what="orphan worker %d gone" % pid)


STOP_WAIT = 8.0


class CrossWorkerTests(WorkersFixture, unittest.TestCase):
    @defer.inlineCallbacks
    def hairpin(self, public: str) -> Any:
        relay = self.start_relay(public=public, loopback_peers=False)
        clients = yield self.clients_in_both_slices(relay, count=10)
        a, a_relayed = next((c, r) for c, r in clients if relay.slot_of(r[1]) == 0)
        b, b_relayed = next((c, r) for c, r in clients if relay.slot_of(r[1]) == 1)
        self.assertEqual((a_relayed[0], b_relayed[0]), (public, public))
        yield self.permit(a, b_relayed)
        yield self.permit(b, a_relayed)
        self.send_indication(a, b_relayed, b"from worker 0")
        got = yield self.data_indication(b)
        self.assertEqual(got, (tuple(a_relayed), b"from worker 0"))
        self.send_indication(b, a_relayed, b"from worker 1")
        got = yield self.data_indication(a)
        self.assertEqual(got, (tuple(b_relayed), b"from worker 1"))
        # A channel to the other worker's allocation too.
        response = yield a.request(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4001), (stun.XOR_PEER_ADDRESS, b_relayed)])
        self.assertEqual(response.msg_class, stun.SUCCESS, response.get(stun.ERROR_CODE))
        a.send(b"\x40\x01\x00\x07channel")
        got = yield self.data_indication(b)
        self.assertEqual(got, (tuple(a_relayed), b"channel"))
        # Loopback peers stay refused: only the relay's own allocations are reachable.
        response = yield a.request(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, ("127.0.0.2", 9))])
        self.assertEqual(error_code(response), 403)

    def test_hairpin_between_workers(self) -> Any:
        return self.hairpin("127.0.0.1")

    def test_hairpin_between_workers_behind_one_to_one_nat(self) -> Any:
        """The public address (TEST-NET-2) is not the host's: the workers
        reach each other's ports at the bound address."""
        return self.hairpin("198.51.100.7")

    @defer.inlineCallbacks
    def test_user_allocation_limit_holds_across_workers(self) -> Any:
        relay = self.start_relay(extra=["--user-allocation-limit=1"])
        for attempt in range(16):
            salt = "user%d" % attempt
            first, first_relayed = yield self.client(relay, salt=salt)
            second, second_relayed = yield self.client(relay, salt=salt)
            if relay.slot_of(first_relayed[1]) != relay.slot_of(second_relayed[1]):
                break
        else:
            self.fail("no two clients of one user in different workers")
        # The newest replaced the oldest, in the other worker.
        deadline = time.time() + 5
        while True:
            response = yield first.request(stun.REFRESH, [(stun.LIFETIME, 600)])
            if error_code(response) == 437 or time.time() > deadline:
                break
            yield sleep(0.1)
        self.assertEqual(error_code(response), 437, "the older allocation is gone")
        response = yield second.request(stun.REFRESH, [(stun.LIFETIME, 600)])
        self.assertEqual(response.msg_class, stun.SUCCESS)
        self.assertIn("replaced by port %d" % second_relayed[1], relay.log())

    @defer.inlineCallbacks
    def test_a_nonce_from_one_worker_is_valid_in_the_other(self) -> Any:
        relay = self.start_relay()
        clients = yield self.clients_in_both_slices(relay, count=8)
        a = next(c for c, r in clients if relay.slot_of(r[1]) == 0)
        b = next(c for c, r in clients if relay.slot_of(r[1]) == 1)
        # b's request signed with a's nonce: a nonce is bound to its
        # client's address, so b gets 438, never 401 (wrong key) ...
        b.nonce = a.nonce
        t = tid()
        response = yield b.send_raw_request(t, b.encode(stun.REFRESH, [(stun.LIFETIME, 600)], t, True))
        self.assertEqual(error_code(response), 438)
        # ... and a nonce issued to b's address by worker 1 checks out there.
        b.nonce = response.get_str(stun.NONCE)
        response = yield b.request(stun.REFRESH, [(stun.LIFETIME, 600)])
        self.assertEqual(response.msg_class, stun.SUCCESS)


class StreamTests(WorkersFixture, unittest.TestCase):
    @defer.inlineCallbacks
    def test_tcp_and_tls_clients_spread_over_the_workers(self) -> Any:
        from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        from tests.adapters.test_stream import StreamTurnClient
        from tests.certs import make_certificate

        cert, key = make_certificate(Path(self.mktemp()).resolve())
        tls_port = free_tcp_port()
        relay = self.start_relay(
            extra=["--tls-cert=%s" % cert, "--tls-key=%s" % key, "--tls-port=%d" % tls_port], size=400
        )
        peer, peer_addr = self.peer()
        trust = Certificate.loadPEM(cert.read_bytes())
        for tls in (False, True):
            slots = set()
            for i in range(12):
                client = StreamTurnClient()
                if tls:
                    endpoint: Any = SSL4ClientEndpoint(
                        reactor, "127.0.0.1", tls_port, optionsForClientTLS("localhost", trustRoot=trust)
                    )
                else:
                    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay.listen_port)
                yield connectProtocol(endpoint, client)
                self.addCleanup(lambda c=client: c.transport.abortConnection() if c.connected else None)
                _, final = yield client.allocate(SECRET, self.expiry(), salt="s%d%d" % (tls, i))
                self.assertEqual(final.msg_class, stun.SUCCESS, final.get(stun.ERROR_CODE))
                relayed = final.get_address(stun.XOR_RELAYED_ADDRESS)
                slots.add(relay.slot_of(relayed[1]))
                yield self.permit(client, peer_addr)
                yield self.relays_both_ways(client, relayed, peer, peer_addr, b"%s%d" % (b"tls" if tls else b"tcp", i))
            self.assertEqual(slots, {0, 1}, "both workers accept %s connections" % ("TLS" if tls else "TCP"))
        yield self.wait_for_async(
            lambda: has_metric(relay.metrics(), "relay_active_allocations_by_transport", 12, transport="tls"),
            what="TLS allocations summed",
        )
        text = relay.metrics()
        self.assertEqual(metric(text, "relay_active_allocations_by_transport", transport="tcp"), 12)
        self.assertEqual(metric(text, "relay_stream_connections_accepted_total", transport="tcp"), 12)


class FaultTests(WorkersFixture, unittest.TestCase):
    def faulty(self, fault: str, **kwargs: Any) -> Relay:
        return self.start_relay(
            env={"FIREZONE_RELAY_WORKER_MODULE": "tests.workerfaults", "FAULT": fault}, wait_ready=False, **kwargs
        )

    def assert_supervisor_up_not_ready(self, relay: Relay) -> None:
        self.assertIsNone(relay.proc.poll(), relay.log())
        self.assertEqual(http_get(relay.http_port, "/healthz")[0], 200)
        status, body = http_get(relay.http_port, "/readyz")
        self.assertEqual(status, 503, body)

    def test_a_worker_exiting_at_start_is_restarted_with_backoff(self) -> None:
        relay = self.faulty("exit")
        self.wait_for(lambda: len(re.findall(r"worker 1 \(pid \d+\) exited with status 3 before it was ready", relay.log())) >= 4,
                      timeout=40, what="four failed starts")
        delays = [float(d) for d in re.findall(r"worker 1 \(pid \d+\) exited with status 3 before it was ready; restarting it in (\S+) s", relay.log())]
        self.assertEqual(delays[:4], [0.5, 1.0, 2.0, 4.0])
        self.assertIn("(4 failure(s) in a row", relay.log())
        self.assert_supervisor_up_not_ready(relay)
        self.assertEqual(relay.ready_pids().keys(), {0}, "worker 0 serves meanwhile")
        text = relay.metrics()
        self.assertGreaterEqual(metric(text, "relay_worker_restarts_total"), 4)
        self.assertEqual(metric(text, "relay_workers"), 1)
        self.assertEqual(metric(text, "relay_ready"), 0)

    def test_a_worker_that_never_becomes_ready_is_killed_and_restarted(self) -> None:
        relay = self.faulty("stuck")
        self.wait_for(lambda: relay.ready_pids().keys() == {0}, timeout=20, what="worker 0 ready")
        self.assert_supervisor_up_not_ready(relay)
        self.wait_for(lambda: "did not become ready within 20 s; killing it" in relay.log(), timeout=40, what="ready timeout")
        self.wait_for(lambda: "was killed by SIGKILL before it was ready; restarting it in 0.5 s" in relay.log(),
                      timeout=5, what="restart")
        self.assert_supervisor_up_not_ready(relay)

    def test_a_stuck_worker_is_killed_and_restarted(self) -> None:
        relay = self.faulty("hang")
        self.wait_for(lambda: relay.ready_pids().keys() == {0, 1}, timeout=40, what="both workers ready")
        stuck = relay.ready_pids()[1]
        self.wait_for(lambda: "worker 1 (pid %d) has not answered the supervisor for 30 s; killing it" % stuck in relay.log(),
                      timeout=50, what="the stuck worker noticed")
        self.wait_for(lambda: "worker 1 (pid %d) was killed by SIGKILL; restarting it in 0.5 s" % stuck in relay.log(),
                      timeout=10, what="its restart")
        self.assertIsNone(relay.proc.poll())
        self.assertFalse(alive(stuck))

    def test_a_worker_flooding_the_control_channel_is_read_no_faster_than_the_budget(self) -> None:
        relay = self.faulty("flood")
        self.wait_for(lambda: relay.ready_pids().keys() == {0, 1}, timeout=30, what="both workers ready")
        self.wait_for(lambda: "worker 1 floods the control channel" in relay.log(), timeout=20, what="flood noticed")
        # The supervisor stays responsive meanwhile: health, metrics, the other worker.
        for _ in range(5):
            started = time.monotonic()
            self.assertEqual(http_get(relay.http_port, "/healthz")[0], 200)
            self.assertLess(time.monotonic() - started, 2.0)
        self.assertGreater(metric(relay.metrics(), "relay_worker_control_throttled_total"), 0)
        self.assertIsNone(relay.proc.poll())
        self.assertEqual(relay.log().count("worker 1 floods the control channel"), 1, "logged at most once a minute")


class PoolBookkeepingTests(unittest.SynchronousTestCase):
    """The supervisor's own tables, without processes: the user limit across
    slots and the XDP bindings it writes for the workers."""

    class Maps:
        def __init__(self) -> None:
            self.bound: List[Any] = []
            self.unbound: List[Any] = []

        def channel_bound(self, command: Any) -> None:
            self.bound.append(command)

        def channel_unbound(self, command: Any) -> None:
            self.unbound.append(command)

    def pool(self, limit: int = 1) -> Any:
        from firezone_relay.workers.pool import WorkerPool

        options = tap.Options(environ={})
        options.parseOptions([
            "--auth-secret", SECRET, "--workers", "2", "--public-ip4-addr", "127.0.0.1",
            "--lowest-port", "40000", "--highest-port", "40099", "--control-endpoint", "off",
            "--user-allocation-limit", str(limit), "--max-channels-per-allocation", "2",
        ])
        maps = self.Maps()
        return WorkerPool(options, SECRET, reactor, fast_path=maps), maps

    @staticmethod
    def channel(port: int, number: int = 0x4000) -> Dict[str, Any]:
        return {"client_ip": "10.0.0.1", "client_port": 1000 + port, "channel": number,
                "peer_ip": "10.0.0.2", "peer_port": 2, "port": port, "family": 4}

    def test_user_limit_channels_and_a_dead_worker(self) -> None:
        pool, maps = self.pool()
        first, second = pool.slots
        pool.allocation_created(first, 40001, "u")
        pool.channel_changed(first, True, self.channel(40001))
        pool.channel_changed(first, True, self.channel(40001, 0x4001))
        pool.channel_changed(first, True, self.channel(40001, 0x4002))  # past the per-allocation cap
        pool.channel_changed(first, True, self.channel(40002))  # no such allocation
        self.assertEqual([c.channel for c in maps.bound], [0x4000, 0x4001])
        self.assertEqual(pool.allocation_count, 1)
        # The same user in the other worker: the older allocation is the one to go.
        pool.allocation_created(second, 40070, "u")
        self.assertEqual((first.ports, second.ports), ({}, {40070: "u"}))
        self.assertEqual(pool.allocation_count, 1)
        # Its worker deletes it (Evict): the unbind notices still reach the maps.
        pool.channel_changed(first, False, self.channel(40001))
        self.assertEqual([c.channel for c in maps.unbound], [0x4000])
        pool.allocation_created(second, 40071, "v")
        pool.channel_changed(second, True, self.channel(40071))
        # A worker dies: what it had bound leaves the maps.
        pool._unbind_all(first)
        pool._unbind_all(second)
        self.assertEqual(sorted((c.port, c.channel) for c in maps.unbound),
                         [(40001, 0x4000), (40001, 0x4001), (40071, 0x4000)])
        self.assertEqual((first.channels, second.channels), ({}, {}))

    def test_the_user_limit_evicts_the_oldest_left_after_removals_anywhere(self) -> None:
        # Oldest first across both slots, whatever was removed in between
        # (also from the middle of a user's allocations).
        pool, _ = self.pool(limit=3)
        first, second = pool.slots
        pool.allocation_created(first, 40001, "u")
        pool.allocation_created(second, 40051, "u")
        pool.allocation_created(first, 40002, "u")
        pool.allocation_created(first, 40003, "other")
        pool.allocation_removed(second, 40051)
        pool.allocation_created(second, 40052, "u")
        self.assertEqual((first.ports, second.ports), ({40001: "u", 40002: "u", 40003: "other"}, {40052: "u"}))
        pool.allocation_created(second, 40053, "u")  # the fourth: 40001 goes
        pool.allocation_created(first, 40004, "u")  # then 40002
        self.assertEqual((first.ports, second.ports), ({40003: "other", 40004: "u"}, {40052: "u", 40053: "u"}))
        for slot, port in ((second, 40052), (second, 40053), (first, 40004), (first, 40003)):
            pool.allocation_removed(slot, port)
        self.assertEqual((pool.allocation_count, pool._by_user), (0, {}))
        pool.allocation_removed(first, 40004)  # twice (an Evict's own notice): nothing happens
        self.assertEqual(pool.allocation_count, 0)

    def test_notices_from_a_worker_reach_the_maps_through_the_control_channel(self) -> None:
        """A worker's allocation and channel notices, as it writes them, read
        by the supervisor's end of the channel."""
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from firezone_relay.core import commands as C
        from firezone_relay.workers.control import SupervisorControl
        from firezone_relay.workers.worker import WorkerControl

        pool, maps = self.pool()
        worker, sent = WorkerControl(0, Clock()), StringTransport()
        worker.makeConnection(sent)
        supervisor = SupervisorControl(pool, pool.slots[0])
        supervisor.makeConnection(StringTransport())
        client, peer = ("192.0.2.1", 5000), ("198.51.100.1", 9)
        worker.allocation_event(C.AllocationCreated(client, "alice", 40001, (), 600))
        worker.channel_bound(C.ChannelBound(client, 0x4000, peer, 40001, 4))
        worker.channel_bound(C.ChannelBound(client, 0x4001, peer, 40001, 4))
        worker.channel_unbound(C.ChannelUnbound(client, 0x4000, peer, 40001, 4))
        supervisor.dataReceived(sent.value())
        self.assertEqual(pool.slots[0].ports, {40001: "alice"})
        self.assertEqual(maps.bound, [C.ChannelBound(client, 0x4000, peer, 40001, 4), C.ChannelBound(client, 0x4001, peer, 40001, 4)])
        self.assertEqual(maps.unbound, [C.ChannelUnbound(client, 0x4000, peer, 40001, 4)])
        self.assertEqual(pool.slots[0].channels, {40001: {(client, 0x4001, peer, 40001, 4)}})

    def test_an_allocation_outside_the_slice_is_refused(self) -> None:
        pool, _ = self.pool()
        pool.allocation_created(pool.slots[0], 40099, "u")  # slot 1's port
        self.assertEqual(pool.allocation_count, 0)


class NoticeBatchTests(unittest.SynchronousTestCase):
    """A worker's allocation notices of one reactor turn leave in one
    ``AllocationNotices`` box, in order; a channel notice sends them first."""

    def _control(self) -> Tuple[Any, Any, Any]:
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from firezone_relay.workers.worker import WorkerControl

        clock = Clock()
        control = WorkerControl(0, clock)
        transport = StringTransport()
        control.makeConnection(transport)
        return control, clock, transport

    @staticmethod
    def _boxes(raw: bytes) -> List[Dict[bytes, bytes]]:
        from twisted.protocols import amp

        boxes: List[Dict[bytes, bytes]] = []
        parser = amp.BinaryBoxProtocol(None)  # type: ignore[arg-type]
        parser.boxReceiver = type("R", (), {"ampBoxReceived": lambda self, box: boxes.append(dict(box)),
                                            "startReceivingBoxes": lambda self, sender: None,
                                            "stopReceivingBoxes": lambda self, reason: None})()
        parser._locked = False
        parser.dataReceived(raw)
        return boxes

    def test_one_box_per_turn_in_order(self) -> None:
        from firezone_relay.core import commands as C
        from firezone_relay.workers import protocol as P

        control, clock, transport = self._control()
        client = ("192.0.2.1", 5000)
        control.allocation_event(C.AllocationCreated(client, "alice", 40001, (), 600))
        control.allocation_event(C.AllocationCreated(client, "bob", 40002, (), 600))
        control.allocation_event(C.AllocationDeleted(client, "alice", 40001, "refresh"))
        self.assertEqual(transport.value(), b"")  # nothing before the turn ends
        clock.advance(0)
        boxes = self._boxes(transport.value())
        self.assertEqual([b[b"_command"] for b in boxes], [b"AllocationNotices"])
        notices = P.AllocationNotices.parseArguments(boxes[0], None)["notices"]
        self.assertEqual(notices, [{"port": 40001, "user": "alice"}, {"port": 40002, "user": "bob"}, {"port": 40001, "user": None}])
        clock.advance(0)
        self.assertEqual(len(self._boxes(transport.value())), 1)  # nothing more was sent

    def test_a_channel_notice_sends_the_pending_allocations_first(self) -> None:
        from firezone_relay.core import commands as C

        control, clock, transport = self._control()
        client = ("192.0.2.1", 5000)
        control.allocation_event(C.AllocationCreated(client, "alice", 40001, (), 600))
        control.channel_bound(C.ChannelBound(client, 0x4000, ("198.51.100.1", 9), 40001, 4))
        self.assertEqual([b[b"_command"] for b in self._boxes(transport.value())], [b"AllocationNotices", b"ChannelChanged"])
        clock.advance(0)
        self.assertEqual(len(self._boxes(transport.value())), 2)

    def test_a_turn_too_large_for_one_box_is_several_in_order(self) -> None:
        # Thousands of allocations ending in one turn (a common expiry) do not
        # fit in one AMP value (65535 bytes): several boxes, none refused.
        from firezone_relay.core import commands as C
        from firezone_relay.workers import protocol as P

        control, clock, transport = self._control()
        client = ("192.0.2.1", 5000)
        expected: List[Dict[str, Any]] = []
        for port in range(20000, 26000):
            user = "user-%d-\u00e9\"\n" % port + "x" * 40
            control.allocation_event(C.AllocationCreated(client, user, port, (), 600))
            expected.append({"port": port, "user": user})
        for port in range(20000, 26000):
            control.allocation_event(C.AllocationDeleted(client, "u", port, "expired"))
            expected.append({"port": port, "user": None})
        clock.advance(0)
        boxes = self._boxes(transport.value())
        self.assertGreater(len(boxes), 1)
        self.assertEqual({b[b"_command"] for b in boxes}, {b"AllocationNotices"})
        self.assertTrue(all(len(b[b"notices"]) <= P.PAGE for b in boxes))
        got = [n for b in boxes for n in P.AllocationNotices.parseArguments(b, None)["notices"]]
        self.assertEqual(got, expected)

    def test_notices_round_trip_any_username_and_refuse_bad_values(self) -> None:
        from firezone_relay.workers import protocol as P

        arg = P.Notices()
        users = ["alice", "\u00e9t\u00e9", "a\"b\\c\n\t", "\udcff lone surrogate", "\U0001f600", ""]
        notices = [{"port": 1000 + i, "user": u} for i, u in enumerate(users)] + [{"port": 7, "user": None}]
        self.assertEqual(arg.fromString(arg.toString(notices)), notices)
        self.assertEqual(arg.fromString(P.encode_notices([[1000, "alice"], [7]])[0]), [notices[0], notices[-1]])
        for bad in (b'{"port": 1}', b"[1]", b"[[]]", b'[["1"]]', b"[[true]]", b"[[1, 2]]", b'[[1, "u", 3]]', b"[[1.5]]", b"nope"):
            with self.assertRaises(ValueError, msg=bad):
                arg.fromString(bad)

def socket_of(pid: int, port: int) -> socket.socket:
    """A duplicate of the UDP socket process ``pid`` has bound to ``port``
    (``pidfd_getfd``, Linux 5.6; the process is our descendant)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir("/proc/%d/fd" % pid):
            try:
                if not os.readlink("/proc/%d/fd/%s" % (pid, name)).startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(438, pidfd, int(name), 0)  # SYS_pidfd_getfd
            if fd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd: %s" % os.strerror(ctypes.get_errno()))
            sock = socket.socket(fileno=fd)
            if sock.type == socket.SOCK_DGRAM and sock.getsockname()[1] == port:
                return sock
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError("process %d has no UDP socket on port %d" % (pid, port))


class SocketBufferTests(WorkersFixture, unittest.TestCase):
    """``--socket-buffer`` sizes every worker's allocation sockets, as the
    single process's (they had the OS default)."""

    @defer.inlineCallbacks
    def test_every_workers_allocation_sockets_get_the_socket_buffer(self) -> Any:
        asked = 65536
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            default = (probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                probe.setsockopt(socket.SOL_SOCKET, opt, asked)
            # What the kernel makes of it (it doubles the value): not its default.
            expected = (probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        self.assertNotEqual(expected, default)
        relay = self.start_relay(extra=["--socket-buffer=%d" % asked])
        clients = yield self.clients_in_both_slices(relay, count=6)
        pids = relay.ready_pids()
        for _client, relayed in clients:
            try:
                sock = socket_of(pids[relay.slot_of(relayed[1])], relayed[1])
            except OSError as exc:
                unavailable(self, "cannot read another process's socket here (%s)" % exc)
            with sock:
                self.assertEqual(
                    (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)),
                    expected, "allocation port %d" % relayed[1],
                )
