"""The control endpoint and ``firezone-relay-ctl`` against a real relay process (SPEC §10)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from firezone_relay.adapters.control import ControlResource, ControlService
from firezone_relay.core import stun
from tests.helpers import Collector, TurnClient, error_code, listen
from tests.interop.support import SECRET, Relay, relay_env

from .test_http import free_tcp_port, http_get, parse_samples, value


def call(port: int, method: str, path: str, body: Optional[bytes] = None,
         headers: Optional[dict[str, str]] = None) -> tuple[int, Any]:
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ctl(port: int, *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-m", "firezone_relay.ctl", "--endpoint", "127.0.0.1:%d" % port, *args],
        capture_output=True, text=True, timeout=30, env=relay_env(),
    )


class ProcessTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_list_and_disconnect_through_http_and_ctl(self) -> Any:
        control_port = free_tcp_port()
        relay = Relay(self, extra=["--control-endpoint=127.0.0.1:%d" % control_port])
        server = ("127.0.0.1", relay.listen_port)
        peer = Collector()
        peer_port = listen(peer)
        self.addCleanup(peer_port.stopListening)
        clients = {}
        expiry = int(reactor.seconds()) + 3600
        for salt in ("alice", "bob"):
            client = TurnClient(server)
            port = listen(client)
            self.addCleanup(port.stopListening)
            _, final = yield client.allocate(SECRET, expiry, salt=salt)
            self.assertEqual(final.msg_class, stun.SUCCESS)
            clients[salt] = (client, port.getHost().port)
        alice, alice_port = clients["alice"]
        bob, bob_port = clients["bob"]
        peer_addr = ("127.0.0.1", peer_port.getHost().port)
        reply = yield alice.request(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, peer_addr)])
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        alice.send(b"\x40\x00\x00\x05hello")
        data, _ = yield peer.next()
        self.assertEqual(data, b"hello")

        status, answer = call(control_port, "GET", "/allocations")
        self.assertEqual(status, 200)
        rows = {r["user"]: r for r in answer["allocations"]}
        self.assertEqual(set(rows), {alice.username, bob.username})
        row = rows[alice.username]
        self.assertEqual(row["client"], "127.0.0.1:%d" % alice_port)
        self.assertEqual(row["transport"], "udp")
        self.assertEqual((row["channels"], row["permissions"]), (1, 1))
        self.assertEqual((row["bytes_to_peers"], row["packets_to_peers"]), (5, 1))
        self.assertEqual(len(row["relayed"]), 1)
        self.assertTrue(0 < row["lifetime_left_seconds"] <= 600)

        status, answer = call(control_port, "GET", "/allocations?user=%s" % bob.username)
        self.assertEqual([r["client"] for r in answer["allocations"]], ["127.0.0.1:%d" % bob_port])

        shown = ctl(control_port, "allocations")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        lines = shown.stdout.splitlines()
        self.assertEqual(lines[0].split()[:3], ["USER", "CLIENT", "TRANSPORT"])
        self.assertIn(alice.username, shown.stdout)
        self.assertIn(bob.username, shown.stdout)
        self.assertEqual(lines[-1], "2 allocations")
        as_json = ctl(control_port, "--json", "allocations", "--user", alice.username)
        self.assertEqual([r["user"] for r in json.loads(as_json.stdout)["allocations"]], [alice.username])

        # Disconnect by user: the allocation is gone at once.
        status, answer = call(control_port, "POST", "/disconnect", json.dumps({"user": alice.username}).encode())
        self.assertEqual((status, answer), (200, {"disconnected": 1}))
        reply = yield alice.request(stun.REFRESH, [])
        self.assertEqual(error_code(reply), 437)
        # By client, through ctl.
        done = ctl(control_port, "disconnect", "--client", "127.0.0.1:%d" % bob_port)
        self.assertEqual((done.returncode, done.stdout), (0, "disconnected 1 allocation\n"))
        again = ctl(control_port, "disconnect", "--client", "127.0.0.1:%d" % bob_port)
        self.assertEqual((again.returncode, again.stdout), (1, "disconnected 0 allocations\n"))
        status, answer = call(control_port, "GET", "/allocations")
        self.assertEqual(answer, {"allocations": []})
        relay.wait_for("two deletions", lambda r: len(r.deleted()) == 2)
        relay.assert_healthy()

    @defer.inlineCallbacks
    def test_max_bps_caps_a_real_flow(self) -> Any:
        control_port, http_port = free_tcp_port(), free_tcp_port()
        relay = Relay(self, extra=["--max-bps=20000", "--control-endpoint=127.0.0.1:%d" % control_port,
                                   "--health-check-addr=127.0.0.1:%d" % http_port])
        peer = Collector()
        peer_port = listen(peer)
        self.addCleanup(peer_port.stopListening)
        client = TurnClient(("127.0.0.1", relay.listen_port))
        port = listen(client)
        self.addCleanup(port.stopListening)
        _, final = yield client.allocate(SECRET, int(reactor.seconds()) + 3600)
        self.assertEqual(final.msg_class, stun.SUCCESS)
        peer_addr = ("127.0.0.1", peer_port.getHost().port)
        reply = yield client.request(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, peer_addr)])
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        started = reactor.seconds()
        for _ in range(100):
            client.send(b"\x40\x00\x03\xe8" + b"x" * 1000)
        received = 0
        while True:
            try:
                yield peer.next(timeout=1.0)
            except defer.TimeoutError:
                break
            received += 1
        elapsed = reactor.seconds() - started
        # A burst of 64 KiB (one largest datagram) fits, then 20 kB/s.
        self.assertGreaterEqual(received, 65)
        self.assertLessEqual(received, 65 + int(elapsed * 20) + 1, elapsed)
        status, answer = call(control_port, "GET", "/allocations")
        self.assertEqual(answer["allocations"][0]["bytes_to_peers"], received * 1000)
        _, body, _ = http_get("http://127.0.0.1:%d/metrics" % http_port, time.time() + 10)
        samples = parse_samples(body.decode())
        self.assertEqual(value(samples, "relay_dropped_packets_total", reason="bandwidth_limit"), 100 - received)
        relayed = value(samples, "relay_data_relayed_packets_total", direction="client_to_peer", datapath="userspace")
        self.assertEqual(relayed, received)  # what the cap dropped is not counted as relayed
        relay.assert_healthy()

    @defer.inlineCallbacks
    def test_log_filter_changes_the_level_at_run_time(self) -> Any:
        control_port = free_tcp_port()
        relay = Relay(self, extra=["--control-endpoint=127.0.0.1:%d" % control_port])
        expiry = int(reactor.seconds()) + 3600

        @defer.inlineCallbacks
        def allocate(salt: str) -> Any:
            client = TurnClient(("127.0.0.1", relay.listen_port))
            port = listen(client)
            self.addCleanup(port.stopListening)
            _, final = yield client.allocate(SECRET, expiry, salt=salt)
            self.assertEqual(final.msg_class, stun.SUCCESS)

        yield allocate("one")
        relay.wait_for("the first allocation logged", lambda r: len(r.created()) == 1)
        done = ctl(control_port, "log-level", "warn")
        self.assertEqual((done.returncode, done.stdout), (0, "log level: warn\n"), done.stderr)
        yield allocate("two")  # an info line: hidden now
        status, answer = call(control_port, "POST", "/log_filter?directives=warn,relay%3Dinfo")
        self.assertEqual((status, answer), (200, {"log_level": "warn,relay=info"}))
        yield allocate("three")  # the relay's own info lines are back
        relay.wait_for("the third allocation logged", lambda r: len(r.created()) == 2)
        self.assertEqual([r["username"].split(":")[1] for r in relay.created()], ["one", "three"])
        status, answer = call(control_port, "POST", "/log_filter", b"loud")
        self.assertEqual(status, 400)
        self.assertIn("not a log level", answer["error"])
        bad = ctl(control_port, "log-level", "nonsense")
        self.assertEqual(bad.returncode, 1)
        self.assertIn("not a log level", bad.stderr)
        relay.assert_healthy()

    def test_bad_requests_get_clear_json_errors(self) -> None:
        control_port = free_tcp_port()
        relay = Relay(self, extra=["--control-endpoint=127.0.0.1:%d" % control_port])
        cases = [
            ("POST", "/disconnect", b"{not json", 400, "JSON object"),
            ("POST", "/disconnect", b"[1, 2]", 400, "JSON object"),
            ("POST", "/disconnect", b"[" * 100000 + b"]" * 100000, 413, "larger than"),
            ("POST", "/disconnect", b'{"user": 5}', 400, '"user" must be a string'),
            ("POST", "/disconnect", b'{"client": "nonsense"}', 400, '"client" must be'),
            ("POST", "/disconnect", b'{"client": "127.0.0.1:99999"}', 400, '"client" must be'),
            ("POST", "/disconnect", b'{"who": "x"}', 400, "unknown keys: who"),
            ("POST", "/disconnect", b"{}", 400, 'give "user" or "client"'),
            ("GET", "/disconnect", None, 405, "use POST"),
            ("POST", "/allocations", b"", 405, "use GET"),
            ("GET", "/nope", None, 404, "no such endpoint"),
        ]
        for method, path, body, code, text in cases:
            status, answer = call(control_port, method, path, body)
            self.assertEqual(status, code, (method, path, body[:20] if body else None, answer))
            self.assertIn(text, answer["error"])
        status, answer = call(control_port, "POST", "/disconnect", b'{"user": "1:nobody"}')
        self.assertEqual((status, answer), (404, {"disconnected": 0}))
        # No browser: a page's cross-site POST (Origin), a rebound name (Host), a form's content type.
        refusals = [
            ({"Origin": "http://evil.example"}, 403, "Origin"),
            ({"Host": "evil.example:%d" % control_port}, 403, "Host header"),
            ({"Content-Type": "text/plain"}, 415, "application/json"),
        ]
        for headers, code, text in refusals:
            status, answer = call(control_port, "POST", "/disconnect", b'{"user": "x"}', headers)
            self.assertEqual(status, code, (headers, answer))
            self.assertIn(text, answer["error"])
        status, answer = call(control_port, "GET", "/allocations", headers={"Host": "[::1]:%d" % control_port})
        self.assertEqual(status, 200)
        status, answer = call(control_port, "GET", "/allocations?usr=bob")
        self.assertEqual(status, 400)
        self.assertIn("unknown query keys: usr", answer["error"])
        # A declared body over 64 KiB is refused from its headers, at once.
        with socket.create_connection(("127.0.0.1", control_port), timeout=5) as s:
            started = time.monotonic()
            s.sendall(b"POST /disconnect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 999999999\r\n\r\nx")
            answer_bytes = s.recv(4096)
            self.assertTrue(answer_bytes.startswith(b"HTTP/1.1 413 "), answer_bytes)
            self.assertLess(time.monotonic() - started, 2.0)
        self.assertTrue(relay.proc.poll() is None)
        relay.assert_healthy()

    def test_ctl_says_when_the_relay_is_not_there(self) -> None:
        result = ctl(free_tcp_port(), "allocations")
        self.assertEqual(result.returncode, 3)
        self.assertIn("cannot reach the relay's control endpoint at 127.0.0.1:", result.stderr)
        self.assertEqual(result.stdout, "")

    def test_an_explicit_address_in_use_stops_the_start(self) -> None:
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        from tests.interop.support import TWISTD

        result = subprocess.run(
            TWISTD + ["-n", "--pidfile=", "firezone-relay", "--public-ip4-addr=127.0.0.1", "--bind-ip4-addr=127.0.0.1",
                      "--listen-port=%d" % free_tcp_port(), "--lowest-port=40000", "--highest-port=40010",
                      "--health-check-addr=127.0.0.1:0", "--control-endpoint=127.0.0.1:%d" % port],
            capture_output=True, text=True, timeout=60, env=relay_env(),
        )
        self.assertEqual(result.returncode, 1)
        # twistd has redirected stderr into its log by then: the line is its last one.
        last = (result.stdout + result.stderr).strip().splitlines()[-1]
        self.assertTrue(
            last.endswith("firezone-relay: error: cannot listen on 127.0.0.1:%d: Address already in use" % port), last
        )
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        # The same port for the health server and the control endpoint is refused when parsed.
        from firezone_relay import tap

        options = tap.Options(environ={})
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--health-check-addr", "127.0.0.1:9100", "--control-endpoint", "127.0.0.1:9100"])
        self.assertIn("give them different ports", str(caught.exception))


class ServiceTests(unittest.TestCase):
    def resource(self, loopback_only: bool = True) -> ControlResource:
        from tests.core.harness import make_relay

        return ControlResource(make_relay(), pump=lambda: None, transport_of=lambda c: "udp",
                               set_log_level=None, clock=lambda: 0.0, loopback_only=loopback_only)

    def test_a_non_loopback_source_is_refused_when_bound_to_loopback(self) -> None:
        from twisted.internet.address import IPv4Address

        request = DummyRequest([b"allocations"])
        request.path = b"/allocations"
        request.client = IPv4Address("TCP", "192.0.2.2", 5555)
        body = self.resource().render(request)
        self.assertEqual(request.responseCode, 403)
        self.assertIn(b"loopback clients only", body)
        request = DummyRequest([b"allocations"])
        request.path = b"/allocations"
        request.client = IPv4Address("TCP", "127.0.0.5", 5555)
        self.assertEqual(json.loads(self.resource().render(request)), {"allocations": []})
        request = DummyRequest([b"allocations"])
        request.path = b"/allocations"
        request.client = IPv4Address("TCP", "192.0.2.2", 5555)
        self.assertEqual(json.loads(self.resource(loopback_only=False).render(request)), {"allocations": []})

    def test_the_default_address_in_use_is_logged_not_fatal(self) -> None:
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        service = ControlService("127.0.0.1", port, self.resource(), required=False)
        service.privilegedStartService()
        service.startService()
        self.assertIsNone(service.listening)
        service.stopService()
        strict = ControlService("127.0.0.1", port, self.resource(), required=True)
        from twisted.internet.error import CannotListenError

        self.assertRaises(CannotListenError, strict.privilegedStartService)
