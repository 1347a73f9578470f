"""Issue 14 items 2 and 3 measured on a real relay process (not timed tests).

    python -m benchmarks.bench_shell_limits                # this checkout, 3 runs of each
    python -m benchmarks.bench_shell_limits --root DIR     # another export (e.g. `git archive` of an older commit)

* ``http``: 320 connections from 20 loopback sources (127.0.0.10-29) each send
  a request head one header line per second (slowloris); then ``/healthz``
  from 10 other sources: how many are answered 200 and how fast.
* ``stream``: 1,024 TCP connections from 8 sources each send a 65,000-byte
  partial ChannelData frame; the relay's RSS before and after, and the
  connections it keeps.

Each run starts its own ``twistd firezone-relay`` on loopback with default
limits and kills it afterwards.  Loopback has all of 127/8, so the sources
are real distinct addresses.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Relay:
    def __init__(self, root: str) -> None:
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="relay-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "firezone-relay", "--listen-port=%d" % self.port, "--lowest-port=40000", "--highest-port=40100",
             "--public-ip4-addr=203.0.113.1", "--bind-ip4-addr=127.0.0.1", "--health-check-addr=127.0.0.1:0",
             "--auth-secret=" + "a" * 64, "--socket-buffer=0"],
            cwd=root, env=dict(os.environ, PYTHONPATH=root, PYTHONUNBUFFERED="1"),
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"HTTP health and metrics on 127\.0\.0\.1:(\d+)", self.output())
            if found and "TURN over TCP on" in self.output():
                self.http_port = int(found.group(1))
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the relay did not start:\n" + self.output()[-2000:])
            time.sleep(0.1)
        time.sleep(0.5)

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def rss(self) -> int:
        with open("/proc/%d/status" % self.proc.pid) as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024  # type: ignore[union-attr]

    def metric(self, prefix: str) -> Dict[str, float]:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.http_port, timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(prefix):
                name, _, number = line.rpartition(" ")
                out[name] = float(number)
        return out

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.unlink(self.log.name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_http(root: str) -> Tuple[int, List[float], List[str]]:
    relay = Relay(root)
    socks: List[socket.socket] = []
    stop = threading.Event()
    try:
        for source in range(10, 30):
            for _ in range(16):
                s = socket.socket()
                s.bind(("127.0.0.%d" % source, 0))
                try:
                    s.connect(("127.0.0.1", relay.http_port))
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    socks.append(s)
                except OSError:
                    s.close()

        def drip() -> None:
            i = 0
            while not stop.is_set():
                for s in socks:
                    try:
                        s.send(b"X-%d: y\r\n" % i)
                    except OSError:
                        pass
                i += 1
                stop.wait(1.0)

        threading.Thread(target=drip, daemon=True).start()
        time.sleep(1.5)
        latencies: List[float] = []
        outcomes: List[str] = []
        for k in range(10):
            started = time.monotonic()
            try:
                c = http.client.HTTPConnection("127.0.0.1", relay.http_port, timeout=5,
                                               source_address=("127.0.0.%d" % (200 + k), 0))  # fmt: skip
                c.request("GET", "/healthz")
                r = c.getresponse()
                r.read()
                c.close()
                outcomes.append(str(r.status))
                if r.status == 200:
                    latencies.append((time.monotonic() - started) * 1000)
            except OSError as exc:
                outcomes.append(type(exc).__name__)
            time.sleep(0.3)
        return len(latencies), latencies, outcomes
    finally:
        stop.set()
        for s in socks:
            s.close()
        relay.stop()


def run_stream(root: str, connections: int = 1024) -> Tuple[float, int, Dict[str, float]]:
    relay = Relay(root)
    socks: List[socket.socket] = []
    try:
        before = relay.rss()
        partial = b"\x40\x01\xfd\xe8" + b"x" * 64996  # announces 65,000 bytes: 65,000 of 65,004 sent
        for i in range(connections):
            s = socket.socket()
            s.bind(("127.0.0.%d" % (2 + i % 8), 0))
            s.connect(("127.0.0.1", relay.port))
            s.sendall(partial)
            socks.append(s)
        time.sleep(3)
        after = relay.rss()
        stats = relay.metric("relay_stream_")
        kept = int(stats.get('relay_stream_connections{transport="tcp"}', 0))
        return (after - before) / 2**20, kept, stats
    finally:
        for s in socks:
            s.close()
        relay.stop()


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=ROOT, help="checkout or export to run (default: this one)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    print("root: %s; load average %s" % (args.root, os.getloadavg()))
    for n in range(args.runs):
        answered, latencies, outcomes = run_http(args.root)
        print("http run %d: /healthz 200 for %d/10 under 320 slow connections; latency median %s ms, max %s ms; %s" % (
            n + 1, answered, "%.1f" % statistics.median(latencies) if latencies else "-",
            "%.1f" % max(latencies) if latencies else "-", sorted(set(outcomes))))  # fmt: skip
    for n in range(args.runs):
        delta, kept, stats = run_stream(args.root)
        closed = stats.get('relay_stream_connections_closed_total{reason="buffer_budget",transport="tcp"}', 0)
        print("stream run %d: 1,024 partial 65,000-byte frames: RSS +%.1f MiB, %d connections kept, %d closed "
              "buffer_budget, relay_stream_buffered_bytes %s" % (
                  n + 1, delta, kept, closed, stats.get("relay_stream_buffered_bytes", "n/a")))  # fmt: skip


if __name__ == "__main__":
    main()
