"""TURN REST credentials beside the Firezone scheme (SPEC §10)."""

from __future__ import annotations

import base64
import hashlib
import hmac

from twisted.trial import unittest

from firezone_relay.core import stun
from firezone_relay.core.auth import parse_rest_username, rest_password

from .harness import CLIENT, NOW, Driver, credentials, error_code, make_relay, verify_signed

REST = "a-shared-secret-as-synapse-has-it-0123456789"
OLD = "the-secret-before-the-rotation-0123456789"


def rest_credentials(expiry: float = NOW + 3600, user: str = "@alice:example.org", secret: str = REST) -> tuple[str, str]:
    username = "%d:%s" % (expiry, user) if user else "%d" % expiry
    return username, rest_password(secret, username)


class RestPasswordTests(unittest.TestCase):
    def test_the_password_is_padded_base64_of_hmac_sha1(self) -> None:
        # The recipe of coturn's use-auth-secret, written out with the stdlib.
        username = "1700003600:alice"
        expected = base64.b64encode(hmac.new(b"s", username.encode(), hashlib.sha1).digest()).decode()
        self.assertEqual(rest_password("s", username), expected)
        self.assertEqual(len(expected), 28)
        self.assertTrue(expected.endswith("="))

    def test_usernames(self) -> None:
        self.assertEqual(parse_rest_username("1700003600:alice"), 1700003600)
        self.assertEqual(parse_rest_username("1700003600"), 1700003600)
        self.assertEqual(parse_rest_username("1700003600:a:b"), 1700003600)  # a Matrix ID has colons
        for bad in ("", "alice", "01700003600:x", "-1:x", "1e9:x", "１２:x", "9" * 20 + ":x", ":x"):
            self.assertIsNone(parse_rest_username(bad), bad)


class RestAuthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.relay = make_relay(rest_secrets=(OLD, REST))
        self.d = Driver(self.relay)

    def test_a_rest_credential_allocates_and_replies_are_signed_with_its_key(self) -> None:
        creds = rest_credentials()
        reply = self.d.allocate(creds=creds)
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        self.assertTrue(verify_signed(reply, creds))
        # Later requests on the allocation: signed with the REST key too.
        refresh = self.d.request(self.d.signed(stun.REFRESH, [(stun.LIFETIME, 300)], creds=creds))
        self.assertEqual(refresh.msg_class, stun.SUCCESS)
        self.assertTrue(verify_signed(refresh, creds))

    def test_every_secret_of_a_rotation_verifies(self) -> None:
        self.assertEqual(self.d.allocate(creds=rest_credentials(secret=OLD)).msg_class, stun.SUCCESS)
        other = ("198.51.100.8", 41000)
        self.assertEqual(self.d.allocate(other, creds=rest_credentials(user="bob")).msg_class, stun.SUCCESS)

    def test_sha256_and_a_username_without_user_part(self) -> None:
        creds = rest_credentials(user="")
        request = self.d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], creds=creds, sha256=True)
        reply = self.d.request(request)
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        self.assertTrue(verify_signed(reply, creds, sha256=True))

    def test_firezone_credentials_still_work_beside_rest(self) -> None:
        creds = credentials()
        reply = self.d.allocate(creds=creds)
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        self.assertTrue(verify_signed(reply, creds))

    def test_refusals_are_401_and_counted(self) -> None:
        cases = [
            (rest_credentials(secret="not-one-of-ours-0123456789abcdef"), "bad_integrity"),
            (rest_credentials(expiry=NOW - 1), "expired"),
            (rest_credentials(expiry=NOW + 400 * 86400), "rest_expiry_too_far"),
            (("0%d:alice" % (NOW + 60), rest_password(REST, "0%d:alice" % (NOW + 60))), "malformed_username"),
            (("soon:alice", rest_password(REST, "soon:alice")), "malformed_username"),
        ]
        for i, (creds, reason) in enumerate(cases):
            before = self.relay.stats.auth_failures.get(reason, 0)
            reply = self.d.allocate(("198.51.100.%d" % (20 + i), 5000), creds=creds)
            self.assertEqual(error_code(reply), 401, creds)
            self.assertEqual(self.relay.stats.auth_failures.get(reason, 0), before + 1, (creds, reason))
        self.assertEqual(self.relay.allocation_count, 0)

    def test_without_rest_secrets_a_rest_credential_is_refused(self) -> None:
        d = Driver(make_relay())
        self.assertEqual(error_code(d.allocate(creds=rest_credentials())), 401)
        self.assertEqual(error_code(d.allocate(creds=rest_credentials(user=""))), 401)

    def test_another_rest_user_on_the_allocation_gets_441(self) -> None:
        self.assertEqual(self.d.allocate(creds=rest_credentials(user="alice")).msg_class, stun.SUCCESS)
        bob = rest_credentials(user="bob")
        reply = self.d.request(self.d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, ("8.8.8.8", 1))], creds=bob))
        self.assertEqual(error_code(reply), 441)
        self.assertTrue(verify_signed(reply, bob))
        self.assertEqual(self.relay.allocations(self.d.now)[0].client, CLIENT)

    def test_the_realm_is_configurable(self) -> None:
        relay = make_relay(rest_secrets=(REST,), realm="turn.example.org")
        d = Driver(relay)
        challenge = d.request(stun.encode(stun.ALLOCATE, stun.REQUEST, b"\x01" * 12, [(stun.REQUESTED_TRANSPORT, 17)]))
        self.assertEqual(challenge.get_str(stun.REALM), "turn.example.org")
        username, password = rest_credentials()
        key = stun.long_term_key(username, "turn.example.org", password)
        attrs = [(stun.REQUESTED_TRANSPORT, 17), (stun.USERNAME, username), (stun.REALM, "turn.example.org"),
                 (stun.NONCE, challenge.get_str(stun.NONCE))]
        reply = d.request(stun.encode(stun.ALLOCATE, stun.REQUEST, b"\x02" * 12, attrs, integrity_key=key))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
