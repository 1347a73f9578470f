"""STUN (RFC 8489) and TURN (RFC 8656) wire codec.

Pure functions over bytes.  ``decode`` turns one datagram into a
:class:`Message` or raises :class:`StunDecodeError`, never anything else;
``encode`` turns a method, class, transaction id and an ordered attribute list
into bytes, optionally signed (MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256)
and fingerprinted.

Decoding is linear in the datagram and bounded (SPEC §1): at most
``MAX_ATTRIBUTES`` attribute headers are read (a longer message is rejected,
a request with a 400), list-valued attributes hold a bounded number of
entries, and IPv6 addresses are formatted without the ``ipaddress`` module.

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

import hashlib
import hmac
import ipaddress
import struct
import zlib
from typing import Callable, Iterable, Optional, Sequence, Tuple

MAGIC_COOKIE = 0x2112A442
_MAGIC_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
HEADER_LENGTH = 20
FINGERPRINT_XOR = 0x5354554E

# Classes.
REQUEST = 0
INDICATION = 1
SUCCESS = 2
ERROR = 3

# Methods.
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA_METHOD = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

METHOD_NAMES = {
    BINDING: "binding",
    ALLOCATE: "allocate",
    REFRESH: "refresh",
    SEND: "send",
    DATA_METHOD: "data",
    CREATE_PERMISSION: "createpermission",
    CHANNEL_BIND: "channelbind",
}

# Attributes.
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
REQUESTED_TRANSPORT = 0x0019
DONT_FRAGMENT = 0x001A
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
RESERVATION_TOKEN = 0x0022
ADDITIONAL_ADDRESS_FAMILY = 0x8000
ADDRESS_ERROR_CODE = 0x8001
PASSWORD_ALGORITHMS = 0x8002
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028

# Address family codes used on the wire.
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

# PASSWORD-ALGORITHM values (RFC 8489 §18.5).
ALGORITHM_MD5 = 0x0001
ALGORITHM_SHA256 = 0x0002

# Length limits (RFC 8489 §14): in bytes of UTF-8.
_MAX_USERNAME = 512
_MAX_TEXT = 763

REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}

Address = Tuple[str, int]
AttributeValue = object
Attribute = Tuple[int, AttributeValue]

_HEADER = struct.Struct(">HHI")
_ATTR_HEADER = struct.Struct(">HH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_H8 = struct.Struct(">8H")
_XPORT = 0x2112

#: Decoding bounds (SPEC §1): a message with more attributes than this is
#: rejected after reading exactly this many attribute headers, so the cost of
#: a decode is bounded whatever the datagram's size.
MAX_ATTRIBUTES = 64
#: Entries a PASSWORD-ALGORITHMS or UNKNOWN-ATTRIBUTES value may hold: RFC 8489
#: defines two password algorithms, and a message holds at most
#: ``MAX_ATTRIBUTES`` attribute types to call unknown.
_MAX_LIST_ENTRIES = 8
_MAX_UNKNOWN_ENTRIES = MAX_ATTRIBUTES


class StunDecodeError(Exception):
    """The bytes are not a valid STUN message.

    When the header was readable, ``method``, ``msg_class`` and
    ``transaction_id`` are set; ``error_code`` is the error a server should
    answer a request with (400 for a malformed attribute), or ``None`` when
    the datagram must be dropped without a reply.
    """

    def __init__(
        self,
        reason: str,
        error_code: Optional[int] = None,
        method: Optional[int] = None,
        msg_class: Optional[int] = None,
        transaction_id: Optional[bytes] = None,
        username: Optional[str] = None,
        drop_reason: str = "malformed",
    ) -> None:
        super().__init__(reason)
        #: The label a server counts this datagram under.
        self.drop_reason = drop_reason
        #: The USERNAME decoded before the malformed attribute, if any, so a
        #: server can still sign its 400.
        self.username = username
        self.reason = reason
        self.error_code = error_code
        self.method = method
        self.msg_class = msg_class
        self.transaction_id = transaction_id


class _AttributeError(Exception):
    """Internal: one attribute value is malformed."""


def message_type(method: int, msg_class: int) -> int:
    """The 14-bit STUN message type for ``method`` and ``msg_class``."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((msg_class & 1) << 4)
        | ((msg_class & 2) << 7)
    )


def split_message_type(mtype: int) -> Tuple[int, int]:
    """``(method, class)`` of a 14-bit STUN message type."""
    msg_class = ((mtype >> 4) & 1) | ((mtype >> 7) & 2)
    method = (mtype & 0x000F) | ((mtype >> 1) & 0x0070) | ((mtype >> 2) & 0x0F80)
    return method, msg_class


# --- addresses -----------------------------------------------------------


def ip_family(ip: str) -> int:
    """4 or 6."""
    return 6 if ":" in ip else 4


_OCTETS = {text: i for i, text in enumerate(str(i) for i in range(256))}


def _pack_ip(ip: str) -> bytes:
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


def _unpack_ip4(raw: bytes) -> str:
    d = _DECIMAL
    return ".".join((d[raw[0]], d[raw[1]], d[raw[2]], d[raw[3]]))


#: ``:0:`` runs from longest to shortest (RFC 5952 §4.2: the longest run of
#: two or more zero groups becomes ``::``, the first one on a tie).
_ZERO_RUNS = tuple(":" + "0:" * k for k in range(8, 1, -1))


def _unpack_ip6(raw: bytes) -> str:
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


def _decode_address(value: bytes, tid: bytes) -> Address:
    n = len(value)
    if n == 8 and value[1] == FAMILY_IPV4:
        return (_unpack_ip4(value[4:8]), (value[2] << 8) | value[3])
    if n == 20 and value[1] == FAMILY_IPV6:
        return (_unpack_ip6(value[4:20]), (value[2] << 8) | value[3])
    raise _AttributeError("bad address")


def _encode_address(addr: object, tid: bytes) -> bytes:
    ip, port = _as_address(addr)
    if ":" in ip:
        return b"\x00\x02" + _U16.pack(port) + _pack_ip(ip)
    return b"\x00\x01" + _U16.pack(port) + _pack_ip(ip)


def _xor_mask(tid: bytes, length: int) -> bytes:
    return (_MAGIC_BYTES + tid)[:length]


def _decode_xor_address(value: bytes, tid: bytes) -> Address:
    n = len(value)
    if n == 8 and value[1] == FAMILY_IPV4:
        d = _DECIMAL
        ip = ".".join((d[value[4] ^ 0x21], d[value[5] ^ 0x12], d[value[6] ^ 0xA4], d[value[7] ^ 0x42]))
        return (ip, ((value[2] << 8) | value[3]) ^ _XPORT)
    if n == 20 and value[1] == FAMILY_IPV6:
        x = int.from_bytes(value[4:20], "big") ^ int.from_bytes(_MAGIC_BYTES + tid, "big")
        return (_unpack_ip6(x.to_bytes(16, "big")), ((value[2] << 8) | value[3]) ^ _XPORT)
    raise _AttributeError("bad xor address")


def _encode_xor_address(addr: object, tid: bytes) -> bytes:
    ip, port = _as_address(addr)
    packed = _pack_ip(ip)
    if len(packed) == 4:
        return bytes(
            (0, 1, (port >> 8) ^ 0x21, (port & 0xFF) ^ 0x12, packed[0] ^ 0x21, packed[1] ^ 0x12, packed[2] ^ 0xA4, packed[3] ^ 0x42)
        )
    mask = _xor_mask(tid, len(packed))
    xored = (int.from_bytes(packed, "big") ^ int.from_bytes(mask, "big")).to_bytes(len(packed), "big")
    family = b"\x00\x02" if len(packed) == 16 else b"\x00\x01"
    return family + _U16.pack(port ^ _XPORT) + xored


def _as_address(addr: object) -> Address:
    if not (isinstance(addr, tuple) and len(addr) == 2):
        raise TypeError("an address is an (ip, port) tuple")
    ip, port = addr
    if not isinstance(ip, str) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise TypeError("an address is an (ip, port) tuple")
    return ip, port


# --- text, bytes, integers -----------------------------------------------


def _text_codec(limit: int) -> Tuple[Callable[[bytes, bytes], object], Callable[[object, bytes], bytes]]:
    def decode(value: bytes, tid: bytes) -> str:
        if len(value) > limit:
            raise _AttributeError("text too long")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _AttributeError("text is not UTF-8") from None

    def encode(text: object, tid: bytes) -> bytes:
        if not isinstance(text, str):
            raise TypeError("expected str")
        raw = text.encode("utf-8")
        if len(raw) > limit:
            raise ValueError("text too long")
        return raw

    return decode, encode


def _fixed_bytes_codec(
    lengths: Sequence[int],
) -> Tuple[Callable[[bytes, bytes], object], Callable[[object, bytes], bytes]]:
    def decode(value: bytes, tid: bytes) -> bytes:
        if len(value) not in lengths:
            raise _AttributeError("bad length")
        return value

    def encode(value: object, tid: bytes) -> bytes:
        if not isinstance(value, (bytes, bytearray)) or len(value) not in lengths:
            raise ValueError("bad length")
        return bytes(value)

    return decode, encode


def _decode_any_bytes(value: bytes, tid: bytes) -> bytes:
    return value


def _encode_any_bytes(value: object, tid: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError("expected bytes")
    return bytes(value)


def _decode_u32(value: bytes, tid: bytes) -> int:
    if len(value) != 4:
        raise _AttributeError("bad length")
    return int.from_bytes(value, "big")


def _encode_u32(value: object, tid: bytes) -> bytes:
    if not isinstance(value, int):
        raise TypeError("expected int")
    return _U32.pack(value)


def _decode_first_byte(value: bytes, tid: bytes) -> int:
    """One byte followed by three reserved bytes (REQUESTED-TRANSPORT, *-ADDRESS-FAMILY)."""
    if len(value) != 4:
        raise _AttributeError("bad length")
    return value[0]


def _encode_first_byte(value: object, tid: bytes) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 255:
        raise TypeError("expected a byte value")
    return bytes((value, 0, 0, 0))


def _decode_channel_number(value: bytes, tid: bytes) -> int:
    if len(value) != 4:
        raise _AttributeError("bad length")
    return (value[0] << 8) | value[1]


def _encode_channel_number(value: object, tid: bytes) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise TypeError("expected a 16-bit channel number")
    return _U16.pack(value) + b"\x00\x00"


def _decode_error_code(value: bytes, tid: bytes) -> Tuple[int, str]:
    if len(value) < 4 or len(value) > 4 + _MAX_TEXT:
        raise _AttributeError("bad length")
    klass = value[2] & 0x07
    number = value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise _AttributeError("bad error code")
    try:
        reason = value[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise _AttributeError("reason is not UTF-8") from None
    return (klass * 100 + number, reason)


def _encode_error_code(value: object, tid: bytes) -> bytes:
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError("expected (code, reason)")
    code, reason = value
    if not isinstance(code, int) or not 300 <= code <= 699 or not isinstance(reason, str):
        raise ValueError("bad error code")
    raw = reason.encode("utf-8")
    if len(raw) > _MAX_TEXT:
        raise ValueError("reason phrase too long")
    return bytes((0, 0, code // 100, code % 100)) + raw


def _decode_address_error_code(value: bytes, tid: bytes) -> Tuple[int, int, str]:
    if len(value) < 4:
        raise _AttributeError("bad length")
    family = value[0]
    code, reason = _decode_error_code(b"\x00\x00" + value[2:], tid)
    return (family, code, reason)


def _encode_address_error_code(value: object, tid: bytes) -> bytes:
    if not isinstance(value, tuple) or len(value) != 3:
        raise TypeError("expected (family, code, reason)")
    family, code, reason = value
    if not isinstance(family, int) or not 0 <= family <= 255:
        raise ValueError("bad family")
    return bytes((family, 0)) + _encode_error_code((code, reason), tid)[2:]


def _decode_unknown_attributes(value: bytes, tid: bytes) -> Tuple[int, ...]:
    if len(value) & 1:
        raise _AttributeError("odd length")
    if len(value) > 2 * _MAX_UNKNOWN_ENTRIES:
        raise _AttributeError("too many entries")
    return struct.unpack(">%dH" % (len(value) // 2), value)


def _encode_unknown_attributes(value: object, tid: bytes) -> bytes:
    if not isinstance(value, tuple):
        raise TypeError("expected a tuple of attribute types")
    return b"".join(_U16.pack(t) for t in value)


def _decode_even_port(value: bytes, tid: bytes) -> bool:
    if len(value) != 1:
        raise _AttributeError("bad length")
    return bool(value[0] & 0x80)


def _encode_even_port(value: object, tid: bytes) -> bytes:
    if not isinstance(value, bool):
        raise TypeError("expected bool")
    return b"\x80" if value else b"\x00"


def _decode_flag(value: bytes, tid: bytes) -> bool:
    if value:
        raise _AttributeError("must be empty")
    return True


def _encode_flag(value: object, tid: bytes) -> bytes:
    if value is not True:
        raise TypeError("a flag attribute's value is True")
    return b""


def _decode_one_algorithm(value: bytes, pos: int) -> Tuple[Tuple[int, bytes], int]:
    if pos + 4 > len(value):
        raise _AttributeError("truncated algorithm")
    alg, plen = _ATTR_HEADER.unpack_from(value, pos)
    end = pos + 4 + plen
    if end > len(value):
        raise _AttributeError("truncated algorithm parameters")
    return (alg, value[pos + 4 : end]), pos + 4 + ((plen + 3) & ~3)


def _decode_password_algorithm(value: bytes, tid: bytes) -> Tuple[int, bytes]:
    alg, end = _decode_one_algorithm(value, 0)
    if end < len(value):
        raise _AttributeError("trailing bytes")
    return alg


def _encode_one_algorithm(value: object) -> bytes:
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError("expected (algorithm, parameters)")
    alg, params = value
    if not isinstance(alg, int) or not isinstance(params, bytes):
        raise TypeError("expected (algorithm, parameters)")
    return _ATTR_HEADER.pack(alg, len(params)) + params + b"\x00" * (-len(params) % 4)


def _encode_password_algorithm(value: object, tid: bytes) -> bytes:
    return _encode_one_algorithm(value)


def _decode_password_algorithms(value: bytes, tid: bytes) -> Tuple[Tuple[int, bytes], ...]:
    n = len(value)
    if not n & 3 and n <= 4 * _MAX_LIST_ENTRIES:
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
        if len(out) == _MAX_LIST_ENTRIES:
            raise _AttributeError("too many algorithms")
        alg, pos = _decode_one_algorithm(value, pos)
        out.append(alg)
    return tuple(out)


def _encode_password_algorithms(value: object, tid: bytes) -> bytes:
    if not isinstance(value, tuple):
        raise TypeError("expected a tuple of (algorithm, parameters)")
    return b"".join(_encode_one_algorithm(v) for v in value)


def _decode_mi_sha256(value: bytes, tid: bytes) -> bytes:
    if not 16 <= len(value) <= 32 or len(value) & 3:
        raise _AttributeError("bad length")
    return value


_Decoder = Callable[[bytes, bytes], object]
_Encoder = Callable[[object, bytes], bytes]

_username = _text_codec(_MAX_USERNAME)
_text = _text_codec(_MAX_TEXT)
_mi = _fixed_bytes_codec((20,))
_mi256_encode = _fixed_bytes_codec(tuple(range(16, 33, 4)))[1]

CODECS: dict[int, Tuple[_Decoder, _Encoder]] = {
    MAPPED_ADDRESS: (_decode_address, _encode_address),
    ALTERNATE_SERVER: (_decode_address, _encode_address),
    XOR_MAPPED_ADDRESS: (_decode_xor_address, _encode_xor_address),
    XOR_PEER_ADDRESS: (_decode_xor_address, _encode_xor_address),
    XOR_RELAYED_ADDRESS: (_decode_xor_address, _encode_xor_address),
    USERNAME: _username,
    REALM: _text,
    NONCE: _text,
    SOFTWARE: _text,
    USERHASH: _fixed_bytes_codec((32,)),
    MESSAGE_INTEGRITY: _mi,
    MESSAGE_INTEGRITY_SHA256: (_decode_mi_sha256, _mi256_encode),
    PASSWORD_ALGORITHM: (_decode_password_algorithm, _encode_password_algorithm),
    PASSWORD_ALGORITHMS: (_decode_password_algorithms, _encode_password_algorithms),
    FINGERPRINT: (_decode_u32, _encode_u32),
    ERROR_CODE: (_decode_error_code, _encode_error_code),
    ADDRESS_ERROR_CODE: (_decode_address_error_code, _encode_address_error_code),
    UNKNOWN_ATTRIBUTES: (_decode_unknown_attributes, _encode_unknown_attributes),
    LIFETIME: (_decode_u32, _encode_u32),
    REQUESTED_TRANSPORT: (_decode_first_byte, _encode_first_byte),
    REQUESTED_ADDRESS_FAMILY: (_decode_first_byte, _encode_first_byte),
    ADDITIONAL_ADDRESS_FAMILY: (_decode_first_byte, _encode_first_byte),
    CHANNEL_NUMBER: (_decode_channel_number, _encode_channel_number),
    DATA: (_decode_any_bytes, _encode_any_bytes),
    EVEN_PORT: (_decode_even_port, _encode_even_port),
    RESERVATION_TOKEN: _fixed_bytes_codec((8,)),
    DONT_FRAGMENT: (_decode_flag, _encode_flag),
}

_DECODERS: dict[int, _Decoder] = {t: c[0] for t, c in CODECS.items()}
_ENCODERS: dict[int, _Encoder] = {t: c[1] for t, c in CODECS.items()}


_INTEGRITY_TYPES = frozenset((MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256))


def is_comprehension_required(attr_type: int) -> bool:
    return attr_type < 0x8000


# --- messages ------------------------------------------------------------


class Message:
    """A decoded STUN message.

    ``attributes`` is the ordered list of ``(type, value)`` pairs, duplicates
    included.  Attributes after MESSAGE-INTEGRITY (other than
    MESSAGE-INTEGRITY-SHA256 and FINGERPRINT) and after
    MESSAGE-INTEGRITY-SHA256 (other than FINGERPRINT) are not in the list:
    RFC 8489 §14.5–14.6 says to ignore them.
    """

    __slots__ = (
        "method",
        "msg_class",
        "transaction_id",
        "attributes",
        "raw",
        "integrity_offset",
        "integrity_sha256_offset",
        "has_fingerprint",
        "unknown_required",
    )

    def __init__(
        self,
        method: int,
        msg_class: int,
        transaction_id: bytes,
        attributes: list[Attribute],
        raw: bytes = b"",
        integrity_offset: int = -1,
        integrity_sha256_offset: int = -1,
        has_fingerprint: bool = False,
        unknown_required: Tuple[int, ...] = (),
    ) -> None:
        self.method = method
        self.msg_class = msg_class
        self.transaction_id = transaction_id
        self.attributes = attributes
        self.raw = raw
        self.integrity_offset = integrity_offset
        self.integrity_sha256_offset = integrity_sha256_offset
        self.has_fingerprint = has_fingerprint
        self.unknown_required = unknown_required

    def get(self, attr_type: int) -> object:
        """The value of the first attribute of this type, or ``None``."""
        for t, v in self.attributes:
            if t == attr_type:
                return v
        return None

    def get_all(self, attr_type: int) -> list[object]:
        return [v for t, v in self.attributes if t == attr_type]

    def get_str(self, attr_type: int) -> Optional[str]:
        v = self.get(attr_type)
        return v if isinstance(v, str) else None

    def get_int(self, attr_type: int) -> Optional[int]:
        v = self.get(attr_type)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def get_bytes(self, attr_type: int) -> Optional[bytes]:
        v = self.get(attr_type)
        return v if isinstance(v, bytes) else None

    def get_address(self, attr_type: int) -> Optional[Address]:
        v = self.get(attr_type)
        return v if isinstance(v, tuple) else None

    def has(self, attr_type: int) -> bool:
        for t, _ in self.attributes:
            if t == attr_type:
                return True
        return False

    def __repr__(self) -> str:
        return "Message(method=0x%03x, class=%d, tid=%s, attributes=%r)" % (
            self.method,
            self.msg_class,
            self.transaction_id.hex(),
            self.attributes,
        )


def decode(data: bytes) -> Message:
    """Decode one STUN message occupying all of ``data``.

    Raises :class:`StunDecodeError` (and nothing else) for malformed input.
    A FINGERPRINT, when present, must be the last attribute and correct.
    """
    try:
        return _decode(data)
    except StunDecodeError:
        raise
    except Exception as exc:  # pragma: no cover - defence in depth
        raise StunDecodeError("malformed: %s" % (exc,)) from None


def _decode(data: bytes) -> Message:
    if type(data) is not bytes:
        data = bytes(data)
    n = len(data)
    if n < HEADER_LENGTH:
        raise StunDecodeError("shorter than a STUN header")
    mtype, length, cookie = _HEADER.unpack_from(data)
    if mtype & 0xC000:
        raise StunDecodeError("not a STUN message (first bits)")
    if cookie != MAGIC_COOKIE:
        raise StunDecodeError("bad magic cookie")
    if length + HEADER_LENGTH != n:
        raise StunDecodeError("length field does not match the datagram")
    if length & 3:
        raise StunDecodeError("length is not a multiple of 4")
    tid = data[8:20]
    # split_message_type, inlined: this is the per-request hot path.
    method = (mtype & 0x000F) | ((mtype >> 1) & 0x0070) | ((mtype >> 2) & 0x0F80)
    msg_class = ((mtype >> 4) & 1) | ((mtype >> 7) & 2)

    attributes: list[Attribute] = []
    append = attributes.append
    decoders = _DECODERS
    unknown_required: list[int] = []
    mi_offset = -1
    mi256_offset = -1
    has_fingerprint = False
    ignoring = False  # after MESSAGE-INTEGRITY(-SHA256), RFC 8489 §14.5/14.6
    unpack_attr = _ATTR_HEADER.unpack_from
    pos = HEADER_LENGTH
    # Every attribute header read counts, ignored ones included: the loop
    # runs at most MAX_ATTRIBUTES times whatever the datagram holds (SPEC §1).
    remaining = MAX_ATTRIBUTES
    while pos < n:
        if not remaining:
            raise StunDecodeError(
                "more than %d attributes" % MAX_ATTRIBUTES,
                error_code=400,
                method=method,
                msg_class=msg_class,
                transaction_id=tid,
                username=_first_username(attributes),
                drop_reason="too_many_attributes",
            )
        remaining -= 1
        atype, alen = unpack_attr(data, pos)
        start = pos + 4
        end = start + alen
        padded = (end + 3) & ~3
        if padded > n:
            raise StunDecodeError("attribute runs past the end")
        if atype == FINGERPRINT:
            if padded != n:
                raise StunDecodeError("attribute after FINGERPRINT")
            if alen != 4:
                raise StunDecodeError("bad FINGERPRINT length")
            expected = (zlib.crc32(data[:pos]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if int.from_bytes(data[start:end], "big") != expected:
                raise StunDecodeError("FINGERPRINT mismatch")
            has_fingerprint = True
            break
        if ignoring and (mi256_offset >= 0 or atype != MESSAGE_INTEGRITY_SHA256):
            pos = padded
            continue
        decoder = decoders.get(atype)
        if decoder is None:
            if atype < 0x8000:
                unknown_required.append(atype)
            append((atype, data[start:end]))
        else:
            try:
                append((atype, decoder(data[start:end], tid)))
            except _AttributeError as exc:
                raise StunDecodeError(
                    "attribute 0x%04x: %s" % (atype, exc),
                    error_code=400,
                    method=method,
                    msg_class=msg_class,
                    transaction_id=tid,
                    username=_first_username(attributes),
                ) from None
            if atype in _INTEGRITY_TYPES:
                ignoring = True
                if atype == MESSAGE_INTEGRITY:
                    mi_offset = pos
                else:
                    mi256_offset = pos
        pos = padded
    return Message(
        method,
        msg_class,
        tid,
        attributes,
        data,
        mi_offset,
        mi256_offset,
        has_fingerprint,
        tuple(unknown_required),
    )


def _first_username(attributes: list[Attribute]) -> Optional[str]:
    """The first USERNAME decoded so far, so that a 400 can still be signed."""
    for t, v in attributes:
        if t == USERNAME:
            return v if isinstance(v, str) else None
    return None


def encode(
    method: int,
    msg_class: int,
    transaction_id: bytes,
    attributes: Iterable[Attribute],
    *,
    integrity_key: Optional[bytes] = None,
    integrity_sha256_key: Optional[bytes] = None,
    fingerprint: bool = False,
) -> bytes:
    """Encode a STUN message.

    ``attributes`` values are the typed values listed in the module
    docstring; for attribute types the codec does not know, raw ``bytes``.
    MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are appended
    in that order when their keys / flag are given.
    """
    if len(transaction_id) != 12:
        raise ValueError("a transaction id is 12 bytes")
    if not 0 <= method <= 0xFFF or not 0 <= msg_class <= 3:
        raise ValueError("method is 12 bits, class 2 bits")
    parts = []
    for atype, value in attributes:
        encoder = _ENCODERS.get(atype)
        raw = encoder(value, transaction_id) if encoder is not None else _encode_any_bytes(value, transaction_id)
        if len(raw) > 0xFFFF:
            raise ValueError("attribute too long")
        parts.append(_ATTR_HEADER.pack(atype, len(raw)))
        parts.append(raw)
        pad = -len(raw) % 4
        if pad:
            parts.append(b"\x00" * pad)
    body = b"".join(parts)
    trailer = (
        (24 if integrity_key is not None else 0)
        + (36 if integrity_sha256_key is not None else 0)
        + (8 if fingerprint else 0)
    )
    if len(body) + trailer > 0xFFFF:
        raise ValueError("message too long")
    mtype = message_type(method, msg_class)
    if integrity_key is not None:
        header = _HEADER.pack(mtype, len(body) + 24, MAGIC_COOKIE) + transaction_id
        mac = hmac.digest(integrity_key, header + body, "sha1")
        body += b"\x00\x08\x00\x14" + mac
    if integrity_sha256_key is not None:
        header = _HEADER.pack(mtype, len(body) + 36, MAGIC_COOKIE) + transaction_id
        mac = hmac.digest(integrity_sha256_key, header + body, "sha256")
        body += b"\x00\x1c\x00\x20" + mac
    if fingerprint:
        header = _HEADER.pack(mtype, len(body) + 8, MAGIC_COOKIE) + transaction_id
        crc = (zlib.crc32(header + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        return header + body + b"\x80\x28\x00\x04" + _U32.pack(crc)
    return _HEADER.pack(mtype, len(body), MAGIC_COOKIE) + transaction_id + body


def _adjusted(raw: bytes, offset: int, total_after: int) -> bytes:
    """``raw[:offset]`` with the header length set to ``offset - 20 + total_after``."""
    return raw[:2] + (offset - HEADER_LENGTH + total_after).to_bytes(2, "big") + raw[4:offset]


def check_integrity(message: Message, key: bytes) -> bool:
    """Verify MESSAGE-INTEGRITY (HMAC-SHA1) in constant time."""
    offset = message.integrity_offset
    if offset < 0:
        return False
    raw = message.raw
    mac = hmac.digest(key, _adjusted(raw, offset, 24), "sha1")
    return hmac.compare_digest(mac, raw[offset + 4 : offset + 24])


def check_integrity_sha256(message: Message, key: bytes) -> bool:
    """Verify MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, possibly truncated) in constant time."""
    offset = message.integrity_sha256_offset
    if offset < 0:
        return False
    raw = message.raw
    length = (raw[offset + 2] << 8) | raw[offset + 3]
    mac = hmac.new(key, _adjusted(raw, offset, 4 + length), hashlib.sha256).digest()[:length]
    return hmac.compare_digest(mac, raw[offset + 4 : offset + 4 + length])


# --- long-term credential keys (RFC 8489 §9.2.2) --------------------------


def long_term_key(username: str, realm: str, password: str, algorithm: int = ALGORITHM_MD5) -> bytes:
    text = ("%s:%s:%s" % (username, realm, password)).encode("utf-8")
    if algorithm == ALGORITHM_SHA256:
        return hashlib.sha256(text).digest()
    return hashlib.md5(text).digest()


# --- ChannelData: see channel_data.py (RFC 8656 §12) ---------------------------
# Kept importable here for the shell's tests until they import channel_data.
from . import channel_data as _channel_data  # noqa: E402

decode_channel_data = _channel_data.decode
encode_channel_data = _channel_data.encode
