"""What the control endpoint reads and does in the core: ``Relay.allocations`` and ``Relay.disconnect``."""

from __future__ import annotations

from twisted.trial import unittest

from firezone_relay.core import stun
from firezone_relay.core.commands import AllocationDeleted, ClosePort

from .harness import CLIENT, PUBLIC4, Driver, credentials, make_relay

PEER = ("8.8.4.4", 5000)
OTHER = ("198.51.100.8", 41000)


class AllocationsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.relay = make_relay()
        self.d = Driver(self.relay)
        self.alice = credentials(salt="alice")
        self.bob = credentials(salt="bob")
        self.port = self.d.relayed_port(self.d.allocate(creds=self.alice))
        self.d.advance(5)
        self.d.relayed_port(self.d.allocate(OTHER, creds=self.bob))

    def bind(self) -> None:
        reply = self.d.request(
            self.d.signed(
                stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)], creds=self.alice
            )
        )
        self.assertEqual(reply.msg_class, stun.SUCCESS)

    def test_each_allocation_with_its_age_lifetime_and_traffic(self) -> None:
        self.bind()
        self.d.client(b"\x40\x00\x00\x05hello")
        self.d.client(b"\x40\x00\x00\x02hi")
        self.d.peer(b"back!!", PEER, self.port)
        send = stun.encode(stun.SEND, stun.INDICATION, b"\x00" * 12, [(stun.XOR_PEER_ADDRESS, PEER), (stun.DATA, b"abc")])
        self.d.client(send)
        self.d.advance(10)

        first, second = self.relay.allocations(self.d.now)
        self.assertEqual((first.client, first.username, first.port), (CLIENT, self.alice[0], self.port))
        self.assertEqual(first.relayed, ((PUBLIC4, self.port),))
        self.assertEqual((first.age, first.lifetime_left), (15.0, 585.0))
        self.assertEqual((first.channels, first.permissions), (1, 1))
        self.assertEqual(
            (first.bytes_to_peers, first.packets_to_peers, first.bytes_to_client, first.packets_to_client),
            (5 + 2 + 3, 3, 6, 1),
        )
        self.assertEqual((second.client, second.username, second.age), (OTHER, self.bob[0], 10.0))
        self.assertEqual((second.bytes_to_peers, second.packets_to_client), (0, 0))

    def test_filter_by_username(self) -> None:
        self.assertEqual([a.client for a in self.relay.allocations(self.d.now, self.bob[0])], [OTHER])
        self.assertEqual(self.relay.allocations(self.d.now, "nobody"), [])


class DisconnectTests(unittest.TestCase):
    def setUp(self) -> None:
        self.relay = make_relay()
        self.d = Driver(self.relay)
        self.alice = credentials(salt="alice")
        self.d.allocate(creds=self.alice)
        self.d.allocate(OTHER, creds=self.alice)
        self.d.allocate(("198.51.100.9", 42000), creds=credentials(salt="carol"))

    def test_by_user_deletes_all_of_them_and_closes_their_ports(self) -> None:
        self.assertEqual(self.relay.disconnect(username=self.alice[0]), 2)
        commands = self.d.drain()
        self.assertEqual(len([c for c in commands if isinstance(c, ClosePort)]), 2)
        deleted = [c for c in commands if isinstance(c, AllocationDeleted)]
        self.assertEqual({c.client for c in deleted}, {CLIENT, OTHER})
        self.assertEqual({c.reason for c in deleted}, {"disconnected by the operator"})
        self.assertEqual(self.relay.allocation_count, 1)
        self.assertEqual(self.relay.disconnect(username=self.alice[0]), 0)

    def test_by_client(self) -> None:
        self.assertEqual(self.relay.disconnect(client=OTHER), 1)
        self.assertEqual(self.relay.allocation_count, 2)
        self.assertEqual(self.relay.disconnect(client=("203.0.113.1", 1)), 0)

    def test_needs_a_filter(self) -> None:
        with self.assertRaises(ValueError):
            self.relay.disconnect()


class MaxBpsTests(unittest.TestCase):
    """--max-bps: relayed bytes per second per allocation, each direction on its own."""

    def setUp(self) -> None:
        self.relay = make_relay(max_bps=100_000)
        self.d = Driver(self.relay)
        self.port = self.d.relayed_port(self.d.allocate())
        reply = self.d.request(
            self.d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)])
        )
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        self.datagram = b"\x40\x00\x03\xe8" + b"x" * 1000

    def sent(self, count: int) -> int:
        return sum(1 for _ in range(count) if self.d.client(self.datagram)[0] is not None)

    def test_a_second_of_bytes_then_the_refill_rate(self) -> None:
        self.assertEqual(self.sent(150), 100)
        self.assertEqual(self.relay.stats.dropped["bandwidth_limit"], 50)
        # What the cap dropped is not counted as relayed.
        self.assertEqual((self.relay.stats.client_to_peer_packets, self.relay.stats.client_to_peer_bytes), (100, 100_000))
        self.assertEqual(self.relay.stats.packet_sizes[9], 100)
        self.d.advance(0.5)
        self.assertEqual(self.sent(100), 50)
        self.assertEqual(self.relay.allocations(self.d.now)[0].bytes_to_peers, 150 * 1000)

    def test_each_direction_has_its_own_budget(self) -> None:
        self.assertEqual(self.sent(200), 100)
        back = sum(1 for _ in range(200) if self.d.peer(b"y" * 1000, PEER, self.port)[0] is not None)
        self.assertEqual(back, 100)
        self.assertEqual((self.relay.stats.peer_to_client_packets, self.relay.stats.peer_to_client_bytes), (100, 100_000))

    def test_send_indications_and_data_indications_count_too(self) -> None:
        from firezone_relay.core.commands import SendDatagram

        send = stun.encode(stun.SEND, stun.INDICATION, b"\x00" * 12, [(stun.XOR_PEER_ADDRESS, PEER), (stun.DATA, b"z" * 1000)])
        out = [c for _ in range(150) for c in self.d.client(send)[1] if isinstance(c, SendDatagram)]
        self.assertEqual(len(out), 100)
        self.assertEqual(self.relay.stats.client_to_peer_packets, 100)
        other = ("8.8.8.8", 53)  # a permission but no channel: Data indications
        self.d.request(self.d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, other)]))
        back = sum(1 for _ in range(150) if self.d.peer(b"w" * 1000, other, self.port)[0] is not None)
        self.assertEqual(back, 100)

    def test_reconfigure_lifts_the_limit(self) -> None:
        import dataclasses

        self.assertEqual(self.sent(150), 100)
        self.relay.reconfigure(dataclasses.replace(self.relay.config, max_bps=0))
        self.assertEqual(self.sent(150), 150)

    def test_no_limit_by_default(self) -> None:
        relay = make_relay()
        d = Driver(relay)
        d.allocate()
        d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)]))
        self.assertEqual(sum(1 for _ in range(500) if d.client(self.datagram)[0] is not None), 500)
