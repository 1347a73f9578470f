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

RFC 8489 §9.2 lives here whole: key derivation (§9.2.2 with the Firezone
and TURN REST passwords), password algorithms (§9.2.4/§14.11-12), the nonce
cookie (§9.2), the credential check (``authenticate``) and the challenge a
failure gets (``challenge_attributes``).  The relay turns a failure into the
reply and the counters.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from typing import Optional, Sequence, Tuple

from . import integrity, stun
from .commands import Client

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
#: Nonces ``NonceFactory.issue`` remembers within one second.
_ISSUED_MAX = 1024
#: (nonce, client) pairs of authenticated requests ``NonceFactory`` keeps,
#: so that a client's next requests with the same nonce skip its MAC.
_VERIFIED_MAX = 4096

#: The PASSWORD-ALGORITHMS the relay offers and accepts (RFC 8489 §14.11).
PASSWORD_ALGORITHMS = ((stun.ALGORITHM_SHA256, b""), (stun.ALGORITHM_MD5, b""))
_PASSWORD_ALGORITHMS_SIZE = 4 + 4 * len(PASSWORD_ALGORITHMS)
#: A REST credential valid for longer than this is refused (401): a
#: credential that never expires is a static password in disguise.
MAX_REST_LIFETIME = 366 * 86400
#: SPEC §5: no reply to an unauthenticated request is more than this many
#: times the size of the request (reflection amplification).
MAX_AMPLIFICATION = 4


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
        # The nonces issued during the current second, by (full, client):
        # a nonce is a function of those and the second, so a client
        # challenged again within the second (a retransmission, a flood)
        # gets the same string without another HMAC.  Cleared when the
        # second changes; at most _ISSUED_MAX entries.
        self._issued: dict[Tuple[bool, Tuple[str, int]], str] = {}
        self._issued_second = -1
        # The nonces of requests that authenticated, by (nonce, client):
        # their issue time.  A client signs request after request with the
        # same nonce (a Refresh, a ChannelBind, the Refresh 0 that deletes
        # its allocation), and its MAC was checked once already.  Only
        # ``authenticated`` adds to it (no state before authentication);
        # at most _VERIFIED_MAX entries, cleared when full.
        self._verified: dict[Tuple[str, Tuple[str, int]], int] = {}
        #: (nonce, client, issue time) of the last ``is_valid`` that said
        #: yes, for ``authenticated``.
        self._checked: Optional[Tuple[str, Tuple[str, int], int]] = None

    def _mac(self, full: bool, issued: int, client: Tuple[str, int]) -> bytes:
        text = ("%s|%d|%s|%d" % ("f" if full else "p", issued, client[0], client[1])).encode("utf-8", "replace")
        return integrity.keyed_hmac(self._key, text, "sha256")[:_NONCE_MAC_BYTES]

    def issue(self, client: Tuple[str, int], now: float, full: bool = True) -> str:
        """A nonce for ``client``: with the RFC 8489 cookie and feature set
        when ``full`` (29 characters), without (16 characters) otherwise."""
        issued = int(now) & 0xFFFFFFFF
        if issued != self._issued_second:
            self._issued.clear()
            self._issued_second = issued
        nonce = self._issued.get((full, client))
        if nonce is None:
            body = base64.b64encode(issued.to_bytes(4, "big") + self._mac(full, issued, client)).decode("ascii")
            nonce = _NONCE_PREFIX + body if full else body
            if len(self._issued) < _ISSUED_MAX:
                self._issued[(full, client)] = nonce
        return nonce

    def is_valid(self, nonce: str, client: Tuple[str, int], now: float) -> bool:
        """True when ``nonce`` was issued by us to ``client`` less than the lifetime ago."""
        self._checked = None
        issued = self._verified.get((nonce, client))
        if issued is None:
            second = int(now) & 0xFFFFFFFF
            if second == self._issued_second and self._issued.get((nonce.startswith(_NONCE_PREFIX), client)) == nonce:
                issued = second  # ``issue`` made it for this client this second
        if issued is not None:
            # Its form and MAC are known good; the age is checked as below.
            if not (int(now) - issued) & 0xFFFFFFFF < self._lifetime:
                return False
            self._checked = (nonce, client, issued)
            return True
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
        if not hmac.compare_digest(raw[4:], self._mac(full, issued, client)):
            return False
        self._checked = (nonce, client, issued)
        return True

    def authenticated(self, nonce: str, client: Tuple[str, int]) -> None:
        """The request whose ``nonce`` from ``client`` the last ``is_valid``
        accepted has authenticated: keep the pair, so that the client's next
        requests with this nonce skip the MAC."""
        checked = self._checked
        self._checked = None
        if checked is None or checked[0] != nonce or checked[1] != client:
            return
        verified = self._verified
        if (nonce, client) not in verified:
            if len(verified) >= _VERIFIED_MAX:
                verified.clear()
            verified[(nonce, client)] = checked[2]


def _attribute_size(value_length: int) -> int:
    """Bytes on the wire of an attribute whose value has ``value_length`` bytes."""
    return 4 + ((value_length + 3) & ~3)


class Request:
    """What a reply to one request needs: where, which transaction, signed how."""

    __slots__ = (
        "sender", "method", "transaction_id", "fingerprint", "key", "sha256", "username", "authenticated", "algorithm", "size"
    )

    def __init__(self, sender: Client, message: stun.Message) -> None:
        self.sender = sender
        self.method = message.method
        self.transaction_id = message.transaction_id
        self.fingerprint = message.has_fingerprint
        #: The request's size in bytes: the budget of an unauthenticated reply.
        self.size = len(message.raw)
        self.key: Optional[bytes] = None
        self.sha256 = False
        self.username = ""
        self.authenticated = False
        self.algorithm = stun.ALGORITHM_MD5


def firezone_key(secret: str, username: str, realm: str, algorithm: int = stun.ALGORITHM_MD5) -> Optional[bytes]:
    """The long-term key (RFC 8489 §9.2.2) of a Firezone ``username``, or
    ``None`` when it does not have the Firezone form."""
    parsed = parse_username(username)
    if parsed is None:
        return None
    return _firezone_long_term_key(secret, username, realm, algorithm, parsed[0], parsed[1])


def derive_key(message: stun.Message, request: Request, secret: str, realm: str) -> tuple[Optional[tuple[int, str]], bool]:
    """Set ``request.key`` from a Firezone-form USERNAME so that every
    reply to it is signed.  Returns the parsed username and whether the
    PASSWORD-ALGORITHM(S) attributes are acceptable (RFC 8489 §9.2.4)."""
    username = message.get_str(stun.USERNAME)
    parsed = parse_username(username) if username is not None else None
    algorithm = stun.ALGORITHM_MD5
    algorithm_value = message.get(stun.PASSWORD_ALGORITHM)
    algorithms_value = message.get(stun.PASSWORD_ALGORITHMS)
    algorithms_ok = True
    if algorithm_value is not None or algorithms_value is not None:
        algorithms_ok = (
            isinstance(algorithm_value, tuple)
            and algorithms_value == PASSWORD_ALGORITHMS
            and algorithm_value in PASSWORD_ALGORITHMS
        )
        if algorithms_ok and isinstance(algorithm_value, tuple):
            algorithm = algorithm_value[0]
    request.algorithm = algorithm
    request.sha256 = message.integrity_sha256_offset >= 0
    if username is not None and parsed is not None:
        request.username = username
        request.key = _firezone_long_term_key(secret, username, realm, algorithm, parsed[0], parsed[1])
    return parsed, algorithms_ok


@functools.lru_cache(maxsize=1024)
def _firezone_long_term_key(secret: str, username: str, realm: str, algorithm: int, expiry: int, salt: str) -> bytes:
    """The long-term key of a parsed Firezone username, kept for the last
    1024 (secret, username, realm, algorithm): a client signs every request
    with the same credentials, and deriving the key is two hashes."""
    return integrity.long_term_key(username, realm, generate_password(secret, expiry, salt), algorithm)


def authenticate(
    message: stun.Message,
    request: Request,
    nonces: NonceFactory,
    secret: str,
    realm: str,
    rest_secrets: Sequence[str],
    now: float,
) -> Optional[Tuple[str, int]]:
    """RFC 8489 §9.2 with the Firezone credential scheme, then TURN REST.

    ``None`` when the request is authenticated (``request.authenticated``
    set, ``request.key`` the key that verified it); otherwise ``(reason,
    code)``: the failure counter's reason and 401 or 438 (a challenge) or 400.
    A request whose USERNAME has the Firezone form gets signed replies,
    errors included.
    """
    parsed, algorithms_ok = derive_key(message, request, secret, realm)
    username = message.get_str(stun.USERNAME)
    has_integrity = message.integrity_offset >= 0 or message.integrity_sha256_offset >= 0
    nonce = message.get_str(stun.NONCE)
    if not has_integrity or username is None or nonce is None:
        return "missing_credentials", 401
    client = (request.sender[0], request.sender[1])
    if not nonces.is_valid(nonce, client, now):
        return "stale_nonce", 438
    if not algorithms_ok:
        return "bad_password_algorithm", 400
    rest_expiry = parse_rest_username(username) if rest_secrets else None
    if (parsed is None or request.key is None) and rest_expiry is None:
        return "malformed_username", 401
    check = integrity.check_integrity_sha256 if request.sha256 else integrity.check_integrity
    expiry: Optional[int] = None
    if parsed is not None and request.key is not None and check(message, request.key):
        expiry = parsed[0]
    elif rest_expiry is not None:
        # TURN REST credentials (SPEC §10): either scheme's key may verify.
        for rest_secret in rest_secrets:
            key = integrity.long_term_key(username, realm, rest_password(rest_secret, username), request.algorithm)
            if check(message, key):
                request.key = key
                request.username = username
                expiry = rest_expiry
                break
        if expiry is not None and expiry > now + MAX_REST_LIFETIME:
            return "rest_expiry_too_far", 401
    if expiry is None:
        return "bad_integrity", 401
    if expiry < now:
        return "expired", 401
    request.authenticated = True
    nonces.authenticated(nonce, client)
    return None


def challenge_attributes(request: Request, code: int, realm: str, nonces: NonceFactory, now: float) -> list[stun.Attribute]:
    """ERROR-CODE 401 or 438 with REALM and a fresh NONCE (RFC 8489 §9.2.4).

    REALM and NONCE are the MUSTs; PASSWORD-ALGORITHMS is a MAY ("The
    server MAY support alternate password algorithms, in which case it can
    list them ... in a PASSWORD-ALGORITHMS attribute"), and if it is sent
    the nonce must carry the security feature cookie with the "password
    algorithms" bit.  The full challenge (PASSWORD-ALGORITHMS, cookie
    nonce: SHA-256 offered) goes to requests large enough that it stays
    within 4x their size (SPEC §5), which every real first Allocate is
    (it must carry REQUESTED-TRANSPORT).  A smaller request (a bare 20-byte
    Allocate or Refresh) gets the smallest correct challenge: REALM and a
    plain 16-character nonce, MD5 only, 72 bytes unsigned (3.6x).
    """
    client = (request.sender[0], request.sender[1])
    reason = stun.REASONS[code]
    nonce = nonces.issue(client, now)
    full_size = (
        stun.HEADER_LENGTH
        + _attribute_size(4 + len(reason))
        + _attribute_size(len(realm))
        + _attribute_size(len(nonce))
        + _PASSWORD_ALGORITHMS_SIZE
        + (0 if request.key is None else (36 if request.sha256 else 24))
        + (8 if request.fingerprint else 0)
    )
    attributes: list[stun.Attribute] = [(stun.ERROR_CODE, (code, reason)), (stun.REALM, realm)]
    if full_size <= MAX_AMPLIFICATION * request.size:
        attributes += [(stun.NONCE, nonce), (stun.PASSWORD_ALGORITHMS, PASSWORD_ALGORITHMS)]
    else:
        attributes.append((stun.NONCE, nonces.issue(client, now, full=False)))
    return attributes
