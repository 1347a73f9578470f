"""``integrity``: MESSAGE-INTEGRITY(-SHA256) and long-term keys, moved out
of ``stun`` (issue 16).  The RFC 5769/8489 test vectors that also exercise
the decoder stay in test_stun."""

from __future__ import annotations

import hashlib
import hmac
import random

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import auth, integrity, stun
from firezone_relay.core.auth import REALM

from .harness import SECRET, Driver, credentials, make_relay

SENDERS = [("198.51.100.%d" % i, 40000 + i) for i in range(1, 3)]


class KeyedHmacTests(SynchronousTestCase):
    """``integrity.keyed_hmac``: HMAC from hash states kept per key, the same
    bytes as ``hmac.digest``."""

    def test_same_as_hmac_digest(self) -> None:
        rng = random.Random(5)
        for name in ("sha1", "sha256", "md5"):
            for key_length in (0, 1, 16, 20, 32, 63, 64, 65, 200):
                key = rng.randbytes(key_length)
                for data_length in (0, 1, 20, 64, 65, 1000):
                    data = rng.randbytes(data_length)
                    for _ in range(2):  # the second time from the kept states
                        self.assertEqual(integrity.keyed_hmac(key, data, name), hmac.digest(key, data, name), (name, key_length, data_length))  # fmt: skip

    def test_kept_states_are_bounded(self) -> None:
        for i in range(integrity._HMAC_KEYS + 10):
            integrity.keyed_hmac(i.to_bytes(4, "big"), b"x", "sha1")
        self.assertLessEqual(len(integrity._hmac_pads), integrity._HMAC_KEYS)

    def test_signed_exchange_still_verifies(self) -> None:
        d = Driver(make_relay())
        reply = d.allocate(SENDERS[0])
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        key = auth.firezone_key(SECRET, credentials()[0], REALM)
        assert key is not None
        self.assertTrue(integrity.check_integrity(reply, key))
        self.assertFalse(integrity.check_integrity(reply, key[:-1] + bytes([key[-1] ^ 1])))
        # SHA-256 integrity both ways.
        reply = d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 600)], SENDERS[0], sha256=True), SENDERS[0])
        self.assertEqual(reply.msg_class, stun.SUCCESS, reply)


class LongTermKeyTests(SynchronousTestCase):
    def test_md5_and_sha256_of_username_realm_password(self) -> None:
        """RFC 8489 §9.2.2: MD5 by default, SHA-256 for PASSWORD-ALGORITHM 2."""
        text = "user:realm:pass\u00e9".encode("utf-8")
        self.assertEqual(integrity.long_term_key("user", "realm", "pass\u00e9"), hashlib.md5(text).digest())
        self.assertEqual(
            integrity.long_term_key("user", "realm", "pass\u00e9", stun.ALGORITHM_SHA256), hashlib.sha256(text).digest()
        )


class StunNamesTests(SynchronousTestCase):
    def test_stun_names_are_integritys(self) -> None:
        """The clients outside the core still call ``stun.long_term_key`` and
        ``stun.check_integrity*``: the same functions, not copies."""
        self.assertIs(stun.long_term_key, integrity.long_term_key)
        self.assertIs(stun.check_integrity, integrity.check_integrity)
        self.assertIs(stun.check_integrity_sha256, integrity.check_integrity_sha256)

    def test_unsigned_message_does_not_verify(self) -> None:
        message = stun.decode(stun.encode(stun.BINDING, stun.REQUEST, b"T" * 12, []))
        self.assertFalse(integrity.check_integrity(message, b"key"))
        self.assertFalse(integrity.check_integrity_sha256(message, b"key"))

    def test_message_integrity_of_another_length_never_verifies(self) -> None:
        """``decode_structure`` (Binding) does not check attribute values, so a
        MESSAGE-INTEGRITY of 4 bytes can reach the check: it is refused even
        when those bytes are the start of the right HMAC (no truncated SHA-1)."""
        key = b"key"
        tid = b"T" * 12
        header = stun.message_type(stun.BINDING, stun.REQUEST).to_bytes(2, "big") + (8).to_bytes(2, "big")
        header += stun.MAGIC_COOKIE.to_bytes(4, "big") + tid
        mac = hmac.digest(key, header, "sha1")[:4]
        message = stun.decode_structure(header + b"\x00\x08\x00\x04" + mac)
        self.assertEqual(message.integrity_offset, 20)
        self.assertFalse(integrity.check_integrity(message, key))
