"""The UDP shell around the relay core.

Theory of operation: the core (``firezone_relay.core.relay.Relay``) is a
state machine that never touches a socket or a clock.  This module owns the
sockets and the one timer, and runs a single *pump* after every input:

1. feed the input to the core (a datagram on the listen port, a datagram on
   an allocation port, or the timer firing);
2. send the ``Transmit`` tuple it returned, if any (the per-packet path);
3. drain ``next_command()`` and carry each command out (open/close allocation
   ports, send control-plane datagrams, log allocations);
4. re-arm the single ``DelayedCall`` from ``poll_timeout()``.

Sockets: each (port, family) gets its own UDP socket, IPv6 ones with
``IPV6_V6ONLY`` so IPv4 and IPv6 can share a port number and IPv4 peers never
show up as ``::ffff:`` addresses.  We create, configure and bind the socket
ourselves (socket options must be set before ``bind``; a failed bind must be
reported to the core, not crash), then hand it to the reactor with
``adoptDatagramPort(..., maxPacketSize=65535)`` (the default of 8192 would
silently truncate) and close our copy (the reactor dups the descriptor).

Two readers serve the per-packet path, with the same contract.  When the C
extension ``_udpio`` is built (setup.py; ``--udp-io``), each readiness event
becomes one ``recvmmsg`` of up to 64 datagrams, the core's entry point is
called for each, the Transmits it returns leave in one ``sendmmsg`` per
socket, and the pump runs once per batch if any call returned None (steps
1-4 above, per batch instead of per datagram).  Otherwise the pure-Python
reader below does the same one datagram at a time.  On Twisted's epoll
reactor the ports' readiness events skip the per-event log context
(``dispatch``), which costs more than the relay's own work on a datagram.

The pure-Python path sends with the raw socket's ``sendto``: Twisted's
``Port.write`` re-validates the address on every call.  Send errors are
counted by reason in ``RelayService.drops`` and the datagram dropped; nothing
raised by the core or a socket escapes ``datagramReceived`` (a core bug must
not take the listener down), and such errors are logged at most once per
kind per ``_ERROR_LOG_INTERVAL``.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any, Callable, Dict, Optional, Tuple

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet import base, udp
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from firezone_relay.adapters import dispatch
from firezone_relay.core import commands as C

try:  # the optional C extension (setup.py); the pure-Python reader otherwise
    from firezone_relay.adapters import _udpio as _udpio_module

    _udpio: Any = _udpio_module
    UDPIO_MISSING = ""
except ImportError as exc:  # not built: no compiler or headers at install time, or not Linux
    _udpio = None
    UDPIO_MISSING = str(exc)

log = Logger(namespace="firezone_relay.adapters.udp")

MAX_DATAGRAM = 65535
_ERROR_LOG_INTERVAL = 60.0

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}

# Linux values where the socket module lacks the names.
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
_IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
_IPV6_PMTUDISC_DO = getattr(socket, "IPV6_PMTUDISC_DO", 2)

_SEND_ERRORS = {
    errno.EAGAIN: "send_eagain",
    errno.EWOULDBLOCK: "send_eagain",
    errno.ENOBUFS: "send_enobufs",
    errno.ECONNREFUSED: "send_refused",
    errno.EMSGSIZE: "send_too_big",
    errno.EHOSTUNREACH: "send_unreachable",
    errno.ENETUNREACH: "send_unreachable",
    errno.EINVAL: "send_invalid",
}


class _ClientProtocol(DatagramProtocol):
    """The listen port of one family: datagrams from TURN clients."""

    noisy = False

    def __init__(self, service: "RelayService", family: int) -> None:
        self.service = service
        self.family = family

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        service = self.service
        try:
            t = service._handle_client_input(data, addr, service._now())
            if t is not None:  # (source_port, family, destination, payload)
                # A call that returns a Transmit queued no command and moved
                # no deadline (core contract): no pump needed.
                try:
                    service._sockets[t[1]][t[0]].sendto(t[3], t[2])
                except OSError as exc:
                    service._send_failed(exc)
                except (TypeError, OverflowError, KeyError):  # a stream client: see _transmit
                    service._transmit(t)
                return
            service._pump()
        except Exception as exc:
            service._internal_error("client", exc)

    def connectionRefused(self) -> None:
        self.service.drops["refused"] += 1


class _PeerProtocol(DatagramProtocol):
    """One allocation port of one family: datagrams from peers."""

    noisy = False  # no "Starting protocol" line per allocation

    def __init__(self, service: "RelayService", port: int, family: int) -> None:
        self.service = service
        self.port = port
        self.family = family

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        service = self.service
        try:
            t = service._handle_peer_traffic(data, addr, self.port, self.family, service._now())
            if t is not None:
                # A call that returns a Transmit queued no command and moved
                # no deadline (core contract): no pump needed.
                try:
                    service._sockets[t[1]][t[0]].sendto(t[3], t[2])
                except OSError as exc:
                    service._send_failed(exc)
                except (TypeError, OverflowError, KeyError):  # a stream client: see _transmit
                    service._transmit(t)
                return
            service._pump()
        except Exception as exc:
            service._internal_error("peer", exc)

    def connectionRefused(self) -> None:
        self.service.drops["refused"] += 1


#: Datagrams read per readiness event before going back to the reactor.
_READ_BATCH = 64
_READ_IGNORE = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)

# The pure-Python reader's one buffer, shared by every port: the reactor
# reads one socket at a time and a view of it lives only during the call.
# (One 64 KiB buffer per port cost 64 KiB of RSS per allocation.)
_BUFFER = bytearray(MAX_DATAGRAM)
_VIEW = memoryview(_BUFFER)


@dispatch.fast_type
class _FastPort(udp.Port):  # type: ignore[misc]
    """A UDP port that reads into one preallocated, shared buffer.

    Twisted's ``doRead`` calls ``recvfrom(65535)`` for every datagram,
    allocating (and shrinking) a 64 KiB object each time.  This one uses
    ``recvfrom_into`` and hands ChannelData (first byte 0x40-0x7F) and peer
    datagrams to the protocol as a ``memoryview`` of that buffer, which the
    core slices and the adapter sends without another copy; STUN messages
    are handed over as ``bytes``.  The view is only valid during the call:
    nothing keeps it.

    With the C extension (``batched`` set by ``RelayService._adopt``) the
    whole read goes to ``_udpio.IO.read`` instead: recvmmsg, the core's
    entry point called per datagram, sendmmsg of what it returned, one pump
    per batch.  See firezone_relay/adapters/_udpio.c.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: True for allocation ports: every datagram is peer data.
        self.always_view = False
        #: ``() -> int``: the batched read, or None for the Python loop below.
        self.batched: Optional[Callable[[], int]] = None

    # Twisted logs "<Protocol> starting on N" and "(UDP Port N Closed)" for
    # every port; with one port per allocation that was about a quarter of
    # an Allocate's CPU time, and our own allocation log lines already say
    # it.  These two are Twisted's own methods (Twisted 22-24) minus that line.

    def _bindSocket(self) -> None:
        if self._preexistingSocket is None:  # not how the relay opens ports
            super()._bindSocket()
            return
        skt, self._preexistingSocket = self._preexistingSocket, None
        self._realPortNumber = skt.getsockname()[1]
        self.connected = 1
        self.socket = skt
        self.fileno = skt.fileno

    def connectionLost(self, reason: Any = None) -> None:
        self._realPortNumber = None
        self.maxThroughput = -1
        base.BasePort.connectionLost(self, reason)
        self.protocol.doStop()
        self.socket.close()
        del self.socket
        del self.fileno
        if hasattr(self, "d"):
            self.d.callback(None)
            del self.d

    def doRead(self) -> None:
        batched = self.batched
        if batched is not None:
            batched()
            return
        recv_into = self.socket.recvfrom_into
        buffer = _BUFFER
        view = _VIEW
        received = self.protocol.datagramReceived
        always_view = self.always_view
        v6 = self.addressFamily == socket.AF_INET6
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


class _Drops(dict):  # type: ignore[type-arg]
    """Drop counters by reason; unknown reasons start at 0."""

    def __missing__(self, key: str) -> int:
        return 0


class RelayService(Service):
    """Runs a ``Relay`` core on UDP sockets.

    ``bind_ip4`` / ``bind_ip6``: addresses to bind for each family, ``None``
    for a family the relay does not serve.  ``reactor`` does the I/O;
    ``clock`` (default: the reactor) owns time and the timer, so a test can
    pass a ``task.Clock`` and advance it.  ``serve_at_start=False`` (portal
    mode) keeps the STUN/TURN listeners closed until ``start_serving()``.
    """

    def __init__(
        self,
        relay: Any,
        listen_port: int,
        bind_ip4: Optional[str] = "0.0.0.0",
        bind_ip6: Optional[str] = None,
        socket_buffer: int = 0,
        reactor: Any = None,
        clock: Any = None,
        serve_at_start: bool = True,
        batched_io: Optional[bool] = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.relay = relay
        #: False until ``start_serving()`` in portal mode: no listener yet.
        self.serving = serve_at_start
        #: Called after an allocation was created or deleted (the drain waits for 0).
        self.on_allocations_changed: Optional[Callable[[], None]] = None
        self.listen_port = listen_port
        self.bind = {4: bind_ip4, 6: bind_ip6}
        self.socket_buffer = socket_buffer
        self.reactor = reactor
        self.clock = reactor if clock is None else clock
        # time.time is what the default reactor's seconds() returns, and
        # cheaper to call per packet; an injected clock is asked instead.
        self._now: Callable[[], float] = time.time if clock is None else self.clock.seconds
        # Bound methods looked up once: the per-packet path is hot.
        self._handle_client_input = relay.handle_client_input
        self._handle_peer_traffic = relay.handle_peer_traffic
        self._next_command = relay.next_command
        self._poll_timeout = relay.poll_timeout
        # (port) -> raw socket object, one dict per family, for sendto.
        self._sockets: Dict[int, Dict[int, socket.socket]] = {4: {}, 6: {}}
        # The same, as descriptors, for the batched reader's sendmmsg.
        self._fds: Dict[int, Dict[int, int]] = {4: {}, 6: {}}
        if batched_io and _udpio is None:
            raise RuntimeError("batched UDP I/O needs the _udpio C extension, which is not built: " + UDPIO_MISSING)
        #: The C extension's batched reader/sender, or None (pure Python).
        self.io: Any = None
        #: Datagrams per recvmmsg/sendmmsg call when ``io`` is set.
        self.io_batch = _udpio.BATCH if _udpio is not None else 1
        if batched_io is not False and _udpio is not None:
            self.io = _udpio.IO(self._now, self._pump, self._fds, self._transmit, self._send_errno, self._internal_error)
        self._ports: Dict[Tuple[int, int], Any] = {}
        self._closing: set[defer.Deferred[None]] = set()
        self._timer: Any = None
        self._deadline: Optional[float] = None
        self._error_logged: Dict[str, float] = {}
        self.drops: Dict[str, int] = _Drops()
        self.errors: Dict[str, int] = _Drops()
        self.listening: Dict[int, Any] = {}
        #: A kernel fast path (``firezone_relay.xdp.service.XdpService``) that
        #: mirrors the core's ChannelBound/ChannelUnbound, or None.
        self.fast_path: Any = None
        #: The stream shell (``stream.StreamService``) when TCP/TLS is served:
        #: destinations ``(ip, port, connection_id)`` are written there.
        self.stream: Any = None
        self._usernames: Dict[int, str] = {}  # allocation port -> username, for the channel log lines

    # --- life cycle ---------------------------------------------------------

    def privilegedStartService(self) -> None:
        # Listeners open here, before the reactor runs, so that a port that
        # cannot be bound stops twistd at start-up with the reason.
        super().privilegedStartService()
        self._open_listeners()

    def startService(self) -> None:
        super().startService()
        self._open_listeners()  # when used without privilegedStartService (tests)
        self._pump()

    def start_serving(self) -> None:
        """Open the STUN/TURN listeners now (portal mode: on the portal's first ``init``)."""
        if not self.serving:
            self.serving = True
            if self.running:
                self._open_listeners()
                if self.stream is not None:
                    self.stream.start_serving()

    def _open_listeners(self) -> None:
        if not self.serving:
            return
        for family in (4, 6):
            if self.bind[family] is not None and family not in self.listening:
                self._open_listener(family)

    def stopService(self) -> "defer.Deferred[Any]":
        super().stopService()
        self._cancel_timer()
        waits = [d for d in self._closing]
        for key, port in list(self._ports.items()):
            waits.append(self._close(key[0], key[1]))
        self.listening.clear()
        return defer.gatherResults([d for d in waits if d is not None], consumeErrors=True)

    # --- sockets ------------------------------------------------------------

    def _make_socket(self, family: int, port: int, dont_fragment: bool = False) -> socket.socket:
        ip = self.bind[family]
        if ip is None:
            raise OSError(errno.EAFNOSUPPORT, "family IPv%d is not served" % family)
        sock = socket.socket(_AF[family], socket.SOCK_DGRAM)
        try:
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

    def _adopt(self, sock: socket.socket, family: int, protocol: DatagramProtocol) -> Any:
        try:
            if not isinstance(self.reactor, PosixReactorBase):  # a test double
                return self.reactor.adoptDatagramPort(sock.fileno(), _AF[family], protocol, maxPacketSize=MAX_DATAGRAM)
            # What reactor.adoptDatagramPort does, with our faster reading port.
            port = _FastPort._fromListeningDescriptor(
                self.reactor, sock.fileno(), _AF[family], protocol, maxPacketSize=MAX_DATAGRAM
            )
            port.always_view = isinstance(protocol, _PeerProtocol)
            port.startListening()
            if self.io is not None:
                port.batched = self._batched_reader(port, protocol)
            return port
        finally:
            sock.close()  # the reactor has its own duplicate of the descriptor

    def _batched_reader(self, port: Any, protocol: DatagramProtocol) -> Callable[[], int]:
        read, fd, refused = self.io.read, port.fileno(), protocol.connectionRefused
        peer = isinstance(protocol, _PeerProtocol)
        number: Any = protocol.port if peer else None  # type: ignore[attr-defined]
        family = protocol.family if peer else 0  # type: ignore[attr-defined]

        def batched() -> int:
            # The entry point is looked up per read (not per datagram), so
            # that replacing it on the service (tests do) takes effect.
            # Peer datagrams always come as views (``always_view``).
            handler = self._handle_peer_traffic if peer else self._handle_client_input
            stream = self.stream
            if stream is None:
                return read(fd, handler, number, family, peer, refused)  # type: ignore[no-any-return]
            # What this read sends to stream clients leaves when it ends, in
            # one send per connection (stream.StreamService.flush_soon).
            stream.reading = True
            try:
                return read(fd, handler, number, family, peer, refused)  # type: ignore[no-any-return]
            finally:
                stream.end_read()

        return batched

    def _open_listener(self, family: int) -> None:
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
        port = self._adopt(sock, family, _ClientProtocol(self, family))
        number = port.getHost().port
        if self.listen_port == 0:  # tests ask for any free port
            self.listen_port = number
        self.listening[family] = port
        self._ports[(number, family)] = port
        self._sockets[family][number] = port.socket
        self._fds[family][number] = port.fileno()

    def _open_port(self, port: int, family: int, dont_fragment: bool) -> bool:
        if (port, family) in self._ports:
            return False
        try:
            sock = self._make_socket(family, port, dont_fragment)
            listening = self._adopt(sock, family, _PeerProtocol(self, port, family))
        except Exception as exc:  # OSError, CannotListenError: the core picks another port
            self.errors["open_port:%s" % (getattr(exc, "errno", None) or type(exc).__name__)] += 1
            return False
        self._ports[(port, family)] = listening
        self._sockets[family][port] = listening.socket
        self._fds[family][port] = listening.fileno()
        return True

    def _close(self, port: int, family: int) -> Optional["defer.Deferred[None]"]:
        listening = self._ports.pop((port, family), None)
        self._sockets[family].pop(port, None)
        self._fds[family].pop(port, None)
        if listening is None:
            return None
        d = listening.stopListening()
        if d is None:
            return None
        self._closing.add(d)
        d.addBoth(self._closed, d)
        return d

    def _closed(self, result: Any, d: "defer.Deferred[None]") -> Any:
        self._closing.discard(d)
        return result

    def port_numbers(self) -> list[Tuple[int, int]]:
        """``(port, family)`` of every open socket, listeners included."""
        return sorted(self._ports)

    # --- the pump -------------------------------------------------------------

    def _transmit(self, transmit: Tuple[int, int, Any, bytes]) -> None:
        source_port, family, destination, payload = transmit
        if len(destination) == 3:
            # A stream client (ip, port, connection_id).  The per-packet paths
            # come here only from their except branch: a raw sendto refuses
            # such a 3-tuple (stream.py, "Routing"), so UDP never pays for this test.
            if self.stream is not None:
                self.stream.send(destination, payload)
            else:
                self.drops["no_stream"] += 1
            return
        try:
            self._sockets[family][source_port].sendto(payload, destination)
        except OSError as exc:
            self._send_failed(exc)
        except KeyError:
            self.drops["no_socket"] += 1

    def _send_failed(self, exc: OSError) -> None:
        self._send_errno(exc.errno or 0)

    def _send_errno(self, err: int) -> None:
        """Count a datagram the kernel refused, by its errno (the batched
        I/O's ``send_failed`` reports it so; ``_send_failed`` by exception)."""
        self.drops[_SEND_ERRORS.get(err, "send_error")] += 1

    def _pump(self) -> None:
        command = self._next_command()
        while command is not None:
            self._execute(command)
            command = self._next_command()
        deadline = self._poll_timeout()
        if deadline != self._deadline:
            self._arm(deadline)

    def _arm(self, deadline: Optional[float]) -> None:
        self._deadline = deadline
        if deadline is None:
            self._cancel_timer()
            return
        delay = max(0.0, deadline - self.clock.seconds())
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._on_timer)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        self._deadline = None
        if timer is not None and timer.active():
            timer.cancel()

    def _on_timer(self) -> None:
        self._timer = None
        deadline, self._deadline = self._deadline, None
        now = self.clock.seconds()
        if deadline is not None and deadline > now:
            now = deadline  # the core never sees a time before the deadline it asked for
        try:
            self.relay.handle_timeout(now)
            self._pump()
        except Exception as exc:
            self._internal_error("timer", exc)
            if self._timer is None and self.running:
                # Do not spin on a failing deadline, but do not stop either.
                self._deadline = None
                self._timer = self.clock.callLater(1.0, self._on_timer)

    def _execute(self, command: Any) -> None:
        kind = type(command)
        if kind is C.SendDatagram:
            self._transmit((command.source_port, command.family, command.destination, command.payload))
        elif kind is C.OpenPort:
            ok = self._open_port(command.port, command.family, command.dont_fragment)
            self.relay.handle_port_result(command.port, command.family, ok, self._now())
        elif kind is C.ClosePort:
            self._close(command.port, command.family)
        elif kind is C.AllocationCreated:
            log.info(
                "allocation created: client {client} ({transport}) user {username} port {port} relayed {relayed} "
                "lifetime {lifetime}s",
                client=_addr(command.client),
                transport=self._transport_of(command.client),
                username=command.username,
                port=command.port,
                relayed=[_addr(a) for a in command.relayed],
                lifetime=command.lifetime,
            )
            self._usernames[command.port] = command.username
            if len(command.client) == 3 and self.stream is not None:
                self.stream.allocation_event(command)
            if self.on_allocations_changed is not None:
                self.on_allocations_changed()
        elif kind is C.AllocationDeleted:
            log.info(
                "allocation deleted: client {client} ({transport}) user {username} port {port} ({reason})",
                client=_addr(command.client),
                transport=self._transport_of(command.client),
                username=command.username,
                port=command.port,
                reason=command.reason,
            )
            self._usernames.pop(command.port, None)
            if len(command.client) == 3 and self.stream is not None:
                self.stream.allocation_event(command)
            if self.on_allocations_changed is not None:
                self.on_allocations_changed()
        elif kind is C.ChannelBound or kind is C.ChannelUnbound:
            fast_path = self.fast_path
            if fast_path is not None:
                if kind is C.ChannelBound:
                    fast_path.channel_bound(command)
                else:
                    fast_path.channel_unbound(command)
            log.info(
                "channel {state}: client {client} user {username} port {port} channel {channel:#06x} peer {peer}",
                state="bound" if kind is C.ChannelBound else "unbound",
                client=_addr(command.client),
                username=self._usernames.get(command.port, ""),
                port=command.port,
                channel=command.channel,
                peer=_addr(command.peer),
            )
        # PermissionAdded/Removed exist for a kernel fast path that mirrors
        # them; the userspace path needs nothing (and they are too many to log).

    def _transport_of(self, client: Any) -> str:
        """``udp``, ``tcp`` or ``tls``: the log field ``transport``."""
        if len(client) == 3 and self.stream is not None:
            return str(self.stream.transport_of(client))
        return "udp"

    # --- errors ----------------------------------------------------------------

    def _internal_error(self, where: str, exc: BaseException) -> None:
        kind = "%s:%s" % (where, type(exc).__name__)
        self.errors[kind] += 1
        now = time.monotonic()
        last = self._error_logged.get(kind)
        if last is None or now - last >= _ERROR_LOG_INTERVAL:
            self._error_logged[kind] = now
            log.failure(
                "internal error handling {where} input (count {count}; logged at most once a minute per kind)",
                # Built from the exception: the batched reader reports it
                # after the fact, outside any ``except`` block.
                failure=Failure(exc, type(exc), exc.__traceback__),
                where=where,
                count=self.errors[kind],
            )


def _addr(address: Any) -> str:
    ip, port = address[0], address[1]  # a stream client has a connection id too
    return "[%s]:%d" % (ip, port) if ":" in ip else "%s:%d" % (ip, port)
