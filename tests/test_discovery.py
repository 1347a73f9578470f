"""The public address (SPEC §6): the rules, and real relays against real
stand-ins for the GCE and AWS metadata services and the portal.

The stand-ins are twisted.web servers on 127.0.0.1 that behave like the
metadata services as far as the relay can tell: GCE answers only requests
with ``Metadata-Flavor: Google`` and marks its answers with the same header;
AWS enforces IMDSv2 (a ``PUT`` for a session token with a TTL header first,
then every ``GET`` carries the token, else 401).  The relay processes find
them through ``GCE_METADATA_HOST`` / ``AWS_EC2_METADATA_SERVICE_ENDPOINT``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from firezone_relay import discovery, tap
from tests.portal_stub import StubPortal

# Public addresses (not documentation ones: discovery refuses those).  No
# packet is ever sent to them: they only travel to the portal stand-in.
GCE_IP4, GCE_IP6 = "34.118.7.21", "2600:1900:4010:ab::"
AWS_IP4, AWS_IP6 = "3.121.40.9", "2a05:d014:aa0:c300::17"

Answer = Tuple[int, bytes, Dict[str, str]]


class MetadataStandIn(Resource):
    """A GCE (``cloud="gce"``) or AWS IMDSv2 (``cloud="aws"``) metadata service.

    ``answers`` maps a path to ``(status, body, headers)``; other paths get
    404.  Every request is recorded as ``(method, path, headers)``.
    """

    isLeaf = True

    def __init__(self, cloud: str, answers: Dict[str, Answer], flavor: bool = True) -> None:
        super().__init__()
        self.cloud = cloud
        self.answers = answers
        self.flavor = flavor
        self.token = "AQAEAF-stand-in-" + os.urandom(8).hex()
        self.requests: List[Tuple[str, str, Dict[str, str]]] = []
        self.port: Any = None

    def render(self, request: Any) -> bytes:
        method, path = request.method.decode(), request.path.decode()
        headers = {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((method, path, headers))
        if self.cloud == "gce":
            if self.flavor:
                request.setHeader("Metadata-Flavor", "Google")
            if headers.get("metadata-flavor") != "Google":
                request.setResponseCode(403)
                return b"Missing Metadata-Flavor:Google header."
        elif path == discovery.AWS_TOKEN_PATH:
            if path in self.answers:
                pass  # a test's own answer to the PUT
            elif method != "PUT" or not headers.get("x-aws-ec2-metadata-token-ttl-seconds", "").isdigit():
                request.setResponseCode(400)
                return b""
            else:
                return self.token.encode()
        elif headers.get("x-aws-ec2-metadata-token") != self.token:
            request.setResponseCode(401)
            return b""
        status, body, extra = self.answers.get(path, (404, b"<html><body>404 Not Found</body></html>", {}))
        request.setResponseCode(status)
        for name, value in extra.items():
            request.setHeader(name, value)
        return body

    def start(self, case: unittest.TestCase) -> str:
        site = Site(self)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        case.addCleanup(self.port.stopListening)
        return "127.0.0.1:%d" % self.port.getHost().port

    def paths(self) -> List[Tuple[str, str]]:
        return [(m, p) for m, p, _ in self.requests]


def gce(ip4: Optional[bytes] = GCE_IP4.encode(), ip6: Optional[bytes] = GCE_IP6.encode() + b"\n") -> Dict[str, Answer]:
    answers: Dict[str, Answer] = {}
    if ip4 is not None:
        answers[discovery.GCE_IP4_PATH] = (200, ip4, {"Content-Type": "application/text"})
    if ip6 is not None:
        answers[discovery.GCE_IP6_PATH] = (200, ip6, {"Content-Type": "application/text"})
    return answers


def aws(ip4: Optional[bytes] = AWS_IP4.encode(), ip6: Optional[bytes] = AWS_IP6.encode()) -> Dict[str, Answer]:
    answers: Dict[str, Answer] = {}
    if ip4 is not None:
        answers[discovery.AWS_IP4_PATH] = (200, ip4, {"Content-Type": "text/plain"})
    if ip6 is not None:
        answers[discovery.AWS_IP6_PATH] = (200, ip6, {"Content-Type": "text/plain"})
    return answers


class _Silent(Protocol):
    """Accepts a connection and never answers."""


class _NotHttp(Protocol):
    """Answers a request with a line that is not HTTP, then hangs up."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        self.transport.loseConnection()


class _Trickle(Protocol):
    """Starts an answer and then sends one header line every 0.5 s, forever:
    every read is quick, the answer never completes."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if getattr(self, "loop", None) is None:
            self.transport.write(b"HTTP/1.1 200 OK\r\n")
            self.loop = task.LoopingCall(self.transport.write, b"X-Slow: yes\r\n")
            self.loop.start(0.5)

    def connectionLost(self, reason: Any = None) -> None:
        if getattr(self, "loop", None) is not None and self.loop.running:
            self.loop.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- the rules, in-process ---------------------------------------------------


def parse(args: List[str], environ: Optional[Dict[str, str]] = None) -> tap.Options:
    options = tap.Options(environ=environ or {})
    options.parseOptions(args)
    return options


class AddressRuleTests(unittest.SynchronousTestCase):
    def test_non_public_reason(self) -> None:
        cases = {
            "10.128.0.7": "a private address",
            "172.31.5.9": "a private address",
            "192.168.1.2": "a private address",
            "127.0.0.1": "a loopback address",
            "169.254.169.254": "a link-local address",
            "192.0.2.2": "a documentation address",
            "198.51.100.3": "a documentation address",
            "203.0.113.1": "a documentation address",
            "100.64.1.1": "a shared (carrier-grade NAT) address",
            "0.0.0.0": "the unspecified address",
            "224.0.0.1": "a multicast address",
            "240.0.0.1": "a reserved address",
            "::1": "a loopback address",
            "fe80::1": "a link-local address",
            "fd20:1:2::5": "a private address",
            "2001:db8::7": "a documentation address",
            "::": "the unspecified address",
        }
        for ip, reason in cases.items():
            self.assertEqual(discovery.non_public_reason(ip), reason, ip)
        for ip in (GCE_IP4, AWS_IP4, GCE_IP6, AWS_IP6, "1.1.1.1"):
            self.assertIsNone(discovery.non_public_reason(ip), ip)

    def test_method_option_and_environment(self) -> None:
        self.assertIsNone(parse([])["listen-address-discovery-method"])
        self.assertIsNone(parse([])["metadata-endpoint"])
        o = parse([], {"LISTEN_ADDRESS_DISCOVERY_METHOD": "gce_metadata"})
        self.assertEqual(o["listen-address-discovery-method"], "gce_metadata")
        self.assertEqual(o["metadata-endpoint"], discovery.Endpoint("metadata.google.internal", 80))
        o = parse(["--listen-address-discovery-method", "aws_ec2_metadata"], {"LISTEN_ADDRESS_DISCOVERY_METHOD": "gce_metadata"})
        self.assertEqual(o["listen-address-discovery-method"], "aws_ec2_metadata")  # flag > env
        self.assertEqual(o["metadata-endpoint"], discovery.Endpoint("169.254.169.254", 80))
        self.assertEqual(o["metadata-endpoint"].url("/x"), "http://169.254.169.254/x")
        o = parse([], {"LISTEN_ADDRESS_DISCOVERY_METHOD": "gce_metadata", "GCE_METADATA_HOST": "127.0.0.1:8089"})
        self.assertEqual(o["metadata-endpoint"].url(), "http://127.0.0.1:8089")
        o = parse(
            ["--listen-address-discovery-method=aws_ec2_metadata"],
            {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://[fd00:ec2::254]/"},
        )
        self.assertEqual(o["metadata-endpoint"], discovery.Endpoint("fd00:ec2::254", 80))
        self.assertEqual(o["metadata-endpoint"].url(), "http://[fd00:ec2::254]")
        # Empty means unset, as upstream's entrypoint treats it.
        self.assertIsNone(parse([], {"LISTEN_ADDRESS_DISCOVERY_METHOD": " "})["listen-address-discovery-method"])
        # The hosts are read only when their method is chosen.
        self.assertIsNone(parse([], {"GCE_METADATA_HOST": "http://bad/"})["metadata-endpoint"])

    def test_bad_method_and_hosts(self) -> None:
        bad = [
            ([], {"LISTEN_ADDRESS_DISCOVERY_METHOD": "azure_metadata"}, "--listen-address-discovery-method must be gce_metadata or aws_ec2_metadata (got 'azure_metadata')"),
            (["--listen-address-discovery-method", "GCE"], {}, "must be gce_metadata or aws_ec2_metadata"),
            (["--listen-address-discovery-method", "gce_metadata"], {"GCE_METADATA_HOST": "http://127.0.0.1:80"}, "GCE_METADATA_HOST: 'http://127.0.0.1:80' is not a host or host:port"),
            (["--listen-address-discovery-method", "gce_metadata"], {"GCE_METADATA_HOST": "127.0.0.1:99999"}, "GCE_METADATA_HOST: '127.0.0.1:99999' is not"),
            (["--listen-address-discovery-method", "aws_ec2_metadata"], {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "169.254.169.254"}, "AWS_EC2_METADATA_SERVICE_ENDPOINT: '169.254.169.254' is not an http:// URL"),
            (["--listen-address-discovery-method", "aws_ec2_metadata"], {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "https://169.254.169.254"}, "is not an http:// URL"),
            (["--listen-address-discovery-method", "aws_ec2_metadata"], {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://169.254.169.254/latest"}, "is not an http:// URL"),
            (["--listen-address-discovery-method", "aws_ec2_metadata"], {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://[::1"}, "'http://[::1' is not an http:// URL"),
            (["--listen-address-discovery-method", "gce_metadata"], {"GCE_METADATA_HOST": "[::1"}, "'[::1' is not a host or host:port"),
        ]
        for args, environ, fragment in bad:
            with self.assertRaises(usage.UsageError) as caught:
                parse(args, environ)
            self.assertIn(fragment, str(caught.exception))

    def settle(self, detected: Optional[str], *args: str) -> Tuple[tap.Options, List[Dict[str, Any]]]:
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            options = parse(list(args))
            discovery.settle(options, lambda: detected)
        finally:
            globalLogPublisher.removeObserver(events.append)
        return options, [e for e in events if e.get("log_namespace") == "firezone_relay.discovery"]

    def test_portal_mode_refuses_a_guess_that_is_not_public(self) -> None:
        for detected, shown, reason in [
            ("10.128.0.7", "10.128.0.7", "a private address"),
            ("192.0.2.2", "192.0.2.2", "a documentation address"),
            ("169.254.3.4", "169.254.3.4", "a link-local address"),
            (None, "127.0.0.1", "a loopback address"),
        ]:
            with self.assertRaises(discovery.AddressError) as caught:
                self.settle(detected, "--token", "t0k3n")
            message = str(caught.exception)
            self.assertIn("portal mode needs a public address", message)
            self.assertIn("would register %s" % shown, message)
            self.assertIn(reason, message)
            self.assertIn("--public-ip4-addr", message)
            self.assertIn("LISTEN_ADDRESS_DISCOVERY_METHOD=gce_metadata|aws_ec2_metadata", message)
            self.assertNotIn("\n", message)
        # A public guess is registered; given addresses are taken as given.
        options, _ = self.settle(GCE_IP4, "--token", "t0k3n")
        self.assertEqual(options["public-ip4-addr"], GCE_IP4)
        options, _ = self.settle("10.0.0.5", "--token", "t0k3n", "--public-ip4-addr", "203.0.113.1")
        self.assertEqual((options["public-ip4-addr"], options["public-ip6-addr"]), ("203.0.113.1", None))
        options, _ = self.settle("10.0.0.5", "--token", "t0k3n", "--public-ip6-addr", AWS_IP6)
        self.assertEqual((options["public-ip4-addr"], options["public-ip6-addr"]), (None, AWS_IP6))

    def test_standalone_uses_a_guess_that_is_not_public_with_a_warning(self) -> None:
        for detected, shown, reason in [
            ("192.0.2.2", "192.0.2.2", "a documentation address"),
            ("10.128.0.7", "10.128.0.7", "a private address"),
            (None, "127.0.0.1", "a loopback address"),
        ]:
            options, events = self.settle(detected)
            self.assertEqual(options["public-ip4-addr"], shown)
            warnings = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
            self.assertEqual(len(warnings), 1, warnings)
            self.assertIn("using %s" % shown, warnings[0])
            self.assertIn(reason, warnings[0])
            self.assertIn("give --public-ip4-addr (PUBLIC_IP4_ADDR)", warnings[0])
        options, events = self.settle(GCE_IP4)
        self.assertEqual(options["public-ip4-addr"], GCE_IP4)
        self.assertEqual([e["log_level"].name for e in events], ["info"])
        self.assertIn("source address of the default route", formatEvent(events[0]))


# --- real relays ----------------------------------------------------------------


class DiscoveryProcessTests(unittest.TestCase):
    """``twistd firezone-relay`` in portal mode with address discovery."""

    timeout = 60

    def portal(self) -> StubPortal:
        stub = StubPortal()
        stub.push_init = False  # the listeners never open: nothing binds but the health port
        stub.start()
        self.addCleanup(stub.stop)
        return stub

    def relay(self, stub: StubPortal, method: str, host: str, *extra: str) -> Any:
        from tests.adapters.test_drain import RelayProcess

        env = {
            "FIREZONE_TOKEN": "stub-portal-token-8c1d",
            "LISTEN_ADDRESS_DISCOVERY_METHOD": method,
            "GCE_METADATA_HOST": host,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://" + host,
        }
        args = ["--api-url", stub.url(), "--bind-ip6-addr=::1"] + list(extra)
        started = time.monotonic()
        relay = RelayProcess(self, args, env, public_ip4=None)
        relay.started = started
        return relay

    @defer.inlineCallbacks
    def registered(self, stub: StubPortal, relay: Any) -> Any:
        """The query of the relay's websocket URL; then SIGTERM, exit 0."""
        request = yield stub.wait("connect", 1, timeout=20)
        relay.signal()
        code = yield relay.wait_exit(10)
        self.assertEqual(code, 0, relay.output())
        return request.params

    @defer.inlineCallbacks
    def test_gce_discovers_both_addresses_for_the_portal(self) -> Any:
        metadata = MetadataStandIn("gce", gce())
        stub = self.portal()
        relay = self.relay(stub, "gce_metadata", metadata.start(self))
        params = yield self.registered(stub, relay)
        self.assertEqual((params["ipv4"], params["ipv6"]), ([GCE_IP4], [GCE_IP6]))
        self.assertEqual(
            metadata.paths(), [("GET", discovery.GCE_IP4_PATH), ("GET", discovery.GCE_IP6_PATH)]
        )
        self.assertTrue(all(h.get("metadata-flavor") == "Google" for _, _, h in metadata.requests))
        output = relay.output()
        self.assertIn("public IPv4 %s from GCE metadata at http://127.0.0.1:" % GCE_IP4, output)
        self.assertIn("public IPv6 %s from GCE metadata" % GCE_IP6, output)

    @defer.inlineCallbacks
    def test_aws_takes_the_imdsv2_token_first_then_both_addresses(self) -> Any:
        metadata = MetadataStandIn("aws", aws())
        stub = self.portal()
        relay = self.relay(stub, "aws_ec2_metadata", metadata.start(self))
        params = yield self.registered(stub, relay)
        self.assertEqual((params["ipv4"], params["ipv6"]), ([AWS_IP4], [AWS_IP6]))
        self.assertEqual(
            metadata.paths(),
            [("PUT", discovery.AWS_TOKEN_PATH), ("GET", discovery.AWS_IP4_PATH), ("GET", discovery.AWS_IP6_PATH)],
        )
        put, get4, get6 = (h for _, _, h in metadata.requests)
        self.assertEqual(put["x-aws-ec2-metadata-token-ttl-seconds"], "60")
        self.assertEqual((get4["x-aws-ec2-metadata-token"], get6["x-aws-ec2-metadata-token"]), (metadata.token,) * 2)
        self.assertIn("public IPv4 %s from AWS EC2 metadata" % AWS_IP4, relay.output())

    @defer.inlineCallbacks
    def test_a_given_address_is_kept_and_only_the_other_is_asked(self) -> Any:
        metadata = MetadataStandIn("aws", aws())
        stub = self.portal()
        relay = self.relay(stub, "aws_ec2_metadata", metadata.start(self), "--public-ip4-addr", "198.51.100.20")
        params = yield self.registered(stub, relay)
        self.assertEqual((params["ipv4"], params["ipv6"]), (["198.51.100.20"], [AWS_IP6]))
        self.assertEqual(metadata.paths(), [("PUT", discovery.AWS_TOKEN_PATH), ("GET", discovery.AWS_IP6_PATH)])

    @defer.inlineCallbacks
    def test_no_ipv6_or_an_internal_ipv6_serves_ipv4_only(self) -> Any:
        # AWS without IPv6 answers 404 for it.
        metadata = MetadataStandIn("aws", aws(ip6=None))
        stub = self.portal()
        relay = self.relay(stub, "aws_ec2_metadata", metadata.start(self))
        params = yield self.registered(stub, relay)
        self.assertEqual(params["ipv4"], [AWS_IP4])
        self.assertNotIn("ipv6", params)
        # GCE with an internal IPv6 subnet lists a ULA: not served, said once.
        metadata = MetadataStandIn("gce", gce(ip6=b"fd20:9a3:1c5b:0:0:0:0:0/96\n"))
        stub = self.portal()
        relay = self.relay(stub, "gce_metadata", metadata.start(self), "--log-format", "json")
        params = yield self.registered(stub, relay)
        self.assertEqual(params["ipv4"], [GCE_IP4])
        self.assertNotIn("ipv6", params)
        records = [json.loads(line) for line in relay.output().splitlines() if line.startswith("{")]
        warnings = [r["msg"] for r in records if r["level"] == "warn" and "fd20:9a3:1c5b::" in r["msg"]]
        self.assertEqual(len(warnings), 1, relay.output())
        self.assertIn("a private address: IPv6 is not served (give --public-ip6-addr to serve it)", warnings[0])

    # --- metadata that cannot be used: one line, status 1, within ~10 s ---------

    @defer.inlineCallbacks
    def fails(self, method: str, host: str, fragment: str, *extra: str) -> Any:
        stub = self.portal()
        relay = self.relay(stub, method, host, *extra)
        code = yield relay.wait_exit(15)
        elapsed = time.monotonic() - relay.started
        output = relay.output()
        self.assertEqual(code, 1, output)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, output)
        source = "GCE metadata" if method == "gce_metadata" else "AWS EC2 metadata"
        self.assertTrue(lines[0].startswith("firezone-relay: "), output)
        self.assertIn("from %s at http://%s" % (source, host), lines[0])
        self.assertIn(fragment, lines[0])
        self.assertNotIn("Traceback", output)
        self.assertLess(elapsed, 10.0, output)
        self.assertEqual(stub.count("connect"), 0)  # never registered
        return lines[0]

    @defer.inlineCallbacks
    def test_garbage_and_html_answers(self) -> Any:
        metadata = MetadataStandIn("gce", gce(ip4=b"hello, metadata"))
        yield self.fails("gce_metadata", metadata.start(self), "answered 'hello, metadata', which is not an IPv4 address")
        html = b"<!DOCTYPE html><html><head><title>Sign in to the Wi-Fi</title></head></html>"
        metadata = MetadataStandIn("aws", aws(ip4=html))
        line = yield self.fails("aws_ec2_metadata", metadata.start(self), "GET http://")
        self.assertIn("/latest/meta-data/public-ipv4: answered '<!DOCTYPE html>", line)
        self.assertIn("...', which is not an IPv4 address", line)
        metadata = MetadataStandIn("gce", gce(ip4=b"\xff\xfe\x00garbage"))
        yield self.fails("gce_metadata", metadata.start(self), "the answer is not ASCII text")
        metadata = MetadataStandIn("aws", aws(ip4=b"1" * 5000))
        yield self.fails("aws_ec2_metadata", metadata.start(self), "the answer is longer than 1024 bytes")

    @defer.inlineCallbacks
    def test_a_private_address_answered(self) -> Any:
        metadata = MetadataStandIn("gce", gce(ip4=b"10.128.0.7"))
        yield self.fails("gce_metadata", metadata.start(self), "answered 10.128.0.7, which is a private address, not a public address")
        metadata = MetadataStandIn("aws", aws(ip4=b"172.31.5.9"))
        yield self.fails("aws_ec2_metadata", metadata.start(self), "answered 172.31.5.9, which is a private address")

    @defer.inlineCallbacks
    def test_no_address_at_all_404(self) -> Any:
        metadata = MetadataStandIn("gce", {})
        yield self.fails("gce_metadata", metadata.start(self), "reports no public IPv4 or IPv6 address for this instance")
        self.assertEqual(len(metadata.requests), 2)
        metadata = MetadataStandIn("aws", {})
        yield self.fails("aws_ec2_metadata", metadata.start(self), "reports no public IPv4 or IPv6 address")
        self.assertEqual(len(metadata.requests), 3)

    @defer.inlineCallbacks
    def test_redirects_are_not_followed(self) -> Any:
        target = MetadataStandIn("gce", gce())
        elsewhere = "http://%s%s" % (target.start(self), discovery.GCE_IP4_PATH)
        answers = {discovery.GCE_IP4_PATH: (302, b"", {"Location": elsewhere})}
        metadata = MetadataStandIn("gce", answers)
        yield self.fails("gce_metadata", metadata.start(self), "redirected (HTTP 302 to '%s'); metadata redirects are not followed" % elsewhere)
        self.assertEqual(target.requests, [])
        answers = {discovery.AWS_TOKEN_PATH: (307, b"", {"Location": "http://169.254.169.254/latest/api/token"})}
        metadata = MetadataStandIn("aws", answers)
        yield self.fails("aws_ec2_metadata", metadata.start(self), "PUT http://")
        self.assertEqual(metadata.paths(), [("PUT", discovery.AWS_TOKEN_PATH)])

    @defer.inlineCallbacks
    def test_not_the_metadata_service(self) -> Any:
        # A GCE answer without Metadata-Flavor: Google (a proxy, a captive portal).
        metadata = MetadataStandIn("gce", gce(), flavor=False)
        yield self.fails("gce_metadata", metadata.start(self), "lacks Metadata-Flavor: Google")
        # IMDSv2 refused (the token is required): no address is read without it.
        metadata = MetadataStandIn("aws", {discovery.AWS_TOKEN_PATH: (403, b"Forbidden", {})})
        yield self.fails("aws_ec2_metadata", metadata.start(self), "/latest/api/token: HTTP 403")
        self.assertEqual(metadata.paths(), [("PUT", discovery.AWS_TOKEN_PATH)])
        # Not HTTP at all.
        port = reactor.listenTCP(0, Factory.forProtocol(_NotHttp), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.fails("aws_ec2_metadata", "127.0.0.1:%d" % port.getHost().port, "not an HTTP answer")

    @defer.inlineCallbacks
    def test_timeout_and_unreachable(self) -> Any:
        port = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.fails("gce_metadata", "127.0.0.1:%d" % port.getHost().port, "no answer within 2 s")
        yield self.fails("aws_ec2_metadata", "127.0.0.1:%d" % closed_port(), "/latest/api/token: connection refused")

    @defer.inlineCallbacks
    def test_an_answer_that_never_completes_meets_the_overall_deadline(self) -> Any:
        factory = Factory.forProtocol(_Trickle)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.fails("gce_metadata", "127.0.0.1:%d" % port.getHost().port, "no complete answer within 5 s")

    # --- without discovery: the route-lookup guess ------------------------------------

    @defer.inlineCallbacks
    def test_portal_mode_never_registers_a_guess_that_is_not_public(self) -> Any:
        from tests.adapters.test_drain import RelayProcess

        guess = tap.detect_public_ip4() or "127.0.0.1"
        reason = discovery.non_public_reason(guess)
        stub = self.portal()
        relay = RelayProcess(self, ["--api-url", stub.url()], {"FIREZONE_TOKEN": "stub-portal-token-8c1d"}, public_ip4=None)
        if reason is None:  # a host with a public address: it is registered
            request = yield stub.wait("connect", 1, timeout=20)
            self.assertEqual(request.params["ipv4"], [guess])
            return
        # Here (documentation 192.0.2.2) and in CI (a private VPC address).
        code = yield relay.wait_exit(15)
        output = relay.output()
        self.assertEqual(code, 1, output)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, output)
        self.assertIn("firezone-relay: portal mode needs a public address", lines[0])
        self.assertIn("would register %s" % guess, lines[0])
        self.assertIn(reason, lines[0])
        self.assertEqual(stub.count("connect"), 0)

    @defer.inlineCallbacks
    def test_standalone_warns_about_a_guess_that_is_not_public(self) -> Any:
        from tests.adapters.test_drain import RelayProcess, binding_answered
        from tests.helpers import TurnClient, listen

        guess = tap.detect_public_ip4() or "127.0.0.1"
        reason = discovery.non_public_reason(guess)
        relay = RelayProcess(self, ["--log-format", "json"], public_ip4=None)
        probe = TurnClient(relay.server)
        self.addCleanup(listen(probe).stopListening)
        yield binding_answered(probe)  # it serves
        relay.signal()
        code = yield relay.wait_exit(10)
        self.assertEqual(code, 0, relay.output())
        records = [json.loads(line) for line in relay.output().splitlines() if line.startswith("{")]
        about = [r for r in records if "no --public-ip4-addr" in r["msg"]]
        self.assertEqual(len(about), 1, relay.output())
        self.assertEqual(about[0]["public_ip4"], guess)
        if reason is None:
            self.assertEqual(about[0]["level"], "info")
        else:
            self.assertEqual(about[0]["level"], "warn")
            self.assertIn(reason, about[0]["msg"])
            self.assertIn("give --public-ip4-addr (PUBLIC_IP4_ADDR)", about[0]["msg"])
