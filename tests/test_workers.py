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
from tests.helpers import Collector, TurnClient, error_code, free_udp_port, listen, port_range, tid

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
SECRET = "workers-test-secret-0123456789abcdef"


def sleep(seconds: float) -> "defer.Deferred[None]":
    return deferLater(reactor, seconds, lambda: None)


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_and_tcp_port() -> int:
    for _ in range(100):
        port = free_udp_port((4,))
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


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
    ) -> Relay:
        listen_port = free_udp_and_tcp_port()
        low, high = port_range(size, avoid=[listen_port])
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
            "--auth-secret=%s" % SECRET,
        ] + (["--allow-loopback-peers"] if loopback_peers else []) + list(extra)
        proc = subprocess.Popen(args, cwd=cwd, env=twistd_env(**(env or {})), stdout=out, stderr=subprocess.STDOUT)
        relay = Relay(proc, log_path, listen_port, http_port, low, high, workers)

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            deadline = time.time() + 10  # the workers follow (closed pipe, PDEATHSIG)
            for pid in relay.started_pids():
                while alive(pid) and time.time() < deadline:
                    time.sleep(0.05)

        self.addCleanup(kill)
        if wait_ready:
            self.wait_ready(relay)
        return relay

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

    def expiry(self: Any) -> int:
        return int(time.time()) + 3600

    @defer.inlineCallbacks
    def client(self: Any, relay: Relay, salt: str = "testsalt") -> Any:
        """A UDP client with an allocation: ``(client, relayed address)``."""
        client = TurnClient(("127.0.0.1", relay.listen_port))
        port = listen(client)
        self.addCleanup(port.stopListening)
        _, final = yield client.allocate(SECRET, self.expiry(), salt=salt)
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
    def clients_in_both_slices(self: Any, relay: Relay, count: int = 12, salt: str = "testsalt") -> Any:
        """``count`` allocations from as many source ports; at least one in each worker's slice."""
        out = []
        for i in range(count):
            client, relayed = yield self.client(relay, salt="%s%d" % (salt, i))
            out.append((client, relayed))
        used = {relay.slot_of(relayed[1]) for _, relayed in out}
        self.assertEqual(used, set(range(len(relay.slices))), "every worker gets clients (kernel SO_REUSEPORT hashing)")
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
            lambda: metric(relay.metrics(), "relay_allocations_total") == len(clients), what="summed allocations"
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
        self.assertEqual(metric(text, "relay_ready"), 1)

    @defer.inlineCallbacks
    def test_a_killed_worker_is_restarted_and_the_other_never_stops(self) -> Any:
        relay = self.start_relay()
        clients = yield self.clients_in_both_slices(relay)
        peer, peer_addr = self.peer()
        for client, relayed in clients:
            yield self.permit(client, peer_addr)
        yield self.wait_for_async(
            lambda: metric(relay.metrics(), "relay_allocations_total") == len(clients), what="counters"
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
            lambda: metric(relay.metrics(), "relay_allocations_total") == len(clients) + 1, what="counters after restart"
        )
        after = relay.metrics()
        for name, labels in (
            ("relay_allocations_total", {}),
            ("relay_data_relayed_packets_total", {"direction": "peer_to_client", "datapath": "userspace"}),
            ("relay_responses_total", {"message_type": "allocate", "response_class": "success", "error_code": ""}),
        ):
            self.assertGreaterEqual(metric(after, name, **labels), metric(before, name, **labels), name)
        self.assertEqual(metric(after, "relay_worker_restarts_total"), 1)
        self.assertEqual(metric(after, "relay_workers"), 2)
