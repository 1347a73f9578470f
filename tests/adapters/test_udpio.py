"""The batched UDP I/O extension (firezone_relay/adapters/_udpio.c) on real sockets.

These read through ``IO.reader`` directly, with recording callables in
place of the core and the shell, so every branch of the contract in the C
file's header is driven by real datagrams on loopback.  The end-to-end tests in
test_udp.py run the relay on it as well (and on the pure-Python reader).
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import task
from twisted.trial import unittest

from firezone_relay.adapters import shell as udp
from firezone_relay.adapters.shell import Shell
from tests.adapters.test_udp import _FakeRelay
from tests.helpers import ipv6_available, unavailable

_udpio: Any = udp._udpio


def _socket(family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    s.setblocking(False)
    return s


class BuiltTests(unittest.TestCase):
    def test_extension_is_built_in_ci(self) -> None:
        """CI builds the extension (scripts/test.sh); elsewhere its absence only skips."""
        if _udpio is None:
            unavailable(self, "the _udpio extension is not built: %s" % udp.UDPIO_MISSING)
        self.assertEqual(_udpio.BATCH, 64)

    def test_service_uses_it_by_default_and_on_request_only(self) -> None:
        relay = _FakeRelay()
        if _udpio is None:
            self.assertRaises(RuntimeError, Shell, relay, batched_io=True, clock=task.Clock())
            raise unittest.SkipTest("the _udpio extension is not built")
        self.assertIsNotNone(Shell(relay, clock=task.Clock()).io)
        self.assertIsNotNone(Shell(relay, batched_io=True, clock=task.Clock()).io)
        self.assertIsNone(Shell(relay, batched_io=False, clock=task.Clock()).io)


class Harness:
    """An ``IO`` whose shell callables record what they are given."""

    def __init__(self, now: float = 1000.0) -> None:
        self.pumps = 0
        self.fallback: List[Any] = []
        self.send_errors: List[int] = []
        self.errors: List[Tuple[str, BaseException]] = []
        self.fds: Dict[int, Dict[int, int]] = {4: {}, 6: {}}
        self.io = _udpio.IO(
            lambda: now, self._pump, self.fds, self.fallback.append, self.send_errors.append,
            lambda where, exc: self.errors.append((where, exc)),
        )  # fmt: skip
        self.refused = 0

    def _pump(self) -> None:
        self.pumps += 1

    def _refused(self) -> None:
        self.refused += 1

    def read(self, sock: socket.socket, handler: Callable[..., Any], port: Optional[int] = None, family: int = 4,
             always_view: bool = False) -> int:  # fmt: skip
        """One read of ``sock`` by a Reader whose entry point is ``handler``."""
        return int(self.io.reader(sock.fileno(), _Entry(handler), "handler", port, family, always_view, self._refused)())


class _Entry:
    """A Reader's owner with the entry point ``handler`` and no read listener."""

    read_listener = None

    def __init__(self, handler: Callable[..., Any]) -> None:
        self.handler = handler


def _recv_all(sock: socket.socket, count: int, timeout: float = 2.0) -> List[Tuple[bytes, Any]]:
    got: List[Tuple[bytes, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.append(sock.recvfrom(70000))
        except BlockingIOError:
            time.sleep(0.001)
    return got


def _settle() -> None:
    time.sleep(0.02)  # loopback delivery is synchronous, but give the kernel a moment


class _IOCase(unittest.TestCase):
    def setUp(self) -> None:
        if _udpio is None:
            raise unittest.SkipTest("the _udpio extension is not built")
        self.h = Harness()
        self.listener = _socket()
        self.client = _socket()
        self.addCleanup(self.listener.close)
        self.addCleanup(self.client.close)
        self.dest = self.listener.getsockname()

    def relay_socket(self) -> Tuple[socket.socket, int]:
        """A socket the IO may send from: (socket, its port), registered in ``fds``."""
        s = _socket()
        self.addCleanup(s.close)
        port = s.getsockname()[1]
        self.h.fds[4][port] = s.fileno()
        return s, port


class ReadTests(_IOCase):
    def test_client_mode_arguments_and_types(self) -> None:
        seen: List[Tuple[str, bytes, Any, float]] = []

        def handler(data: Any, addr: Any, now: float) -> None:
            seen.append((type(data).__name__, bytes(data), addr, now))

        for d in (b"\x40\x00\x00\x01x", b"\x00\x01\x00\x00" + b"\x21\x12\xa4\x42" + b"t" * 12, b"", b"\x80zz", b"\x7f"):
            self.client.sendto(d, self.dest)
        _settle()
        self.assertEqual(self.h.read(self.listener, handler), 5)
        me = self.client.getsockname()
        self.assertEqual(
            seen,
            [
                ("memoryview", b"\x40\x00\x00\x01x", me, 1000.0),  # ChannelData: a view
                ("bytes", b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"t" * 12, me, 1000.0),  # STUN: bytes
                ("bytes", b"", me, 1000.0),
                ("bytes", b"\x80zz", me, 1000.0),
                ("memoryview", b"\x7f", me, 1000.0),
            ],
        )
        self.assertEqual(self.h.pumps, 1, "one pump per batch in which the core returned None")
        self.assertEqual(self.h.errors, [])
        # An empty socket: nothing read, no pump.
        self.assertEqual(self.h.read(self.listener, handler), 0)
        self.assertEqual(self.h.pumps, 1)

    def test_peer_mode_arguments_and_views(self) -> None:
        seen: List[Tuple[Any, ...]] = []

        def handler(data: Any, addr: Any, port: int, family: int, now: float) -> None:
            seen.append((type(data).__name__, bytes(data), addr, port, family, now))

        self.client.sendto(b"\x00\x01stun-looking", self.dest)
        _settle()
        self.assertEqual(self.h.read(self.listener, handler, port=50000, family=4, always_view=True), 1)
        self.assertEqual(seen, [("memoryview", b"\x00\x01stun-looking", self.client.getsockname(), 50000, 4, 1000.0)])

    def test_transmits_are_sent_from_the_right_socket_and_no_pump(self) -> None:
        relay_out, out_port = self.relay_socket()
        peer = _socket()
        self.addCleanup(peer.close)
        peer_addr = peer.getsockname()

        def handler(data: Any, addr: Any, now: float) -> Any:
            return (out_port, 4, peer_addr, data[4:])  # a slice of the view, as the core returns it

        payloads = [b"\x40\x00\x00\x10" + bytes([i]) * (i + 1) for i in range(100)]
        for d in payloads:
            self.client.sendto(d, self.dest)
        _settle()
        self.assertEqual(self.h.read(self.listener, handler), 100)  # more than one recvmmsg batch
        got = _recv_all(peer, 100)
        self.assertEqual([g[0] for g in got], [d[4:] for d in payloads])
        self.assertEqual({g[1] for g in got}, {relay_out.getsockname()})
        self.assertEqual(self.h.pumps, 0)
        stats = self.h.io.stats()
        self.assertEqual(stats["datagrams"], 100)
        self.assertEqual(stats["sent"], 100)
        self.assertLess(stats["send_calls"], 100)  # batched: sendmmsg carried several at once
        self.assertEqual(self.h.fallback, [])

    def test_everything_else_goes_to_the_fallback(self) -> None:
        relay_out, out_port = self.relay_socket()
        peer_addr = ("127.0.0.1", 9)
        odd = [
            (out_port, 4, ("127.0.0.1", 9, 1 << 20), b"x"),  # a stream client (ip, port, connection id)
            (out_port + 1, 4, peer_addr, b"x"),  # no such socket
            (out_port, 6, peer_addr, b"x"),  # no socket of that family
            (out_port, 4, ("not an address", 9), b"x"),
            (out_port, 4, ("127.0.0.1", 70000), b"x"),
            (out_port, 4, peer_addr, "not a buffer"),
            (out_port, 4, peer_addr),  # not a 4-tuple
            [out_port, 4, peer_addr, b"x"],  # not a tuple
        ]
        replies = iter(odd)

        def handler(data: Any, addr: Any, now: float) -> Any:
            return next(replies)

        for _ in odd:
            self.client.sendto(b"\x40\x00\x00\x00", self.dest)
        _settle()
        self.assertEqual(self.h.read(self.listener, handler), len(odd))
        self.assertEqual(self.h.fallback, odd)
        self.assertEqual(self.h.io.stats()["sent"], 0)

    def test_send_errors_are_reported_and_the_rest_still_goes(self) -> None:
        relay_out, out_port = self.relay_socket()
        peer = _socket()
        self.addCleanup(peer.close)
        sizes = iter([10, 70000, 20, 70000, 30])

        def handler(data: Any, addr: Any, now: float) -> Any:
            return (out_port, 4, peer.getsockname(), b"p" * next(sizes))

        for _ in range(5):
            self.client.sendto(b"\x40\x00\x00\x00", self.dest)
        _settle()
        self.h.read(self.listener, handler)
        self.assertEqual(self.h.send_errors, [errno.EMSGSIZE, errno.EMSGSIZE])
        self.assertEqual([len(g[0]) for g in _recv_all(peer, 3)], [10, 20, 30])

    def test_handler_exceptions_are_reported_and_the_batch_goes_on(self) -> None:
        seen: List[bytes] = []

        def handler(data: Any, addr: Any, now: float) -> None:
            if bytes(data) == b"boom":
                raise ZeroDivisionError("core bug")
            seen.append(bytes(data))

        for d in (b"a", b"boom", b"b", b"boom", b"c"):
            self.client.sendto(d, self.dest)
        _settle()
        self.assertEqual(self.h.read(self.listener, handler), 5)
        self.assertEqual(seen, [b"a", b"b", b"c"])
        self.assertEqual([(w, type(e)) for w, e in self.h.errors], [("client", ZeroDivisionError)] * 2)
        self.assertIsNotNone(self.h.errors[0][1].__traceback__)
        self.assertEqual(self.h.pumps, 1)

    def test_a_base_exception_from_the_handler_propagates(self) -> None:
        """Only an Exception goes to internal_error; SystemExit (any
        BaseException that is not one) ends the read and comes out of it."""

        def handler(data: Any, addr: Any, now: float) -> None:
            raise SystemExit(3)

        self.client.sendto(b"x", self.dest)
        _settle()
        self.assertRaises(SystemExit, self.h.read, self.listener, handler)
        self.assertEqual(self.h.errors, [])
        # The read is over (not "busy"): the next one works.
        self.client.sendto(b"y", self.dest)
        _settle()
        self.assertEqual(self.h.read(self.listener, lambda d, a, n: None), 1)

    def test_pump_and_fallback_exceptions_are_reported(self) -> None:
        def bad_pump() -> None:
            raise KeyError("pump bug")

        def bad_fallback(t: Any) -> None:
            raise ValueError("send bug")

        errors: List[Tuple[str, str]] = []
        io = _udpio.IO(lambda: 0.0, bad_pump, {4: {}, 6: {}}, bad_fallback, lambda e: None,
                       lambda where, exc: errors.append((where, type(exc).__name__)))  # fmt: skip
        self.client.sendto(b"x", self.dest)
        self.client.sendto(b"y", self.dest)
        _settle()
        replies = iter([None, (1, 4, ("127.0.0.1", 1, 2), b"z")])
        io.reader(self.listener.fileno(), _Entry(lambda d, a, n: next(replies)), "handler", None, 4, False, lambda: None)()
        self.assertEqual(errors, [("send", "ValueError"), ("pump", "KeyError")])

    def test_nested_read_is_refused(self) -> None:
        other = _socket()
        self.addCleanup(other.close)

        def handler(data: Any, addr: Any, now: float) -> None:
            self.h.read(other, handler)

        self.client.sendto(b"x", self.dest)
        _settle()
        self.assertEqual(self.h.read(self.listener, handler), 1)
        self.assertEqual([(w, type(e)) for w, e in self.h.errors], [("client", RuntimeError)])
        # ... and the buffers are usable again afterwards.
        self.client.sendto(b"y", self.dest)
        _settle()
        self.assertEqual(self.h.read(self.listener, lambda d, a, n: None), 1)

    def test_largest_datagram_arrives_whole(self) -> None:
        seen: List[bytes] = []
        big = bytes(range(256)) * 255 + b"\x01\x02"  # 65282 bytes
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.client.sendto(b"\x00" * 65507, self.dest)  # the largest IPv4 UDP payload
        self.client.sendto(big, self.dest)
        _settle()
        self.h.read(self.listener, lambda d, a, n: seen.append(bytes(d)))
        self.assertEqual([len(s) for s in seen], [65507, len(big)])
        self.assertEqual(seen[1], big)

    def test_many_senders_and_destinations_beyond_the_caches(self) -> None:
        """40 sources and 40 destinations: more than the 16-entry address caches."""
        senders = [_socket() for _ in range(40)]
        peers = [_socket() for _ in range(40)]
        for s in senders + peers:
            self.addCleanup(s.close)
        relay_out, out_port = self.relay_socket()
        route = {s.getsockname(): p.getsockname() for s, p in zip(senders, peers)}
        seen_addrs: List[Any] = []

        def handler(data: Any, addr: Any, now: float) -> Any:
            seen_addrs.append(addr)
            # an equal but new tuple each time: the send cache must not rely on identity alone
            ip, port = route[addr]
            return (out_port, 4, (ip, port), bytes(data))

        for rnd in range(3):
            for i, s in enumerate(senders):
                s.sendto(b"%d:%d" % (rnd, i), self.dest)
        _settle()
        self.assertEqual(self.h.read(self.listener, handler), 120)
        self.assertEqual(seen_addrs, [s.getsockname() for _ in range(3) for s in senders])
        for i, p in enumerate(peers):
            got = _recv_all(p, 3)
            self.assertEqual([g[0] for g in got], [b"%d:%d" % (rnd, i) for rnd in range(3)])

    def test_many_flows_stay_in_the_caches(self) -> None:
        """100 senders in turn (a paced many-client load), each relayed to its
        own destination tuple: every sender keeps one address object across
        reads, and each destination is still reached.  (A 16-entry cache
        scanned in order missed on every datagram here, building a new
        address tuple per datagram.)"""
        senders = [_socket() for _ in range(100)]
        peer = _socket()
        for s in senders + [peer]:
            self.addCleanup(s.close)
        relay_out, out_port = self.relay_socket()
        # one destination tuple per sender, as the core's channel entries hold
        dests = {s.getsockname(): peer.getsockname()[:1] + peer.getsockname()[1:] for s in senders}
        seen: Dict[Any, List[Any]] = {}

        def handler(data: Any, addr: Any, now: float) -> Any:
            seen.setdefault(addr, []).append(addr)
            return (out_port, 4, dests[addr], bytes(data))

        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for rnd in range(3):
            for i, s in enumerate(senders):
                s.sendto(b"%d:%d" % (rnd, i), self.dest)
            _settle()
            self.h.read(self.listener, handler)
        self.assertEqual(len(seen), 100)
        for addrs in seen.values():
            self.assertEqual(len(addrs), 3)
            self.assertIs(addrs[0], addrs[1])
            self.assertIs(addrs[1], addrs[2])
        got = _recv_all(peer, 300)
        self.assertEqual(sorted(g[0] for g in got), sorted(b"%d:%d" % (r, i) for r in range(3) for i in range(100)))

    def test_repeated_sender_gets_one_address_object(self) -> None:
        addrs: List[Any] = []
        for _ in range(3):
            self.client.sendto(b"x", self.dest)
        _settle()
        self.h.read(self.listener, lambda d, a, n: addrs.append(a))
        self.assertEqual(len(addrs), 3)
        self.assertIs(addrs[0], addrs[1])
        self.assertIs(addrs[1], addrs[2])

    def test_icmp_refusal_is_reported(self) -> None:
        closed = _socket()
        gone = closed.getsockname()
        closed.close()
        self.listener.connect(gone)  # a connected UDP socket reports ICMP port unreachable
        self.listener.send(b"x")
        _settle()
        self.h.read(self.listener, lambda d, a, n: None)
        self.assertEqual(self.h.refused, 1)

    def test_ipv6(self) -> None:
        if not ipv6_available():
            raise unittest.SkipTest("IPv6 loopback (::1) is not available")
        listener, client, out, peer = (_socket(socket.AF_INET6) for _ in range(4))
        for s in (listener, client, out, peer):
            self.addCleanup(s.close)
        self.h.fds[6][out.getsockname()[1]] = out.fileno()
        seen: List[Any] = []

        def handler(data: Any, addr: Any, now: float) -> Any:
            seen.append(addr)
            return (out.getsockname()[1], 6, peer.getsockname()[:2], bytes(data))

        client.sendto(b"\x40\x00\x00\x02hi", listener.getsockname())
        _settle()
        self.h.read(listener, handler)
        self.assertEqual(seen, [client.getsockname()[:2]])
        got = _recv_all(peer, 1)
        self.assertEqual(got[0][0], b"\x40\x00\x00\x02hi")
        self.assertEqual(got[0][1][:2], out.getsockname()[:2])

    def test_bad_arguments(self) -> None:
        self.assertRaises(TypeError, self.h.io.reader, 1, 2)
        self.assertRaises(ValueError, self.h.io.reader, -1, _Entry(lambda d, a, n: None), "handler", None, 4, False, None)
        self.assertRaises(TypeError, _udpio.IO, 1, 2, "not a dict", 4, 5, 6)
        read = self.h.io.reader(10**6, _Entry(lambda d, a, n: None), "handler", None, 4, False, lambda: None)
        self.assertRaises(OSError, read)


class SendTests(_IOCase):
    """``IO.send``: Transmits that come from the stream shell, not from a read."""

    def test_a_list_leaves_in_sendmmsg_calls_in_order(self) -> None:
        relay_out, out_port = self.relay_socket()
        peer = _socket()
        self.addCleanup(peer.close)
        payloads = [bytes([i]) * (i + 1) for i in range(100)]  # more than one batch of 64
        self.assertIsNone(self.h.io.send([(out_port, 4, peer.getsockname(), p) for p in payloads]))
        got = _recv_all(peer, 100)
        self.assertEqual([g[0] for g in got], payloads)
        self.assertEqual({g[1] for g in got}, {relay_out.getsockname()})
        stats = self.h.io.stats()
        self.assertEqual(stats["sent"], 100)
        self.assertEqual(stats["send_calls"], 2)
        self.assertEqual((self.h.fallback, self.h.send_errors, self.h.errors, self.h.pumps), ([], [], [], 0))

    def test_what_cannot_be_queued_goes_to_the_fallback_in_its_place(self) -> None:
        relay_out, out_port = self.relay_socket()
        peer = _socket()
        self.addCleanup(peer.close)
        stream_client = (out_port, 4, ("127.0.0.1", 9, 1 << 20), b"to a stream")
        self.h.io.send([(out_port, 4, peer.getsockname(), b"a"), stream_client, (out_port, 4, peer.getsockname(), b"b")])
        self.assertEqual(self.h.fallback, [stream_client])
        self.assertEqual([g[0] for g in _recv_all(peer, 2)], [b"a", b"b"])

    def test_failures_are_reported_and_the_rest_still_goes(self) -> None:
        relay_out, out_port = self.relay_socket()
        peer = _socket()
        self.addCleanup(peer.close)
        to = peer.getsockname()
        self.h.io.send([(out_port, 4, to, b"x" * n) for n in (10, 70000, 20)])
        self.assertEqual(self.h.send_errors, [errno.EMSGSIZE])
        self.assertEqual([len(g[0]) for g in _recv_all(peer, 2)], [10, 20])

        def bad_fallback(t: Any) -> None:
            raise ZeroDivisionError("shell bug")

        io = _udpio.IO(lambda: 0.0, lambda: None, self.h.fds, bad_fallback, self.h.send_errors.append,
                       lambda where, exc: self.h.errors.append((where, exc)))  # fmt: skip
        io.send([(out_port, 4, ("127.0.0.1", 9, 1 << 20), b"x"), (out_port, 4, to, b"after")])
        self.assertEqual([(w, type(e)) for w, e in self.h.errors], [("send", ZeroDivisionError)])
        self.assertEqual([g[0] for g in _recv_all(peer, 1)], [b"after"])

    def test_only_a_list(self) -> None:
        self.assertRaises(TypeError, self.h.io.send, ())
        self.assertRaises(TypeError, self.h.io.send)
        self.assertIsNone(self.h.io.send([]))
        self.assertEqual(self.h.io.stats()["send_calls"], 0)


#: Run in a child interpreter with the debug allocator (freed memory is
#: overwritten at once): ``send_failed``, called from the flush that a full
#: queue triggers inside ``IO.send``, drops the only reference to the
#: descriptor number of the Transmit being queued.  An extension that kept
#: the borrowed int across the flush reads freed memory here (a crash, or a
#: datagram from the wrong socket); one that took the C int first sends it
#: from the right socket.
_DROPPED_FD_SCRIPT = r"""
import errno, fcntl, socket, sys
from firezone_relay.adapters import _udpio

def sock():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s

first, second, peer = sock(), sock(), sock()
high = fcntl.fcntl(second.fileno(), fcntl.F_DUPFD, 600)  # above the cached small ints
p1, p2 = first.getsockname()[1], second.getsockname()[1]
fds = {4: {p1: first.fileno(), p2: int(str(high))}}  # the dict holds the only reference
failed = []

def send_failed(err):
    failed.append(err)
    del fds[4][p2]  # frees the int object of p2's descriptor
    junk = [object() for _ in range(1000)]  # and reuse what it freed

errors = []
io = _udpio.IO(lambda: 0.0, lambda: None, fds, None, send_failed, lambda w, e: errors.append((w, e)))
to = peer.getsockname()
transmits = [(p1, 4, to, b"x" * 70000)] + [(p1, 4, to, b"a")] * 63 + [(p2, 4, to, b"last")]
io.send(transmits)
got = []
peer.settimeout(2)
while len(got) < 64:
    got.append(peer.recvfrom(70000))
assert failed == [errno.EMSGSIZE], failed
assert errors == [], errors
assert [g[0] for g in got] == [b"a"] * 63 + [b"last"], [g[0] for g in got][-3:]
assert got[-1][1] == second.getsockname(), (got[-1][1], second.getsockname())
print("ok")
"""


class BorrowedReferenceTests(_IOCase):
    """Issue 14 item 14: no borrowed reference is held across a call into Python."""

    def test_descriptor_dropped_by_send_failed_during_a_flush(self) -> None:
        import subprocess
        import sys

        from tests.test_tap import twistd_env

        env = twistd_env(PYTHONMALLOC="debug", PYTHONFAULTHANDLER="1")
        result = subprocess.run(
            [sys.executable, "-c", _DROPPED_FD_SCRIPT], env=env, capture_output=True, text=True, timeout=60
        )
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "ok"), result.stderr[-2000:])


class _Owner:
    """Stands in for the shell: the entry points and the read listener a Reader looks up."""

    def __init__(self, events: List[Any]) -> None:
        self.events = events
        self.read_listener: Any = None
        self.handle_client_input: Callable[..., Any] = lambda data, addr, now: events.append(("client", bytes(data)))
        self.handle_peer_traffic: Callable[..., Any] = lambda data, addr, port, family, now: events.append(
            ("peer", type(data).__name__, bytes(data), port, family)
        )


class _Listener:
    def __init__(self, events: List[Any], fail_end: bool = False) -> None:
        self.events = events
        self.fail_end = fail_end

    def begin_read(self) -> None:
        self.events.append("begin")

    def end_read(self) -> None:
        self.events.append("end")
        if self.fail_end:
            raise ValueError("end_read bug")


class ReaderTests(_IOCase):
    """``io.reader``: a socket's read as one C callable (what udp.py registers
    as the direct read), with the entry point and the read listener looked up
    on the owner per call, and the listener told only about reads that may
    write to a stream client (a fallback send or a pump)."""

    def setUp(self) -> None:
        super().setUp()
        self.events: List[Any] = []
        self.io = _udpio.IO(
            lambda: 5.0, lambda: self.events.append("pump"), self.h.fds, lambda t: self.events.append(("fallback", t)),
            self.h.send_errors.append, lambda where, exc: self.events.append(("error", where, type(exc).__name__)),
        )  # fmt: skip
        self.owner = _Owner(self.events)

    def reader(self, peer: bool = False) -> Any:
        if peer:
            return self.io.reader(self.listener.fileno(), self.owner, "handle_peer_traffic", 50000, 4, True, self._refused)
        return self.io.reader(self.listener.fileno(), self.owner, "handle_client_input", None, 0, False, self._refused)

    def _refused(self) -> None:
        self.events.append("refused")

    def send(self, *datagrams: bytes) -> None:
        for d in datagrams:
            self.client.sendto(d, self.dest)
        _settle()

    def test_the_owners_current_entry_point_is_called(self) -> None:
        read = self.reader()
        self.send(b"\x00\x01a")
        self.assertEqual(read(), 1)
        self.owner.handle_client_input = lambda data, addr, now: self.events.append(("replaced", bytes(data), now))
        self.send(b"\x00\x01b")
        self.assertEqual(read(), 1)
        self.assertEqual(self.events, [("client", b"\x00\x01a"), "pump", ("replaced", b"\x00\x01b", 5.0), "pump"])
        self.assertEqual(read(), 0)  # an empty socket

    def test_peer_mode(self) -> None:
        self.send(b"\x00\x01stun-looking")
        self.assertEqual(self.reader(peer=True)(), 1)
        self.assertEqual(self.events, [("peer", "memoryview", b"\x00\x01stun-looking", 50000, 4), "pump"])

    def test_a_read_that_only_relays_over_udp_does_not_tell_the_listener(self) -> None:
        self.owner.read_listener = _Listener(self.events)
        relay_out, out_port = self.relay_socket()
        peer = _socket()
        self.addCleanup(peer.close)
        self.owner.handle_client_input = lambda data, addr, now: (out_port, 4, peer.getsockname(), bytes(data[4:]))
        self.send(b"\x40\x00\x00\x02hi", b"\x40\x00\x00\x02yo")
        self.assertEqual(self.reader()(), 2)
        self.assertEqual([g[0] for g in _recv_all(peer, 2)], [b"hi", b"yo"])
        self.assertEqual(self.events, [])

    def test_the_listener_is_begun_before_a_fallback_send_or_a_pump_and_ended_after(self) -> None:
        self.owner.read_listener = _Listener(self.events)
        stream_client = ("127.0.0.1", 9, 7)
        replies = iter([None, (3478, 4, stream_client, b"to a stream client")])
        self.owner.handle_client_input = lambda data, addr, now: next(replies)
        self.send(b"\x00\x01x", b"\x00\x01y")
        self.assertEqual(self.reader()(), 2)
        self.assertEqual(self.events, ["begin", ("fallback", (3478, 4, stream_client, b"to a stream client")),
                                       "pump", "end"])  # fmt: skip
        # Begun for a pump alone as well; and a new listener is looked up per read.
        self.events.clear()
        self.owner.handle_client_input = lambda data, addr, now: None
        other: List[Any] = []
        self.owner.read_listener = _Listener(other)
        self.send(b"\x00\x01z")
        self.assertEqual(self.reader()(), 1)
        self.assertEqual((self.events, other), (["pump"], ["begin", "end"]))

    def test_an_exception_from_end_read_comes_out_of_the_read(self) -> None:
        self.owner.read_listener = _Listener(self.events, fail_end=True)
        self.owner.handle_client_input = lambda data, addr, now: None
        read = self.reader()
        self.send(b"\x00\x01x")
        with self.assertRaises(ValueError):
            read()
        self.assertEqual(self.events, ["begin", "pump", "end"])
        # The read is over (not "busy"): the next one works, and tells the listener again.
        self.owner.read_listener = _Listener(self.events)
        self.send(b"\x00\x01y")
        self.assertEqual(read(), 1)
        self.assertEqual(self.events[3:], ["begin", "pump", "end"])

    def test_the_collector_sees_every_reference_and_frees_the_shell_cycle(self) -> None:
        """A Reader and an IO show the collector every object they hold
        (tp_traverse), so that the cycle a relay makes (the shell holds its
        IO and its sockets' Readers, which hold the shell) is freed."""
        import gc
        import weakref

        fd, owner, entry, port, refused = self.listener.fileno(), _Owner([]), "handle_peer_traffic", 50000, lambda: None
        reader = self.io.reader(fd, owner, entry, port, 4, True, refused)
        held = [self.io, owner, entry, port, 4, refused]
        self.assertEqual(sorted(map(id, gc.get_referents(reader))), sorted(map(id, held)))
        shell = _Owner([])
        fds: Dict[Any, Any] = {4: {}, 6: {}, "shell": shell}
        callables = [lambda: 0.0, lambda: None, print, print, print]
        io = _udpio.IO(callables[0], callables[1], fds, *callables[2:])
        self.assertEqual(sorted(map(id, gc.get_referents(io))), sorted(map(id, callables + [fds])))
        shell.io = io  # type: ignore[attr-defined]
        shell.reader = io.reader(fd, shell, entry, port, 4, True, refused)  # type: ignore[attr-defined]
        gone = weakref.ref(shell)
        del shell, io, fds
        gc.collect()
        self.assertIsNone(gone())

    def test_bad_arguments(self) -> None:
        fd = self.listener.fileno()
        with self.assertRaises(TypeError):
            self.io.reader(fd, self.owner, "handle_client_input", None, 0, False)
        with self.assertRaises(TypeError):
            self.io.reader(fd, self.owner, 7, None, 0, False, self._refused)
        with self.assertRaises(ValueError):
            self.io.reader(-1, self.owner, "handle_client_input", None, 0, False, self._refused)
        with self.assertRaises(TypeError):
            self.reader()(1)
        with self.assertRaises(AttributeError):  # looked up at the read
            self.io.reader(fd, self.owner, "no_such_entry", None, 0, False, self._refused)()
