"""The UDP transport of the shell (``shell.Shell``).

Sockets: each (port, family) gets its own UDP socket, IPv6 ones with
``IPV6_V6ONLY`` so IPv4 and IPv6 can share a port number and IPv4 peers never
show up as ``::ffff:`` addresses.  We create, configure and bind the socket
ourselves (socket options must be set before ``bind``; a failed bind must be
reported to the core, not crash), then register it for reading with the
public ``reactor.addReader`` (``_Reader``, an ``IReadDescriptor``): no
``udp.Port``, whose per-datagram ``recvfrom(65535)``, per-port log lines and
private binding hooks the relay does not need.
Every open socket is registered with the shell (``Shell.add_socket``), whose
table every sender uses.

Two readers serve the per-packet path, with the same contract.  When the C
extension ``_udpio`` is built (setup.py; ``--udp-io``; the shell owns it as
``Shell.io``), each readiness event becomes one ``recvmmsg`` of up to 64
datagrams, the core's entry point is called for each, the Transmits it
returns leave in one ``sendmmsg`` per socket, and the shell's pump runs
once per batch if any call returned None.  Otherwise the pure-Python reader
below does the same one datagram at a time: feed the core, send the
Transmit it returned (a call that returns one queued no command and moved no
deadline: no pump), or else pump.  On Twisted's epoll reactor the ports'
readiness events skip the per-event log context (``dispatch``), which costs
more than the relay's own work on a datagram.

The pure-Python path sends with the raw socket's ``sendto``: Twisted's
``Port.write`` re-validates the address on every call.  A Transmit whose
destination is a stream client's 3-tuple goes to ``Shell.transmit``.  Send
errors are counted by reason in ``Shell.drops`` and the datagram dropped;
nothing raised by the core or a socket escapes ``datagramReceived`` (a core
bug must not take the listener down): it is counted by the shell.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Callable, Dict, Optional, Tuple

from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from firezone_relay.adapters import dispatch
from firezone_relay.adapters._twisted import ListenerService
from firezone_relay.adapters.shell import UDPIO_MISSING, Shell

__all__ = ["MAX_DATAGRAM", "RelayService", "UDPIO_MISSING"]

log = Logger(namespace="firezone_relay.adapters.udp")

MAX_DATAGRAM = 65535

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_DGRAM_NONBLOCK = socket.SOCK_DGRAM | getattr(socket, "SOCK_NONBLOCK", 0)

# Linux values where the socket module lacks the names.
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
_IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
_IPV6_PMTUDISC_DO = getattr(socket, "IPV6_PMTUDISC_DO", 2)


class _Protocol(DatagramProtocol):
    """What the listen and the allocation ports' protocols share: the shell,
    the family, and a refused datagram counted as a drop."""

    noisy = False  # no "Starting protocol" line per allocation

    def __init__(self, shell: Shell, family: int) -> None:
        self.shell = shell
        self.family = family

    def connectionRefused(self) -> None:
        self.shell.drops["refused"] += 1


class _ClientProtocol(_Protocol):
    """The listen port of one family: datagrams from TURN clients."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        shell = self.shell
        try:
            t = shell.handle_client_input(data, addr, shell.now())
            # A call that returns a Transmit queued no command and moved no
            # deadline (core contract): send it, no pump needed.
            shell.transmit(t) if t is not None else shell.pump()
        except Exception as exc:
            shell.internal_error("client", exc)


class _PeerProtocol(_Protocol):
    """One allocation port of one family: datagrams from peers."""

    def __init__(self, shell: Shell, port: int, family: int) -> None:
        super().__init__(shell, family)
        self.port = port

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        shell = self.shell
        try:
            t = shell.handle_peer_traffic(data, addr, self.port, self.family, shell.now())
            shell.transmit(t) if t is not None else shell.pump()  # as _ClientProtocol
        except Exception as exc:
            shell.internal_error("peer", exc)


#: Datagrams read per readiness event before going back to the reactor.
_READ_BATCH = 64
_READ_IGNORE = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)

# The pure-Python reader's one buffer, shared by every port: the reactor
# reads one socket at a time and a view of it lives only during the call.
# (One 64 KiB buffer per port cost 64 KiB of RSS per allocation.)
_BUFFER = bytearray(MAX_DATAGRAM)
_VIEW = memoryview(_BUFFER)


@dispatch.fast_type
@implementer(IReadDescriptor)
class _Reader:
    """One UDP socket of the relay, read through the public
    ``reactor.addReader``: no ``udp.Port`` (whose binding, logging and
    ``recvfrom(65535)`` per datagram the relay does not need).

    It reads into one preallocated, shared buffer with ``recvfrom_into`` and
    hands ChannelData (first byte 0x40-0x7F) and peer datagrams to the
    protocol as a ``memoryview`` of that buffer, which the core slices and
    the shell sends without another copy; STUN messages are handed over as
    ``bytes``.  The view is only valid during the call: nothing keeps it.

    With the C extension (``batched`` set by ``RelayService._adopt``) the
    whole read goes to a ``_udpio.Reader`` instead: recvmmsg, the core's
    entry point called per datagram, sendmmsg of what it returned, one pump
    per batch.  See firezone_relay/adapters/_udpio.c.
    """

    def __init__(self, sock: socket.socket, protocol: DatagramProtocol, always_view: bool, v6: Optional[bool] = None) -> None:
        self.socket = sock
        self.protocol = protocol
        #: True for allocation ports: every datagram is peer data.
        self.always_view = always_view
        #: ``() -> int``: the batched read, or None for the Python loop below.
        self.batched: Optional[Callable[[], int]] = None
        self._fileno = sock.fileno()
        self._v6 = sock.family == socket.AF_INET6 if v6 is None else v6
        #: What ``dispatch`` calls on a read event instead of ``doRead``
        #: (the same read without Twisted's ``_doReadOrWrite`` around it);
        #: None once closed, so that a stale event goes through Twisted's
        #: checks.
        self.direct_read: Optional[Callable[[], Any]] = None

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "firezone-relay UDP"

    def connectionLost(self, reason: Any) -> None:
        """The reactor dropped this descriptor (an error a read raised)."""
        self.close()

    def close(self) -> None:
        self._fileno = -1
        self.direct_read = None
        self.socket.close()

    def doRead(self) -> None:
        batched = self.batched
        if batched is not None:
            batched()
            return
        recv_into = self.socket.recvfrom_into
        buffer = _BUFFER
        view = _VIEW
        received: Callable[[Any, Any], None] = self.protocol.datagramReceived
        always_view = self.always_view
        v6 = self._v6
        for _ in range(_READ_BATCH):
            try:
                n, addr = recv_into(buffer)
            except OSError as exc:
                if exc.errno in _READ_IGNORE:
                    return
                if exc.errno == errno.ECONNREFUSED:
                    self.protocol.connectionRefused()
                    continue
                raise
            if v6:
                addr = addr[:2]
            if n and (always_view or 0x40 <= buffer[0] < 0x80):
                received(view[:n], addr)
            else:
                received(bytes(view[:n]), addr)


class RelayService(ListenerService):
    """The UDP transport: the listen sockets and the allocation ports.

    ``shell`` runs the core; this service registers with it
    (``Shell.attach_udp``) and becomes its child.  ``bind_ip4`` /
    ``bind_ip6``: addresses to bind for each family, ``None`` for a family
    the relay does not serve.  The listeners open at start, unless the shell
    does not serve yet (portal mode: ``Shell.start_serving``).
    """

    name = "udp"

    def __init__(
        self,
        shell: Shell,
        listen_port: int,
        bind_ip4: Optional[str] = "0.0.0.0",
        bind_ip6: Optional[str] = None,
        socket_buffer: int = 0,
    ) -> None:
        self.shell = shell
        self.listen_port = listen_port
        self.bind = {4: bind_ip4, 6: bind_ip6}
        self.socket_buffer = socket_buffer
        self.reactor = shell.reactor
        self._ports: Dict[Tuple[int, int], Any] = {}
        #: Readers taken off the reactor in this turn, closed at the next
        #: (``_close``), and the Deferred that fires then.
        self._to_close: list[_Reader] = []
        self._to_close_done: Optional[defer.Deferred[None]] = None
        self.listening: Dict[int, Any] = {}
        shell.attach_udp(self)

    # --- life cycle ---------------------------------------------------------

    def open_listeners(self) -> None:
        """Open the listen port of each family served (once the shell serves)."""
        if not self.shell.serving:
            return
        for family in (4, 6):
            if self.bind[family] is not None and family not in self.listening:
                self._open_listener(family)

    def stopService(self) -> "defer.Deferred[Any]":
        super().stopService()
        for port, family in list(self._ports):
            self.close_port(port, family)
        self.listening.clear()
        # Every socket closed in this turn (and any closed earlier in it)
        # closes at the start of the next: done when they all are.
        pending = self._to_close_done
        return defer.succeed(None) if pending is None else pending

    # --- sockets ------------------------------------------------------------

    def _make_socket(self, family: int, port: int, dont_fragment: bool = False) -> socket.socket:
        ip = self.bind[family]
        if ip is None:
            raise OSError(errno.EAFNOSUPPORT, "family IPv%d is not served" % family)
        # Non-blocking from the start (SOCK_NONBLOCK): no separate system call.
        sock = socket.socket(_AF[family], _DGRAM_NONBLOCK)
        try:
            if _DGRAM_NONBLOCK == socket.SOCK_DGRAM:  # no SOCK_NONBLOCK on this platform
                sock.setblocking(False)
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self.socket_buffer:
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, opt, self.socket_buffer)
                    except OSError:
                        pass  # best effort: the kernel caps it anyway
            if dont_fragment:
                if family == 4:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_DO)
            sock.bind((ip, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _adopt(self, sock: socket.socket, family: int, protocol: _Protocol) -> _Reader:
        reader = _Reader(sock, protocol, always_view=isinstance(protocol, _PeerProtocol), v6=family == 6)
        if self.shell.io is not None:
            reader.batched = self._batched_reader(reader, protocol)
        reader.direct_read = reader.batched or reader.doRead
        self.reactor.addReader(reader)
        return reader

    def _batched_reader(self, port: Any, protocol: _Protocol) -> Callable[[], int]:
        """The socket's batched read: an ``io.reader`` of the shell's current
        entry point (looked up per read, not per datagram, so that replacing
        it on the shell takes effect; peer datagrams always come as views),
        with the shell's ``read_listener``, which is told when the read
        begins and ends (what it sends to stream clients leaves at the end,
        in one send per connection) if it sends to a stream client or
        pumps.  A C callable (``_udpio.Reader``): no Python frame per
        wake-up."""
        shell = self.shell
        peer = isinstance(protocol, _PeerProtocol)
        number: Any = protocol.port if peer else None  # type: ignore[attr-defined]
        family = protocol.family if peer else 0
        entry = "handle_peer_traffic" if peer else "handle_client_input"
        return shell.io.reader(port.fileno(), shell, entry, number, family, peer, protocol.connectionRefused)  # type: ignore[no-any-return]

    def _open_listener(self, family: int) -> None:
        sock = self._listen_socket(family)
        port = self._adopt(sock, family, _ClientProtocol(self.shell, family))
        number = sock.getsockname()[1]
        if self.listen_port == 0:  # tests ask for any free port
            self.listen_port = number
        self.listening[family] = port
        self._ports[(number, family)] = port
        self.shell.add_socket(number, family, port.socket)

    def _listen_socket(self, family: int) -> socket.socket:
        """The listen port's socket of ``family``, bound (a worker's: adopted)."""
        try:
            sock = self._make_socket(family, self.listen_port)
        except OSError as exc:
            # Fatal at start-up: say which address, not just the errno.
            raise CannotListenError(self.bind[family], self.listen_port, exc) from exc
        if self.socket_buffer:
            log.info(
                "listener IPv{family} {address}: SO_RCVBUF {rcvbuf} SO_SNDBUF {sndbuf} (asked for {asked})",
                family=family,
                address="%s:%d" % (self.bind[family], sock.getsockname()[1]),
                rcvbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                sndbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                asked=self.socket_buffer,
            )
        return sock

    def open_port(self, port: int, family: int, dont_fragment: bool) -> bool:
        """Open allocation port ``port`` (the core's ``OpenPort``); False if
        it cannot be bound (the core then picks another one)."""
        if (port, family) in self._ports:
            return False
        try:
            sock = self._make_socket(family, port, dont_fragment)
        except Exception as exc:  # OSError, CannotListenError: the core picks another port
            self.shell.errors["open_port:%s" % (getattr(exc, "errno", None) or type(exc).__name__)] += 1
            return False
        listening = self._adopt(sock, family, _PeerProtocol(self.shell, port, family))
        self._ports[(port, family)] = listening
        self.shell.add_socket(port, family, sock)
        return True

    def close_port(self, port: int, family: int) -> None:
        """Close allocation port ``port`` (the core's ``ClosePort``).

        No more reads from the socket of ``port``; it closes at the start
        of the next reactor turn, as Twisted's ``stopListening`` does (a
        batched read still running on this descriptor must not see its
        number reused by a port opened in the same turn), together with
        every other socket closed in this turn: one timed
        call and one Deferred for all of them (a deallocation storm closes
        thousands), ``_to_close_done``, fired when they are closed."""
        listening = self._ports.pop((port, family), None)
        self.shell.remove_socket(port, family)
        if listening is None:
            return
        self.reactor.removeReader(listening)
        self._to_close.append(listening)
        if self._to_close_done is None:
            self._to_close_done = defer.Deferred()
            self.reactor.callLater(0, self._close_pending)

    def _close_pending(self) -> None:
        readers, self._to_close = self._to_close, []
        d, self._to_close_done = self._to_close_done, None
        for reader in readers:
            reader.close()
        if d is not None:
            d.callback(None)

    def port_numbers(self) -> list[Tuple[int, int]]:
        """``(port, family)`` of every open socket, listeners included."""
        return sorted(self._ports)
