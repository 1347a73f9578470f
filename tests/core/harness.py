"""Builders and a driver for sans-IO relay tests: messages in, commands out."""

from __future__ import annotations

import random
from typing import Optional, Sequence

from firezone_relay.core import stun
from firezone_relay.core.auth import REALM, make_credentials
from firezone_relay.core.commands import ClosePort, Command, OpenPort, SendDatagram, Transmit
from firezone_relay.core.relay import Relay, RelayConfig

SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"
NOW = 1_700_000_000.0
CLIENT: stun.Address = ("198.51.100.7", 40000)
PEER: stun.Address = ("8.8.4.4", 5000)
PUBLIC4 = "192.0.2.1"
PUBLIC6 = "2001:db8::1"


def make_relay(
    *,
    public_ip4: Optional[str] = PUBLIC4,
    public_ip6: Optional[str] = None,
    seed: int = 0,
    **options: object,
) -> Relay:
    config = RelayConfig(auth_secret=SECRET, public_ip4=public_ip4, public_ip6=public_ip6, **options)  # type: ignore[arg-type]
    return Relay(config, random.Random(seed))


def credentials(expiry: float = NOW + 86400, salt: str = "n23JJ2wKKtt30oXi", secret: str = SECRET) -> tuple[str, str]:
    return make_credentials(secret, int(expiry), salt)


def tid(n: int) -> bytes:
    return n.to_bytes(12, "big")


class Driver:
    """Feeds a relay and collects what it asks for.

    ``OpenPort`` commands are answered at once: with failure for ports in
    ``busy_ports``, success otherwise.
    """

    def __init__(self, relay: Relay, now: float = NOW) -> None:
        self.relay = relay
        self.now = now
        self.busy_ports: set[int] = set()
        self.open_ports: set[tuple[int, int]] = set()
        self.commands: list[Command] = []
        self._tid = 0

    def next_tid(self) -> bytes:
        self._tid += 1
        return tid(self._tid)

    def drain(self) -> list[Command]:
        out: list[Command] = []
        while True:
            command = self.relay.next_command()
            if command is None:
                break
            out.append(command)
            match command:
                case OpenPort(port, family):
                    ok = port not in self.busy_ports
                    if ok:
                        assert (port, family) not in self.open_ports, command
                        self.open_ports.add((port, family))
                    self.relay.handle_port_result(port, family, ok, self.now)
                case ClosePort(port, family):
                    assert (port, family) in self.open_ports, command
                    self.open_ports.discard((port, family))
        self.commands.extend(out)
        return out

    def client(self, data: bytes, sender: stun.Address = CLIENT) -> tuple[Optional[Transmit], list[Command]]:
        out = self.relay.handle_client_input(data, sender, self.now)
        return out, self.drain()

    def peer(self, data: bytes, peer: stun.Address, port: int, family: int = 4) -> tuple[Optional[Transmit], list[Command]]:
        out = self.relay.handle_peer_traffic(data, peer, port, family, self.now)
        return out, self.drain()

    def advance(self, seconds: float) -> list[Command]:
        """Move the clock, firing every deadline on the way in order."""
        target = self.now + seconds
        out: list[Command] = []
        while True:
            deadline = self.relay.poll_timeout()
            if deadline is None or deadline > target:
                break
            self.now = max(self.now, deadline)
            self.relay.handle_timeout(self.now)
            out.extend(self.drain())
        self.now = target
        self.relay.handle_timeout(self.now)
        out.extend(self.drain())
        return out

    def request(
        self,
        data: bytes,
        sender: stun.Address = CLIENT,
    ) -> stun.Message:
        """Send a request, return the single STUN reply."""
        out, commands = self.client(data, sender)
        assert out is None
        replies = [c for c in commands if isinstance(c, SendDatagram) and c.destination == sender]
        assert len(replies) == 1, commands
        return stun.decode(replies[0].payload)

    # --- authenticated requests ------------------------------------------

    def nonce_for(self, sender: stun.Address = CLIENT) -> str:
        reply = self.request(build(stun.ALLOCATE, self.next_tid(), [(stun.REQUESTED_TRANSPORT, 17)]), sender)
        assert reply.msg_class == stun.ERROR and reply.get(stun.ERROR_CODE) == (401, "Unauthorized")
        nonce = reply.get_str(stun.NONCE)
        assert nonce is not None
        return nonce

    def signed(
        self,
        method: int,
        attributes: Sequence[stun.Attribute],
        sender: stun.Address = CLIENT,
        creds: Optional[tuple[str, str]] = None,
        nonce: Optional[str] = None,
        transaction_id: Optional[bytes] = None,
        sha256: bool = False,
        fingerprint: bool = False,
    ) -> bytes:
        username, password = creds or credentials()
        if nonce is None:
            nonce = self.relay._nonces.issue(sender, self.now)
        attrs = list(attributes) + [(stun.USERNAME, username), (stun.REALM, REALM), (stun.NONCE, nonce)]
        if sha256:
            algorithms = ((stun.ALGORITHM_SHA256, b""), (stun.ALGORITHM_MD5, b""))
            attrs += [(stun.PASSWORD_ALGORITHMS, algorithms), (stun.PASSWORD_ALGORITHM, (stun.ALGORITHM_SHA256, b""))]
            key = stun.long_term_key(username, REALM, password, stun.ALGORITHM_SHA256)
            return stun.encode(
                method, stun.REQUEST, transaction_id or self.next_tid(), attrs,
                integrity_sha256_key=key, fingerprint=fingerprint,
            )
        key = stun.long_term_key(username, REALM, password)
        return stun.encode(
            method, stun.REQUEST, transaction_id or self.next_tid(), attrs, integrity_key=key, fingerprint=fingerprint
        )

    def allocate(
        self,
        sender: stun.Address = CLIENT,
        extra: Sequence[stun.Attribute] = (),
        creds: Optional[tuple[str, str]] = None,
    ) -> stun.Message:
        return self.request(
            self.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17), *extra], sender, creds), sender
        )

    def relayed_port(self, reply: stun.Message) -> int:
        address = reply.get_address(stun.XOR_RELAYED_ADDRESS)
        assert address is not None, reply
        return address[1]


def build(method: int, transaction_id: bytes, attributes: Sequence[stun.Attribute], cls: int = stun.REQUEST) -> bytes:
    return stun.encode(method, cls, transaction_id, attributes)


def error_code(message: stun.Message) -> int:
    value = message.get(stun.ERROR_CODE)
    assert isinstance(value, tuple), message
    code = value[0]
    assert isinstance(code, int)
    return code


def verify_signed(message: stun.Message, creds: tuple[str, str], sha256: bool = False) -> bool:
    username, password = creds
    if sha256:
        return stun.check_integrity_sha256(message, stun.long_term_key(username, REALM, password, stun.ALGORITHM_SHA256))
    return stun.check_integrity(message, stun.long_term_key(username, REALM, password))
