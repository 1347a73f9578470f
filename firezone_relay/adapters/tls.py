"""TLS for the stream transport: the server context (reloadable on
SIGHUP) and the connection that runs TLS on memory BIOs.

TLS runs inside the connection (``TLSStreamProtocol``: an ``ssl.SSLObject``
on memory BIOs, fed by ``dataReceived`` and drained into the same direct
send as TCP) rather than in Twisted's ``TLSMemoryBIOProtocol``, whose
wrapper protocol and buffered second transport cost, per round trip, a few
Python layers and an epoll_ctl pair (issue #9).  TLS 1.2 or newer, ECDHE with
AES-GCM or ChaCha20-Poly1305 only; ``TLSContext.reload`` swaps the
certificate for new connections while established ones carry on with the
old one.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any, Optional, Tuple

from twisted.logger import Logger

from firezone_relay.adapters._twisted import cancel_attributes
from firezone_relay.adapters.connection import StreamProtocol

if TYPE_CHECKING:
    from firezone_relay.adapters.stream import StreamService

# The stream transport's namespace: these lines are about its connections.
log = Logger(namespace="firezone_relay.adapters.stream")

#: TLS 1.2 suites: forward secrecy and AEAD only (TLS 1.3 suites are all
#: AEAD and OpenSSL's defaults).  ECDSA and RSA certificates both work.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


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
        #: What ``read``/``write``/``pending`` are called on (``_c_object``).
        self._tls_c: Any = None
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
        self._tls_c = _c_object(self._tls)
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self._tls = self._tls_c = self._tls_in = self._tls_out = None
        super().connectionLost(reason)

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
        tls = self._tls_c
        incoming, outgoing = self._tls_in, self._tls_out
        assert tls is not None and incoming is not None and outgoing is not None
        incoming.write(data)
        n = len(data)
        if (
            n >= 5
            and not self._record_missing
            and not self._record_header
            and 5 + ((data[3] << 8) | data[4]) == n
        ):
            self._record_received = 0  # one whole record, the usual read: nothing held
        else:
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
            cancel_attributes(self, "_handshake_call")
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
        # What OpenSSL wrote while reading (the answer to a key update, say);
        # not closed, so not lost (connectionLost drops the BIOs).
        if outgoing.pending:
            StreamProtocol._write(self, outgoing.read())

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

    def flush(self) -> None:
        """Encrypt what this reactor turn produced and send it, in one send
        (in place of ``StreamProtocol.flush`` and its ``_write``;
        ``StreamProtocol._write`` is the plaintext wire write)."""
        pending, self._pending = self._pending, None
        tls = self._tls_c
        if not pending or self.closed or tls is None:
            return
        try:
            tls.write(pending[0] if len(pending) == 1 else b"".join(pending))  # records of at most 16 KiB
        except ssl.SSLError:
            self._tls_ended()
            return
        outgoing: Any = self._tls_out  # not None while _tls_c is not
        if outgoing.pending:
            StreamProtocol._write(self, outgoing.read())

    def _send_tls_output(self) -> None:
        """Send what OpenSSL wrote into its outgoing BIO, in one send."""
        outgoing = self._tls_out
        if outgoing is not None and outgoing.pending:
            StreamProtocol._write(self, outgoing.read())


def _c_object(tls: ssl.SSLObject) -> Any:
    """The C object behind ``tls`` when it has the methods the connection
    calls per record, else ``tls`` itself.

    ``ssl.SSLObject``'s ``read``, ``write``, ``pending`` and
    ``do_handshake`` are Python methods that only call the same methods of
    its ``_ssl._SSLSocket`` (``_sslobj``), with the same arguments and
    exceptions; calling that object directly saves a Python frame per call
    (three per round trip).  ``_sslobj`` is a private attribute of the
    standard library, so the public object is the fallback."""
    inner = getattr(tls, "_sslobj", None)
    if inner is not None and all(callable(getattr(inner, m, None)) for m in ("read", "write", "pending", "do_handshake")):
        return inner
    return tls
