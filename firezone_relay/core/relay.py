"""The TURN relay as a sans-IO state machine.

Theory of operation
-------------------
The shell feeds the relay three kinds of input and drains two kinds of
output; the relay never touches a socket or a clock.

* ``handle_client_input(data, sender, now)``: a datagram that arrived on the
  listen port.  The first two bits demultiplex it (SPEC §1): STUN requests and
  Send indications are handled and their replies queued as commands;
  ChannelData on a bound channel is *returned* as a ``Transmit`` tuple so that
  the per-packet path builds no command object.
* ``handle_peer_traffic(data, peer, port, family, now)``: a datagram that
  arrived on allocation port ``port``.  A bound channel turns it into
  ChannelData for the client, a permission into a Data indication; both are
  returned as a ``Transmit``.  Anything else is dropped.
* ``handle_timeout(now)``: expire whatever is due.  ``poll_timeout()`` is the
  absolute time of the earliest deadline.
* A call that returns a ``Transmit`` has queued no command and moved no
  deadline, so the shell may skip draining commands after it (the hot path).
* ``handle_port_result(port, family, ok, now)``: the shell's answer to an
  ``OpenPort`` command.  An Allocate's success response is queued only once
  every relayed port it needs is bound; a port that could not be bound is
  skipped and another one tried.

Time is POSIX seconds (the shell passes ``reactor.seconds()``), because the
Firezone credentials carry a wall-clock expiry.  Everything that can expire
(allocations, permissions, channels, port reservations) sits in one heap of
``(deadline, sequence, object)``; an object remembers the deadline of its live
heap entry, so a refresh that pushes a deadline out costs no heap operation
and stale entries are skipped (and the heap rebuilt if they pile up).

Nonces are stateless (see ``auth.NonceFactory``), so nothing is stored for a
client until it holds an allocation.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, Union

from . import stun
from .auth import NONCE_LIFETIME, REALM, NonceFactory, generate_password, parse_rest_username, parse_username, rest_password
from .commands import (
    Address,
    AllocationCreated,
    Client,
    AllocationDeleted,
    ChannelBound,
    ChannelUnbound,
    ClosePort,
    Command,
    OpenPort,
    PermissionAdded,
    PermissionRemoved,
    SendDatagram,
    Transmit,
)
from .policy import OwnAddresses, PeerPolicy

DEFAULT_LIFETIME = 600
MAX_LIFETIME = 3600
PERMISSION_LIFETIME = 300
CHANNEL_LIFETIME = 600
CHANNEL_RESERVE = 300
RESERVATION_LIFETIME = 30
MIN_CHANNEL = 0x4000
MAX_CHANNEL = 0x7FFF
UDP = 17
MAX_PORT_ATTEMPTS = 16
#: A REST credential valid for longer than this is refused (401): a
#: credential that never expires is a static password in disguise.
MAX_REST_LIFETIME = 366 * 86400
#: SPEC §1: a CreatePermission lists at most this many XOR-PEER-ADDRESS (more → 400).
MAX_PEERS_PER_REQUEST = 32
#: SPEC §1: a 420 lists at most this many attribute types in UNKNOWN-ATTRIBUTES.
MAX_UNKNOWN_LISTED = 16
#: SPEC §1 ("more than 64 attributes → 400 or drop"): a STUN message larger
#: than this, other than a Send indication (whose DATA may be up to 64 KiB),
#: is dropped unread, counted as ``oversized``.  No request the relay serves
#: comes near it (64 attributes of the largest known kinds are ~4 KiB), and
#: coturn 4.6.1 does not read UDP datagrams over 16,384 bytes at all; so the
#: worst 64 KiB request costs what dropping it costs (bench_hostile).
MAX_STUN_MESSAGE = 16384
_SEND_INDICATION = stun.message_type(stun.SEND, stun.INDICATION)
#: SPEC §5: no reply to an unauthenticated request is more than this many
#: times the size of the request (reflection amplification).
MAX_AMPLIFICATION = 4

_PASSWORD_ALGORITHMS = ((stun.ALGORITHM_SHA256, b""), (stun.ALGORITHM_MD5, b""))
_PASSWORD_ALGORITHMS_SIZE = 4 + 4 * len(_PASSWORD_ALGORITHMS)
_WIRE_FAMILY = {stun.FAMILY_IPV4: 4, stun.FAMILY_IPV6: 6}


#: RelayConfig fields that ``Relay.reconfigure`` may change.
LIVE_FIELDS = frozenset(
    (
        "user_allocation_limit",
        "max_allocations",
        "max_permissions",
        "max_channels",
        "allow_loopback_peers",
        "allow_peers",
        "deny_peers",
        "unauthenticated_burst",
        "unauthenticated_rate",
        "rest_secrets",
        "max_bps",
    )
)


class RandomSource(Protocol):
    """``random.Random`` and ``random.SystemRandom`` satisfy this."""

    def getrandbits(self, k: int, /) -> int: ...


@dataclass
class RelayConfig:
    auth_secret: str
    public_ip4: Optional[str] = None
    public_ip6: Optional[str] = None
    listen_port: int = 3478
    lowest_port: int = 49152
    highest_port: int = 65535
    software: str = "firezone-relay 0.1.0 (python)"
    #: Allocations one username may hold; 0 = no limit.  Beyond it the
    #: username's oldest allocation is replaced (upstream's roaming rule).
    user_allocation_limit: int = 0
    #: Allocations in total; 0 = no limit (the port range still bounds it).
    max_allocations: int = 0
    #: Per-allocation caps (→ 508 beyond); channels include those in their
    #: reserve period.  256 each bounds a full allocation's memory (SECURITY.md).
    max_permissions: int = 256
    max_channels: int = 256
    allow_loopback_peers: bool = False
    allow_peers: Sequence[str] = ()
    deny_peers: Sequence[str] = ()
    #: Token bucket per source IP for replies to unauthenticated requests
    #: (Binding answers and unsigned errors): burst and refill per second.
    #: A rate of 0 disables the limit.
    unauthenticated_burst: int = 200
    unauthenticated_rate: float = 100.0
    nonce_lifetime: int = NONCE_LIFETIME
    #: Shared secrets of coturn-compatible TURN REST credentials (SPEC §10),
    #: checked after the Firezone scheme; several during a rotation.
    rest_secrets: Sequence[str] = ()
    realm: str = REALM
    #: Relayed payload bytes per second per allocation, each direction on
    #: its own (coturn's max-bps); 0 = no limit.
    max_bps: int = 0
    #: The relay's service ports beside ``listen_port`` (TLS, health and
    #: metrics, control): never reachable as peers on an own address.
    service_ports: Sequence[int] = ()
    #: Own addresses beside the public ones (bind and interface addresses,
    #: CIDR networks allowed), recognised under every spelling (SPEC §5).
    own_addresses: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.public_ip4 is None and self.public_ip6 is None:
            raise ValueError("at least one of public_ip4 and public_ip6 is required")
        if not 0 < self.lowest_port <= self.highest_port <= 65535:
            raise ValueError("bad allocation port range")
        if self.lowest_port <= self.listen_port <= self.highest_port:
            raise ValueError("the listen port lies inside the allocation port range")
        if not self.auth_secret:
            raise ValueError("an auth secret is required")


_FIXED_FIELDS = tuple(name for name in RelayConfig.__dataclass_fields__ if name not in LIVE_FIELDS)


@dataclass
class RelayStats:
    """Plain integer counters read by the metrics collector at scrape time."""

    allocations_total: int = 0
    client_to_peer_packets: int = 0
    client_to_peer_bytes: int = 0
    peer_to_client_packets: int = 0
    peer_to_client_bytes: int = 0
    #: (message_type, "success"|"error", error code or 0) -> count
    responses: dict[tuple[str, str, int], int] = field(default_factory=dict)
    #: reason -> count
    dropped: dict[str, int] = field(default_factory=dict)
    #: reason -> count
    auth_failures: dict[str, int] = field(default_factory=dict)
    #: histogram of relayed payload sizes: index i counts sizes in
    #: (100*i, 100*(i+1)] for i < 15, index 15 counts > 1500.
    packet_sizes: list[int] = field(default_factory=lambda: [0] * 16)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


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


class _Timed:
    __slots__ = ("deadline", "scheduled", "dead")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.scheduled = float("inf")
        self.dead = False


class _Permission(_Timed):
    __slots__ = ("allocation", "ip")

    def __init__(self, allocation: "_Allocation", ip: str, deadline: float) -> None:
        super().__init__(deadline)
        self.allocation = allocation
        self.ip = ip


class _Channel(_Timed):
    __slots__ = ("allocation", "number", "peer", "family", "bound", "expires")

    def __init__(self, allocation: "_Allocation", number: int, peer: Address, family: int, expires: float) -> None:
        super().__init__(expires)
        self.allocation = allocation
        self.number = number
        self.peer = peer
        self.family = family
        self.bound = True
        self.expires = expires


class _Reservation(_Timed):
    __slots__ = ("token", "port", "family", "owner")

    def __init__(self, token: bytes, port: int, family: int, deadline: float) -> None:
        super().__init__(deadline)
        self.token = token
        self.port = port
        self.family = family
        #: The allocation that made it: the reservation goes with it (SPEC §5).
        self.owner: Optional[_Allocation] = None


class _Request:
    """What a reply to one request needs: where, which transaction, signed how."""

    __slots__ = (
        "sender", "method", "transaction_id", "fingerprint", "key", "sha256", "username", "authenticated", "algorithm", "size"
    )

    def __init__(self, sender: Client, message: stun.Message) -> None:
        self.sender = sender
        self.method = message.method
        self.transaction_id = message.transaction_id
        self.fingerprint = message.has_fingerprint
        #: The request's size in bytes: the budget of an unauthenticated reply.
        self.size = len(message.raw)
        self.key: Optional[bytes] = None
        self.sha256 = False
        self.username = ""
        self.authenticated = False
        self.algorithm = stun.ALGORITHM_MD5


class _Allocation(_Timed):
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
        self.permissions: dict[str, _Permission] = {}
        self.channels: dict[int, _Channel] = {}
        self.channel_by_peer: dict[Address, int] = {}
        #: peer -> (client, 2-byte channel prefix, client family, stream): the fast path
        self.chan_in: dict[Address, tuple[Client, bytes, int, bool]] = {}
        self.request: Optional[_Request] = None
        self.response = b""
        self.lifetime = lifetime
        self.dont_fragment = False
        self.even_port = False
        self.reserve_next = False
        self.reservation: Optional[_Reservation] = None
        #: The reservation this allocation made (EVEN-PORT R), while unclaimed.
        self.reserved: Optional[_Reservation] = None
        self.attempts = 0
        self.tried_ports: set[int] = set()
        self.active = False
        self.created = 0.0
        #: [bytes to peers, packets to peers, bytes to the client, packets to
        #: the client, then for --max-bps: tokens and last refill of each
        #: direction]: shared with the fast-path entries, one list per allocation
        self.meter: list[float] = [0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0]


def _family_of(ip: str) -> int:
    return 6 if ":" in ip else 4


def _attribute_size(value_length: int) -> int:
    """Bytes on the wire of an attribute whose value has ``value_length`` bytes."""
    return 4 + ((value_length + 3) & ~3)


def _unknown_listed(message: stun.Message) -> tuple[int, ...]:
    """What a 420 lists: the distinct unknown comprehension-required types,
    first ones first, at most ``MAX_UNKNOWN_LISTED`` (SPEC §1)."""
    return tuple(dict.fromkeys(message.unknown_required))[:MAX_UNKNOWN_LISTED]


class Relay:
    """The relay state machine.  See the module docstring."""

    def __init__(self, config: RelayConfig, rng: RandomSource) -> None:
        self.config = config
        self.stats = RelayStats()
        self._rng = rng
        self._commands: deque[Command] = deque()
        self._nonces = NonceFactory(rng.getrandbits(256).to_bytes(32, "big"), config.nonce_lifetime)
        self._policy = PeerPolicy(config.allow_peers, config.deny_peers, config.allow_loopback_peers)
        self._public: dict[int, str] = {}
        if config.public_ip4:
            self._public[4] = config.public_ip4
        if config.public_ip6:
            self._public[6] = config.public_ip6
        self._own_ips = frozenset(self._public.values())
        self._own = OwnAddresses(list(self._public.values()) + list(config.own_addresses))
        self._service_ports = frozenset((config.listen_port, *config.service_ports))
        self._software = config.software
        self._draining = False
        self._max_bps = config.max_bps

        self._allocations: dict[Client, _Allocation] = {}
        self._by_port: dict[int, _Allocation] = {}
        self._by_username: dict[str, list[_Allocation]] = {}
        self._pending: dict[tuple[int, int], _Allocation] = {}
        #: client -> channel -> (port, family, peer, hairpin, meter): the fast path
        self._chan_out: dict[Client, dict[int, tuple[int, int, Address, bool, list[float]]]] = {}
        self._used_ports: set[int] = set()
        self._reservations: dict[bytes, _Reservation] = {}
        #: Pending allocations that will make a reservation when their port opens.
        self._reserving = 0
        self._timers: list[tuple[float, int, _Timed]] = []
        self._timer_seq = 0
        self._buckets: dict[str, list[float]] = {}
        self.permission_count = 0
        self.channel_count = 0  # bound channels
        self._channels_total = 0  # including those in their reserve period

    # --- public surface ----------------------------------------------------

    @property
    def auth_secret(self) -> str:
        return self.config.auth_secret

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def allocation_count(self) -> int:
        return len(self._by_port)

    def allocation_count_by_family(self) -> dict[int, int]:
        counts = {4: 0, 6: 0}
        for alloc in self._by_port.values():
            for family in alloc.families:
                counts[family] += 1
        return counts

    def start_draining(self) -> None:
        """Refuse new allocations (508) from now on; everything else goes on."""
        self._draining = True

    def reconfigure(self, config: RelayConfig) -> None:
        """Take a new configuration while running (SIGHUP reload, SPEC §10).

        Only the fields in ``LIVE_FIELDS`` may differ from the current
        configuration: addresses, ports and the secret shape every allocation
        and nonce already issued.  The new limits apply to what comes next;
        existing allocations, permissions and channels are kept.
        """
        fixed = [f for f in _FIXED_FIELDS if getattr(config, f) != getattr(self.config, f)]
        if fixed:
            raise ValueError("cannot change while running: %s" % ", ".join(fixed))
        self.config = config
        self._max_bps = config.max_bps
        self._policy = PeerPolicy(config.allow_peers, config.deny_peers, config.allow_loopback_peers)
        # A peer the new policy denies loses its channels and permissions now
        # (the same commands as on expiry), not when they would have expired.
        for alloc in list(self._by_port.values()):
            for channel in [c for c in alloc.channels.values() if c.bound and not self._peer_allowed(c.peer)[0]]:
                self._expire_channel(channel)
            for permission in [p for p in alloc.permissions.values() if not self._ip_allowed(p.ip)]:
                self._expire_permission(permission)

    def next_command(self) -> Optional[Command]:
        if self._commands:
            return self._commands.popleft()
        return None

    def poll_timeout(self) -> Optional[float]:
        timers = self._timers
        while timers:
            deadline, _, obj = timers[0]
            if obj.dead or obj.scheduled != deadline:
                heapq.heappop(timers)
            elif obj.deadline > deadline:
                heapq.heappop(timers)
                obj.scheduled = float("inf")
                self._schedule(obj)
            else:
                return deadline
        return None

    def handle_timeout(self, now: float) -> None:
        timers = self._timers
        while True:
            deadline = self.poll_timeout()
            if deadline is None or deadline > now:
                break
            _, _, obj = heapq.heappop(timers)
            obj.scheduled = float("inf")
            if isinstance(obj, _Allocation):
                self._delete_allocation(obj, "expired")
            elif isinstance(obj, _Permission):
                self._expire_permission(obj)
            elif isinstance(obj, _Channel):
                self._expire_channel(obj)
            elif isinstance(obj, _Reservation):
                self._expire_reservation(obj)
        self._maybe_clear_timers()

    def handle_client_input(self, data: bytes, sender: Client, now: float) -> Optional[Transmit]:
        """A datagram from ``sender`` on the listen port, or one framed
        message from a stream client (``sender`` has three items)."""
        if not data or sender[1] == 0:
            self.stats.drop("malformed" if data else "empty")
            return None
        first = data[0]
        if 0x40 <= first < 0x80:
            channels = self._chan_out.get(sender)
            entry = channels.get((first << 8) | data[1]) if channels is not None and len(data) >= 4 else None
            if entry is None:
                self.stats.drop("unbound_channel" if len(data) >= 4 else "malformed")
                return None
            length = (data[2] << 8) | data[3]
            if length > len(data) - 4:
                self.stats.drop("malformed")
                return None
            payload = data[4 : 4 + length]
            meter = entry[4]
            if self._max_bps and self._over_budget(meter, 4, length, now):
                return None
            stats = self.stats
            stats.client_to_peer_packets += 1
            stats.client_to_peer_bytes += length
            stats.packet_sizes[(length - 1) // 100 if 0 < length <= 1500 else (15 if length else 0)] += 1
            meter[0] += length
            meter[1] += 1
            if entry[3]:
                return self._hairpin(entry[0], entry[1], entry[2], payload, now)
            return (entry[0], entry[1], entry[2], payload)
        if first < 0x40:
            self._handle_stun(data, sender, now)
            return None
        self.stats.drop("not_stun")
        return None

    def handle_peer_traffic(self, data: bytes, peer: Address, port: int, family: int, now: float) -> Optional[Transmit]:
        """A datagram from ``peer`` on allocation port ``port`` (socket family ``family``)."""
        alloc = self._by_port.get(port)
        if alloc is None:
            self.stats.drop("no_allocation")
            return None
        entry = alloc.chan_in.get(peer)
        n = len(data)
        if entry is not None:
            if n > 0xFFFF:
                self.stats.drop("too_big")
                return None
            meter = alloc.meter
            if self._max_bps and self._over_budget(meter, 6, n, now):
                return None
            stats = self.stats
            stats.peer_to_client_packets += 1
            stats.peer_to_client_bytes += n
            stats.packet_sizes[(n - 1) // 100 if 0 < n <= 1500 else (15 if n else 0)] += 1
            meter[2] += n
            meter[3] += 1
            if entry[3]:  # streams carry ChannelData padded to 4 bytes (RFC 8656 §12.5)
                return (self.config.listen_port, entry[2], entry[0], entry[1] + n.to_bytes(2, "big") + data + b"\x00" * (-n % 4))
            return (self.config.listen_port, entry[2], entry[0], entry[1] + n.to_bytes(2, "big") + data)
        permission = alloc.permissions.get(peer[0])
        if permission is None or permission.deadline <= now:
            self.stats.drop("no_permission")
            return None
        if n > 0xFFFF - 64:
            self.stats.drop("too_big")
            return None
        meter = alloc.meter
        if self._max_bps and self._over_budget(meter, 6, n, now):
            return None
        tid = self._rng.getrandbits(96).to_bytes(12, "big")
        indication = stun.encode(
            stun.DATA_METHOD,
            stun.INDICATION,
            tid,
            [(stun.XOR_PEER_ADDRESS, peer), (stun.DATA, bytes(data))],
        )
        stats = self.stats
        stats.peer_to_client_packets += 1
        stats.peer_to_client_bytes += n
        stats.packet_sizes[(n - 1) // 100 if 0 < n <= 1500 else (15 if n else 0)] += 1
        meter[2] += n
        meter[3] += 1
        return (self.config.listen_port, _family_of(alloc.client[0]), alloc.client, indication)

    def handle_client_closed(self, client: Client, now: float) -> None:
        """A stream client's connection is gone: its allocation goes with it."""
        alloc = self._allocations.get(client)
        if alloc is None:
            return
        if alloc.active:
            self._delete_allocation(alloc, "connection closed")
        else:  # still waiting for its ports: forget it, close what was bound
            for key in [k for k, v in self._pending.items() if v is alloc]:
                del self._pending[key]
            for family in alloc.opened_families:
                self._commands.append(ClosePort(alloc.port, family))
            self._used_ports.discard(alloc.port)
            del self._allocations[client]
            if alloc.reserve_next and not alloc.dead:
                self._reserving -= 1
            alloc.dead = True

    def handle_port_result(self, port: int, family: int, ok: bool, now: float) -> None:
        """The shell's answer to ``OpenPort(port, family)``."""
        alloc = self._pending.pop((port, family), None)
        if alloc is None:
            if ok:  # nobody waits for it any more: give it back
                self._commands.append(ClosePort(port, family))
            return
        if ok:
            alloc.opened_families.append(family)
            if alloc.pending_families:
                self._open_next_family(alloc)
            else:
                self._activate(alloc, now)
            return
        # Could not bind: undo what was bound on this port and try another.
        for opened in alloc.opened_families:
            self._commands.append(ClosePort(port, opened))
        alloc.opened_families = []
        self._used_ports.discard(port)
        self.stats.drop("port_unavailable")
        if alloc.reservation is not None or not self._start_port_attempt(alloc):
            self._fail_pending(alloc, now)

    # --- timers ------------------------------------------------------------

    def _schedule(self, obj: _Timed) -> None:
        if obj.deadline < obj.scheduled:
            obj.scheduled = obj.deadline
            self._timer_seq += 1
            heapq.heappush(self._timers, (obj.deadline, self._timer_seq, obj))
            if len(self._timers) > 64 + 4 * self._live_timed():
                self._rebuild_timers()

    def _live_timed(self) -> int:
        return len(self._by_port) + self.permission_count + self._channels_total + len(self._reservations)

    def _rebuild_timers(self) -> None:
        live: list[_Timed] = list(self._reservations.values())
        for alloc in self._by_port.values():
            live.append(alloc)
            live.extend(alloc.permissions.values())
            live.extend(alloc.channels.values())
        self._timers = []
        for obj in live:
            obj.scheduled = float("inf")
            self._schedule(obj)

    def _maybe_clear_timers(self) -> None:
        if not self._by_port and not self._reservations:
            self._timers.clear()

    # --- STUN dispatch -------------------------------------------------------

    def _handle_stun(self, data: bytes, sender: Client, now: float) -> None:
        if len(data) > MAX_STUN_MESSAGE and (data[0] << 8) | data[1] != _SEND_INDICATION:
            self.stats.drop("oversized")
            return
        try:
            # A Binding request reads no attribute: its values are not decoded.
            message = stun.decode_structure(data) if data[0] == 0 and data[1:2] == b"\x01" else stun.decode(data)
        except stun.StunDecodeError as exc:
            self.stats.drop(exc.drop_reason)
            if (
                exc.error_code is not None
                and exc.msg_class == stun.REQUEST
                and exc.method is not None
                and exc.transaction_id is not None
            ):
                if self._unauthenticated_allowed(sender, now):
                    parsed = parse_username(exc.username) if exc.username is not None else None
                    key = None
                    if exc.username is not None and parsed is not None:
                        password = generate_password(self.config.auth_secret, parsed[0], parsed[1])
                        key = stun.long_term_key(exc.username, self.config.realm, password)
                    # Unauthenticated: no SOFTWARE, and within the amplification budget.
                    if self._send(
                        sender,
                        exc.method,
                        stun.ERROR,
                        exc.transaction_id,
                        [(stun.ERROR_CODE, (400, "Bad Request"))],
                        key,
                        False,
                        False,
                        MAX_AMPLIFICATION * len(data),
                    ):
                        self._count_response(exc.method, exc.error_code)
            return
        cls = message.msg_class
        if cls == stun.REQUEST:
            request = _Request(sender, message)
            method = message.method
            if method == stun.BINDING:
                self._handle_binding(message, request, now)
            elif method == stun.ALLOCATE:
                self._handle_allocate(message, request, now)
            elif method == stun.REFRESH:
                self._handle_refresh(message, request, now)
            elif method == stun.CREATE_PERMISSION:
                self._handle_create_permission(message, request, now)
            elif method == stun.CHANNEL_BIND:
                self._handle_channel_bind(message, request, now)
            else:
                self._derive_key(message, request)
                self._error(request, 400, now)
        elif cls == stun.INDICATION and message.method == stun.SEND:
            self._handle_send(message, sender, now)
        else:
            self.stats.drop("unexpected_message")

    # --- replies -------------------------------------------------------------

    def _send(
        self,
        to: Client,
        method: int,
        cls: int,
        tid: bytes,
        attributes: list[stun.Attribute],
        key: Optional[bytes],
        sha256: bool,
        fingerprint: bool,
        limit: int = 0,
    ) -> bytes:
        """Encode and queue a reply; with a ``limit`` (bytes), a reply larger
        than it is not sent but counted, and ``b""`` returned."""
        payload = stun.encode(
            method,
            cls,
            tid,
            attributes,
            integrity_key=key if key is not None and not sha256 else None,
            integrity_sha256_key=key if key is not None and sha256 else None,
            fingerprint=fingerprint,
        )
        if limit and len(payload) > limit:
            self.stats.drop("amplification")
            return b""
        self._commands.append(SendDatagram(self.config.listen_port, _family_of(to[0]), to, payload))
        return payload

    def _count_response(self, method: int, code: int) -> None:
        key = (stun.METHOD_NAMES.get(method, "unknown"), "error" if code else "success", code)
        responses = self.stats.responses
        responses[key] = responses.get(key, 0) + 1

    def _reply(self, request: _Request, attributes: list[stun.Attribute]) -> bytes:
        # SPEC §1/§5: SOFTWARE only on replies to authenticated requests; a
        # reply to an unauthenticated one (Binding) stays within 4x its request.
        if request.authenticated:
            attributes = [(stun.SOFTWARE, self._software)] + attributes
        payload = self._send(
            request.sender,
            request.method,
            stun.SUCCESS,
            request.transaction_id,
            attributes,
            request.key,
            request.sha256,
            request.fingerprint,
            0 if request.authenticated else MAX_AMPLIFICATION * request.size,
        )
        if payload:
            self._count_response(request.method, 0)
        return payload

    def _error(self, request: _Request, code: int, now: float, extra: Optional[list[stun.Attribute]] = None) -> None:
        if not request.authenticated and not self._unauthenticated_allowed(request.sender, now):
            self.stats.drop("rate_limited")
            return
        attributes: list[stun.Attribute] = [(stun.ERROR_CODE, (code, stun.REASONS.get(code, "Error")))]
        if request.authenticated:
            attributes.insert(0, (stun.SOFTWARE, self._software))
        if extra:
            attributes.extend(extra)
        if self._send(
            request.sender,
            request.method,
            stun.ERROR,
            request.transaction_id,
            attributes,
            request.key,
            request.sha256,
            request.fingerprint,
            0 if request.authenticated else MAX_AMPLIFICATION * request.size,
        ):
            self._count_response(request.method, code)

    def _challenge(self, request: _Request, code: int, now: float) -> None:
        """401 or 438 with REALM and a fresh NONCE (RFC 8489 §9.2.4).

        REALM and NONCE are the MUSTs; PASSWORD-ALGORITHMS is a MAY ("The
        server MAY support alternate password algorithms, in which case it can
        list them ... in a PASSWORD-ALGORITHMS attribute"), and if it is sent
        the nonce must carry the security feature cookie with the "password
        algorithms" bit.  The full challenge (PASSWORD-ALGORITHMS, cookie
        nonce: SHA-256 offered) goes to requests large enough that it stays
        within 4x their size (SPEC §5), which every real first Allocate is
        (it must carry REQUESTED-TRANSPORT).  A smaller request (a bare 20-byte
        Allocate or Refresh) gets the smallest correct challenge: REALM and a
        plain 16-character nonce, MD5 only, 72 bytes unsigned (3.6x).
        """
        if not self._unauthenticated_allowed(request.sender, now):
            self.stats.drop("rate_limited")
            return
        client = (request.sender[0], request.sender[1])
        reason = stun.REASONS[code]
        budget = MAX_AMPLIFICATION * request.size
        nonce = self._nonces.issue(client, now)
        full_size = (
            stun.HEADER_LENGTH
            + _attribute_size(4 + len(reason))
            + _attribute_size(len(self.config.realm))
            + _attribute_size(len(nonce))
            + _PASSWORD_ALGORITHMS_SIZE
            + (0 if request.key is None else (36 if request.sha256 else 24))
            + (8 if request.fingerprint else 0)
        )
        attributes: list[stun.Attribute] = [(stun.ERROR_CODE, (code, reason)), (stun.REALM, self.config.realm)]
        if full_size <= budget:
            attributes += [(stun.NONCE, nonce), (stun.PASSWORD_ALGORITHMS, _PASSWORD_ALGORITHMS)]
        else:
            attributes.append((stun.NONCE, self._nonces.issue(client, now, full=False)))
        if self._send(
            request.sender,
            request.method,
            stun.ERROR,
            request.transaction_id,
            attributes,
            request.key,
            request.sha256,
            request.fingerprint,
            budget,
        ):
            self._count_response(request.method, code)

    def _unauthenticated_allowed(self, client: Client, now: float) -> bool:
        """The reflection guard.  Stream clients are exempt: a TCP/TLS peer
        completed a handshake, so its source address cannot be spoofed, and
        it does not retransmit a reply we drop."""
        rate = self.config.unauthenticated_rate
        if rate <= 0 or len(client) == 3:
            return True
        if client in self._allocations:
            # A 5-tuple that holds an allocation is never charged: Firezone
            # clients send a Binding every 25 s per allocation, and thousands
            # of them can share one NAT address (SPEC §5).
            return True
        ip = client[0]
        burst = float(self.config.unauthenticated_burst)
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= 65536:
                self._prune_buckets(now)
            self._buckets[ip] = [burst - 1.0, now]
            return True
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _prune_buckets(self, now: float) -> None:
        """Forget buckets that have refilled; if none has, forget the oldest half."""
        rate = self.config.unauthenticated_rate
        burst = float(self.config.unauthenticated_burst)
        full = [ip for ip, (tokens, last) in self._buckets.items() if tokens + (now - last) * rate >= burst]
        for ip in full:
            del self._buckets[ip]
        if len(self._buckets) >= 65536:
            for ip in list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[ip]

    # --- authentication -------------------------------------------------------

    def _authenticate(self, message: stun.Message, request: _Request, now: float) -> bool:
        """RFC 8489 §9.2 with the Firezone credential scheme.

        On failure the reply (401/438/400) is queued and False returned.  A
        request whose USERNAME has the Firezone form gets signed replies,
        errors included.
        """
        parsed, algorithms_ok = self._derive_key(message, request)
        username = message.get_str(stun.USERNAME)
        has_integrity = message.integrity_offset >= 0 or message.integrity_sha256_offset >= 0
        nonce = message.get_str(stun.NONCE)
        if not has_integrity or username is None or nonce is None:
            self._auth_failure("missing_credentials")
            self._challenge(request, 401, now)
            return False
        if not self._nonces.is_valid(nonce, (request.sender[0], request.sender[1]), now):
            self._auth_failure("stale_nonce")
            self._challenge(request, 438, now)
            return False
        if not algorithms_ok:
            self._auth_failure("bad_password_algorithm")
            self._error(request, 400, now)
            return False
        rest_expiry = parse_rest_username(username) if self.config.rest_secrets else None
        if (parsed is None or request.key is None) and rest_expiry is None:
            self._auth_failure("malformed_username")
            self._challenge(request, 401, now)
            return False
        check = stun.check_integrity_sha256 if request.sha256 else stun.check_integrity
        expiry: Optional[int] = None
        if parsed is not None and request.key is not None and check(message, request.key):
            expiry = parsed[0]
        elif rest_expiry is not None:
            # TURN REST credentials (SPEC §10): either scheme's key may verify.
            for secret in self.config.rest_secrets:
                key = stun.long_term_key(username, self.config.realm, rest_password(secret, username), request.algorithm)
                if check(message, key):
                    request.key = key
                    request.username = username
                    expiry = rest_expiry
                    break
            if expiry is not None and expiry > now + MAX_REST_LIFETIME:
                self._auth_failure("rest_expiry_too_far")
                self._challenge(request, 401, now)
                return False
        if expiry is None:
            self._auth_failure("bad_integrity")
            self._challenge(request, 401, now)
            return False
        if expiry < now:
            self._auth_failure("expired")
            self._challenge(request, 401, now)
            return False
        request.authenticated = True
        return True

    def _derive_key(self, message: stun.Message, request: _Request) -> tuple[Optional[tuple[int, str]], bool]:
        """Set ``request.key`` from a Firezone-form USERNAME so that every
        reply to it is signed.  Returns the parsed username and whether the
        PASSWORD-ALGORITHM(S) attributes are acceptable (RFC 8489 §9.2.4)."""
        username = message.get_str(stun.USERNAME)
        parsed = parse_username(username) if username is not None else None
        algorithm = stun.ALGORITHM_MD5
        algorithm_value = message.get(stun.PASSWORD_ALGORITHM)
        algorithms_value = message.get(stun.PASSWORD_ALGORITHMS)
        algorithms_ok = True
        if algorithm_value is not None or algorithms_value is not None:
            algorithms_ok = (
                isinstance(algorithm_value, tuple)
                and algorithms_value == _PASSWORD_ALGORITHMS
                and algorithm_value in _PASSWORD_ALGORITHMS
            )
            if algorithms_ok and isinstance(algorithm_value, tuple):
                algorithm = algorithm_value[0]
        request.algorithm = algorithm
        request.sha256 = message.integrity_sha256_offset >= 0
        if username is not None and parsed is not None:
            request.username = username
            password = generate_password(self.config.auth_secret, parsed[0], parsed[1])
            request.key = stun.long_term_key(username, self.config.realm, password, algorithm)
        return parsed, algorithms_ok

    def _auth_failure(self, reason: str) -> None:
        failures = self.stats.auth_failures
        failures[reason] = failures.get(reason, 0) + 1

    def _common_checks(self, message: stun.Message, request: _Request, now: float) -> bool:
        """Authentication, then 420 for unknown comprehension-required attributes."""
        if not self._authenticate(message, request, now):
            return False
        if message.unknown_required:
            self._error(request, 420, now, [(stun.UNKNOWN_ATTRIBUTES, _unknown_listed(message))])
            return False
        return True

    def _owned_allocation(self, request: _Request, now: float, any_username: bool = False) -> Optional[_Allocation]:
        """The sender's active allocation, else 437; wrong username → 441
        unless ``any_username`` (an authenticated delete from the 5-tuple)."""
        alloc = self._allocations.get(request.sender)
        if alloc is None or not alloc.active:
            self._error(request, 437, now)
            return None
        if alloc.username != request.username and not any_username:
            self._error(request, 441, now)
            return None
        return alloc

    # --- Binding ---------------------------------------------------------------

    def _handle_binding(self, message: stun.Message, request: _Request, now: float) -> None:
        if message.unknown_required:
            self._error(request, 420, now, [(stun.UNKNOWN_ATTRIBUTES, _unknown_listed(message))])
            return
        if not self._unauthenticated_allowed(request.sender, now):
            self.stats.drop("rate_limited")
            return
        self._reply(request, [(stun.XOR_MAPPED_ADDRESS, (request.sender[0], request.sender[1]))])

    # --- Allocate ----------------------------------------------------------------

    def _handle_allocate(self, message: stun.Message, request: _Request, now: float) -> None:
        existing = self._allocations.get(request.sender)
        if existing is not None and existing.request is not None:
            if existing.request.transaction_id == message.transaction_id:
                if existing.active:  # a retransmission: the same answer again
                    self._count_response(stun.ALLOCATE, 0)
                    self._commands.append(
                        SendDatagram(
                            self.config.listen_port,
                            _family_of(request.sender[0]),
                            request.sender,
                            existing.response,
                        )
                    )
                return
        if not self._common_checks(message, request, now):
            return
        if existing is not None:
            self._error(request, 437, now)
            return
        if self._draining:
            self._error(request, 508, now)
            return
        transport = message.get_int(stun.REQUESTED_TRANSPORT)
        if transport is None:
            self._error(request, 400, now)
            return
        if transport != UDP:
            self._error(request, 442, now)
            return
        requested = message.get_int(stun.REQUESTED_ADDRESS_FAMILY)
        additional = message.get_int(stun.ADDITIONAL_ADDRESS_FAMILY)
        token = message.get_bytes(stun.RESERVATION_TOKEN)
        even_port = message.get(stun.EVEN_PORT)
        if (requested is not None and additional is not None) or additional == stun.FAMILY_IPV4:
            self._error(request, 400, now)
            return
        if token is not None and (even_port is not None or requested is not None or additional is not None):
            self._error(request, 400, now)
            return
        if additional is not None and additional != stun.FAMILY_IPV6:
            self._error(request, 400, now)
            return
        families: tuple[int, ...]
        reservation: Optional[_Reservation] = None
        if token is not None:
            reservation = self._reservations.get(token)
            if reservation is None or reservation.dead:
                self._error(request, 508, now)
                return
            families = (reservation.family,)
        elif requested is not None:
            family = _WIRE_FAMILY.get(requested)
            if family is None or family not in self._public:
                self._error(request, 440, now)
                return
            families = (family,)
        elif additional is not None:  # IPv4 and IPv6, or what the relay has of them
            families = tuple(f for f in (4, 6) if f in self._public)
        else:
            if 4 not in self._public:
                self._error(request, 440, now)
                return
            families = (4,)
        # An EVEN-PORT reservation counts against the quotas like an
        # allocation (SPEC §5): one that asks for it needs two units, one
        # that claims one trades the reservation's unit for its own.
        need = 2 if even_port is True else 1
        if reservation is not None:
            self._detach_reservation(reservation)
        # A roaming device replaces its own oldest allocation first, so that
        # the port and the quota it frees count for the new one.
        limit = self.config.user_allocation_limit
        if limit > 0:
            if need > limit:
                self._error(request, 508, now)
                return
            owned = self._by_username.get(request.username, [])
            while owned and self._user_units(owned) + need > limit:
                self._delete_allocation(owned[0], "replaced")
                owned = self._by_username.get(request.username, [])
        claimed = 1 if reservation is not None else 0
        if self.config.max_allocations and self._quota_units() - claimed + need > self.config.max_allocations:
            self._error(request, 508, now)
            return
        if reservation is None and len(self._used_ports) >= self.config.highest_port - self.config.lowest_port + 1:
            self._error(request, 508, now)
            return
        lifetime = self._allocate_lifetime(message)

        alloc = _Allocation(request.sender, request.username, families, lifetime)
        alloc.request = request
        alloc.dont_fragment = message.has(stun.DONT_FRAGMENT)
        alloc.even_port = even_port is not None
        alloc.reserve_next = even_port is True
        self._allocations[request.sender] = alloc
        if alloc.reserve_next:
            self._reserving += 1
        if reservation is not None:
            self._claim_reservation(reservation)
            alloc.reservation = reservation
            alloc.port = reservation.port
            alloc.tried_ports.add(reservation.port)
            self._used_ports.add(reservation.port)
            alloc.pending_families = list(families)
            self._open_next_family(alloc)
        elif not self._start_port_attempt(alloc):
            self._fail_pending(alloc, now)

    @staticmethod
    def _allocate_lifetime(message: stun.Message) -> int:
        """The initial time-to-expiry of a new allocation, RFC 8656 §7.2:

        "If the request contains a LIFETIME attribute, then the server
        computes the minimum of the client's proposed lifetime and the
        server's maximum allowed lifetime.  If this computed value is greater
        than the default lifetime, then the server uses the computed lifetime
        as the initial value of the time-to-expiry field.  Otherwise, the
        server uses the default lifetime."

        So an Allocate asking for less than 600 s (0 included) gets 600 s.
        A Refresh keeps upstream's rule (``_lifetime``): any value up to the
        maximum, 0 deletes.
        """
        requested = message.get_int(stun.LIFETIME)
        if requested is None:
            return DEFAULT_LIFETIME
        return max(min(requested, MAX_LIFETIME), DEFAULT_LIFETIME)

    @staticmethod
    def _lifetime(message: stun.Message) -> int:
        requested = message.get_int(stun.LIFETIME)
        if requested is None:
            return DEFAULT_LIFETIME
        return min(requested, MAX_LIFETIME)

    def _pick_port(self, alloc: _Allocation) -> Optional[int]:
        low, high = self.config.lowest_port, self.config.highest_port
        size = high - low + 1
        used = self._used_ports
        tried = alloc.tried_ports

        def usable(port: int) -> bool:
            if port in used or port in tried:
                return False
            if alloc.even_port:
                if port & 1:
                    return False
                if alloc.reserve_next and (port + 1 > high or port + 1 in used):
                    return False
            return True

        for _ in range(32):
            port = low + self._rng.getrandbits(32) % size
            if usable(port):
                return port
        start = self._rng.getrandbits(32) % size
        for i in range(size):
            port = low + (start + i) % size
            if usable(port):
                return port
        return None

    def _start_port_attempt(self, alloc: _Allocation) -> bool:
        if alloc.attempts >= MAX_PORT_ATTEMPTS:
            return False
        port = self._pick_port(alloc)
        if port is None:
            return False
        alloc.attempts += 1
        alloc.tried_ports.add(port)
        alloc.port = port
        self._used_ports.add(port)
        alloc.pending_families = list(alloc.families)
        alloc.opened_families = []
        self._open_next_family(alloc)
        return True

    def _open_next_family(self, alloc: _Allocation) -> None:
        family = alloc.pending_families.pop(0)
        self._pending[(alloc.port, family)] = alloc
        self._commands.append(OpenPort(alloc.port, family, alloc.dont_fragment))

    def _fail_pending(self, alloc: _Allocation, now: float) -> None:
        if self._allocations.get(alloc.client) is alloc:
            del self._allocations[alloc.client]
        if alloc.reserve_next and not alloc.dead:
            self._reserving -= 1
        alloc.dead = True
        request = alloc.request
        if request is not None:
            self._error(request, 508, now)

    def _activate(self, alloc: _Allocation, now: float) -> None:
        request = alloc.request
        assert request is not None
        alloc.active = True
        alloc.created = now
        alloc.deadline = now + alloc.lifetime
        alloc.tried_ports = set()
        self._by_port[alloc.port] = alloc
        self._by_username.setdefault(alloc.username, []).append(alloc)
        self._schedule(alloc)
        self.stats.allocations_total += 1
        relayed = tuple((self._public[f], alloc.port) for f in alloc.families)
        attributes: list[stun.Attribute] = [(stun.XOR_RELAYED_ADDRESS, address) for address in relayed]
        attributes.append((stun.XOR_MAPPED_ADDRESS, (alloc.client[0], alloc.client[1])))
        attributes.append((stun.LIFETIME, alloc.lifetime))
        if alloc.reserve_next:
            self._reserving -= 1
            token = self._rng.getrandbits(64).to_bytes(8, "big")
            reservation = _Reservation(token, alloc.port + 1, alloc.families[0], now + RESERVATION_LIFETIME)
            reservation.owner = alloc
            alloc.reserved = reservation
            self._reservations[token] = reservation
            self._used_ports.add(reservation.port)
            self._schedule(reservation)
            attributes.append((stun.RESERVATION_TOKEN, token))
        self._commands.append(AllocationCreated(alloc.client, alloc.username, alloc.port, relayed, alloc.lifetime))
        alloc.response = self._reply(request, attributes)

    def _claim_reservation(self, reservation: _Reservation) -> None:
        self._detach_reservation(reservation)
        reservation.dead = True
        del self._reservations[reservation.token]

    def _expire_reservation(self, reservation: _Reservation) -> None:
        self._detach_reservation(reservation)
        reservation.dead = True
        if self._reservations.pop(reservation.token, None) is not None:
            self._used_ports.discard(reservation.port)

    @staticmethod
    def _detach_reservation(reservation: _Reservation) -> None:
        owner = reservation.owner
        if owner is not None:
            owner.reserved = None
            reservation.owner = None

    @staticmethod
    def _user_units(owned: list[_Allocation]) -> int:
        """A username's share of its quota: allocations and their reservations."""
        return len(owned) + sum(1 for alloc in owned if alloc.reserved is not None)

    def _quota_units(self) -> int:
        """What ``max_allocations`` bounds: allocations (pending ones too)
        and reservations, made or promised."""
        return len(self._allocations) + len(self._reservations) + self._reserving

    def _delete_allocation(self, alloc: _Allocation, reason: str) -> None:
        if alloc.dead:
            return
        alloc.dead = True
        alloc.active = False
        del self._allocations[alloc.client]
        del self._by_port[alloc.port]
        owned = self._by_username[alloc.username]
        owned.remove(alloc)
        if not owned:
            del self._by_username[alloc.username]
        channels = self._chan_out.get(alloc.client)
        for channel in alloc.channels.values():
            channel.dead = True
            self._channels_total -= 1
            if channel.bound:
                self.channel_count -= 1
                if channels is not None:
                    channels.pop(channel.number, None)
                self._commands.append(
                    ChannelUnbound(alloc.client, channel.number, channel.peer, alloc.port, channel.family)
                )
        if channels is not None and not channels:
            del self._chan_out[alloc.client]
        for permission in alloc.permissions.values():
            permission.dead = True
            self.permission_count -= 1
            self._commands.append(PermissionRemoved(alloc.client, alloc.port, permission.ip))
        alloc.channels.clear()
        alloc.channel_by_peer.clear()
        alloc.chan_in.clear()
        alloc.permissions.clear()
        for family in alloc.families:
            self._commands.append(ClosePort(alloc.port, family))
        self._used_ports.discard(alloc.port)
        if alloc.reserved is not None:  # its unclaimed reservation goes with it
            self._expire_reservation(alloc.reserved)
        self._commands.append(AllocationDeleted(alloc.client, alloc.username, alloc.port, reason))
        self._maybe_clear_timers()

    # --- Refresh -------------------------------------------------------------------

    def _handle_refresh(self, message: stun.Message, request: _Request, now: float) -> None:
        if not self._common_checks(message, request, now):
            return
        lifetime = self._lifetime(message)
        # Deleting needs only valid credentials from the owning 5-tuple: a
        # Firezone client rotates its credentials on a network reset and
        # deletes its old allocation with the new ones (SPEC §2).
        alloc = self._owned_allocation(request, now, any_username=lifetime == 0)
        if alloc is None:
            return
        requested = message.get_int(stun.REQUESTED_ADDRESS_FAMILY)
        if requested is not None and _WIRE_FAMILY.get(requested) not in alloc.families:
            self._error(request, 443, now)
            return
        if lifetime == 0:
            self._delete_allocation(alloc, "refresh")
        else:
            alloc.deadline = now + lifetime
            self._schedule(alloc)
        self._reply(request, [(stun.LIFETIME, lifetime)])

    # --- peers -----------------------------------------------------------------------

    def _peer_allowed(self, peer: Address) -> tuple[bool, bool]:
        """``(allowed, hairpin)`` for a peer transport address (SPEC §5).

        An own address under any spelling (NAT64, 6to4, mapped, SIIT of a
        public, bind or interface address) never reaches a service port,
        whatever the allow lists say.  The public addresses as such reach
        the allocation ports internally (hairpin); any other spelling of an
        own address on an allocation port goes out to the network as the
        policy allows; other ports of own addresses need an explicit allow.
        """
        ip, port = peer
        if ip in self._own:
            if port in self._service_ports:
                return False, False
            if self.config.lowest_port <= port <= self.config.highest_port:
                if ip in self._own_ips:
                    return True, True
                return self._policy.is_allowed(ip), False
            return self._policy.explicitly_allowed(ip), False
        return self._policy.is_allowed(ip), False

    def _ip_allowed(self, ip: str) -> bool:
        return ip in self._own_ips or self._policy.is_allowed(ip)

    def _install_permission(self, alloc: _Allocation, ip: str, now: float) -> None:
        permission = alloc.permissions.get(ip)
        if permission is None:
            permission = _Permission(alloc, ip, now + PERMISSION_LIFETIME)
            alloc.permissions[ip] = permission
            self.permission_count += 1
            self._commands.append(PermissionAdded(alloc.client, alloc.port, ip))
        else:
            permission.deadline = now + PERMISSION_LIFETIME
        self._schedule(permission)

    def _expire_permission(self, permission: _Permission) -> None:
        permission.dead = True
        alloc = permission.allocation
        if alloc.permissions.pop(permission.ip, None) is not None:
            self.permission_count -= 1
            self._commands.append(PermissionRemoved(alloc.client, alloc.port, permission.ip))

    # --- CreatePermission ---------------------------------------------------------------

    def _handle_create_permission(self, message: stun.Message, request: _Request, now: float) -> None:
        if not self._common_checks(message, request, now):
            return
        alloc = self._owned_allocation(request, now)
        if alloc is None:
            return
        peers = [p for p in message.get_all(stun.XOR_PEER_ADDRESS) if isinstance(p, tuple)]
        # SPEC §1: at most MAX_PEERS_PER_REQUEST peers, deduplicated with a
        # set (a dict, to keep their order), and the permission cap checked
        # before any per-peer policy work.
        if not peers or len(peers) > MAX_PEERS_PER_REQUEST:
            self._error(request, 400, now)
            return
        ips = list(dict.fromkeys(str(peer[0]) for peer in peers))
        permissions = alloc.permissions
        new = sum(1 for ip in ips if ip not in permissions)
        if len(permissions) + new > self.config.max_permissions:
            self._error(request, 508, now)
            return
        families = alloc.families
        for ip in ips:
            if _family_of(ip) not in families:
                self._error(request, 443, now)
                return
            if not self._ip_allowed(ip):
                self._error(request, 403, now)
                return
        for ip in ips:
            self._install_permission(alloc, ip, now)
        self._reply(request, [])

    # --- ChannelBind -------------------------------------------------------------------------

    def _handle_channel_bind(self, message: stun.Message, request: _Request, now: float) -> None:
        if not self._common_checks(message, request, now):
            return
        alloc = self._owned_allocation(request, now)
        if alloc is None:
            return
        number = message.get_int(stun.CHANNEL_NUMBER)
        peer = message.get_address(stun.XOR_PEER_ADDRESS)
        if number is None or peer is None or not MIN_CHANNEL <= number <= MAX_CHANNEL:
            self._error(request, 400, now)
            return
        family = _family_of(peer[0])
        if family not in alloc.families:
            self._error(request, 443, now)
            return
        allowed, hairpin = self._peer_allowed(peer)
        if not allowed:
            self._error(request, 403, now)
            return
        channel = alloc.channels.get(number)
        bound_number = alloc.channel_by_peer.get(peer)
        if (channel is not None and channel.peer != peer) or (bound_number is not None and bound_number != number):
            self._error(request, 400, now)
            return
        if channel is None:
            if len(alloc.channels) >= self.config.max_channels:
                self._error(request, 508, now)
                return
            if peer[0] not in alloc.permissions and len(alloc.permissions) >= self.config.max_permissions:
                self._error(request, 508, now)  # the channel's permission would pass the cap
                return
            channel = _Channel(alloc, number, peer, family, now + CHANNEL_LIFETIME)
            alloc.channels[number] = channel
            alloc.channel_by_peer[peer] = number
            self._channels_total += 1
            channel.bound = False
        channel.expires = now + CHANNEL_LIFETIME
        channel.deadline = channel.expires
        if not channel.bound:
            channel.bound = True
            self.channel_count += 1
            self._chan_out.setdefault(alloc.client, {})[number] = (alloc.port, family, peer, hairpin, alloc.meter)
            alloc.chan_in[peer] = (alloc.client, number.to_bytes(2, "big"), _family_of(alloc.client[0]), len(alloc.client) == 3)
            self._commands.append(ChannelBound(alloc.client, number, peer, alloc.port, family))
        self._schedule(channel)
        self._install_permission(alloc, peer[0], now)
        self._reply(request, [])

    def _expire_channel(self, channel: _Channel) -> None:
        alloc = channel.allocation
        if channel.bound:
            # Unbind; the number and the peer stay reserved for the pair.
            channel.bound = False
            self.channel_count -= 1
            channels = self._chan_out.get(alloc.client)
            if channels is not None:
                channels.pop(channel.number, None)
                if not channels:
                    del self._chan_out[alloc.client]
            alloc.chan_in.pop(channel.peer, None)
            self._commands.append(ChannelUnbound(alloc.client, channel.number, channel.peer, alloc.port, channel.family))
            channel.deadline = channel.expires + CHANNEL_RESERVE
            self._schedule(channel)
            return
        channel.dead = True
        self._channels_total -= 1
        del alloc.channels[channel.number]
        del alloc.channel_by_peer[channel.peer]

    # --- Send indication ----------------------------------------------------------------------

    def _handle_send(self, message: stun.Message, sender: Client, now: float) -> None:
        alloc = self._allocations.get(sender)
        peer = message.get_address(stun.XOR_PEER_ADDRESS)
        data = message.get_bytes(stun.DATA)
        if alloc is None or not alloc.active or peer is None or data is None:
            self.stats.drop("bad_send_indication")
            return
        family = _family_of(peer[0])
        permission = alloc.permissions.get(peer[0])
        if family not in alloc.families or permission is None or permission.deadline <= now:
            self.stats.drop("no_permission")
            return
        allowed, hairpin = self._peer_allowed(peer)
        if not allowed:
            self.stats.drop("peer_denied")
            return
        if self._max_bps and self._over_budget(alloc.meter, 4, len(data), now):
            return
        stats = self.stats
        stats.client_to_peer_packets += 1
        stats.client_to_peer_bytes += len(data)
        stats.packet_sizes[(len(data) - 1) // 100 if 0 < len(data) <= 1500 else (15 if data else 0)] += 1
        alloc.meter[0] += len(data)
        alloc.meter[1] += 1
        if hairpin:
            out = self._hairpin(alloc.port, family, peer, data, now)
            if out is not None:
                self._commands.append(SendDatagram(*out))
            return
        self._commands.append(SendDatagram(alloc.port, family, peer, data))

    # --- bandwidth -------------------------------------------------------------------------------

    def _over_budget(self, meter: list[float], at: int, size: int, now: float) -> bool:
        """--max-bps: a token bucket of one second's bytes (at least one
        largest datagram) per direction; ``meter[at]`` holds the tokens and
        ``meter[at + 1]`` the last refill.  True (and counted) when ``size``
        bytes do not fit: the datagram is dropped."""
        rate = float(self._max_bps)
        capacity = max(rate, 65535.0)
        last = meter[at + 1]
        tokens = capacity if last == 0.0 else min(capacity, meter[at] + (now - last) * rate)
        meter[at + 1] = now
        if tokens < size:
            meter[at] = tokens
            self.stats.drop("bandwidth_limit")
            return True
        meter[at] = tokens - size
        return False

    # --- hairpin ----------------------------------------------------------------------------------

    def _hairpin(self, port: int, family: int, peer: Address, payload: bytes, now: float) -> Optional[Transmit]:
        """Deliver to one of our own allocations as if the datagram had arrived
        on its port from ``(our public address, port)``."""
        source = (self._public[family], port)
        return self.handle_peer_traffic(payload, source, peer[1], family, now)

    # --- introspection for tests and metrics --------------------------------------------------------

    def allocations(self, now: float, username: Optional[str] = None) -> list[AllocationInfo]:
        """Every active allocation (of ``username`` if given), oldest first."""
        if username is not None:
            chosen: Sequence[_Allocation] = self._by_username.get(username, ())
        else:
            chosen = list(self._by_port.values())
        out = []
        for alloc in sorted(chosen, key=lambda a: (a.created, a.port)):
            meter = alloc.meter
            out.append(
                AllocationInfo(
                    alloc.client,
                    alloc.username,
                    alloc.port,
                    tuple((self._public[f], alloc.port) for f in alloc.families),
                    max(0.0, now - alloc.created),
                    max(0.0, alloc.deadline - now),
                    sum(1 for c in alloc.channels.values() if c.bound),
                    len(alloc.permissions),
                    int(meter[0]),
                    int(meter[1]),
                    int(meter[2]),
                    int(meter[3]),
                )
            )
        return out

    def disconnect(self, username: Optional[str] = None, client: Optional[Address] = None) -> int:
        """Delete at once the allocations of ``username`` and/or from
        ``client`` (ip, port; a stream client matches on its address).
        Returns how many were deleted; their ports close as on expiry."""
        if username is None and client is None:
            raise ValueError("disconnect needs a username or a client")
        doomed = [
            alloc
            for alloc in self._by_port.values()
            if (username is None or alloc.username == username)
            and (client is None or (alloc.client[0], alloc.client[1]) == client)
        ]
        for alloc in doomed:
            self._delete_allocation(alloc, "disconnected by the operator")
        return len(doomed)

    def memory_footprint(self) -> dict[str, int]:
        """Sizes of every internal table (tests check they all return to 0)."""
        return {
            "allocations": len(self._allocations),
            "by_port": len(self._by_port),
            "by_username": len(self._by_username),
            "pending": len(self._pending),
            "chan_out": len(self._chan_out),
            "used_ports": len(self._used_ports),
            "reservations": len(self._reservations),
            "timers": len(self._timers),
            "permissions": self.permission_count,
            "channels": self._channels_total,
        }


AnyCommand = Union[Command, None]
