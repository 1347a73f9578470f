"""Which peers an allocation may reach (SPEC §5; RFC 8656 §9 leaves the
policy to the server): the allow/deny lists of ``policy.PeerPolicy`` and the
relay's own addresses, which are only reachable as the allocation ports of
the public addresses (hairpin) and never on a service port.

``PeerRules`` is a base of ``Relay``.
"""

from __future__ import annotations

from .commands import Address
from .config import RelayConfig
from .policy import OwnAddresses, PeerPolicy


class PeerRules:
    """The peer checks of ``Relay`` (see the module docstring)."""

    config: RelayConfig

    def _init_peers(self, config: RelayConfig) -> None:
        self._policy = PeerPolicy(config.allow_peers, config.deny_peers, config.allow_loopback_peers)
        #: family -> the public address relayed addresses are given in
        self._public: dict[int, str] = {}
        if config.public_ip4:
            self._public[4] = config.public_ip4
        if config.public_ip6:
            self._public[6] = config.public_ip6
        self._own_ips = frozenset(self._public.values())
        self._own = OwnAddresses(list(self._public.values()) + list(config.own_addresses))
        self._service_ports = frozenset((config.listen_port, *config.service_ports))

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
