"""aioice's TURN client (``aioice.turn.create_turn_endpoint``) against a real relay.

aioice runs on asyncio, so it runs in its own process (``aioice_client.py``,
which also hosts the asyncio UDP echo peer on 127.0.0.1) and reports JSON;
trial's reactor never meets asyncio.  aioice always binds a channel before it
sends, refreshes the allocation at 5/6 of its lifetime, rebinds a channel
after ``channel_refresh_time`` and deletes the allocation with Refresh
LIFETIME 0 when its transport is closed.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict

from twisted.python import log
from twisted.trial.unittest import TestCase

from tests.interop.support import HERE, Relay, credentials, require_module, run_tool

SCRIPT = HERE / "aioice_client.py"


class AioiceTests(TestCase):
    def setUp(self) -> None:
        require_module(self, "aioice")

    def run_client(self, relay: Relay, config: Dict[str, Any], timeout: float = 20.0) -> Dict[str, Any]:
        username, password = credentials(salt="aioice")
        config = dict(config, server=["127.0.0.1", relay.listen_port], username=username, password=password)
        result = run_tool([sys.executable, str(SCRIPT), json.dumps(config)], timeout=timeout)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        self.assertTrue(lines, "aioice client printed no JSON (exit %d):\n%s" % (result.returncode, result.stdout[-4000:]))
        report: Dict[str, Any] = json.loads(lines[-1])
        report["log"] = result.stdout
        self.assertEqual(result.returncode, 0, "aioice client failed: %s\n%s\n--- relay ---\n%s"
                         % (report.get("error"), report.get("traceback", result.stdout[-3000:]), relay.output()))
        log.msg("interop aioice: %r" % ({k: v for k, v in report.items() if k != "log"},))
        return report

    def assert_echoed(self, report: Dict[str, Any]) -> None:
        self.assertGreater(report["sent"], 0, report)
        self.assertEqual(report["received"], report["sent"], "missing echoes: %r" % (report["missing"],))
        self.assertEqual(report["intact"], report["sent"], "corrupted payloads: %r" % (report["corrupted"],))
        self.assertEqual(report["send_errors"], [])
        relayed = "%s:%d" % tuple(report["relayed"])
        peer = "%s:%d" % tuple(report["peer"])
        # The peer saw only the relayed address; the client saw only the peer.
        self.assertEqual(report["peer_sources"], [relayed])
        self.assertEqual(report["client_senders"], [peer])

    def assert_deleted_by_refresh(self, relay: Relay, report: Dict[str, Any]) -> Dict[str, Any]:
        self.assertTrue(report["closed"], "aioice's close never completed: %r" % (report,))
        self.assertIsNone(report["close_error"])
        self.assertIn("TURN allocation deleted", report["log"], "aioice saw no success for Refresh LIFETIME 0")
        port = report["relayed"][1]
        relay.wait_for("deletion of the allocation on port %d" % port,
                       lambda r: any(d.get("port") == port for d in r.deleted()))
        created = [c for c in relay.created() if c["port"] == port]
        deleted = [d for d in relay.deleted() if d["port"] == port]
        self.assertEqual(len(created), 1, relay.output())
        self.assertEqual(len(deleted), 1, relay.output())
        self.assertEqual(deleted[0]["reason"], "refresh", deleted[0])
        self.assertEqual(deleted[0]["username"], created[0]["username"])
        self.assertEqual(deleted[0]["client"], created[0]["client"])
        relay.assert_healthy()
        return created[0]

    def test_allocate_and_echo_through_the_relay(self) -> None:
        relay = Relay(self)
        report = self.run_client(relay, {"count": 200, "sizes": [4, 5, 99, 100, 500, 1200, 1400, 3000], "timeout": 10})
        self.assertEqual(report["relayed"][0], "127.0.0.1")
        self.assertTrue(relay.lowest_port <= report["relayed"][1] <= relay.highest_port, report)
        self.assertEqual(report["mapped"][0], "127.0.0.1")
        self.assert_echoed(report)
        created = self.assert_deleted_by_refresh(relay, report)
        self.assertEqual(created["lifetime"], 600)
        self.assertEqual(created["relayed"], ["127.0.0.1:%d" % report["relayed"][1]])

    def test_short_lifetime_request_gets_the_default_then_close_deletes_it(self) -> None:
        relay = Relay(self)
        # aioice asks for a 3 s allocation; RFC 8656 §7.2 grants the default
        # 600 s instead, aioice schedules its refresh from the granted value,
        # and datagrams flow for 5 s (a channel rebound every second): past
        # the 3 s asked for, with no expiry.  (aioice's allocation refresh, at
        # 5/6 of the granted lifetime, is now 500 s away: too long for a test.)
        report = self.run_client(
            relay,
            {"count": 25, "sizes": [200], "duration": 5.0, "lifetime": 3, "channel_refresh_time": 1, "timeout": 8},
        )
        self.assert_echoed(report)
        self.assertGreaterEqual(report["exchange_seconds"], 4.5)
        self.assertIn("expires in 600 seconds", report["log"])
        self.assertGreaterEqual(report["log"].count("TURN channel bound"), 2, "the channel was never rebound")
        created = self.assert_deleted_by_refresh(relay, report)
        self.assertEqual(created["lifetime"], 600)
        self.assertFalse([d for d in relay.deleted() if d["reason"] == "expired"], relay.output())
