"""Firezone client behaviour against a real ``twistd firezone-relay`` over real UDP (issue 15).

* Credential rotation: the exact snownet sequence after a network reset
  (Allocate with key A; Allocate with key B from the same socket → 437;
  Refresh LIFETIME=0 with B → success signed with B; Allocate with B).
* Keep-alives: 400 allocations behind one address (127.0.0.1, one socket
  each) send their Binding keep-alives in bursts well above the reflection
  guard's rate; every one is answered, while sources on the same address
  without an allocation, interleaved with them, are still limited.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional, Sequence, Tuple

from twisted.trial import unittest

from firezone_relay.core import stun
from firezone_relay.core.auth import REALM, make_credentials
from tests.helpers import free_udp_port, port_range, tid
from tests.test_tap import TWISTD, binding_roundtrip, twistd_env

SECRET = "5d0c6f1e2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5"
SNOWNET: List[stun.Attribute] = [
    (stun.REQUESTED_TRANSPORT, 17),
    (stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6),
    (stun.SOFTWARE, "snownet"),
]


class RelayProcess:
    """A standalone relay subprocess on loopback with a known secret."""

    def __init__(self, test: unittest.TestCase, ports: int, extra: Sequence[str] = ()) -> None:
        for _ in range(3):
            self.listen_port = free_udp_port((4,))
            low, high = port_range(ports, avoid=[self.listen_port])
            cwd = test.mktemp()
            os.makedirs(cwd)
            # Into a file, never a pipe nobody reads: a line per allocation
            # would fill a pipe and block the relay.
            self.log_path = os.path.join(cwd, "relay.log")
            log_file = open(self.log_path, "w")
            test.addCleanup(log_file.close)
            self.proc = subprocess.Popen(
                TWISTD
                + [
                    "-n",
                    "--pidfile=",
                    "firezone-relay",
                    "--listen-port=%d" % self.listen_port,
                    "--lowest-port=%d" % low,
                    "--highest-port=%d" % high,
                    "--public-ip4-addr=127.0.0.1",
                    "--bind-ip4-addr=127.0.0.1",
                    "--health-check-addr=127.0.0.1:0",
                    "--auth-secret=" + SECRET,
                    "--max-connections=0",
                ]
                + list(extra),
                cwd=cwd,
                env=twistd_env(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            test.addCleanup(self.kill)
            if binding_roundtrip(self.listen_port, time.time() + 20) is not None:
                return
            if self.proc.poll() is None:
                break
            # Exited before answering: most likely a parallel test took the port.
        raise AssertionError("the relay process did not answer a Binding")

    @property
    def server(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.listen_port)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()


class SyncClient:
    """A blocking STUN/TURN client on one UDP socket (one 5-tuple)."""

    def __init__(self, server: Tuple[str, int]) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.username = ""
        self.key = b""
        self.nonce: Optional[str] = None

    def close(self) -> None:
        self.sock.close()

    def use(self, salt: str, expiry: Optional[int] = None) -> None:
        username, password = make_credentials(SECRET, expiry or int(time.time()) + 3600, salt)
        self.username = username
        self.key = stun.long_term_key(username, REALM, password)

    def encode(self, method: int, attributes: Sequence[stun.Attribute], t: bytes, signed: bool) -> bytes:
        if not signed:
            return stun.encode(method, stun.REQUEST, t, list(attributes))
        assert self.nonce is not None
        attrs = list(attributes) + [(stun.USERNAME, self.username), (stun.REALM, REALM), (stun.NONCE, self.nonce)]
        return stun.encode(method, stun.REQUEST, t, attrs, integrity_key=self.key)

    def receive(self, t: bytes, timeout: float) -> Optional[stun.Message]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not readable([self.sock], left):
                return None
            data = self.sock.recv(65535)
            message = stun.decode(data)
            if message.transaction_id == t:
                return message

    def request(self, method: int, attributes: Sequence[stun.Attribute], signed: bool = True) -> stun.Message:
        """Send (retransmitting the same transaction on loss) and return the reply."""
        t = tid()
        data = self.encode(method, attributes, t, signed)
        for _ in range(10):
            self.sock.sendto(data, self.server)
            reply = self.receive(t, 0.5)
            if reply is not None:
                return reply
        raise AssertionError("no reply to method %#x" % method)


def readable(socks: Sequence[socket.socket], timeout: float) -> List[socket.socket]:
    """The sockets with a datagram waiting (poll, not select: descriptors may pass 1024)."""
    poller = select.poll()
    by_fd = {}
    for s in socks:
        poller.register(s.fileno(), select.POLLIN)
        by_fd[s.fileno()] = s
    return [by_fd[fd] for fd, _ in poller.poll(max(0.0, timeout) * 1000)]


def code(message: stun.Message) -> Optional[int]:
    value = message.get(stun.ERROR_CODE)
    return value[0] if isinstance(value, tuple) else None


class CredentialRotationProcessTests(unittest.TestCase):
    timeout = 60

    def test_snownet_network_reset_sequence_over_udp(self) -> None:
        relay = RelayProcess(self, 32)
        client = SyncClient(relay.server)
        self.addCleanup(client.close)

        client.use("pubkeyA-salt")
        challenge = client.request(stun.ALLOCATE, SNOWNET, signed=False)
        self.assertEqual(code(challenge), 401)
        client.nonce = challenge.get_str(stun.NONCE)
        first = client.request(stun.ALLOCATE, SNOWNET)
        self.assertEqual(first.msg_class, stun.SUCCESS, first)
        key_a = client.key

        # Network reset: the portal hands out new credentials; same socket.
        client.use("pubkeyB-salt")
        mismatch = client.request(stun.ALLOCATE, SNOWNET)
        self.assertEqual(code(mismatch), 437)
        self.assertTrue(stun.check_integrity(mismatch, client.key))

        deleted = client.request(stun.REFRESH, SNOWNET + [(stun.LIFETIME, 0)])
        self.assertEqual((deleted.msg_class, code(deleted)), (stun.SUCCESS, None), deleted)
        self.assertEqual(deleted.get(stun.LIFETIME), 0)
        self.assertTrue(stun.check_integrity(deleted, client.key))
        self.assertFalse(stun.check_integrity(deleted, key_a))

        again = client.request(stun.ALLOCATE, SNOWNET)
        self.assertEqual(again.msg_class, stun.SUCCESS, again)
        self.assertTrue(stun.check_integrity(again, client.key))
        self.assertIsNotNone(again.get_address(stun.XOR_RELAYED_ADDRESS))

        # Another username may not refresh or bind on it: 441, signed with its key.
        client.use("someone-else")
        refused = client.request(stun.REFRESH, SNOWNET + [(stun.LIFETIME, 600)])
        self.assertEqual(code(refused), 441)
        self.assertTrue(stun.check_integrity(refused, client.key))
        self.assertIsNone(relay.proc.poll())


class KeepaliveProcessTests(unittest.TestCase):
    """400 allocations behind 127.0.0.1 with the default guard (100/s, burst 200)."""

    timeout = 180
    CLIENTS = 400
    RATE, BURST = 100.0, 200

    def open_sockets(self, n: int) -> List[socket.socket]:
        socks = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(s.close)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
        return socks

    @staticmethod
    def collect(socks: Dict[int, socket.socket], expected: Dict[int, bytes], replies: Dict[int, stun.Message], timeout: float) -> float:
        """Read replies whose transaction id is in ``expected`` (keyed by fileno)
        until all came or ``timeout`` passes; return the time of the last one."""
        last = time.monotonic()
        deadline = time.monotonic() + timeout
        while any(fd not in replies for fd in expected):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for s in readable(list(socks.values()), min(left, 0.05)):
                try:
                    data = s.recv(65535)
                except BlockingIOError:
                    continue
                message = stun.decode(data)
                if expected.get(s.fileno()) == message.transaction_id:
                    replies[s.fileno()] = message
                    last = time.monotonic()
        return last

    def allocate_all(self, server: Tuple[str, int], socks: List[socket.socket]) -> None:
        """Allocate on every socket, pacing the 401 challenges (they are
        charged to 127.0.0.1) under the guard's rate."""
        by_fd = {s.fileno(): s for s in socks}
        keys: Dict[int, Tuple[str, bytes]] = {}
        for i, s in enumerate(socks):
            username, password = make_credentials(SECRET, int(time.time()) + 3600, "device-%04d" % i)
            keys[s.fileno()] = (username, stun.long_term_key(username, REALM, password))
        nonces: Dict[int, str] = {}
        deadline = time.monotonic() + 90
        while len(nonces) < len(socks) and time.monotonic() < deadline:
            chunk = [s for s in socks if s.fileno() not in nonces][:40]
            expected = {}
            for s in chunk:
                t = tid()
                expected[s.fileno()] = t
                s.sendto(stun.encode(stun.ALLOCATE, stun.REQUEST, t, list(SNOWNET)), server)
            replies: Dict[int, stun.Message] = {}
            self.collect({s.fileno(): s for s in chunk}, expected, replies, 0.5)
            for fd, reply in replies.items():
                nonce = reply.get_str(stun.NONCE)
                if code(reply) == 401 and nonce:
                    nonces[fd] = nonce
            time.sleep(0.4)  # 40 challenges per ~0.5 s: under 100/s
        self.assertEqual(len(nonces), len(socks), "not every socket got its 401 challenge")
        done: Dict[int, stun.Message] = {}
        tids = {fd: tid() for fd in by_fd}
        while len(done) < len(socks) and time.monotonic() < deadline:
            chunk = [s for s in socks if s.fileno() not in done][:100]
            expected = {}
            for s in chunk:
                fd = s.fileno()
                username, key = keys[fd]
                attrs = SNOWNET + [(stun.USERNAME, username), (stun.REALM, REALM), (stun.NONCE, nonces[fd])]
                expected[fd] = tids[fd]  # a retransmission keeps its transaction id
                s.sendto(stun.encode(stun.ALLOCATE, stun.REQUEST, tids[fd], attrs, integrity_key=key), server)
            self.collect({s.fileno(): s for s in chunk}, expected, done, 2.0)
            for fd in [fd for fd in expected if fd in done and code(done[fd]) == 508]:
                # No free port: the window may overlap ports other processes
                # on this machine hold.  The relay skipped them; ask again.
                del done[fd]
                tids[fd] = tid()
        self.assertEqual(len(done), len(socks))
        failures = [(code(r), r.get(stun.ERROR_CODE)) for r in done.values() if r.msg_class != stun.SUCCESS]
        self.assertEqual(failures, [])

    def test_keepalives_behind_one_address_are_answered_and_strangers_limited(self) -> None:
        relay = RelayProcess(self, 4 * self.CLIENTS)
        server = relay.server
        holders = self.open_sockets(self.CLIENTS)
        self.allocate_all(server, holders)
        strangers = self.open_sockets(self.CLIENTS)
        time.sleep(self.BURST / self.RATE + 0.5)  # let the address's bucket refill

        for round_ in range(3):
            expected_h = {s.fileno(): tid() for s in holders}
            expected_s = {s.fileno(): tid() for s in strangers}
            everyone = {s.fileno(): s for s in holders + strangers}
            expected = {**expected_h, **expected_s}
            replies: Dict[int, stun.Message] = {}
            started = time.monotonic()
            # Interleaved, in batches so the relay's receive buffer never overflows.
            for start in range(0, self.CLIENTS, 50):
                for h, s in zip(holders[start : start + 50], strangers[start : start + 50]):
                    h.sendto(stun.encode(stun.BINDING, stun.REQUEST, expected_h[h.fileno()], [(stun.SOFTWARE, "snownet")]), server)
                    s.sendto(stun.encode(stun.BINDING, stun.REQUEST, expected_s[s.fileno()], []), server)
                self.collect(everyone, expected, replies, 0.01)
            last = self.collect(everyone, expected, replies, 3.0)
            answered_h = sum(1 for fd in expected_h if fd in replies)
            answered_s = sum(1 for fd in expected_s if fd in replies)
            # Every keep-alive of an allocation is answered, first time, no retry.
            self.assertEqual(answered_h, self.CLIENTS, "round %d" % round_)
            # The others on the same address got the burst plus the refill of
            # the time the relay could have spent on them, no more.
            bound = self.BURST + self.RATE * (last - started) + 1
            self.assertLessEqual(answered_s, bound, "round %d" % round_)
            self.assertLess(answered_s, self.CLIENTS, "round %d" % round_)
            self.assertGreater(answered_s, 0, "round %d" % round_)
            time.sleep(self.BURST / self.RATE + 0.5)
        self.assertIsNone(relay.proc.poll())
