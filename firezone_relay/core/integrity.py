"""MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.5, §14.6) and
the long-term credential keys they are computed with (§9.2.2).

``keyed_hmac`` is the one HMAC of the core: it signs replies (through
``stun.encode``), verifies requests (``check_integrity*``, called by
``auth``) and makes nonces.  ``stun`` keeps ``check_integrity``,
``check_integrity_sha256`` and ``long_term_key`` importable under their old
names for the clients outside the core (tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Any, Optional

from .attributes import HEADER_LENGTH
from .iana import ALGORITHM_MD5, ALGORITHM_SHA256

if TYPE_CHECKING:  # stun imports this module
    from .stun import Message

#: (hash name, key) -> the hash states after HMAC's inner and outer key
#: blocks (RFC 2104): what ``hmac.digest`` sets up again on every call, about
#: half its cost with OpenSSL 3.  Kept for the last ``_HMAC_KEYS`` keys
#: (each client signs with one long-term key; the nonce key is fixed).
_hmac_pads: dict[tuple[str, bytes], tuple[Any, Any]] = {}
_HMAC_KEYS = 1024
_HMAC_BLOCK = 64  # the block size of MD5, SHA-1 and SHA-256
_IPAD = bytes((x ^ 0x36) for x in range(256))
_OPAD = bytes((x ^ 0x5C) for x in range(256))


def keyed_hmac(key: bytes, data: bytes, name: str) -> bytes:
    """``hmac.digest(key, data, name)`` for ``name`` in sha1, sha256 (and
    md5), from hash states kept per key."""
    pads = _hmac_pads.get((name, key))
    if pads is None:
        block = key if len(key) <= _HMAC_BLOCK else hashlib.new(name, key).digest()
        block = block.ljust(_HMAC_BLOCK, b"\x00")
        pads = (hashlib.new(name, block.translate(_IPAD)), hashlib.new(name, block.translate(_OPAD)))
        if len(_hmac_pads) >= _HMAC_KEYS:
            _hmac_pads.clear()
        _hmac_pads[(name, key)] = pads
    inner = pads[0].copy()
    inner.update(data)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()


def check_integrity(message: Message, key: bytes) -> bool:
    """Verify MESSAGE-INTEGRITY (HMAC-SHA1) in constant time."""
    return _check(message.raw, message.integrity_offset, key, "sha1", 20)


def check_integrity_sha256(message: Message, key: bytes) -> bool:
    """Verify MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, possibly truncated) in constant time."""
    return _check(message.raw, message.integrity_sha256_offset, key, "sha256", None)


def _check(raw: bytes, offset: int, key: bytes, algorithm: str, size: Optional[int]) -> bool:
    """The MAC attribute at ``offset`` (-1: none) against the HMAC of
    ``raw`` up to it, the header length set to end with it (RFC 8489
    §14.5, §14.6), cut to the attribute's length (``size``, or for -SHA256
    whatever 16 to 32 bytes the decoder let through), in constant time."""
    if offset < 0:
        return False
    length = (raw[offset + 2] << 8) | raw[offset + 3]
    if size is not None and length != size:
        return False
    signed = raw[:2] + (offset - HEADER_LENGTH + 4 + length).to_bytes(2, "big") + raw[4:offset]
    return hmac.compare_digest(keyed_hmac(key, signed, algorithm)[:length], raw[offset + 4 : offset + 4 + length])


def long_term_key(username: str, realm: str, password: str, algorithm: int = ALGORITHM_MD5) -> bytes:
    """The long-term credential key (RFC 8489 §9.2.2): MD5, or SHA-256 for
    PASSWORD-ALGORITHM SHA-256, of ``username:realm:password``."""
    text = ("%s:%s:%s" % (username, realm, password)).encode("utf-8")
    if algorithm == ALGORITHM_SHA256:
        return hashlib.sha256(text).digest()
    return hashlib.md5(text).digest()
