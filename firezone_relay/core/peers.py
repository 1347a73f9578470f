"""Which peers an allocation may reach (SPEC §5; RFC 8656 §9 leaves the
policy to the server): the allow/deny lists of ``policy.PeerPolicy`` and the
relay's own addresses, which are only reachable as the allocation ports of
the public addresses (hairpin) and never on a service port.

``PeerRules`` is a base of ``Relay``.
"""

from __future__ import annotations

from typing import Optional

from .commands import Address
from .config import RelayConfig
from .policy import OwnAddresses, PeerPolicy


def _by_family(ip4: Optional[str], ip6: Optional[str]) -> dict[int, str]:
    """``{4: ip4, 6: ip6}`` without the ones not configured (None or empty)."""
    return {family: ip for family, ip in ((4, ip4), (6, ip6)) if ip}


class PeerRules:
    """The peer checks of ``Relay`` (see the module docstring)."""

    config: RelayConfig

    def _init_peers(self, config: RelayConfig) -> None:
        self._policy = PeerPolicy(config.allow_peers, config.deny_peers, config.allow_loopback_peers)
        #: family -> the public address relayed addresses are given in
        self._public = _by_family(config.public_ip4, config.public_ip6)
        self._own_ips = frozenset(self._public.values())
        self._own = OwnAddresses(list(self._public.values()) + list(config.own_addresses))
        self._service_ports = frozenset((config.listen_port, *config.service_ports))
        #: The whole relay's allocation range: this core's own slice unless
        #: it is one worker of several (``relay_lowest_port``).
        self._range = (
            config.relay_lowest_port or config.lowest_port,
            config.relay_highest_port or config.highest_port,
        )
        #: public address -> the local address another worker's port on it
        #: is reached at (only when the public address is not local).
        sibling_ip = _by_family(config.sibling_ip4, config.sibling_ip6)
        self._sibling_of = {public: sibling_ip[f] for f, public in self._public.items() if f in sibling_ip}

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
            if self._range[0] <= port <= self._range[1]:
                if ip in self._own_ips:
                    # Our own slice: delivered internally.  Another
                    # worker's: over the host (``_peer_destination``).
                    return True, self.config.lowest_port <= port <= self.config.highest_port
                return self._policy.is_allowed(ip), False
            return self._policy.explicitly_allowed(ip), False
        return self._policy.is_allowed(ip), False

    def _peer_destination(self, peer: Address) -> Address:
        """Where datagrams for ``peer`` are sent: ``peer``, except another
        worker's allocation on a public address that is not local (1:1
        NAT), which is reached at the local ``sibling_ip`` of its family."""
        port = peer[1]
        if (
            self._sibling_of
            and peer[0] in self._sibling_of
            and self._range[0] <= port <= self._range[1]
            and not self.config.lowest_port <= port <= self.config.highest_port
        ):
            return (self._sibling_of[peer[0]], port)
        return peer

    def _ip_allowed(self, ip: str) -> bool:
        return ip in self._own_ips or self._policy.is_allowed(ip)
