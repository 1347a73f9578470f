"""Cost of the sans-IO core per relayed packet and per authenticated request.

    python -m benchmarks.bench_core [--rounds 5]

No sockets: this measures only the Python work of the core.  Each figure is
the median over ``--rounds`` rounds; every round is bounded in count.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from firezone_relay.core import stun
from firezone_relay.core.auth import REALM, make_credentials
from firezone_relay.core.relay import Relay, RelayConfig

SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"
PEER = ("8.8.4.4", 5000)


def _relay() -> Relay:
    config = RelayConfig(auth_secret=SECRET, public_ip4="192.0.2.1", unauthenticated_rate=0)
    return Relay(config, random.Random(1))


def _drain(relay: Relay, now: float) -> list[object]:
    out = []
    while (command := relay.next_command()) is not None:
        out.append(command)
        if type(command).__name__ == "OpenPort":
            relay.handle_port_result(command.port, command.family, True, now)  # type: ignore[union-attr]
    return out


def _signed(relay: Relay, method: int, attrs: list, client: tuple[str, int], now: float, tid: int) -> bytes:
    username, password = make_credentials(SECRET, int(now) + 86400, "n23JJ2wKKtt30oXi")
    nonce = relay._nonces.issue(client, now)
    key = stun.long_term_key(username, REALM, password)
    return stun.encode(
        method,
        stun.REQUEST,
        tid.to_bytes(12, "big"),
        attrs + [(stun.USERNAME, username), (stun.REALM, REALM), (stun.NONCE, nonce)],
        integrity_key=key,
    )


def bench_channel_data(packets: int, size: int) -> tuple[float, float]:
    """ns per packet client→peer and peer→client."""
    relay = _relay()
    now = time.time()
    client = ("198.51.100.7", 40000)
    relay.handle_client_input(_signed(relay, stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], client, now, 1), client, now)
    _drain(relay, now)
    port = next(iter(relay._by_port))
    relay.handle_client_input(
        _signed(relay, stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4000), (stun.XOR_PEER_ADDRESS, PEER)], client, now, 2),
        client,
        now,
    )
    _drain(relay, now)
    frame = stun.encode_channel_data(0x4000, b"x" * size)
    payload = b"y" * size
    handle_client = relay.handle_client_input
    handle_peer = relay.handle_peer_traffic
    assert handle_client(frame, client, now) is not None
    assert handle_peer(payload, PEER, port, 4, now) is not None
    start = time.perf_counter_ns()
    for _ in range(packets):
        handle_client(frame, client, now)
    middle = time.perf_counter_ns()
    for _ in range(packets):
        handle_peer(payload, PEER, port, 4, now)
    end = time.perf_counter_ns()
    return (middle - start) / packets, (end - middle) / packets


def bench_allocate(count: int) -> float:
    """ns per authenticated Allocate (decode, auth, state, signed response)."""
    relay = Relay(
        RelayConfig(auth_secret=SECRET, public_ip4="192.0.2.1", lowest_port=1024, highest_port=65535, listen_port=80, unauthenticated_rate=0),
        random.Random(2),
    )
    now = time.time()
    requests = []
    for i in range(count):
        client = ("198.51.%d.%d" % (i // 250 % 250, i % 250 + 1), 10000 + i // 62500)
        requests.append((_signed(relay, stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], client, now, i + 1), client))
    handle = relay.handle_client_input
    start = time.perf_counter_ns()
    for data, client in requests:
        handle(data, client, now)
        _drain(relay, now)
    elapsed = time.perf_counter_ns() - start
    assert relay.allocation_count == count, relay.allocation_count
    return elapsed / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--allocations", type=int, default=5_000)
    args = parser.parse_args()
    rows = []
    for size in (100, 1200):
        results = [bench_channel_data(args.packets, size) for _ in range(args.rounds)]
        rows.append(("ChannelData client->peer, %d B" % size, statistics.median(r[0] for r in results), 1500))
        rows.append(("ChannelData peer->client, %d B" % size, statistics.median(r[1] for r in results), 1500))
    allocs = [bench_allocate(args.allocations) for _ in range(args.rounds)]
    rows.append(("authenticated Allocate", statistics.median(allocs), 40000))
    print("%-36s %12s %12s  %s" % ("operation (median of %d)" % args.rounds, "ns/op", "target ns", "met"))
    for name, ns, target in rows:
        print("%-36s %12.0f %12d  %s" % (name, ns, target, "yes" if ns <= target else "NO"))


if __name__ == "__main__":
    main()
