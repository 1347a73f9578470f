"""STUN (RFC 8489) and TURN (RFC 8656) wire codec.

Pure functions over bytes.  ``decode`` turns one datagram into a
:class:`Message` or raises :class:`StunDecodeError`, never anything else;
``encode`` turns a method, class, transaction id and an ordered attribute list
into bytes, optionally signed (MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256)
and fingerprinted.

The attribute value codecs, ``attributes.CODECS`` (each attribute type to its
pair) and the plain Python value of each attribute are in ``attributes``.

Decoding is linear in the datagram and bounded (SPEC §1): at most
``MAX_ATTRIBUTES`` attribute headers are read (a longer message is rejected,
a request with a 400), list-valued attributes hold a bounded number of
entries, and IPv6 addresses are formatted without the ``ipaddress`` module.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

from . import attributes as _attr
from .attributes import FAMILY_IPV4 as FAMILY_IPV4, FAMILY_IPV6 as FAMILY_IPV6, MAGIC_COOKIE as MAGIC_COOKIE
from .attributes import Address as Address
from .attributes import ATTR_HEADER as _ATTR_HEADER, U16 as _U16, U32 as _U32, AttributeValueError as _AttributeError
from .attributes import CODECS, Decoder as _Decoder, Encoder as _Encoder, HEADER_LENGTH as HEADER_LENGTH
from .integrity import keyed_hmac

# Message integrity and long-term keys live in ``integrity``; these names stay
# importable here for the clients outside the core (tests, benchmarks).
from .integrity import check_integrity as check_integrity, check_integrity_sha256 as check_integrity_sha256
from .integrity import long_term_key as long_term_key

# The registry values (methods, classes, attribute types, password
# algorithms, reason phrases) live in ``iana``; stun.BINDING etc. stay here.
from .iana import *  # noqa: F401,F403

FINGERPRINT_XOR = 0x5354554E


AttributeValue = object
Attribute = Tuple[int, AttributeValue]

_HEADER = struct.Struct(">HHI")

#: Decoding bounds (SPEC §1): a message with more attributes than this is
#: rejected after reading exactly this many attribute headers, so the cost of
#: a decode is bounded whatever the datagram's size.
MAX_ATTRIBUTES = 64


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


_DECODERS: dict[int, _Decoder] = {t: c[0] for t, c in CODECS.items()}
_ENCODERS: dict[int, _Encoder] = {t: c[1] for t, c in CODECS.items()}


_INTEGRITY_TYPES = frozenset((MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256))

#: Attribute types whose encoding depends on the value alone (not on the
#: transaction id) and whose values in replies come from a small fixed set:
#: the reason phrases, the realm, the software name, the algorithm list.
#: ``encode`` keeps their encoded form (header, value, padding) in
#: ``_encoded_constants``: a challenge or error reply then encodes only its
#: NONCE and addresses (a 401 is most of what a flood of unauthenticated
#: requests costs).  At most ``_ENCODED_CONSTANTS_MAX`` entries, so a
#: caller passing many different values only misses.
_CONSTANT_TYPES = frozenset((ERROR_CODE, REALM, SOFTWARE, PASSWORD_ALGORITHMS))
_ENCODED_CONSTANTS_MAX = 64
_encoded_constants: dict[Tuple[int, object], bytes] = {}


def _fingerprint(message: bytes) -> int:
    """The FINGERPRINT value of the message bytes before it (RFC 8489 §14.7)."""
    return (zlib.crc32(message) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def is_comprehension_required(attr_type: int) -> bool:
    return attr_type < 0x8000


# --- messages ------------------------------------------------------------


@dataclass(slots=True, eq=False, repr=False)
class Message:
    """A decoded STUN message.

    ``attributes`` is the ordered list of ``(type, value)`` pairs, duplicates
    included.  Attributes after MESSAGE-INTEGRITY (other than
    MESSAGE-INTEGRITY-SHA256 and FINGERPRINT) and after
    MESSAGE-INTEGRITY-SHA256 (other than FINGERPRINT) are not in the list:
    RFC 8489 §14.5–14.6 says to ignore them.
    """

    method: int
    msg_class: int
    transaction_id: bytes
    attributes: list[Attribute]
    raw: bytes = b""
    integrity_offset: int = -1
    integrity_sha256_offset: int = -1
    has_fingerprint: bool = False
    unknown_required: Tuple[int, ...] = ()

    # The getters run per request (and ``get_address``/``get_bytes`` per
    # Send indication): their loops and type checks are written inline, not
    # through a shared helper (a call each) or ``any()`` over a generator
    # (154 -> 582 ns for a lookup among five attributes).  ``has``, once per
    # Allocate, goes through ``get`` (128 -> 154 ns).

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
        # No decoder gives None for a value (a flag's is True).
        return self.get(attr_type) is not None

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
    return _guarded(_decode, data)


def _guarded(decoder: Callable[[bytes], Message], data: bytes) -> Message:
    """``decoder(data)``, any exception but :class:`StunDecodeError` turned
    into one (defence in depth: a decoder bug must not escape as another type)."""
    try:
        return decoder(data)
    except StunDecodeError:
        raise
    except Exception as exc:  # pragma: no cover - defence in depth
        raise StunDecodeError("malformed: %s" % (exc,)) from None


def _header(data: bytes) -> tuple[bytes, int, int, bytes]:
    """``(data as bytes, its length, message type, transaction id)`` after the
    checks every decoder makes of the header (RFC 8489 §5, §6)."""
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
    return data, n, mtype, tid


def _decode(data: bytes) -> Message:
    data, n, mtype, tid = _header(data)
    # split_message_type, inlined: this is the per-request hot path.
    method = (mtype & 0x000F) | ((mtype >> 1) & 0x0070) | ((mtype >> 2) & 0x0F80)
    msg_class = ((mtype >> 4) & 1) | ((mtype >> 7) & 2)

    if n > _MAY_EXCEED_ATTRIBUTES:
        # Room for more than MAX_ATTRIBUTES attributes: count the headers
        # first, so that a message with too many is refused before any value
        # is decoded (SPEC §1: the cost of refusing is ~64 header reads).
        _count_attributes(data, n, method, msg_class, tid)

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
    # The loop reads at most MAX_ATTRIBUTES headers, ignored ones included
    # (SPEC §1): a message with room for more was counted above, and one
    # without cannot hold more (each header takes at least 4 bytes).
    while pos < n:
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
            if int.from_bytes(data[start:end], "big") != _fingerprint(data[:pos]):
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
                reason = "attribute 0x%04x: %s" % (atype, exc)
                raise _bad_request(reason, _first_username(attributes), method, msg_class, tid) from None
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


def decode_structure(data: bytes) -> Message:
    """Check one STUN message as :func:`decode` does, without decoding any
    attribute value: ``attributes`` is empty.

    For a request whose method reads no attribute (Binding, SPEC §2): the
    header, the padding, the bound of ``MAX_ATTRIBUTES``, FINGERPRINT (last
    and correct) are checked and the unknown comprehension-required types
    before MESSAGE-INTEGRITY(-SHA256) collected, exactly as :func:`decode`
    does, so a 400 or 420 is answered as before; a malformed value of a known
    attribute goes unnoticed, as the method never reads it.  The cost is one
    header read and one list append per attribute (SPEC §1).
    """
    return _guarded(_decode_structure, data)


def _decode_structure(data: bytes) -> Message:
    data, n, mtype, tid = _header(data)
    method, msg_class = split_message_type(mtype)
    if n > _MAY_EXCEED_ATTRIBUTES:
        # As in ``_decode``: more than MAX_ATTRIBUTES attributes are refused
        # first; the walk below then reads at most that many headers (a
        # shorter message cannot hold more).
        _count_attributes(data, n, method, msg_class, tid)
    unpack_attr = _ATTR_HEADER.unpack_from
    special = _STRUCTURE_TYPES
    types: list[int] = []
    append = types.append
    cut = -1  # index of the first MESSAGE-INTEGRITY(-SHA256): what follows is ignored
    mi_offset = -1
    mi256_offset = -1
    has_fingerprint = False
    pos = HEADER_LENGTH
    while pos < n:
        atype, alen = unpack_attr(data, pos)
        if atype in special:
            if atype == FINGERPRINT:
                if pos + 8 != n or alen != 4:
                    raise StunDecodeError("bad FINGERPRINT length" if pos + 8 == n else "attribute after FINGERPRINT")
                if int.from_bytes(data[pos + 4 : pos + 8], "big") != _fingerprint(data[:pos]):
                    raise StunDecodeError("FINGERPRINT mismatch")
                has_fingerprint = True
                pos = n
                break
            else:
                if cut < 0:
                    cut = len(types)
                if atype == MESSAGE_INTEGRITY:
                    if mi_offset < 0 and mi256_offset < 0:
                        mi_offset = pos
                elif mi256_offset < 0:
                    mi256_offset = pos
        append(atype)
        pos += 4 + ((alen + 3) & ~3)
    if pos != n:
        raise StunDecodeError("attribute runs past the end")
    known = _DECODERS
    unknown_required = tuple([t for t in (types if cut < 0 else types[:cut]) if t < 0x8000 and t not in known])
    return Message(method, msg_class, tid, [], data, mi_offset, mi256_offset, has_fingerprint, unknown_required)


_STRUCTURE_TYPES = frozenset((FINGERPRINT, MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256))


#: A message body longer than this may hold more than MAX_ATTRIBUTES attributes.
_MAY_EXCEED_ATTRIBUTES = HEADER_LENGTH + 4 * MAX_ATTRIBUTES


def _count_attributes(data: bytes, n: int, method: int, msg_class: int, tid: bytes) -> None:
    """Walk the attribute headers only, and raise the too-many-attributes
    error after reading ``MAX_ATTRIBUTES`` of them if more follow.

    Values are not decoded, except the first USERNAME before a
    MESSAGE-INTEGRITY(-SHA256) when the message is refused, so that its 400
    can still be signed.  Anything else wrong (a length running past the
    end, FINGERPRINT not last) is left to the full decode.
    """
    unpack_attr = _ATTR_HEADER.unpack_from
    watched = _USERNAME_AND_INTEGRITY
    pos = HEADER_LENGTH
    username_at = -1
    before_integrity = True
    for _ in range(MAX_ATTRIBUTES):
        if pos >= n:
            return
        atype, alen = unpack_attr(data, pos)
        if atype in watched:
            if atype != USERNAME:
                before_integrity = False
            elif username_at < 0 and before_integrity:
                username_at = pos
        pos += 4 + ((alen + 3) & ~3)
    if pos >= n:
        return
    raise _too_many_attributes(_username_at(data, username_at, tid), method, msg_class, tid)


def _too_many_attributes(username: Optional[str], method: int, msg_class: int, tid: bytes) -> StunDecodeError:
    """The error for a message with more than MAX_ATTRIBUTES attributes."""
    return _bad_request("more than %d attributes" % MAX_ATTRIBUTES, username, method, msg_class, tid, "too_many_attributes")


def _bad_request(
    reason: str, username: Optional[str], method: int, msg_class: int, tid: bytes, drop_reason: str = "malformed"
) -> StunDecodeError:
    """The error for a request a server answers with 400, with its first
    USERNAME (if any, and valid) so that the 400 can be signed."""
    return StunDecodeError(
        reason,
        error_code=400,
        method=method,
        msg_class=msg_class,
        transaction_id=tid,
        username=username,
        drop_reason=drop_reason,
    )


def _username_at(data: bytes, username_at: int, tid: bytes) -> Optional[str]:
    """The USERNAME whose attribute header is at ``username_at`` (-1: none),
    or ``None`` when there is none or its value is malformed."""
    if username_at < 0:
        return None
    ulen = _U16.unpack_from(data, username_at + 2)[0]
    try:
        value = _DECODERS[USERNAME](data[username_at + 4 : username_at + 4 + ulen], tid)
    except _AttributeError:
        return None
    return value if isinstance(value, str) else None


_USERNAME_AND_INTEGRITY = frozenset((USERNAME, MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256))


def _first_username(attributes: list[Attribute]) -> Optional[str]:
    """The first USERNAME decoded so far, so that a 400 can still be signed."""
    username = next((v for t, v in attributes if t == USERNAME), None)
    return username if isinstance(username, str) else None


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
        # One of the _CONSTANT_TYPES: its whole encoded attribute from
        # ``_encoded_constants``, or kept there once encoded below (an
        # unhashable value is encoded as any other).
        constant: Optional[Tuple[int, object]] = None
        if atype in _CONSTANT_TYPES:
            try:
                parts.append(_encoded_constants[(atype, value)])
                continue
            except KeyError:
                constant = (atype, value)
            except TypeError:
                pass
        encoder = _ENCODERS.get(atype)
        raw = encoder(value, transaction_id) if encoder is not None else _attr.encode_any_bytes(value, transaction_id)
        if len(raw) > 0xFFFF:
            raise ValueError("attribute too long")
        parts.append(_ATTR_HEADER.pack(atype, len(raw)))
        parts.append(raw)
        pad = -len(raw) % 4
        if pad:
            parts.append(b"\x00" * pad)
        if constant is not None and len(_encoded_constants) < _ENCODED_CONSTANTS_MAX:
            _encoded_constants[constant] = b"".join(parts[-3 if pad else -2 :])
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
        body = _with_mac(body, mtype, transaction_id, integrity_key, MESSAGE_INTEGRITY, "sha1", 20)
    if integrity_sha256_key is not None:
        body = _with_mac(body, mtype, transaction_id, integrity_sha256_key, MESSAGE_INTEGRITY_SHA256, "sha256", 32)
    if fingerprint:
        header = _HEADER.pack(mtype, len(body) + 8, MAGIC_COOKIE) + transaction_id
        return header + body + b"\x80\x28\x00\x04" + _U32.pack(_fingerprint(header + body))
    return _HEADER.pack(mtype, len(body), MAGIC_COOKIE) + transaction_id + body


def _with_mac(body: bytes, mtype: int, tid: bytes, key: bytes, attr_type: int, algorithm: str, size: int) -> bytes:
    """``body`` with a MESSAGE-INTEGRITY(-SHA256) attribute appended: the HMAC
    of the header (its length counting the attribute) and ``body``."""
    header = _HEADER.pack(mtype, len(body) + 4 + size, MAGIC_COOKIE) + tid
    return body + _ATTR_HEADER.pack(attr_type, size) + keyed_hmac(key, header + body, algorithm)


# --- ChannelData: see channel_data.py (RFC 8656 §12) ---------------------------
# Kept importable here for the shell's tests until they import channel_data.
from . import channel_data as _channel_data  # noqa: E402

decode_channel_data = _channel_data.decode
encode_channel_data = _channel_data.encode
