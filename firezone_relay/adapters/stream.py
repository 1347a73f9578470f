"""TURN over TCP and TLS: the stream shell around the relay core (SPEC §8).

Theory of operation
-------------------
Only the client ↔ relay leg runs on a stream; allocations, peers and the
relayed leg stay UDP.  This transport knows the shell (``shell.Shell``),
whose core, pump and socket table it uses, and never the UDP transport.  A stream client is
identified to the core as ``(ip, port, connection_id)``, so one connection is
one 5-tuple: it holds at most one allocation, and closing the connection
deletes that allocation at once (``Relay.handle_client_closed``).

Input: ``dataReceived`` cuts the byte stream into frames with
``core.framing.frame_length`` (STUN by its length field, ChannelData by its
length padded to 4), feeds each complete frame to
``Relay.handle_client_input`` and keeps a partial frame (at most
``framing.MAX_FRAME`` bytes) for the next read.  A frame that cannot be
parsed ends the connection: a stream has no delimiter to resynchronise on.
ChannelData goes out as the ``Transmit`` the core returns; after a STUN
frame the shell's pump drains the replies.

Output: replies and ChannelData for a 3-tuple arrive here through
``StreamService.send`` (the shell routes them by destination) and are written
to that connection.  ChannelData towards stream clients is already padded by
the core.  What one read (a stream's, or a batched UDP read) produces for a
connection leaves in one ``send`` when that read has been handled; anything
written outside a read leaves at the start of the next reactor turn (a call
at 0 s, before the poll).  The send goes straight on the socket when
Twisted's buffer is empty (TLS: encrypted as one record per 16 KiB first).
With the batched UDP I/O, the ChannelData one stream read relays to peers
leaves in one ``sendmmsg`` per socket (``_udpio.IO.send``).  Each
connection registers itself as a streaming producer of its TCP transport,
so Twisted tells it when the transport's buffer is full; past that point it
counts what it is asked to write, and once that exceeds
``StreamLimits.write_buffer`` the connection is aborted: a client that does not read costs one connection, and the
relay never buffers without bound.

Routing: a stream client's address is a 3-tuple, a UDP one a 2-tuple; the
shell and the per-packet paths route by that length.  Connection ids are
drawn from ``[2**20, 2**32)``; a raw UDP ``sendto`` would refuse such a
3-tuple anyway (``TypeError`` on an IPv4 socket, ``OverflowError`` on an
IPv6 one, where the third item would be a flow label of at most 20 bits), so
a datagram meant for a stream client can never leave as UDP.

Timers, all per connection: a TLS handshake must finish within
``handshake_timeout``; a connection that holds no allocation is closed after
``idle_timeout`` without a complete frame (a drip-fed partial frame does not
count, so a slowloris client is closed too); while it holds an allocation
the allocation's lifetime is the idle timeout: a client that vanished
without a FIN stops refreshing, the core expires the allocation, and the
idle check, measured from the last complete frame, closes the connection.
TCP keepalive is on as well.  Apart from those, a connection that has not
allocated within ``auth_timeout`` of its opening is closed whatever it sends
(Bindings, or a steady trickle of complete frames, do not keep it): the
unauthenticated cost of a connection is bounded in time.

Limits at accept time: ``max_connections`` in total and
``max_connections_per_ip`` (per source: an IPv4 address or an IPv6 /64,
``sourcekey.source_key``); beyond them the connection is closed before any
byte is read.  Memory for partial input is bounded across all connections:
what each connection holds between reads (a partial frame, and with TLS a
partial record, counted from the record headers since OpenSSL keeps it in
its own buffer) counts against ``max_buffered``, and a
connection whose holding would take the total past it is closed
(``buffer_budget``).  TLS: 1.2 or newer, ECDHE with AES-GCM or ChaCha20-Poly1305
only; ``TLSContext.reload`` (on SIGHUP) swaps the certificate for new
connections while established ones carry on with the old one.

TLS (the context, its reload, and ``TLSStreamProtocol``: TLS on memory
BIOs inside the connection) lives in ``tls.py``; one connection
(``StreamProtocol``, ``StreamLimits``) in ``connection.py``; the stream
metrics in ``metrics.StreamCollector``.
"""

from __future__ import annotations

import socket
from errno import EWOULDBLOCK
from typing import Any, Dict, Optional, Tuple

from twisted.internet import defer, main, tcp
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from firezone_relay.adapters import dispatch
from firezone_relay.adapters._twisted import Counts, ListenerService, LimitedLog, cancel_attributes, format_address
from firezone_relay.adapters.connection import TCP, TLS, TRANSPORTS, StreamLimits, StreamProtocol
from firezone_relay.adapters.shell import Shell
from firezone_relay.adapters.sourcekey import source_key
from firezone_relay.adapters.tls import TLSContext, TLSStreamProtocol
from firezone_relay.core import commands as C

log = Logger(namespace="firezone_relay.adapters.stream")

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_FIRST_ID = 1 << 20  # see "Routing" above
_ID_LIMIT = 1 << 32
_LISTEN_BACKLOG = 1024


@dispatch.fast_type
class _StreamServer(tcp.Server):
    """Twisted's accepted TCP connection, as its own type so that
    ``dispatch`` hands its events to it without the per-event log context."""

    def direct_read(self) -> None:
        # What ``dispatch`` calls on a plain read event instead of Twisted's
        # _doReadOrWrite: tcp.Connection.doRead and _dataReceived written out
        # (two Python frames less per read), and on end of file or a failed
        # read the disconnect _doReadOrWrite makes.  Other events, and other
        # reactors, take Twisted's own doRead.
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as exc:
            if exc.args[0] != EWOULDBLOCK:
                self._read_ended(main.CONNECTION_LOST)
            return
        if data:
            self.protocol.dataReceived(data)
        else:
            self._read_ended(main.CONNECTION_DONE)

    def _read_ended(self, why: Any) -> None:
        dispatch.disconnect(self.reactor, self, why)


class _StreamFactory(Factory):
    """Admits a connection within the limits and gives it an id."""

    noisy = False

    def __init__(self, service: "StreamService", transport_name: str) -> None:
        self.service = service
        self.transport_name = transport_name

    def buildProtocol(self, addr: Any) -> Optional[StreamProtocol]:
        return self.service.admit(self.transport_name, str(addr.host), int(addr.port))


# --- the service ------------------------------------------------------------------------


class StreamService(ListenerService):
    """TCP (and, given a ``TLSContext``, TLS) listeners feeding the core of
    ``shell``, which routes 3-tuple destinations back here (this service
    registers with ``Shell.attach_stream`` and becomes its child).

    ``tcp_port`` 0 means the UDP listen port; ``tls_port`` 0 asks for any
    free port (tests).  ``bind_ip4`` / ``bind_ip6``: ``None`` for a family not
    served.  The shell's clock owns the timers.
    """

    name = "stream"

    def __init__(
        self,
        shell: Shell,
        tcp_port: Optional[int] = None,
        bind_ip4: Optional[str] = "0.0.0.0",
        bind_ip6: Optional[str] = None,
        tls: Optional[TLSContext] = None,
        tls_port: int = 5349,
        limits: StreamLimits = StreamLimits(),
    ) -> None:
        self.shell = shell
        self.relay = shell.relay
        self.tcp_port = tcp_port
        self.bind = {4: bind_ip4, 6: bind_ip6}
        self.tls = tls
        self.tls_port = tls_port
        self.limits = limits
        self.reactor = shell.reactor
        self.clock = shell.clock
        self.now = shell.now
        self.handle_client_input = shell.handle_client_input
        self.pump = shell.pump
        self.connections: Dict[int, StreamProtocol] = {}
        self.per_ip: Dict[str, int] = {}  # by source key: IPv4 address or IPv6 /64
        #: Bytes of partial input held by all connections (``max_buffered``).
        self.buffered = 0
        self.listening: Dict[Tuple[str, int], Any] = {}
        self.accepted: Dict[str, int] = Counts()
        self.rejected: Dict[Tuple[str, str], int] = Counts()
        self.closed: Dict[Tuple[str, str], int] = Counts()
        self.drops: Dict[str, int] = Counts()
        self.allocations: Dict[str, int] = Counts()
        self.bytes: Dict[Tuple[str, str], int] = Counts()  # of closed connections
        self._next_id = _FIRST_ID
        self._all_closed: Optional[defer.Deferred[None]] = None
        #: Connections that wrote during this read; ``end_read`` flushes
        #: them (a connection appends itself: ``StreamProtocol.send``).
        self.dirty: list[StreamProtocol] = []
        self._flush_call: Any = None
        #: True while a read is being handled (a stream's, or a batched UDP
        #: read: see ``Shell.read_listener``); its end flushes,
        #: so ``flush_soon`` schedules nothing.
        self.reading = False
        self._limited = LimitedLog()
        shell.attach_stream(self)

    # --- life cycle -----------------------------------------------------------

    def stopService(self) -> "defer.Deferred[Any]":
        super().stopService()
        waits = []
        for port in self.listening.values():
            d = port.stopListening()
            if d is not None:
                waits.append(d)
        self.listening.clear()
        cancel_attributes(self, "_flush_call")
        for conn in list(self.connections.values()):
            conn.abort("shutdown")
        if self.connections:  # aborted connections go in the next reactor turn
            self._all_closed = defer.Deferred()
            waits.append(self._all_closed)
        return defer.gatherResults(waits, consumeErrors=True)

    def open_listeners(self) -> None:
        """Open the TCP (and TLS) listeners of each family served, once the
        shell serves (portal mode: ``Shell.start_serving``)."""
        if not self.shell.serving:
            return
        if self.limits.max_connections <= 0:
            return  # TCP and TLS are off
        if self.tcp_port is None or self.tcp_port == 0:
            self.tcp_port = self.shell.listen_port
        wanted = [(TCP, self.tcp_port)]
        if self.tls is not None:
            wanted.append((TLS, self.tls_port))
        for family in (4, 6):
            if self.bind[family] is None:
                continue
            for transport_name, port in wanted:
                if (transport_name, family) not in self.listening:
                    self._listen(transport_name, family, port)

    def _listen(self, transport_name: str, family: int, port: int) -> None:
        sock = self._listen_socket(transport_name, family, port)
        factory = _StreamFactory(self, transport_name)
        try:
            listening = self.reactor.adoptStreamPort(sock.fileno(), _AF[family], factory)
        finally:
            sock.close()  # the reactor holds its own duplicate
        if isinstance(listening, tcp.Port):
            listening.transport = _StreamServer  # accepted connections: see dispatch
        number = listening.getHost().port
        if transport_name == TLS:
            self.tls_port = number
        else:
            self.tcp_port = number
        self.listening[(transport_name, family)] = listening

    def _listen_socket(self, transport_name: str, family: int, port: int) -> socket.socket:
        """A listening socket of ``family`` on ``port``, bound (a worker's: adopted)."""
        ip = self.bind[family]
        sock = socket.socket(_AF[family], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((ip, port))
            sock.listen(_LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise CannotListenError(ip, port, exc) from exc
        number = sock.getsockname()[1]
        log.info(
            "TURN over {transport} on {address}",
            transport=transport_name.upper(),
            address="[%s]:%d" % (ip, number) if family == 6 else "%s:%d" % (ip, number),
        )
        return sock

    # --- connections ----------------------------------------------------------

    def admit(self, transport_name: str, ip: str, port: int) -> Optional[StreamProtocol]:
        limits = self.limits
        reason = None
        if len(self.connections) >= limits.max_connections:
            reason = "max_connections"
        elif self.per_ip.get(source_key(ip), 0) >= limits.max_connections_per_ip:
            reason = "max_connections_per_ip"
        if reason is not None:
            self.rejected[(transport_name, reason)] += 1
            self._log_limited(reason, "stream connection from {ip} refused: {reason}", ip=ip, reason=reason)
            return None
        connection_id = self._new_id()
        conn = (TLSStreamProtocol if transport_name == TLS else StreamProtocol)(
            self, transport_name, ip, port, connection_id
        )
        self.connections[connection_id] = conn
        self.per_ip[conn.source] = self.per_ip.get(conn.source, 0) + 1
        self.accepted[transport_name] += 1
        return conn

    def _new_id(self) -> int:
        connection_id = self._next_id
        while connection_id in self.connections:
            connection_id += 1
            if connection_id >= _ID_LIMIT:
                connection_id = _FIRST_ID
        self._next_id = connection_id + 1 if connection_id + 1 < _ID_LIMIT else _FIRST_ID
        return connection_id

    def connection_lost(self, conn: StreamProtocol) -> None:
        if self.connections.get(conn.connection_id) is not conn:
            return
        try:
            # The core deletes the connection's allocation; the pump closes
            # its ports and logs it (the connection is still known here, so
            # the log line says which transport it was).
            self.relay.handle_client_closed(conn.client, self.now())
            self.pump()
        except Exception as exc:
            self.internal_error(exc)
        del self.connections[conn.connection_id]
        left = self.per_ip.pop(conn.source, 1) - 1
        if left > 0:
            self.per_ip[conn.source] = left
        if conn.has_allocation:
            conn.has_allocation = False
            self.allocations[conn.transport_name] -= 1
        self.bytes[(conn.transport_name, "received")] += conn.bytes_in
        self.bytes[(conn.transport_name, "sent")] += conn.bytes_out
        if conn.close_reason is None:
            self.closed[(conn.transport_name, "client")] += 1
        if not self.connections and self._all_closed is not None:
            done, self._all_closed = self._all_closed, None
            done.callback(None)

    def closed_because(self, conn: StreamProtocol, reason: str) -> None:
        conn.close_reason = reason
        self.closed[(conn.transport_name, reason)] += 1
        if reason not in ("shutdown", "idle"):
            self._log_limited(
                reason,
                "{transport} connection from {client} closed: {reason}",
                transport=conn.transport_name,
                client=format_address(conn.client),
                reason=reason,
            )

    def flush_soon(self, conn: StreamProtocol) -> None:
        """Flush ``conn`` once the read being handled ends (``reading``), or
        else once the events of this reactor turn are handled: a call at 0 s
        runs at the start of the next turn, before the poll.  Either way the
        messages of one burst leave in one send and none waits."""
        self.dirty.append(conn)
        if self._flush_call is None and not self.reading:
            self._flush_call = self.reactor.callLater(0, self.end_read)

    def begin_read(self) -> None:
        """A read begins (a batched UDP read, or a stream's): hold what it
        writes to connections until ``end_read``."""
        self.reading = True

    def end_read(self) -> None:
        """A read (``reading``) has been handled, or the turn after a write
        outside a read has begun (``flush_soon``'s call): write what it
        produced, and drop the call if it is still to come."""
        self.reading = False
        if self._flush_call is not None:
            cancel_attributes(self, "_flush_call")
        if self.dirty:
            dirty, self.dirty = self.dirty, []
            for conn in dirty:
                try:
                    conn.flush()
                except Exception as exc:
                    self.internal_error(exc)

    def transport_of(self, client: Any) -> str:
        """``tcp`` or ``tls`` for a 3-tuple client still connected, else ``udp``."""
        if len(client) == 3:
            conn = self.connections.get(client[2])
            return conn.transport_name if conn is not None else TCP
        return "udp"

    # --- output, called by the shell and by connections ----------------------------------

    def send(self, destination: Any, payload: bytes) -> None:
        """Write ``payload`` to the connection of the 3-tuple ``destination``."""
        conn = self.connections.get(destination[2])
        if conn is None:
            self.drops["stream_closed"] += 1
            return
        conn.send(payload)

    def allocation_event(self, command: Any) -> None:
        """``AllocationCreated`` / ``AllocationDeleted`` for a 3-tuple client."""
        conn = self.connections.get(command.client[2])
        if conn is None or conn.client != command.client:
            return
        created = isinstance(command, C.AllocationCreated)
        if created and not conn.has_allocation:
            self.allocations[conn.transport_name] += 1
            conn.allocation_started()
        elif not created and conn.has_allocation:
            self.allocations[conn.transport_name] -= 1
            conn.allocation_ended()

    # --- errors ----------------------------------------------------------------------

    def internal_error(self, exc: Exception) -> None:
        self.shell.internal_error("stream", exc)

    def _log_limited(self, kind: str, fmt: str, **fields: Any) -> None:
        if self._limited.due(kind):
            log.info(fmt + " (logged at most once a minute per reason)", **fields)

    # --- introspection ----------------------------------------------------------------

    def connection_count(self, transport_name: Optional[str] = None) -> int:
        if transport_name is None:
            return len(self.connections)
        return sum(1 for c in self.connections.values() if c.transport_name == transport_name)

    def byte_totals(self) -> Dict[Tuple[str, str], int]:
        totals = dict(self.bytes)
        for conn in self.connections.values():
            key = (conn.transport_name, "received")
            totals[key] = totals.get(key, 0) + conn.bytes_in
            key = (conn.transport_name, "sent")
            totals[key] = totals.get(key, 0) + conn.bytes_out
        return totals


__all__ = [
    "TCP",
    "TLS",
    "TRANSPORTS",
    "StreamLimits",
    "StreamProtocol",
    "StreamService",
    "TLSContext",
    "TLSStreamProtocol",
]
