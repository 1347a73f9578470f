"""Facts about the host read once at start-up: its local addresses (so that
the core can refuse its own service ports as peers under every spelling,
SPEC §5) and the kernel's ephemeral port range (to warn when the allocation
port range overlaps it).

Only /proc is read; every reader takes its path so that tests can point it
at a file of their own.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, List, Optional, Tuple

FIB_TRIE = "/proc/net/fib_trie"
IF_INET6 = "/proc/net/if_inet6"
LOCAL_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"

_WILDCARDS = ("0.0.0.0", "::")


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _lines(path: str) -> List[str]:
    """The lines of ``path``; none when it cannot be read."""
    text = _read(path)
    return [] if text is None else text.splitlines()


def local_ipv4_networks(path: str = FIB_TRIE) -> List[str]:
    """Every address (or network, e.g. 127.0.0.0/8) the kernel delivers
    locally: the ``host LOCAL`` entries of the FIB."""
    out: List[str] = []
    last: Optional[str] = None
    for line in _lines(path):
        stripped = line.strip()
        if stripped.startswith("|--"):
            last = stripped[3:].strip()
        elif last is not None and stripped.startswith("/") and stripped.endswith("host LOCAL"):
            try:
                network = ipaddress.IPv4Network("%s%s" % (last, stripped.split()[0]), strict=False)
            except ValueError:
                continue
            if str(network) not in out:
                out.append(str(network))
    return out


def local_ipv6_addresses(path: str = IF_INET6) -> List[str]:
    """Every address configured on an interface (32 hex digits per line)."""
    out: List[str] = []
    for line in _lines(path):
        fields = line.split()
        if not fields or len(fields[0]) != 32:
            continue
        try:
            address = str(ipaddress.IPv6Address(int(fields[0], 16)))
        except ValueError:
            continue
        if address not in out:
            out.append(address)
    return out


def own_addresses(
    binds: Iterable[Optional[str]],
    fib_trie: str = FIB_TRIE,
    if_inet6: str = IF_INET6,
) -> List[str]:
    """The relay's own addresses beside its public ones: each specific bind
    address (UDP/TCP/TLS listeners, the health server), and for a wildcard
    bind every local address of that family."""
    out: List[str] = []
    for bind in binds:
        if bind is None:
            continue
        try:
            address = ipaddress.ip_address(bind.strip("[]"))
        except ValueError:
            continue
        if address.is_unspecified and address.version == 4:
            found = local_ipv4_networks(fib_trie) or ["127.0.0.0/8"]
        elif address.is_unspecified:
            found = local_ipv6_addresses(if_inet6) or ["::1"]
        else:
            found = [address.compressed]
        out.extend(a for a in found if a not in out)
    return out


def ephemeral_port_range(path: str = LOCAL_PORT_RANGE) -> Optional[Tuple[int, int]]:
    """The kernel's ephemeral port range, or None where it cannot be read."""
    text = _read(path)
    if text is None:
        return None
    try:
        low, high = (int(v) for v in text.split())
    except ValueError:
        return None
    return low, high


def ephemeral_overlap(lowest: int, highest: int, path: str = LOCAL_PORT_RANGE) -> Optional[str]:
    """A one-line warning when ``lowest..highest`` overlaps the kernel's
    ephemeral range, else None."""
    ephemeral = ephemeral_port_range(path)
    if ephemeral is None:
        return None
    low, high = ephemeral
    if lowest > high or highest < low:
        return None
    return (
        "the allocation port range %d-%d overlaps the kernel's ephemeral port range %d-%d (%s): "
        "outgoing connections of this host may take allocation ports and the other way round; "
        "move --lowest-port/--highest-port or net.ipv4.ip_local_port_range apart"
        % (lowest, highest, low, high, path)
    )
