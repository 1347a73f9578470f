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

TLS runs inside the connection (``TLSStreamProtocol``: an ``ssl.SSLObject``
on memory BIOs, fed by ``dataReceived`` and drained into the same direct
send as TCP) rather than in Twisted's ``TLSMemoryBIOProtocol``,
whose wrapper protocol and buffered second transport cost, per round trip,
a few Python layers and an epoll_ctl pair (issue #9).
"""

from __future__ import annotations

import signal
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet import defer, tcp
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from firezone_relay.adapters import dispatch
from firezone_relay.adapters.sourcekey import source_key
from firezone_relay.adapters.shell import Shell
from firezone_relay.core import commands as C
from firezone_relay.core.framing import FramingError, frame_length

log = Logger(namespace="firezone_relay.adapters.stream")

TCP = "tcp"
TLS = "tls"
TRANSPORTS = (TCP, TLS)

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_FIRST_ID = 1 << 20  # see "Routing" above
_ID_LIMIT = 1 << 32
_LISTEN_BACKLOG = 1024
_LOG_INTERVAL = 60.0

#: TLS 1.2 suites: forward secrecy and AEAD only (TLS 1.3 suites are all
#: AEAD and OpenSSL's defaults).  ECDSA and RSA certificates both work.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


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


class _Counter(dict):  # type: ignore[type-arg]
    """Counters by key; unknown keys start at 0."""

    def __missing__(self, key: Any) -> int:
        return 0


# --- TLS ----------------------------------------------------------------------


def make_tls_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A server context from PEM files: the certificate chain and its key.

    Raises ``ssl.SSLError`` or ``OSError`` when the files are missing,
    unreadable or do not belong together.

    TLS 1.2 and 1.3 only; on 1.2 ECDHE with AES-GCM or ChaCha20-Poly1305
    only; no compression, renegotiation or session tickets (``num_tickets``
    0 for TLS 1.3, ``OP_NO_TICKET`` for 1.2).  Python's ``ssl`` module has
    no switch for OpenSSL's server session cache: a TLS 1.2 full handshake
    leaves one session in it, at most 20,480 (OpenSSL's default size),
    dropped after their timeout.  The module also sets
    ``SSL_MODE_RELEASE_BUFFERS``: an idle connection holds no record buffers.
    """
    for path in (cert_path, key_path):
        with open(path, "rb"):  # OSError naming the file, not OpenSSL's "system lib"
            pass
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_SINGLE_ECDH_USE
        | ssl.OP_NO_TICKET
    )
    ctx.num_tickets = 0
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_cert_chain(cert_path, key_path)  # checks that the key matches
    return ctx


class TLSContext:
    """The server side of TLS, with a certificate that can be reloaded.

    Every new connection takes the current ``ssl.SSLContext``; ``reload``
    builds a new one from the same files and, only if that succeeds, makes it
    current.  Established connections keep the context they started with.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.context = make_tls_context(cert_path, key_path)
        self.reloads = 0

    def reload(self) -> bool:
        try:
            context = make_tls_context(self.cert_path, self.key_path)
        except OSError as exc:  # ssl.SSLError included
            log.error(
                "TLS certificate reload failed, keeping the current one: {error}",
                error=describe_tls_error(exc),
                cert=self.cert_path,
                key=self.key_path,
            )
            return False
        self.context = context
        self.reloads += 1
        log.info("TLS certificate reloaded from {cert}", cert=self.cert_path, key=self.key_path)
        return True

    def server_connection(self) -> Tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        """A server-side TLS connection on two memory BIOs: (TLS, in, out)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return self.context.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing


def describe_tls_error(exc: OSError) -> str:
    """What went wrong with a certificate or key file, in one line."""
    if isinstance(exc, ssl.SSLError):  # OpenSSL could not use the files' contents
        return "not a PEM certificate chain and its private key (%s)" % exc
    return "%s: %s" % (exc.filename or "", exc.strerror or exc)


# --- one connection ----------------------------------------------------------------


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
        transport = self.transport
        assert transport is not None
        transport.registerProducer(self, True)
        self._socket = getattr(transport, "socket", None)
        transport.setTcpNoDelay(True)
        transport.setTcpKeepAlive(True)
        if not self.handshaken:
            self._handshake_call = clock.callLater(service.limits.handshake_timeout, self._handshake_timed_out)
        self._idle_call = clock.callLater(service.limits.idle_timeout, self._idle_check)
        if not self.has_allocation:
            self._auth_call = clock.callLater(service.limits.auth_timeout, self._auth_timed_out)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        for name in ("_idle_call", "_handshake_call", "_auth_call"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
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
        assert self.transport is not None
        self.transport.abortConnection()

    # --- input ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        service = self.service
        service.reading = True
        try:
            self._input(data)
        finally:
            service.end_read()
        if not self.closed:
            held = self._holding()
            if held != self._held:
                self._account(held)

    def _holding(self) -> int:
        """Bytes of partial input kept until the next read."""
        return len(self._buffer)

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

    def _input(self, data: bytes) -> None:
        """What a read brought: frames here; TLS records in ``TLSStreamProtocol``."""
        self._frames(data)

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
        sockets = shell.sockets
        try:
            while end - offset >= 4:
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
                        elif len(t[2]) == 2:  # a UDP destination: inline Shell.transmit
                            try:
                                sockets[t[1]][t[0]].sendto(t[3], t[2])
                            except OSError as exc:
                                shell.send_failed(exc)
                            except KeyError:
                                shell.drops["no_socket"] += 1
                        else:  # another stream client
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

    # --- output -------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        if self.closed:
            self.service.drops["stream_closed"] += 1
            return
        if self._paused:
            self._backlog += len(payload)
            if self._backlog > self.service.limits.write_buffer:
                self.service.drops["stream_write_buffer"] += 1
                self.abort("write_buffer")
                return
        self.bytes_out += len(payload)
        pending = self._pending
        if pending is not None:
            pending.append(payload)
            self._pending_bytes += len(payload)
            if self._pending_bytes > self.service.limits.write_buffer:
                self.service.drops["stream_write_buffer"] += 1
                self.abort("write_buffer")
            return
        self._pending = [payload]
        self._pending_bytes = len(payload)
        self.service.flush_soon(self)

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
        if sock is not None and not transport._tempDataLen and not transport.dataBuffer:
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

    def stopProducing(self) -> None:
        self._paused = True

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
        for name in ("_idle_call", "_auth_call"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()

    def allocation_ended(self) -> None:
        self.has_allocation = False
        if not self.closed and self._idle_call is None:
            self._idle_check()


#: Plaintext read per ``SSLObject.read``: one record holds at most 2**14 bytes.
_TLS_READ = 1 << 14


class TLSStreamProtocol(StreamProtocol):
    """One TLS connection: ``StreamProtocol`` with an ``ssl.SSLObject`` on
    two memory BIOs in between, on the TCP transport itself.

    Twisted's ``TLSMemoryBIOProtocol`` would do the same through a wrapper
    protocol, a second transport and the TCP transport's buffer (an
    epoll_ctl pair per record); here a read is one BIO write and the
    ``read`` calls, and a flush is one ``write`` and one BIO read, sent like
    TCP.  The standard library's ``ssl`` is used rather than pyOpenSSL: its
    calls are C all the way (pyOpenSSL wraps each in several Python
    functions: 4 µs more per decrypt-and-encrypt pair on a warm cache, more
    after each wake-up), and an idle connection adds about 18 KiB to the
    relay's RSS instead of 26.  The handshake is driven by the client's
    bytes; a TLS error or the client's close_notify ends the connection
    (counted as closed by the client).
    """

    def __init__(self, service: "StreamService", transport_name: str, ip: str, port: int, connection_id: int) -> None:
        super().__init__(service, transport_name, ip, port, connection_id)
        self.handshaken = False
        self._tls: Optional[ssl.SSLObject] = None
        self._tls_in: Optional[ssl.MemoryBIO] = None
        self._tls_out: Optional[ssl.MemoryBIO] = None
        # The incoming record being received (``_track_records``): OpenSSL
        # takes a partial record out of the BIO into its own buffer, so what
        # it holds is counted here, from the record headers.
        self._record_header = b""
        self._record_missing = 0
        self._record_received = 0

    def connectionMade(self) -> None:
        tls_context = self.service.tls
        assert tls_context is not None
        self._tls, self._tls_in, self._tls_out = tls_context.server_connection()
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self._tls = self._tls_in = self._tls_out = None
        super().connectionLost(reason)

    def _holding(self) -> int:
        return len(self._buffer) + self._record_received

    def _track_records(self, data: bytes) -> None:
        """Follow TLS record boundaries (5-byte header with the length in
        bytes 3-4) to know how much of an incomplete record is held.  One
        step per record, no copy but of a split header."""
        n = len(data)
        i = 0
        header = self._record_header
        if header:  # a header split across reads (rare): complete it first
            take = min(5 - len(header), n)
            header += data[:take]
            i = take
            if len(header) < 5:
                self._record_header = header
                self._record_received += take
                return
            self._record_header = b""
            self._record_missing = (header[3] << 8) | header[4]
            self._record_received = 5
        missing = self._record_missing
        if missing:
            if missing > n - i:
                self._record_missing = missing - (n - i)
                self._record_received += n - i
                return
            i += missing
        while n - i >= 5:
            end = i + 5 + ((data[i + 3] << 8) | data[i + 4])
            if end > n:
                self._record_missing = end - n
                self._record_received = n - i
                return
            i = end
        self._record_missing = 0
        self._record_received = n - i
        if i < n:
            self._record_header = data[i:]

    def _input(self, data: bytes) -> None:
        """Decrypt ``data`` and hand each record's plaintext to ``_frames``."""
        tls = self._tls
        incoming = self._tls_in
        assert tls is not None and incoming is not None
        incoming.write(data)
        self._track_records(data)
        if not self.handshaken:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self._send_tls_output()
                return
            except ssl.SSLError:
                self._tls_ended()
                return
            self.handshaken = True
            call, self._handshake_call = self._handshake_call, None
            if call is not None and call.active():
                call.cancel()
            self._send_tls_output()  # the server's last flight
        # Each record's data is handled as soon as it is decrypted: the
        # ChannelData it carries leaves before the next record is read.
        # OpenSSL takes whole records from the BIO, so an empty BIO (and
        # nothing decrypted left over) means there is nothing more to read:
        # no read that would only raise SSLWantReadError (3.4 us, more than
        # a read that decrypts a record).
        read = tls.read
        while incoming.pending or tls.pending():
            try:
                plain = read(_TLS_READ)
            except ssl.SSLWantReadError:
                break  # a partial record: the rest comes with the next read
            except ssl.SSLError:
                if not self.closed:
                    self._tls_ended()
                return
            if not plain:  # the client's close_notify
                if not self.closed:
                    self._tls_ended()
                return
            self._frames(plain)
            if self.closed:
                return
        # What OpenSSL wrote while reading (the answer to a key update, say).
        self._send_tls_output()

    def _tls_ended(self) -> None:
        """The client closed TLS or broke it: answer (close_notify or the
        alert OpenSSL wrote), then close once that is sent."""
        self.closed = True
        tls = self._tls
        if tls is not None:
            try:
                tls.unwrap()
            except (ssl.SSLError, ValueError):
                pass  # SSLWantReadError: the client's close_notify never comes
            self._send_tls_output()
        transport: Any = self.transport
        transport.loseConnection()

    def _write(self, data: bytes) -> None:
        tls = self._tls
        if tls is None:
            return
        try:
            tls.write(data)  # records of at most 16 KiB, all into the BIO
        except ssl.SSLError:
            self._tls_ended()
            return
        self._send_tls_output()

    def _send_tls_output(self) -> None:
        """Send what OpenSSL wrote into its outgoing BIO, in one send."""
        outgoing = self._tls_out
        if outgoing is not None and outgoing.pending:
            StreamProtocol._write(self, outgoing.read())


@dispatch.fast_type
class _StreamServer(tcp.Server):  # type: ignore[misc]
    """Twisted's accepted TCP connection, as its own type so that
    ``dispatch`` hands its events to it without the per-event log context."""


class _StreamFactory(Factory):
    """Admits a connection within the limits and gives it an id."""

    noisy = False

    def __init__(self, service: "StreamService", transport_name: str) -> None:
        self.service = service
        self.transport_name = transport_name

    def buildProtocol(self, addr: Any) -> Optional[StreamProtocol]:
        return self.service.admit(self.transport_name, str(addr.host), int(addr.port))


# --- the service ------------------------------------------------------------------------


class StreamService(Service):
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
        reload_signal: Optional[int] = signal.SIGHUP,
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
        self.reload_signal = reload_signal
        self.handle_client_input = shell.handle_client_input
        self.pump = shell.pump
        self.connections: Dict[int, StreamProtocol] = {}
        self.per_ip: Dict[str, int] = {}  # by source key: IPv4 address or IPv6 /64
        #: Bytes of partial input held by all connections (``max_buffered``).
        self.buffered = 0
        self.listening: Dict[Tuple[str, int], Any] = {}
        self.accepted: Dict[str, int] = _Counter()
        self.rejected: Dict[Tuple[str, str], int] = _Counter()
        self.closed: Dict[Tuple[str, str], int] = _Counter()
        self.drops: Dict[str, int] = _Counter()
        self.allocations: Dict[str, int] = _Counter()
        self.bytes: Dict[Tuple[str, str], int] = _Counter()  # of closed connections
        self._next_id = _FIRST_ID
        self._all_closed: Optional[defer.Deferred[None]] = None
        self._dirty: list[StreamProtocol] = []
        self._flush_call: Any = None
        #: True while a read is being handled (a stream's, or a batched UDP
        #: read: see ``Shell.read_listener``); its end flushes,
        #: so ``flush_soon`` schedules nothing.
        self.reading = False
        self._previous_handler: Any = None
        self._logged: Dict[str, float] = {}
        shell.attach_stream(self)

    # --- life cycle -----------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.open_listeners()

    def startService(self) -> None:
        super().startService()
        self.open_listeners()
        if self.tls is not None and self.reload_signal is not None:
            self.reactor.callWhenRunning(self._install_reload_signal)

    def stopService(self) -> "defer.Deferred[Any]":
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(self.reload_signal or signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        waits = []
        for port in self.listening.values():
            d = port.stopListening()
            if d is not None:
                waits.append(d)
        self.listening.clear()
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
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
        log.info(
            "TURN over {transport} on {address}",
            transport=transport_name.upper(),
            address="[%s]:%d" % (ip, number) if family == 6 else "%s:%d" % (ip, number),
        )

    def _install_reload_signal(self) -> None:
        if not self.running or self._previous_handler is not None or self.reload_signal is None:
            return
        self._previous_handler = signal.signal(self.reload_signal, self._on_reload_signal)

    def _on_reload_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload_tls)

    def reload_tls(self) -> bool:
        """Reload the certificate and key (SIGHUP); connections stay up."""
        return self.tls.reload() if self.tls is not None else False

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
        key = conn.source
        left = self.per_ip.get(key, 1) - 1
        if left > 0:
            self.per_ip[key] = left
        else:
            self.per_ip.pop(key, None)
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
                client=_addr(conn.client),
                reason=reason,
            )

    def flush_soon(self, conn: StreamProtocol) -> None:
        """Flush ``conn`` once the read being handled ends (``reading``), or
        else once the events of this reactor turn are handled: a call at 0 s
        runs at the start of the next turn, before the poll.  Either way the
        messages of one burst leave in one send and none waits."""
        self._dirty.append(conn)
        if self._flush_call is None and not self.reading:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def begin_read(self) -> None:
        """A read begins (a batched UDP read, or a stream's): hold what it
        writes to connections until ``end_read``."""
        self.reading = True

    def end_read(self) -> None:
        """A read (``reading``) has been handled: write what it produced."""
        self.reading = False
        if self._dirty:
            self._flush()

    def _flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        dirty, self._dirty = self._dirty, []
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

    # --- output, called by the UDP shell and by connections ------------------------------

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
        now = time.monotonic()
        last = self._logged.get(kind)
        if last is None or now - last >= _LOG_INTERVAL:
            self._logged[kind] = now
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


def _addr(address: Any) -> str:
    ip, port = address[0], address[1]
    return "[%s]:%d" % (ip, port) if ":" in ip else "%s:%d" % (ip, port)


# --- metrics -------------------------------------------------------------------------


class StreamCollector(Collector):
    """Stream metrics, by ``transport`` label, read at scrape time.

    ``relay_active_allocations_by_transport`` covers UDP too: the core's
    allocation count minus those held by stream connections.
    """

    def __init__(self, service: StreamService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        by_transport = GaugeMetricFamily(
            "relay_active_allocations_by_transport",
            "Allocations in service, by the transport of the client leg (udp, tcp, tls).",
            labels=["transport"],
        )
        stream_total = sum(service.allocations[t] for t in TRANSPORTS)
        by_transport.add_metric(["udp"], max(0, service.relay.allocation_count - stream_total))
        for t in TRANSPORTS:
            by_transport.add_metric([t], service.allocations[t])
        yield by_transport

        connections = GaugeMetricFamily(
            "relay_stream_connections", "Open TURN client connections, by transport.", labels=["transport"]
        )
        counts: Dict[str, int] = {t: 0 for t in TRANSPORTS}
        for conn in service.connections.values():
            counts[conn.transport_name] += 1
        for t in TRANSPORTS:
            connections.add_metric([t], counts[t])
        yield connections

        accepted = CounterMetricFamily(
            "relay_stream_connections_accepted", "Connections accepted, by transport.", labels=["transport"]
        )
        for t in TRANSPORTS:
            accepted.add_metric([t], service.accepted[t])
        yield accepted

        rejected = CounterMetricFamily(
            "relay_stream_connections_rejected",
            "Connections refused at accept time, by transport and limit.",
            labels=["transport", "reason"],
        )
        for (t, reason), count in sorted(service.rejected.items()):
            rejected.add_metric([t, reason], count)
        yield rejected

        closed = CounterMetricFamily(
            "relay_stream_connections_closed",
            "Connections ended, by transport and reason (client: the client closed it; bad_frame, "
            "write_buffer, handshake_timeout, idle, auth_timeout, buffer_budget: the relay did).",
            labels=["transport", "reason"],
        )
        for (t, reason), count in sorted(service.closed.items()):
            closed.add_metric([t, reason], count)
        yield closed

        yield GaugeMetricFamily(
            "relay_stream_buffered_bytes",
            "Bytes of partial input (frames, TLS records) held by all client connections between reads.",
            value=service.buffered,
        )

        stream_bytes = CounterMetricFamily(
            "relay_stream_bytes",
            "Bytes read from and written to client connections (framing and TLS records excluded), by transport.",
            labels=["transport", "direction"],
        )
        for (t, direction), count in sorted(service.byte_totals().items()):
            stream_bytes.add_metric([t, direction], count)
        yield stream_bytes


__all__ = [
    "StreamCollector",
    "StreamLimits",
    "StreamProtocol",
    "StreamService",
    "TLSContext",
    "TLSStreamProtocol",
    "make_tls_context",
]
