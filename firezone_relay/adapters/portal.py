"""The portal control channel: the Phoenix session over an Autobahn websocket.

Theory of operation: ``firezone_relay.core.phoenix`` holds the protocol
(``PhoenixSession``: join, heartbeats, replies, ``init``; ``ReconnectPolicy``:
how long to wait and when to give up).  This module owns the socket and the
timers and runs one pump after every input, the same shape as the UDP
adapter:

1. feed the input to the session (the websocket opened, a text frame, the
   timer fired);
2. carry out its events: ``SendText`` → ``sendMessage``; ``Joined`` → reset
   the backoff; the first ``InitReceived`` → ``on_init()`` (the relay opens
   its STUN/TURN listeners); ``Reconnect`` → drop the connection; ``Fatal`` →
   ``on_fatal(reason)`` (the process exits non-zero); ``Ignored`` → a
   rate-limited log line;
3. re-arm the single ``DelayedCall`` from ``poll_timeout()``.

Connecting is our own loop (``_connect`` → ``protocol_lost``/``_connect_failed`` →
``ReconnectPolicy.next_delay`` → ``callLater(_connect)``), not
``ClientService``: its ``prepareConnection`` path wedges on an early
disconnect (see the style anchors §5.4), and we need to look at every failure
anyway (HTTP 401 is final, ``Retry-After`` replaces the backoff).  Each
attempt is ``HostnameEndpoint`` (wrapped by ``wrapClientTLS`` with
``optionsForClientTLS(host)`` for ``wss://``: autobahn's own ``connectWS``
would not verify the certificate) with one 15 s budget for TCP+TLS+upgrade.

A failed upgrade: autobahn's client ``processHandshake`` parses the HTTP
response into ``http_status_line`` and ``http_headers`` (lower-case names)
*before* it calls ``failHandshake``, so both are on the protocol when
``connectionLost`` runs.  That is how the status (401 → fatal) and
``Retry-After`` are read; it works whenever the server sent the complete
header block, which is what any HTTP server does before closing.  The body
(the portal's problem JSON) is whatever arrived in the same reads; it is
only used for the log line.

The relay secret (``stamp_secret``) is fixed for the life of the process, so
credentials handed out before a portal outage stay valid after it; the UDP
service never waits for the portal once it serves.
"""

from __future__ import annotations

import email.utils
import platform
import re
from typing import Any, Callable, List, Optional, Tuple, cast
from urllib.parse import urlencode, urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from firezone_relay import __version__
from firezone_relay.adapters._twisted import OneTimer, cancel_attributes, default_reactor
from firezone_relay.core.phoenix import (
    MAX_FRAME_BYTES,
    Fatal,
    Ignored,
    InitReceived,
    Joined,
    PhoenixSession,
    Reconnect,
    ReconnectPolicy,
    SendText,
)

log = Logger(namespace="firezone_relay.adapters.portal")

#: One budget for TCP connect + TLS handshake + websocket upgrade (upstream's CONNECT_TIMEOUT).
CONNECT_TIMEOUT = 15.0
#: Frames up to this size reach the session (which ignores those over
#: ``MAX_FRAME_BYTES``); a bigger one makes autobahn fail the connection
#: (close code 1009), which bounds memory.
MAX_MESSAGE_BYTES = 4 * MAX_FRAME_BYTES
#: ``Ignored`` frames: at most this many log lines per window, then a count.
IGNORED_LOG_BURST = 5
IGNORED_LOG_WINDOW = 60.0
#: The environment variable naming a PEM file of CA certificates that replaces
#: the platform trust store for ``wss://`` (self-hosted portals, tests).
CA_FILE_ENV = "FIREZONE_PORTAL_CA_FILE"

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


# --- pure helpers -------------------------------------------------------------


def portal_url(api_url: str, name: Optional[str], ipv4: Optional[str], ipv6: Optional[str], port: int) -> str:
    """``<api-url>/relay/websocket?[name=]&ipv4=&ipv6=&port=`` as upstream builds it.

    ``http`` becomes ``ws`` and ``https`` becomes ``wss``; the query is in
    upstream's order, form-encoded (``:`` in an IPv6 address is ``%3A``).
    """
    parts = urlsplit(api_url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError("--api-url must be a ws://, wss://, http:// or https:// URL (got %r)" % (api_url,))
    query: List[Tuple[str, str]] = []
    if name:
        query.append(("name", name))
    if ipv4:
        query.append(("ipv4", ipv4))
    if ipv6:
        query.append(("ipv6", ipv6))
    query.append(("port", str(port)))
    path = parts.path.rstrip("/") + "/relay/websocket"
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


def user_agent() -> str:
    """``<os>/<version> relay/<version> (<arch>; <kernel>)``, like upstream's ``get_user_agent``."""
    system, release = platform.system() or "unknown", platform.release() or "unknown"
    os_name, os_version = system, release
    try:
        info = platform.freedesktop_os_release()
    except OSError:
        info = {}
    if info.get("NAME"):
        os_name = info["NAME"].split()[0]
        os_version = info.get("VERSION_ID") or release
    token = re.compile(r"[^A-Za-z0-9._+-]")
    return "%s/%s relay/%s (%s; %s)" % (
        token.sub("_", os_name),
        token.sub("_", os_version),
        __version__,
        platform.machine() or "unknown",
        release,
    )


def bearer_header(token: str) -> str:
    """The ``X-Authorization`` value.  All whitespace goes: a token never
    contains any, and a stray newline must not end the header."""
    return "Bearer " + "".join(token.split())


def load_trust_root(path: str) -> Any:
    """An ``IOpenSSLTrustRoot`` with the CA certificates of a PEM file."""
    from twisted.internet import ssl

    with open(path, "rb") as f:
        data = f.read()
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise ValueError("%s holds no PEM certificate" % path)
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


#: The longest wait a ``Retry-After`` can ask for (5 minutes: room for a
#: portal's rate-limit hint, five times the backoff's longest interval).
#: Anything longer (400 digits, a date next year) is cut to it.
RETRY_AFTER_MAX = 300.0
_DELAY_SECONDS = re.compile(r"[0-9]+")


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP
    date), within ``[0, RETRY_AFTER_MAX]``; ``None`` when absent or not one of
    those (a negative number, garbage): the backoff applies then.  Never
    raises, and costs the same for any length of value."""
    if value is None:
        return None
    try:
        text = str(value).strip()
        if _DELAY_SECONDS.fullmatch(text[:16]):
            if len(text) > 9:  # digits only, and more than ~30 years
                return RETRY_AFTER_MAX if text.isdigit() and text.isascii() else None
            return min(float(int(text)), RETRY_AFTER_MAX)
        if len(text) > 64:  # longer than any HTTP date
            return None
        when = email.utils.parsedate_to_datetime(text)
        if when is None:
            return None
        delta = when.timestamp() - now
    except Exception:  # OverflowError, ValueError, TypeError, IndexError: not a date we can use
        return None
    if delta != delta:  # NaN
        return None
    return max(0.0, min(delta, RETRY_AFTER_MAX))


# --- the websocket protocol ---------------------------------------------------


class PortalProtocol(WebSocketClientProtocol):
    """One websocket connection; everything it hears goes to the ``PortalClient``."""

    client: "PortalClient"

    def onOpen(self) -> None:
        self.client.protocol_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.client.log_ignored("binary frame of %d bytes" % len(payload))
            return
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:  # autobahn validates UTF-8; belt and braces
            self.client.log_ignored("text frame that is not UTF-8")
            return
        self.client.protocol_text(self, text)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # autobahn's onClose says "peer dropped the TCP connection" for every
        # TLS failure; the real cause (e.g. VerificationError) is only here.
        try:
            super().connectionLost(reason)
        finally:
            self.client.protocol_lost(self, reason)

    def upgrade_failure(self) -> Tuple[Optional[int], dict[str, str], str]:
        """``(status, headers, body)`` of a refused upgrade, status ``None`` otherwise."""
        line = getattr(self, "http_status_line", None)
        if not line:
            return None, {}, ""
        fields = line.split()
        try:
            status = int(fields[1])
        except (IndexError, ValueError):
            return None, {}, ""
        if status == 101:
            return None, {}, ""
        headers = dict(getattr(self, "http_headers", {}) or {})
        raw = getattr(self, "http_response_data", b"") or b""
        body = bytes(getattr(self, "data", b"") or b"")[len(raw) :][:200]
        return status, headers, body.decode("utf-8", "replace")


class _PortalFactory(WebSocketClientFactory):
    protocol = PortalProtocol
    noisy = False

    def __init__(self, client: "PortalClient", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client = client

    def buildProtocol(self, addr: Any) -> PortalProtocol:
        protocol = cast(PortalProtocol, super().buildProtocol(addr))
        protocol.client = self.client
        self.client.protocol = protocol
        return protocol


# --- the client ---------------------------------------------------------------


class PortalClient(Service):
    """Keeps one Phoenix channel to the portal open, for the life of the process.

    ``on_init()`` runs once, on the portal's first ``init``;
    ``on_fatal(reason)`` when the portal connection cannot go on (401, join
    rejected, token expired, reconnect window exhausted) — the composition
    root exits the process non-zero there.  ``reactor`` does the I/O;
    ``clock`` (default: the reactor) owns time and timers, so tests can pass
    a ``task.Clock``.  ``trust_root``: ``None`` for the platform trust store.
    ``readiness`` (``http.Readiness``, optional) gets ``portal_joined``.
    """

    name = "portal"

    def __init__(
        self,
        url: str,
        token: str,
        secret: str,
        on_init: Callable[[], None],
        on_fatal: Callable[[str], None],
        reactor: Any = None,
        clock: Any = None,
        rng: Any = None,
        trust_root: Any = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        readiness: Any = None,
    ) -> None:
        reactor = default_reactor(reactor)
        if rng is None:
            import random

            rng = random.SystemRandom()
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError("portal URL must be ws:// or wss:// (got %r)" % (url,))
        self.url = url
        self.secure = parts.scheme == "wss"
        self.host: str = parts.hostname
        self.port = parts.port or (443 if self.secure else 80)
        self.reactor = reactor
        self.clock = reactor if clock is None else clock
        self.connect_timeout = connect_timeout
        self._rng = rng
        self._trust_root = trust_root
        self._on_init = on_init
        self._on_fatal = on_fatal
        self.readiness = readiness
        self.session = PhoenixSession({"stamp_secret": secret})
        self.policy: Optional[ReconnectPolicy] = None
        self.factory = _PortalFactory(
            self,
            url,
            headers={"X-Authorization": bearer_header(token)},
            useragent=user_agent(),
            reactor=reactor,
        )
        self.factory.setProtocolOptions(
            maxFramePayloadSize=MAX_MESSAGE_BYTES,
            maxMessagePayloadSize=MAX_MESSAGE_BYTES,
            openHandshakeTimeout=connect_timeout,
            closeHandshakeTimeout=1,
        )
        self.protocol: Optional[PortalProtocol] = None
        self._connecting: Optional[defer.Deferred[Any]] = None
        self._attempt_timer: Any = None
        self._retry_call: Any = None
        #: The one timer, at the session's ``poll_timeout()``.
        self._timer = OneTimer(self.clock, self._on_timer)
        self._why: Optional[str] = None  # why we are dropping the current connection
        self._stopped = False
        self._close_waiters: List[defer.Deferred[None]] = []
        self._ignored_window = -IGNORED_LOG_WINDOW
        self._ignored_logged = 0
        self._ignored_suppressed = 0
        #: Counters for tests and metrics.
        self.attempts = 0
        self.joins = 0
        self.ignored = 0
        self.serving = False  # the first init has arrived
        self.fatal_reason: Optional[str] = None

    # --- life cycle -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self.policy = ReconnectPolicy(self._rng, self.clock.seconds())
        log.info("connecting to the portal at {url}", url=self.url)
        self._connect()

    def stopService(self) -> "defer.Deferred[None]":
        super().stopService()
        return self.close()

    def close(self) -> "defer.Deferred[None]":
        """Close the websocket cleanly (close frame, code 1000) and stop reconnecting.

        Fires once the connection is gone.  Used by the drain (the portal then
        stops handing this relay to clients) and by ``stopService``.
        """
        if not self._stopped:
            self._stopped = True
            log.info("closing the portal connection; no more reconnects")
        self._cancel_retry()
        self._cancel_attempt_timer()
        self._timer.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        protocol = self.protocol
        if protocol is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._close_waiters.append(d)
        if self.session.open:
            self._why = "closed by the relay"
            protocol.sendClose(1000, "relay shutting down")
        else:  # still connecting: nothing to close cleanly
            protocol.dropConnection(abort=True)
        return d

    # --- connecting -------------------------------------------------------------

    def _endpoint(self) -> Any:
        endpoint: Any = HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.connect_timeout)
        if self.secure:
            from twisted.internet.ssl import optionsForClientTLS

            # The same host name as in the URL: service_identity checks it
            # against the certificate's DNS (or IP) subjectAltNames.
            endpoint = wrapClientTLS(optionsForClientTLS(self.host, trustRoot=self._trust_root), endpoint)
        return endpoint

    def _connect(self) -> None:
        self._retry_call = None
        if self._stopped:
            return
        self.attempts += 1
        self._why = None
        self.protocol = None
        self._attempt_timer = self.clock.callLater(self.connect_timeout, self._attempt_timed_out)
        d = self._endpoint().connect(self.factory)
        self._connecting = d
        d.addCallbacks(self._connect_done, self._connect_failed)

    def _connect_done(self, protocol: Any) -> None:
        self._connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        self._cancel_attempt_timer()
        if self._stopped:
            return
        if failure.check(defer.CancelledError):
            why = "connect timed out after %.0f s" % self.connect_timeout
        else:
            why = "could not connect: %s" % (failure.getErrorMessage() or _type_name(failure))
        self._retry(why, None)

    def _attempt_timed_out(self) -> None:
        self._attempt_timer = None
        if self._connecting is not None:
            self._connecting.cancel()  # -> _connect_failed
        elif self.protocol is not None and not self.session.open:
            self._why = "websocket upgrade timed out after %.0f s" % self.connect_timeout
            self.protocol.dropConnection(abort=True)

    def _retry(self, why: str, retry_after: Optional[float]) -> None:
        assert self.policy is not None
        try:
            delay = self.policy.next_delay(self.clock.seconds(), retry_after)
        except Exception:  # never leave the loop without a next step
            log.failure("portal: error computing the reconnect delay; using the backoff")
            delay = self.policy.next_delay(self.clock.seconds(), None)
        if delay is None:
            window = "24 h" if self.policy.ever_joined else "%.0f s" % ReconnectPolicy.INITIAL_MAX_ELAPSED
            self._fatal("no portal connection for %s (last error: %s)" % (window, why))
            return
        log.info(
            "portal connection hiccup: {why}; reconnecting in {delay:.1f} s",
            why=why,
            delay=delay,
            retry_after=retry_after,
        )
        self._retry_call = self.clock.callLater(delay, self._connect)

    # --- what PortalProtocol calls ----------------------------------------------

    def protocol_opened(self, protocol: PortalProtocol) -> None:
        if protocol is not self.protocol or self._stopped:
            protocol.dropConnection(abort=True)
            return
        self._cancel_attempt_timer()
        self.session.connection_opened(self.clock.seconds())
        self._pump()

    def protocol_text(self, protocol: PortalProtocol, text: str) -> None:
        if protocol is not self.protocol:
            return
        self.session.text_received(text, self.clock.seconds())
        self._pump()

    def protocol_lost(self, protocol: PortalProtocol, reason: Failure) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        try:
            retry = self._connection_ended(protocol, reason)
        except Exception as exc:
            # Whatever went wrong reading the failure, the loop goes on: a
            # relay that stops reconnecting sits "not joined" for ever.
            log.failure("portal: error while handling the lost connection; reconnecting anyway")
            retry = ("connection lost (%s while handling it)" % type(exc).__name__, None)
        if retry is not None and not self._stopped and self._retry_call is None:
            self._retry(*retry)

    def _connection_ended(self, protocol: PortalProtocol, reason: Failure) -> Optional[Tuple[str, Optional[float]]]:
        """Clean up after a connection; ``(why, retry_after)`` to reconnect, ``None`` not to."""
        was_open = self.session.open
        self.session.connection_lost()
        self._update_readiness()
        self._timer.cancel()
        self._cancel_attempt_timer()
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)
        if self._stopped:
            if self.fatal_reason is None:
                log.info("portal connection closed")
            return None
        status, headers, body = protocol.upgrade_failure()
        if status == 401:
            self._fatal(
                "portal rejected the token (HTTP 401 on the websocket upgrade%s)"
                % (": " + body.strip() if body.strip() else "")
            )
            return None
        retry_after = None
        if status is not None:
            why = "websocket upgrade refused with HTTP %d%s" % (status, ": " + body.strip() if body.strip() else "")
            retry_after = parse_retry_after(headers.get("retry-after"), self.clock.seconds())
        elif self._why is not None:
            why = self._why
        elif was_open:
            code = protocol.remoteCloseCode
            why = "connection closed by the portal (%s)" % (
                "close code %s" % code if code is not None else reason.getErrorMessage() or _type_name(reason)
            )
        else:
            # TLS verification errors only show up here.
            why = "connection failed: %s" % (reason.getErrorMessage() or _type_name(reason),)
        return why, retry_after

    # --- the pump -----------------------------------------------------------------

    def _pump(self) -> None:
        session = self.session
        event = session.next_event()
        while event is not None:
            kind = type(event)
            if self.fatal_reason is not None:
                pass  # the process is going down: drain the queue, act on nothing
            elif kind is SendText:
                protocol = self.protocol
                if protocol is not None and session.open and not self._stopped:
                    protocol.sendMessage(event.text.encode("utf-8"))  # type: ignore[union-attr]
            elif kind is Joined:
                self.joins += 1
                assert self.policy is not None
                self.policy.joined()
                log.info("connected to the portal (joined topic relay)")
            elif kind is InitReceived:
                self._init_received()
            elif kind is Reconnect:
                self._drop(event.reason)  # type: ignore[union-attr]
            elif kind is Fatal:
                self._fatal(event.reason)  # type: ignore[union-attr]
            elif kind is Ignored:
                self.log_ignored(event.reason)  # type: ignore[union-attr]
            event = session.next_event()
        self._update_readiness()
        self._timer.arm(session.poll_timeout() if session.open and not self._stopped else None)

    def _update_readiness(self) -> None:
        if self.readiness is not None:
            self.readiness.portal_joined = self.session.joined

    def _init_received(self) -> None:
        if self.serving:
            log.debug("portal init received again")
            return
        self.serving = True
        log.info("portal init received: opening the STUN/TURN listeners")
        try:
            self._on_init()
        except Exception as exc:
            log.failure("could not start serving")
            self._fatal("could not start serving: %s" % (exc,))

    def _drop(self, why: str) -> None:
        protocol = self.protocol
        self._why = why
        self.session.connection_lost()  # nothing more from this connection counts
        if protocol is not None:
            protocol.dropConnection(abort=True)

    def _fatal(self, reason: str) -> None:
        if self.fatal_reason is not None:
            return
        self.fatal_reason = reason
        self._stopped = True
        self._cancel_retry()
        self._cancel_attempt_timer()
        self._timer.cancel()
        log.critical("portal: {reason}; exiting", reason=reason)
        if self.protocol is not None:
            self._why = reason
            self.session.connection_lost()
            self.protocol.dropConnection(abort=True)
        self._on_fatal(reason)

    def log_ignored(self, reason: str) -> None:
        """Count a frame or message the relay ignores and log it (at most
        ``IGNORED_LOG_BURST`` lines per ``IGNORED_LOG_WINDOW``)."""
        self.ignored += 1
        now = self.clock.seconds()
        if now - self._ignored_window >= IGNORED_LOG_WINDOW:
            if self._ignored_suppressed:
                log.warn(
                    "portal: {count} more frames ignored without a log line",
                    count=self._ignored_suppressed,
                )
            self._ignored_window, self._ignored_logged, self._ignored_suppressed = now, 0, 0
        if self._ignored_logged < IGNORED_LOG_BURST:
            self._ignored_logged += 1
            log.warn("portal frame ignored: {reason}", reason=reason)
        else:
            self._ignored_suppressed += 1

    # --- the one timer ------------------------------------------------------------

    def _on_timer(self, now: float) -> None:
        self.session.handle_timeout(now)
        self._pump()

    def _cancel_attempt_timer(self) -> None:
        cancel_attributes(self, "_attempt_timer")

    def _cancel_retry(self) -> None:
        cancel_attributes(self, "_retry_call")


def _type_name(failure: Any) -> str:
    """The exception class name of a ``Failure`` (its ``type`` is typed optional)."""
    return getattr(failure.type, "__name__", "error")
