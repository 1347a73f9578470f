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
(allocations, permissions, channels, port reservations: ``allocation.py``)
sits in one deadline heap (``timers.py``).

Where things live: this module dispatches input and has one handler per
RFC 8656 request; ``auth.py`` is RFC 8489 §9.2 (credentials, nonces,
challenges); ``ratelimit.py`` the token buckets; ``stats.py`` the counters;
``channel_data.py`` the ChannelData format, which the two per-packet paths
below inline for speed.

Nonces are stateless (see ``auth.NonceFactory``), so nothing is stored for a
client until it holds an allocation.
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

from . import auth, stun
from .allocation import (
    CHANNEL_LIFETIME,
    CHANNEL_RESERVE,
    DEFAULT_LIFETIME,
    MAX_LIFETIME,
    MAX_PORT_ATTEMPTS,
    PERMISSION_LIFETIME,
    RESERVATION_LIFETIME,
    Allocation,
    AllocationInfo,
    Channel,
    Permission,
    Reservation,
    pick_port,
)
from .auth import MAX_AMPLIFICATION, MAX_REST_LIFETIME, NonceFactory, Request
from .channel_data import MAX_CHANNEL, MIN_CHANNEL
from .config import FIXED_FIELDS, LIVE_FIELDS, RandomSource, RelayConfig
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
from .ratelimit import ReflectionGuard, over_budget
from .replies import Replies, family_of
from .stats import SIZE_BUCKET, RelayStats
from .timers import Deadlines, Timed

__all__ = [
    "CHANNEL_LIFETIME",
    "CHANNEL_RESERVE",
    "DEFAULT_LIFETIME",
    "LIVE_FIELDS",
    "MAX_LIFETIME",
    "MAX_PEERS_PER_REQUEST",
    "MAX_PORT_ATTEMPTS",
    "MAX_REST_LIFETIME",
    "PERMISSION_LIFETIME",
    "RESERVATION_LIFETIME",
    "AllocationInfo",
    "RandomSource",
    "Relay",
    "RelayConfig",
    "RelayStats",
]

UDP = 17
#: SPEC §1: a CreatePermission lists at most this many XOR-PEER-ADDRESS (more → 400).
MAX_PEERS_PER_REQUEST = 32
#: SPEC §1: a 420 lists at most this many attribute types in UNKNOWN-ATTRIBUTES.
MAX_UNKNOWN_LISTED = 16
_WIRE_FAMILY = {stun.FAMILY_IPV4: 4, stun.FAMILY_IPV6: 6}


def _unknown_listed(message: stun.Message) -> tuple[int, ...]:
    """What a 420 lists: the distinct unknown comprehension-required types,
    first ones first, at most ``MAX_UNKNOWN_LISTED`` (SPEC §1)."""
    return tuple(dict.fromkeys(message.unknown_required))[:MAX_UNKNOWN_LISTED]


class Relay(Replies):
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

        self._allocations: dict[Client, Allocation] = {}
        self._by_port: dict[int, Allocation] = {}
        self._by_username: dict[str, list[Allocation]] = {}
        self._pending: dict[tuple[int, int], Allocation] = {}
        #: client -> channel -> (port, family, peer, hairpin, meter): the fast path
        self._chan_out: dict[Client, dict[int, tuple[int, int, Address, bool, list[float]]]] = {}
        self._used_ports: set[int] = set()
        self._reservations: dict[bytes, Reservation] = {}
        #: Pending allocations that will make a reservation when their port opens.
        self._reserving = 0
        self._timers = Deadlines(self._live_timed, self._live_timed_count)
        self._reflection = ReflectionGuard(config.unauthenticated_burst, config.unauthenticated_rate)
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
        fixed = [f for f in FIXED_FIELDS if getattr(config, f) != getattr(self.config, f)]
        if fixed:
            raise ValueError("cannot change while running: %s" % ", ".join(fixed))
        self.config = config
        self._max_bps = config.max_bps
        self._reflection.burst = float(config.unauthenticated_burst)
        self._reflection.rate = config.unauthenticated_rate
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
        """The absolute time ``handle_timeout`` is next due, or ``None``."""
        return self._timers.next_deadline()

    def handle_timeout(self, now: float) -> None:
        """Expire everything due at ``now``: allocations (RFC 8656 §7),
        permissions (§9), channel bindings (§12) and reservations (§7.1)."""
        pop_due = self._timers.pop_due
        while (obj := pop_due(now)) is not None:
            if isinstance(obj, Allocation):
                self._delete_allocation(obj, "expired")
            elif isinstance(obj, Permission):
                self._expire_permission(obj)
            elif isinstance(obj, Channel):
                self._expire_channel(obj)
            elif isinstance(obj, Reservation):
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
            stats = self.stats
            stats.client_to_peer_packets += 1
            stats.client_to_peer_bytes += length
            stats.packet_sizes[SIZE_BUCKET[length]] += 1
            meter = entry[4]
            if self._max_bps and self._over_budget(meter, 4, length, now):
                return None
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
            stats = self.stats
            stats.peer_to_client_packets += 1
            stats.peer_to_client_bytes += n
            stats.packet_sizes[SIZE_BUCKET[n]] += 1
            meter = alloc.meter
            if self._max_bps and self._over_budget(meter, 6, n, now):
                return None
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
        stats.packet_sizes[SIZE_BUCKET[n]] += 1
        meter = alloc.meter
        if self._max_bps and self._over_budget(meter, 6, n, now):
            return None
        meter[2] += n
        meter[3] += 1
        return (self.config.listen_port, family_of(alloc.client[0]), alloc.client, indication)

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

    def _schedule(self, obj: Timed) -> None:
        self._timers.schedule(obj)

    def _live_timed_count(self) -> int:
        return len(self._by_port) + self.permission_count + self._channels_total + len(self._reservations)

    def _live_timed(self) -> list[Timed]:
        live: list[Timed] = list(self._reservations.values())
        for alloc in self._by_port.values():
            live.append(alloc)
            live.extend(alloc.permissions.values())
            live.extend(alloc.channels.values())
        return live

    def _maybe_clear_timers(self) -> None:
        if not self._by_port and not self._reservations:
            self._timers.clear()

    # --- STUN dispatch -------------------------------------------------------

    def _handle_stun(self, data: bytes, sender: Client, now: float) -> None:
        try:
            message = stun.decode(data)
        except stun.StunDecodeError as exc:
            self.stats.drop(exc.drop_reason)
            if (
                exc.error_code is not None
                and exc.msg_class == stun.REQUEST
                and exc.method is not None
                and exc.transaction_id is not None
            ):
                if self._unauthenticated_allowed(sender, now):
                    key = None
                    if exc.username is not None:
                        key = auth.firezone_key(self.config.auth_secret, exc.username, self.config.realm)
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
            request = Request(sender, message)
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
                auth.derive_key(message, request, self.config.auth_secret, self.config.realm)
                self._error(request, 400, now)
        elif cls == stun.INDICATION and message.method == stun.SEND:
            self._handle_send(message, sender, now)
        else:
            self.stats.drop("unexpected_message")

    # --- authentication -------------------------------------------------------

    def _authenticate(self, message: stun.Message, request: Request, now: float) -> bool:
        """RFC 8489 §9.2 (``auth.authenticate``); on failure the reply
        (401/438 challenge, or 400) is queued and False returned."""
        failure = auth.authenticate(
            message, request, self._nonces, self.config.auth_secret, self.config.realm, self.config.rest_secrets, now
        )
        if failure is None:
            return True
        reason, code = failure
        self.stats.auth_failure(reason)
        if code == 400:
            self._error(request, 400, now)
        else:
            self._challenge(request, code, now)
        return False

    def _common_checks(self, message: stun.Message, request: Request, now: float) -> bool:
        """Authentication, then 420 for unknown comprehension-required attributes."""
        if not self._authenticate(message, request, now):
            return False
        if message.unknown_required:
            self._error(request, 420, now, [(stun.UNKNOWN_ATTRIBUTES, _unknown_listed(message))])
            return False
        return True

    def _owned_allocation(self, request: Request, now: float, any_username: bool = False) -> Optional[Allocation]:
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

    def _handle_binding(self, message: stun.Message, request: Request, now: float) -> None:
        if message.unknown_required:
            self._error(request, 420, now, [(stun.UNKNOWN_ATTRIBUTES, _unknown_listed(message))])
            return
        if not self._unauthenticated_allowed(request.sender, now):
            self.stats.drop("rate_limited")
            return
        self._reply(request, [(stun.XOR_MAPPED_ADDRESS, (request.sender[0], request.sender[1]))])

    # --- Allocate ----------------------------------------------------------------

    def _handle_allocate(self, message: stun.Message, request: Request, now: float) -> None:
        existing = self._allocations.get(request.sender)
        if existing is not None and existing.request is not None:
            if existing.request.transaction_id == message.transaction_id:
                if existing.active:  # a retransmission: the same answer again
                    self._count_response(stun.ALLOCATE, 0)
                    self._commands.append(
                        SendDatagram(
                            self.config.listen_port,
                            family_of(request.sender[0]),
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
        reservation: Optional[Reservation] = None
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
            reservation.detach()
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

        alloc = Allocation(request.sender, request.username, families, lifetime)
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

    def _start_port_attempt(self, alloc: Allocation) -> bool:
        if alloc.attempts >= MAX_PORT_ATTEMPTS:
            return False
        port = pick_port(
            self.config.lowest_port,
            self.config.highest_port,
            self._used_ports,
            alloc.tried_ports,
            alloc.even_port,
            alloc.reserve_next,
            self._random32,
        )
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

    def _random32(self) -> int:
        return self._rng.getrandbits(32)

    def _open_next_family(self, alloc: Allocation) -> None:
        family = alloc.pending_families.pop(0)
        self._pending[(alloc.port, family)] = alloc
        self._commands.append(OpenPort(alloc.port, family, alloc.dont_fragment))

    def _fail_pending(self, alloc: Allocation, now: float) -> None:
        if self._allocations.get(alloc.client) is alloc:
            del self._allocations[alloc.client]
        if alloc.reserve_next and not alloc.dead:
            self._reserving -= 1
        alloc.dead = True
        request = alloc.request
        if request is not None:
            self._error(request, 508, now)

    def _activate(self, alloc: Allocation, now: float) -> None:
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
            reservation = Reservation(token, alloc.port + 1, alloc.families[0], now + RESERVATION_LIFETIME)
            reservation.owner = alloc
            alloc.reserved = reservation
            self._reservations[token] = reservation
            self._used_ports.add(reservation.port)
            self._schedule(reservation)
            attributes.append((stun.RESERVATION_TOKEN, token))
        self._commands.append(AllocationCreated(alloc.client, alloc.username, alloc.port, relayed, alloc.lifetime))
        alloc.response = self._reply(request, attributes)

    def _claim_reservation(self, reservation: Reservation) -> None:
        reservation.detach()
        reservation.dead = True
        del self._reservations[reservation.token]

    def _expire_reservation(self, reservation: Reservation) -> None:
        reservation.detach()
        reservation.dead = True
        if self._reservations.pop(reservation.token, None) is not None:
            self._used_ports.discard(reservation.port)

    @staticmethod
    def _user_units(owned: list[Allocation]) -> int:
        """A username's share of its quota: allocations and their reservations."""
        return len(owned) + sum(1 for alloc in owned if alloc.reserved is not None)

    def _quota_units(self) -> int:
        """What ``max_allocations`` bounds: allocations (pending ones too)
        and reservations, made or promised."""
        return len(self._allocations) + len(self._reservations) + self._reserving

    def _delete_allocation(self, alloc: Allocation, reason: str) -> None:
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

    def _handle_refresh(self, message: stun.Message, request: Request, now: float) -> None:
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

    def _install_permission(self, alloc: Allocation, ip: str, now: float) -> None:
        permission = alloc.permissions.get(ip)
        if permission is None:
            permission = Permission(alloc, ip, now + PERMISSION_LIFETIME)
            alloc.permissions[ip] = permission
            self.permission_count += 1
            self._commands.append(PermissionAdded(alloc.client, alloc.port, ip))
        else:
            permission.deadline = now + PERMISSION_LIFETIME
        self._schedule(permission)

    def _expire_permission(self, permission: Permission) -> None:
        permission.dead = True
        alloc = permission.allocation
        if alloc.permissions.pop(permission.ip, None) is not None:
            self.permission_count -= 1
            self._commands.append(PermissionRemoved(alloc.client, alloc.port, permission.ip))

    # --- CreatePermission ---------------------------------------------------------------

    def _handle_create_permission(self, message: stun.Message, request: Request, now: float) -> None:
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
            if family_of(ip) not in families:
                self._error(request, 443, now)
                return
            if not self._ip_allowed(ip):
                self._error(request, 403, now)
                return
        for ip in ips:
            self._install_permission(alloc, ip, now)
        self._reply(request, [])

    # --- ChannelBind -------------------------------------------------------------------------

    def _handle_channel_bind(self, message: stun.Message, request: Request, now: float) -> None:
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
        family = family_of(peer[0])
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
            channel = Channel(alloc, number, peer, family, now + CHANNEL_LIFETIME)
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
            alloc.chan_in[peer] = (alloc.client, number.to_bytes(2, "big"), family_of(alloc.client[0]), len(alloc.client) == 3)
            self._commands.append(ChannelBound(alloc.client, number, peer, alloc.port, family))
        self._schedule(channel)
        self._install_permission(alloc, peer[0], now)
        self._reply(request, [])

    def _expire_channel(self, channel: Channel) -> None:
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
        family = family_of(peer[0])
        permission = alloc.permissions.get(peer[0])
        if family not in alloc.families or permission is None or permission.deadline <= now:
            self.stats.drop("no_permission")
            return
        allowed, hairpin = self._peer_allowed(peer)
        if not allowed:
            self.stats.drop("peer_denied")
            return
        stats = self.stats
        stats.client_to_peer_packets += 1
        stats.client_to_peer_bytes += len(data)
        stats.packet_sizes[SIZE_BUCKET[len(data)]] += 1
        if self._max_bps and self._over_budget(alloc.meter, 4, len(data), now):
            return
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
        """--max-bps (``ratelimit.over_budget``); counted when over."""
        if over_budget(meter, at, size, now, float(self._max_bps)):
            self.stats.drop("bandwidth_limit")
            return True
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
            chosen: Sequence[Allocation] = self._by_username.get(username, ())
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

