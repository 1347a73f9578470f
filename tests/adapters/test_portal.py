"""The portal client against a stand-in portal over real loopback sockets.

In-process tests own the client's clock (``task.Clock``: heartbeats, join
timeout, reconnect delays) while the websocket runs on the real reactor.  The
exit-status tests start real ``twistd firezone-relay`` processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from firezone_relay.adapters import portal as P
from firezone_relay.core import stun
from firezone_relay.core.phoenix import MAX_FRAME_BYTES
from tests.portal_stub import TOKEN, StubPortal, make_certificates

SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"


def sleep(seconds: float) -> "defer.Deferred[None]":
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        yield sleep(0.01)


class PureHelperTests(unittest.SynchronousTestCase):
    def test_url(self) -> None:
        self.assertEqual(
            P.portal_url("wss://api.firezone.dev", None, "203.0.113.101", "203:0:113::101", 3478),
            "wss://api.firezone.dev/relay/websocket?ipv4=203.0.113.101&ipv6=203%3A0%3A113%3A%3A101&port=3478",
        )
        self.assertEqual(
            P.portal_url("https://example.com/base/", "relay one&two", "192.0.2.1", None, 3479),
            "wss://example.com/base/relay/websocket?name=relay+one%26two&ipv4=192.0.2.1&port=3479",
        )
        self.assertEqual(
            P.portal_url("http://127.0.0.1:4000", None, None, "2001:db8::1", 3478),
            "ws://127.0.0.1:4000/relay/websocket?ipv6=2001%3Adb8%3A%3A1&port=3478",
        )
        self.assertEqual(P.portal_url("ws://[::1]:4000", None, "192.0.2.1", None, 1), "ws://[::1]:4000/relay/websocket?ipv4=192.0.2.1&port=1")
        for bad in ("ftp://x", "localhost:4000", "wss://"):
            with self.assertRaises(ValueError):
                P.portal_url(bad, None, "192.0.2.1", None, 3478)

    def test_header_and_user_agent(self) -> None:
        self.assertEqual(P.bearer_header("  abc\n"), "Bearer abc")
        self.assertEqual(P.bearer_header("a b\r\nX-Evil: 1"), "Bearer abX-Evil:1")
        self.assertRegex(P.user_agent(), r"^[A-Za-z0-9._+-]+/[A-Za-z0-9._+-]+ relay/\d+\.\d+\.\d+ \([^;()]+; [^;()]+\)$")

    def test_retry_after(self) -> None:
        self.assertEqual(P.parse_retry_after("7", 0.0), 7.0)
        self.assertEqual(P.parse_retry_after(" 120 ", 0.0), 120.0)
        self.assertIsNone(P.parse_retry_after(None, 0.0))
        self.assertIsNone(P.parse_retry_after("soon", 0.0))
        self.assertEqual(P.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0), 10.0)
        self.assertEqual(P.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412490.0), 0.0)

    def test_retry_after_hostile_values_are_parsed_safely_and_clamped(self) -> None:
        """Issue 14 item 12: any value gives a delay in [0, 300] s or None (the backoff), never an exception."""
        self.assertEqual(P.RETRY_AFTER_MAX, 300.0)
        cases = {
            "9" * 400: 300.0,  # float(int(...)) raised OverflowError here
            "1" + "0" * 5000: 300.0,  # int() of > 4300 digits raises ValueError
            "301": 300.0,
            "300": 300.0,
            "61": 61.0,
            "0": 0.0,
            "000000000000000000000000000042": 300.0,
            "-5": None,
            "-" + "9" * 400: None,
            "1e9": None,
            "inf": None,
            "nan": None,
            "\u00b2": None,  # str.isdigit() is true, int() raises
            "\u0663": None,  # an Arabic-Indic digit
            "12 34": None,
            "x" * 100000: None,
            "": None,
            "Wed, 21 Oct 2015 07:28:10 GMT": 10.0,
            "Wed, 21 Oct 2015 07:28:55 GMT": 55.0,
            "Wed, 21 Oct 2015 07:30:00 GMT": 120.0,
            "Wed, 21 Oct 2015 07:38:00 GMT": 300.0,
            "Wed, 21 Oct 2015 07:27:00 GMT": 0.0,  # in the past
            "Fri, 31 Dec 9999 23:59:59 GMT": 300.0,
            "Mon, 01 Jan 0001 00:00:00 GMT": 0.0,
            "Wed, 21 Oct 99999999999 07:28:00 GMT": None,
            "Wed, 99 Oct 2015 07:28:00 GMT": None,
            "Wed, 21 Oct 2015 99:99:99 GMT": None,
            "Wed, 21 Oct 2015 07:28:00 +9999": None,
        }
        now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
        for value, expected in cases.items():
            self.assertEqual(P.parse_retry_after(value, now), expected, value[:40])

    def test_trust_root_file(self) -> None:
        ca, cert, _ = make_certificates()
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(ca + cert)
        self.assertIsNotNone(P.load_trust_root(path))
        with open(path, "wb") as f:
            f.write(b"nothing")
        with self.assertRaises(ValueError):
            P.load_trust_root(path)


class _Silent(Protocol):
    """Accepts TCP and never says a word (an upgrade that never completes)."""


class PortalClientTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.inits: List[float] = []
        self.fatals: List[str] = []
        self.logs: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)

    def start_stub(self, **attributes: Any) -> StubPortal:
        stub = StubPortal(tls=attributes.pop("tls", None))
        for name, value in attributes.items():
            setattr(stub, name, value)
        stub.start()
        self.addCleanup(stub.stop)
        return stub

    def make_client(self, api_url: str, token: str = TOKEN, **kwargs: Any) -> P.PortalClient:
        url = P.portal_url(api_url, "relay-1", "203.0.113.7", "2001:db8::7", 3478)
        client = P.PortalClient(
            url,
            token,
            SECRET,
            on_init=lambda: self.inits.append(self.clock.seconds()),
            on_fatal=self.fatals.append,
            clock=self.clock,
            rng=random.Random(1),
            **kwargs,
        )
        client.startService()
        self.addCleanup(client.stopService)
        return client

    def messages(self, fragment: str) -> List[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logs if fragment in formatEvent(e)]

    @defer.inlineCallbacks
    def joined(self, stub: StubPortal, client: P.PortalClient, n: Optional[int] = None) -> Any:
        yield stub.wait("join", n)
        yield wait_until(lambda: client.session.joined, what="join acknowledged")

    @defer.inlineCallbacks
    def next_attempt(self, client: P.PortalClient) -> Any:
        """Wait for the scheduled reconnect, then let the clock reach it."""
        yield wait_until(lambda: client._retry_call is not None, what="a reconnect to be scheduled")
        self.clock.advance(client._retry_call.getTime() - self.clock.seconds())

    # --- the happy path -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_join_init_and_heartbeats(self) -> Any:
        stub = self.start_stub()
        client = self.make_client(stub.url())
        request = yield stub.wait("connect")
        self.assertEqual(request.path, "/relay/websocket")
        self.assertEqual(
            request.params, {"name": ["relay-1"], "ipv4": ["203.0.113.7"], "ipv6": ["2001:db8::7"], "port": ["3478"]}
        )
        self.assertEqual(request.headers["x-authorization"], "Bearer " + TOKEN)
        self.assertRegex(request.headers["user-agent"], r" relay/\d+\.\d+\.\d+ \(")
        join = yield stub.wait("join")
        self.assertEqual(join, {"topic": "relay", "event": "phx_join", "payload": {"stamp_secret": SECRET}, "ref": 0})
        yield wait_until(lambda: self.inits, what="init")
        self.assertTrue(client.session.joined and client.serving and client.session.open)
        self.assertEqual(self.messages("connected to the portal"), ["connected to the portal (joined topic relay)"])
        for i in range(1, 6):
            self.clock.advance(10)
            heartbeat = yield stub.wait("heartbeat", i)
            self.assertEqual(heartbeat, {"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": i})
        yield sleep(0.05)
        self.assertEqual((stub.count("connect"), len(self.inits), self.fatals), (1, 1, []))
        self.assertEqual(client.session._unanswered, set())

    @defer.inlineCallbacks
    def test_readiness_flag(self) -> Any:
        from firezone_relay.adapters.http import Readiness

        readiness = Readiness(portal_required=True)
        stub = self.start_stub()
        client = self.make_client(stub.url(), readiness=readiness)
        yield self.joined(stub, client)
        self.assertTrue(readiness.portal_joined)
        stub.drop()
        yield wait_until(lambda: not client.session.open, what="connection loss")
        self.assertFalse(readiness.portal_joined)

    # --- reconnect rules ---------------------------------------------------------

    @defer.inlineCallbacks
    def test_unanswered_heartbeats_reconnect_with_the_same_secret(self) -> Any:
        stub = self.start_stub(answer_heartbeats=False)
        client = self.make_client(stub.url())
        yield self.joined(stub, client)
        for i in range(1, 4):
            self.clock.advance(10)
            yield stub.wait("heartbeat", i)
        self.assertEqual(stub.count("close"), 0)
        self.clock.advance(10)  # a 4th would be due: more than 3 unanswered
        yield stub.wait("close")
        self.assertEqual(stub.count("heartbeat"), 3)
        # After a join: exponential backoff from 0.5 s ±50 %.
        yield wait_until(lambda: client._retry_call is not None, what="reconnect scheduled")
        delay = client._retry_call.getTime() - self.clock.seconds()
        self.assertTrue(0.25 <= delay <= 0.75, delay)
        self.assertTrue(self.messages("too many heartbeats were unanswered"))
        yield self.next_attempt(client)
        second = yield stub.wait("join", 2)
        self.assertEqual(second["payload"], {"stamp_secret": SECRET})
        self.assertEqual(second["ref"], 0)  # refs restart on every connection
        yield wait_until(lambda: client.session.joined)
        self.assertEqual(len(self.inits), 1)  # listeners open only once
        self.assertEqual(self.fatals, [])

    @defer.inlineCallbacks
    def test_join_timeout_then_constant_1s_before_any_join(self) -> Any:
        stub = self.start_stub(join_reply=None)
        client = self.make_client(stub.url())
        yield stub.wait("join")
        self.clock.advance(4.9)
        yield sleep(0.05)
        self.assertEqual(stub.count("close"), 0)
        self.clock.advance(0.1)
        yield stub.wait("close")
        yield wait_until(lambda: client._retry_call is not None)
        self.assertEqual(client._retry_call.getTime() - self.clock.seconds(), 1.0)
        self.assertTrue(self.messages("join timed out"))
        stub.join_reply = "ok"
        yield self.next_attempt(client)
        yield self.joined(stub, client, 2)
        self.assertEqual(self.fatals, [])

    @defer.inlineCallbacks
    def test_portal_unreachable_gives_up_after_15s(self) -> Any:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        client = self.make_client("http://127.0.0.1:%d" % port)
        delays = []
        while not self.fatals:
            yield wait_until(lambda: client._retry_call is not None or self.fatals, what="next attempt or give-up")
            if self.fatals:
                break
            delays.append(client._retry_call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [1.0] * 15)
        self.assertEqual(client.attempts, 16)
        self.assertEqual(len(self.fatals), 1)
        self.assertIn("no portal connection for 15 s", self.fatals[0])
        self.assertIn("could not connect", self.fatals[0])
        self.clock.advance(100)
        self.assertEqual(client.attempts, 16)

    @defer.inlineCallbacks
    def test_retry_after_replaces_the_backoff(self) -> Any:
        stub = self.start_stub(deny_status=503, deny_reason="rate_limit", deny_headers=[("Retry-After", "7")])
        client = self.make_client(stub.url())
        yield wait_until(lambda: client._retry_call is not None)
        self.assertEqual(client._retry_call.getTime() - self.clock.seconds(), 7.0)
        self.assertTrue(self.messages("websocket upgrade refused with HTTP 503"))
        stub.deny_status = None
        self.clock.advance(7)
        yield self.joined(stub, client)
        # After a join, too: Retry-After beats the exponential backoff.
        stub.deny_status = 503
        stub.deny_headers = [("Retry-After", "30")]
        stub.drop()
        yield self.next_attempt(client)
        yield wait_until(lambda: client._retry_call is not None and stub.count("connect") == 3)
        self.assertEqual(client._retry_call.getTime() - self.clock.seconds(), 30.0)
        stub.deny_status = None
        self.clock.advance(30)
        yield self.joined(stub, client, 2)
        self.assertEqual(self.fatals, [])

    @defer.inlineCallbacks
    def test_retry_after_of_400_digits_is_clamped_and_the_loop_goes_on(self) -> Any:
        """Issue 14 item 12: 400 digits raised OverflowError inside _lost and nothing was rescheduled."""
        stub = self.start_stub(deny_status=503, deny_reason="rate_limit", deny_headers=[("Retry-After", "9" * 400)])
        client = self.make_client(stub.url())
        yield wait_until(lambda: client._retry_call is not None, what="a reconnect to be scheduled")
        # Before any join the 15 s window bounds it as well.
        self.assertEqual(client._retry_call.getTime() - self.clock.seconds(), 15.0)
        stub.deny_status = None
        self.clock.advance(15)
        yield self.joined(stub, client)
        stub.deny_status = 503
        stub.drop()
        yield wait_until(lambda: client._retry_call is not None, what="a reconnect to be scheduled")
        self.clock.advance(client._retry_call.getTime() - self.clock.seconds())
        yield wait_until(lambda: client._retry_call is not None and stub.count("connect") == 3)
        self.assertEqual(client._retry_call.getTime() - self.clock.seconds(), 300.0)
        stub.deny_status = None
        self.clock.advance(300)
        yield self.joined(stub, client, 2)
        self.assertEqual(self.fatals, [])

    @defer.inlineCallbacks
    def test_an_error_while_handling_a_lost_connection_still_schedules_the_retry(self) -> Any:
        stub = self.start_stub(deny_status=503)
        client = self.make_client(stub.url())
        original = P.PortalProtocol.upgrade_failure
        broken: List[int] = []

        def upgrade_failure(protocol: Any) -> Any:
            broken.append(1)
            raise RuntimeError("a bug while reading the refused upgrade")

        P.PortalProtocol.upgrade_failure = upgrade_failure  # type: ignore[method-assign]
        self.addCleanup(setattr, P.PortalProtocol, "upgrade_failure", original)
        yield wait_until(lambda: client._retry_call is not None, what="a reconnect to be scheduled")
        self.assertEqual(broken, [1])
        self.assertEqual(client._retry_call.getTime() - self.clock.seconds(), 1.0)
        self.assertTrue(self.messages("error while handling the lost connection; reconnecting anyway"))
        self.flushLoggedErrors(RuntimeError)
        P.PortalProtocol.upgrade_failure = original  # type: ignore[method-assign]
        stub.deny_status = None
        self.clock.advance(1)
        yield self.joined(stub, client)
        self.assertEqual(self.fatals, [])

    @defer.inlineCallbacks
    def test_phx_close_disconnect_and_close_frame_reconnect(self) -> Any:
        stub = self.start_stub()
        client = self.make_client(stub.url())
        yield self.joined(stub, client)
        stub.push("relay", "phx_close", {}, 0)
        yield stub.wait("close")
        yield self.next_attempt(client)
        yield self.joined(stub, client, 2)
        stub.push("relay", "disconnect", {"reason": "maintenance"})
        yield stub.wait("close", 2)
        yield self.next_attempt(client)
        yield self.joined(stub, client, 3)
        stub.close(4000)
        yield stub.wait("close", 3)
        yield self.next_attempt(client)
        yield self.joined(stub, client, 4)
        self.assertTrue(self.messages("connection closed by the portal (close code 4000)"))
        self.assertEqual((self.fatals, len(self.inits)), ([], 1))

    @defer.inlineCallbacks
    def test_upgrade_that_never_completes_times_out(self) -> Any:
        factory = Factory.forProtocol(_Silent)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = self.make_client("http://127.0.0.1:%d" % port.getHost().port, connect_timeout=5)
        yield wait_until(lambda: client.protocol is not None, what="TCP connect")
        self.clock.advance(4.9)
        yield sleep(0.05)
        self.assertIsNone(client._retry_call)
        self.clock.advance(0.1)
        yield wait_until(lambda: client._retry_call is not None)
        self.assertTrue(self.messages("websocket upgrade timed out after 5 s"))
        # With the default budget the first attempt uses up the initial 15 s window.
        yield client.close()
        client = self.make_client("http://127.0.0.1:%d" % port.getHost().port)
        yield wait_until(lambda: client.protocol is not None, what="TCP connect")
        self.clock.advance(15)
        yield wait_until(lambda: self.fatals, what="give-up")
        self.assertIn("no portal connection for 15 s (last error: websocket upgrade timed out after 15 s)", self.fatals[0])

    # --- fatal rules ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_401_is_fatal(self) -> Any:
        stub = self.start_stub()
        client = self.make_client(stub.url(), token="wrong-token")
        yield wait_until(lambda: self.fatals, what="fatal")
        self.assertEqual(len(self.fatals), 1)
        self.assertIn("portal rejected the token (HTTP 401", self.fatals[0])
        self.assertTrue(self.messages("portal rejected the token"))
        self.clock.advance(60)
        yield sleep(0.05)
        self.assertEqual((client.attempts, stub.count("connect")), (1, 1))
        self.assertFalse(any("wrong-token" in str(e) for e in self.logs))

    @defer.inlineCallbacks
    def test_join_error_is_fatal(self) -> Any:
        stub = self.start_stub(join_reply="error", join_error="disabled")
        client = self.make_client(stub.url())
        yield wait_until(lambda: self.fatals, what="fatal")
        self.assertEqual(self.fatals, ["portal rejected the join: disabled"])
        yield stub.wait("close", 1)
        self.clock.advance(60)
        self.assertEqual(client.attempts, 1)

    @defer.inlineCallbacks
    def test_unmatched_topic_joins_again(self) -> Any:
        stub = self.start_stub(join_reply="error", join_error="unmatched topic")
        client = self.make_client(stub.url())
        yield stub.wait("join", 2)
        stub.join_reply = "ok"
        yield sleep(0.05)
        self.assertEqual(self.fatals, [])
        self.assertEqual(stub.count("connect"), 1)
        self.assertTrue(client.session.open)

    @defer.inlineCallbacks
    def test_token_expired_is_fatal(self) -> Any:
        stub = self.start_stub()
        client = self.make_client(stub.url())
        yield self.joined(stub, client)
        stub.push("relay", "disconnect", {"reason": "token_expired"})
        yield wait_until(lambda: self.fatals, what="fatal")
        self.assertEqual(self.fatals, ["portal token expired"])
        self.clock.advance(60)
        self.assertEqual(client.attempts, 1)

    # --- garbage ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_garbage_is_ignored_and_logged_with_a_limit(self) -> Any:
        stub = self.start_stub()
        client = self.make_client(stub.url())
        yield self.joined(stub, client)
        stub.send_text("{not json")
        stub.send_text("[1, 2]")
        stub.send_text(json.dumps({"topic": "relay", "event": "init"}))  # no payload
        stub.send_binary(b"\x00\x01binary")
        stub.send_text(json.dumps({"topic": "relay", "event": "x" * (MAX_FRAME_BYTES + 10), "payload": {}, "ref": None}))
        stub.push("relay", "surprise", {"a": 1})
        stub.push("relay", "phx_error", {"reason": "channel_crash"})
        for i in range(50):
            stub.push("relay", "flood", {"i": i})
        yield wait_until(lambda: client.ignored == 57, what="57 ignored frames")
        self.assertEqual(len(self.messages("portal frame ignored")), P.IGNORED_LOG_BURST)
        self.assertTrue(self.messages("binary frame of 8 bytes"))
        # The connection is fine: heartbeats are still answered.
        self.clock.advance(10)
        yield stub.wait("heartbeat")
        self.assertEqual((stub.count("connect"), stub.count("close"), self.fatals), (1, 0, []))
        # A minute later the suppressed count is logged once and lines flow again.
        self.clock.advance(P.IGNORED_LOG_WINDOW)
        stub.push("relay", "another", {})
        yield wait_until(lambda: client.ignored == 58)
        self.assertTrue(self.messages("52 more frames ignored without a log line"))

    @defer.inlineCallbacks
    def test_oversized_frame_drops_the_connection(self) -> Any:
        stub = self.start_stub()
        client = self.make_client(stub.url())
        yield self.joined(stub, client)
        stub.send_text("x" * (P.MAX_MESSAGE_BYTES + 1))
        yield stub.wait("close")
        yield self.next_attempt(client)
        yield self.joined(stub, client, 2)
        self.assertEqual(self.fatals, [])

    # --- close --------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_close_sends_a_close_frame_and_stops_reconnecting(self) -> Any:
        stub = self.start_stub()
        client = self.make_client(stub.url())
        yield self.joined(stub, client)
        yield client.close()
        closed = yield stub.wait("close", 1)
        self.assertEqual(closed[:2], (True, 1000))
        self.assertTrue(self.messages("closing the portal connection"))
        self.clock.advance(120)
        yield sleep(0.05)
        self.assertEqual((client.attempts, client._retry_call, self.fatals), (1, None, []))

    @defer.inlineCallbacks
    def test_close_while_waiting_to_reconnect(self) -> Any:
        stub = self.start_stub()
        client = self.make_client(stub.url())
        yield self.joined(stub, client)
        stub.drop()
        yield wait_until(lambda: client._retry_call is not None)
        yield client.close()
        self.clock.advance(120)
        self.assertEqual(client.attempts, 1)

    # --- TLS ----------------------------------------------------------------------

    def tls_stub(self) -> tuple[StubPortal, Any]:
        ca, cert, key = make_certificates(("localhost",))
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(ca)
        return self.start_stub(tls=(cert, key)), P.load_trust_root(path)

    @defer.inlineCallbacks
    def test_wss_with_the_right_ca_and_host(self) -> Any:
        stub, trust = self.tls_stub()
        client = self.make_client(stub.url("localhost"), trust_root=trust)
        yield self.joined(stub, client)
        self.assertTrue(client.secure)

    @defer.inlineCallbacks
    def test_wss_wrong_hostname_is_refused(self) -> Any:
        stub, trust = self.tls_stub()
        client = self.make_client(stub.url("127.0.0.1"), trust_root=trust)  # the certificate says localhost
        yield wait_until(lambda: client._retry_call is not None, what="refusal")
        self.assertEqual(stub.count("open"), 0)
        self.assertEqual(stub.count("connect"), 0)
        self.assertTrue(self.messages("VerificationError"), [e.get("log_format") for e in self.logs][-5:])

    @defer.inlineCallbacks
    def test_wss_untrusted_ca_is_refused(self) -> Any:
        stub, _ = self.tls_stub()
        client = self.make_client(stub.url("localhost"))  # platform trust store
        yield wait_until(lambda: client._retry_call is not None, what="refusal")
        self.assertEqual(stub.count("connect"), 0)
        self.assertTrue(self.messages("certificate verify failed") or self.messages("SSL"))


# --- the real process ------------------------------------------------------------


class PortalProcessTests(unittest.TestCase):
    """``twistd firezone-relay`` in portal mode against the stand-in portal."""

    timeout = 60

    def start_stub(self, **attributes: Any) -> StubPortal:
        stub = StubPortal(tls=attributes.pop("tls", None))
        for name, value in attributes.items():
            setattr(stub, name, value)
        stub.start()
        self.addCleanup(stub.stop)
        return stub

    def start_relay(self, api_url: str, *extra: str, **env: str) -> Any:
        from tests.adapters.test_drain import RelayProcess

        env.setdefault("FIREZONE_TOKEN", TOKEN)
        return RelayProcess(self, ["--api-url", api_url, "--name", "relay-under-test"] + list(extra), env)

    def assertClean(self, output: str) -> None:
        self.assertNotIn(TOKEN, output)
        self.assertNotIn(SECRET_MARKER, output)

    @defer.inlineCallbacks
    def readyz(self, relay: Any) -> Any:
        """The status of ``GET /readyz`` (the port is in the relay's log)."""
        import urllib.error
        import urllib.request

        from twisted.internet.threads import deferToThread

        from tests.adapters.test_drain import wait_until

        found = yield wait_until(
            lambda: re.search(r"HTTP health and metrics on 127\.0\.0\.1:(\d+)", relay.output()), what="HTTP port"
        )

        def get() -> int:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%s/readyz" % found.group(1), timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        status = yield deferToThread(get)
        return status

    @defer.inlineCallbacks
    def test_listeners_open_on_the_first_init_and_sigterm_closes_the_portal(self) -> Any:
        from tests.adapters.test_drain import binding_answered
        from tests.helpers import TurnClient, listen

        stub = self.start_stub(push_init=False)
        relay = self.start_relay(stub.url())
        request = yield stub.wait("connect", 1, timeout=20)
        self.assertEqual(request.params["name"], ["relay-under-test"])
        self.assertEqual(request.params["ipv4"], ["203.0.113.1"])
        self.assertEqual(request.params["port"], [str(relay.listen_port)])
        join = yield stub.wait("join", 1)
        secret = join["payload"]["stamp_secret"]
        self.assertRegex(secret, r"^[0-9a-f]{64}$")
        probe = TurnClient(relay.server)
        self.addCleanup(listen(probe).stopListening)
        with self.assertRaises(AssertionError):
            yield binding_answered(probe, timeout=1.0)  # no listener before init
        readyz = yield self.readyz(relay)
        self.assertEqual(readyz, 503)
        stub.push("relay", "init", {})
        response = yield binding_answered(probe, timeout=5.0)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        # The secret the portal got is the one TURN uses.
        from tests.helpers import error_code

        _, response = yield probe.allocate(secret, int(time.time()) + 600)
        self.assertIsNone(error_code(response), response)
        readyz = yield self.readyz(relay)
        self.assertEqual(readyz, 200)
        # A portal outage: TURN goes on, the relay reconnects with the same secret.
        stub.drop()
        response = yield probe.request(stun.REFRESH, [(stun.LIFETIME, 600)])
        self.assertIsNone(error_code(response), response)
        second = yield stub.wait("join", 2, timeout=10)
        self.assertEqual(second["payload"], {"stamp_secret": secret})
        response = yield probe.request(stun.REFRESH, [(stun.LIFETIME, 0)])
        self.assertIsNone(error_code(response), response)
        relay.signal(signal.SIGTERM)
        closed = yield stub.wait("close", 2)
        self.assertEqual(closed[:2], (True, 1000))
        code = yield relay.wait_exit(10)
        output = relay.output()
        self.assertEqual(code, 0, output)
        self.assertIn("portal init received: opening the STUN/TURN listeners", output)
        self.assertNotIn(TOKEN, output)
        self.assertNotIn(secret, output)

    @defer.inlineCallbacks
    def test_wss_with_a_private_ca(self) -> Any:
        ca, cert, key = make_certificates(("localhost",))
        ca_path = os.path.abspath(self.mktemp())
        with open(ca_path, "wb") as f:
            f.write(ca)
        stub = self.start_stub(tls=(cert, key))
        relay = self.start_relay(stub.url("localhost"), FIREZONE_PORTAL_CA_FILE=ca_path)
        yield stub.wait("join", 1, timeout=20)
        relay.signal(signal.SIGTERM)
        code = yield relay.wait_exit(10)
        self.assertEqual(code, 0, relay.output())

    @defer.inlineCallbacks
    def exits_nonzero(self, relay: Any, message: str, timeout: float = 20.0) -> Any:
        code = yield relay.wait_exit(timeout)
        output = relay.output()
        self.assertEqual(code, 1, output)
        self.assertIn(message, output)
        self.assertNotIn(TOKEN, output)
        self.assertIn("Main loop terminated", output)  # a clean shutdown, then the status
        return output

    @defer.inlineCallbacks
    def test_401_exits_nonzero(self) -> Any:
        stub = self.start_stub(token="another-token")
        relay = self.start_relay(stub.url())
        yield self.exits_nonzero(relay, "portal rejected the token (HTTP 401")
        self.assertEqual(stub.count("connect"), 1)

    @defer.inlineCallbacks
    def test_join_error_exits_nonzero(self) -> Any:
        stub = self.start_stub(join_reply="error", join_error="disabled")
        relay = self.start_relay(stub.url())
        yield self.exits_nonzero(relay, "portal rejected the join: disabled")

    @defer.inlineCallbacks
    def test_token_expired_exits_nonzero(self) -> Any:
        stub = self.start_stub()
        relay = self.start_relay(stub.url())
        yield stub.wait("join", 1, timeout=20)
        stub.push("relay", "disconnect", {"reason": "token_expired"})
        yield self.exits_nonzero(relay, "portal token expired")

    @defer.inlineCallbacks
    def test_unreachable_portal_exits_nonzero_after_15s(self) -> Any:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started = time.monotonic()
        relay = self.start_relay("http://127.0.0.1:%d" % port)
        output = yield self.exits_nonzero(relay, "no portal connection for 15 s", timeout=30)
        elapsed = time.monotonic() - started
        self.assertTrue(15 <= elapsed < 25, elapsed)
        # 1 s between a failure and the next attempt (upstream), plus the failing connects.
        self.assertGreaterEqual(output.count("portal connection hiccup"), 10)

    @defer.inlineCallbacks
    def test_retry_after_of_400_digits_then_recovery_joins(self) -> Any:
        """Issue 14 item 12 through the real process: 503 with a 400-digit
        Retry-After, then the portal recovers; the relay reconnects and joins
        (before, an OverflowError ended the reconnect loop for good)."""
        stub = self.start_stub(deny_status=503, deny_reason="rate_limit", deny_headers=[("Retry-After", "9" * 400)])
        relay = self.start_relay(stub.url())
        yield stub.wait("connect", 1, timeout=20)
        from tests.adapters.test_drain import wait_until as wait_for

        found = yield wait_for(
            lambda: re.search(r"refused with HTTP 503.*reconnecting in ([0-9.]+) s", relay.output()), 10, "the hiccup line"
        )
        self.assertLessEqual(float(found.group(1)), 15.0)
        stub.deny_status = None
        yield stub.wait("join", 1, timeout=25)
        self.assertTrue(relay.running())
        output = relay.output()
        self.assertNotIn("Traceback", output)
        self.assertNotIn("OverflowError", output)
        relay.signal(signal.SIGTERM)
        code = yield relay.wait_exit(10)
        self.assertEqual(code, 0, relay.output())


SECRET_MARKER = "stamp_secret"
