"""The HTTP endpoint on ``--health-check-addr``: health, readiness, metrics.

* ``GET /healthz``: 200 as long as the reactor answers (liveness).
* ``GET /readyz``: 200 while the relay serves TURN and is not draining,
  else 503 (``Readiness``).
* ``GET /metrics``: Prometheus text (or OpenMetrics if the scraper asks for
  it) rendered from an injected ``CollectorRegistry`` on the reactor thread;
  the relay's collector only reads integers, so a scrape is short.

``HEAD`` works wherever ``GET`` does; any other method gets 405 with an
``Allow`` header, any other path 404.  A slow or broken HTTP client cannot
hold the relay up: everything is non-blocking on the reactor, an idle
connection (a half-sent request included) is closed after ``timeout``
seconds, request bodies are discarded unread, and at most
``max_connections`` connections are open at once.  No access log: a scrape
every few seconds is not news.
"""

from __future__ import annotations

from typing import Any, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

log = Logger(namespace="firezone_relay.adapters.http")

HTTP_TIMEOUT = 10.0
MAX_CONNECTIONS = 256
_ALLOW = b"GET, HEAD"


class Readiness:
    """What ``/readyz`` (and ``relay_ready``) report; other adapters set the flags.

    * ``serving``: the STUN/TURN listeners are open (standalone: at start-up;
      portal mode: once the portal's ``init`` arrived);
    * ``portal_required``: portal mode, so ready also needs ``portal_joined``;
    * ``portal_joined``: joined to the portal's ``relay`` topic right now
      (also exported as ``relay_portal_connected``);
    * ``draining``: a drain started; also true when the core ``relay`` given
      here is draining, whoever started it.
    """

    def __init__(self, relay: Any = None, portal_required: bool = False) -> None:
        self.relay = relay
        self.serving = False
        self.portal_required = portal_required
        self.portal_joined = False
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining or (self.relay is not None and bool(self.relay.draining))

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value

    @property
    def ready(self) -> bool:
        return self.status() == "ready"

    def status(self) -> str:
        """``"ready"`` or why not, for the ``/readyz`` body."""
        if self.draining:
            return "draining"
        if not self.serving:
            return "not serving yet"
        if self.portal_required and not self.portal_joined:
            return "not joined to the portal"
        return "ready"


class _Endpoint(Resource):
    """A leaf answering GET and HEAD, 405 otherwise; nothing below it."""

    def get(self, request: Request) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def render(self, request: Request) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(http.NOT_ALLOWED)
            request.setHeader(b"Allow", _ALLOW)
            return _text(request, "method not allowed\n")
        body = self.get(request)
        if request.method == b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return b""
        return body

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NOT_FOUND


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"Cache-Control", b"no-store")
        return _text(request, "not found\n")


_NOT_FOUND = _NotFound()


def _text(request: Request, text: str) -> bytes:
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return text.encode("utf-8")


class Healthz(_Endpoint):
    def get(self, request: Request) -> bytes:
        return _text(request, "ok\n")


class Readyz(_Endpoint):
    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self.readiness = readiness

    def get(self, request: Request) -> bytes:
        status = self.readiness.status()
        if status != "ready":
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
        return _text(request, status + "\n")


class Metrics(_Endpoint):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def get(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body: bytes = encoder(self.registry)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body


class Root(Resource):
    """``/healthz``, ``/readyz``, ``/metrics``; 404 for everything else, ``/`` included."""

    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        super().__init__()
        self.putChild(b"healthz", Healthz())
        self.putChild(b"readyz", Readyz(readiness))
        self.putChild(b"metrics", Metrics(registry))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NOT_FOUND

    def render(self, request: Request) -> bytes:
        return _NOT_FOUND.render(request)


class _Request(Request):
    def handleContentChunk(self, data: bytes) -> None:
        pass  # no endpoint takes a body: do not buffer one


class _Channel(http.HTTPChannel):
    def connectionMade(self) -> None:
        self.factory.open_connections += 1
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        self.factory.open_connections -= 1
        super().connectionLost(reason)


class HealthSite(Site):
    """A ``Site`` with an idle timeout, a connection cap and no access log."""

    protocol = _Channel
    noisy = False

    def __init__(
        self,
        resource: Resource,
        timeout: float = HTTP_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        reactor: Any = None,
    ) -> None:
        super().__init__(resource, requestFactory=_Request, timeout=timeout, reactor=reactor)
        self.displayTracebacks = False
        self.max_connections = max_connections
        self.open_connections = 0

    def buildProtocol(self, addr: Any) -> Optional[http.HTTPChannel]:
        if self.open_connections >= self.max_connections:
            return None  # the reactor closes the connection at once
        channel: http.HTTPChannel = super().buildProtocol(addr)
        return channel

    def log(self, request: Request) -> None:
        pass


def make_site(
    registry: CollectorRegistry,
    readiness: Readiness,
    timeout: float = HTTP_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    reactor: Any = None,
) -> HealthSite:
    return HealthSite(Root(registry, readiness), timeout=timeout, max_connections=max_connections, reactor=reactor)


class HealthService(Service):
    """Listens on ``host:port`` (TCP) with ``make_site``; ``port=0`` picks one (tests)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Readiness,
        timeout: float = HTTP_TIMEOUT,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.host = host
        self.port = port
        self.reactor = reactor
        self.registry = registry
        self.readiness = readiness
        self.site = make_site(registry, readiness, timeout=timeout, reactor=reactor)
        self.listening: Any = None

    def privilegedStartService(self) -> None:
        # Listen before the reactor runs, like the UDP listeners, so that an
        # address in use stops twistd at start-up with the reason.
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self.listening is None:
            self.listening = self.reactor.listenTCP(self.port, self.site, interface=self.host)
            address = self.listening.getHost()
            log.info(
                "HTTP health and metrics on {address} (/healthz, /readyz, /metrics)",
                address=("[%s]:%d" if ":" in address.host else "%s:%d") % (address.host, address.port),
            )

    def stopService(self) -> "defer.Deferred[Any]":
        super().stopService()
        listening, self.listening = self.listening, None
        if listening is None:
            return defer.succeed(None)
        return defer.maybeDeferred(listening.stopListening)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound (after start)."""
        host = self.listening.getHost()
        return host.host, host.port


class ServingFlag(Service):
    """Sets ``readiness.serving`` while running.  Placed after the UDP service
    in a ``MultiService`` (children start in order and stop in reverse), it
    turns on once the listeners are open and off first at shutdown."""

    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness

    def startService(self) -> None:
        super().startService()
        self.readiness.serving = True

    def stopService(self) -> None:
        self.readiness.serving = False
        super().stopService()
