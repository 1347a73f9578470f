"""Commands the relay core asks its I/O shell to carry out.

Control-plane commands are frozen dataclasses drained with
``Relay.next_command()``.  The per-packet paths (ChannelData in both
directions) do not use them: ``Relay.handle_client_input`` and
``Relay.handle_peer_traffic`` return a plain ``Transmit`` tuple
``(source_port, family, destination, payload)`` instead, because a tuple is an
order of magnitude cheaper to build than a dataclass on CPython.

Addresses are ``(ip, port)`` with ``ip`` as text; families are the integers
4 and 6.  A client is identified by its transport address: ``(ip, port)`` for
UDP, ``(ip, port, connection_id)`` for a stream (TCP or TLS) connection, so
the two can never be confused and the shell can tell where a reply goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

Address = Tuple[str, int]
#: ``(ip, port)`` for UDP clients, ``(ip, port, connection_id)`` for stream clients.
Client = Union[Tuple[str, int], Tuple[str, int, int]]

#: ``(source_port, family, destination, payload)``: send ``payload`` to
#: ``destination`` from the socket bound to ``source_port`` in ``family``.
Transmit = Tuple[int, int, Client, bytes]


@dataclass(frozen=True)
class SendDatagram:
    """Send ``payload`` to ``destination`` from the ``(source_port, family)`` socket.

    ``source_port`` is the listen port for STUN replies, Data indications and
    ChannelData to clients, or an allocation port for traffic to peers.
    """

    source_port: int
    family: int
    destination: Client
    payload: bytes


@dataclass(frozen=True)
class OpenPort:
    """Bind a UDP socket on ``port`` for ``family`` and feed what it receives
    to ``Relay.handle_peer_traffic``.

    The shell must answer with ``Relay.handle_port_result(port, family, ok,
    now)`` before it takes the next command: the core holds the Allocate
    response until then and picks another port if ``ok`` is false.
    ``dont_fragment`` asks for the DF bit on datagrams sent from the port.
    """

    port: int
    family: int
    dont_fragment: bool = False


@dataclass(frozen=True)
class ClosePort:
    """Close the socket bound on ``port`` for ``family``."""

    port: int
    family: int


@dataclass(frozen=True)
class _ChannelNotice:
    client: Client
    channel: int
    peer: Address
    port: int
    family: int


@dataclass(frozen=True)
class ChannelBound(_ChannelNotice):
    """A channel became usable: a kernel fast path may mirror it."""


@dataclass(frozen=True)
class ChannelUnbound(_ChannelNotice):
    """A channel stopped being usable (expiry or deletion)."""


@dataclass(frozen=True)
class _PermissionNotice:
    client: Client
    port: int
    peer_ip: str


@dataclass(frozen=True)
class PermissionAdded(_PermissionNotice):
    """A permission for ``peer_ip`` was installed on allocation ``port``."""


@dataclass(frozen=True)
class PermissionRemoved(_PermissionNotice):
    """A permission expired or went with its allocation."""


@dataclass(frozen=True)
class AllocationCreated:
    """For the log: a new allocation is in service."""

    client: Client
    username: str
    port: int
    relayed: Tuple[Address, ...]
    lifetime: int


@dataclass(frozen=True)
class AllocationDeleted:
    """For the log: an allocation is gone (``reason``: expired, refresh,
    replaced, port-failed)."""

    client: Client
    username: str
    port: int
    reason: str


#: What the shell must carry out: socket work.
ShellCommand = Union[SendDatagram, OpenPort, ClosePort]
#: What the shell may observe (logs, the XDP mirror, the stream transport).
Notice = Union[ChannelBound, ChannelUnbound, PermissionAdded, PermissionRemoved, AllocationCreated, AllocationDeleted]
#: Everything ``Relay.next_command()`` returns: a closed union of frozen
#: dataclasses, so the shell can ``match`` on it with positional patterns,
#: e.g. ``case SendDatagram(port, family, destination, payload):``.
Command = Union[ShellCommand, Notice]
