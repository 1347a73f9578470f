"""Memory of one allocation filled to its caps (issue 14 item 10).

The sans-IO core only, no sockets: one allocation, then CreatePermission and
ChannelBind requests (16 peers per CreatePermission) until both caps are
reached, measured with ``tracemalloc`` (Python heap growth, after a
collection).  Also says how many such allocations fill one 65,536-entry XDP
channel map (one entry per channel per direction map).

    python -m benchmarks.bench_caps [--caps 256 4096] [--runs 3]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tracemalloc
from typing import Optional

from firezone_relay.core import stun
from firezone_relay.core.auth import REALM, make_credentials
from firezone_relay.core.commands import SendDatagram
from firezone_relay.core.relay import Relay, RelayConfig

SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"
NOW = 1_700_000_000.0
CLIENT = ("198.51.100.7", 40000)
XDP_MAP_ENTRIES = 65536


class _Client:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.username, password = make_credentials(SECRET, int(NOW) + 86400, "bench")
        self.key = stun.long_term_key(self.username, REALM, password)
        self.tid = 0

    def request(self, method: int, attributes: list[stun.Attribute]) -> stun.Message:
        self.tid += 1
        nonce = self.relay._nonces.issue(CLIENT, NOW)
        attrs = attributes + [(stun.USERNAME, self.username), (stun.REALM, REALM), (stun.NONCE, nonce)]
        data = stun.encode(method, stun.REQUEST, self.tid.to_bytes(12, "big"), attrs, integrity_key=self.key)
        self.relay.handle_client_input(data, CLIENT, NOW)
        reply: Optional[stun.Message] = None
        while (command := self.relay.next_command()) is not None:
            if isinstance(command, SendDatagram) and command.destination == CLIENT:
                reply = stun.decode(command.payload)
            elif type(command).__name__ == "OpenPort":
                self.relay.handle_port_result(command.port, command.family, True, NOW)  # type: ignore[attr-defined]
        assert reply is not None
        return reply


def _peer(i: int) -> str:
    return "8.%d.%d.%d" % (8 + i // 65536, (i // 256) % 256, i % 256 + 0)


def full_allocation_bytes(cap: int) -> tuple[int, int, int]:
    """(bytes, permissions, channels) for one allocation filled to ``cap`` each."""
    config = RelayConfig(auth_secret=SECRET, public_ip4="192.0.2.1", max_permissions=cap, max_channels=cap,
                         unauthenticated_rate=0)
    relay = Relay(config, random.Random(0))
    client = _Client(relay)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    reply = client.request(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)])
    assert reply.msg_class == stun.SUCCESS, reply
    for start in range(0, cap, 16):
        peers = [(stun.XOR_PEER_ADDRESS, (_peer(i), 1)) for i in range(start, min(cap, start + 16))]
        assert client.request(stun.CREATE_PERMISSION, peers).msg_class == stun.SUCCESS  # type: ignore[arg-type]
    for i in range(cap):
        reply = client.request(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000 + i), (stun.XOR_PEER_ADDRESS, (_peer(i), 5000))])
        assert reply.msg_class == stun.SUCCESS, reply
    # One more of each is refused (508): the caps hold.
    more = client.request(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, ("9.9.9.9", 1))])
    assert more.get(stun.ERROR_CODE) is not None
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, relay.permission_count, relay.channel_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print("| caps (permissions = channels) | heap per full allocation (median of %d) | allocations to fill a %d-entry XDP map |"
          % (args.runs, XDP_MAP_ENTRIES))
    print("|---:|---:|---:|")
    for cap in args.caps:
        sizes = []
        for _ in range(args.runs):
            size, permissions, channels = full_allocation_bytes(cap)
            assert (permissions, channels) == (cap, cap)
            sizes.append(size)
        median = statistics.median(sizes)
        print("| %d | %.0f KiB (%.2f MiB) | %d |" % (cap, median / 1024, median / 1048576, XDP_MAP_ENTRIES // cap))


if __name__ == "__main__":
    main()
