"""What the UDP adapter logs: one line per allocation and channel event, nothing per packet."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from firezone_relay import logs
from firezone_relay.core import stun
from tests.adapters.test_udp import PUBLIC, SECRET, RelayFixture

UDP = "firezone_relay.adapters.udp"


class LifecycleLogTests(RelayFixture, unittest.TestCase):
    timeout = 15

    def setUp(self) -> None:
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.observe)
        self.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event: Dict[str, Any]) -> None:
        if event.get("log_namespace") == UDP:
            self.events.append(event)

    @defer.inlineCallbacks
    def test_one_line_per_event_none_per_packet(self) -> Any:
        self.start_relay()
        client = self.client()
        peer, peer_address = self.peer()
        _, response = yield client.allocate(SECRET, self.expiry())
        self.assertEqual(response.msg_class, stun.SUCCESS)
        port = response.get_address(stun.XOR_RELAYED_ADDRESS)[1]
        response = yield client.request(
            stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4001), (stun.XOR_PEER_ADDRESS, peer_address)]
        )
        self.assertEqual(response.msg_class, stun.SUCCESS)
        for i in range(20):
            client.send(b"\x40\x01\x00\x04" + i.to_bytes(4, "big"))
            yield peer.next()
        response = yield client.request(stun.REFRESH, [(stun.LIFETIME, 0)])
        self.assertEqual(response.msg_class, stun.SUCCESS)

        messages = [formatEvent(e) for e in self.events]
        self.assertEqual(len(messages), 4, messages)
        created, bound, unbound, deleted = self.events
        user = client.username
        client_text = "127.0.0.1:%d" % client.transport.getHost().port
        peer_text = "%s:%d" % peer_address
        self.assertEqual(
            (created["client"], created["username"], created["port"], created["lifetime"]),
            (client_text, user, port, 600),
        )
        for event, state in ((bound, "bound"), (unbound, "unbound")):
            self.assertEqual(
                (event["state"], event["client"], event["username"], event["port"], event["channel"], event["peer"]),
                (state, client_text, user, port, 0x4001, peer_text),
            )
        self.assertIn("channel 0x4001", formatEvent(bound))
        self.assertEqual((deleted["client"], deleted["username"], deleted["port"], deleted["reason"]), (client_text, user, port, "refresh"))
        # Every field, in order (a JSON line's keys follow it): the shell
        # writes them out per line.
        # (Trial's legacy log observer adds the keys of twisted.python.log.)
        def fields(event: Dict[str, Any]) -> List[str]:
            legacy = ("message", "time", "system", "format", "isError")
            return [key for key in event if not key.startswith("log_") and key not in legacy]

        self.assertEqual(fields(created), ["relayed", "lifetime", "client", "transport", "username", "port"])
        self.assertEqual(fields(deleted), ["reason", "client", "transport", "username", "port"])
        self.assertEqual((created["transport"], deleted["transport"]), ("udp", "udp"))
        self.assertEqual(created["relayed"], ["%s:%d" % (PUBLIC[4], port)])
        # As JSON: the structured fields are there, as fields.
        record = json.loads(logs.format_json(bound))
        self.assertEqual((record["username"], record["channel"], record["peer"]), (user, 0x4001, peer_text))
