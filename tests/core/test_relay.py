"""Scripted scenarios for every method and error code of SPEC §1–5."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import stun
from firezone_relay.core.auth import REALM, NonceFactory
from firezone_relay.core.commands import (
    AllocationCreated,
    AllocationDeleted,
    ChannelBound,
    ChannelUnbound,
    ClosePort,
    OpenPort,
    PermissionAdded,
    PermissionRemoved,
    SendDatagram,
)
from firezone_relay.core.relay import RelayConfig

from .harness import (
    CLIENT,
    PEER,
    PUBLIC4,
    PUBLIC6,
    SECRET,
    Driver,
    build,
    credentials,
    error_code,
    make_relay,
    verify_signed,
)

PEER6 = ("2606:4700::1111", 7000)
CLIENT2 = ("198.51.100.8", 40001)


def software(message: stun.Message) -> str | None:
    return message.get_str(stun.SOFTWARE)


class WireTests(SynchronousTestCase):
    def test_port_zero_is_ignored(self) -> None:
        d = Driver(make_relay())
        out, commands = d.client(build(stun.BINDING, d.next_tid(), []), ("198.51.100.7", 0))
        self.assertIsNone(out)
        self.assertEqual(commands, [])

    def test_garbage_is_dropped_without_reply(self) -> None:
        d = Driver(make_relay())
        for junk in [b"", b"\x00", b"\xff" * 40, b"\x80\x01\x00\x00", b"\x00\x01\x00\x00" + b"\x00" * 16, b"\x40\x00\x00"]:
            out, commands = d.client(junk)
            self.assertIsNone(out)
            self.assertEqual(commands, [])
        self.assertGreater(sum(d.relay.stats.dropped.values()), 0)

    def test_malformed_attribute_in_request_gets_400(self) -> None:
        d = Driver(make_relay())
        raw = bytearray(build(stun.ALLOCATE, d.next_tid(), [(stun.XOR_PEER_ADDRESS, PEER)]))
        raw[20 + 5] = 0x07  # unknown address family
        reply = d.request(bytes(raw))
        self.assertEqual(reply.msg_class, stun.ERROR)
        self.assertEqual(error_code(reply), 400)
        # Unauthenticated: no SOFTWARE (SPEC §1/§5), the error code first.
        self.assertEqual([t for t, _ in reply.attributes], [stun.ERROR_CODE])

    def test_malformed_indication_gets_nothing(self) -> None:
        d = Driver(make_relay())
        raw = bytearray(build(stun.SEND, d.next_tid(), [(stun.XOR_PEER_ADDRESS, PEER)], cls=stun.INDICATION))
        raw[20 + 5] = 0x07
        out, commands = d.client(bytes(raw))
        self.assertEqual(commands, [])

    def test_unknown_method_request_gets_400(self) -> None:
        d = Driver(make_relay())
        reply = d.request(build(0x0AB, d.next_tid(), []))
        self.assertEqual(reply.method, 0x0AB)
        self.assertEqual(error_code(reply), 400)

    def test_responses_and_indications_from_clients_are_dropped(self) -> None:
        d = Driver(make_relay())
        for cls in (stun.SUCCESS, stun.ERROR, stun.INDICATION):
            out, commands = d.client(build(stun.BINDING, d.next_tid(), [], cls=cls))
            self.assertEqual(commands, [])

    def test_wrong_fingerprint_is_dropped_silently(self) -> None:
        d = Driver(make_relay())
        raw = bytearray(stun.encode(stun.BINDING, stun.REQUEST, d.next_tid(), [], fingerprint=True))
        raw[-1] ^= 1
        out, commands = d.client(bytes(raw))
        self.assertEqual(commands, [])

    def test_fingerprint_is_mirrored(self) -> None:
        d = Driver(make_relay())
        with_fp = d.request(stun.encode(stun.BINDING, stun.REQUEST, d.next_tid(), [], fingerprint=True))
        self.assertTrue(with_fp.has_fingerprint)
        without = d.request(build(stun.BINDING, d.next_tid(), []))
        self.assertFalse(without.has_fingerprint)
        signed = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], fingerprint=True))
        self.assertTrue(signed.has_fingerprint)
        self.assertTrue(verify_signed(signed, credentials()))

    def test_unknown_comprehension_required_attribute_gets_420(self) -> None:
        d = Driver(make_relay())
        reply = d.request(
            d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17), (0x7F01, b"\x01\x02"), (0x0024, b"1234")])
        )
        self.assertEqual(error_code(reply), 420)
        self.assertEqual(reply.get(stun.UNKNOWN_ATTRIBUTES), (0x7F01, 0x0024))
        self.assertTrue(verify_signed(reply, credentials()))
        binding = d.request(build(stun.BINDING, d.next_tid(), [(0x7F01, b"")]))
        self.assertEqual(error_code(binding), 420)

    def test_unknown_comprehension_optional_attribute_is_ignored(self) -> None:
        d = Driver(make_relay())
        reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17), (0xC057, b"\x00\x01\x00\x02")]))
        self.assertEqual(reply.msg_class, stun.SUCCESS)


class BindingTests(SynchronousTestCase):
    def test_binding_ipv4(self) -> None:
        d = Driver(make_relay())
        reply = d.request(build(stun.BINDING, d.next_tid(), []))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        # Binding is never authenticated: no SOFTWARE (SPEC §1/§5).
        self.assertEqual([t for t, _ in reply.attributes], [stun.XOR_MAPPED_ADDRESS])
        self.assertEqual(reply.get(stun.XOR_MAPPED_ADDRESS), CLIENT)
        self.assertIsNone(software(reply))

    def test_binding_ipv6_sender_replies_on_ipv6(self) -> None:
        d = Driver(make_relay(public_ip6=PUBLIC6))
        sender = ("2001:db8:1::5", 1234)
        out, commands = d.client(build(stun.BINDING, d.next_tid(), []), sender)
        (reply,) = commands
        assert isinstance(reply, SendDatagram)
        self.assertEqual((reply.source_port, reply.family, reply.destination), (3478, 6, sender))
        self.assertEqual(stun.decode(reply.payload).get(stun.XOR_MAPPED_ADDRESS), sender)

    def test_binding_ignores_integrity(self) -> None:
        d = Driver(make_relay())
        raw = stun.encode(stun.BINDING, stun.REQUEST, d.next_tid(), [], integrity_key=b"whatever")
        reply = d.request(raw)
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        self.assertEqual(reply.integrity_offset, -1)


class AuthenticationTests(SynchronousTestCase):
    def test_unauthenticated_allocate_gets_401_with_realm_nonce_algorithms(self) -> None:
        d = Driver(make_relay())
        reply = d.request(build(stun.ALLOCATE, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17)]))
        self.assertEqual(error_code(reply), 401)
        self.assertEqual(
            [t for t, _ in reply.attributes],
            [stun.ERROR_CODE, stun.REALM, stun.NONCE, stun.PASSWORD_ALGORITHMS],
        )
        self.assertEqual(reply.get(stun.REALM), REALM)
        nonce = reply.get_str(stun.NONCE) or ""
        self.assertTrue(nonce.startswith("obMatJos2gAAA"))
        self.assertEqual(reply.integrity_offset, -1)
        # A retry with that nonce succeeds.
        ok = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], nonce=nonce))
        self.assertEqual(ok.msg_class, stun.SUCCESS)

    def test_missing_username_or_nonce_or_integrity_is_401(self) -> None:
        d = Driver(make_relay())
        username, password = credentials()
        key = stun.long_term_key(username, REALM, password)
        nonce = d.relay._nonces.issue(CLIENT, d.now)
        cases = [
            stun.encode(stun.ALLOCATE, stun.REQUEST, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17), (stun.NONCE, nonce)], integrity_key=key),
            stun.encode(stun.ALLOCATE, stun.REQUEST, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17), (stun.USERNAME, username)], integrity_key=key),
            stun.encode(stun.ALLOCATE, stun.REQUEST, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17), (stun.USERNAME, username), (stun.NONCE, nonce)]),
        ]
        for raw in cases:
            reply = d.request(raw)
            self.assertEqual(error_code(reply), 401)
            self.assertIsNotNone(reply.get(stun.NONCE))
        self.assertEqual(d.relay.stats.auth_failures["missing_credentials"], 3)

    def test_401_to_a_request_with_a_valid_username_is_signed(self) -> None:
        d = Driver(make_relay())
        username, password = credentials()
        raw = stun.encode(stun.ALLOCATE, stun.REQUEST, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17), (stun.USERNAME, username)])
        reply = d.request(raw)
        self.assertEqual(error_code(reply), 401)
        self.assertTrue(verify_signed(reply, (username, password)))

    def test_stale_forged_or_foreign_nonce_is_438(self) -> None:
        d = Driver(make_relay())
        old = d.relay._nonces.issue(CLIENT, d.now - 600)
        other_client = d.relay._nonces.issue(CLIENT2, d.now)
        forged = NonceFactory(b"x" * 32).issue(CLIENT, d.now)
        for nonce in (old, other_client, forged, "not-a-nonce", "obMatJos2gAAAzz.abc"):
            reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], nonce=nonce))
            self.assertEqual(error_code(reply), 438, nonce)
            self.assertEqual(reply.get(stun.REALM), REALM)
            fresh = reply.get_str(stun.NONCE)
            assert fresh is not None
            self.assertTrue(d.relay._nonces.is_valid(fresh, CLIENT, d.now))
            self.assertTrue(verify_signed(reply, credentials()))

    def test_stale_nonce_checked_before_password(self) -> None:
        d = Driver(make_relay())
        old = d.relay._nonces.issue(CLIENT, d.now - 601)
        reply = d.request(
            d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], nonce=old, creds=(credentials()[0], "wrong"))
        )
        self.assertEqual(error_code(reply), 438)

    def test_nonce_valid_for_600_seconds(self) -> None:
        d = Driver(make_relay())
        nonce = d.relay._nonces.issue(CLIENT, d.now)
        d.now += 599
        reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], nonce=nonce))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        d.now += 1
        reply = d.request(d.signed(stun.REFRESH, [], nonce=nonce))
        self.assertEqual(error_code(reply), 438)

    def test_wrong_password_is_401_signed(self) -> None:
        d = Driver(make_relay())
        username, _ = credentials()
        reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], creds=(username, "wrong")))
        self.assertEqual(error_code(reply), 401)
        self.assertTrue(verify_signed(reply, credentials()))
        self.assertEqual(d.relay.stats.auth_failures["bad_integrity"], 1)

    def test_credentials_of_another_secret_fail(self) -> None:
        d = Driver(make_relay())
        creds = credentials(secret="another secret")
        reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], creds=creds))
        self.assertEqual(error_code(reply), 401)

    def test_expired_credentials_are_401(self) -> None:
        d = Driver(make_relay())
        creds = credentials(expiry=d.now - 1)
        reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], creds=creds))
        self.assertEqual(error_code(reply), 401)
        self.assertEqual(d.relay.stats.auth_failures["expired"], 1)

    def test_malformed_username_gets_unsigned_401(self) -> None:
        d = Driver(make_relay())
        for username in ("alice", "12:34:56", "-5:salt", "x:salt", "99999999999999999999999:salt"):
            reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], creds=(username, "pw")))
            self.assertEqual(error_code(reply), 401, username)
            self.assertEqual(reply.integrity_offset, -1)

    def test_message_integrity_sha256_with_password_algorithm(self) -> None:
        d = Driver(make_relay())
        reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], sha256=True))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        self.assertGreaterEqual(reply.integrity_sha256_offset, 0)
        self.assertEqual(reply.integrity_offset, -1)
        self.assertTrue(verify_signed(reply, credentials(), sha256=True))

    def test_password_algorithms_mismatch_is_400(self) -> None:
        d = Driver(make_relay())
        username, password = credentials()
        nonce = d.relay._nonces.issue(CLIENT, d.now)
        key = stun.long_term_key(username, REALM, password)
        raw = stun.encode(
            stun.ALLOCATE,
            stun.REQUEST,
            d.next_tid(),
            [
                (stun.REQUESTED_TRANSPORT, 17),
                (stun.USERNAME, username),
                (stun.REALM, REALM),
                (stun.NONCE, nonce),
                (stun.PASSWORD_ALGORITHM, (stun.ALGORITHM_MD5, b"")),  # without PASSWORD-ALGORITHMS
            ],
            integrity_key=key,
        )
        self.assertEqual(error_code(d.request(raw)), 400)

    def test_attributes_after_message_integrity_are_ignored(self) -> None:
        d = Driver(make_relay())
        raw = d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
        # Append LIFETIME=5 after MESSAGE-INTEGRITY (and fix the header length).
        tail = b"\x00\x0d\x00\x04\x00\x00\x00\x05"
        raw = raw[:2] + (len(raw) - 20 + len(tail)).to_bytes(2, "big") + raw[4:] + tail
        reply = d.request(raw)
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        self.assertEqual(reply.get(stun.LIFETIME), 600)

    def test_unauthenticated_replies_are_rate_limited_per_source_ip(self) -> None:
        d = Driver(make_relay(unauthenticated_burst=5, unauthenticated_rate=1.0))
        answered = 0
        for i in range(20):
            _, commands = d.client(build(stun.ALLOCATE, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17)]), ("203.0.113.9", 1000 + i))
            answered += len(commands)
        self.assertEqual(answered, 5)
        # Another source IP is not affected, and the bucket refills with time.
        self.assertEqual(len(d.client(build(stun.BINDING, d.next_tid(), []), ("203.0.113.10", 1))[1]), 1)
        d.now += 2
        self.assertEqual(len(d.client(build(stun.BINDING, d.next_tid(), []), ("203.0.113.9", 1))[1]), 1)
        self.assertGreaterEqual(d.relay.stats.dropped["rate_limited"], 15)


class AllocateTests(SynchronousTestCase):
    def test_allocate_success_layout(self) -> None:
        d = Driver(make_relay())
        reply = d.allocate()
        self.assertEqual(
            [t for t, _ in reply.attributes],
            [stun.SOFTWARE, stun.XOR_RELAYED_ADDRESS, stun.XOR_MAPPED_ADDRESS, stun.LIFETIME, stun.MESSAGE_INTEGRITY],
        )
        relayed = reply.get_address(stun.XOR_RELAYED_ADDRESS)
        assert relayed is not None
        self.assertEqual(relayed[0], PUBLIC4)
        self.assertTrue(49152 <= relayed[1] <= 65535)
        self.assertEqual(reply.get(stun.XOR_MAPPED_ADDRESS), CLIENT)
        self.assertEqual(reply.get(stun.LIFETIME), 600)
        self.assertTrue(verify_signed(reply, credentials()))
        kinds = [type(c) for c in d.commands[-3:]]
        self.assertEqual(kinds, [OpenPort, AllocationCreated, SendDatagram])

    def test_lifetime_capped_at_3600_and_default_600(self) -> None:
        d = Driver(make_relay())
        reply = d.allocate(extra=[(stun.LIFETIME, 10_000_000)])
        self.assertEqual(reply.get(stun.LIFETIME), 3600)
        self.assertEqual(d.relay.poll_timeout(), d.now + 3600)

    def test_deallocate_once_time_expired(self) -> None:
        d = Driver(make_relay())
        port = d.relayed_port(d.allocate(extra=[(stun.LIFETIME, 700)]))
        self.assertEqual(d.relay.poll_timeout(), d.now + 700)
        self.assertEqual(d.advance(699), [])
        commands = d.advance(2)
        self.assertEqual([c for c in commands if isinstance(c, ClosePort)], [ClosePort(port, 4)])
        self.assertEqual(d.relay.allocation_count, 0)
        self.assertIsNone(d.relay.poll_timeout())

    def test_missing_requested_transport_is_400(self) -> None:
        d = Driver(make_relay())
        reply = d.request(d.signed(stun.ALLOCATE, []))
        self.assertEqual(error_code(reply), 400)
        self.assertTrue(verify_signed(reply, credentials()))

    def test_tcp_transport_is_442(self) -> None:
        d = Driver(make_relay())
        reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 6)]))
        self.assertEqual(error_code(reply), 442)

    def test_second_allocate_same_five_tuple_is_437(self) -> None:
        d = Driver(make_relay())
        d.allocate()
        reply = d.allocate()
        self.assertEqual(error_code(reply), 437)
        self.assertTrue(verify_signed(reply, credentials()))

    def test_retransmitted_allocate_gets_the_same_success(self) -> None:
        d = Driver(make_relay())
        raw = d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
        first = d.request(raw)
        second = d.request(raw)
        self.assertEqual(first.raw, second.raw)
        self.assertEqual(d.relay.allocation_count, 1)

    def test_requested_family_ipv6(self) -> None:
        d = Driver(make_relay(public_ip6=PUBLIC6))
        reply = d.allocate(extra=[(stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV6)])
        relayed = reply.get_address(stun.XOR_RELAYED_ADDRESS)
        assert relayed is not None
        self.assertEqual(relayed[0], PUBLIC6)
        self.assertIn(OpenPort(relayed[1], 6, False), d.commands)

    def test_dual_allocation_two_relayed_addresses_same_port(self) -> None:
        d = Driver(make_relay(public_ip6=PUBLIC6))
        reply = d.allocate(extra=[(stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6)])
        relayed = reply.get_all(stun.XOR_RELAYED_ADDRESS)
        self.assertEqual(len(relayed), 2)
        (ip4, port4), (ip6, port6) = relayed  # type: ignore[misc]
        self.assertEqual((ip4, ip6), (PUBLIC4, PUBLIC6))
        self.assertEqual(port4, port6)
        self.assertEqual(d.relay.allocation_count_by_family(), {4: 1, 6: 1})

    def test_address_family_rules(self) -> None:
        v4_only = Driver(make_relay())
        self.assertEqual(error_code(v4_only.allocate(extra=[(stun.REQUESTED_ADDRESS_FAMILY, 2)])), 440)
        self.assertEqual(error_code(v4_only.allocate(CLIENT2, extra=[(stun.REQUESTED_ADDRESS_FAMILY, 3)])), 440)
        # Additional IPv6 on a v4-only relay: IPv4 only (upstream).
        partial = v4_only.allocate(("198.51.100.9", 1), extra=[(stun.ADDITIONAL_ADDRESS_FAMILY, 2)])
        self.assertEqual(len(partial.get_all(stun.XOR_RELAYED_ADDRESS)), 1)
        v6_only = Driver(make_relay(public_ip4=None, public_ip6=PUBLIC6))
        self.assertEqual(error_code(v6_only.allocate()), 440)
        both = Driver(make_relay(public_ip6=PUBLIC6))
        self.assertEqual(
            error_code(both.allocate(extra=[(stun.REQUESTED_ADDRESS_FAMILY, 1), (stun.ADDITIONAL_ADDRESS_FAMILY, 2)])),
            400,
        )
        self.assertEqual(error_code(both.allocate(extra=[(stun.ADDITIONAL_ADDRESS_FAMILY, 1)])), 400)

    def test_even_port_with_reservation(self) -> None:
        d = Driver(make_relay())
        reply = d.allocate(extra=[(stun.EVEN_PORT, True)])
        port = d.relayed_port(reply)
        self.assertEqual(port % 2, 0)
        token = reply.get_bytes(stun.RESERVATION_TOKEN)
        assert token is not None
        self.assertEqual(len(token), 8)
        second = d.allocate(CLIENT2, extra=[(stun.RESERVATION_TOKEN, token)])
        self.assertEqual(d.relayed_port(second), port + 1)
        # A token is used once.
        self.assertEqual(error_code(d.allocate(("198.51.100.10", 9), extra=[(stun.RESERVATION_TOKEN, token)])), 508)

    def test_even_port_without_reservation(self) -> None:
        d = Driver(make_relay())
        reply = d.allocate(extra=[(stun.EVEN_PORT, False)])
        self.assertEqual(d.relayed_port(reply) % 2, 0)
        self.assertIsNone(reply.get(stun.RESERVATION_TOKEN))

    def test_reservation_expires_after_30_seconds(self) -> None:
        d = Driver(make_relay())
        token = d.allocate(extra=[(stun.EVEN_PORT, True)]).get_bytes(stun.RESERVATION_TOKEN)
        d.advance(31)
        self.assertEqual(error_code(d.allocate(CLIENT2, extra=[(stun.RESERVATION_TOKEN, token)])), 508)

    def test_reservation_token_with_even_port_is_400(self) -> None:
        d = Driver(make_relay())
        reply = d.allocate(extra=[(stun.RESERVATION_TOKEN, b"12345678"), (stun.EVEN_PORT, False)])
        self.assertEqual(error_code(reply), 400)

    def test_dont_fragment_is_passed_to_the_port(self) -> None:
        d = Driver(make_relay())
        port = d.relayed_port(d.allocate(extra=[(stun.DONT_FRAGMENT, True)]))
        self.assertIn(OpenPort(port, 4, True), d.commands)

    def test_busy_port_is_skipped(self) -> None:
        relay = make_relay(lowest_port=50000, highest_port=50003)
        d = Driver(relay)
        d.busy_ports = {50000, 50001, 50002}
        self.assertEqual(d.relayed_port(d.allocate()), 50003)

    def test_range_exhausted_is_508(self) -> None:
        d = Driver(make_relay(lowest_port=50000, highest_port=50001))
        d.allocate(("198.51.100.1", 1))
        d.allocate(("198.51.100.2", 1))
        self.assertEqual(error_code(d.allocate(("198.51.100.3", 1))), 508)
        d.busy_ports = {50000, 50001}
        d.advance(601)
        self.assertEqual(error_code(d.allocate(("198.51.100.4", 1))), 508)
        self.assertEqual(d.relay.memory_footprint()["used_ports"], 0)
        d.busy_ports = set()
        self.assertEqual(d.allocate(("198.51.100.4", 2)).msg_class, stun.SUCCESS)

    def test_max_allocations_is_508(self) -> None:
        d = Driver(make_relay(max_allocations=1))
        d.allocate()
        self.assertEqual(error_code(d.allocate(CLIENT2)), 508)

    def test_user_allocation_limit_replaces_oldest(self) -> None:
        d = Driver(make_relay(user_allocation_limit=1))
        first = d.relayed_port(d.allocate())
        second = d.relayed_port(d.allocate(CLIENT2))
        deleted = [c for c in d.commands if isinstance(c, AllocationDeleted)]
        self.assertEqual(deleted, [AllocationDeleted(CLIENT, credentials()[0], first, "replaced")])
        self.assertEqual(d.relay.allocation_count, 1)
        self.assertNotEqual(first, second)

    def test_no_user_limit_in_standalone(self) -> None:
        d = Driver(make_relay(user_allocation_limit=0))
        d.allocate()
        d.allocate(CLIENT2)
        self.assertEqual(d.relay.allocation_count, 2)

    def test_draining_refuses_new_allocations_only(self) -> None:
        d = Driver(make_relay())
        d.allocate()
        d.relay.start_draining()
        self.assertEqual(error_code(d.allocate(CLIENT2)), 508)
        self.assertEqual(d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 300)])).msg_class, stun.SUCCESS)


class RefreshTests(SynchronousTestCase):
    def test_refresh_without_allocation_is_437(self) -> None:
        d = Driver(make_relay())
        self.assertEqual(error_code(d.request(d.signed(stun.REFRESH, []))), 437)

    def test_refreshed_in_time_does_not_expire(self) -> None:
        d = Driver(make_relay())
        d.allocate(extra=[(stun.LIFETIME, 100)])
        d.advance(50)
        reply = d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 100)]))
        self.assertEqual(reply.get(stun.LIFETIME), 100)
        self.assertEqual(d.advance(99), [])
        self.assertEqual(d.relay.allocation_count, 1)
        self.assertTrue(any(isinstance(c, ClosePort) for c in d.advance(1)))

    def test_refresh_zero_deletes(self) -> None:
        d = Driver(make_relay(allow_loopback_peers=True))
        port = d.relayed_port(d.allocate())
        d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)]))
        _, commands = d.client(d.signed(stun.REFRESH, [(stun.LIFETIME, 0)]))
        kinds = [type(c) for c in commands]
        self.assertEqual(kinds, [ChannelUnbound, PermissionRemoved, ClosePort, AllocationDeleted, SendDatagram])
        reply = stun.decode(commands[-1].payload)  # type: ignore[union-attr]
        self.assertEqual(reply.get(stun.LIFETIME), 0)
        self.assertEqual(d.relay.channel_count, 0)
        self.assertEqual(d.advance(700), [])
        self.assertEqual(set(d.relay.memory_footprint().values()), {0})
        self.assertNotIn((port, 4), d.open_ports)

    def test_refresh_with_other_username_is_441(self) -> None:
        d = Driver(make_relay())
        d.allocate()
        other = credentials(salt="someone-else")
        self.assertEqual(error_code(d.request(d.signed(stun.REFRESH, [], creds=other))), 441)

    def test_refresh_family_mismatch_is_443(self) -> None:
        d = Driver(make_relay(public_ip6=PUBLIC6))
        d.allocate()
        self.assertEqual(error_code(d.request(d.signed(stun.REFRESH, [(stun.REQUESTED_ADDRESS_FAMILY, 2)]))), 443)


class PermissionAndChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.d = Driver(make_relay(public_ip6=PUBLIC6))
        self.port = self.d.relayed_port(self.d.allocate())

    def bind(self, number: int, peer: stun.Address) -> stun.Message:
        return self.d.request(self.d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, number), (stun.XOR_PEER_ADDRESS, peer)]))

    def permit(self, *peers: stun.Address) -> stun.Message:
        return self.d.request(self.d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, p) for p in peers]))

    def test_create_permission_installs_for_300_seconds(self) -> None:
        self.assertEqual(self.permit(PEER, ("1.1.1.1", 9)).msg_class, stun.SUCCESS)
        self.assertEqual(self.d.relay.permission_count, 2)
        out, _ = self.d.peer(b"hi", ("8.8.4.4", 12345), self.port)
        assert out is not None
        indication = stun.decode(out[3])
        self.assertEqual((indication.method, indication.msg_class), (stun.DATA_METHOD, stun.INDICATION))
        self.assertEqual(indication.get(stun.DATA), b"hi")
        self.assertEqual(indication.get(stun.XOR_PEER_ADDRESS), ("8.8.4.4", 12345))
        self.assertEqual(out[2], CLIENT)
        removed = [c for c in self.d.advance(300) if isinstance(c, PermissionRemoved)]
        self.assertEqual(len(removed), 2)
        self.assertIsNone(self.d.peer(b"hi", PEER, self.port)[0])

    def test_create_permission_needs_allocation(self) -> None:
        self.assertEqual(error_code(self.d.request(self.d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, PEER)], CLIENT2), CLIENT2)), 437)

    def test_create_permission_without_peer_is_400(self) -> None:
        self.assertEqual(error_code(self.d.request(self.d.signed(stun.CREATE_PERMISSION, []))), 400)

    def test_create_permission_family_mismatch_is_443(self) -> None:
        self.assertEqual(error_code(self.permit(PEER6)), 443)

    def test_create_permission_denied_peer_is_403(self) -> None:
        for peer in [("10.0.0.1", 1), ("127.0.0.1", 1), ("169.254.169.254", 80), ("0.0.0.0", 1), ("192.168.1.1", 1)]:
            self.assertEqual(error_code(self.permit(peer)), 403, peer)
        self.assertEqual(self.d.relay.permission_count, 0)

    def test_permission_cap_is_508(self) -> None:
        d = Driver(make_relay(max_permissions=2))
        d.allocate()
        d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, ("1.1.1.1", 1)), (stun.XOR_PEER_ADDRESS, ("1.1.1.2", 1))]))
        reply = d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, ("1.1.1.3", 1))]))
        self.assertEqual(error_code(reply), 508)

    def test_channel_bind_and_data_both_ways(self) -> None:
        self.assertEqual(self.bind(0x4000, PEER).msg_class, stun.SUCCESS)
        self.assertIn(ChannelBound(CLIENT, 0x4000, PEER, self.port, 4), self.d.commands)
        self.assertIn(PermissionAdded(CLIENT, self.port, PEER[0]), self.d.commands)
        out, _ = self.d.client(stun.encode_channel_data(0x4000, b"ping") + b"\x00\x00\x00\x00")
        self.assertEqual(out, (self.port, 4, PEER, b"ping"))
        out, _ = self.d.peer(b"pong!", PEER, self.port)
        self.assertEqual(out, (3478, 4, CLIENT, b"\x40\x00\x00\x05pong!"))
        stats = self.d.relay.stats
        self.assertEqual((stats.client_to_peer_packets, stats.client_to_peer_bytes), (1, 4))
        self.assertEqual((stats.peer_to_client_packets, stats.peer_to_client_bytes), (1, 5))

    def test_channel_data_length_beyond_datagram_is_dropped(self) -> None:
        self.bind(0x4000, PEER)
        out, _ = self.d.client(b"\x40\x00\x00\x10abc")
        self.assertIsNone(out)

    def test_channel_data_on_unbound_channel_or_other_client_is_dropped(self) -> None:
        self.bind(0x4000, PEER)
        self.assertIsNone(self.d.client(stun.encode_channel_data(0x4001, b"x"))[0])
        self.assertIsNone(self.d.client(stun.encode_channel_data(0x4000, b"x"), CLIENT2)[0])
        # Another port of the same peer IP has the permission but no channel: a Data indication.
        out, _ = self.d.peer(b"x", ("8.8.4.4", 5001), self.port)
        assert out is not None
        self.assertEqual(stun.decode(out[3]).method, stun.DATA_METHOD)

    def test_channel_number_range(self) -> None:
        self.assertEqual(error_code(self.bind(0x3FFF, PEER)), 400)
        self.assertEqual(error_code(self.bind(0x8000, PEER)), 400)
        self.assertEqual(self.bind(0x7FFF, PEER).msg_class, stun.SUCCESS)

    def test_channel_bind_missing_attributes_is_400(self) -> None:
        d = self.d
        self.assertEqual(error_code(d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000)]))), 400)
        self.assertEqual(error_code(d.request(d.signed(stun.CHANNEL_BIND, [(stun.XOR_PEER_ADDRESS, PEER)]))), 400)

    def test_channel_bind_conflicts_are_400(self) -> None:
        self.bind(0x4000, PEER)
        self.assertEqual(error_code(self.bind(0x4000, ("1.1.1.1", 1))), 400)
        self.assertEqual(error_code(self.bind(0x4001, PEER)), 400)
        self.assertEqual(self.bind(0x4000, PEER).msg_class, stun.SUCCESS)  # same pair refreshes

    def test_channel_bind_family_mismatch_and_denied_peer(self) -> None:
        self.assertEqual(error_code(self.bind(0x4000, PEER6)), 443)
        self.assertEqual(error_code(self.bind(0x4000, ("10.1.2.3", 5))), 403)
        self.assertEqual(error_code(self.bind(0x4000, (PUBLIC4, 3478))), 403)

    def test_channel_bind_needs_allocation(self) -> None:
        d = self.d
        raw = d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)], CLIENT2)
        self.assertEqual(error_code(d.request(raw, CLIENT2)), 437)

    def test_channel_cap_is_508(self) -> None:
        d = Driver(make_relay(max_channels=1))
        d.allocate()
        d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)]))
        reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4001), (stun.XOR_PEER_ADDRESS, ("1.1.1.1", 1))]))
        self.assertEqual(error_code(reply), 508)

    def test_channel_expiry_and_reserve(self) -> None:
        d = self.d
        d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 3600)]))
        self.bind(0x4000, PEER)
        self.assertEqual(d.relay.poll_timeout(), d.now + 300)  # the permission
        commands = d.advance(600)
        self.assertIn(ChannelUnbound(CLIENT, 0x4000, PEER, self.port, 4), commands)
        self.assertIsNone(d.client(stun.encode_channel_data(0x4000, b"x"))[0])
        self.assertIsNone(d.peer(b"x", PEER, self.port)[0])
        # During the reserve only the same pair may bind.
        self.assertEqual(error_code(self.bind(0x4000, ("1.1.1.1", 1))), 400)
        self.assertEqual(error_code(self.bind(0x4001, PEER)), 400)
        d.advance(300)
        self.assertEqual(self.bind(0x4000, ("1.1.1.1", 1)).msg_class, stun.SUCCESS)

    def test_rebinding_in_reserve_reactivates(self) -> None:
        d = self.d
        d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 3600)]))
        self.bind(0x4000, PEER)
        d.advance(601)
        self.assertEqual(self.bind(0x4000, PEER).msg_class, stun.SUCCESS)
        self.assertEqual(d.client(stun.encode_channel_data(0x4000, b"x"))[0], (self.port, 4, PEER, b"x"))
        bound = [c for c in d.commands if isinstance(c, ChannelBound)]
        self.assertEqual(len(bound), 2)

    def test_channel_bind_refresh_extends(self) -> None:
        d = self.d
        d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 3600)]))
        self.bind(0x4000, PEER)
        d.advance(500)
        self.bind(0x4000, PEER)
        d.advance(500)
        self.assertEqual(d.client(stun.encode_channel_data(0x4000, b"x"))[0], (self.port, 4, PEER, b"x"))

    def test_ipv6_peer_on_dual_allocation(self) -> None:
        d = Driver(make_relay(public_ip6=PUBLIC6))
        port = d.relayed_port(d.allocate(extra=[(stun.ADDITIONAL_ADDRESS_FAMILY, 2)]))
        reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER6)]))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        self.assertEqual(d.client(stun.encode_channel_data(0x4000, b"6"))[0], (port, 6, PEER6, b"6"))
        self.assertEqual(d.peer(b"back", PEER6, port, 6)[0], (3478, 4, CLIENT, b"\x40\x00\x00\x04back"))

    def test_send_indication_needs_permission(self) -> None:
        d = self.d
        send = build(stun.SEND, d.next_tid(), [(stun.XOR_PEER_ADDRESS, PEER), (stun.DATA, b"hello")], cls=stun.INDICATION)
        self.assertEqual(d.client(send)[1], [])
        self.permit(PEER)
        out, commands = d.client(send)
        self.assertEqual(commands, [SendDatagram(self.port, 4, PEER, b"hello")])
        # Not from another client, and not after the permission expired.
        self.assertEqual(d.client(send, CLIENT2)[1], [])
        d.advance(300)
        self.assertEqual(d.client(send)[1], [])

    def test_peer_traffic_with_channel_prefers_channel_data(self) -> None:
        self.permit(PEER)
        self.bind(0x4002, PEER)
        out, _ = self.d.peer(b"z", PEER, self.port)
        self.assertEqual(out, (3478, 4, CLIENT, b"\x40\x02\x00\x01z"))

    def test_unknown_allocation_port_is_dropped(self) -> None:
        self.assertIsNone(self.d.peer(b"z", PEER, 1234)[0])


class HairpinTests(SynchronousTestCase):
    def test_channel_to_another_allocation_on_this_relay(self) -> None:
        d = Driver(make_relay())
        port_a = d.relayed_port(d.allocate(CLIENT))
        port_b = d.relayed_port(d.allocate(CLIENT2, creds=credentials(salt="b")))
        d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, (PUBLIC4, port_b))]))
        d.request(
            d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4001), (stun.XOR_PEER_ADDRESS, (PUBLIC4, port_a))], CLIENT2, credentials(salt="b")),
            CLIENT2,
        )
        out, commands = d.client(stun.encode_channel_data(0x4000, b"a->b"))
        self.assertEqual(out, (3478, 4, CLIENT2, b"\x40\x01\x00\x04a->b"))
        out, commands = d.client(stun.encode_channel_data(0x4001, b"b->a"), CLIENT2)
        self.assertEqual(out, (3478, 4, CLIENT, b"\x40\x00\x00\x04b->a"))


class TimerTests(SynchronousTestCase):
    def test_poll_timeout_is_earliest_deadline(self) -> None:
        d = Driver(make_relay())
        self.assertIsNone(d.relay.poll_timeout())
        d.allocate(extra=[(stun.LIFETIME, 1000)])
        self.assertEqual(d.relay.poll_timeout(), d.now + 1000)
        d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, PEER)]))
        self.assertEqual(d.relay.poll_timeout(), d.now + 300)
        d.advance(100)
        d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, PEER)]))
        self.assertEqual(d.relay.poll_timeout(), d.now + 300)
        d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 10)]))
        self.assertEqual(d.relay.poll_timeout(), d.now + 10)

    def test_repeated_refresh_does_not_grow_the_heap(self) -> None:
        d = Driver(make_relay())
        d.allocate(extra=[(stun.LIFETIME, 3600)])
        for i in range(2000):
            d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 1 + (i % 2) * 3599)]))
        self.assertLess(len(d.relay._timers), 100)


class ConfigTests(SynchronousTestCase):
    def test_bad_configs_are_refused(self) -> None:
        with self.assertRaises(ValueError):
            RelayConfig(auth_secret=SECRET)
        with self.assertRaises(ValueError):
            RelayConfig(auth_secret=SECRET, public_ip4=PUBLIC4, lowest_port=60000, highest_port=50000)
        with self.assertRaises(ValueError):
            RelayConfig(auth_secret=SECRET, public_ip4=PUBLIC4, listen_port=50000)
        with self.assertRaises(ValueError):
            RelayConfig(auth_secret="", public_ip4=PUBLIC4)


class StreamClientTests(SynchronousTestCase):
    """Stream (TCP/TLS) clients are ``(ip, port, connection_id)``: never confused with UDP."""

    STREAM = ("198.51.100.7", 40000, 7)

    def test_stream_client_allocation_is_separate_from_udp(self) -> None:
        d = Driver(make_relay())
        udp_port = d.relayed_port(d.allocate(CLIENT))
        reply = d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], self.STREAM), self.STREAM)
        self.assertEqual(reply.get(stun.XOR_MAPPED_ADDRESS), CLIENT)
        self.assertNotEqual(d.relayed_port(reply), udp_port)
        self.assertEqual(d.relay.allocation_count, 2)

    def test_stream_channel_data_is_padded(self) -> None:
        d = Driver(make_relay())
        port = d.relayed_port(d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], self.STREAM), self.STREAM))
        d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)], self.STREAM), self.STREAM)
        self.assertEqual(d.client(stun.encode_channel_data(0x4000, b"abcde", pad=True), self.STREAM)[0], (port, 4, PEER, b"abcde"))
        out, _ = d.peer(b"abcde", PEER, port)
        self.assertEqual(out, (3478, 4, self.STREAM, b"\x40\x00\x00\x05abcde\x00\x00\x00"))

    def test_closing_the_connection_deletes_the_allocation(self) -> None:
        d = Driver(make_relay())
        port = d.relayed_port(d.request(d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], self.STREAM), self.STREAM))
        d.relay.handle_client_closed(self.STREAM, d.now)
        commands = d.drain()
        self.assertIn(ClosePort(port, 4), commands)
        self.assertEqual(d.relay.allocation_count, 0)
        d.relay.handle_client_closed(self.STREAM, d.now)  # twice is harmless
        self.assertEqual(d.drain(), [])
        self.assertEqual(set(d.relay.memory_footprint().values()), {0})


class SignedDecodeErrorTests(SynchronousTestCase):
    def test_400_for_a_malformed_attribute_after_a_firezone_username_is_signed(self) -> None:
        d = Driver(make_relay())
        username, password = credentials()
        raw = bytearray(build(stun.ALLOCATE, d.next_tid(), [(stun.USERNAME, username), (stun.XOR_PEER_ADDRESS, PEER)]))
        offset = 20 + 4 + ((len(username.encode()) + 3) & ~3)
        raw[offset + 5] = 0x07  # XOR-PEER-ADDRESS with an unknown family
        reply = d.request(bytes(raw))
        self.assertEqual(error_code(reply), 400)
        self.assertTrue(verify_signed(reply, (username, password)))


class StreamRateLimitTests(SynchronousTestCase):
    def test_stream_clients_are_not_rate_limited(self) -> None:
        d = Driver(make_relay(unauthenticated_burst=2, unauthenticated_rate=1.0))
        for i in range(10):
            stream = ("203.0.113.9", 1000 + i, i)
            _, commands = d.client(build(stun.ALLOCATE, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17)]), stream)
            self.assertEqual(len(commands), 1)
