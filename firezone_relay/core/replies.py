"""Replies to STUN requests: encoding, signing, counting, and the limits on
what goes to a client that has not authenticated.

RFC 8489 §6.3 (a response echoes the method and transaction ID; it is
signed with the request's key, MESSAGE-INTEGRITY or -SHA256 as the request
was, and has a FINGERPRINT when the request had one); SPEC §1/§5 (SOFTWARE
only for authenticated requests, an unauthenticated reply at most
``MAX_AMPLIFICATION`` times its request and within the per-IP reflection
guard).  ``Replies`` is a base of ``Relay``: the handlers call ``_reply``,
``_error`` and ``_challenge`` and never encode a reply themselves.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from . import auth, stun
from .allocation import Allocation
from .auth import MAX_AMPLIFICATION, NonceFactory, Request
from .commands import Client, Command, SendDatagram
from .config import RelayConfig
from .ratelimit import ReflectionGuard
from .stats import RelayStats


def family_of(ip: str) -> int:
    """4 or 6: the family of an IP address in text form."""
    return 6 if ":" in ip else 4


class Replies:
    """The reply half of ``Relay`` (see the module docstring)."""

    config: RelayConfig
    stats: RelayStats
    _commands: deque[Command]
    _software: str
    _nonces: NonceFactory
    _reflection: ReflectionGuard
    _allocations: dict[Client, Allocation]

    def _send(
        self,
        to: Client,
        method: int,
        cls: int,
        tid: bytes,
        attributes: list[stun.Attribute],
        key: Optional[bytes],
        sha256: bool,
        fingerprint: bool,
        limit: int = 0,
    ) -> bytes:
        """Encode and queue a reply; with a ``limit`` (bytes), a reply larger
        than it is not sent but counted, and ``b""`` returned."""
        payload = stun.encode(
            method,
            cls,
            tid,
            attributes,
            integrity_key=key if key is not None and not sha256 else None,
            integrity_sha256_key=key if key is not None and sha256 else None,
            fingerprint=fingerprint,
        )
        if limit and len(payload) > limit:
            self.stats.drop("amplification")
            return b""
        self._commands.append(SendDatagram(self.config.listen_port, family_of(to[0]), to, payload))
        return payload

    def _count_response(self, method: int, code: int) -> None:
        self.stats.response(stun.METHOD_NAMES.get(method, "unknown"), code)

    def _respond(self, request: Request, cls: int, attributes: list[stun.Attribute], code: int, limit: int) -> bytes:
        """Queue and count the response of class ``cls`` to ``request``,
        signed as the request was; ``b""`` when over ``limit``."""
        payload = self._send(
            request.sender,
            request.method,
            cls,
            request.transaction_id,
            attributes,
            request.key,
            request.sha256,
            request.fingerprint,
            limit,
        )
        if payload:
            self._count_response(request.method, code)
        return payload

    def _reply(self, request: Request, attributes: list[stun.Attribute]) -> bytes:
        """The success response (RFC 8489 §6.3.1.1)."""
        # SPEC §1/§5: SOFTWARE only on replies to authenticated requests; a
        # reply to an unauthenticated one (Binding) stays within 4x its request.
        if request.authenticated:
            return self._respond(request, stun.SUCCESS, [(stun.SOFTWARE, self._software)] + attributes, 0, 0)
        return self._respond(request, stun.SUCCESS, attributes, 0, MAX_AMPLIFICATION * request.size)

    def _error(self, request: Request, code: int, now: float, extra: Optional[list[stun.Attribute]] = None) -> None:
        """An error response (RFC 8489 §6.3.1.1) with ``code`` and ``extra``."""
        if not request.authenticated and not self._unauthenticated_allowed(request.sender, now):
            self.stats.drop("rate_limited")
            return
        attributes: list[stun.Attribute] = [(stun.ERROR_CODE, (code, stun.REASONS.get(code, "Error")))]
        if request.authenticated:
            attributes.insert(0, (stun.SOFTWARE, self._software))
        if extra:
            attributes.extend(extra)
        self._respond(request, stun.ERROR, attributes, code, 0 if request.authenticated else MAX_AMPLIFICATION * request.size)

    def _challenge(self, request: Request, code: int, now: float) -> None:
        """401 or 438 with REALM and a fresh NONCE (RFC 8489 §9.2.4; the
        attributes: ``auth.challenge_attributes``), within the reflection guard."""
        if not self._unauthenticated_allowed(request.sender, now):
            self.stats.drop("rate_limited")
            return
        attributes = auth.challenge_attributes(request, code, self.config.realm, self._nonces, now)
        self._respond(request, stun.ERROR, attributes, code, MAX_AMPLIFICATION * request.size)

    def _unauthenticated_allowed(self, client: Client, now: float) -> bool:
        """The reflection guard.  Stream clients are exempt: a TCP/TLS peer
        completed a handshake, so its source address cannot be spoofed, and
        it does not retransmit a reply we drop."""
        if len(client) == 3:
            return True
        if client in self._allocations:
            # A 5-tuple that holds an allocation is never charged: Firezone
            # clients send a Binding every 25 s per allocation, and thousands
            # of them can share one NAT address (SPEC §5).
            return True
        return self._reflection.allow(client[0], now)

    def _decode_error(self, exc: stun.StunDecodeError, sender: Client, size: int, now: float) -> None:
        """A request that could not be decoded gets the 400 the decoder
        chose (h11's error_status_hint), signed when its USERNAME has the
        Firezone form, unauthenticated in every other way: no SOFTWARE,
        within the reflection guard and the amplification budget."""
        if exc.error_code is None or exc.msg_class != stun.REQUEST or exc.method is None or exc.transaction_id is None:
            return
        if not self._unauthenticated_allowed(sender, now):
            return
        key = None
        if exc.username is not None:
            key = auth.firezone_key(self.config.auth_secret, exc.username, self.config.realm)
        attributes: list[stun.Attribute] = [(stun.ERROR_CODE, (400, "Bad Request"))]
        if self._send(sender, exc.method, stun.ERROR, exc.transaction_id, attributes, key, False, False, MAX_AMPLIFICATION * size):
            self._count_response(exc.method, exc.error_code)
