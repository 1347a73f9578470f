"""``Relay.reconfigure``: what a SIGHUP reload may change while allocations live (SPEC §10)."""

from __future__ import annotations

import dataclasses

from twisted.trial import unittest

from firezone_relay.core import stun
from firezone_relay.core.commands import ChannelUnbound, PermissionRemoved
from firezone_relay.core.relay import LIVE_FIELDS

from .harness import CLIENT, Driver, error_code, make_relay

PEER_A = ("8.8.4.4", 5000)
PEER_B = ("1.1.1.1", 6000)


class ReconfigureTests(unittest.TestCase):
    def setUp(self) -> None:
        self.relay = make_relay()
        self.d = Driver(self.relay)
        self.port = self.d.relayed_port(self.d.allocate())

    def bind(self, number: int, peer: tuple[str, int]) -> stun.Message:
        return self.d.request(
            self.d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, number), (stun.XOR_PEER_ADDRESS, peer)])
        )

    def test_a_fixed_field_is_refused_and_nothing_changes(self) -> None:
        before = self.relay.config
        for name, value in (("listen_port", 3479), ("auth_secret", "x" * 64), ("public_ip4", "192.0.2.9")):
            with self.assertRaises(ValueError) as caught:
                self.relay.reconfigure(dataclasses.replace(before, **{name: value}))
            self.assertIn(name, str(caught.exception))
            self.assertIs(self.relay.config, before)

    def test_every_live_field_is_a_config_field(self) -> None:
        fields = {f.name for f in dataclasses.fields(self.relay.config)}
        self.assertTrue(LIVE_FIELDS <= fields, LIVE_FIELDS - fields)

    def test_a_new_deny_revokes_channels_and_permissions_to_that_peer_now(self) -> None:
        self.assertEqual(self.bind(0x4000, PEER_A).msg_class, stun.SUCCESS)
        self.assertEqual(self.bind(0x4001, PEER_B).msg_class, stun.SUCCESS)
        data = b"\x40\x00\x00\x02hi"
        self.assertIsNotNone(self.d.client(data)[0])

        self.relay.reconfigure(dataclasses.replace(self.relay.config, deny_peers=("8.8.4.0/24",)))
        commands = self.d.drain()

        unbound = [c for c in commands if isinstance(c, ChannelUnbound)]
        removed = [c for c in commands if isinstance(c, PermissionRemoved)]
        self.assertEqual([(c.channel, c.peer) for c in unbound], [(0x4000, PEER_A)])
        self.assertEqual([c.peer_ip for c in removed], [PEER_A[0]])
        # Nothing flows to or from the denied peer any more; the other channel lives.
        self.assertIsNone(self.d.client(data)[0])
        self.assertIsNone(self.d.peer(b"back", PEER_A, self.port)[0])
        self.assertIsNotNone(self.d.client(b"\x40\x01\x00\x02hi")[0])
        # A new bind to it is refused by the new policy.
        self.assertEqual(error_code(self.bind(0x4002, PEER_A)), 403)
        self.assertEqual(self.relay.allocation_count, 1)

    def test_lower_limits_apply_to_what_comes_next(self) -> None:
        self.assertEqual(self.bind(0x4000, PEER_A).msg_class, stun.SUCCESS)
        self.relay.reconfigure(dataclasses.replace(self.relay.config, max_channels=1, max_allocations=1))
        self.assertEqual(error_code(self.bind(0x4001, PEER_B)), 508)
        # The channel bound before is kept and refreshes.
        self.assertEqual(self.bind(0x4000, PEER_A).msg_class, stun.SUCCESS)
        other = ("198.51.100.8", 40000)
        self.assertEqual(error_code(self.d.allocate(other)), 508)
        self.relay.reconfigure(dataclasses.replace(self.relay.config, max_allocations=0))
        self.assertEqual(self.d.allocate(other).msg_class, stun.SUCCESS)
        self.assertEqual(self.relay.allocation_count, 2)

    def test_the_reflection_guard_takes_a_new_rate(self) -> None:
        sender = ("203.0.113.50", 1234)
        binding = stun.encode(stun.BINDING, stun.REQUEST, b"\x01" * 12, [])
        self.relay.reconfigure(
            dataclasses.replace(self.relay.config, unauthenticated_rate=1.0, unauthenticated_burst=2)
        )
        answered = sum(1 for _ in range(5) if self.d.client(binding, sender)[1])
        self.assertEqual(answered, 2)
        self.assertEqual(self.relay.allocation_count, 1)
        self.assertEqual(self.d.allocate(CLIENT).msg_class, stun.ERROR)  # 437: the allocation is still there
