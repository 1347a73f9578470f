"""The checks every authenticated TURN request starts with, before its own.

RFC 8489 §9.2 authentication (the rules are in ``auth``; a failure queues
the 401/438 challenge or the 400), then 420 for unknown
comprehension-required attributes (RFC 8489 §6.3.1.1; SPEC §1 bounds the
list), then, for the requests on an existing allocation (Refresh,
CreatePermission, ChannelBind), the sender's own active allocation: 437
(RFC 8656 §7) or 441 (§5, the wrong credentials).  ``RequestChecks`` is a
base of ``Relay``; the request handlers in ``relay.py`` call it first.
"""

from __future__ import annotations

from typing import Optional

from . import auth, stun
from .allocation import Allocation
from .auth import Request
from .replies import Replies

#: SPEC §1: a 420 lists at most this many attribute types in UNKNOWN-ATTRIBUTES.
MAX_UNKNOWN_LISTED = 16


class RequestChecks(Replies):
    """The common preamble of the request handlers (see the module docstring)."""

    def _authenticate(self, message: stun.Message, request: Request, now: float) -> bool:
        """RFC 8489 §9.2 (``auth.authenticate``); on failure the reply
        (401/438 challenge, or 400) is queued and False returned."""
        failure = auth.authenticate(
            message, request, self._nonces, self.config.auth_secret, self.config.realm, self.config.rest_secrets, now
        )
        if failure is None:
            return True
        reason, code = failure
        self.stats.auth_failure(reason)
        if code == 400:
            self._error(request, 400, now)
        else:
            self._challenge(request, code, now)
        return False

    def _unknown_attributes(self, message: stun.Message, request: Request, now: float) -> bool:
        """420 listing the distinct unknown comprehension-required types,
        first ones first, at most ``MAX_UNKNOWN_LISTED`` (SPEC §1); True when
        it was queued."""
        if not message.unknown_required:
            return False
        listed = tuple(dict.fromkeys(message.unknown_required))[:MAX_UNKNOWN_LISTED]
        self._error(request, 420, now, [(stun.UNKNOWN_ATTRIBUTES, listed)])
        return True

    def _common_checks(self, message: stun.Message, request: Request, now: float) -> bool:
        """Authentication, then 420 for unknown comprehension-required attributes."""
        return self._authenticate(message, request, now) and not self._unknown_attributes(message, request, now)

    def _owned_allocation(
        self, message: stun.Message, request: Request, now: float, any_username: bool = False
    ) -> Optional[Allocation]:
        """After ``_common_checks``, the sender's active allocation, else 437;
        wrong username → 441 unless ``any_username`` (an authenticated
        delete from the 5-tuple).  ``None`` when a reply has been queued."""
        if not self._common_checks(message, request, now):
            return None
        alloc = self._allocations.get(request.sender)
        if alloc is None or not alloc.active:
            self._error(request, 437, now)
            return None
        if alloc.username != request.username and not any_username:
            self._error(request, 441, now)
            return None
        return alloc
