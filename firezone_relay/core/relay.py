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
RFC 8656 request.  ``Relay``'s bases hold the rest of its state:
``table.AllocationTable`` (allocations, permissions, channels and their
indexes), ``peers.PeerRules`` (who may be a peer), ``checks.RequestChecks``
(each request's first checks) on ``replies.Replies`` (encoding, signing and
limiting replies).  ``auth.py`` is RFC 8489 §9.2,
``ratelimit.py`` the token buckets, ``stats.py`` the counters,
``channel_data.py`` the ChannelData format (inlined below for speed).
Nonces are stateless: nothing is stored for a client until it allocates.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

from . import auth, stun
from .allocation import CHANNEL_LIFETIME, CHANNEL_RESERVE, DEFAULT_LIFETIME, MAX_LIFETIME, MAX_PORT_ATTEMPTS, PERMISSION_LIFETIME
from .allocation import RESERVATION_LIFETIME, Allocation, AllocationInfo, Channel, Permission, Reservation
from .allocation import initial_lifetime, refresh_lifetime
from .auth import MAX_AMPLIFICATION, MAX_REST_LIFETIME, NonceFactory, Request
from .checks import RequestChecks
from .channel_data import MAX_CHANNEL, MIN_CHANNEL
from .config import FIXED_FIELDS, LIVE_FIELDS, RandomSource, RelayConfig
from .commands import Address, AllocationCreated, Client, ClosePort, Command, SendDatagram, Transmit
from .peers import PeerRules
from .policy import PeerPolicy
from .ratelimit import ReflectionGuard, over_budget
from .replies import family_of
from .stats import SIZE_BUCKET, RelayStats
from .table import AllocationTable

#: The names importable from here as before the split (most now live elsewhere).
__all__ = [
    "CHANNEL_LIFETIME", "CHANNEL_RESERVE", "DEFAULT_LIFETIME", "LIVE_FIELDS", "MAX_AMPLIFICATION", "MAX_LIFETIME",
    "MAX_PEERS_PER_REQUEST", "MAX_PORT_ATTEMPTS", "MAX_REST_LIFETIME", "PERMISSION_LIFETIME", "RESERVATION_LIFETIME",
    "AllocationInfo", "RandomSource", "Relay", "RelayConfig", "RelayStats",
]

UDP = 17
#: SPEC §1: a CreatePermission lists at most this many XOR-PEER-ADDRESS (more → 400).
MAX_PEERS_PER_REQUEST = 32
#: SPEC §1 ("more than 64 attributes → 400 or drop"): a STUN message larger
#: than this, other than a Send indication (whose DATA may be up to 64 KiB),
#: is dropped unread, counted as ``oversized``.  No request the relay serves
#: comes near it (64 attributes of the largest known kinds are ~4 KiB), and
#: coturn 4.6.1 does not read UDP datagrams over 16,384 bytes at all; so the
#: worst 64 KiB request costs what dropping it costs (bench_hostile).
MAX_STUN_MESSAGE = 16384
_SEND_INDICATION = stun.message_type(stun.SEND, stun.INDICATION)
_WIRE_FAMILY = {stun.FAMILY_IPV4: 4, stun.FAMILY_IPV6: 6}


class Relay(AllocationTable, PeerRules, RequestChecks):
    """The relay state machine.  See the module docstring."""

    def __init__(self, config: RelayConfig, rng: RandomSource) -> None:
        self.config = config
        self.stats = RelayStats()
        self._rng = rng
        self._commands: deque[Command] = deque()
        nonce_key = rng.getrandbits(256).to_bytes(32, "big")
        # Workers share one key: a nonce one issued is valid in every other.
        self._nonces = NonceFactory(config.nonce_key or nonce_key, config.nonce_lifetime)
        self._init_peers(config)
        self._software = config.software
        self._draining = False
        self._max_bps = config.max_bps

        self._reflection = ReflectionGuard(config.unauthenticated_burst, config.unauthenticated_rate)
        self._init_table()
        #: STUN method -> its request handler: one per RFC 8656 request, and Binding.
        self._request_handlers: dict[int, Callable[[stun.Message, Request, float], None]] = {
            stun.BINDING: self._handle_binding,
            stun.ALLOCATE: self._handle_allocate,
            stun.REFRESH: self._handle_refresh,
            stun.CREATE_PERMISSION: self._handle_create_permission,
            stun.CHANNEL_BIND: self._handle_channel_bind,
        }

    # --- public surface ----------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

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
        message from a stream client (``sender`` has three items).

        ChannelData (RFC 8656 §12.6; the format: ``channel_data``) on a bound
        channel is returned as a ``Transmit`` to the peer; STUN goes to
        ``_handle_stun``."""
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
            stats.packet_sizes[SIZE_BUCKET[length]] += 1
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
        """A datagram from ``peer`` on allocation port ``port`` (socket family
        ``family``): ChannelData on a bound channel (RFC 8656 §12.7), else a
        Data indication under a permission (§11.3), as a ``Transmit``."""
        alloc = self._by_port.get(port)
        if alloc is None:
            self.stats.drop("no_allocation")
            return None
        entry = alloc.chan_in.get(peer)
        n = len(data)
        if entry is None:  # a Data indication, under a permission
            permission = alloc.permissions.get(peer[0])
            if permission is None or permission.deadline <= now:
                self.stats.drop("no_permission")
                return None
            if n > 0xFFFF - 64:
                self.stats.drop("too_big")
                return None
        elif n > 0xFFFF:
            self.stats.drop("too_big")
            return None
        meter = alloc.meter
        if self._max_bps and self._over_budget(meter, 6, n, now):
            return None
        stats = self.stats
        stats.peer_to_client_packets += 1
        stats.peer_to_client_bytes += n
        stats.packet_sizes[SIZE_BUCKET[n]] += 1
        meter[2] += n
        meter[3] += 1
        if entry is not None:
            if entry[3]:  # streams carry ChannelData padded to 4 bytes (RFC 8656 §12.5)
                return (self.config.listen_port, entry[2], entry[0], entry[1] + n.to_bytes(2, "big") + data + b"\x00" * (-n % 4))
            return (self.config.listen_port, entry[2], entry[0], entry[1] + n.to_bytes(2, "big") + data)
        tid = self._rng.getrandbits(96).to_bytes(12, "big")
        indication = stun.encode(stun.DATA_METHOD, stun.INDICATION, tid, [(stun.XOR_PEER_ADDRESS, peer), (stun.DATA, bytes(data))])
        return (self.config.listen_port, family_of(alloc.client[0]), alloc.client, indication)

    def handle_client_closed(self, client: Client, now: float) -> None:
        """A stream client's connection is gone: its allocation goes with it."""
        alloc = self._allocations.get(client)
        if alloc is None:
            return
        if alloc.active:
            self._delete_allocation(alloc, "connection closed")
        else:  # still waiting for its ports
            self._forget_pending(alloc)

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

    # --- STUN dispatch -------------------------------------------------------

    def _handle_stun(self, data: bytes, sender: Client, now: float) -> None:
        """Decode (RFC 8489 §6.3) and dispatch to one handler per method."""
        if len(data) > MAX_STUN_MESSAGE and (data[0] << 8) | data[1] != _SEND_INDICATION:
            self.stats.drop("oversized")
            return
        try:
            # A Binding request reads no attribute: its values are not decoded.
            message = stun.decode_structure(data) if data[0] == 0 and data[1:2] == b"\x01" else stun.decode(data)
        except stun.StunDecodeError as exc:
            self.stats.drop(exc.drop_reason)
            self._decode_error(exc, sender, len(data), now)
            return
        cls = message.msg_class
        if cls == stun.REQUEST:
            request = Request(sender, message)
            handler = self._request_handlers.get(message.method)
            if handler is not None:
                handler(message, request, now)
            else:
                auth.derive_key(message, request, self.config.auth_secret, self.config.realm)
                self._error(request, 400, now)
        elif cls == stun.INDICATION and message.method == stun.SEND:
            self._handle_send(message, sender, now)
        else:
            self.stats.drop("unexpected_message")

    # --- Binding ---------------------------------------------------------------

    def _handle_binding(self, message: stun.Message, request: Request, now: float) -> None:
        """Binding (RFC 8489 §6.3.1, §7.3): XOR-MAPPED-ADDRESS, no
        authentication; within the reflection guard and 4x budget (SPEC §5)."""
        if self._unknown_attributes(message, request, now):
            return
        if not self._unauthenticated_allowed(request.sender, now):
            self.stats.drop("rate_limited")
            return
        self._reply(request, [(stun.XOR_MAPPED_ADDRESS, (request.sender[0], request.sender[1]))])

    # --- Allocate ----------------------------------------------------------------

    def _handle_allocate(self, message: stun.Message, request: Request, now: float) -> None:
        """Allocate (RFC 8656 §7.2): checks in the RFC's order, then quotas
        (SPEC §5), then a relayed port per family through ``OpenPort``; the
        success response waits for ``handle_port_result`` (``_activate``).
        A retransmission gets the stored response again (§7.2, last step)."""
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
            owned = self._by_username.get(request.username, {})
            while owned and self._user_units(owned) + need > limit:
                self._delete_allocation(next(iter(owned)), "replaced")
                owned = self._by_username.get(request.username, {})
        claimed = 1 if reservation is not None else 0
        if self.config.max_allocations and self._quota_units() - claimed + need > self.config.max_allocations:
            self._error(request, 508, now)
            return
        if reservation is None and len(self._used_ports) >= self.config.highest_port - self.config.lowest_port + 1:
            self._error(request, 508, now)
            return
        lifetime = initial_lifetime(message.get_int(stun.LIFETIME))

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

    def _fail_pending(self, alloc: Allocation, now: float) -> None:
        """No port could be bound: 508 (RFC 8656 §7.2, Insufficient Capacity)."""
        self._abandon(alloc)
        request = alloc.request
        if request is not None:
            self._error(request, 508, now)

    def _activate(self, alloc: Allocation, now: float) -> None:
        """Every port is bound: the Allocate success response (RFC 8656 §7.2)."""
        request = alloc.request
        assert request is not None
        self._register(alloc, now)
        relayed = tuple((self._public[f], alloc.port) for f in alloc.families)
        attributes: list[stun.Attribute] = [(stun.XOR_RELAYED_ADDRESS, address) for address in relayed]
        attributes.append((stun.XOR_MAPPED_ADDRESS, (alloc.client[0], alloc.client[1])))
        attributes.append((stun.LIFETIME, alloc.lifetime))
        if alloc.reserve_next:
            attributes.append((stun.RESERVATION_TOKEN, self._reserve_next_port(alloc, now)))
        self._commands.append(AllocationCreated(alloc.client, alloc.username, alloc.port, relayed, alloc.lifetime))
        alloc.response = self._reply(request, attributes)

    # --- Refresh -------------------------------------------------------------------

    def _handle_refresh(self, message: stun.Message, request: Request, now: float) -> None:
        """Refresh (RFC 8656 §8.2): a new lifetime, or 0 to delete."""
        lifetime = refresh_lifetime(message.get_int(stun.LIFETIME))
        # Deleting needs only valid credentials from the owning 5-tuple: a
        # Firezone client rotates its credentials on a network reset and
        # deletes its old allocation with the new ones (SPEC §2).
        alloc = self._owned_allocation(message, request, now, any_username=lifetime == 0)
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

    # --- CreatePermission ---------------------------------------------------------------

    def _handle_create_permission(self, message: stun.Message, request: Request, now: float) -> None:
        """CreatePermission (RFC 8656 §10.2; permissions §9): all peers or none."""
        alloc = self._owned_allocation(message, request, now)
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
        """ChannelBind (RFC 8656 §12.2): bind or refresh a channel; it
        installs or refreshes the peer's permission too."""
        alloc = self._owned_allocation(message, request, now)
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
        self._bind_channel(alloc, channel, number, peer, hairpin, now)
        self._install_permission(alloc, peer[0], now)
        self._reply(request, [])

    # --- Send indication ----------------------------------------------------------------------

    def _handle_send(self, message: stun.Message, sender: Client, now: float) -> None:
        """Send indication (RFC 8656 §11.2): relay DATA to the peer, or drop
        silently (an indication gets no error)."""
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
        if self._max_bps and self._over_budget(alloc.meter, 4, len(data), now):
            return
        stats = self.stats
        stats.client_to_peer_packets += 1
        stats.client_to_peer_bytes += len(data)
        stats.packet_sizes[SIZE_BUCKET[len(data)]] += 1
        alloc.meter[0] += len(data)
        alloc.meter[1] += 1
        if hairpin:
            out = self._hairpin(alloc.port, family, peer, data, now)
            if out is not None:
                self._commands.append(SendDatagram(*out))
            return
        self._commands.append(SendDatagram(alloc.port, family, self._peer_destination(peer), data))

    # --- bandwidth, hairpin ----------------------------------------------------------------------

    def _over_budget(self, meter: list[float], at: int, size: int, now: float) -> bool:
        """--max-bps (``ratelimit.over_budget``); counted when over."""
        if over_budget(meter, at, size, now, float(self._max_bps)):
            self.stats.drop("bandwidth_limit")
            return True
        return False

    def _hairpin(self, port: int, family: int, peer: Address, payload: bytes, now: float) -> Optional[Transmit]:
        """Deliver to one of our own allocations as if the datagram had arrived
        on its port from ``(our public address, port)``."""
        source = (self._public[family], port)
        return self.handle_peer_traffic(payload, source, peer[1], family, now)

