"""Flood test: a real relay keeps one honest allocation whole under hostile traffic.

200,000 hostile datagrams from 50 sockets (garbage, unauthenticated and
forged-nonce Allocates, ChannelData on unbound channels, Send indications to
unpermitted peers) arrive over about 25 s while one client relays ChannelData
through its allocation to an echo peer and back.  Every honest packet must
come back, the relay's RSS must grow by less than 50 MB, and its log must hold
no traceback.  Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
import unittest
from typing import Any, NamedTuple, Optional

from firezone_relay.core import stun
from firezone_relay.core.auth import REALM, make_credentials

from ..helpers import free_udp_port, kill_if_running, port_range
from ..test_tap import TWISTD, binding_roundtrip, twistd_env

SECRET = "5a" * 32
HOSTILE_TOTAL = 200_000
HOSTILE_SOCKETS = 50
DURATION = 25.0
HONEST_INTERVAL = 0.01


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HonestClient:
    """A blocking TURN client with one channel to an echo peer."""

    def __init__(self, server: tuple[str, int], credentials: tuple[str, str]) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.username, self.password = credentials
        self.key = stun.long_term_key(self.username, REALM, self.password)
        self.nonce = ""

    def request(self, method: int, attributes: list[stun.Attribute]) -> stun.Message:
        for _ in range(3):
            tid = os.urandom(12)
            attrs = list(attributes)
            key: Optional[bytes] = None
            if self.nonce:
                attrs += [(stun.USERNAME, self.username), (stun.REALM, REALM), (stun.NONCE, self.nonce)]
                key = self.key
            self.sock.sendto(stun.encode(method, stun.REQUEST, tid, attrs, integrity_key=key), self.server)
            deadline = time.time() + 3
            while time.time() < deadline:
                ready, _, _ = select.select([self.sock], [], [], 0.2)
                if not ready:
                    continue
                data, _ = self.sock.recvfrom(65535)
                if data[:1] >= b"\x40":
                    continue
                message = stun.decode(data)
                if message.transaction_id != tid:
                    continue
                code = message.get(stun.ERROR_CODE)
                if isinstance(code, tuple) and code[0] in (401, 438):
                    self.nonce = message.get_str(stun.NONCE) or ""
                    break
                return message
        raise AssertionError("no answer to method 0x%x" % method)


class FloodResult(NamedTuple):
    hostile: int
    elapsed: float
    cpu_seconds: float
    honest_sent: int
    peer_got: int
    honest_back: int
    rss_growth_mib: float


def run_flood(server: tuple[str, int], pid: int, credentials: tuple[str, str], hostile_total: int = HOSTILE_TOTAL, duration: float = DURATION) -> FloodResult:
    """Flood ``server`` (a relay process ``pid``) while one honest client relays."""
    cleanups: list[Any] = []
    try:
        return _flood(server, pid, credentials, hostile_total, duration, cleanups)
    finally:
        for close in cleanups:
            close()


def _flood(server: tuple[str, int], pid: int, credentials: tuple[str, str], hostile_total: int, duration: float, cleanups: list[Any]) -> FloodResult:
    proc_pid = pid
    client = HonestClient(server, credentials)
    cleanups.append(client.sock.close)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cleanups.append(peer.close)
    peer.bind(("127.0.0.1", 0))
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    allocated = client.request(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
    assert allocated.msg_class == stun.SUCCESS, allocated
    bound = client.request(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4001), (stun.XOR_PEER_ADDRESS, peer.getsockname())])
    assert bound.msg_class == stun.SUCCESS, bound
    rss_before = rss_kib(proc_pid)
    cpu_before = cpu_seconds(proc_pid)

    hostile = []
    for i in range(HOSTILE_SOCKETS):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.1.%d" % (i + 1), 0))
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        cleanups.append(s.close)
        hostile.append(s)
    forged_user, _ = make_credentials("%064x" % 1, int(time.time()) + 3600, "mallory")
    payloads = [
        os.urandom(1),
        os.urandom(37),
        b"\x00\x01\x00\x00" + os.urandom(16),
        stun.encode(stun.ALLOCATE, stun.REQUEST, os.urandom(12), [(stun.REQUESTED_TRANSPORT, 17)]),
        stun.encode(
            stun.ALLOCATE, stun.REQUEST, os.urandom(12),
            [(stun.REQUESTED_TRANSPORT, 17), (stun.USERNAME, forged_user), (stun.REALM, REALM), (stun.NONCE, "obMatJos2gAAA1.forged")],
            integrity_key=b"guess",
        ),
        stun.encode_channel_data(0x4001, os.urandom(100)),
        stun.encode(stun.SEND, stun.INDICATION, os.urandom(12), [(stun.XOR_PEER_ADDRESS, peer.getsockname()), (stun.DATA, b"x" * 64)]),
        os.urandom(1400),
    ]

    sent_hostile = 0
    counts = {"sent": 0, "peer": 0, "back": 0}

    def pump(timeout: float) -> None:
        """Echo at the peer, count what returns to the honest client."""
        ready, _, _ = select.select([peer, client.sock], [], [], timeout)
        if peer in ready:
            data, source = peer.recvfrom(65535)
            counts["peer"] += 1
            peer.sendto(data, source)
        if client.sock in ready:
            data, _ = client.sock.recvfrom(65535)
            if data[:2] == b"\x40\x01":
                counts["back"] += 1

    start = time.time()
    next_honest = start
    per_tick = max(1, int(hostile_total / (duration / 0.005)))
    while (sent_hostile < hostile_total or counts["sent"] < 100) and time.time() - start < duration + 15:
        now = time.time()
        if sent_hostile < hostile_total and now - start >= sent_hostile / hostile_total * duration:
            for _ in range(per_tick):
                try:
                    hostile[sent_hostile % HOSTILE_SOCKETS].sendto(payloads[sent_hostile % len(payloads)], server)
                except BlockingIOError:
                    pass
                sent_hostile += 1
        if now >= next_honest and now - start < duration:
            client.sock.sendto(stun.encode_channel_data(0x4001, b"honest %08d" % counts["sent"]), server)
            counts["sent"] += 1
            next_honest += HONEST_INTERVAL
        pump(0.002)
        for s in hostile:  # drain their replies so nothing backs up on our side
            try:
                while True:
                    s.recv(65535)
            except BlockingIOError:
                pass
    deadline = time.time() + 5
    while counts["back"] < counts["sent"] and time.time() < deadline:
        pump(0.05)
    honest_sent, peer_got, honest_back = counts["sent"], counts["peer"], counts["back"]
    released = client.request(stun.REFRESH, [(stun.LIFETIME, 0)])  # so a drain on SIGTERM ends at once
    assert released.msg_class == stun.SUCCESS, released
    elapsed = time.time() - start
    cpu_used = cpu_seconds(proc_pid) - cpu_before
    rss_growth_mib = (rss_kib(proc_pid) - rss_before) / 1024
    print(
        "\nflood: %d hostile datagrams in %.1f s (%.0f/s offered); relay CPU %.1f s = %.1f us per datagram "
        "(~%.0f hostile datagrams per CPU-second); honest %d sent, %d at peer, %d back; RSS +%.1f MiB"
        % (sent_hostile, elapsed, sent_hostile / elapsed, cpu_used, cpu_used / sent_hostile * 1e6,
           sent_hostile / max(cpu_used, 1e-9), honest_sent, peer_got, honest_back, rss_growth_mib)
    )
    return FloodResult(sent_hostile, elapsed, cpu_used, honest_sent, peer_got, honest_back, rss_growth_mib)


class FloodTests(unittest.TestCase):
    def test_honest_allocation_survives_a_flood(self) -> None:
        listen_port = free_udp_port((4,))
        low, high = port_range(64, avoid=[listen_port])
        cwd = os.path.join(os.getcwd(), "flood-%d" % os.getpid())
        os.makedirs(cwd, exist_ok=True)
        log_path = os.path.join(cwd, "relay.log")
        log = open(log_path, "w")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            TWISTD
            + ["-n", "--pidfile=", "firezone-relay", "--listen-port=%d" % listen_port, "--lowest-port=%d" % low,
               "--highest-port=%d" % high, "--public-ip4-addr=127.0.0.1", "--bind-ip4-addr=127.0.0.1",
               "--allow-loopback-peers", "--auth-secret=%s" % SECRET, "--health-check-addr=127.0.0.1:0"],
            cwd=cwd, env=twistd_env(), stdout=log, stderr=subprocess.STDOUT,
        )

        self.addCleanup(kill_if_running, proc)
        server = ("127.0.0.1", listen_port)
        self.assertIsNotNone(binding_roundtrip(listen_port, time.time() + 20), "relay did not start")

        result = run_flood(server, proc.pid, make_credentials(SECRET, int(time.time()) + 3600, "honest"))
        sent_hostile, elapsed, cpu_used, honest_sent, peer_got, honest_back, rss_growth_mib = result
        self.assertEqual(sent_hostile, HOSTILE_TOTAL)
        self.assertGreaterEqual(honest_sent, 1000)
        self.assertEqual(peer_got, honest_sent)
        self.assertEqual(honest_back, honest_sent)
        self.assertLess(rss_growth_mib, 50)
        self.assertIsNotNone(binding_roundtrip(listen_port, time.time() + 5), "relay stopped answering")
        # The honest allocation was released, so the drain that SIGTERM starts ends at once.
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=20), 0)
        with open(log_path) as f:
            output = f.read()
        self.assertNotIn("Traceback", output)
