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

    def _reply(self, request: Request, attributes: list[stun.Attribute]) -> bytes:
        # SPEC §1/§5: SOFTWARE only on replies to authenticated requests; a
        # reply to an unauthenticated one (Binding) stays within 4x its request.
        if request.authenticated:
            attributes = [(stun.SOFTWARE, self._software)] + attributes
        payload = self._send(
            request.sender,
            request.method,
            stun.SUCCESS,
            request.transaction_id,
            attributes,
            request.key,
            request.sha256,
            request.fingerprint,
            0 if request.authenticated else MAX_AMPLIFICATION * request.size,
        )
        if payload:
            self._count_response(request.method, 0)
        return payload

    def _error(self, request: Request, code: int, now: float, extra: Optional[list[stun.Attribute]] = None) -> None:
        if not request.authenticated and not self._unauthenticated_allowed(request.sender, now):
            self.stats.drop("rate_limited")
            return
        attributes: list[stun.Attribute] = [(stun.ERROR_CODE, (code, stun.REASONS.get(code, "Error")))]
        if request.authenticated:
            attributes.insert(0, (stun.SOFTWARE, self._software))
        if extra:
            attributes.extend(extra)
        if self._send(
            request.sender,
            request.method,
            stun.ERROR,
            request.transaction_id,
            attributes,
            request.key,
            request.sha256,
            request.fingerprint,
            0 if request.authenticated else MAX_AMPLIFICATION * request.size,
        ):
            self._count_response(request.method, code)

    def _challenge(self, request: Request, code: int, now: float) -> None:
        """401 or 438 with REALM and a fresh NONCE (RFC 8489 §9.2.4; the
        attributes: ``auth.challenge_attributes``), within the reflection guard."""
        if not self._unauthenticated_allowed(request.sender, now):
            self.stats.drop("rate_limited")
            return
        attributes = auth.challenge_attributes(request, code, self.config.realm, self._nonces, now)
        budget = MAX_AMPLIFICATION * request.size
        if self._send(
            request.sender,
            request.method,
            stun.ERROR,
            request.transaction_id,
            attributes,
            request.key,
            request.sha256,
            request.fingerprint,
            budget,
        ):
            self._count_response(request.method, code)

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
