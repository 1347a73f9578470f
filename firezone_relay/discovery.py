"""The relay's public addresses (SPEC §6): given, discovered, or guessed.

The public addresses go into every XOR-RELAYED-ADDRESS and, in portal mode,
into the websocket URL (``ipv4=``/``ipv6=``), from where the portal hands
them to clients.  They come from, in this order:

1. ``--public-ip4-addr`` / ``--public-ip6-addr`` (or their environment
   variables), taken as given;
2. with ``--listen-address-discovery-method`` (``LISTEN_ADDRESS_DISCOVERY_METHOD``,
   upstream's container contract) the cloud's metadata service, for the
   addresses not given: ``gce_metadata`` reads the first interface's
   access-config external IPv4 and its IPv6 (header ``Metadata-Flavor:
   Google``); ``aws_ec2_metadata`` takes an IMDSv2 session token (``PUT``)
   first and reads ``public-ipv4`` and ``ipv6`` with it.  The hosts follow
   the clouds' SDK conventions, ``GCE_METADATA_HOST`` and
   ``AWS_EC2_METADATA_SERVICE_ENDPOINT``, so tests point them at stand-ins;
3. without either, the source address of the host's default IPv4 route
   (or 127.0.0.1).  Behind 1:1 NAT (GCE, EC2) that is a private address
   nobody outside can reach, so in portal mode a guess that is not public
   stops the start; in standalone mode it is used with a warning.

Discovery is plain blocking HTTP (``http.client``) done once in
``makeService``, before any service starts and before the reactor runs:
the portal URL needs the addresses, and a relay must never register
without them.  It runs in a helper thread joined with an overall deadline
(``DEADLINE``), so a metadata name that never resolves, a server that
accepts and never answers, or one that trickles bytes all end the start
within that time.  Redirects are never followed; an answer that is not a
bare address, or a non-public IPv4, is an error.  Every failure is an
``AddressError`` with a one-line message, which ``tap.makeService`` turns
into that line on stderr and exit status 1.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, MutableMapping, Optional, Union
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.python import usage

log = Logger(namespace="firezone_relay.discovery")

METHODS = ("gce_metadata", "aws_ec2_metadata")
GCE_HOST_ENV = "GCE_METADATA_HOST"
AWS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
DEFAULT_GCE_HOST = "metadata.google.internal"
DEFAULT_AWS_ENDPOINT = "http://169.254.169.254"

GCE_IP4_PATH = "/computeMetadata/v1/instance/network-interfaces/0/access-configs/0/external-ip"
GCE_IP6_PATH = "/computeMetadata/v1/instance/network-interfaces/0/ipv6s"
AWS_TOKEN_PATH = "/latest/api/token"
AWS_IP4_PATH = "/latest/meta-data/public-ipv4"
AWS_IP6_PATH = "/latest/meta-data/ipv6"
#: The IMDSv2 token is used for the next two requests only.
AWS_TOKEN_TTL = "60"

#: Seconds for each connect and each read.
REQUEST_TIMEOUT = 2.0
#: Seconds for the whole discovery, name resolution included.
DEADLINE = 5.0
#: An address, or a session token, is far shorter.
MAX_BODY = 1024

_DOCUMENTATION = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "3fff::/20")
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598


class AddressError(Exception):
    """No usable public address; ``str()`` is one line for the operator."""


def non_public_reason(ip: str) -> Optional[str]:
    """Why clients elsewhere on the internet cannot reach ``ip``, or ``None`` if they can."""
    address = ipaddress.ip_address(ip)
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if any(address.version == net.version and address in net for net in _DOCUMENTATION):
        return "a documentation address"
    if address.version == 4 and address in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved address"
    return None


# --- options -------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where a metadata service listens (plain HTTP)."""

    host: str  # a name or an IP literal, without brackets
    port: int

    @property
    def netloc(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return host if self.port == 80 else "%s:%d" % (host, self.port)

    def url(self, path: str = "") -> str:
        return "http://%s%s" % (self.netloc, path)


def _endpoint(variable: str, value: str, url: bool) -> Endpoint:
    text = value.strip()
    expected = ("an http:// URL such as %s" % DEFAULT_AWS_ENDPOINT) if url else (
        "a host or host:port such as %s" % DEFAULT_GCE_HOST
    )
    try:
        parts = urlsplit(text if url else "http://" + text)
    except ValueError:  # e.g. "http://[::1" (an unclosed IPv6 bracket)
        raise usage.UsageError("%s: %r is not %s" % (variable, value, expected)) from None
    if url:
        ok = parts.scheme == "http" and parts.path in ("", "/") and not parts.query and not parts.fragment
    else:
        ok = "/" not in text and "?" not in text and "#" not in text
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not ok or not host or parts.username or parts.password:
        raise usage.UsageError("%s: %r is not %s" % (variable, value, expected))
    return Endpoint(host, port or 80)


def check_options(options: MutableMapping[str, Any], environ: Mapping[str, str]) -> None:
    """Validate ``--listen-address-discovery-method`` and, when set, read its
    service's endpoint from the environment into ``options["metadata-endpoint"]``."""
    method = options["listen-address-discovery-method"]
    method = method.strip() if method is not None else ""
    options["metadata-endpoint"] = None
    if not method:
        options["listen-address-discovery-method"] = None
        return
    if method not in METHODS:
        raise usage.UsageError(
            "--listen-address-discovery-method must be %s (got %r)" % (" or ".join(METHODS), method)
        )
    options["listen-address-discovery-method"] = method
    if method == "gce_metadata":
        value = environ.get(GCE_HOST_ENV, "").strip() or DEFAULT_GCE_HOST
        options["metadata-endpoint"] = _endpoint(GCE_HOST_ENV, value, url=False)
    else:
        value = environ.get(AWS_ENDPOINT_ENV, "").strip() or DEFAULT_AWS_ENDPOINT
        options["metadata-endpoint"] = _endpoint(AWS_ENDPOINT_ENV, value, url=True)


# --- the metadata services -------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Discovery:
    """What a metadata service reported; ``warnings`` are for the log."""

    ip4: Optional[str] = None
    ip6: Optional[str] = None
    warnings: List[str] = field(default_factory=list)


def _request(endpoint: Endpoint, method: str, path: str, headers: Dict[str, str], timeout: float) -> _Answer:
    what = "%s %s" % (method, endpoint.url(path))
    connection = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read(MAX_BODY + 1)
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
    except socket.gaierror as exc:
        raise AddressError("%s: cannot resolve %s (%s)" % (what, endpoint.host, exc.strerror)) from None
    except ConnectionRefusedError:
        raise AddressError("%s: connection refused" % what) from None
    except TimeoutError:
        raise AddressError("%s: no answer within %g s" % (what, timeout)) from None
    except http.client.HTTPException as exc:
        raise AddressError("%s: not an HTTP answer (%s)" % (what, type(exc).__name__)) from None
    except OSError as exc:
        raise AddressError("%s: %s" % (what, exc.strerror or exc)) from None
    finally:
        connection.close()
    if len(body) > MAX_BODY:
        raise AddressError("%s: the answer is longer than %d bytes" % (what, MAX_BODY))
    return _Answer(response.status, answer_headers, body)


def _excerpt(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _body(what: str, answer: _Answer) -> Optional[str]:
    """The stripped text of a 200 answer, ``None`` for 404 (no such address)."""
    if answer.status == 404:
        return None
    if 300 <= answer.status < 400:
        raise AddressError(
            "%s: redirected (HTTP %d to %s); metadata redirects are not followed"
            % (what, answer.status, _excerpt(answer.headers.get("location", "nowhere"), 200))
        )
    if answer.status != 200:
        raise AddressError("%s: HTTP %d" % (what, answer.status))
    try:
        return answer.body.decode("ascii").strip()
    except UnicodeDecodeError:
        raise AddressError("%s: the answer is not ASCII text" % what) from None


def _address(what: str, text: Optional[str], version: int, result: Discovery) -> None:
    """Check one answer and put it into ``result``.

    A non-public IPv4 answer is an error (the access-config and public-ipv4
    keys only ever hold public addresses: anything else is not the metadata
    service).  A non-public IPv6 (GCE's internal ULA range) is not served,
    with a warning.
    """
    if not text:
        return
    if version == 6:  # a list on GCE: the first entry, without a prefix length
        text = text.splitlines()[0].strip().split("/")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise AddressError("%s: answered %s, which is not an IPv%d address" % (what, _excerpt(text), version)) from None
    if ip.version != version:
        raise AddressError("%s: answered %s, an IPv%d address, expected IPv%d" % (what, ip, ip.version, version))
    reason = non_public_reason(ip.compressed)
    if reason is None:
        if version == 4:
            result.ip4 = ip.compressed
        else:
            result.ip6 = ip.compressed
    elif version == 4:
        raise AddressError("%s: answered %s, which is %s, not a public address" % (what, ip, reason))
    else:
        result.warnings.append(
            "%s: answered %s, which is %s: IPv6 is not served (give --public-ip6-addr to serve it)"
            % (what, ip, reason)
        )


def _gce(endpoint: Endpoint, want4: bool, want6: bool, timeout: float) -> Discovery:
    result = Discovery()
    for version, path, wanted in ((4, GCE_IP4_PATH, want4), (6, GCE_IP6_PATH, want6)):
        if not wanted:
            continue
        what = "GET " + endpoint.url(path)
        answer = _request(endpoint, "GET", path, {"Metadata-Flavor": "Google"}, timeout)
        if answer.status == 200 and answer.headers.get("metadata-flavor") != "Google":
            raise AddressError("%s: the answer lacks Metadata-Flavor: Google, so it is not from GCE's metadata server" % what)
        _address(what, _body(what, answer), version, result)
    return result


def _aws(endpoint: Endpoint, want4: bool, want6: bool, timeout: float) -> Discovery:
    what = "PUT " + endpoint.url(AWS_TOKEN_PATH)
    answer = _request(endpoint, "PUT", AWS_TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": AWS_TOKEN_TTL}, timeout)
    token = _body(what, answer)
    if answer.status == 404:
        raise AddressError("%s: HTTP 404 (no IMDSv2 session token)" % what)
    if not token or not all(33 <= ord(c) <= 126 for c in token):
        raise AddressError("%s: the answer is not an IMDSv2 session token" % what)
    result = Discovery()
    for version, path, wanted in ((4, AWS_IP4_PATH, want4), (6, AWS_IP6_PATH, want6)):
        if wanted:
            what = "GET " + endpoint.url(path)
            answer = _request(endpoint, "GET", path, {"X-aws-ec2-metadata-token": token}, timeout)
            _address(what, _body(what, answer), version, result)
    return result


_METHOD_IMPLEMENTATIONS: Dict[str, Callable[[Endpoint, bool, bool, float], Discovery]] = {
    "gce_metadata": _gce,
    "aws_ec2_metadata": _aws,
}


def discover(
    method: str,
    endpoint: Endpoint,
    want4: bool,
    want6: bool,
    timeout: float = REQUEST_TIMEOUT,
    deadline: float = DEADLINE,
) -> Discovery:
    """Ask the metadata service for the public addresses wanted; at most ``deadline`` seconds."""
    implementation = _METHOD_IMPLEMENTATIONS[method]
    outcome: List[Union[Discovery, AddressError]] = []

    def work() -> None:
        try:
            outcome.append(implementation(endpoint, want4, want6, timeout))
        except AddressError as exc:
            outcome.append(exc)
        except Exception as exc:  # anything else is still one line, never a traceback
            outcome.append(AddressError("%s: %s" % (type(exc).__name__, exc)))

    # A daemon thread: a name that never resolves cannot hold up the exit.
    worker = threading.Thread(target=work, name="metadata discovery", daemon=True)
    worker.start()
    worker.join(deadline)
    if not outcome:
        raise AddressError("no complete answer within %g s" % deadline)
    if isinstance(outcome[0], AddressError):
        raise outcome[0]
    return outcome[0]


# --- the decision ----------------------------------------------------------------

_SOURCE = {"gce_metadata": "GCE metadata", "aws_ec2_metadata": "AWS EC2 metadata"}
_GIVE = (
    "give --public-ip4-addr/--public-ip6-addr (PUBLIC_IP4_ADDR/PUBLIC_IP6_ADDR) or set "
    "LISTEN_ADDRESS_DISCOVERY_METHOD=gce_metadata|aws_ec2_metadata"
)


def settle(options: MutableMapping[str, Any], detect: Callable[[], Optional[str]]) -> None:
    """Fill in ``options["public-ip4-addr"]``/``["public-ip6-addr"]`` (see the module docstring).

    ``detect`` is the route lookup (``tap.detect_public_ip4``).  Raises
    ``AddressError`` when discovery fails, or in portal mode when only a
    non-public guess is left.
    """
    method = options.get("listen-address-discovery-method")
    if method:
        _discover_into(options, method)
        return
    if options["public-ip4-addr"] is not None or options["public-ip6-addr"] is not None:
        return
    guess = detect()
    if guess is None:
        ip, where = "127.0.0.1", "no IPv4 route found, so 127.0.0.1"
    else:
        ip, where = guess, "the source address of the default route"
    reason = non_public_reason(ip)
    if reason is not None and options["token"]:
        raise AddressError(
            "portal mode needs a public address, and without --public-ip4-addr the relay would register %s "
            "(%s), %s that clients cannot reach: %s" % (ip, where, reason, _GIVE)
        )
    options["public-ip4-addr"] = ip
    if reason is not None:
        log.warn(
            "no --public-ip4-addr/--public-ip6-addr: using {public_ip4} ({where}), {reason}: clients outside "
            "this host's network cannot reach the relayed addresses; give --public-ip4-addr (PUBLIC_IP4_ADDR) "
            "with the address clients see",
            public_ip4=ip,
            where=where,
            reason=reason,
        )
    else:
        log.info(
            "no --public-ip4-addr/--public-ip6-addr: using {public_ip4}, the source address of the default route",
            public_ip4=ip,
        )


def _discover_into(options: MutableMapping[str, Any], method: str) -> None:
    endpoint: Endpoint = options["metadata-endpoint"]
    want4 = options["public-ip4-addr"] is None
    want6 = options["public-ip6-addr"] is None
    source = "%s at %s" % (_SOURCE[method], endpoint.url())
    if not (want4 or want6):
        log.info("both public addresses are given: {method} is not asked", method=method)
        return
    try:
        found = discover(method, endpoint, want4, want6)
    except AddressError as exc:
        raise AddressError("cannot discover the public address from %s: %s" % (source, exc)) from None
    for warning in found.warnings:
        log.warn("{source}: {warning}", source=source, warning=warning)
    for version, ip in ((4, found.ip4), (6, found.ip6)):
        if ip is not None:
            options["public-ip%d-addr" % version] = ip
            log.info("public IPv{version} {ip} from {source}", version=version, ip=ip, source=source)
    if options["public-ip4-addr"] is None and options["public-ip6-addr"] is None:
        raise AddressError(
            "cannot discover the public address from %s: it reports no public IPv4 or IPv6 address for this "
            "instance (none attached?): attach one, or give --public-ip4-addr/--public-ip6-addr" % source
        )
