"""The core's part of ``--workers`` (SPEC §9): a worker's core owns a slice
of the relay's port range, reaches the other workers' allocations over the
host (1:1 NAT: at a local address), shares the nonce key, and evicts an
allocation when the supervisor says its user's newer one lives elsewhere."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import stun
from firezone_relay.core.commands import AllocationDeleted, ClosePort, SendDatagram

from .harness import CLIENT, PUBLIC4, Driver, make_relay

CLIENT2 = ("198.51.100.8", 40001)
#: The relay's range is 50000-50099; this worker's slice is 50000-50049.
SLICE = {"lowest_port": 50000, "highest_port": 50049, "relay_lowest_port": 50000, "relay_highest_port": 50099}


class SliceTests(SynchronousTestCase):
    def test_ports_come_from_the_slice_only(self) -> None:
        d = Driver(make_relay(**SLICE))
        for i in range(30):
            port = d.relayed_port(d.allocate(("198.51.100.9", 41000 + i)))
            self.assertTrue(50000 <= port <= 50049, port)

    def test_another_workers_port_is_a_peer_sent_over_the_host(self) -> None:
        d = Driver(make_relay(**SLICE))
        d.allocate()
        other = (PUBLIC4, 50070)  # in the range, not in this slice
        self.assertEqual(d.relay._peer_allowed(other), (True, False))
        self.assertEqual(d.relay._peer_allowed((PUBLIC4, 50010)), (True, True))  # own slice: internal
        self.assertEqual(d.relay._peer_allowed((PUBLIC4, 50100)), (False, False))  # outside the range
        reply = d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, other)]))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        send = stun.encode(stun.SEND, stun.INDICATION, d.next_tid(), [(stun.XOR_PEER_ADDRESS, other), (stun.DATA, b"hi")])
        _, commands = d.client(send)
        self.assertEqual([(c.destination, c.payload) for c in commands if isinstance(c, SendDatagram)], [(other, b"hi")])

    def test_without_a_slice_the_range_is_its_own(self) -> None:
        d = Driver(make_relay(lowest_port=50000, highest_port=50049))
        self.assertEqual(d.relay._peer_allowed((PUBLIC4, 50070)), (False, False))

    def test_behind_nat_the_other_worker_is_reached_at_the_sibling_address(self) -> None:
        d = Driver(make_relay(sibling_ip4="127.0.0.1", **SLICE))
        port = d.relayed_port(d.allocate())
        other = (PUBLIC4, 50070)
        self.assertEqual(d.relay._peer_destination(other), ("127.0.0.1", 50070))
        self.assertEqual(d.relay._peer_destination((PUBLIC4, 50010)), (PUBLIC4, 50010))  # own slice
        self.assertEqual(d.relay._peer_destination(("203.0.113.9", 50070)), ("203.0.113.9", 50070))  # not ours
        reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, other)]))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        out, _ = d.client(b"\x40\x00\x00\x02ok")
        self.assertEqual(out, (port, 4, ("127.0.0.1", 50070), b"ok"))
        send = stun.encode(stun.SEND, stun.INDICATION, d.next_tid(), [(stun.XOR_PEER_ADDRESS, other), (stun.DATA, b"hi")])
        _, commands = d.client(send)
        self.assertEqual([c.destination for c in commands if isinstance(c, SendDatagram)], [("127.0.0.1", 50070)])


class SharedKeyTests(SynchronousTestCase):
    def test_a_nonce_from_one_core_is_valid_in_another_with_the_same_key(self) -> None:
        key = bytes(range(32))
        first = Driver(make_relay(nonce_key=key, seed=1))
        second = Driver(make_relay(nonce_key=key, seed=2))
        nonce = first.nonce_for()
        raw = second.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], nonce=nonce)
        self.assertEqual(second.request(raw).msg_class, stun.SUCCESS)
        # Different keys (one process each, the default): 438.
        third = Driver(make_relay(seed=3))
        raw = third.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], nonce=nonce)
        self.assertEqual(third.request(raw).get(stun.ERROR_CODE)[0], 438)  # type: ignore[index]


class EvictTests(SynchronousTestCase):
    def test_evict_deletes_the_allocation_on_a_port(self) -> None:
        d = Driver(make_relay())
        port = d.relayed_port(d.allocate())
        self.assertFalse(d.relay.evict(port + 1, "replaced"))
        self.assertTrue(d.relay.evict(port, "replaced"))
        commands = d.drain()
        self.assertEqual([c for c in commands if isinstance(c, ClosePort)], [ClosePort(port, 4)])
        deleted = [c for c in commands if isinstance(c, AllocationDeleted)]
        self.assertEqual([(c.client, c.port, c.reason) for c in deleted], [(CLIENT, port, "replaced")])
        self.assertEqual(d.relay.allocation_count, 0)
        self.assertFalse(d.relay.evict(port, "replaced"))
