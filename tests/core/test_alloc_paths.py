"""The Allocate and deallocation paths after issue 19's changes: the
username index as an ordered set, the cached long-term key, the cached
PASSWORD-ALGORITHMS encoding.  Behaviour only (speed is benchmarks/)."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import attributes, auth, stun
from firezone_relay.core.auth import REALM
from firezone_relay.core.commands import AllocationDeleted
from firezone_relay.core.relay import Relay, RelayConfig

from .harness import NOW, PUBLIC4, Driver, credentials, error_code, make_relay

SENDERS = [("198.51.100.%d" % i, 40000 + i) for i in range(1, 8)]


class UsernameIndexTests(SynchronousTestCase):
    def refresh_zero(self, d: Driver, sender: stun.Address) -> None:
        reply = d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 0)], sender), sender)
        self.assertEqual(reply.msg_class, stun.SUCCESS, reply)

    def test_one_username_many_allocations_deleted_in_any_order(self) -> None:
        d = Driver(make_relay(user_allocation_limit=0))
        ports = []
        for s in SENDERS[:5]:
            d.now += 1  # allocations() lists the oldest first
            ports.append(d.relayed_port(d.allocate(s)))
        self.refresh_zero(d, SENDERS[3])
        self.refresh_zero(d, SENDERS[1])
        username = credentials()[0]
        left = [info.port for info in d.relay.allocations(d.now, username)]
        self.assertEqual(left, [ports[0], ports[2], ports[4]])
        for s in (SENDERS[0], SENDERS[4], SENDERS[2]):
            self.refresh_zero(d, s)
        self.assertEqual(d.relay.allocations(d.now, username), [])
        self.assertEqual(d.relay.memory_footprint()["by_username"], 0)
        # A fresh allocation for the same user after all were deleted.
        self.assertEqual(d.allocate(SENDERS[5]).msg_class, stun.SUCCESS)
        self.assertEqual(len(d.relay.allocations(d.now, username)), 1)

    def test_limit_replaces_the_oldest_left_after_deletions(self) -> None:
        d = Driver(make_relay(user_allocation_limit=3))
        ports = [d.relayed_port(d.allocate(s)) for s in SENDERS[:3]]
        self.refresh_zero(d, SENDERS[0])  # the oldest goes by itself
        d.allocate(SENDERS[3])  # three again: nothing replaced
        self.assertEqual([c for c in d.commands if isinstance(c, AllocationDeleted) and c.reason == "replaced"], [])
        d.allocate(SENDERS[4])  # a fourth: the oldest left (SENDERS[1]) is replaced
        replaced = [c for c in d.commands if isinstance(c, AllocationDeleted) and c.reason == "replaced"]
        self.assertEqual(replaced, [AllocationDeleted(SENDERS[1], credentials()[0], ports[1], "replaced")])
        self.assertEqual(d.relay.allocation_count, 3)


class KeyCacheTests(SynchronousTestCase):
    def test_key_follows_the_secret_realm_and_algorithm(self) -> None:
        username, password = credentials()
        for secret in ("secret-a", "secret-b", "secret-a"):
            for realm in ("firezone", "other"):
                for algorithm in (stun.ALGORITHM_MD5, stun.ALGORITHM_SHA256):
                    expected = stun.long_term_key(username, realm, auth.generate_password(secret, *auth.parse_username(username)), algorithm)  # type: ignore[misc]  # fmt: skip
                    self.assertEqual(auth._firezone_long_term_key(secret, username, realm, algorithm, *auth.parse_username(username)), expected)  # type: ignore[misc]  # fmt: skip
                    self.assertEqual(auth.firezone_key(secret, username, realm, algorithm), expected)

    def test_another_secret_refuses_the_same_credentials(self) -> None:
        # Two relays in one process share the cache: it is keyed by the secret.
        a = Driver(make_relay())
        b = Driver(Relay(RelayConfig(auth_secret="another secret entirely", public_ip4=PUBLIC4), random.Random(1)))
        for _ in range(2):
            self.assertEqual(a.allocate(SENDERS[0]).msg_class, stun.SUCCESS)
            self.assertEqual(error_code(b.allocate(SENDERS[0])), 401)
            fresh = credentials(secret="another secret entirely")
            self.assertEqual(b.allocate(SENDERS[1], creds=fresh).msg_class, stun.SUCCESS)
            self.assertEqual(error_code(a.allocate(SENDERS[2], creds=fresh)), 401)
            for d, senders in ((a, (SENDERS[0],)), (b, (SENDERS[1],))):
                for sender in senders:
                    d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 0)], sender, creds=None if d is a else fresh), sender)

    def test_the_cache_is_bounded(self) -> None:
        for i in range(1500):
            auth.firezone_key("s", "%d:salt%d" % (NOW + 100, i), REALM)
            username = "%d:salt%d" % (NOW + 100, i)
            auth._firezone_long_term_key("s", username, REALM, stun.ALGORITHM_MD5, int(NOW + 100), "salt%d" % i)
        self.assertLessEqual(auth._firezone_long_term_key.cache_info().currsize, 1024)


class PasswordAlgorithmsEncodingTests(SynchronousTestCase):
    """The encoding of PASSWORD-ALGORITHMS; ``stun.encode`` keeps the relay's
    list encoded (bounded: test_stun.EncodedConstantTests)."""

    def test_encoding_round_trips(self) -> None:
        values = [auth.PASSWORD_ALGORITHMS, ((1, b""),), ((2, b"ab"), (1, b"")), auth.PASSWORD_ALGORITHMS]
        for value in values:
            expected = b"".join(attributes._encode_one_algorithm(v) for v in value)
            self.assertEqual(attributes.encode_password_algorithms(value, b"\x00" * 12), expected)
            self.assertEqual(attributes.decode_password_algorithms(expected, b"\x00" * 12), value)
        for bad in ([(1, b"")], ((1, "text"),), (("x", b""),), ([1, b""],)):
            with self.assertRaises(TypeError):
                attributes.encode_password_algorithms(bad, b"\x00" * 12)
