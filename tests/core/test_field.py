"""Field behaviour of Firezone clients (snownet) against the core (issue 15).

* Credential rotation: on a network reset snownet gets new credentials, its
  Allocate from the old 5-tuple gets 437, and it deletes the old allocation
  with a Refresh LIFETIME=0 signed with the *new* credentials, then
  allocates again (snownet ``allocation.rs``: 437 on ALLOCATE → delete;
  LIFETIME 0 success → allocate).
* Keep-alives: snownet sends a Binding every 25 s per allocation; thousands
  of clients share one NAT address, and the reflection guard must not charge
  a 5-tuple that holds an allocation (SPEC §5).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import stun
from firezone_relay.core.commands import AllocationDeleted, SendDatagram

from .harness import CLIENT, NOW, PUBLIC6, Driver, build, credentials, error_code, make_relay, verify_signed

#: What snownet puts in ALLOCATE and REFRESH besides the credentials.
SNOWNET: list[stun.Attribute] = [(stun.REQUESTED_TRANSPORT, 17), (stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6), (stun.SOFTWARE, "snownet")]
KEY_A = credentials(salt="pubkeyA-salt-0001")
KEY_B = credentials(salt="pubkeyB-salt-0002")


class CredentialRotationTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Portal mode's default: one allocation per username.
        self.d = Driver(make_relay(public_ip6=PUBLIC6, user_allocation_limit=1))

    def test_snownet_network_reset_sequence(self) -> None:
        d = self.d
        first = d.allocate(extra=SNOWNET[1:], creds=KEY_A)
        self.assertEqual(first.msg_class, stun.SUCCESS)
        old_port = d.relayed_port(first)

        # Network reset: new key, new credentials, same socket.
        mismatch = d.request(d.signed(stun.ALLOCATE, SNOWNET, creds=KEY_B))
        self.assertEqual(error_code(mismatch), 437)
        self.assertTrue(verify_signed(mismatch, KEY_B))

        out, commands = d.client(d.signed(stun.REFRESH, SNOWNET + [(stun.LIFETIME, 0)], creds=KEY_B))
        self.assertIsNone(out)
        deleted = [c for c in commands if isinstance(c, AllocationDeleted)]
        self.assertEqual([(c.port, c.username, c.reason) for c in deleted], [(old_port, KEY_A[0], "refresh")])
        replies = [stun.decode(c.payload) for c in commands if isinstance(c, SendDatagram) and c.destination == CLIENT]
        self.assertEqual(len(replies), 1)
        self.assertEqual(replies[0].msg_class, stun.SUCCESS)
        self.assertEqual(replies[0].get(stun.LIFETIME), 0)
        self.assertTrue(verify_signed(replies[0], KEY_B))
        self.assertFalse(verify_signed(replies[0], KEY_A))
        self.assertEqual(d.relay.allocation_count, 0)

        again = d.request(d.signed(stun.ALLOCATE, SNOWNET, creds=KEY_B))
        self.assertEqual(again.msg_class, stun.SUCCESS)
        self.assertTrue(verify_signed(again, KEY_B))
        self.assertEqual(d.relay.allocation_count, 1)

    def test_other_requests_with_another_username_still_get_441(self) -> None:
        d = self.d
        d.allocate(creds=KEY_A)
        requests: list[tuple[int, list[stun.Attribute]]] = [
            (stun.REFRESH, SNOWNET),  # no LIFETIME: 600 s, a refresh, not a delete
            (stun.REFRESH, SNOWNET + [(stun.LIFETIME, 300)]),
            (stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, ("8.8.4.4", 5000))]),
            (stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, ("8.8.4.4", 5000))]),
        ]
        for method, attributes in requests:
            reply = d.request(d.signed(method, attributes, creds=KEY_B))
            self.assertEqual(error_code(reply), 441, (method, attributes))
            self.assertTrue(verify_signed(reply, KEY_B))
        self.assertEqual(d.relay.allocation_count, 1)

    def test_delete_needs_valid_credentials_and_the_owning_5_tuple(self) -> None:
        d = self.d
        d.allocate(creds=KEY_A)
        # Another 5-tuple, even with the allocation's own credentials: 437.
        elsewhere = ("198.51.100.7", 40001)
        reply = d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 0)], sender=elsewhere, creds=KEY_A), elsewhere)
        self.assertEqual(error_code(reply), 437)
        # A wrong password (another secret), and expired credentials: 401.
        forged = credentials(salt="pubkeyB-salt-0002", secret="another-secret-of-at-least-32-characters")
        bad = d.signed(stun.REFRESH, [(stun.LIFETIME, 0)], creds=(forged[0], forged[1]))
        self.assertEqual(error_code(d.request(bad)), 401)
        expired = credentials(expiry=NOW - 1, salt="pubkeyB-salt-0002")
        self.assertEqual(error_code(d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 0)], creds=expired))), 401)
        self.assertEqual(d.relay.allocation_count, 1)
        # The allocation's own credentials still refresh it.
        self.assertEqual(d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 300)], creds=KEY_A)).get(stun.LIFETIME), 300)


class KeepaliveTests(SynchronousTestCase):
    """3,000 snownet allocations behind one NAT address, default guard (100/s, burst 200)."""

    CLIENTS = 3000
    NAT_IP = "203.0.113.50"

    def test_keepalives_of_allocations_behind_one_address_are_never_limited(self) -> None:
        d = Driver(make_relay())
        self.assertEqual((d.relay.config.unauthenticated_rate, d.relay.config.unauthenticated_burst), (100.0, 200))
        clients = [(self.NAT_IP, 10000 + i) for i in range(self.CLIENTS)]
        for i, client in enumerate(clients):
            reply = d.allocate(client, creds=credentials(salt="device-%05d" % i))
            self.assertEqual(reply.msg_class, stun.SUCCESS, (i, reply))
        self.assertEqual(d.relay.allocation_count, self.CLIENTS)

        # Three rounds of keep-alives, each client every 25 s, spread evenly:
        # 120 Bindings/s from one IP, above the guard's 100/s.
        start = d.now
        answered = 0
        sent = 0
        for round_ in range(3):
            for i, client in enumerate(clients):
                d.now = start + round_ * 25.0 + i * 25.0 / self.CLIENTS
                t = d.next_tid()
                _, commands = d.client(build(stun.BINDING, t, [(stun.SOFTWARE, "snownet")]), client)
                sent += 1
                for c in commands:
                    if isinstance(c, SendDatagram) and c.destination == client:
                        reply = stun.decode(c.payload)
                        if reply.transaction_id == t and reply.msg_class == stun.SUCCESS:
                            self.assertEqual(reply.get_address(stun.XOR_MAPPED_ADDRESS), client)
                            answered += 1
        self.assertEqual((answered, sent), (3 * self.CLIENTS, 3 * self.CLIENTS))
        self.assertNotIn("rate_limited", d.relay.stats.dropped)

        # Control: sources on the same address without an allocation are
        # still limited (the bucket is full: nothing above charged it) ...
        strangers = 0
        for port in range(1000, 1300):
            _, commands = d.client(build(stun.BINDING, d.next_tid(), []), (self.NAT_IP, port))
            strangers += len(commands)
        self.assertEqual(strangers, 200)
        self.assertEqual(d.relay.stats.dropped["rate_limited"], 100)
        # ... while the allocations' keep-alives at the same instant are not.
        for client in clients[:500]:
            _, commands = d.client(build(stun.BINDING, d.next_tid(), []), client)
            self.assertEqual(len(commands), 1)
        # Once an allocation is gone, its 5-tuple is charged like any other.
        d.client(d.signed(stun.REFRESH, [(stun.LIFETIME, 0)], clients[0], credentials(salt="device-00000")), clients[0])
        _, commands = d.client(build(stun.BINDING, d.next_tid(), []), clients[0])
        self.assertEqual(commands, [])
