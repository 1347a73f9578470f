"""Ours vs coturn under the same hostile flood (the flood test's traffic).

    python -m benchmarks.bench_flood [--hostile 200000] [--duration 25] [--runs 1]

Each server (ours with the batched UDP reader, ours with ``--udp-io python``,
coturn), started by the benchmark on loopback, gets 200,000 hostile
datagrams from 50 sockets (garbage, unauthenticated and forged-nonce
Allocates, ChannelData on unbound channels, Send indications to unpermitted
peers) paced over ``--duration`` seconds, while one honest client relays
ChannelData through its allocation to an echo peer every 10 ms.  Reported:
the server's CPU per hostile datagram (so how many it can reject per
CPU-second), honest packets lost, RSS growth.  The traffic generator is
``tests/adapters/test_flood.run_flood``, the same code the CI test runs.
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks._procs import Server, machine_facts
from tests.adapters.test_flood import run_flood


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostile", type=int, default=200_000)
    parser.add_argument("--duration", type=float, default=25.0)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for kind, low in (("ours", 22000), ("ours-python", 24000), ("coturn", 23000)):
        results = []
        for _ in range(args.runs):
            with Server(kind, low, low + 199) as server:
                results.append(run_flood(server.address, server.pid, (server.username, server.password), args.hostile, args.duration))
        us = statistics.median(r.cpu_seconds / r.hostile * 1e6 for r in results)
        lost = sum(r.honest_sent - r.honest_back for r in results)
        sent = sum(r.honest_sent for r in results)
        rss = max(r.rss_growth_mib for r in results)
        rows.append((kind, us, 1e6 / us, sent, lost, rss))
    print()
    print(machine_facts())
    print("| server | hostile datagrams | CPU µs per hostile datagram | rejected per CPU-second | honest sent | honest lost | RSS growth MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, us, per_second, sent, lost, rss in rows:
        print("| %s | %d | %.1f | %.0f | %d | %d | %.1f |" % (kind, args.hostile, us, per_second, sent, lost, rss))
    for row in rows[:2]:
        print("ratio %s/coturn CPU per hostile datagram: %.2f" % (row[0], row[1] / rows[2][1]))


if __name__ == "__main__":
    main()
