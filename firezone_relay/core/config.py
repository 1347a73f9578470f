"""The relay core's configuration: what ``Relay(config, rng)`` is built from.

``LIVE_FIELDS`` are the fields ``Relay.reconfigure`` may change while
running (SIGHUP reload, SPEC §10); the others shape every allocation and
nonce already issued, so they are fixed for the life of the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from .auth import NONCE_LIFETIME, REALM

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
    #: With ``--workers`` > 1, ``lowest_port``..``highest_port`` is this
    #: worker's slice and these bound the whole relay's range (0: the
    #: slice is the whole range).  A peer on a public address with a port
    #: in the range but outside the slice is another worker's allocation.
    relay_lowest_port: int = 0
    relay_highest_port: int = 0
    #: Where another worker's allocation port is reached, by family, when
    #: the public address is not one of the host's (1:1 NAT): a local
    #: address.  ``None``: at the public address itself.
    sibling_ip4: Optional[str] = None
    sibling_ip6: Optional[str] = None
    #: The stateless nonces' HMAC key; empty: a random one (one process).
    nonce_key: bytes = b""

    def __post_init__(self) -> None:
        if self.public_ip4 is None and self.public_ip6 is None:
            raise ValueError("at least one of public_ip4 and public_ip6 is required")
        if not 0 < self.lowest_port <= self.highest_port <= 65535:
            raise ValueError("bad allocation port range")
        if self.lowest_port <= self.listen_port <= self.highest_port:
            raise ValueError("the listen port lies inside the allocation port range")
        if not self.auth_secret:
            raise ValueError("an auth secret is required")


#: The fields a running relay cannot change.
FIXED_FIELDS = tuple(name for name in RelayConfig.__dataclass_fields__ if name not in LIVE_FIELDS)
