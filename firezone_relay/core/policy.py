"""Which peer addresses a client may relay to (SPEC §5).

IPv4 peers are denied in: loopback, unspecified, link-local (cloud metadata
included), multicast, broadcast, reserved and documentation ranges, private
ranges and shared address space.

IPv6 peers work the other way round, as an allow-list: only global unicast
2000::/3 is relayed, minus the blocks inside it that IANA's IPv6
Special-Purpose Address Registry marks as not globally reachable (Teredo,
benchmarking, ORCHID, documentation...).  Everything outside 2000::/3 is
denied, whatever the block (::/8 with its IPv4-mapped, IPv4-compatible and
SIIT ``::ffff:0:0:0/96`` forms, 100::/64, 5f00::/16, fc00::/7, fe80::/10,
ff00::/8 and all still unassigned space).  Two forms carry an IPv4 address
and are judged by it: 6to4 (2002::/16) and the NAT64 well-known prefix
64:ff9b::/96 (globally reachable per the registry, though outside 2000::/3).
IPv4-mapped and IPv4-compatible addresses are never relayed (they are not
routable as IPv6 and the relay's IPv6 sockets are IPv6-only).

Explicit lists adjust the default: ``deny`` always wins, then ``allow``
re-admits a range, then ``allow_loopback`` re-admits 127.0.0.0/8 and ::1.

:class:`OwnAddresses` answers the other question of SPEC §5, whether an
address is one of the relay's own under any spelling.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_right
from typing import Callable, Iterable, Optional, Sequence, Union

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

#: The only IPv6 space relayed by default (plus the NAT64 prefix, unwrapped).
GLOBAL_UNICAST_V6 = "2000::/3"

#: Blocks inside 2000::/3 that the IANA IPv6 special-purpose registry marks
#: as not globally reachable.  2002::/16 (6to4) is not listed: it is judged
#: by the IPv4 address it carries.
DEFAULT_DENY_V6: tuple[str, ...] = (
    "2001::/23",  # IETF protocol assignments (less the exceptions below)
    "2001::/32",  # Teredo (RFC 4380)
    "2001:2::/48",  # benchmarking (RFC 5180)
    "2001:10::/28",  # ORCHID, deprecated (RFC 4843)
    "2001:db8::/32",  # documentation (RFC 3849)
    "3fff::/20",  # documentation (RFC 9637)
)

#: Blocks inside 2001::/23 that the registry marks globally reachable.
GLOBAL_EXCEPTIONS_V6: tuple[str, ...] = (
    "2001:1::1/128",  # Port Control Protocol anycast (RFC 7723)
    "2001:1::2/128",  # TURN anycast (RFC 8155)
    "2001:1::3/128",  # DNS-SD service registration protocol anycast (RFC 9665)
    "2001:3::/32",  # AMT (RFC 7450)
    "2001:4:112::/48",  # AS112-v6 (RFC 7535)
    "2001:20::/28",  # ORCHIDv2 (RFC 7343)
    "2001:30::/28",  # drone remote ID (RFC 9374)
)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215; commonly /96 prefixes inside
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network(GLOBAL_UNICAST_V6)
_LOOPBACK = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv6Network("::1/128"))

_CACHE_LIMIT = 4096


def _remember(cache: dict[str, bool], ip: str, verdict: bool) -> None:
    """Keep ``verdict`` for ``ip``; a full cache starts again empty, so that
    its size stays bounded whatever addresses clients name."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[ip] = verdict


def parse_networks(cidrs: Iterable[str]) -> list[IPNetwork]:
    """Parse CIDR strings; raises ValueError with the offending text."""
    out: list[IPNetwork] = []
    for text in cidrs:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError("not a CIDR network: %r" % (text,)) from None
    return out


def parse_address(ip: str) -> Optional[IPAddr]:
    """``ip`` parsed by the ``ipaddress`` module, or None if it is not an address."""
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None


def _mapped_or_compatible(addr: ipaddress.IPv6Address) -> bool:
    return addr.ipv4_mapped is not None or (int(addr) >> 32 == 0 and int(addr) > 1)


def embedded_ipv4(addr: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address carried by a NAT64, 6to4, mapped, compatible or SIIT
    (``::ffff:0:a.b.c.d``) address."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64 or addr in _SIIT:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _SIX_TO_FOUR:
        return addr.sixtofour
    if int(addr) >> 32 == 0 and int(addr) > 1:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def unwrapped(addr: IPAddr) -> IPAddr:
    """``addr`` without its zone index, or the IPv4 address it embeds."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            addr = ipaddress.IPv6Address(int(addr))
        inner = embedded_ipv4(addr)
        if inner is not None:
            return inner
    return addr


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
        self._deny_v4 = parse_networks(DEFAULT_DENY_V4)
        self._deny_v6 = parse_networks(DEFAULT_DENY_V6)
        self._global_v6 = parse_networks(GLOBAL_EXCEPTIONS_V6)
        self._cache: dict[str, bool] = {}
        self._tables: Optional[_Verdicts] = None

    @staticmethod
    def _in(addr: IPAddr, networks: Sequence[IPNetwork]) -> bool:
        return any(addr.version == net.version and addr in net for net in networks)

    def explicitly_allowed(self, ip: str) -> bool:
        """True when an ``--allow-peer`` range (or loopback with
        ``allow_loopback``) names ``ip`` and no ``--deny-peer`` range does."""
        addr = parse_address(ip)
        if addr is None:
            return False
        if self._in(addr, self.deny):
            return False
        if self._in(addr, self.allow):
            return True
        return self.allow_loopback and self._in(addr, _LOOPBACK)

    def is_allowed(self, ip: str) -> bool:
        verdict = self._cache.get(ip)
        if verdict is None:
            # Canonical IPv4 text (what the STUN decoder produces) judged
            # inline: a CreatePermission may ask for 32 new ones (SPEC §1).
            parts = ip.split(".")
            value = -1
            if len(parts) == 4:
                digits = _DIGITS
                try:
                    value = (digits[parts[0]] << 24) | (digits[parts[1]] << 16) | (digits[parts[2]] << 8) | digits[parts[3]]
                except KeyError:
                    pass
            if value >= 0:
                table = self._verdicts().table4
                layer, default = table.values[bisect_right(table.starts, value) - 1]
                verdict = layer != _DENY if layer else default
            else:
                verdict = self._judge(ip)
            _remember(self._cache, ip, verdict)
        return verdict

    def _verdicts(self) -> "_Verdicts":
        tables = self._tables
        if tables is None:
            tables = self._tables = _Verdicts(self)
        return tables

    def default_allows(self, addr: IPAddr) -> bool:
        """The built-in verdict, before the explicit lists."""
        if isinstance(addr, ipaddress.IPv4Address):
            return not self._in(addr, self._deny_v4)
        if addr in _NAT64:
            return self.default_allows(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if addr in _SIX_TO_FOUR:
            inner = addr.sixtofour
            assert inner is not None
            return self.default_allows(inner)
        if addr not in _GLOBAL_UNICAST:
            return False
        if self._in(addr, self._global_v6):
            return True
        return not self._in(addr, self._deny_v6)

    def _judge(self, ip: str) -> bool:
        """The verdict for ``ip``, from the integer tables of :class:`_Verdicts`
        (one ``bisect`` per address, two for an address carrying an IPv4
        one); text other than canonical IPv4 or plain hex-and-colons IPv6 is
        parsed by the ``ipaddress`` module."""
        tables = self._verdicts()
        value = _parse_ipv4(ip)
        if value >= 0:
            return tables.judge4(value)
        value = _parse_ipv6(ip)
        if value < 0:
            addr = parse_address(ip)
            if addr is None:
                return False
            if isinstance(addr, ipaddress.IPv4Address):
                return tables.judge4(int(addr))
            if addr.scope_id is not None:
                return False  # a zone index names a link, never a global peer
            value = int(addr)
        return tables.judge6(value)


# --- the verdict tables -------------------------------------------------------------------

#: Layers of the explicit lists, strongest first (``deny`` always wins).
_NONE, _DENY, _ALLOW, _LOOP = 0, 1, 2, 3

_V4_MAX = (1 << 32) - 1
_V6_MAX = (1 << 128) - 1
_NAT64_LOW = int(_NAT64.network_address)
_NAT64_HIGH = int(_NAT64.broadcast_address)
_6TO4_LOW = int(_SIX_TO_FOUR.network_address)
_6TO4_HIGH = int(_SIX_TO_FOUR.broadcast_address)
_MAPPED_LOW = 0xFFFF << 32  # ::ffff:0:0/96
_MAPPED_HIGH = _MAPPED_LOW | 0xFFFFFFFF


#: ``value -> (layer, default verdict)``.
_Verdict = Callable[[int], tuple[int, bool]]


def _span(net: IPNetwork) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


class _Table:
    """A piecewise-constant function over one address family's integers:
    ``starts`` sorted, ``values[i]`` holding from ``starts[i]`` up to the next
    start.  Built by evaluating ``verdict`` once per elementary interval of
    the given ranges' end points."""

    __slots__ = ("starts", "values")

    def __init__(self, spans: Iterable[tuple[int, int]], top: int, verdict: _Verdict) -> None:
        points = {0}
        for low, high in spans:
            points.add(low)
            if high < top:
                points.add(high + 1)
        self.starts = sorted(points)
        self.values = [verdict(start) for start in self.starts]

    def __call__(self, value: int) -> tuple[int, bool]:
        return self.values[bisect_right(self.starts, value) - 1]


class _Verdicts:
    """The policy of a :class:`PeerPolicy` as two integer tables, one per
    family, each giving ``(layer, default verdict)``: the strongest explicit
    list naming the address (``_DENY``, ``_ALLOW``, ``_LOOP`` for loopback
    under ``allow_loopback``, ``_NONE``) and :meth:`PeerPolicy.default_allows`.
    Equivalent to judging the ``ipaddress`` objects range by range; the
    tests hold the two side by side."""

    __slots__ = ("table4", "table6")

    def __init__(self, policy: PeerPolicy) -> None:
        loop4 = [_LOOPBACK[0]] if policy.allow_loopback else []
        loop6 = [_LOOPBACK[1]] if policy.allow_loopback else []
        deny4 = [_span(n) for n in policy.deny if n.version == 4]
        deny6 = [_span(n) for n in policy.deny if n.version == 6]
        allow4 = [_span(n) for n in policy.allow if n.version == 4]
        allow6 = [_span(n) for n in policy.allow if n.version == 6]
        l4 = [_span(n) for n in loop4]
        l6 = [_span(n) for n in loop6]
        d4 = [_span(n) for n in policy._deny_v4]
        d6 = [_span(n) for n in policy._deny_v6]
        g6 = [_span(n) for n in policy._global_v6]
        unicast = _span(_GLOBAL_UNICAST)

        def inside(value: int, spans: list[tuple[int, int]]) -> bool:
            return any(low <= value <= high for low, high in spans)

        def layer(value: int, deny: list[tuple[int, int]], allow: list[tuple[int, int]], loop: list[tuple[int, int]]) -> int:
            if inside(value, deny):
                return _DENY
            if inside(value, allow):
                return _ALLOW
            return _LOOP if inside(value, loop) else _NONE

        def verdict4(value: int) -> tuple[int, bool]:
            return layer(value, deny4, allow4, l4), not inside(value, d4)

        def verdict6(value: int) -> tuple[int, bool]:
            # The default for addresses outside NAT64 and 6to4; those two are
            # judged by their IPv4 address in judge6.
            if not inside(value, [unicast]):
                default = False
            elif inside(value, g6):
                default = True
            else:
                default = not inside(value, d6)
            return layer(value, deny6, allow6, l6), default

        self.table4 = _Table(deny4 + allow4 + l4 + d4, _V4_MAX, verdict4)
        self.table6 = _Table(
            deny6 + allow6 + l6 + d6 + g6 + [unicast, _span(_NAT64), _span(_SIX_TO_FOUR)], _V6_MAX, verdict6
        )

    def judge4(self, value: int) -> bool:
        layer, default = self.table4(value)
        if layer:
            return layer != _DENY
        return default

    def judge6(self, value: int) -> bool:
        if value >> 32 == 0 and value > 1 or _MAPPED_LOW <= value <= _MAPPED_HIGH:
            return False  # mapped / compatible: not routable on IPv6-only sockets
        layer, default = self.table6(value)
        if _NAT64_LOW <= value <= _NAT64_HIGH:
            inner = value & 0xFFFFFFFF
        elif _6TO4_LOW <= value <= _6TO4_HIGH:
            inner = (value >> 80) & 0xFFFFFFFF
        else:
            if layer:
                return layer != _DENY
            return default
        # Both addresses are candidates: deny on either wins, then allow on
        # either, then loopback on either, then the IPv4 address's default.
        layer4, default4 = self.table4(inner)
        if layer == _DENY or layer4 == _DENY:
            return False
        if layer or layer4:
            return True
        return default4


_DIGITS = {text: i for i, text in enumerate(str(i) for i in range(256))}


def _parse_ipv4(ip: str) -> int:
    """The integer of canonical dotted-decimal text, -1 for anything else
    (the ``ipaddress`` module accepts exactly these octet spellings too)."""
    parts = ip.split(".")
    if len(parts) != 4:
        return -1
    digits = _DIGITS
    try:
        return (digits[parts[0]] << 24) | (digits[parts[1]] << 16) | (digits[parts[2]] << 8) | digits[parts[3]]
    except KeyError:
        return -1


_HEX_COLONS = re.compile(r"[0-9a-fA-F:]{2,39}\Z")
_HEX_GROUP = re.compile(r"[0-9a-fA-F]{1,4}\Z")


def _parse_ipv6(ip: str) -> int:
    """The integer of IPv6 text made of hex groups and colons (with at most
    one ``::`` standing for at least one group), -1 for anything else,
    including text the ``ipaddress`` module would refuse."""
    if not _HEX_COLONS.match(ip):
        return -1
    head, gap, tail = ip.partition("::")
    high = head.split(":") if head else []
    low = tail.split(":") if tail else []
    if gap:
        if "::" in tail or len(high) + len(low) > 7:
            return -1
    elif len(high) != 8:
        return -1
    value = 0
    group = _HEX_GROUP.match
    for part in high + ["0"] * (8 - len(high) - len(low)) + low:  # "::" as the zero groups it stands for
        if not group(part):
            return -1
        value = (value << 16) | int(part, 16)
    return value


_UNSPECIFIED = ("0.0.0.0/32", "::/128")  # a datagram to either reaches this host


class OwnAddresses:
    """The relay's own addresses (public, bind, interface; networks allowed,
    e.g. 127.0.0.0/8 when a socket is bound to the wildcard), recognised
    under every spelling: an IPv6 address that carries one of them as its
    embedded IPv4 (NAT64, 6to4, mapped, compatible, SIIT) is one of them too.
    The unspecified addresses always count: Linux delivers them locally.
    """

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = parse_networks(list(networks) + list(_UNSPECIFIED))
        self._cache: dict[str, bool] = {}

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str):
            return False
        verdict = self._cache.get(ip)
        if verdict is None:
            verdict = self._judge(ip)
            _remember(self._cache, ip, verdict)
        return verdict

    def _judge(self, ip: str) -> bool:
        raw = parse_address(ip)
        if raw is None:
            return False
        candidates = [raw, unwrapped(raw)]
        if isinstance(raw, ipaddress.IPv6Address) and raw in _NAT64_LOCAL:
            # A local-use NAT64 prefix (admitted with --allow-peer) as a /96.
            candidates.append(ipaddress.IPv4Address(int(raw) & 0xFFFFFFFF))
        return any(a.version == net.version and a in net for a in candidates for net in self.networks)
