"""A stand-in Firezone portal for tests: Phoenix V1 over an Autobahn websocket.

``StubPortal`` listens on 127.0.0.1 (plain ``ws://`` or, with ``tls=``, ``wss://``)
and behaves like the portal's ``/relay`` socket: it checks the path, the query
and the ``X-Authorization`` header, answers the join and heartbeats and pushes
``init`` after the join.  Attributes switch behaviours off or on (refuse the
upgrade with a status, answer the join with an error, stop answering
heartbeats); methods push arbitrary frames, drop or close the connection.
Everything that happens is recorded as ``(kind, ...)`` events; ``wait(kind)``
returns a Deferred for the next one.

``make_certificates`` builds a CA and a server certificate with
``cryptography`` for the TLS tests.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, reactor

TOKEN = "stub-portal-token-8c1d"
TIMEOUT = 10.0


def make_certificates(hostnames: Sequence[str] = ("localhost",)) -> Tuple[bytes, bytes, bytes]:
    """``(ca_pem, server_cert_pem, server_key_pem)``: a CA and a server certificate it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stub portal test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return (
        ca.public_bytes(serialization.Encoding.PEM),
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def frame(topic: str, event: str, payload: Dict[str, Any], ref: Any) -> str:
    return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref})


class StubPortalProtocol(WebSocketServerProtocol):
    portal: "StubPortal"

    def onConnect(self, request: Any) -> None:
        portal = self.portal
        portal.requests.append(request)
        portal._record("connect", request)
        if request.path != "/relay/websocket":
            raise ConnectionDeny(404, "not found")
        if portal.deny_status is not None:
            self._deny_headers = list(portal.deny_headers)
            raise ConnectionDeny(portal.deny_status, portal.deny_reason)
        if request.headers.get("x-authorization") != "Bearer " + portal.token:
            raise ConnectionDeny(401, "invalid_token")
        if "ipv4" not in request.params and "ipv6" not in request.params:
            raise ConnectionDeny(400, "missing_ip")
        return None

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        # ConnectionDeny cannot carry headers (Retry-After); add ours here.
        headers = list(responseHeaders or []) + list(getattr(self, "_deny_headers", []))
        super().failHandshake(reason, code, headers)

    def onOpen(self) -> None:
        self.portal.connections.append(self)
        self.portal._record("open", self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        portal = self.portal
        if isBinary:
            portal._record("binary", payload)
            return
        message = json.loads(payload.decode("utf-8"))
        portal.received.append(message)
        topic, event, ref = message["topic"], message["event"], message["ref"]
        if event == "phx_join":
            portal._record("join", message)
            if portal.join_reply == "ok":
                self.send(frame(topic, "phx_reply", {"status": "ok", "response": {}}, ref))
                if portal.push_init:
                    self.send(frame(topic, "init", {}, None))
            elif portal.join_reply == "error":
                self.send(
                    frame(topic, "phx_reply", {"status": "error", "response": {"reason": portal.join_error}}, ref)
                )
        elif event == "heartbeat":
            portal._record("heartbeat", message)
            if portal.answer_heartbeats:
                self.send(frame("phoenix", "phx_reply", {"status": "ok", "response": {}}, ref))
        else:
            portal._record("other", message)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if self in self.portal.connections:
            self.portal.connections.remove(self)
        self.portal._record("close", (wasClean, code, reason, self.remoteCloseCode))

    def send(self, text: str) -> None:
        self.sendMessage(text.encode("utf-8"))


class StubPortal:
    """See the module docstring.  ``start()`` then ``url``; ``stop()`` in a cleanup."""

    def __init__(self, token: str = TOKEN, tls: Optional[Tuple[bytes, bytes]] = None) -> None:
        self.token = token
        self.tls = tls  # (cert_pem, key_pem)
        self.deny_status: Optional[int] = None
        self.deny_reason = "denied"
        self.deny_headers: List[Tuple[str, str]] = []
        self.join_reply: Optional[str] = "ok"  # "ok", "error" or None (never answer)
        self.join_error = "disabled"
        self.answer_heartbeats = True
        self.push_init = True
        self.requests: List[Any] = []
        self.connections: List[StubPortalProtocol] = []
        self.received: List[Dict[str, Any]] = []
        self.events: List[Tuple[str, Any]] = []
        self._waiters: List[Tuple[str, int, defer.Deferred[Any]]] = []
        self.port: Any = None

    # --- life cycle ------------------------------------------------------------

    def start(self) -> int:
        scheme = "wss" if self.tls else "ws"
        factory = WebSocketServerFactory("%s://localhost" % scheme)
        factory.noisy = False
        # autobahn's default close handshake timeout (1 s) let the stand-in
        # abort a connection it had just sent close 4000 on, before the relay
        # read the frame: a CI run logged "dropping connection ... closing
        # handshake timeout" from the stand-in and the relay saw a close
        # without its code (test_phx_close_disconnect_and_close_frame_reconnect).
        # The relay answers a close at once; no test here needs the stand-in
        # to give up on a client that never does.
        factory.setProtocolOptions(closeHandshakeTimeout=30)
        # A subclass per portal: autobahn builds protocols without arguments.
        factory.protocol = type("StubPortalProtocolBound", (StubPortalProtocol,), {"portal": self})
        if self.tls:
            from twisted.internet import ssl

            cert_pem, key_pem = self.tls
            options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
            self.port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        else:
            self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        number: int = self.port.getHost().port
        return number

    def url(self, host: str = "127.0.0.1") -> str:
        """The ``--api-url`` of this portal."""
        return "%s://%s:%d" % ("https" if self.tls else "http", host, self.port.getHost().port)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for c in list(self.connections):
            c.dropConnection(abort=True)
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None

    # --- events ----------------------------------------------------------------

    def _record(self, kind: str, value: Any) -> None:
        self.events.append((kind, value))
        n = self.count(kind)
        for waiter in list(self._waiters):
            if waiter[0] == kind and waiter[1] <= n:
                self._waiters.remove(waiter)
                waiter[2].callback(value)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.events if k == kind)

    def last(self, kind: str) -> Any:
        return [v for k, v in self.events if k == kind][-1]

    def wait(self, kind: str, n: Optional[int] = None, timeout: float = TIMEOUT) -> "defer.Deferred[Any]":
        """Fires with the ``n``-th event of ``kind`` (default: the next one)."""
        if n is None:
            n = self.count(kind) + 1
        if self.count(kind) >= n:
            return defer.succeed([v for k, v in self.events if k == kind][n - 1])
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append((kind, n, d))
        d.addTimeout(timeout, reactor)
        return d

    # --- actions on the current connection -------------------------------------

    @property
    def current(self) -> StubPortalProtocol:
        assert self.connections, "no open connection"
        return self.connections[-1]

    def push(self, topic: str, event: str, payload: Dict[str, Any], ref: Any = None) -> None:
        self.current.send(frame(topic, event, payload, ref))

    def send_text(self, text: str) -> None:
        self.current.send(text)

    def send_binary(self, data: bytes) -> None:
        self.current.sendMessage(data, isBinary=True)

    def drop(self) -> None:
        self.current.dropConnection(abort=True)

    def close(self, code: int = 1000) -> None:
        self.current.sendClose(code)
