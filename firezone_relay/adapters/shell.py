"""The one shell around the relay core: every transport feeds it.

Theory of operation: the core (``firezone_relay.core.relay.Relay``) is a
state machine that never touches a socket or a clock.  The shell owns it,
the one timer and the *pump* that runs after every input:

1. a transport feeds the input to the core (a datagram on the listen port,
   on an allocation port, a frame from a stream connection) or the timer
   fires;
2. the ``Transmit`` tuple the core returned, if any, is sent (the
   per-packet path; the transports inline the UDP case, see ``transmit``);
3. ``pump`` drains ``next_command()`` and carries each command out
   (``execute``): ports open and close through the UDP transport, datagrams
   leave through ``transmit``, allocation events reach the log, the stream
   transport, the XDP mirror and the drain;
4. and re-arms the single ``DelayedCall`` from ``poll_timeout()``.

Routing is by destination: a stream client is the 3-tuple ``(ip, port,
connection_id)``, a UDP peer or client the 2-tuple ``(ip, port)``.  The
shell keeps the table of UDP sockets by (family, port) that every sender
uses (the transports, the batched C I/O), and the stream transport, when
one is attached, takes 3-tuples.  Transports know the shell, never each
other: ``udp.RelayService`` registers with ``attach_udp``,
``stream.StreamService`` with ``attach_stream``, both from their
constructors, and both become children of this ``MultiService`` (started
in that order, stopped in reverse).

Errors: a datagram the kernel refuses is counted in ``drops`` by errno;
anything the core or a socket raises is counted in ``errors`` by where and
type, and logged at most once a minute per kind; none of it escapes into
the reactor.
"""

from __future__ import annotations

import errno
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.python.failure import Failure

from firezone_relay.adapters._twisted import Counts, LimitedLog, OneTimer, default_reactor, format_address
from firezone_relay.core import commands as C
from firezone_relay.logs import RelayLogger

try:  # the optional C extension (setup.py); the pure-Python reader otherwise
    from firezone_relay.adapters import _udpio as _udpio_module

    _udpio: Any = _udpio_module
    UDPIO_MISSING = ""
except ImportError as exc:  # not built: no compiler or headers at install time, or not Linux
    _udpio = None
    UDPIO_MISSING = str(exc)

log = RelayLogger(namespace="firezone_relay.adapters.udp")

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


class DatagramTransport(Protocol):
    """What the shell asks of the UDP transport."""

    listen_port: int

    def open_port(self, port: int, family: int, dont_fragment: bool) -> bool: ...

    def close_port(self, port: int, family: int) -> None: ...

    def open_listeners(self) -> None: ...


class StreamTransport(Protocol):
    """What the shell asks of the stream (TCP/TLS) transport."""

    def send(self, destination: Any, payload: bytes) -> None: ...

    def transport_of(self, client: Any) -> str: ...

    def allocation_event(self, command: Any) -> None: ...

    def begin_read(self) -> None: ...

    def end_read(self) -> None: ...

    def open_listeners(self) -> None: ...


class FastPath(Protocol):
    """A kernel fast path that mirrors the core's channel bindings (XDP)."""

    def channel_bound(self, command: C.ChannelBound) -> None: ...

    def channel_unbound(self, command: C.ChannelUnbound) -> None: ...


class Shell(MultiService):
    """Owns a ``Relay`` core, its timer, its pump and the routing of what it sends.

    ``clock`` (default: the reactor) owns time and the timer, so a test can
    pass a ``task.Clock``.  ``serve_at_start=False`` (portal mode) keeps the
    STUN/TURN listeners closed until ``start_serving()``.  ``batched_io``:
    None uses the C extension ``_udpio`` when it is built, True requires
    it, False never uses it.  ``fast_path``: an XDP mirror of the channel
    bindings, or None.
    """

    name = "shell"

    def __init__(
        self,
        relay: Any,
        reactor: Any = None,
        clock: Any = None,
        serve_at_start: bool = True,
        batched_io: Optional[bool] = None,
        fast_path: Optional[FastPath] = None,
    ) -> None:
        super().__init__()
        self.relay = relay
        self.reactor = default_reactor(reactor)
        self.clock = self.reactor if clock is None else clock
        # time.time is what the default reactor's seconds() returns, and
        # cheaper to call per packet; an injected clock is asked instead.
        self.now: Callable[[], float] = time.time if clock is None else self.clock.seconds
        #: False until ``start_serving()`` in portal mode: no listener yet.
        self.serving = serve_at_start
        self.fast_path = fast_path
        #: Called after an allocation was created or deleted (``watch_allocations``).
        self._allocation_watchers: List[Callable[[], None]] = []
        # The core's entry points, looked up once: the per-packet path is
        # hot.  Public, so that a test can replace one.
        self.handle_client_input = relay.handle_client_input
        self.handle_peer_traffic = relay.handle_peer_traffic
        self._next_command = relay.next_command
        self._poll_timeout = relay.poll_timeout
        #: family -> port -> socket of every open UDP port, for ``sendto``.
        self.sockets: Dict[int, Dict[int, Any]] = {4: {}, 6: {}}
        #: The same as descriptors, for the batched I/O's ``sendmmsg``.
        self.fds: Dict[int, Dict[int, int]] = {4: {}, 6: {}}
        self.drops: Dict[str, int] = Counts()
        self.errors: Dict[str, int] = Counts()
        if batched_io and _udpio is None:
            raise RuntimeError("batched UDP I/O needs the _udpio C extension, which is not built: " + UDPIO_MISSING)
        #: The C extension's batched reader/sender, or None (pure Python).
        self.io: Any = None
        #: Datagrams per recvmmsg/sendmmsg call when ``io`` is set.
        self.io_batch = _udpio.BATCH if _udpio is not None else 1
        if batched_io is not False and _udpio is not None:
            self.io = _udpio.IO(self.now, self.pump, self.fds, self.transmit, self.send_errno, self.internal_error)
        self.udp: Optional[DatagramTransport] = None
        self.stream: Optional[StreamTransport] = None
        #: The stream transport while one is attached: told when a batched
        #: UDP read begins and ends, so that what the read writes to stream
        #: clients leaves in one send per connection.
        self.read_listener: Optional[StreamTransport] = None
        #: The one timer, at the core's ``poll_timeout()``.
        self.timer = OneTimer(self.clock, self._on_timer)
        self._limited = LimitedLog()
        self._usernames: Dict[int, str] = {}  # allocation port -> username, for the channel log lines

    # --- transports -------------------------------------------------------------

    def attach_udp(self, transport: DatagramTransport) -> None:
        """The UDP transport (from its constructor): allocation ports open there."""
        self.udp = transport
        transport.setServiceParent(self)  # type: ignore[attr-defined]

    def attach_stream(self, transport: StreamTransport) -> None:
        """The stream transport (from its constructor): 3-tuples go there."""
        self.stream = self.read_listener = transport
        transport.setServiceParent(self)  # type: ignore[attr-defined]

    @property
    def listen_port(self) -> int:
        """The UDP listen port (the kernel's choice once open, when asked for 0)."""
        return self.udp.listen_port if self.udp is not None else 0

    def start_serving(self) -> None:
        """Open the STUN/TURN listeners now (portal mode: on the portal's first ``init``)."""
        if self.serving:
            return
        self.serving = True
        if self.running:
            for transport in (self.udp, self.stream):
                if transport is not None:
                    transport.open_listeners()

    # --- life cycle ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # the transports open their listeners
        self.pump()

    def stopService(self) -> "defer.Deferred[Any]":
        d: defer.Deferred[Any] = super().stopService()
        self.timer.cancel()
        return d

    # --- sending -------------------------------------------------------------------

    def transmit(self, transmit: Tuple[int, int, Any, bytes]) -> None:
        """Send a ``Transmit`` ``(source_port, family, destination, payload)``:
        to a stream connection if the destination is a 3-tuple, else from
        the UDP socket ``source_port`` of ``family``."""
        source_port, family, destination, payload = transmit
        if len(destination) == 3:
            stream = self.stream
            if stream is not None:
                stream.send(destination, payload)
            else:
                self.drops["no_stream"] += 1
            return
        try:
            self.sockets[family][source_port].sendto(payload, destination)
        except OSError as exc:
            self.send_failed(exc)
        except KeyError:
            self.drops["no_socket"] += 1

    def send_failed(self, exc: OSError) -> None:
        """Count a datagram the kernel refused with ``exc``."""
        self.send_errno(exc.errno or 0)

    def send_errno(self, err: int) -> None:
        """Count a datagram the kernel refused, by its errno (the batched
        I/O reports it so; ``send_failed`` by exception)."""
        self.drops[_SEND_ERRORS.get(err, "send_error")] += 1

    def add_socket(self, port: int, family: int, sock: Any) -> None:
        """A UDP socket opened by the UDP transport: senders may use it."""
        self.sockets[family][port] = sock
        self.fds[family][port] = sock.fileno()

    def remove_socket(self, port: int, family: int) -> None:
        self.sockets[family].pop(port, None)
        self.fds[family].pop(port, None)

    # --- the pump and the timer ----------------------------------------------------

    def pump(self) -> None:
        """Carry out every queued command, then re-arm the timer if the
        core's deadline moved."""
        command = self._next_command()
        io = self.io
        if io is None:
            while command is not None:
                self.execute(command)
                command = self._next_command()
        else:
            # The UDP replies of one pump (e.g. the Allocate successes of a
            # batched read) leave together, in sendmmsg calls, at the end;
            # before a port closes, what is queued for it leaves first.
            sends: List[Tuple[int, int, Any, bytes]] = []
            # The (source port, family) of every one of ``sends``: a
            # ClosePort (one per Refresh 0 of a deallocation storm) flushes
            # them only when its port is among them.
            ports: set[Tuple[int, int]] = set()
            try:
                while command is not None:
                    if type(command) is C.SendDatagram and len(command.destination) == 2:
                        # (A stream client's reply still goes at once, in
                        # its place among the allocation events.)
                        sends.append((command.source_port, command.family, command.destination, command.payload))
                        ports.add((command.source_port, command.family))
                    else:
                        if type(command) is C.ClosePort and (command.port, command.family) in ports:
                            io.send(sends)
                            sends = []
                            ports.clear()
                        self.execute(command)
                    command = self._next_command()
            finally:
                if sends:
                    io.send(sends)
        deadline = self._poll_timeout()
        if deadline != self.timer.deadline:
            self.timer.arm(deadline)

    @property
    def timer_armed(self) -> bool:
        return self.timer.armed

    def _on_timer(self, now: float) -> None:
        try:
            self.relay.handle_timeout(now)
            self.pump()
        except Exception as exc:
            self.internal_error("timer", exc)
            if self.running:
                self.timer.retry_in(1.0)

    # --- commands --------------------------------------------------------------------

    def execute(self, command: C.Command) -> None:
        """Carry out one command of the core."""
        match command:
            case C.SendDatagram():
                self.transmit((command.source_port, command.family, command.destination, command.payload))
            case C.OpenPort():
                # A request/response pair: the core learns at once whether
                # the port opened, and picks another one if not.
                ok = self.udp is not None and self.udp.open_port(command.port, command.family, command.dont_fragment)
                self.relay.handle_port_result(command.port, command.family, ok, self.now())
            case C.ClosePort():
                if self.udp is not None:
                    self.udp.close_port(command.port, command.family)
            case C.AllocationCreated():
                self._allocation_line(
                    "allocation created: client {client} ({transport}) user {username} port {port} "
                    "relayed {relayed} lifetime {lifetime}s",
                    {"relayed": [format_address(a) for a in command.relayed], "lifetime": command.lifetime},
                    command,
                )
                self._usernames[command.port] = command.username
                self._allocation_changed(command)
            case C.AllocationDeleted():
                self._allocation_line(
                    "allocation deleted: client {client} ({transport}) user {username} port {port} ({reason})",
                    {"reason": command.reason},
                    command,
                )
                self._usernames.pop(command.port, None)
                self._allocation_changed(command)
            case C.ChannelBound() | C.ChannelUnbound():
                bound = isinstance(command, C.ChannelBound)
                fast_path = self.fast_path
                if fast_path is not None:
                    if isinstance(command, C.ChannelBound):
                        fast_path.channel_bound(command)
                    else:
                        fast_path.channel_unbound(command)
                log.info(
                    "channel {state}: client {client} user {username} port {port} channel {channel:#06x} peer {peer}",
                    state="bound" if bound else "unbound",
                    client=format_address(command.client),
                    username=self._usernames.get(command.port, ""),
                    port=command.port,
                    channel=command.channel,
                    peer=format_address(command.peer),
                )
            case _:
                # PermissionAdded/Removed exist for a kernel fast path that
                # mirrors them; the userspace path needs nothing (and they
                # are too many to log).
                pass

    def _allocation_line(
        self, format: str, event: Dict[str, Any], command: C.AllocationCreated | C.AllocationDeleted
    ) -> None:
        """Log an allocation's creation or deletion: ``event`` holds the
        line's own fields, this adds the four both lines share (in the
        JSON's order, after the own ones) and hands the dict to the logger
        as the event itself (no keyword arguments packed again)."""
        client = command.client
        event["client"] = format_address(client)
        event["transport"] = "udp" if len(client) == 2 else self.transport_of(client)
        event["username"] = command.username
        event["port"] = command.port
        log.info_event(format, event)

    def _allocation_changed(self, command: Any) -> None:
        if len(command.client) == 3 and self.stream is not None:
            self.stream.allocation_event(command)
        for watcher in self._allocation_watchers:
            watcher()

    def watch_allocations(self, watcher: Callable[[], None]) -> None:
        """Call ``watcher()`` after each allocation is created or deleted (the
        drain waits for none to be left), like ``attach_udp``: the part that
        needs the hook registers, the shell knows it by this interface only."""
        self._allocation_watchers.append(watcher)

    def transport_of(self, client: Any) -> str:
        """``udp``, ``tcp`` or ``tls``: the log field ``transport``."""
        if len(client) == 3 and self.stream is not None:
            return str(self.stream.transport_of(client))
        return "udp"

    # --- errors ----------------------------------------------------------------------

    def internal_error(self, where: str, exc: BaseException) -> None:
        """Count (and log, at most once a minute per kind) an exception that
        a transport caught around the core or a socket."""
        kind = "%s:%s" % (where, type(exc).__name__)
        if self._limited.count(self.errors, kind):
            log.failure(
                "internal error handling {where} input (count {count}; logged at most once a minute per kind)",
                # Built from the exception: the batched reader reports it
                # after the fact, outside any ``except`` block.
                failure=Failure(exc, type(exc), exc.__traceback__),
                where=where,
                count=self.errors[kind],
            )
