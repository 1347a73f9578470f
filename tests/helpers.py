"""Client-side helpers for tests that talk to a relay over real sockets.

``TurnClient`` is a small TURN client on a ``DatagramProtocol``: requests
return Deferreds that fire with the decoded response, everything else
(ChannelData, Data indications) lands in ``client.other``.  ``Collector`` is
a peer that records what it receives.  Messages are built with the core's
own codec (``firezone_relay.core.stun``).
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SkipTest, TestCase

from firezone_relay.core import stun
from firezone_relay.core.auth import REALM, make_credentials

Address = Tuple[str, int]
TIMEOUT = 5.0


def in_ci() -> bool:
    """``CI`` set to anything but empty/0/false/no (GitHub and GitLab set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def kill_if_running(proc: "subprocess.Popen[Any]", timeout: float = 10.0) -> None:
    """SIGKILL a process the test started, if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout)


def unavailable(test: TestCase, reason: str) -> None:
    """Skip outside CI; in CI nothing may skip, so fail with the same reason."""
    if in_ci():
        test.fail("CI is set, so this test must run, but: %s" % reason)
    raise SkipTest(reason)


def loopback(family: int) -> str:
    return "::1" if family == 6 else "127.0.0.1"


def ipv6_available() -> bool:
    """True when a UDP socket can bind ::1."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_udp_port(families: Sequence[int] = (4, 6)) -> int:
    """A port number currently free for UDP, and for TCP (a relay listens on
    both on its listen port), on the loopback of every family given."""
    six = 6 in families and ipv6_available()
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if _free(socket.AF_INET, "127.0.0.1", port, socket.SOCK_STREAM) and (
            not six
            or (_free(socket.AF_INET6, "::1", port, socket.SOCK_DGRAM) and _free(socket.AF_INET6, "::1", port, socket.SOCK_STREAM))
        ):
            return port
    raise RuntimeError("no free UDP port found")


def _free(family: int, host: str, port: int, kind: int) -> bool:
    try:
        with socket.socket(family, kind) as s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
    except OSError:
        return False
    return True


def port_range(size: int, avoid: Iterable[int] = (), base: int = 20000) -> Tuple[int, int]:
    """A random window of ``size`` ports in ``base``..``base`` + 10000, below
    the usual ephemeral range.

    Random so that parallel test workers rarely collide; a collision is
    harmless anyway, since the relay skips ports it cannot bind, except for
    a port reserved by EVEN-PORT, which the relay does not bind until it is
    claimed: tests that need those pass another ``base``.
    """
    avoid = set(avoid)
    while True:
        low = base + int.from_bytes(os.urandom(2), "big") % 10000
        high = low + size - 1
        if not any(low <= p <= high for p in avoid):
            return low, high


def tid() -> bytes:
    return os.urandom(12)


class Collector(DatagramProtocol):
    """Records datagrams; ``next()`` returns a Deferred for the next one."""

    def __init__(self) -> None:
        self.queue: defer.DeferredQueue[Tuple[bytes, Address]] = defer.DeferredQueue()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.queue.put((data, (addr[0], addr[1])))

    def next(self, timeout: float = TIMEOUT) -> "defer.Deferred[Tuple[bytes, Address]]":
        d = self.queue.get()
        d.addTimeout(timeout, reactor)
        return d

    def send(self, data: bytes, addr: Address) -> None:
        assert self.transport is not None
        self.transport.write(data, addr)


class TurnClient(DatagramProtocol):
    """A TURN client talking to one server address.

    ``request()`` sends a STUN request and fires with the decoded response
    (success or error) that carries the same transaction id.  After
    ``authenticate()`` (the 401 dance), ``request(..., signed=True)`` adds
    USERNAME, REALM, NONCE and MESSAGE-INTEGRITY, retrying once on 438.
    """

    def __init__(self, server: Address) -> None:
        self.server = server
        self.pending: dict[bytes, defer.Deferred[stun.Message]] = {}
        self.other: defer.DeferredQueue[bytes] = defer.DeferredQueue()
        self.username: Optional[str] = None
        self.password: Optional[str] = None
        self.nonce: Optional[str] = None
        self.key: Optional[bytes] = None

    # --- plumbing ------------------------------------------------------------

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if data and data[0] < 0x40 and len(data) >= 20:
            try:
                message = stun.decode(data)
            except stun.StunDecodeError:
                self.other.put(data)
                return
            d = self.pending.pop(message.transaction_id, None)
            if d is not None and message.msg_class in (stun.SUCCESS, stun.ERROR):
                d.callback(message)
                return
        self.other.put(data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data, self.server)

    def next_other(self, timeout: float = TIMEOUT) -> "defer.Deferred[bytes]":
        d = self.other.get()
        d.addTimeout(timeout, reactor)
        return d

    def send_raw_request(self, transaction_id: bytes, data: bytes, timeout: float = TIMEOUT) -> "defer.Deferred[stun.Message]":
        d: defer.Deferred[stun.Message] = defer.Deferred(lambda _: self.pending.pop(transaction_id, None))
        self.pending[transaction_id] = d
        self.send(data)
        d.addTimeout(timeout, reactor)
        return d

    # --- requests --------------------------------------------------------------

    def set_credentials(self, secret: str, expiry: int, salt: str = "testsalt") -> None:
        self.username, self.password = make_credentials(secret, expiry, salt)
        self.key = stun.long_term_key(self.username, REALM, self.password)

    def encode(self, method: int, attributes: List[Tuple[int, object]], transaction_id: bytes, signed: bool) -> bytes:
        if signed:
            assert self.username and self.nonce and self.key
            attributes = attributes + [
                (stun.USERNAME, self.username),
                (stun.REALM, REALM),
                (stun.NONCE, self.nonce),
            ]
            return stun.encode(method, stun.REQUEST, transaction_id, attributes, integrity_key=self.key)
        return stun.encode(method, stun.REQUEST, transaction_id, attributes)

    @defer.inlineCallbacks
    def request(
        self, method: int, attributes: Optional[List[Tuple[int, object]]] = None, signed: bool = True
    ) -> Any:
        attributes = list(attributes or [])
        for _ in range(2):
            t = tid()
            response = yield self.send_raw_request(t, self.encode(method, attributes, t, signed))
            error = response.get(stun.ERROR_CODE)
            if signed and isinstance(error, tuple) and error[0] == 438:
                self.nonce = response.get_str(stun.NONCE)
                continue
            return response
        return response

    @defer.inlineCallbacks
    def authenticate(self, secret: str, expiry: int, salt: str = "testsalt") -> Any:
        """Send an unauthenticated Allocate-free request to learn the nonce.

        Uses a Refresh (harmless: without credentials the relay answers 401
        before it looks at allocations) and returns the 401 response.
        """
        self.set_credentials(secret, expiry, salt)
        response = yield self.request(stun.REFRESH, [], signed=False)
        self.nonce = response.get_str(stun.NONCE)
        return response

    @defer.inlineCallbacks
    def allocate(
        self,
        secret: str,
        expiry: int,
        attributes: Optional[List[Tuple[int, object]]] = None,
        salt: str = "testsalt",
    ) -> Any:
        """The full Allocate exchange: 401 first, then the signed request.

        Returns ``(first_response, final_response)``.
        """
        self.set_credentials(secret, expiry, salt)
        attributes = [(stun.REQUESTED_TRANSPORT, 17)] + list(attributes or [])
        first = yield self.request(stun.ALLOCATE, attributes, signed=False)
        self.nonce = first.get_str(stun.NONCE)
        final = yield self.request(stun.ALLOCATE, attributes, signed=True)
        return first, final


def error_code(message: stun.Message) -> Optional[int]:
    value = message.get(stun.ERROR_CODE)
    return value[0] if isinstance(value, tuple) else None


def listen(protocol: DatagramProtocol, family: int = 4) -> Any:
    """``reactor.listenUDP`` on the loopback of ``family``, any port, 64 KiB datagrams."""
    return reactor.listenUDP(0, protocol, interface=loopback(family), maxPacketSize=65535)
