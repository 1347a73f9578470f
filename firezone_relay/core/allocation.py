"""Allocation records and the relayed-port picker (upstream: ``allocation.rs``).

An ``Allocation`` (RFC 8656 §2.2) holds its ``Permission`` records (§9), its
``Channel`` bindings (§12) and, for EVEN-PORT with the R bit (§7.1), the
``Reservation`` of the next port.  Each is a ``timers.Timed`` record, so one
heap expires them all.  These are plain records: the rules that create,
refresh and delete them are the request handlers in ``relay.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
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


class Permission(Timed):
    __slots__ = ("allocation", "ip")

    def __init__(self, allocation: "Allocation", ip: str, deadline: float) -> None:
        super().__init__(deadline)
        self.allocation = allocation
        self.ip = ip


class Channel(Timed):
    __slots__ = ("allocation", "number", "peer", "family", "bound", "expires")

    def __init__(self, allocation: "Allocation", number: int, peer: Address, family: int, expires: float) -> None:
        super().__init__(expires)
        self.allocation = allocation
        self.number = number
        self.peer = peer
        self.family = family
        self.bound = True
        self.expires = expires


class Reservation(Timed):
    __slots__ = ("token", "port", "family", "owner")

    def __init__(self, token: bytes, port: int, family: int, deadline: float) -> None:
        super().__init__(deadline)
        self.token = token
        self.port = port
        self.family = family
        #: The allocation that made it: the reservation goes with it (SPEC §5).
        self.owner: Optional[Allocation] = None

    def detach(self) -> None:
        """Cut the link with the allocation that made it."""
        owner = self.owner
        if owner is not None:
            owner.reserved = None
            self.owner = None


class Allocation(Timed):
    __slots__ = (
        "client",
        "username",
        "port",
        "families",
        "pending_families",
        "opened_families",
        "permissions",
        "channels",
        "channel_by_peer",
        "chan_in",
        "request",
        "response",
        "lifetime",
        "dont_fragment",
        "even_port",
        "reserve_next",
        "reservation",
        "reserved",
        "attempts",
        "tried_ports",
        "active",
        "created",
        "meter",
    )

    def __init__(self, client: Client, username: str, families: tuple[int, ...], lifetime: int) -> None:
        super().__init__(0.0)
        self.client = client
        self.username = username
        self.port = 0
        self.families = families
        self.pending_families: list[int] = []
        self.opened_families: list[int] = []
        self.permissions: dict[str, Permission] = {}
        self.channels: dict[int, Channel] = {}
        self.channel_by_peer: dict[Address, int] = {}
        #: peer -> (client, 2-byte channel prefix, client family, stream): the fast path
        self.chan_in: dict[Address, tuple[Client, bytes, int, bool]] = {}
        self.request: Optional[Request] = None
        self.response = b""
        self.lifetime = lifetime
        self.dont_fragment = False
        self.even_port = False
        self.reserve_next = False
        self.reservation: Optional[Reservation] = None
        #: The reservation this allocation made (EVEN-PORT R), while unclaimed.
        self.reserved: Optional[Reservation] = None
        self.attempts = 0
        self.tried_ports: set[int] = set()
        self.active = False
        self.created = 0.0
        #: [bytes to peers, packets to peers, bytes to the client, packets to
        #: the client, then for --max-bps: tokens and last refill of each
        #: direction]: shared with the fast-path entries, one list per allocation
        self.meter: list[float] = [0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0]


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
