"""Which source a per-IP limit counts a connection against.

IPv4: the address.  IPv6: its /64, since one host (one subscriber) is
routinely given a whole /64 and can pick any address in it; an IPv4-mapped
IPv6 address (``::ffff:a.b.c.d``, what a dual-stack socket reports for an
IPv4 client) counts as that IPv4 address.  Used at accept time only.
"""

from __future__ import annotations

import ipaddress

IPV6_PREFIX = 64


def source_key(ip: str) -> str:
    """The key of ``ip`` for per-source limits (``ip`` itself if it does not parse)."""
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> (128 - IPV6_PREFIX) << (128 - IPV6_PREFIX), IPV6_PREFIX)))
