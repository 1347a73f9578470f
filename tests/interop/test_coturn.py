"""coturn's client utilities (Debian package ``coturn``) against a real relay process.

``turnutils_stunclient`` does a Binding; ``turnutils_uclient`` opens
allocations, binds channels (or sends Send indications) and streams datagrams
through the relay to ``turnutils_peer``, which echoes them.  uclient flags
(coturn 4.6, ``turnutils_uclient`` without arguments prints them):

* ``-u``/``-w`` user and password (the realm is learnt from the 401);
* ``-p`` relay port, ``-e``/``-r`` peer address and port, the relay address last;
* ``-m`` clients, ``-n`` messages per client, ``-l`` message length,
  ``-z`` milliseconds between messages;
* ``-c`` "no rtcp": one allocation per client.  Without it every client is an
  RTP/RTCP pair, allocated with EVEN-PORT (R bit) and RESERVATION-TOKEN, and
  ``-m`` counts sessions, so ``-m 10`` is five pairs;
* ``-s`` Send/Data indications instead of ChannelBind + ChannelData;
* ``-x`` asks for an IPv6 relayed address (REQUESTED-ADDRESS-FAMILY).

Per client, uclient first makes a "probe" allocation it never deletes, then
the real one(s), which it deletes (Refresh LIFETIME 0) when it is done.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Dict, List, Optional, Sequence

from twisted.python import log
from twisted.trial.unittest import TestCase

from tests.interop.support import EchoPeer, Relay, credentials, require_ipv6, require_tool, run_tool

UCLIENT_TIMEOUT = 30.0

_TOTAL_MSGS = re.compile(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\s*$", re.M)
_TOTAL_BYTES = re.compile(r"start_mclient: tot_send_bytes ~ (\d+), tot_recv_bytes ~ (\d+)\s*$", re.M)
_LOST = re.compile(
    r"Total lost packets (\d+) \(([\d.]+)%\), total send dropped (\d+) \(([\d.]+)%\)"
)
_TIME = re.compile(r"Total transmit time is (\d+)")
_RTT = re.compile(r"Average round trip delay ([\d.]+) ms")
_JITTER = re.compile(r"Average jitter ([\d.]+) ms")


def parse_uclient(output: str) -> Dict[str, Any]:
    """uclient's final statistics; AssertionError when a line is missing."""

    def last(pattern: "re.Pattern[str]", name: str) -> Sequence[str]:
        found = pattern.findall(output)
        if not found:
            raise AssertionError("uclient output has no %s line:\n%s" % (name, output[-4000:]))
        item = found[-1]
        return (item,) if isinstance(item, str) else item

    sent, received = (int(v) for v in last(_TOTAL_MSGS, "tot_send_msgs/tot_recv_msgs"))
    sent_bytes, received_bytes = (int(v) for v in last(_TOTAL_BYTES, "tot_send_bytes"))
    lost, lost_pct, dropped, dropped_pct = last(_LOST, "Total lost packets")
    return {
        "sent": sent,
        "received": received,
        "sent_bytes": sent_bytes,
        "received_bytes": received_bytes,
        "lost": int(lost),
        "lost_percent": float(lost_pct),
        "send_dropped": int(dropped),
        "send_dropped_percent": float(dropped_pct),
        "seconds": int(last(_TIME, "Total transmit time")[0]),
        "rtt_ms": float(last(_RTT, "Average round trip delay")[0]),
        "jitter_ms": float(last(_JITTER, "Average jitter")[0]),
    }


class StunClientTests(TestCase):
    def test_binding_reports_the_mapped_address(self) -> None:
        binary = require_tool(self, "turnutils_stunclient")
        relay = Relay(self)
        result = run_tool([binary, "-p", str(relay.listen_port), "127.0.0.1"], timeout=10)
        self.assertEqual(result.returncode, 0, result.stdout)
        found = re.findall(r"IPv4\. UDP reflexive addr: ([\d.]+):(\d+)", result.stdout)
        self.assertTrue(found, result.stdout)
        ip, port = found[-1]
        self.assertEqual(ip, "127.0.0.1")
        self.assertTrue(0 < int(port) < 65536)
        relay.assert_healthy()

    def test_binding_over_ipv6(self) -> None:
        binary = require_tool(self, "turnutils_stunclient")
        require_ipv6(self)
        relay = Relay(self, ipv6=True)
        result = run_tool([binary, "-p", str(relay.listen_port), "::1"], timeout=10)
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertRegex(result.stdout, r"IPv6\. UDP reflexive addr: ::1:\d+")
        relay.assert_healthy()


class UclientTests(TestCase):
    """Each test: a fresh relay, a fresh echo peer, one uclient run, 0 % loss."""

    clients = 10
    messages = 100
    length = 120
    interval_ms = 5

    def uclient(self, relay: Relay, peer: EchoPeer, flags: Sequence[str], server: str = "127.0.0.1",
                peer_ip: str = "127.0.0.1", auth: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        binary = require_tool(self, "turnutils_uclient")
        if auth is None:
            username, password = credentials()
            auth = ["-u", username, "-w", password]
        argv: List[str] = [binary, *flags, *auth,
                           "-p", str(relay.listen_port),
                           "-e", peer_ip, "-r", str(peer.port),
                           "-m", str(self.clients), "-n", str(self.messages),
                           "-l", str(self.length), "-z", str(self.interval_ms),
                           server]
        result = run_tool(argv, timeout=UCLIENT_TIMEOUT)
        command = " ".join(shlex.quote(a) for a in argv)
        self.assertEqual(result.returncode, 0, "%s exited %d:\n%s\n--- relay ---\n%s"
                         % (command, result.returncode, result.stdout[-4000:], relay.output()))
        stats = parse_uclient(result.stdout)
        stats["command"] = command
        log.msg("interop uclient: %r" % (stats,))
        return stats

    def assert_no_loss(self, stats: Dict[str, Any], sessions: int) -> None:
        expected = sessions * self.messages
        self.assertEqual(stats["sent"], expected, stats)
        self.assertEqual(stats["received"], stats["sent"], stats)
        self.assertGreater(stats["received"], 0, stats)
        self.assertEqual(stats["received_bytes"], stats["sent_bytes"], stats)
        self.assertEqual(stats["lost"], 0, stats)
        self.assertEqual(stats["lost_percent"], 0.0, stats)
        self.assertEqual(stats["send_dropped"], 0, stats)

    def assert_allocations(self, relay: Relay, created: int, deleted: int, family: int = 4) -> List[Dict[str, Any]]:
        relay.wait_for("%d allocation deletions" % deleted, lambda r: len(r.deleted()) >= deleted)
        made = relay.created()
        self.assertEqual(len(made), created, relay.output())
        gone = relay.deleted()
        self.assertEqual(len(gone), deleted, relay.output())
        self.assertEqual({r.get("reason") for r in gone}, {"refresh"}, gone)
        ports = {r["port"] for r in made}
        self.assertEqual(len(ports), created, "allocation ports reused while in use: %r" % (made,))
        self.assertTrue({r["port"] for r in gone} <= ports)
        for r in made:
            self.assertTrue(relay.lowest_port <= r["port"] <= relay.highest_port, r)
            self.assertEqual(r["lifetime"], 777, r)  # uclient's UCLIENT_SESSION_LIFETIME
            want = "[::1]:%d" % r["port"] if family == 6 else "127.0.0.1:%d" % r["port"]
            self.assertEqual(r["relayed"], [want], r)
        relay.assert_healthy()
        return made

    def test_channels_ipv4(self) -> None:
        require_tool(self, "turnutils_uclient")
        relay = Relay(self)
        peer = EchoPeer(self)
        stats = self.uclient(relay, peer, ["-c"])
        self.assert_no_loss(stats, self.clients)
        # probe + real allocation per client; the real ones are deleted at the end.
        self.assert_allocations(relay, created=2 * self.clients, deleted=self.clients)

    def test_send_indications_ipv4(self) -> None:
        require_tool(self, "turnutils_uclient")
        relay = Relay(self)
        peer = EchoPeer(self)
        stats = self.uclient(relay, peer, ["-c", "-s"])
        self.assert_no_loss(stats, self.clients)
        self.assert_allocations(relay, created=2 * self.clients, deleted=self.clients)

    def test_rtp_rtcp_pairs_with_even_port_and_reservation_token(self) -> None:
        require_tool(self, "turnutils_uclient")
        # EVEN-PORT reserves port + 1 without binding it until the
        # RESERVATION-TOKEN claims it: a window where no other test worker
        # binds ports (10000-19999), so that the claim never finds it taken
        # (a clean-clone CI run got 508 here, most likely that way).
        relay = Relay(self, range_size=100, port_base=10000)
        peer = EchoPeer(self)
        stats = self.uclient(relay, peer, [])
        # -m counts sessions here: 5 RTP/RTCP pairs, 100 messages each session.
        self.assert_no_loss(stats, self.clients)
        pairs = self.clients // 2
        made = self.assert_allocations(relay, created=3 * pairs, deleted=2 * pairs)
        # uclient alternates EVEN-PORT(R) and RESERVATION-TOKEN allocations
        # (a process-wide toggle), so every token allocation sits on the odd
        # port right above an even port allocated with the R bit.
        ports = {r["port"] for r in made}
        adjacent = sorted(p for p in ports if p % 2 == 0 and p + 1 in ports)
        self.assertGreaterEqual(len(adjacent), (len(made) - 1) // 2, sorted(ports))

    def test_channels_ipv6(self) -> None:
        require_tool(self, "turnutils_uclient")
        require_ipv6(self)
        relay = Relay(self, ipv6=True)
        peer = EchoPeer(self, ipv6=True)
        stats = self.uclient(relay, peer, ["-c", "-x"], server="::1", peer_ip="::1")
        self.assert_no_loss(stats, self.clients)
        self.assert_allocations(relay, created=2 * self.clients, deleted=self.clients, family=6)

    def test_rest_credentials(self) -> None:
        """coturn's REST mode (-W): USERNAME <expiry>:<user>, password base64(HMAC-SHA1(secret, USERNAME))."""
        require_tool(self, "turnutils_uclient")
        secret = "rest-secret-for-the-interop-test-0123456789"
        relay = Relay(self, extra=["--rest-auth-secret=old-secret-being-rotated-out-0123456789",
                                   "--rest-auth-secret=%s" % secret])
        peer = EchoPeer(self)
        stats = self.uclient(relay, peer, ["-c"], auth=["-W", secret, "-u", "alice"])
        self.assert_no_loss(stats, self.clients)
        made = self.assert_allocations(relay, created=2 * self.clients, deleted=self.clients)
        users = {r["username"] for r in made}
        self.assertEqual(len(users), 1, users)
        expiry, _, user = users.pop().partition(":")
        self.assertEqual(user, "alice")
        self.assertTrue(expiry.isdigit(), expiry)

    def test_rest_credentials_with_a_wrong_secret_are_refused(self) -> None:
        binary = require_tool(self, "turnutils_uclient")
        relay = Relay(self, extra=["--rest-auth-secret=the-right-secret-0123456789abcdef"])
        peer = EchoPeer(self)
        argv = [binary, "-c", "-W", "a-wrong-secret-0123456789abcdef", "-u", "mallory", "-p", str(relay.listen_port),
                "-e", "127.0.0.1", "-r", str(peer.port), "-m", "1", "-n", "5", "127.0.0.1"]
        result = run_tool(argv, timeout=UCLIENT_TIMEOUT)
        self.assertNotEqual(result.returncode, 0, result.stdout[-2000:])
        self.assertEqual(relay.created(), [])
        relay.assert_healthy()
