"""The control endpoint on ``--control-endpoint`` (SPEC §10): HTTP + JSON.

* ``GET /allocations`` (``?user=NAME`` filters): one JSON object per
  allocation, oldest first: user, client, transport, relayed addresses, age,
  lifetime left, channels, permissions and traffic each way.
* ``POST /disconnect`` with ``{"user": NAME}`` or ``{"client": "ip:port"}``:
  deletes the matching allocations at once (their ports close, their
  clients get 437 on their next request) and answers how many.
* ``POST /log_filter`` (upstream's endpoint): the level as the body, or
  upstream's ``?directives=`` in ``RUST_LOG`` syntax; 200 when applied, 400
  when not understood.

Everything is JSON in and out (``{"error": ...}`` with a 4xx status on bad
input).  It listens on ``127.0.0.1:9999`` by default, as upstream, and has no
authentication: anyone who can connect can end allocations.  Bound to a
loopback address, it also refuses requests whose source is not loopback
(a local process can connect to 127.0.0.1 from another of the host's
addresses).  It shares the health endpoint's defences against slow and
numerous clients (``http.HealthSite``); request bodies are capped at
``MAX_BODY`` bytes.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable, Optional

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from firezone_relay.adapters._twisted import format_address
from firezone_relay.adapters.http import HealthSite, SiteService

log = Logger(namespace="firezone_relay.adapters.control")

MAX_BODY = 64 * 1024


def parse_address(text: str) -> Optional[tuple[str, int]]:
    """``ip:port`` or ``[ipv6]:port`` → ``(compressed ip, port)``, else None."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not port_text.isascii():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    port = int(port_text)
    if not 0 < port < 65536:
        return None
    return ip.compressed, port


class _BodyTooLarge(Exception):
    pass


class _ControlRequest(Request):
    """Keeps at most ``MAX_BODY`` bytes of a body; a larger one is answered 413."""

    too_large = False

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > MAX_BODY:
            # Answer now, from the headers: waiting for the body would hold
            # the connection until the request deadline.
            self.too_large = True
            body = (json.dumps({"error": "request body larger than %d bytes" % MAX_BODY}) + "\n").encode("utf-8")
            transport: Any = self.channel.transport
            transport.write(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            transport.loseConnection()
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        assert self.content is not None
        if self.content.tell() + len(data) > MAX_BODY:
            self.too_large = True
            return
        super().handleContentChunk(data)


class ControlResource(Resource):
    """The three endpoints; ``pump`` runs the relay's commands after a change."""

    isLeaf = True

    def __init__(
        self,
        relay: Any,
        pump: Callable[[], None],
        transport_of: Callable[[Any], str],
        set_log_level: Optional[Callable[[str], str]],
        clock: Callable[[], float],
        loopback_only: bool,
    ) -> None:
        super().__init__()
        self.relay = relay
        self.pump = pump
        self.transport_of = transport_of
        self.set_log_level = set_log_level
        self.clock = clock
        self.loopback_only = loopback_only

    def render(self, request: Request) -> bytes:
        if self.loopback_only and not _is_loopback(request.getClientAddress()):
            return _json(request, 403, {"error": "the control endpoint answers loopback clients only"})
        # No authentication, so no browser either: a web page on the relay's
        # host could otherwise POST here (browsers send Origin on such
        # requests), or read it after rebinding a name to 127.0.0.1 (then
        # Host is that name, not an address).
        if request.getHeader(b"origin") is not None:
            return _json(request, 403, {"error": "requests from web pages (with an Origin header) are refused"})
        if not _host_is_address(_header(request, b"host")):
            return _json(request, 403, {"error": "the Host header must be an IP address or localhost"})
        if getattr(request, "too_large", False):
            return _json(request, 413, {"error": "request body larger than %d bytes" % MAX_BODY})
        path = request.path.rstrip(b"/") or b"/"
        method = request.method
        routes = {b"/allocations": (b"GET", self.allocations), b"/disconnect": (b"POST", self.disconnect),
                  b"/log_filter": (b"POST", self.log_filter)}
        route = routes.get(path)
        if route is None:
            return _json(request, 404, {"error": "no such endpoint", "endpoints": [p.decode() for p in routes]})
        allowed, handler = route
        if method != allowed and not (allowed == b"GET" and method == b"HEAD"):
            request.setHeader(b"Allow", allowed)
            return _json(request, 405, {"error": "use %s" % allowed.decode()})
        try:
            return handler(request)
        except Exception:  # noqa: BLE001 - an operator's request must never take the relay down
            log.failure("control endpoint: internal error on {path}", path=path.decode("utf-8", "replace"))
            return _json(request, 500, {"error": "internal error (logged)"})

    # --- endpoints ---------------------------------------------------------

    def allocations(self, request: Request) -> bytes:
        unknown = sorted(k.decode("utf-8", "replace") for k in (request.args or {}) if k != b"user")
        if unknown:
            return _json(request, 400, {"error": "unknown query keys: %s (only user=)" % ", ".join(unknown)})
        user = _query(request, b"user")
        now = self.clock()
        rows = [
            {
                "user": info.username,
                "client": format_address(info.client),
                "transport": self.transport_of(info.client),
                "relayed": [format_address(a) for a in info.relayed],
                "age_seconds": round(info.age, 3),
                "lifetime_left_seconds": round(info.lifetime_left, 3),
                "channels": info.channels,
                "permissions": info.permissions,
                "bytes_to_peers": info.bytes_to_peers,
                "packets_to_peers": info.packets_to_peers,
                "bytes_to_client": info.bytes_to_client,
                "packets_to_client": info.packets_to_client,
            }
            for info in self.relay.allocations(now, user)
        ]
        return _json(request, 200, {"allocations": rows})

    def disconnect(self, request: Request) -> bytes:
        content_type = (_header(request, b"content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return _json(request, 415, {"error": "send the body as Content-Type: application/json"})
        body = _body_json(request)
        if not isinstance(body, dict):
            return _json(request, 400, {"error": 'the body must be a JSON object: {"user": ...} or {"client": "ip:port"}'})
        unknown = sorted(set(body) - {"user", "client"})
        if unknown:
            return _json(request, 400, {"error": "unknown keys: %s" % ", ".join(unknown)})
        user = body.get("user")
        client_text = body.get("client")
        if user is None and client_text is None:
            return _json(request, 400, {"error": 'give "user" or "client"'})
        if user is not None and not isinstance(user, str):
            return _json(request, 400, {"error": '"user" must be a string'})
        client = None
        if client_text is not None:
            client = parse_address(client_text) if isinstance(client_text, str) else None
            if client is None:
                return _json(request, 400, {"error": '"client" must be "ip:port" (IPv6 as "[ip]:port")'})
        count = self.relay.disconnect(username=user, client=client)
        self.pump()
        if count:
            log.info(
                "control endpoint: disconnected {count} allocation(s) of {who}",
                count=count,
                who=" and ".join(x for x in ("user %s" % user if user is not None else "",
                                             "client %s" % client_text if client_text is not None else "") if x),
                user=user,
                client=client_text,
            )
        return _json(request, 200 if count else 404, {"disconnected": count})

    def log_filter(self, request: Request) -> bytes:
        if self.set_log_level is None:
            return _json(request, 404, {"error": "log level changes are not available"})
        directives = _query(request, b"directives")
        if directives is None:
            assert request.content is not None
            directives = request.content.read().decode("utf-8", "replace").strip()
        if not directives:
            return _json(request, 400, {"error": "give the level as the body or ?directives="})
        try:
            level = self.set_log_level(directives)
        except ValueError as exc:
            return _json(request, 400, {"error": str(exc)})
        return _json(request, 200, {"log_level": level})


def _is_loopback(address: Any) -> bool:
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return False  # a UNIX socket or an unknown transport: not ours
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _header(request: Request, name: bytes) -> Optional[str]:
    value = request.getHeader(name)
    return None if value is None else bytes(value).decode("latin-1")


def _host_is_address(host: Optional[str]) -> bool:
    """``Host`` is an IP literal or localhost (with or without a port)."""
    if not host:
        return True  # HTTP/1.0 without Host: no browser sends that
    host = host.strip()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _query(request: Request, name: bytes) -> Optional[str]:
    values = (request.args or {}).get(name)
    if not values:
        return None
    return bytes(values[0]).decode("utf-8", "replace")


def _body_json(request: Request) -> Any:
    assert request.content is not None
    try:
        return json.loads(request.content.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _json(request: Request, code: int, value: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return (json.dumps(value, sort_keys=False) + "\n").encode("utf-8")


class ControlService(SiteService):
    """Listens on ``host:port`` with the control resource; ``port=0`` picks one (tests).

    ``required``: a bind failure stops the start (an address the operator
    gave); otherwise (the default address) it is logged and the relay runs
    without the endpoint, so that two relays on one host do not fight over it.
    """

    def __init__(self, host: str, port: int, resource: ControlResource, required: bool, reactor: Any = None) -> None:
        super().__init__(host, port, reactor)
        self.required = required
        self.site = HealthSite(resource, reactor=self.reactor)
        self.site.requestFactory = _ControlRequest
        self._gave_up = False

    def open_listeners(self) -> None:
        if self.listening is not None or self._gave_up:
            return
        from twisted.internet.error import CannotListenError

        try:
            self.listening = self.reactor.listenTCP(self.port, self.site, interface=self.host)
        except CannotListenError as exc:
            if self.required:
                raise
            self._gave_up = True  # not again in startService
            log.warn(
                "control endpoint not started: {address} cannot be bound ({reason}); "
                "give --control-endpoint another address, or off",
                address=format_address((self.host, exc.port)),
                reason=exc.socketError,
            )
            return
        log.info(
            "control endpoint on {address} (GET /allocations, POST /disconnect, POST /log_filter)",
            address=format_address(self.address),
        )
