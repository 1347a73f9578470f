"""``checks.RequestChecks``: the first checks of every authenticated request,
in their order (authentication, 420, then 437/441 on an existing allocation).
The per-request behaviour is also covered in test_relay; this pins the
order the handlers rely on."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import stun
from firezone_relay.core.checks import MAX_UNKNOWN_LISTED

from .harness import Driver, build, credentials, error_code, make_relay, verify_signed

UNKNOWN = [(0x7F00 + i, b"") for i in range(MAX_UNKNOWN_LISTED + 4)]


class RequestChecksTests(SynchronousTestCase):
    def test_authentication_comes_before_420(self) -> None:
        """An unsigned request with unknown required attributes is challenged, not told 420."""
        d = Driver(make_relay())
        reply = d.request(build(stun.ALLOCATE, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17), *UNKNOWN]))
        self.assertEqual(error_code(reply), 401)

    def test_420_lists_distinct_types_first_ones_first_and_bounded(self) -> None:
        d = Driver(make_relay())
        attributes = [(stun.REQUESTED_TRANSPORT, 17), (0x7E01, b""), (0x7E01, b"x"), *UNKNOWN]
        reply = d.request(d.signed(stun.ALLOCATE, attributes))
        self.assertEqual(error_code(reply), 420)
        expected = (0x7E01, *(t for t, _ in UNKNOWN))[:MAX_UNKNOWN_LISTED]
        self.assertEqual(reply.get(stun.UNKNOWN_ATTRIBUTES), expected)
        self.assertTrue(verify_signed(reply, credentials()))
        self.assertEqual(d.relay.allocation_count, 0)

    def test_420_comes_before_437(self) -> None:
        d = Driver(make_relay())
        reply = d.request(d.signed(stun.REFRESH, [(0x7E01, b"")]))
        self.assertEqual(error_code(reply), 420)

    def test_437_comes_before_441(self) -> None:
        """Without an allocation, another user's credentials get 437, not 441."""
        d = Driver(make_relay())
        other = credentials(salt="someone-else")
        self.assertEqual(error_code(d.request(d.signed(stun.CREATE_PERMISSION, [], creds=other))), 437)

    def test_other_username_may_only_delete(self) -> None:
        """441 for a refresh with another user's credentials; a delete (lifetime 0)
        with them from the same 5-tuple succeeds (a Firezone client's network reset)."""
        d = Driver(make_relay())
        d.allocate()
        other = credentials(salt="someone-else")
        self.assertEqual(error_code(d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 600)], creds=other))), 441)
        reply = d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 0)], creds=other))
        self.assertEqual(reply.msg_class, stun.SUCCESS, reply)
        self.assertEqual(d.relay.allocation_count, 0)
