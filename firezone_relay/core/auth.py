"""Firezone credentials and stateless nonces.

Credentials (upstream scheme): the username is ``<unix expiry>:<salt>`` and
the password is the unpadded standard base64 of
``SHA-256("<expiry>:<secret>:<salt>")``, so the relay needs no user table:
anyone holding the relay secret (the portal) can mint credentials.

Nonces are stateless (SPEC §3): the base64 of the issue time (4 bytes) and a
truncated HMAC (8 bytes) of the form, the issue time and the client address
under a per-process key.  The full form is prefixed with ``obMatJos2`` and the
RFC 8489 security feature set (password algorithms) and goes with a
PASSWORD-ALGORITHMS attribute; the plain form has no prefix and goes with the
smallest challenge, for requests too small to justify more (SPEC §5: no
unauthenticated reply is more than 4x its request).  Checking one costs an
HMAC and no memory; a nonce is bound to its form and the client address and
valid for ``NONCE_LIFETIME`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Optional, Tuple

REALM = "firezone"
NONCE_LIFETIME = 600

#: RFC 8489 §9.2: the nonce cookie and the security feature set with the
#: "password algorithms" bit (the first of the 24 bits) set, base64-encoded.
NONCE_COOKIE = "obMatJos2"
NONCE_FEATURES = base64.b64encode(b"\x80\x00\x00").decode("ascii")
_NONCE_PREFIX = NONCE_COOKIE + NONCE_FEATURES
_NONCE_MAC_BYTES = 8
#: base64 of 4 bytes of issue time and the MAC: 16 characters, no padding.
_NONCE_BODY = 4 * (4 + _NONCE_MAC_BYTES) // 3


def generate_password(secret: str, expiry: int, salt: str) -> str:
    """The password for ``<expiry>:<salt>`` under ``secret``."""
    digest = hashlib.sha256(("%d:%s:%s" % (expiry, secret, salt)).encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii").rstrip("=")


def make_credentials(secret: str, expiry: int, salt: str) -> Tuple[str, str]:
    """``(username, password)`` valid until the unix time ``expiry``."""
    return "%d:%s" % (expiry, salt), generate_password(secret, expiry, salt)


def parse_username(username: str) -> Optional[Tuple[int, str]]:
    """``(expiry, salt)`` of a Firezone username, or ``None`` when malformed.

    The expiry must be canonical decimal (SPEC §3): ASCII digits, no sign, no
    leading zero, so that one credential has exactly one USERNAME and
    per-username limits cannot be multiplied by spelling it differently.
    """
    expiry_text, sep, salt = username.partition(":")
    if not sep or ":" in salt or not expiry_text.isdigit() or not expiry_text.isascii():
        return None
    if expiry_text[0] == "0" and len(expiry_text) > 1:
        return None
    expiry = int(expiry_text)
    if expiry >= 1 << 64:
        return None
    return expiry, salt


def rest_password(secret: str, username: str) -> str:
    """The TURN REST password for ``username`` under ``secret`` (SPEC §10).

    The shared-secret scheme coturn calls ``use-auth-secret``, and that
    Matrix/Synapse, Nextcloud Talk, Jitsi and Galene mint:
    base64(HMAC-SHA1(secret, username)), padded.
    """
    digest = hmac.digest(secret.encode("utf-8"), username.encode("utf-8"), "sha1")
    return base64.b64encode(digest).decode("ascii")


def parse_rest_username(username: str) -> Optional[int]:
    """The expiry of a REST username ``<expiry>[:<user>]``, or ``None``.

    The expiry is canonical decimal (no sign, no leading zero), so one
    credential has exactly one USERNAME.
    """
    expiry_text = username.partition(":")[0]
    if not expiry_text.isdigit() or not expiry_text.isascii() or len(expiry_text) > 19:
        return None
    if expiry_text != "0" and expiry_text.startswith("0"):
        return None
    return int(expiry_text)


class NonceFactory:
    """Issues and checks stateless nonces bound to a client address."""

    def __init__(self, key: bytes, lifetime: int = NONCE_LIFETIME) -> None:
        self._key = key
        self._lifetime = lifetime

    def _mac(self, full: bool, issued: int, client: Tuple[str, int]) -> bytes:
        text = ("%s|%d|%s|%d" % ("f" if full else "p", issued, client[0], client[1])).encode("utf-8", "replace")
        return hmac.digest(self._key, text, "sha256")[:_NONCE_MAC_BYTES]

    def issue(self, client: Tuple[str, int], now: float, full: bool = True) -> str:
        """A nonce for ``client``: with the RFC 8489 cookie and feature set
        when ``full`` (29 characters), without (16 characters) otherwise."""
        issued = int(now) & 0xFFFFFFFF
        body = base64.b64encode(issued.to_bytes(4, "big") + self._mac(full, issued, client)).decode("ascii")
        return _NONCE_PREFIX + body if full else body

    def is_valid(self, nonce: str, client: Tuple[str, int], now: float) -> bool:
        """True when ``nonce`` was issued by us to ``client`` less than the lifetime ago."""
        full = nonce.startswith(_NONCE_PREFIX)
        body = nonce[len(_NONCE_PREFIX) :] if full else nonce
        if len(body) != _NONCE_BODY or not body.isascii():
            return False
        try:
            raw = base64.b64decode(body, validate=True)
        except ValueError:
            return False
        issued = int.from_bytes(raw[:4], "big")
        age = (int(now) - issued) & 0xFFFFFFFF
        if not age < self._lifetime:
            return False
        return hmac.compare_digest(raw[4:], self._mac(full, issued, client))
