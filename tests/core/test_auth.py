"""RFC 8489 §9.2 in one place (core/auth.py), without a relay around it."""

from __future__ import annotations

from typing import Optional, Sequence

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import auth, stun

from .harness import CLIENT, NOW, SECRET, credentials

KEY = b"k" * 32
REST = "a-rest-secret"


def request(attributes: Sequence[stun.Attribute], key: Optional[bytes] = None, sha256: bool = False) -> tuple[stun.Message, auth.Request]:
    data = stun.encode(
        stun.ALLOCATE,
        stun.REQUEST,
        b"T" * 12,
        list(attributes),
        integrity_key=None if sha256 else key,
        integrity_sha256_key=key if sha256 else None,
    )
    message = stun.decode(data)
    return message, auth.Request(CLIENT, message)


def signed(username: str, password: str, nonce: str, sha256: bool = False, extra: Sequence[stun.Attribute] = ()) -> tuple[stun.Message, auth.Request]:
    algorithm = stun.ALGORITHM_SHA256 if sha256 else stun.ALGORITHM_MD5
    key = stun.long_term_key(username, auth.REALM, password, algorithm)
    attributes = [(stun.USERNAME, username), (stun.REALM, auth.REALM), (stun.NONCE, nonce), *extra]
    return request(attributes, key, sha256)


class AuthenticateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.nonces = auth.NonceFactory(KEY)
        self.nonce = self.nonces.issue(CLIENT, NOW)

    def check(self, message: stun.Message, req: auth.Request, rest: Sequence[str] = ()) -> Optional[tuple[str, int]]:
        return auth.authenticate(message, req, self.nonces, SECRET, auth.REALM, rest, NOW)

    def test_firezone_credentials(self) -> None:
        username, password = credentials()
        message, req = signed(username, password, self.nonce)
        self.assertIsNone(self.check(message, req))
        self.assertTrue(req.authenticated)
        self.assertEqual(req.username, username)
        self.assertEqual(req.key, auth.firezone_key(SECRET, username, auth.REALM))

    def test_sha256_with_password_algorithms(self) -> None:
        username, password = credentials()
        algorithms = [
            (stun.PASSWORD_ALGORITHMS, auth.PASSWORD_ALGORITHMS),
            (stun.PASSWORD_ALGORITHM, (stun.ALGORITHM_SHA256, b"")),
        ]
        message, req = signed(username, password, self.nonce, sha256=True, extra=algorithms)
        self.assertIsNone(self.check(message, req))
        self.assertTrue(req.sha256)
        self.assertEqual(req.algorithm, stun.ALGORITHM_SHA256)

    def test_failures_name_their_reason_and_code(self) -> None:
        username, password = credentials()
        expired = credentials(expiry=NOW - 1)
        cases = [
            (request([]), "missing_credentials", 401),
            (signed(username, password, self.nonces.issue(CLIENT, NOW - 700)), "stale_nonce", 438),
            (signed(username, password, self.nonce, extra=[(stun.PASSWORD_ALGORITHM, (stun.ALGORITHM_SHA256, b""))]), "bad_password_algorithm", 400),
            (signed("alice", "x", self.nonce), "malformed_username", 401),
            (signed(username, "wrong", self.nonce), "bad_integrity", 401),
            (signed(expired[0], expired[1], self.nonce), "expired", 401),
        ]
        for (message, req), reason, code in cases:
            self.assertEqual(self.check(message, req), (reason, code))
            self.assertFalse(req.authenticated)

    def test_rest_credentials_only_with_rest_secrets(self) -> None:
        username = "%d:@alice:example.org" % (NOW + 3600)
        message, req = signed(username, auth.rest_password(REST, username), self.nonce)
        self.assertEqual(self.check(message, req), ("malformed_username", 401))
        message, req = signed(username, auth.rest_password(REST, username), self.nonce)
        self.assertIsNone(self.check(message, req, rest=("old", REST)))
        self.assertEqual(req.username, username)
        far = "%d:bob" % (NOW + auth.MAX_REST_LIFETIME + 10)
        message, req = signed(far, auth.rest_password(REST, far), self.nonce)
        self.assertEqual(self.check(message, req, rest=(REST,)), ("rest_expiry_too_far", 401))

    def test_only_an_authenticated_request_keeps_its_nonce(self) -> None:
        username, password = credentials()
        nonce = auth.NonceFactory(KEY).issue(CLIENT, NOW - 10)  # not from this second
        message, req = signed(username, "wrong", nonce)
        self.assertEqual(self.check(message, req), ("bad_integrity", 401))
        self.assertEqual(self.nonces._verified, {})
        message, req = signed(username, password, nonce)
        self.assertIsNone(self.check(message, req))
        self.assertEqual(self.nonces._verified, {(nonce, CLIENT): int(NOW - 10)})

    def test_firezone_key_needs_the_firezone_form(self) -> None:
        self.assertIsNone(auth.firezone_key(SECRET, "alice", auth.REALM))
        username, password = credentials()
        self.assertEqual(auth.firezone_key(SECRET, username, auth.REALM), stun.long_term_key(username, auth.REALM, password))


class ChallengeTests(SynchronousTestCase):
    def test_full_challenge_when_the_request_is_large_enough(self) -> None:
        nonces = auth.NonceFactory(KEY)
        _, req = request([(stun.REQUESTED_TRANSPORT, 17)])
        attributes = dict(auth.challenge_attributes(req, 401, auth.REALM, nonces, NOW))
        self.assertEqual(attributes[stun.ERROR_CODE], (401, "Unauthorized"))
        self.assertEqual(attributes[stun.REALM], auth.REALM)
        self.assertEqual(attributes[stun.PASSWORD_ALGORITHMS], auth.PASSWORD_ALGORITHMS)
        nonce = attributes[stun.NONCE]
        assert isinstance(nonce, str)
        self.assertTrue(nonce.startswith(auth.NONCE_COOKIE))
        self.assertTrue(nonces.is_valid(nonce, CLIENT, NOW))

    def test_a_bare_request_gets_the_smallest_challenge(self) -> None:
        nonces = auth.NonceFactory(KEY)
        _, req = request([])
        attributes = dict(auth.challenge_attributes(req, 438, auth.REALM, nonces, NOW))
        self.assertNotIn(stun.PASSWORD_ALGORITHMS, attributes)
        nonce = attributes[stun.NONCE]
        assert isinstance(nonce, str)
        self.assertEqual(len(nonce), 16)
        self.assertTrue(nonces.is_valid(nonce, CLIENT, NOW))
        reply = stun.encode(stun.ALLOCATE, stun.ERROR, b"T" * 12, list(attributes.items()))
        self.assertLessEqual(len(reply), auth.MAX_AMPLIFICATION * req.size)


class _CountingMacs(SynchronousTestCase):
    """A ``NonceFactory`` whose MAC computations are recorded in ``macs``."""

    def setUp(self) -> None:
        self.nonces = auth.NonceFactory(KEY)
        self.macs: list[tuple[bool, int, tuple[str, int]]] = []
        mac = self.nonces._mac

        def counting(full: bool, issued: int, client: tuple[str, int]) -> bytes:
            self.macs.append((full, issued, client))
            return mac(full, issued, client)

        self.nonces._mac = counting  # type: ignore[method-assign]


class IssuedNonceTests(_CountingMacs):
    """``NonceFactory.issue`` computes a client's nonce once per second and
    form (the same string as a fresh computation), for at most
    ``_ISSUED_MAX`` clients a second."""

    def test_one_mac_per_client_form_and_second(self) -> None:
        fresh = auth.NonceFactory(KEY)
        first = [self.nonces.issue(CLIENT, NOW + i / 10) for i in range(5)]
        self.assertEqual(first, [fresh.issue(CLIENT, NOW)] * 5)
        self.assertEqual(len(self.macs), 1)
        plain = self.nonces.issue(CLIENT, NOW, full=False)
        self.assertEqual(plain, fresh.issue(CLIENT, NOW, full=False))
        other = self.nonces.issue(("198.51.100.8", 40000), NOW)
        later = self.nonces.issue(CLIENT, NOW + 1)
        self.assertEqual(len({first[0], plain, other, later}), 4)
        self.assertEqual(len(self.macs), 4)
        for nonce, client in ((first[0], CLIENT), (plain, CLIENT), (other, ("198.51.100.8", 40000)), (later, CLIENT)):
            self.assertTrue(fresh.is_valid(nonce, client, NOW + 1))
        self.assertFalse(fresh.is_valid(other, CLIENT, NOW + 1))

    def test_bounded_within_a_second_and_cleared_after_it(self) -> None:
        clients = [("198.51.100.%d" % (i % 250), 1000 + i) for i in range(auth._ISSUED_MAX + 20)]
        checker = auth.NonceFactory(KEY)
        for client in clients:
            self.assertTrue(checker.is_valid(self.nonces.issue(client, NOW), client, NOW))
        self.assertEqual(len(self.nonces._issued), auth._ISSUED_MAX)
        self.nonces.issue(clients[-1], NOW)  # not kept: computed again
        self.assertEqual(len(self.macs), len(clients) + 1)
        self.nonces.issue(CLIENT, NOW + 1)
        self.assertEqual(len(self.nonces._issued), 1)


class VerifiedNonceTests(_CountingMacs):
    """``NonceFactory.is_valid`` skips the MAC of a nonce it issued to the
    same client this second, and of one that an authenticated request from
    the same client carried (``authenticated``; at most ``_VERIFIED_MAX``
    pairs): the answers stay those of a fresh factory, the age is checked
    every time, and nothing is kept before authentication."""

    OTHER = ("198.51.100.8", 40000)

    def test_issued_this_second_needs_no_mac(self) -> None:
        for full in (True, False):
            del self.macs[:]
            nonce = self.nonces.issue(CLIENT, NOW, full=full)
            self.assertTrue(self.nonces.is_valid(nonce, CLIENT, NOW + 0.5))
            self.assertEqual(len(self.macs), 1)  # the one of issue
            self.assertFalse(self.nonces.is_valid(nonce, self.OTHER, NOW + 0.5))  # another client's: computed
            self.assertEqual(len(self.macs), 2)
            self.assertTrue(self.nonces.is_valid(nonce, CLIENT, NOW + 1))  # the next second: computed
            self.assertEqual(len(self.macs), 3)
        self.assertEqual(self.nonces._verified, {})

    def test_an_authenticated_nonce_needs_no_mac_and_still_ages(self) -> None:
        fresh = auth.NonceFactory(KEY)
        nonce = fresh.issue(CLIENT, NOW)
        self.assertTrue(self.nonces.is_valid(nonce, CLIENT, NOW + 5))
        self.assertTrue(self.nonces.is_valid(nonce, CLIENT, NOW + 5))  # not authenticated: computed again
        self.assertEqual(len(self.macs), 2)
        self.assertEqual(self.nonces._verified, {})
        self.nonces.authenticated(nonce, CLIENT)
        for dt in (6, 300, auth.NONCE_LIFETIME - 1, auth.NONCE_LIFETIME, 10**6, -5):
            self.assertEqual(self.nonces.is_valid(nonce, CLIENT, NOW + dt), fresh.is_valid(nonce, CLIENT, NOW + dt), dt)
        self.assertFalse(self.nonces.is_valid(nonce, CLIENT, NOW + auth.NONCE_LIFETIME))
        self.assertEqual(len(self.macs), 2)
        self.assertFalse(self.nonces.is_valid(nonce, self.OTHER, NOW + 6))  # another client: computed, refused
        self.assertEqual(len(self.macs), 3)

    def test_only_the_pair_the_last_check_accepted_is_kept(self) -> None:
        nonce = auth.NonceFactory(KEY).issue(CLIENT, NOW)
        self.nonces.authenticated(nonce, CLIENT)  # no check before it
        self.assertFalse(self.nonces.is_valid("A" * 16, CLIENT, NOW))
        self.nonces.authenticated("A" * 16, CLIENT)  # refused
        self.assertTrue(self.nonces.is_valid(nonce, CLIENT, NOW + 1))
        self.nonces.authenticated(nonce, self.OTHER)  # not the pair checked
        self.nonces.authenticated(nonce, CLIENT)  # the check was used up
        self.assertEqual(self.nonces._verified, {})

    def test_bounded(self) -> None:
        checker = auth.NonceFactory(KEY)
        clients = [("198.51.%d.%d" % (i // 250, i % 250 + 1), 1000) for i in range(auth._VERIFIED_MAX + 10)]
        for client in clients:
            nonce = checker.issue(client, NOW)
            self.assertTrue(self.nonces.is_valid(nonce, client, NOW + 1))
            self.nonces.authenticated(nonce, client)
            self.assertLessEqual(len(self.nonces._verified), auth._VERIFIED_MAX)
        self.assertEqual(len(self.nonces._verified), 10)  # cleared once full, then filled again
        self.assertTrue(self.nonces.is_valid(checker.issue(clients[-1], NOW), clients[-1], NOW + 2))
        self.assertEqual(len(self.macs), len(clients))  # the last one was kept: no MAC
