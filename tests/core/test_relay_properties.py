"""Property tests for the relay core (``firezone_relay.core.relay``).

Three parts:

* ``RelayMachine``: a hypothesis ``RuleBasedStateMachine`` that drives one
  relay (a 12-port range, so exhaustion and port reuse happen) with four
  clients, a pool of peers and a clock through random steps, and checks every
  output against an independent model of SPEC §2–5: the reply code of every
  request, where every datagram goes, which ports are open, which channels
  and permissions exist and until when, and that the relay's own tables,
  ``poll_timeout()`` and ``memory_footprint()`` agree with the model.
* ``NetworkTests``: a client and a peer that talk only through a tiny
  in-memory network routing the relay's commands and ``Transmit`` tuples,
  with a client that handles the 401/438 challenges the way a real one does
  (after Firezone's upstream ``ping_pong_relay`` property).
* ``HairpinTests``: two clients of the same relay relaying to each other's
  relayed addresses; nothing may be sent to the relay's own address.
* ``RoamingTests``: scripted cases the machine found where the relay
  once refused a roaming client instead of replacing its allocation.

Failing examples print a ``@reproduce_failure`` blob and are kept in the
hypothesis example database, so the next run replays them first.

The model expires state when the clock is advanced (``Driver.advance`` calls
``handle_timeout``), which is when the relay does: a Refresh with a small
LIFETIME (upstream: no lower bound) yields an allocation that lives until the
next timeout tick past it.  An Allocate asking for less than 600 s gets 600 s
(RFC 8656 §7.2).
"""

from __future__ import annotations

import random
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, TypeVar, Union

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import stun
from firezone_relay.core.auth import NONCE_COOKIE, NONCE_FEATURES, REALM, make_credentials
from firezone_relay.core.commands import (
    AllocationCreated,
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
from firezone_relay.core.relay import Relay, RelayConfig
from tests.core.harness import NOW, PUBLIC4, PUBLIC6, SECRET, Driver
from tests.core.harness import make_relay as harness_make_relay

Address = tuple[str, int]
F = TypeVar("F", bound=Callable[..., None])
Client = Union[tuple[str, int], tuple[str, int, int]]

#: Allocation ports of the relays; the machines use a prefix of it.  Peer
#: strategies draw from all of it, so the relay's own address on a port just
#: past a machine's range (denied) comes up too.
LOW, HIGH = 50000, 50011
LISTEN = 3478
FAR = int(NOW) + 10**7  # credentials that outlive every run
PERMISSION = 300
CHANNEL = 600
RESERVE = 300
RESERVATION = 30
NONCE_LIFETIME = 600
UNKNOWN_REQUIRED = 0x7F01


def _canonical(address: Address) -> Address:
    """The address as the codec spells it after a round trip."""
    tid = bytes(12)
    message = stun.decode(stun.encode(stun.BINDING, stun.INDICATION, tid, [(stun.XOR_PEER_ADDRESS, address)]))
    peer = message.get_address(stun.XOR_PEER_ADDRESS)
    assert peer is not None
    return peer


def family_of(ip: str) -> int:
    return 6 if ":" in ip else 4


CLIENTS: tuple[Address, ...] = (
    ("198.51.100.7", 40000),
    ("198.51.100.7", 40001),  # same IP, other port: a different 5-tuple
    ("203.0.113.5", 50500),
    _canonical(("2001:db8:1::7", 40000)),
)
#: A TCP/TLS client: (ip, port, connection id).  It shares its ip:port with a
#: UDP client on purpose: the two must never be confused.
STREAM_CLIENT = ("198.51.100.7", 40000, 7)
ALL_CLIENTS: tuple[Client, ...] = CLIENTS + (STREAM_CLIENT,)
USERS = ("alice", "bob", "carol")

#: Peer IPs and the default policy's verdict on them (SPEC §5).
POLICY: dict[str, bool] = {
    "8.8.8.8": True,
    "1.1.1.1": True,
    _canonical(("2606:4700::1111", 0))[0]: True,
    _canonical(("64:ff9b::808:808", 0))[0]: True,  # NAT64 of a public address
    "10.0.0.1": False,
    "169.254.169.254": False,
    _canonical(("::ffff:8.8.8.8", 0))[0]: False,  # IPv4-mapped: never relayed
    PUBLIC4: False,  # TEST-NET-1; allowed only because it is the relay's own
    _canonical((PUBLIC6, 0))[0]: False,  # documentation range
}

#: Remote peers that may send to allocation ports.
SOURCES: tuple[Address, ...] = tuple(
    _canonical(a)
    for a in (
        ("8.8.8.8", 5000),
        ("8.8.8.8", 5001),  # same IP, other port: one permission, two channels
        ("1.1.1.1", 6000),
        ("2606:4700::1111", 7000),
        ("64:ff9b::808:808", 5000),
        ("10.0.0.1", 5000),
        ("169.254.169.254", 80),
        ("::ffff:8.8.8.8", 5000),
    )
)

#: Peers a client may name: the sources plus the relay's own addresses,
#: on its listen port, outside the range, and (hairpin) on allocation ports.
PEERS: tuple[Address, ...] = SOURCES + tuple(
    _canonical(a) for a in ((PUBLIC4, LISTEN), (PUBLIC4, 60000), (PUBLIC6, LISTEN))
)

peers = st.one_of(
    st.sampled_from(PEERS),
    st.builds(lambda ip, port: _canonical((ip, port)), st.sampled_from([PUBLIC4, PUBLIC6]), st.integers(LOW, HIGH)),
)
clients = st.sampled_from(ALL_CLIENTS)
users = st.sampled_from(USERS)
AUTH_KINDS = (
    ["ok"] * 8
    + ["sha256", "stored", "stored"]
    + ["none", "no_integrity", "wrong_password", "expired", "stale", "forged", "foreign"]
)
auth_kinds = st.sampled_from(AUTH_KINDS)
unknown_flags = st.sampled_from([False] * 9 + [True])
lifetimes = st.sampled_from([None, 600, 1, 0, 2, 30, 299, 300, 301, 3600, 3601, 10**6, 2**32 - 1])
channel_numbers = st.sampled_from([0x4000, 0x4001, 0x4002, 0x5000, 0x7FFF, 0x3FFF, 0x8000, 0xFFFF, None])
payloads = st.binary(max_size=64)
durations = st.one_of(
    st.sampled_from([0, 1, 5, 29, 30, 31]),
    st.sampled_from([0, 1, 29, 30, 31, 299, 300, 301, 599, 600, 601, 700]),
    st.integers(0, 120),
    st.integers(0, 700),
    st.floats(0, 700, allow_nan=False, allow_infinity=False),
)


# --- the model -------------------------------------------------------------------------


@dataclass
class MChannel:
    peer: Address
    expires: float
    bound: bool = True

    @property
    def deadline(self) -> float:
        return self.expires if self.bound else self.expires + RESERVE


@dataclass
class MAllocation:
    client: Client
    username: str
    port: int
    families: tuple[int, ...]
    deadline: float
    transaction_id: bytes
    response: bytes
    user: str
    permissions: dict[str, float] = field(default_factory=dict)
    channels: dict[int, MChannel] = field(default_factory=dict)

    def channel_number(self, peer: Address) -> Optional[int]:
        for number, channel in self.channels.items():
            if channel.peer == peer:
                return number
        return None


@dataclass
class MReservation:
    port: int
    family: int
    deadline: float
    #: The client whose allocation made it, until claimed (SPEC §5: it goes with that allocation).
    owner: Optional[Client] = None


@dataclass
class Auth:
    """How a request was authenticated, enough to predict the verdict at any time."""

    kind: str
    user: str
    expiry: int
    nonce_issued: Optional[int]  # None: never valid (forged)
    nonce_client: Client
    fingerprint: bool

    @property
    def username(self) -> str:
        return make_credentials(SECRET, self.expiry, self.user)[0]

    def key(self) -> bytes:
        username, password = make_credentials(SECRET, self.expiry, self.user)
        algorithm = stun.ALGORITHM_SHA256 if self.kind == "sha256" else stun.ALGORITHM_MD5
        return stun.long_term_key(username, REALM, password, algorithm)


@dataclass
class AllocateRequest:
    transport: Optional[int] = 17
    lifetime: Optional[int] = None
    requested: Optional[int] = None
    additional: Optional[int] = None
    even_port: Optional[bool] = None
    token: Optional[bytes] = None
    dont_fragment: bool = False
    unknown: bool = False

    def attributes(self) -> list[stun.Attribute]:
        attrs: list[stun.Attribute] = []
        if self.transport is not None:
            attrs.append((stun.REQUESTED_TRANSPORT, self.transport))
        if self.lifetime is not None:
            attrs.append((stun.LIFETIME, self.lifetime))
        if self.requested is not None:
            attrs.append((stun.REQUESTED_ADDRESS_FAMILY, self.requested))
        if self.additional is not None:
            attrs.append((stun.ADDITIONAL_ADDRESS_FAMILY, self.additional))
        if self.even_port is not None:
            attrs.append((stun.EVEN_PORT, self.even_port))
        if self.token is not None:
            attrs.append((stun.RESERVATION_TOKEN, self.token))
        if self.dont_fragment:
            attrs.append((stun.DONT_FRAGMENT, True))
        if self.unknown:
            attrs.append((UNKNOWN_REQUIRED, b"\x01\x02\x03\x04"))
        return attrs


@dataclass
class DataIndication:
    """An expected Data indication (its transaction id is random)."""

    client: Client
    peer: Address
    payload: bytes


Expected = Union[None, Transmit, DataIndication]


def assert_delivery(actual: Optional[Sequence[object]], expected: Expected, own: frozenset[str]) -> None:
    if expected is None:
        assert actual is None, "unexpected delivery %r" % (actual,)
        return
    assert actual is not None, "expected %r, nothing was sent" % (expected,)
    source_port, family, destination, payload = actual
    assert isinstance(destination, tuple) and destination[0] not in own, actual
    if isinstance(expected, DataIndication):
        assert (source_port, family, destination) == (LISTEN, family_of(expected.client[0]), expected.client), actual
        assert isinstance(payload, bytes)
        message = stun.decode(payload)
        assert (message.method, message.msg_class) == (stun.DATA_METHOD, stun.INDICATION), message
        assert message.get_address(stun.XOR_PEER_ADDRESS) == expected.peer, message
        assert message.get_bytes(stun.DATA) == expected.payload, message
        return
    assert tuple(actual) == tuple(expected), (actual, expected)


def error_code(message: stun.Message) -> Optional[int]:
    if message.msg_class != stun.ERROR:
        return None
    value = message.get(stun.ERROR_CODE)
    assert isinstance(value, tuple), message
    code = value[0]
    assert isinstance(code, int)
    return code


# --- the state machine -------------------------------------------------------------------

#: group -> step name -> (method, argument strategies): steps that share one
#: rule, so that error-path steps do not crowd out the ones that move data.
_GROUPS: dict[str, dict[str, tuple[Callable[..., None], dict[str, st.SearchStrategy[object]]]]] = defaultdict(dict)


def grouped(group: str, **strategies: st.SearchStrategy[object]) -> Callable[[F], F]:
    def decorate(method: F) -> F:
        _GROUPS[group][method.__name__] = (method, strategies)
        return method

    return decorate


class RelayMachine(RuleBasedStateMachine):
    """A dual-stack relay without a per-user allocation limit."""

    PUBLIC6: Optional[str] = PUBLIC6
    USER_LIMIT = 0
    #: Small enough that five clients and their reservations exhaust it.
    HIGH_PORT = LOW + 5

    def __init__(self) -> None:
        super().__init__()
        config = RelayConfig(
            auth_secret=SECRET,
            public_ip4=PUBLIC4,
            public_ip6=self.PUBLIC6,
            listen_port=LISTEN,
            lowest_port=LOW,
            highest_port=self.HIGH_PORT,
            user_allocation_limit=self.USER_LIMIT,
            allow_loopback_peers=False,
            unauthenticated_rate=0,
        )
        self.relay = Relay(config, random.Random(0))
        self.driver = Driver(self.relay)
        self.public: dict[int, str] = {4: PUBLIC4}
        if self.PUBLIC6 is not None:
            self.public[6] = _canonical((self.PUBLIC6, 0))[0]
        self.own = frozenset(self.public.values())
        # the model
        self.allocations: dict[Client, MAllocation] = {}
        self.by_user: dict[str, list[Client]] = defaultdict(list)
        self.reservations: dict[bytes, MReservation] = {}
        self.tokens: list[bytes] = []  # every token ever handed out
        self.busy_until: dict[int, float] = {}
        self.nonces: dict[Address, tuple[str, int]] = {}  # by (ip, port)  # from 401/438 replies
        self.last_allocate: dict[Client, tuple[bytes, Auth, AllocateRequest]] = {}
        self.tid = 0
        # what the relay announced (balance per key)
        self.events_bound: set[tuple[Client, int, Address, int, int]] = set()
        self.events_permissions: set[tuple[Client, int, str]] = set()
        self.events_allocations: set[tuple[Client, int]] = set()
        self.opened_now: list[OpenPort] = []
        self.steps = 0
        self.swept = False

    @property
    def now(self) -> float:
        return self.driver.now

    def next_tid(self) -> bytes:
        self.tid += 1
        return self.tid.to_bytes(12, "big")

    # --- plumbing -----------------------------------------------------------------------

    def account(self, commands: list[Command]) -> list[SendDatagram]:
        """Check the balance of lifecycle commands; return the datagrams."""
        sends: list[SendDatagram] = []
        for command in commands:
            if isinstance(command, SendDatagram):
                assert command.destination[0] not in self.own, command
                sends.append(command)
            elif isinstance(command, OpenPort):
                self.opened_now.append(command)
            elif isinstance(command, ChannelBound):
                key = (command.client, command.channel, command.peer, command.port, command.family)
                assert key not in self.events_bound, "bound twice: %r" % (command,)
                self.events_bound.add(key)
            elif isinstance(command, ChannelUnbound):
                key = (command.client, command.channel, command.peer, command.port, command.family)
                assert key in self.events_bound, "unbound while not bound: %r" % (command,)
                self.events_bound.discard(key)
            elif isinstance(command, PermissionAdded):
                pkey = (command.client, command.port, command.peer_ip)
                assert pkey not in self.events_permissions, "added twice: %r" % (command,)
                self.events_permissions.add(pkey)
            elif isinstance(command, PermissionRemoved):
                pkey = (command.client, command.port, command.peer_ip)
                assert pkey in self.events_permissions, "removed while absent: %r" % (command,)
                self.events_permissions.discard(pkey)
            elif isinstance(command, AllocationCreated):
                akey = (command.client, command.port)
                assert akey not in self.events_allocations, command
                self.events_allocations.add(akey)
            elif isinstance(command, AllocationDeleted):
                akey = (command.client, command.port)
                assert akey in self.events_allocations, command
                self.events_allocations.discard(akey)
            else:
                assert isinstance(command, ClosePort), command
        return sends

    def build(
        self,
        method: int,
        attrs: Sequence[stun.Attribute],
        client: Client,
        kind: str,
        user: str,
        fingerprint: bool = False,
        transaction_id: Optional[bytes] = None,
    ) -> tuple[bytes, Auth]:
        now = self.now
        nonces = self.relay._nonces
        expiry = int(now) - 5 if kind == "expired" else FAR
        username, password = make_credentials(SECRET, expiry, user)
        issued: Optional[int] = int(now)
        nonce_client: Client = client
        address = (client[0], client[1])  # a stream client's nonce is bound to its ip:port
        if kind == "stale":
            nonce = nonces.issue(address, now - NONCE_LIFETIME - 100)
            issued = int(now - NONCE_LIFETIME - 100)
        elif kind == "foreign":
            nonce_client = next(c for c in CLIENTS if c != client[:2])
            nonce = nonces.issue(nonce_client, now)
        elif kind == "forged":
            nonce = "%s%s%x.%s" % (NONCE_COOKIE, NONCE_FEATURES, int(now), "00" * 12)
            issued = None
        elif kind == "stored" and client[:2] in self.nonces:
            nonce, issued = self.nonces[client[:2]]
        else:
            nonce = nonces.issue(address, now)
        attributes = list(attrs)
        key = key256 = None
        if kind != "none":
            attributes += [(stun.USERNAME, username), (stun.REALM, REALM), (stun.NONCE, nonce)]
            if kind == "sha256":
                attributes += [
                    (stun.PASSWORD_ALGORITHMS, ((stun.ALGORITHM_SHA256, b""), (stun.ALGORITHM_MD5, b""))),
                    (stun.PASSWORD_ALGORITHM, (stun.ALGORITHM_SHA256, b"")),
                ]
                key256 = stun.long_term_key(username, REALM, password, stun.ALGORITHM_SHA256)
            elif kind != "no_integrity":
                key = stun.long_term_key(username, REALM, "wrong" if kind == "wrong_password" else password)
        data = stun.encode(
            method,
            stun.REQUEST,
            transaction_id or self.next_tid(),
            attributes,
            integrity_key=key,
            integrity_sha256_key=key256,
            fingerprint=fingerprint,
        )
        return data, Auth(kind, user, expiry, issued, nonce_client, fingerprint)

    def auth_error(self, auth: Auth, client: Client) -> Optional[int]:
        """The relay's verdict on the credentials now (SPEC §3 order)."""
        if auth.kind in ("none", "no_integrity"):
            return 401
        issued = auth.nonce_issued
        if issued is None or auth.nonce_client[:2] != client[:2] or not issued <= self.now < issued + NONCE_LIFETIME:
            return 438
        if auth.kind == "wrong_password" or auth.expiry < self.now:
            return 401
        return None

    def request(self, client: Client, data: bytes, auth: Optional[Auth]) -> stun.Message:
        """Send a request; exactly one reply must come back, signed when it should be."""
        self.opened_now = []
        transmit, commands = self.driver.client(data, client)  # type: ignore[arg-type]
        assert transmit is None, transmit
        sends = self.account(commands)
        assert len(sends) == 1, "expected exactly one reply, got %r" % (sends,)
        send = sends[0]
        assert (send.source_port, send.family, send.destination) == (LISTEN, family_of(client[0]), client), send
        reply = stun.decode(send.payload)
        assert reply.transaction_id == data[8:20], reply
        assert reply.method == stun.split_message_type(int.from_bytes(data[:2], "big"))[0], reply
        assert reply.msg_class in (stun.SUCCESS, stun.ERROR), reply
        # SOFTWARE on replies to authenticated requests only (SPEC §1/§5).
        status = error_code(reply)
        if reply.method == stun.BINDING or status in (401, 438) or auth is None or auth.kind in ("none", "no_integrity"):
            assert reply.get(stun.SOFTWARE) is None, reply
        elif status is None or status in (403, 437, 440, 441, 442, 443, 508):
            assert reply.get_str(stun.SOFTWARE), reply
        if auth is None or auth.kind == "none":
            assert reply.integrity_offset < 0 and reply.integrity_sha256_offset < 0, reply
        elif auth.kind == "sha256":
            assert stun.check_integrity_sha256(reply, auth.key()), "unsigned reply %r" % (reply,)
        else:
            assert stun.check_integrity(reply, auth.key()), "unsigned reply %r" % (reply,)
        assert reply.has_fingerprint == (auth.fingerprint if auth is not None else False), reply
        code = error_code(reply)
        if code in (401, 438):
            nonce = reply.get_str(stun.NONCE)
            assert nonce is not None and reply.get_str(stun.REALM) == REALM, reply
            self.nonces[client[:2]] = (nonce, int(self.now))
        return reply

    def expect(self, reply: stun.Message, code: Optional[int]) -> None:
        assert error_code(reply) == code, "expected %s, got %r" % (code or "success", reply)
        if code == 420:
            assert reply.get(stun.UNKNOWN_ATTRIBUTES) == (UNKNOWN_REQUIRED,), reply

    def common_error(self, auth: Auth, client: Client, unknown: bool) -> Optional[int]:
        return self.auth_error(auth, client) or (420 if unknown else None)

    def owned(self, auth: Auth, client: Client, any_username: bool = False) -> tuple[Optional[MAllocation], Optional[int]]:
        alloc = self.allocations.get(client)
        if alloc is None:
            return None, 437
        if alloc.username != auth.username and not any_username:  # SPEC §2: a delete needs only valid credentials
            return None, 441
        return alloc, None

    def used_ports(self) -> set[int]:
        return {a.port for a in self.allocations.values()} | {r.port for r in self.reservations.values()}

    def delete(self, client: Client) -> None:
        alloc = self.allocations.pop(client)
        self.by_user[alloc.username].remove(client)
        for token, reservation in list(self.reservations.items()):
            if reservation.owner == client:
                del self.reservations[token]

    def user_units(self, username: str) -> int:
        """SPEC §5: a username's allocations and their unclaimed reservations."""
        owners = {r.owner for r in self.reservations.values()}
        return sum(1 + (client in owners) for client in self.by_user[username])

    def peer_allowed(self, peer: Address) -> tuple[bool, bool]:
        ip, port = peer
        if ip in self.own:
            return LOW <= port <= self.HIGH_PORT, True
        return POLICY[ip], False

    def ip_allowed(self, ip: str) -> bool:
        return ip in self.own or POLICY[ip]

    def deliver(self, source: Address, port: int, payload: bytes) -> Expected:
        """What a datagram from ``source`` arriving on allocation port ``port`` becomes."""
        alloc = next((a for a in self.allocations.values() if a.port == port), None)
        if alloc is None:
            return None
        number = alloc.channel_number(source)
        if number is not None and alloc.channels[number].bound:
            frame = number.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
            if len(alloc.client) == 3:  # streams carry ChannelData padded to 4 bytes
                frame += b"\x00" * (-len(payload) % 4)
            return (LISTEN, family_of(alloc.client[0]), alloc.client, frame)
        if source[0] in alloc.permissions:
            return DataIndication(alloc.client, source, payload)
        return None

    def to_peer(self, alloc: MAllocation, peer: Address, payload: bytes) -> Expected:
        family = family_of(peer[0])
        if peer[0] in self.own:  # hairpin: as if it had arrived on the target port
            return self.deliver((self.public[family], alloc.port), peer[1], payload)
        return (alloc.port, family, peer, payload)

    # --- Allocate -----------------------------------------------------------------------------

    def do_allocate(self, client: Client, data: bytes, auth: Auth, req: AllocateRequest) -> None:
        self.last_allocate[client] = (data, auth, req)
        existing = self.allocations.get(client)
        if existing is not None and existing.transaction_id == data[8:20]:
            reply = self.request(client, data, auth)
            assert reply.raw == existing.response, "a retransmission must get the original success"
            return
        reply = self.request(client, data, auth)
        code = self.common_error(auth, client, req.unknown)
        if code is None and existing is not None:
            code = 437
        if code is None:
            if req.transport is None:
                code = 400
            elif req.transport != 17:
                code = 442
        requested, additional, token, even = req.requested, req.additional, req.token, req.even_port
        if code is None:
            if (requested is not None and additional is not None) or additional == stun.FAMILY_IPV4:
                code = 400
            elif token is not None and (even is not None or requested is not None or additional is not None):
                code = 400
            elif additional is not None and additional != stun.FAMILY_IPV6:
                code = 400
        families: tuple[int, ...] = ()
        reservation = None
        if code is None:
            if token is not None:
                reservation = self.reservations.get(token)
                if reservation is None:
                    code = 508
                else:
                    families = (reservation.family,)
                    reservation.owner = None  # claimed: no longer its maker's
            elif requested is not None:
                family = {stun.FAMILY_IPV4: 4, stun.FAMILY_IPV6: 6}.get(requested)
                if family is None or family not in self.public:
                    code = 440
                else:
                    families = (family,)
            elif additional is not None:
                families = tuple(f for f in (4, 6) if f in self.public)
            elif 4 not in self.public:
                code = 440
            else:
                families = (4,)
        username = auth.username
        need = 2 if even is True else 1  # a reservation counts like an allocation
        if code is None and self.USER_LIMIT and need > self.USER_LIMIT:
            code = 508
        if code is None and self.USER_LIMIT:
            # The username's oldest allocation is replaced before capacity is
            # checked, so the port it frees counts (upstream deletes first).
            while self.by_user[username] and self.user_units(username) + need > self.USER_LIMIT:
                self.delete(self.by_user[username][0])
        if code is None and token is None and len(self.used_ports()) >= self.HIGH_PORT - LOW + 1:
            code = 508
        if code is not None:
            self.expect(reply, code)
            return
        # RFC 8656 §7.2: below the default lifetime, the default.
        lifetime = 600 if req.lifetime is None else max(min(req.lifetime, 3600), 600)
        used = self.used_ports()
        busy = self.driver.busy_ports
        if reservation is not None:
            assert token is not None
            del self.reservations[token]
            candidates = {reservation.port} - busy
        else:
            reserve = even is True
            candidates = {
                p
                for p in range(LOW, self.HIGH_PORT + 1)
                if p not in used
                and p not in busy
                and not (even is not None and p & 1)
                and not (reserve and (p + 1 > self.HIGH_PORT or p + 1 in used))
            }
        if not candidates:
            self.expect(reply, 508)
            return
        self.expect(reply, None)
        relayed = reply.get_all(stun.XOR_RELAYED_ADDRESS)
        assert relayed, reply
        port = relayed[0][1]  # type: ignore[index]
        assert port in candidates, (port, candidates)
        assert relayed == [(self.public[f], port) for f in families], reply
        assert reply.get_address(stun.XOR_MAPPED_ADDRESS) == client[:2], reply
        assert reply.get_int(stun.LIFETIME) == lifetime, reply
        granted = reply.get_bytes(stun.RESERVATION_TOKEN)
        assert (granted is not None) == (even is True and token is None), reply
        if granted is not None:
            self.reservations[granted] = MReservation(port + 1, families[0], self.now + RESERVATION, client)
            self.tokens.append(granted)
        opened = [c for c in self.opened_now if c.port == port]
        assert [c.family for c in opened] == list(families), self.opened_now
        assert all(c.dont_fragment == req.dont_fragment for c in opened), opened
        self.allocations[client] = MAllocation(
            client, username, port, families, self.now + lifetime, data[8:20], reply.raw, auth.user
        )
        self.by_user[username].append(client)

    @rule(
        client=clients,
        user=users,
        kind=auth_kinds,
        fingerprint=st.booleans(),
        unknown=unknown_flags,
        transport=st.sampled_from([17] * 8 + [6, None]),
        lifetime=lifetimes,
        requested=st.sampled_from([None] * 6 + [1, 1, 2, 2, 0, 3]),
        additional=st.sampled_from([None] * 8 + [2, 2, 1, 3]),
        even_port=st.sampled_from([None] * 6 + [False, True, True]),
        dont_fragment=st.booleans(),
    )
    def allocate(
        self,
        client: Client,
        user: str,
        kind: str,
        fingerprint: bool,
        unknown: bool,
        transport: Optional[int],
        lifetime: Optional[int],
        requested: Optional[int],
        additional: Optional[int],
        even_port: Optional[bool],
        dont_fragment: bool,
    ) -> None:
        req = AllocateRequest(transport, lifetime, requested, additional, even_port, None, dont_fragment, unknown)
        data, auth = self.build(stun.ALLOCATE, req.attributes(), client, kind, user, fingerprint)
        self.do_allocate(client, data, auth, req)

    @precondition(lambda self: bool(self.tokens))
    @rule(
        client=clients,
        user=users,
        kind=auth_kinds,
        pick=st.integers(0, 1000),
        bogus=st.sampled_from([False] * 4 + [True]),
        even_port=st.sampled_from([None] * 6 + [True]),
        requested=st.sampled_from([None] * 6 + [1]),
    )
    def allocate_with_token(
        self,
        client: Client,
        user: str,
        kind: str,
        pick: int,
        bogus: bool,
        even_port: Optional[bool],
        requested: Optional[int],
    ) -> None:
        token = b"bogus..." if bogus else self.tokens[pick % len(self.tokens)]
        req = AllocateRequest(requested=requested, even_port=even_port, token=token)
        data, auth = self.build(stun.ALLOCATE, req.attributes(), client, kind, user)
        self.do_allocate(client, data, auth, req)

    @precondition(lambda self: bool(self.last_allocate))
    @rule(pick=st.integers(0, 3))
    def retransmit_allocate(self, pick: int) -> None:
        client = sorted(self.last_allocate)[pick % len(self.last_allocate)]
        data, auth, req = self.last_allocate[client]
        self.do_allocate(client, data, auth, req)

    # --- Refresh, CreatePermission, ChannelBind ------------------------------------------------------

    @grouped(
        "request",
        client=clients,
        user=users,
        kind=auth_kinds,
        fingerprint=st.booleans(),
        unknown=unknown_flags,
        lifetime=st.sampled_from([None, 600, 0, 0, 1, 300, 3600, 10**6]),
        requested=st.sampled_from([None] * 8 + [1, 2, 3]),
    )
    def refresh(
        self,
        client: Client,
        user: str,
        kind: str,
        fingerprint: bool,
        unknown: bool,
        lifetime: Optional[int],
        requested: Optional[int],
    ) -> None:
        self.do_refresh(client, user, kind, fingerprint, unknown, lifetime, requested)

    def do_refresh(
        self,
        client: Client,
        user: str,
        kind: str,
        fingerprint: bool,
        unknown: bool,
        lifetime: Optional[int],
        requested: Optional[int],
    ) -> None:
        attrs: list[stun.Attribute] = []
        if lifetime is not None:
            attrs.append((stun.LIFETIME, lifetime))
        if requested is not None:
            attrs.append((stun.REQUESTED_ADDRESS_FAMILY, requested))
        if unknown:
            attrs.append((UNKNOWN_REQUIRED, b"abcd"))
        data, auth = self.build(stun.REFRESH, attrs, client, kind, user, fingerprint)
        reply = self.request(client, data, auth)
        code = self.common_error(auth, client, unknown)
        alloc = None
        effective = 600 if lifetime is None else min(lifetime, 3600)
        if code is None:
            alloc, code = self.owned(auth, client, any_username=effective == 0)
        if code is None and requested is not None:
            assert alloc is not None
            if {stun.FAMILY_IPV4: 4, stun.FAMILY_IPV6: 6}.get(requested) not in alloc.families:
                code = 443
        self.expect(reply, code)
        if code is not None:
            return
        assert alloc is not None
        assert reply.get_int(stun.LIFETIME) == effective, reply
        if effective == 0:
            self.delete(client)
        else:
            alloc.deadline = self.now + effective

    @grouped(
        "request",
        client=clients,
        user=users,
        kind=auth_kinds,
        unknown=unknown_flags,
        addresses=st.lists(peers, max_size=3),
    )
    def create_permission(self, client: Client, user: str, kind: str, unknown: bool, addresses: list[Address]) -> None:
        self.do_create_permission(client, user, kind, unknown, addresses)

    def do_create_permission(
        self, client: Client, user: str, kind: str, unknown: bool, addresses: list[Address]
    ) -> None:
        attrs: list[stun.Attribute] = [(stun.XOR_PEER_ADDRESS, p) for p in addresses]
        if unknown:
            attrs.append((UNKNOWN_REQUIRED, b"abcd"))
        data, auth = self.build(stun.CREATE_PERMISSION, attrs, client, kind, user)
        reply = self.request(client, data, auth)
        code = self.common_error(auth, client, unknown)
        alloc = None
        if code is None:
            alloc, code = self.owned(auth, client)
        if code is None and not addresses:
            code = 400
        if code is None:
            assert alloc is not None
            for peer in addresses:
                if family_of(peer[0]) not in alloc.families:
                    code = 443
                    break
                if not self.ip_allowed(peer[0]):
                    code = 403
                    break
        self.expect(reply, code)
        if code is None:
            assert alloc is not None
            for peer in addresses:
                alloc.permissions[peer[0]] = self.now + PERMISSION

    @grouped(
        "request",
        client=clients,
        user=users,
        kind=auth_kinds,
        unknown=unknown_flags,
        number=channel_numbers,
        peer=st.one_of(peers, st.none()),
    )
    def channel_bind(
        self, client: Client, user: str, kind: str, unknown: bool, number: Optional[int], peer: Optional[Address]
    ) -> None:
        self.do_channel_bind(client, user, kind, unknown, number, peer)

    def do_channel_bind(
        self, client: Client, user: str, kind: str, unknown: bool, number: Optional[int], peer: Optional[Address]
    ) -> None:
        attrs: list[stun.Attribute] = []
        if number is not None:
            attrs.append((stun.CHANNEL_NUMBER, number))
        if peer is not None:
            attrs.append((stun.XOR_PEER_ADDRESS, peer))
        if unknown:
            attrs.append((UNKNOWN_REQUIRED, b"abcd"))
        data, auth = self.build(stun.CHANNEL_BIND, attrs, client, kind, user)
        reply = self.request(client, data, auth)
        code = self.common_error(auth, client, unknown)
        alloc = None
        if code is None:
            alloc, code = self.owned(auth, client)
        if code is None and (number is None or peer is None or not 0x4000 <= number <= 0x7FFF):
            code = 400
        if code is None:
            assert alloc is not None and peer is not None and number is not None
            if family_of(peer[0]) not in alloc.families:
                code = 443
            elif not self.peer_allowed(peer)[0]:
                code = 403
            else:
                channel = alloc.channels.get(number)
                other = alloc.channel_number(peer)
                if (channel is not None and channel.peer != peer) or (other is not None and other != number):
                    code = 400
        self.expect(reply, code)
        if code is not None:
            return
        assert alloc is not None and peer is not None and number is not None
        channel = alloc.channels.setdefault(number, MChannel(peer, 0.0))
        channel.expires = self.now + CHANNEL
        channel.bound = True
        alloc.permissions[peer[0]] = self.now + PERMISSION

    @grouped("noise", client=clients)
    def binding(self, client: Client) -> None:
        reply = self.request(client, stun.encode(stun.BINDING, stun.REQUEST, self.next_tid(), []), None)
        self.expect(reply, None)
        assert reply.get_address(stun.XOR_MAPPED_ADDRESS) == client[:2], reply

    @grouped("noise", client=clients, user=users, kind=auth_kinds, method=st.sampled_from([0x00A, 0x005, 0x0FF]))
    def unknown_method(self, client: Client, user: str, kind: str, method: int) -> None:
        """400, signed when the request carried a Firezone-form USERNAME."""
        data, auth = self.build(method, [], client, kind, user)
        self.expect(self.request(client, data, auth), 400)

    # --- data ------------------------------------------------------------------------------------------

    def client_datagram(self, client: Client, data: bytes) -> tuple[Optional[Transmit], list[SendDatagram]]:
        self.opened_now = []
        transmit, commands = self.driver.client(data, client)  # type: ignore[arg-type]
        return transmit, self.account(commands)

    def expected_channel_data(self, client: Client, data: bytes) -> Expected:
        alloc = self.allocations.get(client)
        if alloc is None or len(data) < 4:
            return None
        channel = alloc.channels.get((data[0] << 8) | data[1])
        length = (data[2] << 8) | data[3]
        if channel is None or not channel.bound or length > len(data) - 4:
            return None
        return self.to_peer(alloc, channel.peer, data[4 : 4 + length])

    @grouped(
        "noise",
        client=clients,
        number=st.sampled_from([0x4000, 0x4001, 0x4002, 0x5000, 0x7FFF]),
        payload=payloads,
        shape=st.sampled_from(["exact", "exact", "padded", "too_long", "short"]),
    )
    def channel_data(self, client: Client, number: int, payload: bytes, shape: str) -> None:
        self.do_channel_data(client, number, payload, shape)

    def do_channel_data(self, client: Client, number: int, payload: bytes, shape: str) -> None:
        data = stun.encode_channel_data(number, payload)
        if shape == "padded":
            data += b"\x00" * (-len(payload) % 4 or 4)
        elif shape == "too_long":
            data = data[:2] + (len(payload) + 1).to_bytes(2, "big") + payload
        elif shape == "short":
            data = data[:3]
        expected = self.expected_channel_data(client, data)
        transmit, sends = self.client_datagram(client, data)
        assert not sends, sends
        assert_delivery(transmit, expected, self.own)

    @grouped(
        "noise",
        client=clients,
        peer=peers,
        payload=payloads,
        shape=st.sampled_from(["ok", "ok", "ok", "no_data", "no_peer"]),
    )
    def send_indication(self, client: Client, peer: Address, payload: bytes, shape: str) -> None:
        self.do_send_indication(client, peer, payload, shape)

    def do_send_indication(self, client: Client, peer: Address, payload: bytes, shape: str) -> None:
        attrs: list[stun.Attribute] = []
        if shape != "no_peer":
            attrs.append((stun.XOR_PEER_ADDRESS, peer))
        if shape != "no_data":
            attrs.append((stun.DATA, payload))
        data = stun.encode(stun.SEND, stun.INDICATION, self.next_tid(), attrs)
        expected: Expected = None
        alloc = self.allocations.get(client)
        if alloc is not None and shape == "ok":
            if (
                family_of(peer[0]) in alloc.families
                and peer[0] in alloc.permissions
                and self.peer_allowed(peer)[0]
            ):
                expected = self.to_peer(alloc, peer, payload)
        transmit, sends = self.client_datagram(client, data)
        assert transmit is None
        assert len(sends) <= 1, sends
        actual = None
        if sends:
            s = sends[0]
            actual = (s.source_port, s.family, s.destination, s.payload)
        assert_delivery(actual, expected, self.own)

    @grouped("noise", source=st.sampled_from(SOURCES), port=st.integers(LOW - 1, HIGH), payload=payloads)
    def peer_traffic(self, source: Address, port: int, payload: bytes) -> None:
        self.do_peer_traffic(source, port, payload)

    def do_peer_traffic(self, source: Address, port: int, payload: bytes) -> None:
        expected = self.deliver(source, port, payload)
        self.opened_now = []
        transmit, commands = self.driver.peer(payload, source, port, family_of(source[0]))
        assert not self.account(commands)
        assert_delivery(transmit, expected, self.own)

    @grouped(
        "noise",
        client=clients,
        kind=st.sampled_from(
            ["high", "bad_cookie", "short", "empty", "response", "data_indication", "bad_fingerprint", "port0",
             "malformed_attribute", "random"]
        ),
        noise=st.binary(max_size=48),
    )
    def garbage(self, client: Client, kind: str, noise: bytes) -> None:
        tid = self.next_tid()
        sender = client
        reply_expected = False
        if kind == "high":
            data = bytes([0x80 | (noise[0] if noise else 0)]) + noise[1:]
        elif kind == "bad_cookie":
            data = struct.pack(">HHI", 0x0003, len(noise) & ~3, 0x2112A443) + tid + noise[: len(noise) & ~3]
        elif kind == "short":
            data = bytes([0x00]) + noise[:18]
        elif kind == "empty":
            data = b""
        elif kind == "response":
            data = stun.encode(stun.ALLOCATE, stun.SUCCESS, tid, [(stun.LIFETIME, 600)])
        elif kind == "data_indication":
            data = stun.encode(stun.DATA_METHOD, stun.INDICATION, tid, [(stun.DATA, noise)])
        elif kind == "bad_fingerprint":
            good = stun.encode(stun.BINDING, stun.REQUEST, tid, [], fingerprint=True)
            data = good[:-1] + bytes([good[-1] ^ 1])
        elif kind == "port0":
            sender = (client[0], 0) + tuple(client[2:])  # type: ignore[assignment]
            data = stun.encode(stun.BINDING, stun.REQUEST, tid, [])
        elif kind == "malformed_attribute":  # LIFETIME of 3 bytes: 400, unsigned
            data = struct.pack(">HHI", 0x0003, 8, stun.MAGIC_COOKIE) + tid + b"\x00\x0d\x00\x03\x00\x00\x01\x00"
            reply_expected = True
        else:
            data = noise
            if data and data[0] < 0x40 and len(data) >= 8 and data[4:8] == struct.pack(">I", stun.MAGIC_COOKIE):
                data = data[:4] + b"\x00" + data[5:]
        if reply_expected:
            self.expect(self.request(sender, data, None), 400)
            return
        expected = self.expected_channel_data(sender, data) if data and 0x40 <= data[0] < 0x80 else None
        transmit, sends = self.client_datagram(sender, data)
        assert not sends, sends
        assert_delivery(transmit, expected, self.own)

    # --- targeted steps: valid requests on live state, so that data flows -------------------------------

    def relayed_addresses(self) -> list[Address]:
        return sorted((self.public[f], a.port) for a in self.allocations.values() for f in a.families)

    def draw_allocation(self, data: st.DataObject) -> MAllocation:
        return self.allocations[data.draw(st.sampled_from(sorted(self.allocations)), label="client")]

    def draw_peer(self, data: st.DataObject, alloc: MAllocation) -> Address:
        """Mostly a peer the allocation can use; sometimes any peer at all."""
        candidates = sorted(set(PEERS) | set(self.relayed_addresses()))
        known = sorted({c.peer for c in alloc.channels.values()} | {p for p in candidates if p[0] in alloc.permissions})
        good = [p for p in candidates if family_of(p[0]) in alloc.families and self.peer_allowed(p)[0]]
        options = [st.sampled_from(candidates)]
        if good:
            options.append(st.sampled_from(good))
        if known:
            options.append(st.sampled_from(known))
        return data.draw(st.one_of(*options), label="peer")

    @rule(
        client=clients,
        user=users,
        kind=st.sampled_from(["ok", "ok", "ok", "sha256", "stored"]),
        lifetime=st.sampled_from([None, 3600, 600, 300, 30, 1, 0]),
        family=st.sampled_from(["default", "default", "v4", "v6", "dual"]),
        even_port=st.sampled_from([None] * 5 + [False, True]),
    )
    def allocate_valid(
        self, client: Client, user: str, kind: str, lifetime: Optional[int], family: str, even_port: Optional[bool]
    ) -> None:
        requested = {"v4": stun.FAMILY_IPV4, "v6": stun.FAMILY_IPV6}.get(family)
        additional = stun.FAMILY_IPV6 if family == "dual" else None
        req = AllocateRequest(17, lifetime, requested, additional, even_port)
        data, auth = self.build(stun.ALLOCATE, req.attributes(), client, kind, user)
        self.do_allocate(client, data, auth, req)

    @initialize(
        count=st.integers(0, 3),
        family=st.sampled_from(["default", "v6", "dual"]),
        lifetime=st.sampled_from([None, 3600, 300]),
    )
    def start(self, count: int, family: str, lifetime: Optional[int]) -> None:
        """A few allocations to begin with, so that most runs move data."""
        for client, user in list(zip(ALL_CLIENTS, USERS * 2))[:count]:
            self.allocate_valid(client, user, "ok", lifetime, family if client != CLIENTS[1] else "default", None)

    @precondition(lambda self: bool(self.allocations))
    @rule(data=st.data(), lifetime=st.sampled_from([None, 600, 3600, 1, 0]))
    def refresh_valid(self, data: st.DataObject, lifetime: Optional[int]) -> None:
        alloc = self.draw_allocation(data)
        self.do_refresh(alloc.client, alloc.user, "ok", False, False, lifetime, None)

    @precondition(lambda self: bool(self.allocations))
    @rule(data=st.data())
    def create_permission_valid(self, data: st.DataObject) -> None:
        alloc = self.draw_allocation(data)
        addresses = data.draw(st.lists(st.just(None), min_size=1, max_size=3).map(len), label="count")
        chosen = [self.draw_peer(data, alloc) for _ in range(addresses)]
        self.do_create_permission(alloc.client, alloc.user, "ok", False, chosen)

    @precondition(lambda self: bool(self.allocations))
    @rule(data=st.data())
    def channel_bind_valid(self, data: st.DataObject) -> None:
        alloc = self.draw_allocation(data)
        numbers = sorted(alloc.channels) + [0x4000, 0x4001, 0x4FFF, 0x7FFF]
        number = data.draw(st.sampled_from(numbers), label="number")
        self.do_channel_bind(alloc.client, alloc.user, "ok", False, number, self.draw_peer(data, alloc))

    @precondition(lambda self: bool(self.allocations))
    @rule(data=st.data(), payload=payloads)
    def channel_data_valid(self, data: st.DataObject, payload: bytes) -> None:
        alloc = self.draw_allocation(data)
        bound = sorted(n for n, c in alloc.channels.items() if c.bound)
        number = data.draw(st.sampled_from(bound + [0x4000]) if bound else st.just(0x4000), label="number")
        self.do_channel_data(alloc.client, number, payload, "exact")

    @precondition(lambda self: bool(self.allocations))
    @rule(data=st.data(), payload=payloads)
    def send_indication_valid(self, data: st.DataObject, payload: bytes) -> None:
        alloc = self.draw_allocation(data)
        self.do_send_indication(alloc.client, self.draw_peer(data, alloc), payload, "ok")

    @precondition(lambda self: bool(self.allocations))
    @rule(data=st.data(), payload=payloads)
    def peer_traffic_valid(self, data: st.DataObject, payload: bytes) -> None:
        alloc = self.draw_allocation(data)
        known = [c.peer for c in alloc.channels.values() if c.peer[0] not in self.own]
        known += [p for p in SOURCES if p[0] in alloc.permissions]
        choices = st.sampled_from(SOURCES)
        if known:
            choices = st.one_of(st.sampled_from(sorted(set(known))), choices)
        self.do_peer_traffic(data.draw(choices, label="source"), alloc.port, payload)

    def run_group(self, group: str, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(_GROUPS[group])), label=group)
        method, strategies = _GROUPS[group][name]
        method(self, **{key: data.draw(strategy, label=key) for key, strategy in strategies.items()})

    @rule(data=st.data())
    def noise(self, data: st.DataObject) -> None:
        """Binding, unknown methods, garbage, and data on random 5-tuples."""
        self.run_group("noise", data)

    @rule(data=st.data())
    def random_request(self, data: st.DataObject) -> None:
        """Refresh, CreatePermission or ChannelBind with random parameters."""
        self.run_group("request", data)

    @precondition(lambda self: STREAM_CLIENT in self.allocations)
    @rule()
    def stream_closed(self) -> None:
        """The TCP/TLS connection goes away: its allocation goes with it."""
        self.relay.handle_client_closed(STREAM_CLIENT, self.now)
        assert not self.account(self.driver.drain())
        self.delete(STREAM_CLIENT)

    # --- time and the environment ------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        commands = self.driver.advance(seconds)
        assert not self.account(commands), "timers must not send datagrams"
        now = self.now
        for token, reservation in list(self.reservations.items()):
            if reservation.deadline <= now:
                del self.reservations[token]
        for client, alloc in list(self.allocations.items()):
            if alloc.deadline <= now:
                self.delete(client)
                continue
            for ip, deadline in list(alloc.permissions.items()):
                if deadline <= now:
                    del alloc.permissions[ip]
            for number, channel in list(alloc.channels.items()):
                if channel.expires + RESERVE <= now:
                    del alloc.channels[number]
                elif channel.expires <= now:
                    channel.bound = False
        for port, until in list(self.busy_until.items()):
            if until <= now:
                del self.busy_until[port]
                self.driver.busy_ports.discard(port)
        # No state outlives its deadline.
        relay = self.relay
        for real in relay._by_port.values():
            assert real.deadline > now, real.deadline
            for permission in real.permissions.values():
                assert permission.deadline > now
            for real_channel in real.channels.values():
                assert real_channel.deadline > now
        for real_reservation in relay._reservations.values():
            assert real_reservation.deadline > now

    @rule(seconds=durations)
    def wait(self, seconds: float) -> None:
        self.advance(seconds)

    @rule(port=st.integers(LOW, HIGH), seconds=st.sampled_from([1, 50, 400, 2000]))
    def port_busy(self, port: int, seconds: float) -> None:
        """Something else binds ``port`` for a while: OpenPort fails there."""
        self.driver.busy_ports.add(port)
        self.busy_until[port] = max(self.busy_until.get(port, 0.0), self.now + seconds)

    @precondition(lambda self: self.steps >= 30 and not self.swept)
    @rule()
    def sweep_once(self) -> None:
        """Once per run, midway: the relay must be reusable after emptying."""
        self.swept = True
        self.sweep()

    def sweep(self) -> None:
        """Advance past every lifetime: nothing may remain, not even a timer."""
        self.advance(10_000)
        assert not self.allocations and not self.reservations
        footprint = self.relay.memory_footprint()
        assert all(v == 0 for v in footprint.values()), footprint
        assert self.relay.allocation_count == 0
        assert self.relay.poll_timeout() is None
        assert not self.driver.open_ports, self.driver.open_ports
        assert not self.events_bound and not self.events_permissions and not self.events_allocations

    def teardown(self) -> None:
        self.sweep()

    # --- invariants -----------------------------------------------------------------------------------------

    @invariant()
    def model_matches_relay(self) -> None:
        self.steps += 1
        relay = self.relay
        now = self.now
        allocations = self.allocations
        assert self.driver.open_ports == {(a.port, f) for a in allocations.values() for f in a.families}
        assert self.events_allocations == {(c, a.port) for c, a in allocations.items()}
        assert self.events_bound == {
            (c, n, ch.peer, a.port, family_of(ch.peer[0]))
            for c, a in allocations.items()
            for n, ch in a.channels.items()
            if ch.bound
        }
        assert self.events_permissions == {(c, a.port, ip) for c, a in allocations.items() for ip in a.permissions}
        assert not relay._pending
        assert set(relay._allocations) == set(allocations)
        assert set(relay._by_port) == {a.port for a in allocations.values()}
        assert relay.allocation_count == len(allocations)
        for client, model in allocations.items():
            real = relay._allocations[client]
            assert real.active and not real.dead and relay._by_port[model.port] is real
            assert (real.port, real.families, real.username, real.deadline) == (
                model.port,
                model.families,
                model.username,
                model.deadline,
            )
            assert {ip: p.deadline for ip, p in real.permissions.items()} == model.permissions
            assert {n: (c.peer, c.bound, c.deadline) for n, c in real.channels.items()} == {
                n: (c.peer, c.bound, c.deadline) for n, c in model.channels.items()
            }
            assert real.channel_by_peer == {c.peer: n for n, c in model.channels.items()}
            assert real.chan_in == {
                c.peer: (client, n.to_bytes(2, "big"), family_of(client[0]), len(client) == 3)
                for n, c in model.channels.items()
                if c.bound
            }
        chan_out = {
            c: {
                n: (a.port, family_of(ch.peer[0]), ch.peer, ch.peer[0] in self.own, relay._allocations[c].meter)
                for n, ch in a.channels.items()
                if ch.bound
            }
            for c, a in allocations.items()
        }
        assert relay._chan_out == {c: m for c, m in chan_out.items() if m}
        assert {t: (r.port, r.family, r.deadline) for t, r in relay._reservations.items()} == {
            t: (r.port, r.family, r.deadline) for t, r in self.reservations.items()
        }
        assert relay._used_ports == self.used_ports()
        assert relay.permission_count == sum(len(a.permissions) for a in allocations.values())
        assert relay.channel_count == sum(c.bound for a in allocations.values() for c in a.channels.values())
        deadlines = [a.deadline for a in allocations.values()]
        deadlines += [d for a in allocations.values() for d in a.permissions.values()]
        deadlines += [c.deadline for a in allocations.values() for c in a.channels.values()]
        deadlines += [r.deadline for r in self.reservations.values()]
        assert all(d >= now for d in deadlines)
        poll = relay.poll_timeout()
        assert poll == (min(deadlines) if deadlines else None), (poll, sorted(deadlines)[:3])


class SingleUserMachine(RelayMachine):
    """An IPv4-only relay in portal mode: one allocation per username."""

    PUBLIC6 = None
    USER_LIMIT = 1
    HIGH_PORT = LOW + 2


MACHINE_SETTINGS = settings(
    deadline=None,
    max_examples=160,
    stateful_step_count=80,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class RelayMachineTests(SynchronousTestCase):
    """Trial runs the hypothesis machines (their generated ``TestCase`` has
    only ``runTest``, which trial's loader does not collect)."""

    def test_dual_stack_no_user_limit(self) -> None:
        run_state_machine_as_test(RelayMachine, settings=MACHINE_SETTINGS)

    def test_ipv4_only_one_allocation_per_user(self) -> None:
        run_state_machine_as_test(SingleUserMachine, settings=MACHINE_SETTINGS)


# --- a simulated network ------------------------------------------------------------------------------


class SimNetwork:
    """Routes datagrams between endpoints and the relay, by address.

    The relay is reached on ``(public ip, 3478)`` (listen port) and
    ``(public ip, allocation port)``; its commands and returned ``Transmit``
    tuples are sent from ``(public ip of the family, source port)``.
    Everything else lands in an endpoint's inbox.
    """

    def __init__(self, relay: Relay, now: float = NOW) -> None:
        self.relay = relay
        self.now = now
        self.public = {4: PUBLIC4, 6: _canonical((PUBLIC6, 0))[0]}
        self.own = frozenset(self.public.values())
        self.open_ports: set[tuple[int, int]] = set()
        self.inboxes: dict[Address, list[tuple[Address, bytes]]] = defaultdict(list)
        self.lost: list[tuple[Address, Address, bytes]] = []

    def send(self, source: Address, destination: Address, payload: bytes) -> None:
        ip, port = destination
        if ip not in self.own:
            self.inboxes[destination].append((source, payload))
            return
        family = family_of(ip)
        out: Optional[Transmit]
        if port == LISTEN:
            out = self.relay.handle_client_input(payload, source, self.now)
        elif (port, family) in self.open_ports:
            out = self.relay.handle_peer_traffic(payload, source, port, family, self.now)
        else:
            self.lost.append((source, destination, payload))
            return
        if out is not None:
            self.emit(out)
        self.drain()

    def emit(self, transmit: Sequence[object]) -> None:
        source_port, family, destination, payload = transmit
        assert isinstance(source_port, int) and isinstance(family, int)
        assert isinstance(destination, tuple) and isinstance(payload, bytes)
        assert destination[0] not in self.own, "the relay sent to its own address: %r" % (transmit,)
        assert family == family_of(destination[0]), transmit
        self.send((self.public[family], source_port), destination, payload)

    def drain(self) -> None:
        while True:
            command = self.relay.next_command()
            if command is None:
                return
            if isinstance(command, SendDatagram):
                self.emit((command.source_port, command.family, command.destination, command.payload))
            elif isinstance(command, OpenPort):
                assert (command.port, command.family) not in self.open_ports
                self.open_ports.add((command.port, command.family))
                self.relay.handle_port_result(command.port, command.family, True, self.now)
            elif isinstance(command, ClosePort):
                self.open_ports.remove((command.port, command.family))

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while True:
            deadline = self.relay.poll_timeout()
            if deadline is None or deadline > target:
                break
            self.now = max(self.now, deadline)
            self.relay.handle_timeout(self.now)
            self.drain()
        self.now = target
        self.relay.handle_timeout(self.now)
        self.drain()

    def receive(self, address: Address) -> list[tuple[Address, bytes]]:
        return self.inboxes.pop(address, [])


class TurnClient:
    """A minimal TURN client: learns the nonce from 401/438 challenges."""

    def __init__(self, net: SimNetwork, address: Address, family: int = 4, user: str = "client") -> None:
        self.net = net
        self.address = address
        self.server = (net.public[family_of(address[0])], LISTEN)
        self.family = family
        self.username, self.password = make_credentials(SECRET, FAR, user)
        self.key = stun.long_term_key(self.username, REALM, self.password)
        self.nonce: Optional[str] = None
        self.tid = 0
        self.relayed: Optional[Address] = None
        self.data: list[tuple[str, object, bytes]] = []  # ("channel", number, payload) / ("indication", peer, payload)

    def transact(self, method: int, attrs: Sequence[stun.Attribute]) -> stun.Message:
        for _ in range(3):
            self.tid += 1
            tid = self.tid.to_bytes(12, "big")
            if self.nonce is None:
                data = stun.encode(method, stun.REQUEST, tid, attrs)
            else:
                full = list(attrs) + [(stun.USERNAME, self.username), (stun.REALM, REALM), (stun.NONCE, self.nonce)]
                data = stun.encode(method, stun.REQUEST, tid, full, integrity_key=self.key)
            self.net.send(self.address, self.server, data)
            replies = [m for m in self.poll() if m.transaction_id == tid]
            assert len(replies) == 1, replies
            reply = replies[0]
            if error_code(reply) in (401, 438) and reply.get_str(stun.NONCE):
                assert reply.get_str(stun.REALM) == REALM
                self.nonce = reply.get_str(stun.NONCE)
                continue
            assert stun.check_integrity(reply, self.key), reply
            return reply
        raise AssertionError("no answer after three challenges")

    def poll(self) -> list[stun.Message]:
        """Read the inbox: STUN responses are returned, data is kept in ``self.data``."""
        responses = []
        for source, payload in self.net.receive(self.address):
            assert source == self.server, source
            if 0x40 <= payload[0] < 0x80:
                number, inner = stun.decode_channel_data(payload)
                self.data.append(("channel", number, inner))
                continue
            message = stun.decode(payload)
            if message.msg_class == stun.INDICATION:
                assert message.method == stun.DATA_METHOD
                data = message.get_bytes(stun.DATA)
                assert data is not None
                self.data.append(("indication", message.get_address(stun.XOR_PEER_ADDRESS), data))
            else:
                responses.append(message)
        return responses

    def allocate(self, lifetime: int = 600) -> Address:
        attrs: list[stun.Attribute] = [(stun.REQUESTED_TRANSPORT, 17), (stun.LIFETIME, lifetime)]
        if self.family == 6:
            attrs.append((stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV6))
        reply = self.transact(stun.ALLOCATE, attrs)
        assert error_code(reply) is None, reply
        relayed = reply.get_address(stun.XOR_RELAYED_ADDRESS)
        assert relayed is not None and family_of(relayed[0]) == self.family
        self.relayed = relayed
        return relayed

    def ok(self, method: int, attrs: Sequence[stun.Attribute]) -> stun.Message:
        reply = self.transact(method, attrs)
        assert error_code(reply) is None, reply
        return reply

    def take_data(self) -> list[tuple[str, object, bytes]]:
        self.poll()
        data, self.data = self.data, []
        return data


def make_relay(dual: bool = True) -> Relay:
    config = RelayConfig(
        auth_secret=SECRET,
        public_ip4=PUBLIC4,
        public_ip6=PUBLIC6 if dual else None,
        listen_port=LISTEN,
        lowest_port=LOW,
        highest_port=HIGH,
    )
    return Relay(config, random.Random(7))


class NetworkTests(SynchronousTestCase):
    """End to end through the relay, like upstream's ``ping_pong_relay``."""

    @settings(deadline=None, max_examples=60, derandomize=False, print_blob=True)
    @given(
        family=st.sampled_from([4, 6]),
        steps=st.lists(
            st.tuples(
                st.sampled_from(["channel", "indication"]),
                st.binary(max_size=300),
                st.binary(max_size=300),
                st.one_of(st.sampled_from([0, 1, 239, 240, 299, 300, 301, 500]), st.floats(0, 500)),
            ),
            max_size=12,
        ),
    )
    def test_payloads_arrive_intact_in_order_exactly_once(
        self, family: int, steps: list[tuple[str, bytes, bytes, float]]
    ) -> None:
        relay = make_relay()
        net = SimNetwork(relay)
        client_address = ("198.51.100.7", 40000) if family == 4 else _canonical(("2001:db8:1::7", 40000))
        peer = ("8.8.8.8", 5000) if family == 4 else _canonical(("2606:4700::1111", 7000))
        client = TurnClient(net, client_address, family)
        relayed = client.allocate()
        number = 0x4000
        allocated_at = net.now
        bound_at = permitted_at = -float("inf")
        want_channel = want_permission = False

        def keep_alive() -> None:
            # Refreshes on the client's own schedule, long before anything lapses.
            nonlocal allocated_at, bound_at, permitted_at
            if net.now - allocated_at >= 240:
                client.ok(stun.REFRESH, [(stun.LIFETIME, 600)])
                allocated_at = net.now
            if want_channel and net.now - bound_at >= 240:
                client.ok(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, number), (stun.XOR_PEER_ADDRESS, peer)])
                bound_at = permitted_at = net.now
            if want_permission and net.now - permitted_at >= 240:
                client.ok(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, peer)])
                permitted_at = net.now

        sent_up: list[bytes] = []
        sent_down: list[bytes] = []
        got_up: list[bytes] = []
        got_down: list[bytes] = []
        for mode, up, down, wait in steps:
            want_channel = want_channel or mode == "channel"
            want_permission = want_permission or mode == "indication"
            keep_alive()
            # Client -> peer.
            if mode == "channel":
                net.send(client_address, client.server, stun.encode_channel_data(number, up))
            else:
                send = stun.encode(
                    stun.SEND, stun.INDICATION, b"\x00" * 12, [(stun.XOR_PEER_ADDRESS, peer), (stun.DATA, up)]
                )
                net.send(client_address, client.server, send)
            sent_up.append(up)
            arrived = net.receive(peer)
            self.assertEqual(arrived, [(relayed, up)])
            got_up.extend(payload for _, payload in arrived)
            # Peer -> client, to the relayed address.
            net.send(peer, relayed, down)
            sent_down.append(down)
            received = client.take_data()
            if want_channel:
                self.assertEqual(received, [("channel", number, down)])
            else:
                self.assertEqual(received, [("indication", peer, down)])
            got_down.extend(payload for _, _, payload in received)
            while wait > 0:
                chunk = min(wait, 200.0)
                net.advance(chunk)
                wait -= chunk
                keep_alive()
            self.assertEqual(client.take_data(), [])
            self.assertEqual(net.receive(peer), [])
        self.assertEqual(got_up, sent_up)
        self.assertEqual(got_down, sent_down)
        self.assertEqual(net.lost, [])
        # Deallocate: everything goes.
        client.ok(stun.REFRESH, [(stun.LIFETIME, 0)])
        self.assertEqual(net.open_ports, set())
        net.advance(10_000)
        self.assertEqual(set(relay.memory_footprint().values()), {0})


class HairpinTests(SynchronousTestCase):
    """Both ends of a session on this relay (SPEC §5): delivered internally."""

    @settings(deadline=None, max_examples=30, derandomize=False, print_blob=True)
    @given(
        family=st.sampled_from([4, 6]),
        b_mode=st.sampled_from(["channel", "permission", "nothing"]),
        a_mode=st.sampled_from(["channel", "send"]),
        payload=st.binary(max_size=200),
    )
    def test_hairpin(self, family: int, b_mode: str, a_mode: str, payload: bytes) -> None:
        relay = make_relay()
        net = SimNetwork(relay)
        if family == 4:
            a = TurnClient(net, ("198.51.100.7", 40000), 4, "a")
            b = TurnClient(net, ("203.0.113.5", 50500), 4, "b")
        else:
            a = TurnClient(net, _canonical(("2001:db8:1::7", 40000)), 6, "a")
            b = TurnClient(net, _canonical(("2001:db8:2::9", 40000)), 6, "b")
        relayed_a = a.allocate()
        relayed_b = b.allocate()
        self.assertEqual(relayed_a[0], relayed_b[0])
        self.assertIn(relayed_a[0], net.own)
        # B lets A in (or not).
        if b_mode == "channel":
            b.ok(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4002), (stun.XOR_PEER_ADDRESS, relayed_a)])
        elif b_mode == "permission":
            b.ok(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, relayed_a)])
        # A talks to B's relayed address.
        if a_mode == "channel":
            a.ok(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4001), (stun.XOR_PEER_ADDRESS, relayed_b)])
            net.send(a.address, a.server, stun.encode_channel_data(0x4001, payload))
        else:
            a.ok(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, relayed_b)])
            indication = stun.encode(
                stun.SEND, stun.INDICATION, b"\x01" * 12, [(stun.XOR_PEER_ADDRESS, relayed_b), (stun.DATA, payload)]
            )
            net.send(a.address, a.server, indication)
        received = b.take_data()
        if b_mode == "channel":
            self.assertEqual(received, [("channel", 0x4002, payload)])
        elif b_mode == "permission":
            self.assertEqual(received, [("indication", relayed_a, payload)])
        else:
            self.assertEqual(received, [])
        # And back: B answers to A's relayed address.
        if b_mode == "channel":
            net.send(b.address, b.server, stun.encode_channel_data(0x4002, payload[::-1]))
        elif b_mode == "permission":
            indication = stun.encode(
                stun.SEND,
                stun.INDICATION,
                b"\x02" * 12,
                [(stun.XOR_PEER_ADDRESS, relayed_a), (stun.DATA, payload[::-1])],
            )
            net.send(b.address, b.server, indication)
        if b_mode != "nothing":
            if a_mode == "channel":
                self.assertEqual(a.take_data(), [("channel", 0x4001, payload[::-1])])
            else:
                self.assertEqual(a.take_data(), [("indication", relayed_b, payload[::-1])])
        self.assertEqual(net.lost, [])
        for inbox in net.inboxes:
            self.assertNotIn(inbox[0], net.own)

    def test_relay_port_without_allocation_is_a_dead_end(self) -> None:
        relay = make_relay()
        net = SimNetwork(relay)
        a = TurnClient(net, ("198.51.100.7", 40000))
        relayed = a.allocate()
        free = next(p for p in range(LOW, HIGH + 1) if p != relayed[1])
        a.ok(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4001), (stun.XOR_PEER_ADDRESS, (PUBLIC4, free))])
        net.send(a.address, a.server, stun.encode_channel_data(0x4001, b"hello"))
        self.assertEqual(dict(net.inboxes), {})
        # The relay's own address outside the range (its listen port) is denied.
        own_listen = (PUBLIC4, LISTEN)
        reply = a.transact(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4002), (stun.XOR_PEER_ADDRESS, own_listen)])
        self.assertEqual(error_code(reply), 403)


class RoamingTests(SynchronousTestCase):
    """SPEC §2: with ``--user-allocation-limit`` a new allocation beyond the
    limit replaces the username's oldest (upstream's roaming rule: upstream
    deletes the old allocation first, then picks a port)."""

    def roam(self, **options: object) -> stun.Message:
        driver = Driver(harness_make_relay(user_allocation_limit=1, **options))  # type: ignore[arg-type]
        first = driver.allocate(("198.51.100.7", 40000))
        self.assertEqual(error_code(first), None)
        # The same device behind a NAT that changed its source port.
        return driver.allocate(("198.51.100.7", 40001))

    def test_roaming_client_replaces_its_allocation_when_the_range_is_full(self) -> None:
        self.assertEqual(error_code(self.roam(lowest_port=50000, highest_port=50000)), None)

    def test_roaming_client_replaces_its_allocation_at_max_allocations(self) -> None:
        self.assertEqual(error_code(self.roam(max_allocations=1)), None)
