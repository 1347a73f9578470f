"""Allocation records and the relayed-port picker (upstream: ``allocation.rs``).

An ``Allocation`` (RFC 8656 §2.2) holds its ``Permission`` records (§9), its
``Channel`` bindings (§12) and, for EVEN-PORT with the R bit (§7.1), the
``Reservation`` of the next port.  Each is a ``timers.Timed`` record, so one
heap expires them all.  These are plain records: the rules that create,
refresh and delete them are the request handlers in ``relay.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from .commands import Address, Client
from .timers import Timed

if TYPE_CHECKING:
    from .auth import Request

#: RFC 8656 §7.2 / upstream: seconds.
DEFAULT_LIFETIME = 600
MAX_LIFETIME = 3600
#: RFC 8656 §9: a permission lasts 300 s.
PERMISSION_LIFETIME = 300
#: RFC 8656 §12: a channel binding lasts 600 s, then its number and peer
#: stay reserved for the pair another 300 s.
CHANNEL_LIFETIME = 600
CHANNEL_RESERVE = 300
#: RFC 8656 §7.1: how long an EVEN-PORT reservation waits to be claimed.
RESERVATION_LIFETIME = 30
#: How many ports an Allocate tries before it fails with 508.
MAX_PORT_ATTEMPTS = 16


def initial_lifetime(requested: Optional[int]) -> int:
    """The initial time-to-expiry of a new allocation, RFC 8656 §7.2:

    "If the request contains a LIFETIME attribute, then the server
    computes the minimum of the client's proposed lifetime and the
    server's maximum allowed lifetime.  If this computed value is greater
    than the default lifetime, then the server uses the computed lifetime
    as the initial value of the time-to-expiry field.  Otherwise, the
    server uses the default lifetime."

    So an Allocate asking for less than 600 s (0 included) gets 600 s.
    A Refresh keeps upstream's rule (``refresh_lifetime``).
    """
    if requested is None:
        return DEFAULT_LIFETIME
    return max(min(requested, MAX_LIFETIME), DEFAULT_LIFETIME)


def refresh_lifetime(requested: Optional[int]) -> int:
    """A Refresh's new lifetime (RFC 8656 §8; upstream's rule): the default
    without LIFETIME, else the request up to the maximum; 0 deletes."""
    if requested is None:
        return DEFAULT_LIFETIME
    return min(requested, MAX_LIFETIME)


@dataclass(slots=True, eq=False, repr=False)
class Permission(Timed):
    allocation: Allocation
    ip: str


@dataclass(slots=True, eq=False, repr=False)
class Channel(Timed):
    """A channel; ``expires`` and ``bound`` are set by each bind, and while
    unbound the ``deadline`` is the end of its reserve period."""

    allocation: Allocation
    number: int
    peer: Address
    family: int
    bound: bool = field(default=False, init=False)
    expires: float = field(default=0.0, init=False)


@dataclass(slots=True, eq=False, repr=False)
class Reservation(Timed):
    token: bytes
    port: int
    family: int
    #: The allocation that made it: the reservation goes with it (SPEC §5).
    owner: Optional[Allocation] = field(default=None, init=False)

    def detach(self) -> None:
        """Cut the link with the allocation that made it."""
        owner = self.owner
        if owner is not None:
            owner.reserved = None
            self.owner = None


@dataclass(slots=True, eq=False, repr=False)
class Allocation(Timed):
    client: Client
    username: str
    families: tuple[int, ...]
    lifetime: int
    deadline: float = field(default=0.0, kw_only=True)
    port: int = field(default=0, init=False)
    pending_families: list[int] = field(default_factory=list, init=False)
    opened_families: list[int] = field(default_factory=list, init=False)
    permissions: dict[str, Permission] = field(default_factory=dict, init=False)
    channels: dict[int, Channel] = field(default_factory=dict, init=False)
    channel_by_peer: dict[Address, int] = field(default_factory=dict, init=False)
    #: peer -> (client, 2-byte channel prefix, client family, stream): the fast path
    chan_in: dict[Address, tuple[Client, bytes, int, bool]] = field(default_factory=dict, init=False)
    request: Optional[Request] = field(default=None, init=False)
    response: bytes = field(default=b"", init=False)
    dont_fragment: bool = field(default=False, init=False)
    even_port: bool = field(default=False, init=False)
    reserve_next: bool = field(default=False, init=False)
    reservation: Optional[Reservation] = field(default=None, init=False)
    #: The reservation this allocation made (EVEN-PORT R), while unclaimed.
    reserved: Optional[Reservation] = field(default=None, init=False)
    attempts: int = field(default=0, init=False)
    tried_ports: set[int] = field(default_factory=set, init=False)
    active: bool = field(default=False, init=False)
    created: float = field(default=0.0, init=False)
    #: [bytes to peers, packets to peers, bytes to the client, packets to
    #: the client, then for --max-bps: tokens and last refill of each
    #: direction]: shared with the fast-path entries, one list per allocation
    meter: list[float] = field(default_factory=lambda: [0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0], init=False)


@dataclass(frozen=True)
class AllocationInfo:
    """One allocation as the control endpoint shows it (SPEC §10)."""

    client: Client
    username: str
    port: int
    relayed: tuple[Address, ...]
    age: float
    lifetime_left: float
    channels: int
    permissions: int
    bytes_to_peers: int
    packets_to_peers: int
    bytes_to_client: int
    packets_to_client: int


def pick_port(
    low: int,
    high: int,
    used: set[int],
    tried: set[int],
    even: bool,
    reserve_next: bool,
    getrandbits: Callable[[int], int],
) -> Optional[int]:
    """A free port in ``low..high`` (RFC 8656 §7.2: chosen at random), not in
    ``used`` nor ``tried``; even, and with a free next port when
    ``reserve_next``, for EVEN-PORT (§7.1).  32 random draws, then one sweep
    from a random start, so a nearly full range is still found."""
    size = high - low + 1

    def usable(port: int) -> bool:
        if port in used or port in tried:
            return False
        if even:
            if port & 1:
                return False
            if reserve_next and (port + 1 > high or port + 1 in used):
                return False
        return True

    for _ in range(32):
        port = low + getrandbits(32) % size
        if usable(port):
            return port
    start = getrandbits(32) % size
    for i in range(size):
        port = low + (start + i) % size
        if usable(port):
            return port
    return None
