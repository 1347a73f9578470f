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

Slow clients (slowloris).  Twisted's idle timeout restarts on every byte, so
a client dribbling a byte every few seconds would hold a connection for
ever.  Three bounds on top of it:

* a deadline per request: from the moment the server waits for a request
  (connection open, or the previous response handed to the transport) the
  whole request, head and body, must be in within ``request_deadline``
  seconds, whatever bytes arrive meanwhile; else the connection is aborted;
* at most ``max_connections_per_source`` connections per source (an IPv4
  address, or an IPv6 /64: ``sourcekey.source_key``);
* when all ``max_connections`` are taken, a new connection from a source
  holding fewer than the busiest source takes the place of that source's
  oldest connection (``_victim``), so an attacker who spreads slow
  connections over many addresses still cannot lock a one-connection client
  such as a liveness probe out; it can only take a fair share.

Closes and refusals are counted (``relay_http_connections_refused_total``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from firezone_relay.adapters._twisted import ListenerService, cancel_attributes, default_reactor, format_address
from firezone_relay.adapters.sourcekey import source_key

log = Logger(namespace="firezone_relay.adapters.http")

HTTP_TIMEOUT = 10.0
#: Seconds from "waiting for a request" to the request complete (see above).
REQUEST_DEADLINE = 10.0
MAX_CONNECTIONS = 256
#: Below MAX_CONNECTIONS: one source alone never fills the server.
MAX_CONNECTIONS_PER_SOURCE = 16
REFUSAL_REASONS = ("per_source", "max_connections", "evicted", "deadline")
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
    """A leaf answering GET and HEAD with ``get(request)``, 405 otherwise;
    nothing below it."""

    def __init__(self, get: Callable[[Request], bytes]) -> None:
        super().__init__()
        self.get = get

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


def _healthz(request: Request) -> bytes:
    return _text(request, "ok\n")


def _readyz(readiness: Readiness, request: Request) -> bytes:
    status = readiness.status()
    if status != "ready":
        request.setResponseCode(http.SERVICE_UNAVAILABLE)
    return _text(request, status + "\n")


def _metrics(registry: CollectorRegistry, request: Request) -> bytes:
    accept = request.getHeader(b"accept")
    encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
    body: bytes = encoder(registry)
    request.setHeader(b"Content-Type", content_type.encode("ascii"))
    return body


class Root(Resource):
    """``/healthz``, ``/readyz``, ``/metrics``; 404 for everything else, ``/`` included."""

    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        super().__init__()
        self.putChild(b"healthz", _Endpoint(_healthz))
        self.putChild(b"readyz", _Endpoint(partial(_readyz, readiness)))
        self.putChild(b"metrics", _Endpoint(partial(_metrics, registry)))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NOT_FOUND

    def render(self, request: Request) -> bytes:
        return _NOT_FOUND.render(request)


class _Request(Request):
    def handleContentChunk(self, data: bytes) -> None:
        pass  # no endpoint takes a body: do not buffer one


class _Channel(http.HTTPChannel):
    """An ``HTTPChannel`` with a deadline per request (see the module docstring)."""

    factory: "HealthSite"
    source = ""
    registered = False
    #: True while a request is being received or waited for (not handled).
    waiting = True
    _deadline_call: Any = None
    _gone = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._set_waiting(True)

    def _set_waiting(self, waiting: bool) -> None:
        """Waiting for a request (its deadline runs) or handling one (none)."""
        cancel_attributes(self, "_deadline_call")
        self.waiting = waiting
        if waiting and not self._gone:
            self._deadline_call = self.callLater(self.factory.request_deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline_call = None
        if not self._gone:
            self.factory.refused["deadline"] += 1
            self.abort()

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def allContentReceived(self) -> None:
        self._set_waiting(False)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Armed first: a pipelined request buffered behind this one is parsed
        # inside super().requestDone and must be able to cancel it.
        self._set_waiting(True)
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        cancel_attributes(self, "_deadline_call")
        self.factory.unregister(self)
        super().connectionLost(reason)


class HealthSite(Site):
    """A ``Site`` with an idle timeout, a deadline per request, connection
    caps (total and per source) and no access log."""

    protocol = _Channel  # type: ignore[assignment]  # Twisted types it as its own channel only
    noisy = False

    def __init__(
        self,
        resource: Resource,
        timeout: float = HTTP_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        reactor: Any = None,
        request_deadline: float = REQUEST_DEADLINE,
        max_connections_per_source: int = MAX_CONNECTIONS_PER_SOURCE,
    ) -> None:
        super().__init__(resource, requestFactory=_Request, timeout=timeout, reactor=reactor)
        self.displayTracebacks = False
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        self.request_deadline = request_deadline
        self.open_connections = 0
        #: Open connections by source, oldest first.
        self.by_source: Dict[str, List[_Channel]] = {}
        self.refused: Dict[str, int] = {reason: 0 for reason in REFUSAL_REASONS}

    def buildProtocol(self, addr: Any) -> Any:
        key = source_key(str(getattr(addr, "host", "")))
        mine = len(self.by_source.get(key, ()))
        if mine >= self.max_connections_per_source:
            self.refused["per_source"] += 1
            return None  # the reactor closes the connection at once
        if self.open_connections >= self.max_connections:
            victim = self._victim(mine)
            if victim is None:
                self.refused["max_connections"] += 1
                return None
            self.refused["evicted"] += 1
            self.unregister(victim)
            victim.abort()
        channel: _Channel = super().buildProtocol(addr)
        channel.source = key
        channel.registered = True
        self.by_source.setdefault(key, []).append(channel)
        self.open_connections += 1
        return channel

    def _victim(self, mine: int) -> Optional[_Channel]:
        """The oldest waiting connection of the source with the most
        connections, if that source holds at least two more than the
        newcomer's (so taking one moves towards a fair share)."""
        busiest: Optional[List[_Channel]] = None
        for channels in self.by_source.values():
            if busiest is None or len(channels) > len(busiest):
                busiest = channels
        if busiest is None or len(busiest) < mine + 2:
            return None
        for channel in busiest:
            if channel.waiting:
                return channel
        return None

    def unregister(self, channel: _Channel) -> None:
        if not channel.registered:
            return
        channel.registered = False
        self.open_connections -= 1
        channels = self.by_source.get(channel.source)
        if channels is not None:
            try:
                channels.remove(channel)
            except ValueError:
                pass
            if not channels:
                del self.by_source[channel.source]

    def log(self, request: http.Request) -> None:
        pass


class HttpCollector(Collector):
    """``relay_http_connections_refused_total{reason}``, read at scrape time."""

    def __init__(self, site: HealthSite) -> None:
        self.site = site

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "relay_http_connections_refused",
            "Health/metrics HTTP connections refused or closed by a bound: per_source (the per-source cap), "
            "max_connections (all taken), evicted (gave way to a source with fewer), deadline (request not "
            "complete in time).",
            labels=["reason"],
        )
        for reason in REFUSAL_REASONS:
            family.add_metric([reason], self.site.refused[reason])
        yield family


class SiteService(ListenerService):
    """A TCP listener for a ``Site``, opened (``open_listeners``) before the
    reactor runs, like the UDP listeners (``ListenerService``)."""

    listening: Any = None

    def __init__(self, host: str, port: int, reactor: Any = None) -> None:
        self.host = host
        self.port = port
        self.reactor = default_reactor(reactor)

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


class HealthService(SiteService):
    """Listens on ``host:port`` (TCP) with a ``HealthSite`` of ``Root``; ``port=0`` picks one (tests)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Readiness,
        reactor: Any = None,
        **site_options: Any,
    ) -> None:
        """``site_options``: ``timeout``, ``max_connections``,
        ``request_deadline``, ``max_connections_per_source`` (``HealthSite``'s
        keyword arguments, whose defaults are the only ones)."""
        super().__init__(host, port, reactor)
        self.registry = registry
        self.readiness = readiness
        self.site = HealthSite(Root(registry, readiness), reactor=self.reactor, **site_options)
        registry.register(HttpCollector(self.site))

    def open_listeners(self) -> None:
        if self.listening is None:
            self.listening = self.reactor.listenTCP(self.port, self.site, interface=self.host)
            log.info(
                "HTTP health and metrics on {address} (/healthz, /readyz, /metrics)",
                address=format_address(self.address),
            )


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
