"""The STUN/TURN wire codec and the Firezone credentials, against published vectors.

Vectors: RFC 5769 §2.1–2.4, RFC 8489 Appendix B.1 as corrected by erratum
6268, and the upstream Firezone password vectors.  Then hypothesis: every
attribute type round-trips, whole messages round-trip, and no input (random
bytes, mutated valid messages) makes the decoder raise anything but
``StunDecodeError``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from typing import Iterable, List, Optional, Set, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import auth, stun
from firezone_relay.core.attributes import CODECS
from firezone_relay.core.channel_data import is_stun
from tests import hypothesis_profile  # noqa: F401  (loads the settings profile)


def unhex(text: str) -> bytes:
    """Bytes from an RFC-style hex dump; ``#`` starts a comment."""
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()))


# --- RFC 5769 -------------------------------------------------------------

SHORT_TERM_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
WRONG_KEY = b"VOkJxbRl1RmTxUk/WvJxBu"

#: §2.1 Sample Request.  The USERNAME padding is three spaces (0x20).
RFC5769_REQUEST = unhex(
    """
    00 01 00 58  # Request type and message length
    21 12 a4 42  # Magic cookie
    b7 e7 a7 01  bc 34 d6 86  fa 87 df ae  # Transaction ID
    80 22 00 10  # SOFTWARE
    53 54 55 4e  20 74 65 73  74 20 63 6c  69 65 6e 74  # "STUN test client"
    00 24 00 04  # PRIORITY
    6e 00 01 ff
    80 29 00 08  # ICE-CONTROLLED
    93 2f f9 b1  51 26 3b 36
    00 06 00 09  # USERNAME
    65 76 74 6a  3a 68 36 76  59 20 20 20  # "evtj:h6vY" and padding
    00 08 00 14  # MESSAGE-INTEGRITY
    9a ea a7 0c  bf d8 cb 56  78 1e f2 b5  b2 d3 f2 49  c1 b5 71 a2
    80 28 00 04  # FINGERPRINT
    e5 7a 3b cf
    """
)

#: §2.2 Sample IPv4 Response.  The SOFTWARE padding is one space.
RFC5769_RESPONSE_IPV4 = unhex(
    """
    01 01 00 3c  21 12 a4 42  b7 e7 a7 01  bc 34 d6 86  fa 87 df ae
    80 22 00 0b  74 65 73 74  20 76 65 63  74 6f 72 20  # "test vector" + " "
    00 20 00 08  00 01 a1 47  e1 12 a6 43  # XOR-MAPPED-ADDRESS
    00 08 00 14  2b 91 f5 99  fd 9e 90 c3  8c 74 89 f9  2a f9 ba 53  f0 6b e7 d7
    80 28 00 04  c0 7d 4c 96
    """
)

#: §2.3 Sample IPv6 Response.  The SOFTWARE padding is one space.
RFC5769_RESPONSE_IPV6 = unhex(
    """
    01 01 00 48  21 12 a4 42  b7 e7 a7 01  bc 34 d6 86  fa 87 df ae
    80 22 00 0b  74 65 73 74  20 76 65 63  74 6f 72 20
    00 20 00 14  00 02 a1 47  01 13 a9 fa  a5 d3 f1 79  bc 25 f4 b5  be d2 b9 d9
    00 08 00 14  a3 82 95 4e  4b e6 7b f1  17 84 c9 7c  82 92 c2 75  bf e3 ed 41
    80 28 00 04  c8 fb 0b 4c
    """
)

MATRIX_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"  # マトリックス, unchanged by SASLprep
MATRIX_PASSWORD = "TheMatrIX"
EXAMPLE_REALM = "example.org"

#: §2.4 Sample Request with Long-Term Authentication.  Zero padding throughout.
RFC5769_LONG_TERM = unhex(
    """
    00 01 00 60  21 12 a4 42  78 ad 34 33  c6 ad 72 c0  29 da 41 2e
    00 06 00 12  # USERNAME (18 bytes) and 2 bytes of padding
    e3 83 9e e3  83 88 e3 83  aa e3 83 83  e3 82 af e3  82 b9 00 00
    00 15 00 1c  # NONCE
    66 2f 2f 34  39 39 6b 39  35 34 64 36  4f 4c 33 34  6f 4c 39 46  53 54 76 79  36 34 73 41
    00 14 00 0b  # REALM (11 bytes) and 1 byte of padding
    65 78 61 6d  70 6c 65 2e  6f 72 67 00
    00 08 00 14  # MESSAGE-INTEGRITY
    f6 70 24 65  6d d6 4a 3e  02 b8 e0 71  2e 85 c9 a2  8c a8 96 66
    """
)

# --- RFC 8489 Appendix B.1 with erratum 6268 -------------------------------

#: The RFC as published says length 0x009c and another HMAC; erratum 6268
#: corrects both: the attributes take 0x90 = 144 bytes, and the HMAC below is
#: the one over those bytes (checked in ``RFC8489Tests``).
RFC8489_REQUEST = unhex(
    """
    00 01 00 90  21 12 a4 42  78 ad 34 33  c6 ad 72 c0  29 da 41 2e
    00 1e 00 20  # USERHASH
    4a 3c f3 8f  ef 69 92 bd  a9 52 c6 78  04 17 da 0f
    24 81 94 15  56 9e 60 b2  05 c4 6e 41  40 7f 17 04
    00 15 00 29  # NONCE (41 bytes) and 3 bytes of padding
    6f 62 4d 61  74 4a 6f 73  32 41 41 41  43 66 2f 2f  34 39 39 6b  39 35 34 64
    36 4f 4c 33  34 6f 4c 39  46 53 54 76  79 36 34 73  41 00 00 00
    00 14 00 0b  65 78 61 6d  70 6c 65 2e  6f 72 67 00  # REALM
    00 1d 00 04  00 02 00 00  # PASSWORD-ALGORITHM: SHA-256, no parameters
    00 1c 00 20  # MESSAGE-INTEGRITY-SHA256
    b5 c7 bf 00  5b 6c 52 a2  1c 51 c5 e8  92 f8 19 24
    13 62 96 cb  92 7c 43 14  93 09 27 8c  c6 51 8e 65
    """
)
RFC8489_NONCE = "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"


# --- helpers --------------------------------------------------------------

_SIGNATURES = (stun.MESSAGE_INTEGRITY, stun.MESSAGE_INTEGRITY_SHA256, stun.FINGERPRINT)


def walk(data: bytes) -> Iterable[Tuple[int, int, int]]:
    """``(type, value offset, value length)`` of each attribute, by hand."""
    pos = stun.HEADER_LENGTH
    while pos + 4 <= len(data):
        atype, alen = struct.unpack_from(">HH", data, pos)
        yield atype, pos + 4, alen
        pos += 4 + alen + (-alen % 4)


def padding_positions(data: bytes) -> Set[int]:
    return {start + alen + i for _, start, alen in walk(data) for i in range(-alen % 4)}


def zero_padding(data: bytes) -> bytes:
    out = bytearray(data)
    for i in padding_positions(data):
        out[i] = 0
    return bytes(out)


def value_positions(data: bytes, atype: int) -> Set[int]:
    return {i for t, start, alen in walk(data) if t == atype for i in range(start, start + alen)}


def reencode(message: stun.Message, **signing: object) -> bytes:
    """Encode ``message``'s attributes again, MESSAGE-INTEGRITY(-SHA256)/FINGERPRINT left to the encoder."""
    attributes = [(t, v) for t, v in message.attributes if t not in _SIGNATURES]
    return stun.encode(message.method, message.msg_class, message.transaction_id, attributes, **signing)  # type: ignore[arg-type]


def attr(atype: int, value: bytes, pad: bytes = b"\x00") -> bytes:
    return struct.pack(">HH", atype, len(value)) + value + pad * (-len(value) % 4)


def raw_message(body: bytes, mtype: int = 0x0001, tid: bytes = b"T" * 12, length: Optional[int] = None) -> bytes:
    """A STUN message around ``body`` with the length field given or right."""
    return struct.pack(">HHI", mtype, len(body) if length is None else length, stun.MAGIC_COOKIE) + tid + body


def with_fingerprint(data: bytes) -> bytes:
    """``data`` with a correct FINGERPRINT appended (computed here, not by the codec)."""
    header = data[:2] + struct.pack(">H", len(data) - 20 + 8) + data[4:]
    crc = (zlib.crc32(header) ^ 0x5354554E) & 0xFFFFFFFF
    return header + struct.pack(">HHI", 0x8028, 4, crc)


def covered_by_mi(data: bytes, offset: int) -> bytes:
    """RFC 8489 §14.5 by hand: what the HMAC of a MESSAGE-INTEGRITY at ``offset`` covers,
    ``data[:offset]`` with the header length pointing just past that attribute."""
    return data[:2] + struct.pack(">H", offset - 20 + 24) + data[4:offset]


class DecodeErrorAssertions(SynchronousTestCase):
    def assert_dropped(self, data: bytes) -> stun.StunDecodeError:
        """Undecodable, and the error says: drop it without a reply."""
        error = self.assertRaises(stun.StunDecodeError, stun.decode, data)
        self.assertIsNone(error.error_code)
        return error

    def assert_bad_request(self, data: bytes) -> stun.StunDecodeError:
        """Undecodable, and the error carries what a 400 reply needs."""
        error = self.assertRaises(stun.StunDecodeError, stun.decode, data)
        self.assertEqual(error.error_code, 400)
        method, msg_class = stun.split_message_type(struct.unpack(">H", data[:2])[0])
        self.assertEqual((error.method, error.msg_class, error.transaction_id), (method, msg_class, data[8:20]))
        return error


# --- vectors --------------------------------------------------------------


class RFC5769Tests(DecodeErrorAssertions):
    def check_signed(self, data: bytes, key: bytes) -> stun.Message:
        message = stun.decode(data)
        self.assertTrue(stun.check_integrity(message, key))
        self.assertFalse(stun.check_integrity(message, WRONG_KEY))
        self.assertFalse(stun.check_integrity_sha256(message, key))
        # The codec's verdict agrees with a hand computation over the vector's own bytes.
        offset = message.integrity_offset
        self.assertEqual(data[offset : offset + 4], b"\x00\x08\x00\x14")
        mac = hmac.new(key, covered_by_mi(data, offset), hashlib.sha1).digest()
        self.assertEqual(mac, data[offset + 4 : offset + 24])
        return message

    def check_reencoding_differs_only_in_padding(self, data: bytes, key: bytes) -> None:
        """Our encoder pads with zeros where the vector has spaces (RFC 8489 §14: padding
        content is ignored on receipt); MESSAGE-INTEGRITY and FINGERPRINT cover the padding,
        so they differ too.  Every other byte is identical."""
        message = stun.decode(data)
        ours = reencode(message, integrity_key=key, fingerprint=True)
        self.assertEqual(len(ours), len(data))
        mi_value = message.integrity_offset + 4
        self.assertEqual(ours[:mi_value], zero_padding(data)[:mi_value])
        differing = {i for i in range(len(data)) if ours[i] != data[i]}
        padding = {i for i in padding_positions(data) if data[i] != 0}
        signatures = value_positions(data, stun.MESSAGE_INTEGRITY) | value_positions(data, stun.FINGERPRINT)
        self.assertTrue(padding)
        self.assertTrue(padding <= differing <= padding | signatures)
        again = stun.decode(ours)
        self.assertTrue(again.has_fingerprint)
        self.assertTrue(stun.check_integrity(again, key))
        self.assertEqual(again.attributes[:-1], message.attributes[:-1])
        # And with the vector's padding put back, our bytes are the vector's.
        self.assertEqual(self.with_padding_of(ours, data)[:mi_value], data[:mi_value])

    def with_padding_of(self, ours: bytes, vector: bytes) -> bytes:
        out = bytearray(ours)
        for i in padding_positions(vector):
            out[i] = vector[i]
        return bytes(out)

    def test_sample_request(self) -> None:
        message = self.check_signed(RFC5769_REQUEST, SHORT_TERM_PASSWORD)
        self.assertEqual((message.method, message.msg_class), (stun.BINDING, stun.REQUEST))
        self.assertEqual(message.transaction_id, bytes.fromhex("b7e7a701bc34d686fa87dfae"))
        self.assertTrue(message.has_fingerprint)
        self.assertEqual(
            message.attributes[:4],
            [
                (stun.SOFTWARE, "STUN test client"),
                (0x0024, bytes.fromhex("6e0001ff")),  # PRIORITY, unknown to a TURN codec: raw
                (0x8029, bytes.fromhex("932ff9b151263b36")),  # ICE-CONTROLLED: raw
                (stun.USERNAME, "evtj:h6vY"),
            ],
        )
        self.assertEqual(message.attributes[4][0], stun.MESSAGE_INTEGRITY)
        self.assertEqual(len(message.attributes), 5)  # FINGERPRINT is a flag, not an attribute
        # PRIORITY (0x0024) is comprehension-required; ICE-CONTROLLED (0x8029) is not.
        self.assertEqual(message.unknown_required, (0x0024,))
        self.check_reencoding_differs_only_in_padding(RFC5769_REQUEST, SHORT_TERM_PASSWORD)

    def test_sample_ipv4_response(self) -> None:
        message = self.check_signed(RFC5769_RESPONSE_IPV4, SHORT_TERM_PASSWORD)
        self.assertEqual((message.method, message.msg_class), (stun.BINDING, stun.SUCCESS))
        self.assertTrue(message.has_fingerprint)
        self.assertEqual(message.get(stun.SOFTWARE), "test vector")
        self.assertEqual(message.get_address(stun.XOR_MAPPED_ADDRESS), ("192.0.2.1", 32853))
        self.assertEqual(message.unknown_required, ())
        self.check_reencoding_differs_only_in_padding(RFC5769_RESPONSE_IPV4, SHORT_TERM_PASSWORD)

    def test_sample_ipv6_response(self) -> None:
        message = self.check_signed(RFC5769_RESPONSE_IPV6, SHORT_TERM_PASSWORD)
        self.assertTrue(message.has_fingerprint)
        self.assertEqual(message.get(stun.SOFTWARE), "test vector")
        self.assertEqual(
            message.get_address(stun.XOR_MAPPED_ADDRESS), ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
        )
        self.check_reencoding_differs_only_in_padding(RFC5769_RESPONSE_IPV6, SHORT_TERM_PASSWORD)

    def test_long_term_request(self) -> None:
        key = stun.long_term_key(MATRIX_USERNAME, EXAMPLE_REALM, MATRIX_PASSWORD)
        self.assertEqual(key, hashlib.md5(("%s:%s:%s" % (MATRIX_USERNAME, EXAMPLE_REALM, "TheMatrIX")).encode()).digest())
        message = self.check_signed(RFC5769_LONG_TERM, key)
        self.assertFalse(message.has_fingerprint)
        self.assertFalse(stun.check_integrity(message, stun.long_term_key(MATRIX_USERNAME, EXAMPLE_REALM, "thematrix")))
        self.assertEqual(
            message.attributes[:3],
            [
                (stun.USERNAME, MATRIX_USERNAME),
                (stun.NONCE, "f//499k954d6OL34oL9FSTvy64sA"),
                (stun.REALM, EXAMPLE_REALM),
            ],
        )
        # Zero padding: our encoder reproduces the vector byte for byte.
        self.assertEqual(reencode(message, integrity_key=key), RFC5769_LONG_TERM)

    def test_zero_padded_vectors_reencode_exactly(self) -> None:
        """The space-padded vectors, with their padding zeroed and their MESSAGE-INTEGRITY
        and FINGERPRINT recomputed by hand, are exactly what our encoder produces."""
        for vector in (RFC5769_REQUEST, RFC5769_RESPONSE_IPV4, RFC5769_RESPONSE_IPV6):
            zeroed = zero_padding(vector)
            offset = stun.decode(vector).integrity_offset
            mac = hmac.new(SHORT_TERM_PASSWORD, covered_by_mi(zeroed, offset), hashlib.sha1).digest()
            expected = with_fingerprint(zeroed[: offset + 4] + mac)
            self.assertEqual(reencode(stun.decode(vector), integrity_key=SHORT_TERM_PASSWORD, fingerprint=True), expected)

    def test_vectors_tampered(self) -> None:
        """Changing any covered byte breaks MESSAGE-INTEGRITY; the FINGERPRINT catches it first."""
        for vector in (RFC5769_REQUEST, RFC5769_RESPONSE_IPV4):
            tampered = bytearray(vector)
            tampered[30] ^= 1  # inside SOFTWARE
            self.assert_dropped(bytes(tampered))
        tampered = bytearray(RFC5769_LONG_TERM)
        tampered[30] ^= 1  # inside USERNAME, no FINGERPRINT to catch it
        message = stun.decode(bytes(tampered))
        key = stun.long_term_key(MATRIX_USERNAME, EXAMPLE_REALM, MATRIX_PASSWORD)
        self.assertFalse(stun.check_integrity(message, key))


class RFC8489Tests(SynchronousTestCase):
    def test_sample_request_sha256(self) -> None:
        message = stun.decode(RFC8489_REQUEST)
        self.assertEqual((message.method, message.msg_class), (stun.BINDING, stun.REQUEST))
        userhash = hashlib.sha256(("%s:%s" % (MATRIX_USERNAME, EXAMPLE_REALM)).encode("utf-8")).digest()
        self.assertEqual(
            message.attributes[:4],
            [
                (stun.USERHASH, userhash),
                (stun.NONCE, RFC8489_NONCE),
                (stun.REALM, EXAMPLE_REALM),
                (stun.PASSWORD_ALGORITHM, (stun.ALGORITHM_SHA256, b"")),
            ],
        )
        self.assertEqual(message.attributes[4][0], stun.MESSAGE_INTEGRITY_SHA256)
        self.assertEqual(message.integrity_offset, -1)
        key = stun.long_term_key(MATRIX_USERNAME, EXAMPLE_REALM, MATRIX_PASSWORD, stun.ALGORITHM_SHA256)
        self.assertEqual(
            key, hashlib.sha256(("%s:%s:%s" % (MATRIX_USERNAME, EXAMPLE_REALM, MATRIX_PASSWORD)).encode()).digest()
        )
        self.assertTrue(stun.check_integrity_sha256(message, key))
        self.assertFalse(stun.check_integrity(message, key))
        md5_key = stun.long_term_key(MATRIX_USERNAME, EXAMPLE_REALM, MATRIX_PASSWORD)
        self.assertFalse(stun.check_integrity_sha256(message, md5_key))
        # Zero padding throughout: byte for byte.
        self.assertEqual(reencode(message, integrity_sha256_key=key), RFC8489_REQUEST)

    def test_erratum_6268(self) -> None:
        """The published length, 0x009c, does not match the 144 bytes of attributes, and no
        HMAC over the published header verifies: the erratum's bytes are the right ones."""
        self.assertEqual(len(RFC8489_REQUEST) - 20, 0x90)
        published = RFC8489_REQUEST[:2] + b"\x00\x9c" + RFC8489_REQUEST[4:]
        self.assertRaises(stun.StunDecodeError, stun.decode, published)
        key = stun.long_term_key(MATRIX_USERNAME, EXAMPLE_REALM, MATRIX_PASSWORD, stun.ALGORITHM_SHA256)
        offset = len(RFC8489_REQUEST) - 36
        over_published = hmac.new(key, published[:offset], hashlib.sha256).digest()
        self.assertNotEqual(over_published, RFC8489_REQUEST[offset + 4 :])

    def test_truncated_sha256(self) -> None:
        """MESSAGE-INTEGRITY-SHA256 may be truncated to 16..32 bytes (RFC 8489 §14.6)."""
        key = b"k" * 32
        full = stun.encode(stun.BINDING, stun.REQUEST, b"t" * 12, [(stun.SOFTWARE, "x")], integrity_sha256_key=key)
        offset = len(full) - 36
        for length in (16, 20, 24, 28):
            covered = full[:2] + struct.pack(">H", offset - 20 + 4 + length) + full[4:offset]
            mac = hmac.new(key, covered, hashlib.sha256).digest()[:length]
            data = covered + struct.pack(">HH", stun.MESSAGE_INTEGRITY_SHA256, length) + mac
            message = stun.decode(data)
            self.assertTrue(stun.check_integrity_sha256(message, key))
            self.assertFalse(stun.check_integrity_sha256(message, b"K" * 32))
        bad = full[:2] + struct.pack(">H", offset - 20 + 4 + 12) + full[4:offset] + attr(0x001C, b"m" * 12)
        self.assertEqual(self.assertRaises(stun.StunDecodeError, stun.decode, bad).error_code, 400)


# --- Firezone credentials and nonces ---------------------------------------


class CredentialTests(SynchronousTestCase):
    def test_password_vectors(self) -> None:
        self.assertEqual(
            auth.generate_password(
                "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab", 1892160000, "n23JJ2wKKtt30oXi"
            ),
            "00hqldgk5xLeKKOB+xls9mHMVtgqzie9DulfgQwMv68",
        )
        self.assertEqual(
            auth.generate_password("1cab293a-4032-46f4-862a-40e5d174b0d2", 1685984278, "uvdgKvS9GXYZ_vmv"),
            "6xUIoZ+QvxKhRasLifwfRkMXl+ETLJUsFkHlXjlHAkg",
        )

    def test_make_credentials(self) -> None:
        secret = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"
        self.assertEqual(
            auth.make_credentials(secret, 1892160000, "n23JJ2wKKtt30oXi"),
            ("1892160000:n23JJ2wKKtt30oXi", "00hqldgk5xLeKKOB+xls9mHMVtgqzie9DulfgQwMv68"),
        )

    def test_parse_username(self) -> None:
        self.assertEqual(auth.parse_username("1892160000:n23JJ2wKKtt30oXi"), (1892160000, "n23JJ2wKKtt30oXi"))
        self.assertEqual(auth.parse_username("0:x"), (0, "x"))
        self.assertEqual(auth.parse_username("18446744073709551615:x"), (2**64 - 1, "x"))
        for malformed in (
            "",
            ":",
            "n23JJ2wKKtt30oXi",
            "1892160000",
            ":n23JJ2wKKtt30oXi",
            "1892160000:a:b",
            "-1:x",
            "+1:x",
            " 1:x",
            "1 :x",
            "0x10:x",
            "1_000:x",
            "1.5:x",
            "\u0661\u0662:x",  # Arabic-Indic digits: isdigit() but not ASCII
            "\u00b2:x",  # superscript two
            "18446744073709551616:x",  # 2**64
            MATRIX_USERNAME,
        ):
            self.assertIsNone(auth.parse_username(malformed), malformed)

    @given(st.text(max_size=40))
    def test_parse_username_never_raises(self, username: str) -> None:
        parsed = auth.parse_username(username)
        if parsed is not None:
            expiry_text, _, salt = username.partition(":")
            self.assertEqual(parsed, (int(expiry_text), salt))
            self.assertTrue(expiry_text.isascii() and expiry_text.isdigit())


CLIENT = ("198.51.100.7", 40000)
NOW = 1_700_000_000.0


class NonceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.nonces = auth.NonceFactory(b"n" * 32)

    def test_security_feature_cookie(self) -> None:
        """RFC 8489 §9.2: ``obMatJos2`` then the feature set; "password algorithms" is the first bit."""
        nonce = self.nonces.issue(CLIENT, NOW)
        self.assertTrue(nonce.startswith("obMatJos2"))
        import base64

        features = base64.b64decode(nonce[9:13])
        self.assertEqual(features[0] & 0x80, 0x80)
        self.assertLessEqual(len(nonce.encode()), 763)

    def test_valid_for_its_lifetime(self) -> None:
        nonce = self.nonces.issue(CLIENT, NOW + 0.7)
        self.assertTrue(self.nonces.is_valid(nonce, CLIENT, NOW))
        self.assertTrue(self.nonces.is_valid(nonce, CLIENT, NOW + 599.999))
        self.assertFalse(self.nonces.is_valid(nonce, CLIENT, NOW + 600))  # expiry when deadline <= now
        self.assertFalse(self.nonces.is_valid(nonce, CLIENT, NOW + 10_000))
        self.assertFalse(self.nonces.is_valid(nonce, CLIENT, NOW - 1))  # issued in the future

    def test_bound_to_the_client_address(self) -> None:
        nonce = self.nonces.issue(CLIENT, NOW)
        self.assertFalse(self.nonces.is_valid(nonce, ("198.51.100.8", 40000), NOW))
        self.assertFalse(self.nonces.is_valid(nonce, ("198.51.100.7", 40001), NOW))
        self.assertFalse(self.nonces.is_valid(nonce, ("::ffff:198.51.100.7", 40000), NOW))
        v6 = ("2001:db8::7", 40000)
        self.assertTrue(self.nonces.is_valid(self.nonces.issue(v6, NOW), v6, NOW))

    def test_bound_to_the_key(self) -> None:
        nonce = self.nonces.issue(CLIENT, NOW)
        self.assertFalse(auth.NonceFactory(b"m" * 32).is_valid(nonce, CLIENT, NOW))

    def test_forged(self) -> None:
        import base64

        for full in (True, False):
            nonce = self.nonces.issue(CLIENT, NOW, full=full)
            prefix, body = nonce[: len(nonce) - 16], nonce[-16:]
            raw = base64.b64decode(body)
            forged_mac = raw[:4] + bytes([raw[4] ^ 1]) + raw[5:]
            self.assertFalse(self.nonces.is_valid(prefix + base64.b64encode(forged_mac).decode(), CLIENT, NOW))
            # Moving the issue time forward invalidates the MAC.
            later = (int(NOW) + 300).to_bytes(4, "big") + raw[4:]
            self.assertFalse(self.nonces.is_valid(prefix + base64.b64encode(later).decode(), CLIENT, NOW + 400))
            self.assertFalse(self.nonces.is_valid(nonce + "A", CLIENT, NOW))
            self.assertFalse(self.nonces.is_valid(nonce[:-1], CLIENT, NOW))
            self.assertTrue(self.nonces.is_valid(nonce, CLIENT, NOW))
        # The form is authenticated too: stripping or adding the cookie fails.
        full = self.nonces.issue(CLIENT, NOW)
        plain = self.nonces.issue(CLIENT, NOW, full=False)
        self.assertFalse(self.nonces.is_valid(full[13:], CLIENT, NOW))
        self.assertFalse(self.nonces.is_valid(full[:13] + plain, CLIENT, NOW))

    def test_garbage(self) -> None:
        prefix = auth.NONCE_COOKIE + auth.NONCE_FEATURES
        for garbage in (
            "",
            "x",
            "obMatJos2",
            prefix,
            prefix + ".",
            prefix + "zz.abc",
            prefix + "%x" % int(NOW),
            prefix + "%x." % int(NOW),
            prefix + "1" * 17 + ".abc",
            prefix + "." + "A" * 16,
            prefix + "%x.\u00e9\u00e9" % int(NOW),
            RFC8489_NONCE,
            "f//499k954d6OL34oL9FSTvy64sA",
        ):
            self.assertFalse(self.nonces.is_valid(garbage, CLIENT, NOW), garbage)

    @given(st.text(max_size=80), st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=2**40))
    def test_never_raises(self, nonce: str, now: float) -> None:
        self.assertFalse(self.nonces.is_valid(nonce, CLIENT, now))


# --- hypothesis strategies --------------------------------------------------

tids = st.binary(min_size=12, max_size=12)
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: a.compressed)
addresses = st.tuples(st.one_of(ipv4, ipv6), u16)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


def text_within(limit: int) -> st.SearchStrategy[str]:
    """Unicode text of at most ``limit`` UTF-8 bytes, reaching the limit now and then."""
    long_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=limit // 4, max_size=limit)
    return st.one_of(any_text, long_text).map(lambda s: s.encode("utf-8")[:limit].decode("utf-8", "ignore"))


error_codes = st.integers(300, 699)
reasons = st.one_of(st.sampled_from(sorted(stun.REASONS.values())), text_within(763))
algorithms = st.tuples(u16, st.binary(max_size=24))

#: A strategy of valid typed values for every attribute type the codec knows.
VALUES = {
    stun.MAPPED_ADDRESS: addresses,
    stun.ALTERNATE_SERVER: addresses,
    stun.XOR_MAPPED_ADDRESS: addresses,
    stun.XOR_PEER_ADDRESS: addresses,
    stun.XOR_RELAYED_ADDRESS: addresses,
    stun.USERNAME: text_within(512),
    stun.REALM: text_within(763),
    stun.NONCE: text_within(763),
    stun.SOFTWARE: text_within(763),
    stun.USERHASH: st.binary(min_size=32, max_size=32),
    stun.MESSAGE_INTEGRITY: st.binary(min_size=20, max_size=20),
    stun.MESSAGE_INTEGRITY_SHA256: st.sampled_from([16, 20, 24, 28, 32]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    stun.PASSWORD_ALGORITHM: algorithms,
    stun.PASSWORD_ALGORITHMS: st.lists(algorithms, max_size=4).map(tuple),
    stun.FINGERPRINT: u32,
    stun.ERROR_CODE: st.tuples(error_codes, reasons),
    stun.ADDRESS_ERROR_CODE: st.tuples(u8, error_codes, reasons),
    stun.UNKNOWN_ATTRIBUTES: st.lists(u16, max_size=8).map(tuple),
    stun.LIFETIME: u32,
    stun.REQUESTED_TRANSPORT: u8,
    stun.REQUESTED_ADDRESS_FAMILY: u8,
    stun.ADDITIONAL_ADDRESS_FAMILY: u8,
    stun.CHANNEL_NUMBER: u16,
    stun.DATA: st.binary(max_size=300),
    stun.EVEN_PORT: st.booleans(),
    stun.RESERVATION_TOKEN: st.binary(min_size=8, max_size=8),
    stun.DONT_FRAGMENT: st.just(True),
}

#: Types an encoder caller may list: the signatures are the encoder's to add.
LISTABLE = sorted(set(VALUES) - set(_SIGNATURES))

typed_attributes = st.sampled_from(LISTABLE).flatmap(lambda t: VALUES[t].map(lambda v: (t, v)))
unknown_attributes = st.tuples(u16.filter(lambda t: t not in CODECS), st.binary(max_size=40))
attribute_lists = st.lists(st.one_of(typed_attributes, unknown_attributes), max_size=8)
keys = st.one_of(st.none(), st.binary(min_size=1, max_size=64))


@st.composite
def messages(draw: st.DrawFn) -> Tuple[int, int, bytes, List[stun.Attribute], Optional[bytes], Optional[bytes], bool]:
    return (
        draw(st.integers(0, 0xFFF)),
        draw(st.integers(0, 3)),
        draw(tids),
        draw(attribute_lists),
        draw(keys),
        draw(keys),
        draw(st.booleans()),
    )


def encode_drawn(drawn: Tuple[int, int, bytes, List[stun.Attribute], Optional[bytes], Optional[bytes], bool]) -> bytes:
    method, msg_class, tid, attributes, key, key256, fingerprint = drawn
    return stun.encode(
        method, msg_class, tid, attributes, integrity_key=key, integrity_sha256_key=key256, fingerprint=fingerprint
    )


# --- round trips --------------------------------------------------------------


class RoundTripTests(SynchronousTestCase):
    def test_every_codec_has_a_strategy(self) -> None:
        self.assertEqual(set(VALUES), set(CODECS))

    @given(st.data())
    def test_each_attribute_type(self, data: st.DataObject) -> None:
        tid = data.draw(tids)
        for atype in sorted(CODECS):
            decoder, encoder = CODECS[atype]
            value = data.draw(VALUES[atype], label="0x%04x" % atype)
            raw = encoder(value, tid)
            self.assertEqual(decoder(raw, tid), value)
            if atype != stun.FINGERPRINT:  # a listed FINGERPRINT would be checked, and fail
                message = stun.decode(stun.encode(stun.BINDING, stun.SUCCESS, tid, [(atype, value)]))
                self.assertEqual(message.attributes, [(atype, value)])

    @given(messages())
    def test_whole_messages(self, drawn: Tuple[int, int, bytes, List[stun.Attribute], Optional[bytes], Optional[bytes], bool]) -> None:
        method, msg_class, tid, attributes, key, key256, fingerprint = drawn
        data = encode_drawn(drawn)
        self.assertEqual(len(data) % 4, 0)
        self.assertTrue(is_stun(data))
        message = stun.decode(data)
        self.assertEqual((message.method, message.msg_class, message.transaction_id), (method, msg_class, tid))
        signatures = [t for t, _ in message.attributes if t in _SIGNATURES]
        self.assertEqual([(t, v) for t, v in message.attributes if t not in _SIGNATURES], attributes)
        expected_signatures = [stun.MESSAGE_INTEGRITY] * (key is not None) + [stun.MESSAGE_INTEGRITY_SHA256] * (
            key256 is not None
        )
        self.assertEqual(signatures, expected_signatures)
        self.assertEqual(message.has_fingerprint, fingerprint)
        self.assertEqual(message.unknown_required, tuple(t for t, _ in attributes if t not in CODECS and t < 0x8000))
        if key is not None:
            self.assertTrue(stun.check_integrity(message, key))
            self.assertFalse(stun.check_integrity(message, key + b"x"))
        else:
            self.assertFalse(stun.check_integrity(message, b"x"))
        if key256 is not None:
            self.assertTrue(stun.check_integrity_sha256(message, key256))
            self.assertFalse(stun.check_integrity_sha256(message, key256 + b"x"))
        else:
            self.assertFalse(stun.check_integrity_sha256(message, b"x"))
        # Re-encoding what was decoded gives the same bytes.
        self.assertEqual(
            reencode(message, integrity_key=key, integrity_sha256_key=key256, fingerprint=fingerprint), data
        )

    @given(st.integers(0, 0xFFF), st.integers(0, 3))
    def test_message_type(self, method: int, msg_class: int) -> None:
        mtype = stun.message_type(method, msg_class)
        self.assertEqual(mtype & 0xC000, 0)
        self.assertEqual(stun.split_message_type(mtype), (method, msg_class))

    def test_message_type_exhaustive(self) -> None:
        for mtype in range(0x4000):
            self.assertEqual(stun.message_type(*stun.split_message_type(mtype)), mtype)
        # RFC 8489 §5 examples: Binding request 0x0001, success 0x0101, error 0x0111, indication 0x0011.
        self.assertEqual(
            [stun.message_type(stun.BINDING, c) for c in (stun.REQUEST, stun.SUCCESS, stun.ERROR, stun.INDICATION)],
            [0x0001, 0x0101, 0x0111, 0x0011],
        )
        self.assertEqual(stun.message_type(stun.CHANNEL_BIND, stun.SUCCESS), 0x0109)

    def test_xor_address_example(self) -> None:
        """The XOR is with the cookie (and the transaction id for IPv6): RFC 5769 §2.2 by hand."""
        tid = bytes.fromhex("b7e7a701bc34d686fa87dfae")
        raw = CODECS[stun.XOR_MAPPED_ADDRESS][1](("192.0.2.1", 32853), tid)
        self.assertEqual(raw, bytes.fromhex("0001a147e112a643"))
        plain = CODECS[stun.MAPPED_ADDRESS][1](("192.0.2.1", 32853), tid)
        self.assertEqual(plain, bytes.fromhex("00018055c0000201"))

    def test_text_limits(self) -> None:
        tid = b"t" * 12
        for atype, limit in ((stun.USERNAME, 512), (stun.REALM, 763), (stun.NONCE, 763), (stun.SOFTWARE, 763)):
            decoder, encoder = CODECS[atype]
            at_limit = "\u00e9" * (limit // 2) + "x" * (limit % 2)
            self.assertEqual(decoder(encoder(at_limit, tid), tid), at_limit)
            self.assertRaises(ValueError, encoder, at_limit + "x", tid)
        self.assertRaises(ValueError, CODECS[stun.ERROR_CODE][1], (400, "x" * 764), tid)


class EncoderMisuseTests(SynchronousTestCase):
    """Our own mistakes raise at once, rather than put bad bytes on the wire."""

    def test_misuse(self) -> None:
        tid = b"t" * 12
        enc = stun.encode
        self.assertRaises(ValueError, enc, stun.BINDING, stun.REQUEST, b"short", [])
        self.assertRaises(ValueError, enc, 0x1000, stun.REQUEST, tid, [])
        self.assertRaises(ValueError, enc, stun.BINDING, 4, tid, [])
        self.assertRaises(ValueError, enc, stun.BINDING, stun.REQUEST, tid, [(stun.DATA, b"x" * 0x10000)])
        big = [(stun.DATA, b"x" * 0xFFF8)]  # 0xFFFC bytes of attributes: room for nothing more
        self.assertEqual(len(enc(stun.BINDING, stun.INDICATION, tid, big)), 20 + 0xFFFC)
        self.assertRaises(ValueError, enc, stun.BINDING, stun.INDICATION, tid, big, integrity_key=b"k")
        self.assertRaises(ValueError, enc, stun.BINDING, stun.INDICATION, tid, big, fingerprint=True)
        self.assertRaises(ValueError, enc, stun.BINDING, stun.INDICATION, tid, big + big)
        for atype, value in (
            (stun.XOR_PEER_ADDRESS, "1.2.3.4"),
            (stun.XOR_PEER_ADDRESS, ("1.2.3.4", 70000)),
            (stun.MAPPED_ADDRESS, ("not an ip", 1)),
            (stun.USERNAME, b"bytes"),
            (stun.ERROR_CODE, (200, "OK")),
            (stun.ERROR_CODE, (700, "x")),
            (stun.USERHASH, b"short"),
            (stun.MESSAGE_INTEGRITY, b"x" * 19),
            (stun.MESSAGE_INTEGRITY_SHA256, b"x" * 15),
            (stun.CHANNEL_NUMBER, 0x10000),
            (stun.REQUESTED_TRANSPORT, 256),
            (stun.EVEN_PORT, 1),
            (stun.DONT_FRAGMENT, False),
            (stun.PASSWORD_ALGORITHM, (1, "text")),
            (0x7777, "raw values are bytes"),
        ):
            self.assertRaises((TypeError, ValueError), enc, stun.BINDING, stun.REQUEST, tid, [(atype, value)])


# --- never raises anything but StunDecodeError ---------------------------------


def decode_or_error(test: SynchronousTestCase, data: bytes) -> Optional[stun.Message]:
    """``stun.decode(data)``; a ``StunDecodeError`` is fine, and consistent; anything else fails."""
    try:
        message = stun.decode(data)
    except stun.StunDecodeError as error:
        test.assertIn(error.error_code, (None, 400))
        if error.error_code is not None:
            test.assertEqual(len(error.transaction_id or b""), 12)
            test.assertIsNotNone(error.method)
            test.assertIsNotNone(error.msg_class)
        return None
    # Whatever decodes is something the relay could echo back: every typed value re-encodes.
    for atype, value in message.attributes:
        codec = CODECS.get(atype)
        if codec is not None:
            test.assertEqual(codec[0](codec[1](value, message.transaction_id), message.transaction_id), value)
        else:
            test.assertIsInstance(value, bytes)
    test.assertEqual(message.raw, bytes(data))
    return message


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(encode_drawn(draw(messages())))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "length", "attr-length", "attr-type", "byte"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=12))
        elif kind == "length" and len(data) >= 4:
            data[2:4] = struct.pack(">H", draw(st.one_of(u16, st.just(max(len(data) - 20, 0) ^ 4))))
        elif kind == "attr-length" and len(data) > 24:
            starts = [start - 4 for _, start, _ in walk(bytes(data))] or [20]
            pos = draw(st.sampled_from(starts))
            data[pos + 2 : pos + 4] = struct.pack(">H", draw(st.one_of(u16, st.integers(0, 40))))
        elif kind == "attr-type" and len(data) > 24:
            starts = [start - 4 for _, start, _ in walk(bytes(data))] or [20]
            pos = draw(st.sampled_from(starts))
            data[pos : pos + 2] = struct.pack(">H", draw(st.one_of(st.sampled_from(sorted(CODECS)), u16)))
        elif kind == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(u8)
    return bytes(data)


@st.composite
def plausible(draw: st.DrawFn) -> bytes:
    """A right header (cookie, length) around random attribute bytes: reaches the attribute parser."""
    body = bytearray()
    for _ in range(draw(st.integers(0, 5))):
        atype = draw(st.one_of(st.sampled_from(sorted(CODECS)), u16))
        value = draw(st.binary(max_size=40))
        body += attr(atype, value)
    body += draw(st.binary(max_size=8).map(lambda b: b[: len(b) // 4 * 4]))
    if draw(st.booleans()):
        return with_fingerprint(raw_message(bytes(body), draw(st.integers(0, 0x3FFF)), draw(tids)))
    return raw_message(bytes(body), draw(st.integers(0, 0x3FFF)), draw(tids))


class NeverRaisesTests(SynchronousTestCase):
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        decode_or_error(self, data)
        decode_or_error(self, memoryview(data))  # type: ignore[arg-type]

    @settings(max_examples=300)
    @given(plausible())
    def test_plausible_messages(self, data: bytes) -> None:
        decode_or_error(self, data)

    @settings(max_examples=300)
    @given(mutated())
    def test_mutated_messages(self, data: bytes) -> None:
        decode_or_error(self, data)


# --- malformed messages, one by one ---------------------------------------------


class MalformedTests(DecodeErrorAssertions):
    tid = b"T" * 12

    def encode(self, attributes: List[stun.Attribute], **signing: object) -> bytes:
        return stun.encode(stun.ALLOCATE, stun.REQUEST, self.tid, attributes, **signing)  # type: ignore[arg-type]

    def test_header(self) -> None:
        good = self.encode([(stun.SOFTWARE, "x")])
        stun.decode(good)
        self.assert_dropped(b"")
        self.assert_dropped(good[:19])  # shorter than a header
        self.assert_dropped(good[:4] + b"\x21\x12\xa4\x43" + good[8:])  # cookie
        self.assert_dropped(b"\x80" + good[1:])  # first bits 10
        self.assert_dropped(b"\x40" + good[1:])  # first bits 01: ChannelData, not STUN
        self.assert_dropped(raw_message(b"ab", length=2))  # length not a multiple of 4
        self.assert_dropped(raw_message(b"abcd", length=8))  # length larger than the datagram
        self.assert_dropped(raw_message(b"abcdefgh", length=4))  # datagram longer than the length
        self.assert_dropped(good + b"\x00\x00\x00\x00")
        self.assertEqual(stun.decode(raw_message(b"")).attributes, [])

    def test_attribute_overrunning(self) -> None:
        self.assert_dropped(raw_message(struct.pack(">HH", stun.SOFTWARE, 8) + b"abcd"))
        self.assert_dropped(raw_message(struct.pack(">HH", stun.SOFTWARE, 5) + b"abcd"))  # padding missing
        self.assert_dropped(raw_message(attr(stun.SOFTWARE, b"x") + struct.pack(">HH", 0x8888, 0xFFFF)))

    def test_fingerprint(self) -> None:
        good = self.encode([(stun.SOFTWARE, "x")], fingerprint=True)
        self.assertTrue(stun.decode(good).has_fingerprint)
        self.assertEqual(good, with_fingerprint(self.encode([(stun.SOFTWARE, "x")])))
        self.assert_dropped(good[:-1] + bytes([good[-1] ^ 1]))
        # An attribute after FINGERPRINT, with the header length and even the CRC fixed up.
        after = good + attr(stun.SOFTWARE, b"late")
        after = after[:2] + struct.pack(">H", len(after) - 20) + after[4:]
        self.assert_dropped(after)
        self.assert_dropped(with_fingerprint(after))
        # FINGERPRINT of the wrong length.
        body = attr(stun.SOFTWARE, b"x") + attr(stun.FINGERPRINT, b"\x00" * 8)
        self.assert_dropped(raw_message(body))

    def test_bad_address_family(self) -> None:
        for atype in (stun.XOR_PEER_ADDRESS, stun.MAPPED_ADDRESS, stun.XOR_RELAYED_ADDRESS):
            for value in (
                b"\x00\x03\x12\x34" + b"\x01\x02\x03\x04",  # family 3
                b"\x00\x01\x12\x34" + b"\x00" * 16,  # IPv4 family, IPv6 length
                b"\x00\x02\x12\x34" + b"\x00" * 4,  # IPv6 family, IPv4 length
                b"\x00\x01",
                b"",
            ):
                data = raw_message(attr(atype, value), stun.message_type(stun.CREATE_PERMISSION, stun.REQUEST), self.tid)
                error = self.assert_bad_request(data)
                self.assertEqual((error.method, error.msg_class), (stun.CREATE_PERMISSION, stun.REQUEST))

    def test_bad_attribute_values(self) -> None:
        for atype, value in (
            (stun.USERNAME, b"\xff\xfe"),  # not UTF-8
            (stun.USERNAME, b"a\xc3"),  # truncated UTF-8
            (stun.USERNAME, b"u" * 513),
            (stun.REALM, b"r" * 764),
            (stun.NONCE, b"\xed\xa0\x80"),  # an encoded surrogate is not UTF-8
            (stun.ERROR_CODE, b"\x00\x00\x02\x00OK"),  # class 2
            (stun.ERROR_CODE, b"\x00\x00\x04\x64"),  # number 100
            (stun.ERROR_CODE, b"\x00\x00\x04"),
            (stun.LIFETIME, b"\x00\x00\x02"),
            (stun.CHANNEL_NUMBER, b"\x40\x00"),
            (stun.REQUESTED_TRANSPORT, b"\x11"),
            (stun.EVEN_PORT, b"\x80\x00\x00\x00"),
            (stun.DONT_FRAGMENT, b"\x00"),
            (stun.UNKNOWN_ATTRIBUTES, b"\x00\x01\x00"),
            (stun.MESSAGE_INTEGRITY, b"m" * 16),
            (stun.USERHASH, b"h" * 31),
            (stun.RESERVATION_TOKEN, b"r" * 4),
            (stun.PASSWORD_ALGORITHM, b"\x00\x02\x00\x08\x00\x00\x00\x00"),  # parameters overrun
            (stun.PASSWORD_ALGORITHM, b"\x00\x02\x00\x00\x00\x01\x00\x00"),  # trailing algorithm
            (stun.PASSWORD_ALGORITHMS, b"\x00\x02\x00"),
        ):
            self.assert_bad_request(raw_message(attr(atype, value), tid=self.tid))

    def test_username_limit(self) -> None:
        self.assertEqual(stun.decode(raw_message(attr(stun.USERNAME, b"u" * 512))).get(stun.USERNAME), "u" * 512)
        self.assert_bad_request(raw_message(attr(stun.USERNAME, b"u" * 513)))

    def test_padding_content_ignored(self) -> None:
        spaces = stun.decode(raw_message(attr(stun.USERNAME, b"abc", pad=b" ")))
        self.assertEqual(spaces.attributes, [(stun.USERNAME, "abc")])

    def test_password_algorithms(self) -> None:
        both = (stun.ALGORITHM_MD5, b""), (stun.ALGORITHM_SHA256, b"")
        data = raw_message(attr(stun.PASSWORD_ALGORITHMS, bytes.fromhex("0001000000020000")))
        self.assertEqual(stun.decode(data).get(stun.PASSWORD_ALGORITHMS), both)
        # Parameters are padded inside the value; a last block may come without its padding.
        padded = bytes.fromhex("0009000301020300") + bytes.fromhex("000a0001ff000000")
        self.assertEqual(
            stun.decode(raw_message(attr(stun.PASSWORD_ALGORITHMS, padded))).get(stun.PASSWORD_ALGORITHMS),
            ((9, b"\x01\x02\x03"), (10, b"\xff")),
        )
        self.assertEqual(
            stun.decode(raw_message(attr(stun.PASSWORD_ALGORITHMS, padded[:-3]))).get(stun.PASSWORD_ALGORITHMS),
            ((9, b"\x01\x02\x03"), (10, b"\xff")),
        )
        self.assertEqual(
            stun.decode(raw_message(attr(stun.PASSWORD_ALGORITHM, padded[8:-3]))).get(stun.PASSWORD_ALGORITHM),
            (10, b"\xff"),
        )

    def test_after_message_integrity(self) -> None:
        """RFC 8489 §14.5: attributes after MESSAGE-INTEGRITY are ignored, even malformed or
        unknown comprehension-required ones, except MESSAGE-INTEGRITY-SHA256 and FINGERPRINT."""
        key = b"key"
        signed = self.encode([(stun.USERNAME, "alice")], integrity_key=key)
        trailing = attr(stun.SOFTWARE, b"late") + attr(stun.XOR_PEER_ADDRESS, b"\x00\x07") + attr(0x0042, b"?")
        data = signed + trailing
        data = data[:2] + struct.pack(">H", len(data) - 20) + data[4:]
        message = stun.decode(data)
        self.assertEqual([t for t, _ in message.attributes], [stun.USERNAME, stun.MESSAGE_INTEGRITY])
        self.assertEqual(message.unknown_required, ())
        self.assertTrue(stun.check_integrity(message, key))
        # FINGERPRINT after them is still verified.
        self.assertTrue(stun.decode(with_fingerprint(data)).has_fingerprint)
        broken = with_fingerprint(data)
        self.assert_dropped(broken[:-1] + bytes([broken[-1] ^ 0xFF]))

    def test_sha256_after_message_integrity(self) -> None:
        both = self.encode([(stun.USERNAME, "alice")], integrity_key=b"k1", integrity_sha256_key=b"k2", fingerprint=True)
        message = stun.decode(both)
        self.assertEqual(
            [t for t, _ in message.attributes], [stun.USERNAME, stun.MESSAGE_INTEGRITY, stun.MESSAGE_INTEGRITY_SHA256]
        )
        self.assertTrue(stun.check_integrity(message, b"k1"))
        self.assertTrue(stun.check_integrity_sha256(message, b"k2"))
        # After MESSAGE-INTEGRITY-SHA256 even MESSAGE-INTEGRITY is ignored (RFC 8489 §14.6).
        sha_first = self.encode([(stun.USERNAME, "alice")], integrity_sha256_key=b"k2")
        data = sha_first + attr(stun.MESSAGE_INTEGRITY, b"m" * 20) + attr(stun.USERNAME, b"mallory")
        data = data[:2] + struct.pack(">H", len(data) - 20) + data[4:]
        message = stun.decode(data)
        self.assertEqual([t for t, _ in message.attributes], [stun.USERNAME, stun.MESSAGE_INTEGRITY_SHA256])
        self.assertEqual(message.integrity_offset, -1)
        self.assertFalse(stun.check_integrity(message, b"k1"))
        self.assertTrue(stun.check_integrity_sha256(message, b"k2"))

    def test_unknown_attributes(self) -> None:
        message = stun.decode(
            self.encode([(0x0042, b"a"), (0x8042, b"b"), (0x7FFF, b""), (0xFFFF, b"c"), (0x0042, b"d")])
        )
        self.assertEqual(message.unknown_required, (0x0042, 0x7FFF, 0x0042))
        self.assertEqual(
            message.attributes, [(0x0042, b"a"), (0x8042, b"b"), (0x7FFF, b""), (0xFFFF, b"c"), (0x0042, b"d")]
        )
        self.assertTrue(stun.is_comprehension_required(0x7FFF))
        self.assertFalse(stun.is_comprehension_required(0x8000))

    def test_duplicates_in_order(self) -> None:
        peers = [("192.0.2.1", 1), ("2001:db8::1", 2), ("192.0.2.1", 1)]
        message = stun.decode(
            self.encode([(stun.XOR_PEER_ADDRESS, p) for p in peers[:2]] + [(stun.LIFETIME, 5), (stun.XOR_PEER_ADDRESS, peers[2])])
        )
        self.assertEqual(message.get_all(stun.XOR_PEER_ADDRESS), peers)
        self.assertEqual(message.get(stun.XOR_PEER_ADDRESS), peers[0])
        self.assertEqual([t for t, _ in message.attributes], [0x12, 0x12, 0x0D, 0x12])

    def test_message_accessors(self) -> None:
        message = stun.decode(
            self.encode([(stun.USERNAME, "u"), (stun.LIFETIME, 7), (stun.EVEN_PORT, True), (stun.DATA, b"d")])
        )
        self.assertEqual(message.get_str(stun.USERNAME), "u")
        self.assertIsNone(message.get_str(stun.LIFETIME))
        self.assertEqual(message.get_int(stun.LIFETIME), 7)
        self.assertIsNone(message.get_int(stun.EVEN_PORT))  # a bool is not an int here
        self.assertEqual(message.get_bytes(stun.DATA), b"d")
        self.assertIsNone(message.get_address(stun.DATA))
        self.assertIsNone(message.get(stun.REALM))
        self.assertTrue(message.has(stun.DATA))
        self.assertFalse(message.has(stun.REALM))
        self.assertIn("0x003", repr(message))


class EncodedConstantTests(SynchronousTestCase):
    """``encode`` keeps the encoded ERROR-CODE, REALM, SOFTWARE and
    PASSWORD-ALGORITHMS it has seen (``_encoded_constants``): the bytes are
    those of the plain encoder, a value is encoded once, the store is
    bounded, and an invalid value still raises."""

    def setUp(self) -> None:
        saved = dict(stun._encoded_constants)
        stun._encoded_constants.clear()
        self.addCleanup(lambda: (stun._encoded_constants.clear(), stun._encoded_constants.update(saved)))

    @staticmethod
    def plain(attributes: List[Tuple[int, object]]) -> bytes:
        body = b""
        for atype, value in attributes:
            raw = CODECS[atype][1](value, b"T" * 12)
            body += struct.pack("!HH", atype, len(raw)) + raw + b"\0" * (-len(raw) % 4)
        return struct.pack("!HHI", 0x0113, len(body), 0x2112A442) + b"T" * 12 + body

    def test_the_bytes_are_the_encoders_and_each_value_is_encoded_once(self) -> None:
        calls: List[object] = []
        encoder = stun._ENCODERS[stun.ERROR_CODE]

        def counting(value: object, tid: bytes) -> bytes:
            calls.append(value)
            return encoder(value, tid)

        self.patch(stun, "_ENCODERS", dict(stun._ENCODERS))
        stun._ENCODERS[stun.ERROR_CODE] = counting
        attributes: List[Tuple[int, object]] = [
            (stun.ERROR_CODE, (401, "Unauthorized")),
            (stun.REALM, "firezone"),
            (stun.SOFTWARE, "relay 1"),
            (stun.PASSWORD_ALGORITHMS, auth.PASSWORD_ALGORITHMS),
            (stun.NONCE, "abc"),
        ]
        for _ in range(3):
            data = stun.encode(stun.ALLOCATE, stun.ERROR, b"T" * 12, attributes)
            self.assertEqual(data, self.plain(attributes))
        self.assertEqual(calls, [(401, "Unauthorized")])
        other = stun.encode(stun.ALLOCATE, stun.ERROR, b"T" * 12, [(stun.ERROR_CODE, (438, "Stale Nonce"))])
        self.assertEqual(stun.decode(other).get(stun.ERROR_CODE), (438, "Stale Nonce"))

    def test_bounded_and_invalid_values_still_raise(self) -> None:
        for i in range(stun._ENCODED_CONSTANTS_MAX + 50):
            data = stun.encode(stun.BINDING, stun.SUCCESS, b"T" * 12, [(stun.SOFTWARE, "s%d" % i)])
            self.assertEqual(stun.decode(data).get_str(stun.SOFTWARE), "s%d" % i)
        self.assertEqual(len(stun._encoded_constants), stun._ENCODED_CONSTANTS_MAX)
        with self.assertRaises(ValueError):
            stun.encode(stun.ALLOCATE, stun.ERROR, b"T" * 12, [(stun.ERROR_CODE, (200, "OK"))])
        with self.assertRaises(TypeError):
            stun.encode(stun.ALLOCATE, stun.ERROR, b"T" * 12, [(stun.ERROR_CODE, [401, "Unauthorized"])])
        with self.assertRaises(ValueError):
            stun.encode(stun.BINDING, stun.SUCCESS, b"T" * 12, [(stun.SOFTWARE, "x" * 70000)])
