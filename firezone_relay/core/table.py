"""The relay's allocation table: what is allocated, and the bookkeeping of
creating, expiring and deleting it (upstream: the allocation state of
``server.rs``; the records themselves are in ``allocation.py``).

``AllocationTable`` is a base of ``Relay``.  It keeps every index in step
(by client, by port, by username, the ports in use, the pending OpenPorts,
the fast-path channel entries) and queues the commands that tell the shell
about it (OpenPort/ClosePort, Channel/Permission notices, AllocationDeleted);
the request handlers in ``relay.py`` decide *whether* to do it.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Collection, Optional

from .allocation import (
    CHANNEL_LIFETIME,
    CHANNEL_RESERVE,
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
from .commands import (
    Address,
    AllocationDeleted,
    ChannelBound,
    ChannelUnbound,
    Client,
    ClosePort,
    Command,
    OpenPort,
    PermissionAdded,
    PermissionRemoved,
)
from .config import RandomSource, RelayConfig
from .replies import family_of
from .stats import RelayStats
from .timers import Deadlines, Timed


class AllocationTable:
    """Allocations and everything they hold (see the module docstring)."""

    config: RelayConfig
    stats: RelayStats
    _rng: RandomSource
    _commands: deque[Command]
    _public: dict[int, str]
    _peer_destination: Callable[[Address], Address]  # PeerRules

    def _init_table(self) -> None:
        self._allocations: dict[Client, Allocation] = {}
        self._by_port: dict[int, Allocation] = {}
        #: username -> its active allocations, oldest first (a dict as an
        #: ordered set: deleting one of many is O(1)).
        self._by_username: dict[str, dict[Allocation, None]] = {}
        #: (port, family) -> the allocation waiting for that OpenPort's result
        self._pending: dict[tuple[int, int], Allocation] = {}
        #: client -> channel -> (port, family, peer, hairpin, meter): the fast path
        self._chan_out: dict[Client, dict[int, tuple[int, int, Address, bool, list[float]]]] = {}
        self._used_ports: set[int] = set()
        self._reservations: dict[bytes, Reservation] = {}
        #: Pending allocations that will make a reservation when their port opens.
        self._reserving = 0
        self._timers = Deadlines(self._live_timed, self._live_timed_count)
        self.permission_count = 0
        self.channel_count = 0  # bound channels
        self._channels_total = 0  # including those in their reserve period

    @property
    def allocation_count(self) -> int:
        return len(self._by_port)

    def allocation_count_by_family(self) -> dict[int, int]:
        counts = {4: 0, 6: 0}
        for alloc in self._by_port.values():
            for family in alloc.families:
                counts[family] += 1
        return counts

    # --- deadlines ---
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

    # --- allocations: ports, service, deletion ---
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
            self._rng.getrandbits,
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

    def _open_next_family(self, alloc: Allocation) -> None:
        family = alloc.pending_families.pop(0)
        self._pending[(alloc.port, family)] = alloc
        self._commands.append(OpenPort(alloc.port, family, alloc.dont_fragment))

    def _forget_pending(self, alloc: Allocation) -> None:
        """Drop an allocation still waiting for its ports; close what was bound."""
        for key in [k for k, v in self._pending.items() if v is alloc]:
            del self._pending[key]
        for family in alloc.opened_families:
            self._commands.append(ClosePort(alloc.port, family))
        self._used_ports.discard(alloc.port)
        self._abandon(alloc)

    def _abandon(self, alloc: Allocation) -> None:
        """A pending allocation is given up: it leaves the table, and a
        reservation it promised (EVEN-PORT R) is no longer counted."""
        if self._allocations.get(alloc.client) is alloc:
            del self._allocations[alloc.client]
        if alloc.reserve_next and not alloc.dead:
            self._reserving -= 1
        alloc.dead = True

    def _register(self, alloc: Allocation, now: float) -> None:
        """An allocation whose ports are all bound enters service."""
        alloc.active = True
        alloc.created = now
        alloc.deadline = now + alloc.lifetime
        alloc.tried_ports = set()
        self._by_port[alloc.port] = alloc
        self._by_username.setdefault(alloc.username, {})[alloc] = None
        self._schedule(alloc)
        self.stats.allocations_total += 1

    def _delete_allocation(self, alloc: Allocation, reason: str) -> None:
        if alloc.dead:
            return
        alloc.dead = True
        alloc.active = False
        del self._allocations[alloc.client]
        del self._by_port[alloc.port]
        owned = self._by_username[alloc.username]
        del owned[alloc]
        if not owned:
            del self._by_username[alloc.username]
        for channel in alloc.channels.values():
            channel.dead = True
            self._channels_total -= 1
            if channel.bound:
                self._unbind_channel(alloc, channel)
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

    # --- reservations (EVEN-PORT, RFC 8656 §7.1) and quotas ---
    def _reserve_next_port(self, alloc: Allocation, now: float) -> bytes:
        """EVEN-PORT with R (RFC 8656 §7.1): hold ``port + 1``; its token."""
        self._reserving -= 1
        token = self._rng.getrandbits(64).to_bytes(8, "big")
        reservation = Reservation(token, alloc.port + 1, alloc.families[0], deadline=now + RESERVATION_LIFETIME)
        reservation.owner = alloc
        alloc.reserved = reservation
        self._reservations[token] = reservation
        self._used_ports.add(reservation.port)
        self._schedule(reservation)
        return token

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
    def _user_units(owned: Collection[Allocation]) -> int:
        """A username's share of its quota: allocations and their reservations."""
        return len(owned) + sum(1 for alloc in owned if alloc.reserved is not None)

    def _quota_units(self) -> int:
        """What ``max_allocations`` bounds: allocations (pending ones too)
        and reservations, made or promised."""
        return len(self._allocations) + len(self._reservations) + self._reserving

    # --- permissions (RFC 8656 §9) and channels (§12) ---
    def _install_permission(self, alloc: Allocation, ip: str, now: float) -> None:
        permission = alloc.permissions.get(ip)
        if permission is None:
            permission = Permission(alloc, ip, deadline=now + PERMISSION_LIFETIME)
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

    def _bind_channel(
        self, alloc: Allocation, channel: Optional[Channel], number: int, peer: Address, hairpin: bool, now: float
    ) -> None:
        """Create or refresh channel ``number`` to ``peer`` (RFC 8656 §12.2)
        and give it the fast-path entries of both directions."""
        family = family_of(peer[0])
        if channel is None:
            channel = Channel(alloc, number, peer, family, deadline=now + CHANNEL_LIFETIME)
            alloc.channels[number] = channel
            alloc.channel_by_peer[peer] = number
            self._channels_total += 1
        channel.expires = now + CHANNEL_LIFETIME
        channel.deadline = channel.expires
        if not channel.bound:
            channel.bound = True
            self.channel_count += 1
            self._chan_out.setdefault(alloc.client, {})[number] = (
                alloc.port, family, self._peer_destination(peer), hairpin, alloc.meter
            )
            alloc.chan_in[peer] = (alloc.client, number.to_bytes(2, "big"), family_of(alloc.client[0]), len(alloc.client) == 3)
            self._commands.append(ChannelBound(alloc.client, number, peer, alloc.port, family))
        self._schedule(channel)

    def _expire_channel(self, channel: Channel) -> None:
        alloc = channel.allocation
        if channel.bound:
            # Unbind; the number and the peer stay reserved for the pair.
            self._unbind_channel(alloc, channel)
            channel.deadline = channel.expires + CHANNEL_RESERVE
            self._schedule(channel)
            return
        channel.dead = True
        self._channels_total -= 1
        del alloc.channels[channel.number]
        del alloc.channel_by_peer[channel.peer]

    def _unbind_channel(self, alloc: Allocation, channel: Channel) -> None:
        """Take a bound channel out of both fast paths and tell the shell
        (``ChannelUnbound``); the record itself stays with the caller."""
        channel.bound = False
        self.channel_count -= 1
        channels = self._chan_out.get(alloc.client)
        if channels is not None:
            channels.pop(channel.number, None)
            if not channels:
                del self._chan_out[alloc.client]
        alloc.chan_in.pop(channel.peer, None)
        self._commands.append(ChannelUnbound(alloc.client, channel.number, channel.peer, alloc.port, channel.family))

    # --- introspection for the control endpoint, metrics and tests ---
    def allocations(self, now: float, username: Optional[str] = None) -> list[AllocationInfo]:
        """Every active allocation (of ``username`` if given), oldest first."""
        if username is not None:
            chosen: Collection[Allocation] = self._by_username.get(username, ())
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

    def evict(self, port: int, reason: str) -> bool:
        """Delete at once the allocation on ``port`` (its user's newer
        allocation lives in another worker); False if there is none."""
        alloc = self._by_port.get(port)
        if alloc is None:
            return False
        self._delete_allocation(alloc, reason)
        return True

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
