"""Hostile-input tests: the peer policy and the CVE checklist (SECURITY.md)."""

from __future__ import annotations

import hmac
import ipaddress
from unittest import mock

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import integrity, stun
from firezone_relay.core.commands import ClosePort, OpenPort, SendDatagram
from firezone_relay.core.policy import (
    DEFAULT_DENY_V4,
    DEFAULT_DENY_V6,
    GLOBAL_EXCEPTIONS_V6,
    GLOBAL_UNICAST_V6,
    PeerPolicy,
)

from .harness import CLIENT, PEER, PUBLIC4, Driver, build, credentials, error_code, make_relay

CLIENT2 = ("198.51.100.8", 40001)


def _neighbours(network: ipaddress._BaseNetwork) -> list[tuple[str, bool]]:
    """(address, inside) at and just beyond each end of ``network``."""
    first, last = int(network.network_address), int(network.broadcast_address)
    cls = type(network.network_address)
    top = (1 << network.max_prefixlen) - 1
    out = [(str(cls(first)), True), (str(cls(last)), True)]
    if first > 0:
        out.append((str(cls(first - 1)), False))
    if last < top:
        out.append((str(cls(last + 1)), False))
    return out


def _expected_v4(addr: ipaddress.IPv4Address) -> bool:
    return not any(addr in ipaddress.ip_network(n) for n in DEFAULT_DENY_V4)


def _expected_v6(addr: ipaddress.IPv6Address) -> bool:
    """SPEC §5 restated: NAT64 and 6to4 by their IPv4, else 2000::/3 minus
    the registry's not-globally-reachable blocks (less their exceptions)."""
    if addr in ipaddress.ip_network("64:ff9b::/96"):
        return _expected_v4(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr.sixtofour is not None:
        return _expected_v4(addr.sixtofour)
    if addr not in ipaddress.ip_network(GLOBAL_UNICAST_V6):
        return False
    if any(addr in ipaddress.ip_network(n) for n in GLOBAL_EXCEPTIONS_V6):
        return True
    return not any(addr in ipaddress.ip_network(n) for n in DEFAULT_DENY_V6)


class PolicyBoundaryTests(SynchronousTestCase):
    """Walk the first, last and neighbouring address of every default-deny range."""

    def test_every_default_range_boundary(self) -> None:
        policy = PeerPolicy()
        v4 = [ipaddress.ip_network(n) for n in DEFAULT_DENY_V4]
        for network in v4:
            for address, inside in _neighbours(network):
                addr = ipaddress.ip_address(address)
                expected = not any(addr in n for n in v4)
                self.assertEqual(policy.is_allowed(address), expected, (str(network), address, inside))
        # IPv6 is an allow-list: 2000::/3 minus the registry's special blocks.
        v6 = [ipaddress.ip_network(n) for n in DEFAULT_DENY_V6 + GLOBAL_EXCEPTIONS_V6 + (GLOBAL_UNICAST_V6,)]
        v6 += [ipaddress.ip_network(n) for n in ("64:ff9b::/96", "2002::/16", "::ffff:0:0:0/96", "5f00::/16", "::/8")]
        for network in v6:
            for address, inside in _neighbours(network):
                addr = ipaddress.ip_address(address)
                self.assertEqual(policy.is_allowed(address), _expected_v6(addr), (str(network), address, inside))

    def test_embedded_ipv4_is_unwrapped(self) -> None:
        policy = PeerPolicy()
        for ip in ["::ffff:127.0.0.1", "::ffff:127.0.0.2", "::ffff:0.0.0.0", "::127.0.0.1", "64:ff9b::7f00:1",
                   "2002:7f00:1::", "64:ff9b::a00:1", "2002:a9fe:a9fe::1", "::ffff:8.8.8.8", "::ffff:169.254.169.254"]:
            self.assertFalse(policy.is_allowed(ip), ip)
        self.assertTrue(policy.is_allowed("64:ff9b::808:808"))
        self.assertTrue(policy.is_allowed("2002:808:808::1"))

    def test_ipv6_allow_list_spellings(self) -> None:
        """Issue 14 item 5: each spelling the review found, and the registry's blocks."""
        policy = PeerPolicy()
        denied = [
            "::ffff:0:7f00:1",  # SIIT form of 127.0.0.1
            "::ffff:0:808:808",  # SIIT of a public IPv4: still not global unicast
            "::1:0:0:1",  # ::/8, neither mapped nor compatible
            "5f00::1",  # segment routing SIDs (RFC 9602)
            "::2:0:0:0", "100::1", "100:0:0:1::1", "200::1", "400::1", "1fff:ffff::1", "4000::1", "e000::1",
            "64:ff9b:1::808:808",  # local-use NAT64: not the well-known prefix
            "2001::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
            "2001:2::1", "2001:10::1", "2001:db8::1", "2001:db8:ffff::1", "3fff::1", "3fff:fff::1",
            "2001:1::4", "2001:1ff::1",  # the rest of 2001::/23
            "2002:7f00:1::", "2002:a00:1::1", "2002:c0a8:101::1",  # 6to4 of denied IPv4
        ]
        for ip in denied:
            self.assertFalse(policy.is_allowed(ip), ip)
        allowed = [
            "2606:4700::1111", "2a00:1450:4001::1", "2000::1", "3fff:1000::1", "2001:200::1", "3ffe::1",
            "2001:1::1", "2001:1::2", "2001:1::3", "2001:3::1", "2001:4:112::1", "2001:20::1", "2001:30::1",
            "2620:4f:8000::1",  # globally reachable registry entries
            "2002:808:808::1",  # 6to4 of a public IPv4
            "64:ff9b::808:808",  # NAT64 of a public IPv4
        ]
        for ip in allowed:
            self.assertTrue(policy.is_allowed(ip), ip)
        # --allow-peer still overrides, and --deny-peer still wins.
        self.assertTrue(PeerPolicy(allow=["5f00::/16"]).is_allowed("5f00::1"))
        self.assertTrue(PeerPolicy(allow=["::ffff:0:0:0/96"]).is_allowed("::ffff:0:808:808"))
        self.assertFalse(PeerPolicy(allow=["5f00::/16"], deny=["5f00::1/128"]).is_allowed("5f00::1"))
        # Loopback admission is for 127/8 and ::1, not for a SIIT spelling of them.
        self.assertFalse(PeerPolicy(allow_loopback=True).is_allowed("::ffff:0:7f00:1"))
        self.assertFalse(PeerPolicy(allow_loopback=True).is_allowed("::1:0:0:1"))

    def test_explicit_lists(self) -> None:
        policy = PeerPolicy(allow=["10.1.0.0/16"], deny=["8.8.8.0/24", "2606:4700::/32"])
        self.assertTrue(policy.is_allowed("10.1.2.3"))
        self.assertFalse(policy.is_allowed("10.2.0.1"))
        self.assertFalse(policy.is_allowed("8.8.8.8"))
        self.assertTrue(policy.is_allowed("8.8.4.4"))
        self.assertFalse(policy.is_allowed("2606:4700::1111"))
        self.assertFalse(policy.is_allowed("64:ff9b::808:808"))  # NAT64 of a denied IPv4
        both = PeerPolicy(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
        self.assertFalse(both.is_allowed("10.9.1.1"))  # deny wins
        self.assertTrue(both.is_allowed("10.8.1.1"))

    def test_allow_loopback(self) -> None:
        policy = PeerPolicy(allow_loopback=True)
        self.assertTrue(policy.is_allowed("127.0.0.1"))
        self.assertTrue(policy.is_allowed("127.255.255.254"))
        self.assertTrue(policy.is_allowed("::1"))
        self.assertFalse(policy.is_allowed("::ffff:127.0.0.1"))
        self.assertFalse(policy.is_allowed("0.0.0.0"))
        self.assertFalse(policy.is_allowed("10.0.0.1"))

    def test_bad_cidr_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            PeerPolicy(allow=["10.0.0.0/33"])
        with self.assertRaises(ValueError):
            PeerPolicy(deny=["not a network"])

    @given(st.integers(0, (1 << 128) - 1))
    @settings(max_examples=500, deadline=None)
    def test_ipv6_matches_numeric_ranges(self, value: int) -> None:
        addr = ipaddress.IPv6Address(value)
        self.assertEqual(PeerPolicy().is_allowed(str(addr)), _expected_v6(addr), str(addr))

    @given(st.integers(0, (1 << 125) - 1))
    @settings(max_examples=500, deadline=None)
    def test_only_global_unicast_ipv6_is_allowed(self, value: int) -> None:
        # Any address outside 2000::/3 other than the NAT64 prefix is denied.
        for top in (0, 2, 3, 4, 5, 6, 7):
            addr = ipaddress.IPv6Address((top << 125) | value)
            if addr in ipaddress.ip_network("64:ff9b::/96"):
                continue
            self.assertFalse(PeerPolicy().is_allowed(str(addr)), str(addr))

    @given(st.integers(0, (1 << 32) - 1))
    @settings(max_examples=500, deadline=None)
    def test_ipv4_matches_numeric_ranges(self, value: int) -> None:
        addr = ipaddress.IPv4Address(value)
        denied = any(addr in ipaddress.ip_network(n) for n in DEFAULT_DENY_V4)
        self.assertEqual(PeerPolicy().is_allowed(str(addr)), not denied)


class RelayPathTests(SynchronousTestCase):
    """The same policy on every relay path (CreatePermission, ChannelBind, Send)."""

    HOSTILE = [("127.0.0.1", 22), ("0.0.0.0", 80), ("169.254.169.254", 80), ("10.0.0.1", 6379), ("255.255.255.255", 9)]
    HOSTILE6 = [("::1", 22), ("::", 80), ("::ffff:127.0.0.1", 22), ("fe80::1", 5), ("64:ff9b::7f00:1", 80), ("fd00::1", 1)]

    def setUp(self) -> None:
        self.d = Driver(make_relay(public_ip6="2001:db8::1"))
        self.port = self.d.relayed_port(self.d.allocate(extra=[(stun.ADDITIONAL_ADDRESS_FAMILY, 2)]))

    def test_create_permission_and_channel_bind_refuse_hostile_peers(self) -> None:
        d = self.d
        for peer in self.HOSTILE + self.HOSTILE6:
            reply = d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, peer)]))
            self.assertEqual(error_code(reply), 403, peer)
            reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4100), (stun.XOR_PEER_ADDRESS, peer)]))
            self.assertEqual(error_code(reply), 403, peer)
        self.assertEqual(d.relay.permission_count, 0)
        self.assertEqual(d.relay.channel_count, 0)

    def test_one_bad_peer_fails_the_whole_create_permission(self) -> None:
        d = self.d
        reply = d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, PEER), (stun.XOR_PEER_ADDRESS, ("10.0.0.1", 1))]))
        self.assertEqual(error_code(reply), 403)
        self.assertEqual(d.relay.permission_count, 0)

    def test_send_indications_never_reach_hostile_peers(self) -> None:
        d = self.d
        for peer in self.HOSTILE + self.HOSTILE6:
            send = build(stun.SEND, d.next_tid(), [(stun.XOR_PEER_ADDRESS, peer), (stun.DATA, b"x")], cls=stun.INDICATION)
            self.assertEqual(d.client(send)[1], [], peer)

    def test_own_address_only_on_allocation_ports(self) -> None:
        d = self.d
        # The IP itself may be permitted (hairpin), but not its listener or other ports.
        d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, (PUBLIC4, 1))]))
        for port in (3478, 22, 8080, 49151):
            send = build(stun.SEND, d.next_tid(), [(stun.XOR_PEER_ADDRESS, (PUBLIC4, port)), (stun.DATA, b"x")], cls=stun.INDICATION)
            self.assertEqual(d.client(send)[1], [], port)
            reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4100), (stun.XOR_PEER_ADDRESS, (PUBLIC4, port))]))
            self.assertEqual(error_code(reply), 403, port)
        sends = [c for c in d.commands if isinstance(c, SendDatagram) and c.destination[0] == PUBLIC4]
        self.assertEqual(sends, [])

    def test_peer_data_from_unpermitted_address_is_dropped(self) -> None:
        d = self.d
        self.assertIsNone(d.peer(b"x", ("127.0.0.1", 9), self.port)[0])
        self.assertIsNone(d.peer(b"x", PEER, self.port)[0])
        self.assertEqual(d.relay.stats.dropped["no_permission"], 2)



class OwnAddressTests(SynchronousTestCase):
    """Issue 14 item 6: the relay's service ports under every spelling of every own address."""

    PUBLIC = "93.184.216.34"
    SPELLINGS = [
        "93.184.216.34",
        "64:ff9b::5db8:d822",  # NAT64
        "2002:5db8:d822::1",  # 6to4
        "::ffff:93.184.216.34",  # IPv4-mapped
        "::5db8:d822",  # IPv4-compatible
        "::ffff:0:5db8:d822",  # SIIT
        "64:ff9b:1:ffff::5db8:d822",  # a local-use NAT64 /96 (RFC 8215), admitted by --allow-peer ::/0
    ]
    SERVICE_PORTS = (3478, 5349, 8080, 9999)

    def driver(self, **options: object) -> Driver:
        options.setdefault("service_ports", (5349, 8080, 9999))
        d = Driver(make_relay(public_ip4=self.PUBLIC, public_ip6="2606:4700::6810:1", **options))
        reply = d.allocate(extra=[(stun.ADDITIONAL_ADDRESS_FAMILY, 2)])
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        return d

    def assert_refused(self, d: Driver, peer: tuple[str, int]) -> None:
        reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4100), (stun.XOR_PEER_ADDRESS, peer)]))
        self.assertEqual(error_code(reply), 403, peer)
        d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, (peer[0], 1))]))
        send = build(stun.SEND, d.next_tid(), [(stun.XOR_PEER_ADDRESS, peer), (stun.DATA, b"x")], cls=stun.INDICATION)
        self.assertEqual(d.client(send)[1], [], peer)

    def test_nat64_spelling_of_the_public_address_cannot_reach_the_listener(self) -> None:
        d = self.driver()
        self.assert_refused(d, ("64:ff9b::5db8:d822", 3478))
        self.assertEqual(d.relay.channel_count, 0)

    def test_every_spelling_every_service_port_even_with_every_allowance(self) -> None:
        for options in ({}, {"allow_loopback_peers": True, "allow_peers": ("0.0.0.0/0", "::/0")}):
            d = self.driver(**options)
            for ip in self.SPELLINGS:
                for port in self.SERVICE_PORTS:
                    self.assert_refused(d, (ip, port))
            self.assertEqual(d.relay.channel_count, 0)
            sends = [c for c in d.commands if isinstance(c, SendDatagram) and c.destination != CLIENT]
            self.assertEqual(sends, [], options)

    def test_bind_and_interface_addresses_are_own_too(self) -> None:
        d = self.driver(
            own_addresses=("10.0.0.5", "127.0.0.0/8", "::1", "2606:4700::6810:2"),
            allow_loopback_peers=True,
            allow_peers=("10.0.0.0/8",),
        )
        for peer in [("10.0.0.5", 3478), ("64:ff9b::a00:5", 8080), ("127.0.0.2", 3478), ("::ffff:0:7f00:1", 5349),
                     ("::1", 3478), ("2606:4700::6810:2", 9999), ("0.0.0.0", 3478), ("::", 3478)]:
            self.assert_refused(d, peer)
        # Not service ports, or not own: the allowances apply as before.
        for number, peer in enumerate([("10.0.0.6", 3478), ("10.0.0.5", 5000), ("127.0.0.2", 5000), ("::1", 5000)]):
            reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4200 + number), (stun.XOR_PEER_ADDRESS, peer)]))
            self.assertEqual(reply.msg_class, stun.SUCCESS, peer)

    def test_hairpin_only_for_the_public_addresses_on_allocation_ports(self) -> None:
        d = self.driver(own_addresses=("198.18.0.5",), allow_peers=("198.18.0.0/15",))
        target = d.relayed_port(d.allocate(CLIENT2))
        reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4100), (stun.XOR_PEER_ADDRESS, (self.PUBLIC, target))]))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        # A bind address on an allocation port is relayed as an ordinary peer, not hairpinned;
        # on any other port an own address needs an explicit allow.
        self.assertEqual(d.relay._peer_allowed(("198.18.0.5", target)), (True, False))
        self.assertEqual(d.relay._peer_allowed(("64:ff9b::5db8:d822", target)), (True, False))
        self.assertEqual(d.relay._peer_allowed(("64:ff9b::5db8:d822", 22)), (False, False))
        self.assertEqual(d.relay._peer_allowed((self.PUBLIC, 22)), (False, False))
        self.assertEqual(d.relay._peer_allowed(("198.18.0.5", 22)), (True, False))  # --allow-peer names it

class MessageHandlingTests(SynchronousTestCase):
    def test_lifetime_after_message_integrity_is_not_acted_on(self) -> None:
        d = Driver(make_relay())
        d.allocate()
        raw = d.signed(stun.REFRESH, [(stun.LIFETIME, 600)])
        tail = b"\x00\x0d\x00\x04\x00\x00\x00\x00"  # LIFETIME 0 appended after MI
        raw = raw[:2] + (len(raw) - 20 + len(tail)).to_bytes(2, "big") + raw[4:] + tail
        reply = d.request(raw)
        self.assertEqual(reply.get(stun.LIFETIME), 600)
        self.assertEqual(d.relay.allocation_count, 1)

    def test_macs_are_compared_in_constant_time(self) -> None:
        d = Driver(make_relay())
        raw = d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
        with mock.patch.object(integrity.hmac, "compare_digest", wraps=hmac.compare_digest) as compare:
            d.request(raw)
        self.assertGreaterEqual(compare.call_count, 1)

    def test_error_responses_are_built_from_constants(self) -> None:
        """Two identical bad requests get byte-identical errors (no stale or echoed bytes)."""
        d = Driver(make_relay(unauthenticated_rate=0))
        raw = build(0x0AB, d.next_tid(), [(stun.USERNAME, "x" * 500), (stun.SOFTWARE, "attacker")])
        first = d.request(raw).raw
        second = d.request(raw).raw
        self.assertEqual(first, second)
        self.assertNotIn(b"attacker", first)
        self.assertNotIn(b"x" * 20, first)
        reason = stun.decode(first).get(stun.ERROR_CODE)
        self.assertEqual(reason, (400, "Bad Request"))

    def test_duplicate_peer_address_first_wins(self) -> None:
        d = Driver(make_relay())
        port = d.relayed_port(d.allocate())
        d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER), (stun.XOR_PEER_ADDRESS, ("1.1.1.1", 1))]))
        self.assertEqual(d.client(stun.encode_channel_data(0x4000, b"x"))[0], (port, 4, PEER, b"x"))

    def test_expired_credentials_refused_on_every_request(self) -> None:
        d = Driver(make_relay())
        creds = credentials(expiry=d.now + 100)
        d.allocate(creds=creds)
        d.now += 101
        reply = d.request(d.signed(stun.REFRESH, [], creds=creds))
        self.assertEqual(error_code(reply), 401)


class ResourceTests(SynchronousTestCase):
    def test_ports_are_not_leaked_on_error_paths(self) -> None:
        d = Driver(make_relay(lowest_port=50000, highest_port=50003))
        d.busy_ports = {50000, 50001, 50002, 50003}
        for i in range(5):
            self.assertEqual(error_code(d.allocate(("198.51.100.%d" % (i + 1), 1))), 508)
        self.assertEqual(d.relay.memory_footprint()["used_ports"], 0)
        self.assertEqual(d.relay.memory_footprint()["pending"], 0)
        d.busy_ports = set()
        ports = {d.relayed_port(d.allocate(("198.51.101.%d" % (i + 1), 1))) for i in range(4)}
        self.assertEqual(ports, {50000, 50001, 50002, 50003})

    def test_dual_allocation_failure_closes_the_first_family(self) -> None:
        d = Driver(make_relay(public_ip6="2001:db8::1", lowest_port=50000, highest_port=50000))

        real_drain = d.drain

        def fail_v6() -> list[object]:
            out = []
            while (command := d.relay.next_command()) is not None:
                out.append(command)
                if isinstance(command, OpenPort):
                    ok = command.family == 4
                    if ok:
                        d.open_ports.add((command.port, command.family))
                    d.relay.handle_port_result(command.port, command.family, ok, d.now)
                elif isinstance(command, ClosePort):
                    d.open_ports.discard((command.port, command.family))
            return out

        d.drain = fail_v6  # type: ignore[method-assign, assignment]
        reply = d.allocate(extra=[(stun.ADDITIONAL_ADDRESS_FAMILY, 2)])
        self.assertEqual(error_code(reply), 508)
        self.assertEqual(d.open_ports, set())
        d.drain = real_drain  # type: ignore[method-assign]
        self.assertEqual(d.relay.memory_footprint()["used_ports"], 0)

    def test_even_port_reservation_released_exactly_once(self) -> None:
        d = Driver(make_relay(lowest_port=50000, highest_port=50001))
        d.allocate(extra=[(stun.EVEN_PORT, True)])
        self.assertEqual(d.relay.memory_footprint()["used_ports"], 2)
        d.advance(31)
        self.assertEqual(d.relay.memory_footprint()["used_ports"], 1)
        d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 0)]))
        self.assertEqual(d.relay.memory_footprint()["used_ports"], 0)
        # EVEN-PORT without R reserves nothing.
        d.allocate(CLIENT2, extra=[(stun.EVEN_PORT, False)])
        self.assertEqual(d.relay.memory_footprint()["used_ports"], 1)

    def permit(self, d: Driver, ips: list[str]) -> stun.Message:
        return d.request(d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, (ip, 1)) for ip in ips]))

    def test_default_caps_are_256_permissions_and_256_channels(self) -> None:
        """Issue 14 item 10: per-allocation caps, 508 beyond them."""
        d = Driver(make_relay())
        d.allocate()
        for batch in range(16):
            reply = self.permit(d, ["8.8.%d.%d" % (batch, i + 1) for i in range(16)])
            self.assertEqual(reply.msg_class, stun.SUCCESS, batch)
        self.assertEqual(d.relay.permission_count, 256)
        self.assertEqual(error_code(self.permit(d, ["9.9.9.9"])), 508)
        self.assertEqual(self.permit(d, ["8.8.0.1"]).msg_class, stun.SUCCESS)  # a refresh adds nothing
        for number in range(256):
            peer = ("8.8.%d.%d" % (number // 16, number % 16 + 1), 5000)
            reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000 + number), (stun.XOR_PEER_ADDRESS, peer)]))
            self.assertEqual(reply.msg_class, stun.SUCCESS, number)
        reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4100), (stun.XOR_PEER_ADDRESS, ("8.8.0.1", 5001))]))
        self.assertEqual(error_code(reply), 508)
        self.assertEqual((d.relay.permission_count, d.relay.channel_count), (256, 256))

    def test_channel_bind_cannot_pass_the_permission_cap(self) -> None:
        d = Driver(make_relay(max_permissions=2, max_channels=8))
        d.allocate()
        self.permit(d, ["8.8.0.1", "8.8.0.2"])
        reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, ("8.8.0.3", 1))]))
        self.assertEqual(error_code(reply), 508)
        reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, ("8.8.0.2", 1))]))
        self.assertEqual(reply.msg_class, stun.SUCCESS)
        self.assertEqual((d.relay.permission_count, d.relay.channel_count), (2, 1))

    def test_caps_follow_the_config(self) -> None:
        d = Driver(make_relay(max_permissions=300, max_channels=300))
        d.allocate()
        for batch in range(20):
            self.assertEqual(self.permit(d, ["8.8.%d.%d" % (batch, i + 1) for i in range(15)]).msg_class, stun.SUCCESS)
        self.assertEqual(d.relay.permission_count, 300)
        self.assertEqual(error_code(self.permit(d, ["9.9.9.9"])), 508)
        for number in range(300):
            reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000 + number), (stun.XOR_PEER_ADDRESS, ("8.8.0.1", 1000 + number))]))
            self.assertEqual(reply.msg_class, stun.SUCCESS, number)
        reply = d.request(d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x7000), (stun.XOR_PEER_ADDRESS, ("8.8.0.1", 9))]))
        self.assertEqual(error_code(reply), 508)

    def test_even_port_reservations_count_against_the_user_quota(self) -> None:
        """Issue 14 item 8: one user alternating EVEN-PORT(R) Allocates from
        new 5-tuples holds no more than its quota in allocations plus reservations."""
        d = Driver(make_relay(lowest_port=50000, highest_port=50099, user_allocation_limit=2))
        for i in range(40):
            extra = [(stun.EVEN_PORT, True)] if i % 2 == 0 else []
            reply = d.allocate(("198.51.100.%d" % (i + 1), 1), extra=extra)
            self.assertEqual(reply.msg_class, stun.SUCCESS, i)
            footprint = d.relay.memory_footprint()
            self.assertLessEqual(footprint["allocations"] + footprint["reservations"], 2, (i, footprint))
            self.assertLessEqual(footprint["used_ports"], 2, (i, footprint))
            d.advance(0.5)
        # A limit of one cannot hold an allocation and its reservation: 508, nothing taken.
        one = Driver(make_relay(lowest_port=50000, highest_port=50099, user_allocation_limit=1))
        self.assertEqual(one.allocate().msg_class, stun.SUCCESS)
        self.assertEqual(error_code(one.allocate(CLIENT2, extra=[(stun.EVEN_PORT, True)])), 508)
        self.assertEqual(one.relay.allocation_count, 1)
        self.assertEqual(one.allocate(CLIENT2, extra=[(stun.EVEN_PORT, False)]).msg_class, stun.SUCCESS)

    def test_even_port_reservations_count_against_max_allocations(self) -> None:
        d = Driver(make_relay(lowest_port=50000, highest_port=50099, max_allocations=4))
        first = d.allocate(extra=[(stun.EVEN_PORT, True)])
        self.assertEqual(first.msg_class, stun.SUCCESS)
        self.assertEqual(d.allocate(CLIENT2, extra=[(stun.EVEN_PORT, True)]).msg_class, stun.SUCCESS)
        self.assertEqual(error_code(d.allocate(("198.51.100.9", 1))), 508)
        self.assertEqual(d.relay.memory_footprint()["used_ports"], 4)
        # Claiming a reservation trades its unit for the new allocation's.
        token = first.get_bytes(stun.RESERVATION_TOKEN)
        assert token is not None
        claimed = d.allocate(("198.51.100.10", 1), extra=[(stun.RESERVATION_TOKEN, token)])
        self.assertEqual(d.relayed_port(claimed), d.relayed_port(first) + 1)
        self.assertEqual(error_code(d.allocate(("198.51.100.11", 1))), 508)

    def test_even_port_reservation_goes_with_its_allocation(self) -> None:
        d = Driver(make_relay(lowest_port=50000, highest_port=50099))
        d.allocate(extra=[(stun.EVEN_PORT, True)])
        self.assertEqual(d.relay.memory_footprint()["reservations"], 1)
        d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 0)]))
        footprint = d.relay.memory_footprint()
        self.assertEqual((footprint["reservations"], footprint["used_ports"]), (0, 0))
        # A claimed reservation is the new allocation's: deleting the maker leaves it alone.
        first = d.allocate(extra=[(stun.EVEN_PORT, True)])
        token = first.get_bytes(stun.RESERVATION_TOKEN)
        claimed = d.allocate(CLIENT2, extra=[(stun.RESERVATION_TOKEN, token)])
        d.request(d.signed(stun.REFRESH, [(stun.LIFETIME, 0)]))
        self.assertEqual(d.relay.allocation_count, 1)
        self.assertEqual(d.relay.memory_footprint()["used_ports"], 1)
        self.assertIn(d.relayed_port(claimed), d.relay._by_port)
        d.advance(31)  # the old reservation timer finds nothing to free
        self.assertEqual(d.relay.memory_footprint()["used_ports"], 1)

    def test_user_quota_is_enforced(self) -> None:
        d = Driver(make_relay(user_allocation_limit=2))
        for i in range(5):
            d.allocate(("198.51.100.%d" % (i + 1), 1))
        self.assertEqual(d.relay.allocation_count, 2)

    def test_nonces_cost_no_memory(self) -> None:
        d = Driver(make_relay(unauthenticated_rate=0))
        before = dict(d.relay.memory_footprint())
        for i in range(2000):
            d.client(build(stun.ALLOCATE, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17)]), ("198.51.%d.%d" % (i // 200, i % 200 + 1), 1000 + i))
        self.assertEqual(d.relay.memory_footprint(), before)

    def test_rate_limit_table_is_bounded(self) -> None:
        d = Driver(make_relay(unauthenticated_burst=2, unauthenticated_rate=1.0))
        for i in range(70000):
            d.relay.handle_client_input(build(stun.BINDING, b"\x00" * 12, []), ("10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 1), d.now)
            d.relay._commands.clear()
        self.assertLessEqual(len(d.relay._reflection.buckets), 65536)

    def test_amplification_of_unauthenticated_replies(self) -> None:
        """Bytes out per byte in for the smallest unauthenticated requests."""
        d = Driver(make_relay())
        binding = build(stun.BINDING, d.next_tid(), [])
        allocate = build(stun.ALLOCATE, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17)])
        ratios = {}
        for name, request in (("binding", binding), ("allocate", allocate)):
            _, commands = d.client(request)
            (reply,) = commands
            assert isinstance(reply, SendDatagram)
            ratios[name] = len(reply.payload) / len(request)
        self.assertLess(ratios["binding"], 4.0)
        self.assertLess(ratios["allocate"], 6.0)
