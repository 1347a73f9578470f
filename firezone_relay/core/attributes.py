"""STUN attribute values: one decoder and one encoder per value shape.

``CODECS`` (at the end) maps each attribute type to a pair from here;
``stun.decode`` and ``stun.encode`` are the only callers.  A decoder takes
the value bytes and the transaction ID (for the XOR-ed addresses) and returns
the plain Python value listed below, or raises ``AttributeValueError``; an
encoder is its inverse.

Attribute values are decoded eagerly into plain Python values so that a
malformed message is rejected as a whole, never half-read:

==========================  =========================================
attribute                   value
==========================  =========================================
addresses (MAPPED, XOR-*,   ``(ip, port)`` with ``ip`` as text
ALTERNATE-SERVER)
USERNAME, REALM, NONCE,     ``str``
SOFTWARE
USERHASH, DATA,             ``bytes``
RESERVATION-TOKEN,
MESSAGE-INTEGRITY(-SHA256)
ERROR-CODE                  ``(code, reason)``
ADDRESS-ERROR-CODE          ``(family, code, reason)``
UNKNOWN-ATTRIBUTES          ``tuple`` of attribute types
LIFETIME, FINGERPRINT,      ``int``
CHANNEL-NUMBER,
REQUESTED-TRANSPORT,
REQUESTED-/ADDITIONAL-
ADDRESS-FAMILY
EVEN-PORT                   ``bool`` (the R bit)
DONT-FRAGMENT               ``True``
PASSWORD-ALGORITHM          ``(algorithm, parameters)``
PASSWORD-ALGORITHMS         ``tuple`` of ``(algorithm, parameters)``
anything else               the raw value ``bytes``
==========================  =========================================
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Callable, Sequence, Tuple

from .iana import ADDITIONAL_ADDRESS_FAMILY, ADDRESS_ERROR_CODE, ALTERNATE_SERVER, CHANNEL_NUMBER, DATA, DONT_FRAGMENT
from .iana import ERROR_CODE, EVEN_PORT, FINGERPRINT, LIFETIME, MAPPED_ADDRESS, MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256
from .iana import NONCE, PASSWORD_ALGORITHM, PASSWORD_ALGORITHMS, REALM, REQUESTED_ADDRESS_FAMILY, REQUESTED_TRANSPORT
from .iana import RESERVATION_TOKEN, SOFTWARE, UNKNOWN_ATTRIBUTES, USERHASH, USERNAME, XOR_MAPPED_ADDRESS
from .iana import XOR_PEER_ADDRESS, XOR_RELAYED_ADDRESS

#: RFC 8489 §5: the length of the message header.
HEADER_LENGTH = 20
#: RFC 8489 §5: the magic cookie, which also masks XOR-ed addresses (§14.2).
MAGIC_COOKIE = 0x2112A442
_MAGIC_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_XPORT = MAGIC_COOKIE >> 16

# Address family codes used on the wire.
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

# Length limits (RFC 8489 §14): in bytes of UTF-8.
MAX_USERNAME = 512
MAX_TEXT = 763

#: Entries a PASSWORD-ALGORITHMS or UNKNOWN-ATTRIBUTES value may hold: RFC 8489
#: defines two password algorithms, and a message holds at most
#: ``stun.MAX_ATTRIBUTES`` (64) attribute types to call unknown.
MAX_LIST_ENTRIES = 8
MAX_UNKNOWN_ENTRIES = 64

Address = Tuple[str, int]
Decoder = Callable[[bytes, bytes], object]
Encoder = Callable[[object, bytes], bytes]

ATTR_HEADER = struct.Struct(">HH")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
_H8 = struct.Struct(">8H")


class AttributeValueError(Exception):
    """One attribute value is malformed (``stun.decode`` turns it into a 400)."""


# --- addresses -----------------------------------------------------------


_OCTETS = {text: i for i, text in enumerate(str(i) for i in range(256))}


def pack_ip(ip: str) -> bytes:
    if ":" in ip:
        return ipaddress.IPv6Address(ip).packed
    parts = ip.split(".")
    if len(parts) == 4:
        octets = _OCTETS
        try:
            return bytes((octets[parts[0]], octets[parts[1]], octets[parts[2]], octets[parts[3]]))
        except KeyError:
            pass
    raise ValueError("not an IPv4 address: %r" % (ip,))


#: Decimal text of every byte value: joining four of these is the fastest
#: way CPython has to format an IPv4 address (about 4x ``"%d.%d.%d.%d"``).
_DECIMAL = tuple(str(i) for i in range(256))


def unpack_ip4(raw: bytes) -> str:
    d = _DECIMAL
    return ".".join((d[raw[0]], d[raw[1]], d[raw[2]], d[raw[3]]))


#: ``:0:`` runs from longest to shortest (RFC 5952 §4.2: the longest run of
#: two or more zero groups becomes ``::``, the first one on a tie).
_ZERO_RUNS = tuple(":" + "0:" * k for k in range(8, 1, -1))


def unpack_ip6(raw: bytes) -> str:
    """RFC 5952 text of 16 bytes, exactly as ``ipaddress.IPv6Address(raw).compressed``.

    About 3x cheaper than the ``ipaddress`` module, which matters because a
    hostile request may carry dozens of IPv6 addresses (SPEC §1).
    """
    text = ":%x:%x:%x:%x:%x:%x:%x:%x:" % _H8.unpack(raw)
    for run in _ZERO_RUNS:
        i = text.find(run)
        if i >= 0:
            text = text[:i] + "::" + text[i + len(run) :]
            break
    if text[1] != ":":
        text = text[1:]
    if text[-2] != ":":
        text = text[:-1]
    return text


def decode_address(value: bytes, tid: bytes) -> Address:
    n = len(value)
    if n == 8 and value[1] == FAMILY_IPV4:
        return (unpack_ip4(value[4:8]), (value[2] << 8) | value[3])
    if n == 20 and value[1] == FAMILY_IPV6:
        return (unpack_ip6(value[4:20]), (value[2] << 8) | value[3])
    raise AttributeValueError("bad address")


def encode_address(addr: object, tid: bytes) -> bytes:
    ip, port = as_address(addr)
    if ":" in ip:
        return b"\x00\x02" + U16.pack(port) + pack_ip(ip)
    return b"\x00\x01" + U16.pack(port) + pack_ip(ip)


def _xor_mask(tid: bytes, length: int) -> bytes:
    return (_MAGIC_BYTES + tid)[:length]


def decode_xor_address(value: bytes, tid: bytes) -> Address:
    n = len(value)
    if n == 8 and value[1] == FAMILY_IPV4:
        d = _DECIMAL
        ip = ".".join((d[value[4] ^ 0x21], d[value[5] ^ 0x12], d[value[6] ^ 0xA4], d[value[7] ^ 0x42]))
        return (ip, ((value[2] << 8) | value[3]) ^ _XPORT)
    if n == 20 and value[1] == FAMILY_IPV6:
        x = int.from_bytes(value[4:20], "big") ^ int.from_bytes(_MAGIC_BYTES + tid, "big")
        return (unpack_ip6(x.to_bytes(16, "big")), ((value[2] << 8) | value[3]) ^ _XPORT)
    raise AttributeValueError("bad xor address")


def encode_xor_address(addr: object, tid: bytes) -> bytes:
    ip, port = as_address(addr)
    packed = pack_ip(ip)
    if len(packed) == 4:
        return bytes(
            (0, 1, (port >> 8) ^ 0x21, (port & 0xFF) ^ 0x12, packed[0] ^ 0x21, packed[1] ^ 0x12, packed[2] ^ 0xA4, packed[3] ^ 0x42)
        )
    mask = _xor_mask(tid, len(packed))
    xored = (int.from_bytes(packed, "big") ^ int.from_bytes(mask, "big")).to_bytes(len(packed), "big")
    family = b"\x00\x02" if len(packed) == 16 else b"\x00\x01"
    return family + U16.pack(port ^ _XPORT) + xored


def as_address(addr: object) -> Address:
    if not (isinstance(addr, tuple) and len(addr) == 2):
        raise TypeError("an address is an (ip, port) tuple")
    ip, port = addr
    if not isinstance(ip, str) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise TypeError("an address is an (ip, port) tuple")
    return ip, port


# --- text, bytes, integers -----------------------------------------------


def _from_utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise AttributeValueError("%s is not UTF-8" % what) from None


def _to_utf8(text: str, limit: int, what: str) -> bytes:
    """``text`` in UTF-8, at most ``limit`` bytes (the limits count bytes)."""
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise ValueError("%s too long" % what)
    return raw


def text_codec(limit: int) -> Tuple[Decoder, Encoder]:
    def decode(value: bytes, tid: bytes) -> str:
        if len(value) > limit:
            raise AttributeValueError("text too long")
        return _from_utf8(value, "text")

    def encode(text: object, tid: bytes) -> bytes:
        if not isinstance(text, str):
            raise TypeError("expected str")
        return _to_utf8(text, limit, "text")

    return decode, encode


def fixed_bytes_codec(
    lengths: Sequence[int],
) -> Tuple[Decoder, Encoder]:
    def decode(value: bytes, tid: bytes) -> bytes:
        if len(value) not in lengths:
            raise AttributeValueError("bad length")
        return value

    def encode(value: object, tid: bytes) -> bytes:
        if not isinstance(value, (bytes, bytearray)) or len(value) not in lengths:
            raise ValueError("bad length")
        return bytes(value)

    return decode, encode


def decode_any_bytes(value: bytes, tid: bytes) -> bytes:
    return value


def encode_any_bytes(value: object, tid: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("expected bytes")
    return bytes(value)


def decode_u32(value: bytes, tid: bytes) -> int:
    if len(value) != 4:
        raise AttributeValueError("bad length")
    return int.from_bytes(value, "big")


def encode_u32(value: object, tid: bytes) -> bytes:
    if not isinstance(value, int):
        raise TypeError("expected int")
    return U32.pack(value)


def decode_first_byte(value: bytes, tid: bytes) -> int:
    """One byte followed by three reserved bytes (REQUESTED-TRANSPORT, *-ADDRESS-FAMILY)."""
    if len(value) != 4:
        raise AttributeValueError("bad length")
    return value[0]


def encode_first_byte(value: object, tid: bytes) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 255:
        raise TypeError("expected a byte value")
    return bytes((value, 0, 0, 0))


def decode_channel_number(value: bytes, tid: bytes) -> int:
    if len(value) != 4:
        raise AttributeValueError("bad length")
    return (value[0] << 8) | value[1]


def encode_channel_number(value: object, tid: bytes) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise TypeError("expected a 16-bit channel number")
    return U16.pack(value) + b"\x00\x00"


def decode_error_code(value: bytes, tid: bytes) -> Tuple[int, str]:
    if len(value) < 4 or len(value) > 4 + MAX_TEXT:
        raise AttributeValueError("bad length")
    klass = value[2] & 0x07
    number = value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise AttributeValueError("bad error code")
    return (klass * 100 + number, _from_utf8(value[4:], "reason"))


def encode_error_code(value: object, tid: bytes) -> bytes:
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError("expected (code, reason)")
    code, reason = value
    if not isinstance(code, int) or not 300 <= code <= 699 or not isinstance(reason, str):
        raise ValueError("bad error code")
    return bytes((0, 0, code // 100, code % 100)) + _to_utf8(reason, MAX_TEXT, "reason phrase")


def decode_address_error_code(value: bytes, tid: bytes) -> Tuple[int, int, str]:
    if len(value) < 4:
        raise AttributeValueError("bad length")
    family = value[0]
    code, reason = decode_error_code(b"\x00\x00" + value[2:], tid)
    return (family, code, reason)


def encode_address_error_code(value: object, tid: bytes) -> bytes:
    if not isinstance(value, tuple) or len(value) != 3:
        raise TypeError("expected (family, code, reason)")
    family, code, reason = value
    if not isinstance(family, int) or not 0 <= family <= 255:
        raise ValueError("bad family")
    return bytes((family, 0)) + encode_error_code((code, reason), tid)[2:]


def decode_unknown_attributes(value: bytes, tid: bytes) -> Tuple[int, ...]:
    if len(value) & 1:
        raise AttributeValueError("odd length")
    if len(value) > 2 * MAX_UNKNOWN_ENTRIES:
        raise AttributeValueError("too many entries")
    return struct.unpack(">%dH" % (len(value) // 2), value)


def encode_unknown_attributes(value: object, tid: bytes) -> bytes:
    if not isinstance(value, tuple):
        raise TypeError("expected a tuple of attribute types")
    return b"".join(U16.pack(t) for t in value)


def decode_even_port(value: bytes, tid: bytes) -> bool:
    if len(value) != 1:
        raise AttributeValueError("bad length")
    return bool(value[0] & 0x80)


def encode_even_port(value: object, tid: bytes) -> bytes:
    if not isinstance(value, bool):
        raise TypeError("expected bool")
    return b"\x80" if value else b"\x00"


def decode_flag(value: bytes, tid: bytes) -> bool:
    if value:
        raise AttributeValueError("must be empty")
    return True


def encode_flag(value: object, tid: bytes) -> bytes:
    if value is not True:
        raise TypeError("a flag attribute's value is True")
    return b""


def _decode_one_algorithm(value: bytes, pos: int) -> Tuple[Tuple[int, bytes], int]:
    if pos + 4 > len(value):
        raise AttributeValueError("truncated algorithm")
    alg, plen = ATTR_HEADER.unpack_from(value, pos)
    end = pos + 4 + plen
    if end > len(value):
        raise AttributeValueError("truncated algorithm parameters")
    return (alg, value[pos + 4 : end]), pos + 4 + ((plen + 3) & ~3)


def decode_password_algorithm(value: bytes, tid: bytes) -> Tuple[int, bytes]:
    alg, end = _decode_one_algorithm(value, 0)
    if end < len(value):
        raise AttributeValueError("trailing bytes")
    return alg


def _encode_one_algorithm(value: object) -> bytes:
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError("expected (algorithm, parameters)")
    alg, params = value
    if not isinstance(alg, int) or not isinstance(params, bytes):
        raise TypeError("expected (algorithm, parameters)")
    return ATTR_HEADER.pack(alg, len(params)) + params + b"\x00" * (-len(params) % 4)


def encode_password_algorithm(value: object, tid: bytes) -> bytes:
    return _encode_one_algorithm(value)


def decode_password_algorithms(value: bytes, tid: bytes) -> Tuple[Tuple[int, bytes], ...]:
    n = len(value)
    if not n & 3 and n <= 4 * MAX_LIST_ENTRIES:
        # The usual case, parameters all empty: one C call, no loop of calls.
        words = struct.unpack(">%dH" % (n >> 1), value)
        if not any(words[1::2]):
            return tuple([(alg, b"") for alg in words[0::2]])
    out: list[Tuple[int, bytes]] = []
    pos = 0
    # A last parameter block without its padding is accepted, as in
    # PASSWORD-ALGORITHM: ``_decode_one_algorithm`` already checked that its
    # parameters lie within the value.
    while pos < len(value):
        if len(out) == MAX_LIST_ENTRIES:
            raise AttributeValueError("too many algorithms")
        alg, pos = _decode_one_algorithm(value, pos)
        out.append(alg)
    return tuple(out)


def encode_password_algorithms(value: object, tid: bytes) -> bytes:
    if not isinstance(value, tuple):
        raise TypeError("expected a tuple of (algorithm, parameters)")
    # The relay's one list is kept encoded by ``stun.encode`` (its constants cache).
    return b"".join(_encode_one_algorithm(v) for v in value)


def decode_mi_sha256(value: bytes, tid: bytes) -> bytes:
    if not 16 <= len(value) <= 32 or len(value) & 3:
        raise AttributeValueError("bad length")
    return value


# --- the codec of each attribute type --------------------------------------

_username = text_codec(MAX_USERNAME)
_text = text_codec(MAX_TEXT)
_mi = fixed_bytes_codec((20,))
_mi256_encode = fixed_bytes_codec(tuple(range(16, 33, 4)))[1]

CODECS: dict[int, Tuple[Decoder, Encoder]] = {
    MAPPED_ADDRESS: (decode_address, encode_address),
    ALTERNATE_SERVER: (decode_address, encode_address),
    XOR_MAPPED_ADDRESS: (decode_xor_address, encode_xor_address),
    XOR_PEER_ADDRESS: (decode_xor_address, encode_xor_address),
    XOR_RELAYED_ADDRESS: (decode_xor_address, encode_xor_address),
    USERNAME: _username,
    REALM: _text,
    NONCE: _text,
    SOFTWARE: _text,
    USERHASH: fixed_bytes_codec((32,)),
    MESSAGE_INTEGRITY: _mi,
    MESSAGE_INTEGRITY_SHA256: (decode_mi_sha256, _mi256_encode),
    PASSWORD_ALGORITHM: (decode_password_algorithm, encode_password_algorithm),
    PASSWORD_ALGORITHMS: (decode_password_algorithms, encode_password_algorithms),
    FINGERPRINT: (decode_u32, encode_u32),
    ERROR_CODE: (decode_error_code, encode_error_code),
    ADDRESS_ERROR_CODE: (decode_address_error_code, encode_address_error_code),
    UNKNOWN_ATTRIBUTES: (decode_unknown_attributes, encode_unknown_attributes),
    LIFETIME: (decode_u32, encode_u32),
    REQUESTED_TRANSPORT: (decode_first_byte, encode_first_byte),
    REQUESTED_ADDRESS_FAMILY: (decode_first_byte, encode_first_byte),
    ADDITIONAL_ADDRESS_FAMILY: (decode_first_byte, encode_first_byte),
    CHANNEL_NUMBER: (decode_channel_number, encode_channel_number),
    DATA: (decode_any_bytes, encode_any_bytes),
    EVEN_PORT: (decode_even_port, encode_even_port),
    RESERVATION_TOKEN: fixed_bytes_codec((8,)),
    DONT_FRAGMENT: (decode_flag, encode_flag),
}
