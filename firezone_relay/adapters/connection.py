"""One TURN client connection on a stream (``StreamProtocol``) and the
bounds on what such connections may cost (``StreamLimits``).

The theory of operation (framing, output batching, timers, limits) is in
``stream.py``, whose ``StreamService`` admits connections and owns the
shared accounting; TLS connections are ``tls.TLSStreamProtocol``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from firezone_relay.adapters import dispatch
from firezone_relay.adapters._twisted import cancel_attributes
from firezone_relay.adapters.sourcekey import source_key
from firezone_relay.core.framing import FramingError, frame_length

if TYPE_CHECKING:
    from firezone_relay.adapters.stream import StreamService

TCP = "tcp"
TLS = "tls"
TRANSPORTS = (TCP, TLS)


@dataclass(frozen=True)
class StreamLimits:
    """Bounds on what stream clients may cost (SPEC §8)."""

    max_connections: int = 16384
    max_connections_per_ip: int = 256
    #: Bytes a connection may be asked to write once its transport's own
    #: buffer is full; beyond it the connection is aborted.
    write_buffer: int = 256 * 1024
    handshake_timeout: float = 10.0
    #: Seconds without a complete frame after which a connection that holds
    #: no allocation is closed.
    idle_timeout: float = 60.0
    #: Seconds from accept within which a connection must allocate, whatever
    #: it sends meanwhile; then it is closed.
    auth_timeout: float = 30.0
    #: Bytes of partial input (frames, TLS records) all connections together
    #: may hold between reads.
    max_buffered: int = 16 * 1024 * 1024



@implementer(IPushProducer)
class StreamProtocol(Protocol):
    """One TCP connection of one TURN client (``TLSStreamProtocol``: TLS)."""

    def __init__(self, service: "StreamService", transport_name: str, ip: str, port: int, connection_id: int) -> None:
        self.service = service
        self.transport_name = transport_name
        self.client = (ip, port, connection_id)
        self.connection_id = connection_id
        self.closed = False
        #: Why the relay closed it; None when the client did.
        self.close_reason: Optional[str] = None
        self.has_allocation = False
        self.handshaken = True
        self.last_frame = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self._buffer = b""
        self._paused = False
        self._backlog = 0
        self._idle_call: Any = None
        self._handshake_call: Any = None
        self._auth_call: Any = None
        #: Bytes this connection holds in ``service.buffered``.
        self._held = 0
        #: The key its per-source count is kept under.
        self.source = source_key(ip)
        #: The socket, for a direct send when Twisted buffers nothing.
        self._socket: Optional[socket.socket] = None
        #: What was written during this reactor turn (see flush).
        self._pending: Optional[list[bytes]] = None
        self._pending_bytes = 0

    # --- life cycle -------------------------------------------------------------

    def connectionMade(self) -> None:
        service = self.service
        clock = service.clock
        self.last_frame = service.now()
        transport: Any = self.transport  # an ITCPTransport (the interface type says less)
        assert transport is not None
        transport.registerProducer(self, True)
        self._socket = dispatch.direct_socket(transport)
        transport.setTcpNoDelay(True)
        transport.setTcpKeepAlive(True)
        if not self.handshaken:
            self._handshake_call = clock.callLater(service.limits.handshake_timeout, self._handshake_timed_out)
        self._idle_call = clock.callLater(service.limits.idle_timeout, self._idle_check)
        if not self.has_allocation:
            self._auth_call = clock.callLater(service.limits.auth_timeout, self._auth_timed_out)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        cancel_attributes(self, "_idle_call", "_handshake_call", "_auth_call")
        if self._held:
            self.service.buffered -= self._held
            self._held = 0
        self.service.connection_lost(self)

    def abort(self, reason: str) -> None:
        """Close now, dropping whatever is buffered, and count why."""
        if self.closed:
            return
        self.closed = True
        self.service.closed_because(self, reason)
        transport: Any = self.transport
        assert transport is not None
        transport.abortConnection()

    # --- input ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        service = self.service
        service.reading = True
        try:
            self._input(data)
        finally:
            # service.end_read(), without the call when nothing was written.
            service.reading = False
            if service.dirty:
                service.end_read()
        if not self.closed:
            # Bytes of partial input kept until the next read.
            held = len(self._buffer) + self._record_received
            if held != self._held:
                self._account(held)

    #: Bytes of an incomplete TLS record held by OpenSSL (``TLSStreamProtocol``).
    _record_received = 0

    def _account(self, held: int) -> None:
        """Move this connection's share of ``service.buffered`` to ``held``,
        or close it if that would pass ``max_buffered``."""
        service = self.service
        total = service.buffered - self._held + held
        if held > self._held and total > service.limits.max_buffered:
            self._buffer = b""
            self.abort("buffer_budget")
            return
        service.buffered = total
        self._held = held

    def _frames(self, data: bytes) -> None:
        """Cut ``data`` (plaintext) into frames and hand each to the core."""
        service = self.service
        self.bytes_in += len(data)
        buffer = self._buffer + data if self._buffer else data
        end = len(buffer)
        offset = 0
        now = service.now()
        handle = service.handle_client_input
        client = self.client
        shell = service.shell
        io = shell.io
        # With the batched UDP I/O, the ChannelData this read relays leaves in
        # one sendmmsg per socket (io.send) instead of one sendto each.
        out: Optional[list[Any]] = [] if io is not None else None
        try:
            while end - offset >= 4:
                if 0x40 <= buffer[offset] < 0x80:  # ChannelData: frame_length's first case, inline
                    size = 4 + ((((buffer[offset + 2] << 8) | buffer[offset + 3]) + 3) & ~3)
                else:
                    try:
                        size = frame_length(buffer, offset)
                    except FramingError:
                        self._buffer = b""
                        self.abort("bad_frame")
                        return
                if size == 0 or size > end - offset:
                    break
                frame = buffer if size == end else buffer[offset : offset + size]
                offset += size
                self.last_frame = now  # before the core: its reply may end an allocation
                try:
                    t = handle(frame, client, now)
                    if t is not None:
                        if out is not None:
                            out.append(t)
                        else:
                            shell.transmit(t)
                    elif frame[0] < 0x40:  # STUN: replies wait in the core's command queue
                        if out:
                            # What the core relayed leaves first: the commands
                            # may close the socket it was relayed from.
                            io.send(out)
                            out = []
                        service.pump()
                except Exception as exc:  # a core bug must not take the connection down
                    service.internal_error(exc)
                if self.closed:
                    return
            self._buffer = buffer[offset:] if offset else buffer
        finally:
            if out:
                try:
                    io.send(out)
                except Exception as exc:
                    service.internal_error(exc)

    #: What a read brought: frames here (no frame in between); TLS records
    #: in ``TLSStreamProtocol``.
    _input = _frames

    # --- output -------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        if self.closed:
            self.service.drops["stream_closed"] += 1
            return
        size = len(payload)
        if self._paused:
            self._backlog += size
            if self._backlog > self.service.limits.write_buffer:
                self._write_buffer_exceeded()
                return
        self.bytes_out += size
        pending = self._pending
        if pending is not None:
            pending.append(payload)
            self._pending_bytes += size
            if self._pending_bytes > self.service.limits.write_buffer:
                self._write_buffer_exceeded()
            return
        self._pending = [payload]
        self._pending_bytes = size
        service = self.service
        if service.reading:  # flush_soon's common case, inline: end_read flushes
            service.dirty.append(self)
        else:
            service.flush_soon(self)

    def _write_buffer_exceeded(self) -> None:
        """More than ``write_buffer`` bytes asked of a connection that does
        not take them: it goes (``StreamLimits.write_buffer``)."""
        self.service.drops["stream_write_buffer"] += 1
        self.abort("write_buffer")

    def flush(self) -> None:
        """Write what this reactor turn produced, in one send (one TLS record)."""
        pending, self._pending = self._pending, None
        if not pending or self.closed:
            return
        self._write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _write(self, data: bytes) -> None:
        """Bytes for the wire, straight on the socket when Twisted holds
        nothing: a loop iteration and two epoll_ctl calls less than
        ``transport.write``.  What the kernel does not take goes through
        Twisted's buffer, so order and the write-buffer bound are kept."""
        transport: Any = self.transport
        sock = self._socket
        # Whether Twisted holds unsent bytes: its two private buffers
        # (dispatch.direct_socket checked that the transport has them).
        if sock is not None and not (transport._tempDataLen or transport.dataBuffer):
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0  # BlockingIOError; anything else the transport's own write notices
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    # IPushProducer: the transport's buffer is full / drained again.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._backlog = 0

    #: The transport is going: what is asked of it from now on counts as
    #: paused (never more than ``write_buffer``).
    stopProducing = pauseProducing

    # --- timers -------------------------------------------------------------------------

    def _auth_timed_out(self) -> None:
        self._auth_call = None
        if not self.closed and not self.has_allocation:
            self.abort("auth_timeout")

    def _handshake_timed_out(self) -> None:
        self._handshake_call = None
        if not self.handshaken:
            self.abort("handshake_timeout")

    def _idle_check(self) -> None:
        self._idle_call = None
        if self.closed or self.has_allocation:
            return  # the allocation's lifetime bounds it; see allocation_ended
        service = self.service
        deadline = self.last_frame + service.limits.idle_timeout
        now = service.now()
        if deadline <= now:
            self.abort("idle")
        else:
            self._idle_call = service.clock.callLater(deadline - now, self._idle_check)

    def allocation_started(self) -> None:
        self.has_allocation = True
        cancel_attributes(self, "_idle_call", "_auth_call")

    def allocation_ended(self) -> None:
        self.has_allocation = False
        if not self.closed and self._idle_call is None:
            self._idle_check()
