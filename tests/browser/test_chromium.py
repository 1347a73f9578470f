"""WebRTC in headless Chromium through the relay: UDP, TCP and TLS (SPEC §8).

``page.html`` (served here on 127.0.0.1) makes two RTCPeerConnections with
``iceTransportPolicy: 'relay'`` and the relay under test as their only ICE
server, opens a data channel, echoes 100 messages and reads the selected
candidate pair from ``getStats``.  Chromium (Debian's ``chromium`` and
``chromium-driver``) is driven with selenium; every process is started by
the test that uses it and stopped in its cleanup.

No name resolution or mDNS leaves the machine: ``--host-resolver-rules``
maps every name but 127.0.0.1 to NOTFOUND and mDNS host candidates are off.
The TLS certificate is made by the test; Chromium is told to accept it with
``--ignore-certificate-errors``.

Negative controls: a wrong password yields no candidate at all, and the
loopback peer policy is shown to be in force.  With one relay both relay
candidates live on the relay's own public address, which is the hairpin
case the core always allows (SPEC §5), so the policy control uses two relays,
on 127.0.0.1 and 127.0.0.2: without ``--allow-loopback-peers`` each refuses
the other's relayed address (403) and the call never connects; with it the
call connects relay to relay across the two processes.  (Chromium reaches
the second relay over UDP only: it does not open TURN TCP connections to
127.0.0.2.)
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from twisted.python import log
from twisted.trial.unittest import TestCase

from firezone_relay.core.auth import make_credentials
from tests.certs import make_certificate
from tests.helpers import free_udp_port, port_range
from tests.interop.support import SECRET, STARTUP_TIMEOUT, TWISTD, _stop, binding_answered, relay_env, unavailable

HERE = Path(__file__).resolve().parent
MESSAGES = 100

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--ignore-certificate-errors",
]


def require_browser(test: TestCase) -> None:
    for name in ("chromium", "chromedriver"):
        if shutil.which(name) is None:
            unavailable(test, "%s not found on PATH (Debian packages: chromium chromium-driver)" % name)
    if importlib.util.find_spec("selenium") is None:
        unavailable(test, "selenium is not installed (pip install selenium, or '.[test]')")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BrowserRelay:
    """``twistd -n firezone-relay`` on one loopback address, UDP + TCP + TLS,
    JSON logs in a file."""

    def __init__(
        self, test: TestCase, ip: str = "127.0.0.1", allow_loopback_peers: bool = True, extra: Sequence[str] = ()
    ) -> None:
        self.test = test
        self.ip = ip
        self.listen_port = free_udp_port((4,))
        self.tls_port = free_tcp_port(ip)
        self.lowest_port, self.highest_port = port_range(40, avoid=[self.listen_port, self.tls_port])
        self.directory = Path(test.mktemp()).resolve()
        cert, key = make_certificate(self.directory / "tls", ips=(ip,))
        self.log_path = self.directory / "relay.log"
        argv = TWISTD + [
            "-n",
            "--pidfile=",
            "firezone-relay",
            "--listen-port=%d" % self.listen_port,
            "--lowest-port=%d" % self.lowest_port,
            "--highest-port=%d" % self.highest_port,
            "--public-ip4-addr=%s" % ip,
            "--bind-ip4-addr=%s" % ip,
            "--tls-port=%d" % self.tls_port,
            "--tls-cert=%s" % cert,
            "--tls-key=%s" % key,
            "--auth-secret=%s" % SECRET,
            "--health-check-addr=%s:0" % ip,
            "--log-format=json",
        ]
        if allow_loopback_peers:
            argv.append("--allow-loopback-peers")
        argv += list(extra)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=str(self.directory), env=relay_env(), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        test.addCleanup(_stop, self.proc)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not (binding_answered(ip, self.listen_port) and self._tls_listening()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                test.fail("relay on %s did not start:\n%s" % (ip, self.output()))
            time.sleep(0.05)

    def _tls_listening(self) -> bool:
        try:
            socket.create_connection((self.ip, self.tls_port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def url(self, transport: str) -> str:
        if transport == "tls":
            return "turns:%s:%d?transport=tcp" % (self.ip, self.tls_port)
        return "turn:%s:%d?transport=%s" % (self.ip, self.listen_port, transport)

    def ice_server(self, transport: str, password: Optional[str] = None) -> Dict[str, Any]:
        username, good = make_credentials(SECRET, int(time.time()) + 3600, "chromium")
        return {"urls": [self.url(transport)], "username": username, "credential": password or good}

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def records(self) -> List[Dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def allocations(self, what: str) -> List[Dict[str, Any]]:
        return [r for r in self.records() if str(r.get("msg", "")).startswith("allocation %s" % what)]

    def assert_healthy(self) -> None:
        if self.proc.poll() is not None:
            self.test.fail("relay exited with %s:\n%s" % (self.proc.returncode, self.output()))
        bad = [r for r in self.records() if r.get("level") in ("error", "critical") or "traceback" in r]
        self.test.assertEqual(bad, [], "the relay logged errors")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Browser:
    """The page served on 127.0.0.1 and one headless Chromium showing it."""

    def __init__(self, test: TestCase) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        handler = functools.partial(_QuietHandler, directory=str(HERE))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        test.addCleanup(self._stop_server, thread)

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        profile = Path(test.mktemp())
        profile.mkdir(parents=True)
        for flag in CHROMIUM_FLAGS + ["--user-data-dir=%s" % profile.resolve()]:
            options.add_argument(flag)
        service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
        self.driver = webdriver.Chrome(options=options, service=service)
        test.addCleanup(self.driver.quit)
        self.driver.set_script_timeout(90)
        self.driver.get("http://127.0.0.1:%d/page.html" % self.httpd.server_address[1])

    def _stop_server(self, thread: threading.Thread) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        thread.join(5)

    def call(self, ice_servers: Sequence[Dict[str, Any]], ice_servers_b: Optional[Sequence[Dict[str, Any]]] = None,
             timeout: float = 15.0) -> Dict[str, Any]:
        config: Dict[str, Any] = {"iceServers": list(ice_servers), "messages": MESSAGES, "timeoutMs": int(timeout * 1000)}
        if ice_servers_b is not None:
            config["iceServersB"] = list(ice_servers_b)
        started = time.monotonic()
        result: Dict[str, Any] = self.driver.execute_async_script("runCall(arguments[0]).then(arguments[1])", config)
        result["wall_seconds"] = round(time.monotonic() - started, 2)
        log.msg("chromium call: %s" % json.dumps({k: v for k, v in result.items() if k != "candidates"}))
        return result


class ChromiumTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        require_browser(self)

    def assert_relayed_call(self, result: Dict[str, Any], url: str, relay_protocol: str) -> None:
        self.assertIsNone(result["error"], result)
        self.assertTrue(result["connected"], result)
        self.assertEqual(result["echoed"], MESSAGES, result)
        selected = result["selected"]
        self.assertIsNotNone(selected, result)
        self.assertTrue(selected["nominated"], selected)
        self.assertIn(selected["state"], ("succeeded", "in-progress"), selected)  # a consent check may be in flight
        self.assertEqual((selected["local"]["type"], selected["remote"]["type"]), ("relay", "relay"), selected)
        self.assertEqual(selected["local"]["relayProtocol"], relay_protocol, selected)
        self.assertEqual(selected["local"]["url"], url, selected)
        self.assertEqual(selected["remote"]["protocol"], "udp", selected)  # the relayed leg is UDP
        types = {c["candidate"].split()[7] for c in result["candidates"]}
        self.assertEqual(types, {"relay"}, result["candidates"])

    def run_transport(self, transport: str) -> None:
        relay = BrowserRelay(self)
        browser = Browser(self)
        server = relay.ice_server(transport)
        result = browser.call([server])
        self.assert_relayed_call(result, server["urls"][0], transport)
        # Both peer connections allocated over that transport, and closing
        # them (Refresh LIFETIME 0, then the connection) deleted both.
        created = relay.allocations("created")
        self.assertEqual([r["transport"] for r in created], [transport, transport], relay.output())
        deadline = time.monotonic() + 5
        while len(relay.allocations("deleted")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([r["transport"] for r in relay.allocations("deleted")], [transport, transport])
        relay.assert_healthy()

    def test_udp(self) -> None:
        self.run_transport("udp")

    def test_tcp(self) -> None:
        self.run_transport("tcp")

    def test_tls(self) -> None:
        self.run_transport("tls")

    def test_rest_credentials(self) -> None:
        """What Matrix/Synapse, Nextcloud Talk or Jitsi hand a browser: TURN REST credentials (SPEC §10)."""
        from firezone_relay.core.auth import rest_password

        secret = "turn_shared_secret-of-a-synapse-0123456789"
        relay = BrowserRelay(self, extra=["--rest-auth-secret=%s" % secret])
        browser = Browser(self)
        username = "%d:@alice:matrix.example.org" % (int(time.time()) + 3600)
        server = {"urls": [relay.url("udp")], "username": username, "credential": rest_password(secret, username)}
        result = browser.call([server])
        self.assert_relayed_call(result, server["urls"][0], "udp")
        self.assertEqual([r["username"] for r in relay.allocations("created")], [username, username])
        relay.assert_healthy()

    def test_wrong_password_yields_no_candidates(self) -> None:
        relay = BrowserRelay(self)
        browser = Browser(self)
        servers = [relay.ice_server(t, password="not-the-password") for t in ("udp", "tcp", "tls")]
        result = browser.call(servers, timeout=4.0)
        self.assertFalse(result["connected"], result)
        self.assertEqual(result["candidates"], [], result)
        self.assertEqual(relay.allocations("created"), [])
        relay.assert_healthy()

    def test_two_relays_without_allow_loopback_peers_never_connect(self) -> None:
        one = BrowserRelay(self, "127.0.0.1", allow_loopback_peers=False)
        two = BrowserRelay(self, "127.0.0.2", allow_loopback_peers=False)
        browser = Browser(self)
        result = browser.call([one.ice_server("tcp")], [two.ice_server("udp")], timeout=6.0)
        # Both got their relay candidate, so what stops the call is the policy.
        self.assertEqual(sorted(c["pc"] for c in result["candidates"]), ["a", "b"], result)
        self.assertFalse(result["connected"], result)
        self.assertEqual(result["echoed"], 0)
        one.assert_healthy()
        two.assert_healthy()

    def test_two_relays_with_allow_loopback_peers_connect(self) -> None:
        one = BrowserRelay(self, "127.0.0.1")
        two = BrowserRelay(self, "127.0.0.2")
        browser = Browser(self)
        server = one.ice_server("tls")
        result = browser.call([server], [two.ice_server("udp")])
        self.assert_relayed_call(result, server["urls"][0], "tls")
        self.assertEqual(result["selected"]["remote"]["address"], "127.0.0.2", result)
        one.assert_healthy()
        two.assert_healthy()
