"""The peer policy's integer tables judge exactly as the range-by-range judge did.

``reference_judge`` is the judge the tables replaced (``ipaddress`` objects,
each list walked network by network), kept here as the model: every test
holds the two side by side over generated addresses, policies and text.
"""

from __future__ import annotations

import ipaddress
from typing import Union
from unittest import mock

from hypothesis import example, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import policy as policy_module
from firezone_relay.core.policy import (
    DEFAULT_DENY_V4,
    DEFAULT_DENY_V6,
    GLOBAL_EXCEPTIONS_V6,
    PeerPolicy,
    embedded_ipv4,
)

Addr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_LOOPBACK = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Network("::1/128"))
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def reference_judge(policy: PeerPolicy, ip: str) -> bool:
    """The verdict as computed before the tables (SPEC §5)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    candidates: list[Addr] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            return False
        if addr.ipv4_mapped is not None or (int(addr) >> 32 == 0 and int(addr) > 1):
            return False
        if addr in _NAT64 or addr in _SIX_TO_FOUR:
            inner = embedded_ipv4(addr)
            assert inner is not None
            candidates.append(inner)

    def inside(a: Addr, networks: list[policy_module.IPNetwork]) -> bool:
        return any(a.version == n.version and a in n for n in networks)

    if any(inside(a, policy.deny) for a in candidates):
        return False
    if any(inside(a, policy.allow) for a in candidates):
        return True
    if policy.allow_loopback and any(inside(a, list(_LOOPBACK)) for a in candidates):
        return True
    return policy.default_allows(addr)


#: Networks the explicit lists are drawn from: default ranges, their parts and
#: neighbours, loopback, the embedding prefixes and a few global blocks.
_NETWORKS = sorted(
    set(DEFAULT_DENY_V4 + DEFAULT_DENY_V6 + GLOBAL_EXCEPTIONS_V6)
    | {
        "127.0.0.0/8", "127.5.0.0/16", "8.8.8.0/24", "8.8.8.8/32", "10.1.0.0/16", "0.0.0.0/0", "93.184.216.0/24",
        "::1/128", "::/0", "64:ff9b::/96", "2002::/16", "2002:808:808::/48", "2606:4700::/32", "5f00::/16",
        "fc00::/7", "fe80::/10", "::ffff:0:0:0/96", "2001:db8:1::/48", "2000::/3",
    }
)  # fmt: skip

_policies = st.builds(
    PeerPolicy,
    allow=st.lists(st.sampled_from(_NETWORKS), max_size=4),
    deny=st.lists(st.sampled_from(_NETWORKS), max_size=3),
    allow_loopback=st.booleans(),
)


def _edges() -> list[int]:
    """First, last and neighbouring integers of every network above, both families."""
    out: list[int] = []
    for text in _NETWORKS:
        net = ipaddress.ip_network(text)
        for value in (int(net.network_address), int(net.broadcast_address)):
            out.extend(v for v in (value - 1, value, value + 1) if 0 <= v < (1 << net.max_prefixlen))
    return out


_EDGES = _edges()


def _v4(value: int) -> str:
    return str(ipaddress.IPv4Address(value & 0xFFFFFFFF))


def _v6(value: int) -> str:
    return str(ipaddress.IPv6Address(value & ((1 << 128) - 1)))


_v4_values = st.one_of(st.integers(0, (1 << 32) - 1), st.sampled_from([e for e in _EDGES if e < 1 << 32]))
_v6_values = st.one_of(
    st.integers(0, (1 << 128) - 1),
    st.sampled_from(_EDGES),
    # The embedding forms, around the interesting IPv4 addresses.
    st.builds(lambda v: int(_NAT64.network_address) | v, _v4_values),
    st.builds(lambda v: int(_SIX_TO_FOUR.network_address) | (v << 80), _v4_values),
    st.builds(lambda v, low: int(_SIX_TO_FOUR.network_address) | (v << 80) | low, _v4_values, st.integers(0, (1 << 80) - 1)),
    st.builds(lambda v: (0xFFFF << 32) | v, _v4_values),  # mapped
    st.builds(lambda v: (0xFFFF << 48) | v, _v4_values),  # SIIT
    st.integers(0, (1 << 32) - 1),  # compatible
)

#: Text the fast parsers must hand to ``ipaddress`` or refuse exactly as it does.
_odd_text = st.one_of(
    st.text(alphabet="0123456789abcdefABCDEF:.%x -_+", max_size=45),
    st.builds(lambda v: _v6(v).upper(), _v6_values),
    st.builds(lambda v: ipaddress.IPv6Address(v).exploded, _v6_values),
    st.builds(lambda v: "::ffff:" + _v4(v), _v4_values),
    st.builds(lambda v: _v6(v) + "%eth0", _v6_values),
    st.builds(lambda v: "0" + _v4(v), _v4_values),
)


class TableEquivalenceTests(SynchronousTestCase):
    def check(self, policy: PeerPolicy, ip: str) -> None:
        self.assertEqual(policy.is_allowed(ip), reference_judge(policy, ip), (ip, policy.allow, policy.deny))

    @given(_policies, st.lists(_v4_values, min_size=1, max_size=20))
    @settings(max_examples=300, deadline=None)
    def test_ipv4(self, policy: PeerPolicy, values: list[int]) -> None:
        for value in values:
            self.check(policy, _v4(value))

    @given(_policies, st.lists(_v6_values, min_size=1, max_size=20))
    @settings(max_examples=300, deadline=None)
    @example(PeerPolicy(allow_loopback=True), [1, 0, 2, (0xFFFF << 48) | 0x7F000001])
    @example(PeerPolicy(allow=["2002::/16"], deny=["8.8.8.8/32"]), [int(ipaddress.IPv6Address("2002:808:808::1"))])
    @example(PeerPolicy(allow=["8.8.8.0/24"], deny=["64:ff9b::/96"]), [int(ipaddress.IPv6Address("64:ff9b::808:808"))])
    def test_ipv6(self, policy: PeerPolicy, values: list[int]) -> None:
        for value in values:
            self.check(policy, _v6(value))

    @given(_policies, st.lists(_odd_text, min_size=1, max_size=10))
    @settings(max_examples=300, deadline=None)
    @example(PeerPolicy(), ["1:2:3:4:5:6:7::", "::1:2:3:4:5:6:7", "1::2::3", ":1:2:3:4:5:6:7", "1:2:3:4:5:6:7:8:9", "::"])
    @example(PeerPolicy(), ["2001:4860:0:0:0:0:0:1", "2001:04860::1", "2001:4860::1%1", "8.8.8.08", "8.8.8.8."])
    def test_any_text(self, policy: PeerPolicy, texts: list[str]) -> None:
        for text in texts:
            self.check(policy, text)


class FastPathTests(SynchronousTestCase):
    def test_canonical_text_is_judged_without_ipaddress(self) -> None:
        """The text the STUN decoder produces never reaches the ``ipaddress`` module."""
        policy = PeerPolicy(allow=["10.1.0.0/16"], deny=["2606:4700::/32"], allow_loopback=True)
        policy.is_allowed("192.0.2.1")  # builds the tables (with ipaddress, once)
        cases = {"8.8.8.8": True, "10.1.2.3": True, "10.2.0.1": False, "127.0.0.1": True,
                 "2606:4700::1": False, "2a00:1450::5": True, "64:ff9b::808:808": True, "64:ff9b::a01:203": True,
                 "2002:a02:1::1": False, "fe80::1": False, "::1": True}  # fmt: skip
        with mock.patch.object(policy_module.ipaddress, "ip_address", side_effect=AssertionError("ipaddress per peer")):
            for ip, expected in cases.items():
                self.assertEqual(policy.is_allowed(ip), expected, ip)

    def test_parsers_refuse_what_ipaddress_refuses(self) -> None:
        for text in ("1::2::3", "12345::", "1:2:3:4:5:6:7:8:9", "1.2.3", "1.2.3.256", "01.2.3.4", "", ":", ":::"):
            self.assertEqual(policy_module._parse_ipv4(text), -1, text)
            self.assertEqual(policy_module._parse_ipv6(text), -1, text)
            self.assertFalse(PeerPolicy().is_allowed(text), text)

    def test_cache_is_bounded(self) -> None:
        policy = PeerPolicy()
        for i in range(policy_module._CACHE_LIMIT * 2 + 5):
            policy.is_allowed(_v4(0x08000000 + i))
        self.assertLessEqual(len(policy._cache), policy_module._CACHE_LIMIT)
