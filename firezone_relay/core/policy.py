"""Which peer addresses a client may relay to (SPEC §5).

Denied by default: loopback, unspecified, link-local (cloud metadata
included), multicast, broadcast, reserved and documentation ranges, private
ranges and shared address space.  IPv4 embedded in IPv6 is unwrapped first:
NAT64 (64:ff9b::/96) and 6to4 (2002::/16) are judged by the IPv4 address they
carry; IPv4-mapped and IPv4-compatible addresses are never relayed (they are
not routable as IPv6 and the relay's IPv6 sockets are IPv6-only).

Explicit lists adjust the default: ``deny`` always wins, then ``allow``
re-admits a range, then ``allow_loopback`` re-admits 127.0.0.0/8 and ::1.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Sequence, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

DEFAULT_DENY_V4: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network", unspecified
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # shared address space (CGNAT)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # TEST-NET-1
    "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # TEST-NET-2
    "203.0.113.0/24",  # TEST-NET-3
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255 broadcast
)

DEFAULT_DENY_V6: tuple[str, ...] = (
    "::/128",  # unspecified
    "::1/128",  # loopback
    "::/96",  # IPv4-compatible (deprecated)
    "::ffff:0:0/96",  # IPv4-mapped
    "64:ff9b:1::/48",  # local-use NAT64
    "100::/64",  # discard-only
    "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, ...)
    "2001:db8::/32",  # documentation
    "3fff::/20",  # documentation (RFC 9637)
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_LOOPBACK = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Network("::1/128"))

_CACHE_LIMIT = 4096


def parse_networks(cidrs: Iterable[str]) -> list[IPNetwork]:
    """Parse CIDR strings; raises ValueError with the offending text."""
    out: list[IPNetwork] = []
    for text in cidrs:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError("not a CIDR network: %r" % (text,)) from None
    return out


def embedded_ipv4(addr: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address carried by a NAT64, 6to4, mapped or compatible address."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _SIX_TO_FOUR:
        return addr.sixtofour
    if int(addr) >> 32 == 0 and int(addr) > 1:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


class PeerPolicy:
    """Decides whether an IP address may be a peer."""

    def __init__(
        self,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        allow_loopback: bool = False,
    ) -> None:
        self.allow = parse_networks(allow)
        self.deny = parse_networks(deny)
        self.allow_loopback = allow_loopback
        self._default_deny = parse_networks(DEFAULT_DENY_V4 + DEFAULT_DENY_V6)
        self._cache: dict[str, bool] = {}

    @staticmethod
    def _in(addr: IPAddr, networks: Sequence[IPNetwork]) -> bool:
        return any(addr.version == net.version and addr in net for net in networks)

    def explicitly_allowed(self, ip: str) -> bool:
        """True when an ``--allow-peer`` range (or loopback with
        ``allow_loopback``) names ``ip`` and no ``--deny-peer`` range does."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if self._in(addr, self.deny):
            return False
        if self._in(addr, self.allow):
            return True
        return self.allow_loopback and self._in(addr, _LOOPBACK)

    def is_allowed(self, ip: str) -> bool:
        verdict = self._cache.get(ip)
        if verdict is None:
            verdict = self._judge(ip)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[ip] = verdict
        return verdict

    def _judge(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        candidates: list[IPAddr] = [addr]
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None or (int(addr) >> 32 == 0 and int(addr) > 1):
                return False  # mapped / compatible: not routable on IPv6-only sockets
            inner = embedded_ipv4(addr)
            if inner is not None:
                candidates.append(inner)
        if any(self._in(a, self.deny) for a in candidates):
            return False
        if any(self._in(a, self.allow) for a in candidates):
            return True
        if self.allow_loopback and any(self._in(a, _LOOPBACK) for a in candidates):
            return True
        return not any(self._in(a, self._default_deny) for a in candidates)
