"""Many allocations at once, ours vs coturn: Allocate rate, memory per allocation, release.

    python -m benchmarks.bench_scale --allocations 10000      # ~1-2 minutes; updates benchmarks/README.md

For each server (ours, then coturn, in the same run, each started here on
loopback with an allocation port range of ``--lowest-port``..``--highest-port``,
below the kernel's ephemeral range so that the client sockets never take a
relay port):

1. ``--allocations`` client UDP sockets (one 5-tuple per allocation), each
   doing a full authenticated Allocate: unsigned request -> 401 with a nonce
   -> signed request -> success.  ``--window`` allocations are in progress at
   a time (pipelined, from as many sockets); a request unanswered for
   ``--rto`` seconds is retransmitted with the same transaction id.  The rate
   is successful Allocates / (time of the last success - time of the first
   request).
2. Hold: wait ``--settle`` seconds, read the server's RSS (VmRSS) and open
   descriptors; RSS per allocation = (RSS now - RSS before the first
   Allocate) / allocations.  A sample of allocations is refreshed to show
   they are alive.
3. Release: Refresh with LIFETIME 0 on every allocation (pipelined the same
   way), wait ``--settle`` seconds, read RSS again.

Everything is bounded by count and by ``--phase-timeout``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import resource
import select
import shlex
import socket
import struct
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from benchmarks import _turnclient as T
from benchmarks._procs import Server, Variant, cpu_ns, descendants, machine_facts, parse_variants, self_cpu_ns, thread_count
from benchmarks.bench_relay import CLK_TCK, draw_charts, global_cpu_ticks, update_readme, wait_for_quiet, write_json

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")

# Per-socket states.
IDLE, WAIT_NONCE, WAIT_SIGNED, DONE, FAILED = range(5)


def raise_nofile(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def source_ip(k: int) -> str:
    """The ``k``-th client address in 127.1.0.0/16 (all of 127/8 is loopback on Linux)."""
    return "127.%d.%d.%d" % (1 + k // 62500, (k // 250) % 250, k % 250 + 1)


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


class Swarm:
    """``n`` client sockets driving one TURN request type each, pipelined."""

    def __init__(self, server: Server, n: int, window: int, rto: float, tries: int, per_ip: int) -> None:
        self.server = server
        self.n = n
        self.window = window
        self.rto = rto
        self.tries = tries
        self.socks: List[socket.socket] = []
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind((source_ip(i // per_ip), 0))
            s.connect(server.address)
            self.socks.append(s)
        self.fd_index = {s.fileno(): i for i, s in enumerate(self.socks)}
        self.ep = select.epoll()
        for s in self.socks:
            self.ep.register(s.fileno(), select.EPOLLIN)
        self.username = server.username
        self.password = server.password
        self.realm: Optional[bytes] = None
        self.key: Optional[bytes] = None
        self.nonce: List[Optional[bytes]] = [None] * n
        self.relayed: List[Optional[Tuple[str, int]]] = [None] * n

    def close(self) -> None:
        self.ep.close()
        for s in self.socks:
            s.close()

    def _key(self, realm: bytes) -> bytes:
        if self.key is None or realm != self.realm:
            self.realm = realm
            self.key = T.long_term_key(self.username, realm.decode("utf-8"), self.password)
        return self.key

    def run(self, method: int, indices: List[int], timeout: float, attrs: T.Attrs) -> Dict[str, Any]:
        """One signed request of ``method`` per socket in ``indices``; the 401/438 dance included."""
        state = [IDLE] * self.n
        tid: List[bytes] = [b""] * self.n
        msg: List[bytes] = [b""] * self.n
        sent_at = [0.0] * self.n
        tries = [0] * self.n
        errors: Dict[str, int] = {}
        todo = list(reversed(indices))
        outstanding: Dict[int, None] = {}
        ok = 0
        retransmits = 0
        send_errors = 0
        first = last = 0.0
        start = time.monotonic()
        deadline = start + timeout
        socks = self.socks
        parse = T.parse
        is_allocate = method == T.ALLOCATE
        success_type = T.msg_type(method, 2)
        error_type = T.msg_type(method, 3)
        last_scan = start

        def send(i: int, now: float) -> None:
            nonlocal send_errors
            sent_at[i] = now
            tries[i] += 1
            try:
                socks[i].send(msg[i])
            except OSError:
                send_errors += 1

        def signed(i: int) -> bytes:
            tid[i] = os.urandom(12)
            assert self.key is not None and self.realm is not None
            return T.signed_request(method, tid[i], attrs, self.username, self.realm, self.nonce[i] or b"", self.key)

        def finish(i: int, st: int, why: Optional[str] = None) -> None:
            state[i] = st
            outstanding.pop(i, None)
            if why is not None:
                errors[why] = errors.get(why, 0) + 1

        while (todo or outstanding) and time.monotonic() < deadline:
            now = time.monotonic()
            while todo and len(outstanding) < self.window:
                i = todo.pop()
                tries[i] = 0
                if self.nonce[i] is None or self.key is None:
                    tid[i] = os.urandom(12)
                    msg[i] = T.encode(T.msg_type(method, 0), tid[i], attrs)
                    state[i] = WAIT_NONCE
                else:
                    msg[i] = signed(i)
                    state[i] = WAIT_SIGNED
                outstanding[i] = None
                if not first:
                    first = now
                send(i, now)
            if now - last_scan >= 0.05:
                last_scan = now
                for i in list(outstanding):
                    if now - sent_at[i] >= self.rto * (1 << min(tries[i] - 1, 4)):
                        if tries[i] >= self.tries:
                            finish(i, FAILED, "timeout")
                        else:
                            retransmits += 1
                            send(i, now)
            for fd, _ev in self.ep.poll(0.01, 1024):
                i = self.fd_index[fd]
                sock = socks[i]
                while True:
                    try:
                        data = sock.recv(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    except ConnectionRefusedError:
                        finish(i, FAILED, "refused")
                        break
                    parsed = parse(data)
                    if parsed is None or parsed[1] != tid[i] or i not in outstanding:
                        continue
                    mtype, _tid, rattrs = parsed
                    now = time.monotonic()
                    if mtype == success_type:
                        finish(i, DONE)
                        ok += 1
                        last = now
                        if is_allocate and T.XOR_RELAYED_ADDRESS in rattrs:
                            self.relayed[i] = T.decode_xor_address(rattrs[T.XOR_RELAYED_ADDRESS])
                    elif mtype == error_type:
                        code = T.error_code(rattrs)
                        if code in (401, 438) and T.NONCE in rattrs and (state[i] == WAIT_NONCE or code == 438):
                            self.nonce[i] = rattrs[T.NONCE]
                            self._key(rattrs.get(T.REALM, self.realm or b""))
                            msg[i] = signed(i)
                            state[i] = WAIT_SIGNED
                            tries[i] = 0
                            send(i, now)
                        elif code == 437 and method == T.REFRESH:
                            finish(i, DONE, "437 (already gone)")
                            ok += 1
                            last = now
                        else:
                            finish(i, FAILED, "error %s" % code)
        for i in list(outstanding):
            finish(i, FAILED, "phase timeout")
        for i in todo:
            errors["not sent (phase timeout)"] = errors.get("not sent (phase timeout)", 0) + 1
        elapsed = (last - first) if ok else 0.0
        return {
            "ok": ok,
            "elapsed": elapsed,
            "rate": ok / elapsed if elapsed > 0 else 0.0,
            "errors": errors,
            "retransmits": retransmits,
            "send_errors": send_errors,
            "done": [i for i in indices if state[i] == DONE],
        }


def one_cycle(server: Server, args: argparse.Namespace) -> Dict[str, Any]:
    """Allocate ``--allocations``, hold, release; RSS and rates of this cycle."""
    pid = server.pid
    rss0, fds0 = server.rss_kb(), open_fds(pid)
    swarm = Swarm(server, args.allocations, args.window, args.rto, args.tries, args.clients_per_ip)
    try:
        if args.noise_limit > 0:
            wait_for_quiet(args.noise_limit, 20.0)
        c0, me0, g0 = server.cpu_ns(), self_cpu_ns(), global_cpu_ticks()[0]
        top0 = cpu_ns(pid)  # the process we started alone: with --workers N > 1, the supervisor
        t_alloc0 = time.monotonic()
        alloc = swarm.run(T.ALLOCATE, list(range(args.allocations)), args.phase_timeout,
                          [(T.REQUESTED_TRANSPORT, T.REQUESTED_UDP), (T.LIFETIME, struct.pack(">I", 3600))])  # fmt: skip
        alloc_cpu, alloc_me = (server.cpu_ns() - c0) / 1e9, (self_cpu_ns() - me0) / 1e9
        alloc_top = (cpu_ns(pid) - top0) / 1e9
        t_alloc = time.monotonic() - t_alloc0
        other = max(0.0, (global_cpu_ticks()[0] - g0) / CLK_TCK - alloc_cpu - alloc_me)
        ports = {a[1] for a in swarm.relayed if a is not None}
        time.sleep(args.settle)
        rss1, fds1 = server.rss_kb(), open_fds(pid)
        live = alloc["done"]
        sample = random.Random(1).sample(live, min(args.check_sample, len(live)))
        check = swarm.run(T.REFRESH, sample, 30.0, [(T.LIFETIME, struct.pack(">I", 3600))])
        c1 = server.cpu_ns()
        rel = swarm.run(T.REFRESH, live, args.phase_timeout, [(T.LIFETIME, struct.pack(">I", 0))])
        rel_cpu = (server.cpu_ns() - c1) / 1e9
    finally:
        swarm.close()
    time.sleep(args.settle)
    rss2, fds2 = server.rss_kb(), open_fds(pid)
    n = alloc["ok"]
    el = alloc["elapsed"]
    return {
        "allocated": n,
        "distinct_ports": len(ports),
        "alloc_rate": alloc["rate"],
        "alloc_elapsed": el,
        "alloc_errors": alloc["errors"],
        "alloc_retransmits": alloc["retransmits"],
        "alloc_server_cpu_us": alloc_cpu * 1e6 / n if n else float("nan"),
        "alloc_server_cores": alloc_cpu / el if el else float("nan"),
        "alloc_top_process_cpu_us": alloc_top * 1e6 / n if n else float("nan"),
        "child_processes": len(descendants(pid)),
        "alloc_client_cores": alloc_me / el if el else float("nan"),
        "other_cores": other / t_alloc,
        "check_ok": check["ok"],
        "check_n": len(sample),
        "rss_before_kb": rss0,
        "rss_held_kb": rss1,
        "rss_released_kb": rss2,
        "kb_per_alloc": (rss1 - rss0) / n if n else float("nan"),
        "released": rel["ok"],
        "release_rate": rel["rate"],
        "release_errors": rel["errors"],
        "release_server_cpu_us": rel_cpu * 1e6 / rel["ok"] if rel["ok"] else float("nan"),
        "fds": (fds0, fds1, fds2),
    }


def bench_server(variant: "Variant", args: argparse.Namespace) -> Dict[str, Any]:
    """A fresh server of ``variant``, ``--cycles`` allocate/hold/release cycles on it."""
    server = variant.server(args.lowest_port, args.highest_port)
    kind = variant.label
    try:
        server.start()
        time.sleep(0.5)
        cycles = []
        for c in range(args.cycles):
            r = one_cycle(server, args)
            cycles.append(r)
            print("%-6s cycle %d: allocated %d/%d at %.0f/s (%.1f s; server %.0f us CPU per Allocate, %.2f cores; "
                  "client %.2f cores, other processes %.2f cores), RSS %d -> %d kB (%.1f kB/allocation), released %d at %.0f/s "
                  "(server %.0f us CPU per Refresh LIFETIME 0) -> RSS %d kB, fds %s, errors %s %s, %d retransmits"
                  % (kind, c + 1, r["allocated"], args.allocations, r["alloc_rate"], r["alloc_elapsed"],
                     r["alloc_server_cpu_us"], r["alloc_server_cores"], r["alloc_client_cores"], r["other_cores"], r["rss_before_kb"],
                     r["rss_held_kb"], r["kb_per_alloc"], r["released"], r["release_rate"], r["release_server_cpu_us"],
                     r["rss_released_kb"], r["fds"], r["alloc_errors"], r["release_errors"], r["alloc_retransmits"]))  # fmt: skip
        return {
            "server": kind,
            "threads": thread_count(server.pid) + sum(thread_count(c) for c in descendants(server.pid)),
            "requested": args.allocations,
            "cycles": cycles,
            "alive": server.alive(),
            "command": server.command_line(),
        }
    finally:
        server.stop()


def cpu_ratio(ours: Dict[str, Any], coturn: Dict[str, Any], key: str) -> float:
    """ours / coturn of a per-operation CPU figure of one cycle (NaN if either is missing)."""
    a, b = ours.get(key, float("nan")), coturn.get(key, float("nan"))
    return a / b if b and b == b and a == a else float("nan")


def ips_text(args: argparse.Namespace) -> str:
    ips = -(-args.allocations // args.clients_per_ip)
    if ips == 1:
        return "one source address"
    return "%d source addresses in 127.1.0.0/16 (%d per address)" % (ips, args.clients_per_ip)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(results: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per server label, medians over runs of cycle 1's figures."""
    import statistics

    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["server"], []).append(r["cycles"][0])
    out: Dict[str, Dict[str, Any]] = {}
    for label, cs in by.items():
        m: Dict[str, Any] = {"runs": len(cs)}
        for key in ("alloc_rate", "alloc_server_cpu_us", "kb_per_alloc", "release_server_cpu_us", "release_rate",
                    "alloc_top_process_cpu_us"):
            m[key] = statistics.median(c[key] for c in cs)
            m[key + "_samples"] = [c[key] for c in cs]
        out[label] = m
    return out


def render(results: List[Dict[str, Any]], args: argparse.Namespace, commands: List[str]) -> str:
    out = []
    out.append("Run: `python -m benchmarks.bench_scale %s` on %s UTC; %s." % (
        shlex.join(sys.argv[1:]), datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), machine_facts()))  # fmt: skip
    out.append("")
    out.append("%d client sockets (one 5-tuple per allocation) on %s, %d allocations in progress at a time; "
               "each Allocate is the full exchange (unsigned -> 401 + nonce -> signed -> success), LIFETIME 3600. "
               "Relay port range %d-%d. RSS = VmRSS; per allocation = (RSS holding them - RSS before) / allocations; "
               "then Refresh LIFETIME 0 on all. %d cycles of allocate/hold/release on the same server process "
               "(the second shows whether released memory is reused)."
               % (args.allocations, ips_text(args), args.window, args.lowest_port, args.highest_port, args.cycles))  # fmt: skip
    out.append("")
    out.append("| server | run | cycle | allocated | Allocates/s | server CPU µs/Allocate | server cores | client cores | other cores | RSS before MiB | RSS holding MiB | kB/allocation | RSS after release MiB | releases/s | server CPU µs/release | fds before/holding/after |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        for k, c in enumerate(r["cycles"]):
            out.append("| %s | %d | %d | %d/%d | **%.0f** | %.0f | %.2f | %.2f | %.2f | %.1f | %.1f | **%.1f** | %.1f | %.0f | %.0f | %d/%d/%d |" % (
                r["server"], r.get("run", 0) + 1, k + 1, c["allocated"], r["requested"], c["alloc_rate"], c["alloc_server_cpu_us"],
                c["alloc_server_cores"], c["alloc_client_cores"], c["other_cores"], c["rss_before_kb"] / 1024, c["rss_held_kb"] / 1024,
                c["kb_per_alloc"], c["rss_released_kb"] / 1024, c["release_rate"], c["release_server_cpu_us"], *c["fds"]))  # fmt: skip
    out.append("")
    summary = summarize(results)
    out.append("Medians over runs (cycle 1 of each run):")
    out.append("")
    out.append("| server | runs | Allocates/s | server CPU µs/Allocate | of which the started process (a supervisor) | kB/allocation | server CPU µs/release (Refresh LIFETIME 0) |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for label, m in summary.items():
        out.append("| %s | %d | **%.0f** | %.0f | %.0f | %.1f | %.0f |" % (
            label, m["runs"], m["alloc_rate"], m["alloc_server_cpu_us"], m["alloc_top_process_cpu_us"], m["kb_per_alloc"],
            m["release_server_cpu_us"]))  # fmt: skip
    out.append("")
    labels = list(summary)
    bases = [b for b in ("coturn", labels[0] if labels else "") if b in summary]
    for base in dict.fromkeys(bases):
        for label in labels:
            if label == base or (base != "coturn" and label == "coturn"):
                continue
            o, c = summary[label], summary[base]
            out.append("- %s/%s: Allocates/s **%.2f×**, CPU per Allocate %.2f×, kB per allocation %.2f×, CPU per release %.2f×." % (
                label, base, ratio(o["alloc_rate"], c["alloc_rate"]), ratio(o["alloc_server_cpu_us"], c["alloc_server_cpu_us"]),
                ratio(o["kb_per_alloc"], c["kb_per_alloc"]), ratio(o["release_server_cpu_us"], c["release_server_cpu_us"])))  # fmt: skip
    out.append("")
    for r in results:
        c0, cl = r["cycles"][0], r["cycles"][-1]
        extra = []
        for k, c in enumerate(r["cycles"]):
            if c["alloc_errors"]:
                extra.append("cycle %d allocate errors %s" % (k + 1, c["alloc_errors"]))
            if c["release_errors"]:
                extra.append("cycle %d release: %s" % (k + 1, c["release_errors"]))
        grow = (cl["rss_released_kb"] - c0["rss_released_kb"]) / 1024
        out.append("- %s: %d distinct relay ports; %d retransmitted Allocates; %d/%d sampled allocations refreshed while "
                   "held; release returned %.1f of %.1f MiB; RSS after the last release %+.1f MiB vs after the first%s; "
                   "%d threads." % (
                       r["server"], c0["distinct_ports"], c0["alloc_retransmits"], c0["check_ok"], c0["check_n"],
                       (c0["rss_held_kb"] - c0["rss_released_kb"]) / 1024, (c0["rss_held_kb"] - c0["rss_before_kb"]) / 1024,
                       grow, ("; " + "; ".join(extra)) if extra else "", r["threads"]))  # fmt: skip
    out.append("")
    out.append("Server command lines (ports and the password vary per run):")
    out.append("")
    out.append("```")
    out.extend(commands)
    out.append("```")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--allocations", type=int, default=10000)
    p.add_argument("--window", type=int, default=256, help="allocations in progress at a time")
    p.add_argument("--lowest-port", type=int, default=15000)
    p.add_argument("--highest-port", type=int, default=29999)
    p.add_argument("--clients-per-ip", type=int, default=1,
                   help="client sockets per source address (127.1.x.y); ours rate-limits 401s per source IP")
    p.add_argument("--rto", type=float, default=1.0, help="first retransmission timeout, doubled each time")
    p.add_argument("--tries", type=int, default=4)
    p.add_argument("--phase-timeout", type=float, default=120.0)
    p.add_argument("--settle", type=float, default=2.0, help="seconds before reading RSS")
    p.add_argument("--cycles", type=int, default=2, help="allocate/hold/release cycles per server")
    p.add_argument("--noise-limit", type=float, default=0.15, help="wait (bounded) until other processes use less CPU")
    p.add_argument("--check-sample", type=int, default=200)
    p.add_argument("--servers", nargs="+", default=["ours", "coturn"], choices=("ours", "coturn"))
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--variant", dest="variant_specs", action="append", default=[], metavar="SPEC",
                   help="a server to measure, repeatable, instead of --servers: LABEL=BASE[@ROOT] [ARG ...] "
                        "(see bench_relay), e.g. --variant 'w1=ours --workers 1' --variant 'w2=ours --workers 2'")
    p.add_argument("--runs", type=int, default=1,
                   help="runs, each a fresh server per variant, interleaved between the variants; medians of cycle 1")
    p.add_argument("--json", help="write the results here as JSON (default with --variant: "
                                  "benchmarks/results/bench_scale_variants.json)")
    p.add_argument("--figures", default=os.path.join(os.path.dirname(README), "figures"),
                   help="draw the charts into this directory (when matplotlib is installed); 'none' for no charts")
    args = p.parse_args(argv)
    try:
        variants = parse_variants(args.variant_specs or list(args.servers))
    except ValueError as exc:
        p.error(str(exc))

    limit = raise_nofile(args.allocations + 100)
    if limit < args.allocations + 50:
        print("RLIMIT_NOFILE is %d: too low for %d client sockets" % (limit, args.allocations), file=sys.stderr)
        return 1
    if args.highest_port - args.lowest_port + 1 < args.allocations:
        print("the port range is smaller than --allocations", file=sys.stderr)
        return 1
    print("machine:", machine_facts())
    results = []
    commands = []
    for run in range(args.runs):
        for variant in variants:
            r = bench_server(variant, args)
            r["run"] = run
            results.append(r)
            command = r.pop("command", "")
            if run == 0:
                commands.append(command)
    body = render(results, args, commands)
    print()
    print(body)
    section = "bench_scale_variants" if args.variant_specs else "bench_scale"
    if not args.no_readme:
        update_readme(section, body)
        print("\nwrote", README)
    json_path = args.json
    if json_path is None and args.variant_specs:
        json_path = os.path.join(os.path.dirname(README), "results", section + ".json")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        write_json(json_path, {
            "benchmark": "bench_scale", "section": section, "allocations": args.allocations, "window": args.window,
            "runs": args.runs, "servers": [v.label for v in variants], "variants": [v.spec for v in variants],
            "summary": summarize(results), "results": results, "commands": commands,
        })  # fmt: skip
        if args.figures != "none":
            draw_charts(json_path, args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
