"""Issue 19's table in one run: ours vs coturn on every path, interleaved, medians.

    python -m benchmarks.bench_table                 # ~8 minutes: 5 runs; JSON, README section, charts
    python -m benchmarks.bench_table --quick         # ~1 minute smoke run (tiny counts, 1 run)

Rows (each measured the way the benchmark named in brackets does, with its code):

1. authenticated Allocate, server CPU per Allocate: 401 then signed, 64 in
   flight, one source address per client socket (``bench_scale.one_cycle``);
2. Refresh LIFETIME 0 (deallocation), server CPU each: the release phase of
   the same cycle;
3. TLS, 1 ChannelData in flight, round trips/s (``bench_stream.closed_loop``);
4. hostile datagrams, server CPU each: the flood test's mix, paced at the
   flood test's rate of 8,000/s, on a fresh server (``bench_flood``);
5. paced many-client UDP, ``turnutils_uclient -m 100``, server CPU per packet,
   on a fresh server (``bench_relay.uclient_run``);
6. UDP closed loop, 16 allocations × 8 in flight, server CPU per round trip
   (``bench_relay --allocations 16 --inflight 8``, C generator);
7. UDP closed loop, 1 allocation × 32 in flight, 1200 B, round trips/s
   (``bench_relay``, C generator).

Every run measures every row on every server before the next run starts
(run 1: row 1 ours, row 1 coturn, row 2 ...), so slow drifts of a shared
machine hit both servers alike; medians over ``--runs``.  CPU is the server
process's and its child processes' (``/proc/<pid>/task/*/schedstat``).
Other processes' CPU during each measurement ("other cores", from
``/proc/stat``) is recorded; the machine this runs on may be shared.

The servers are ``_procs.Server``: ours with the batched UDP reader, coturn
with its defaults (one relay thread per core).  ``--variant`` (as in
bench_relay) measures other configurations, e.g. ours with ``--workers 2``;
ratios are each server against the last coturn variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from benchmarks import _procs
from benchmarks._procs import Server, Variant, machine_facts, parse_variants
from benchmarks.bench_relay import (
    CLK_TCK,
    Target,
    build_generator,
    draw_charts,
    global_cpu_ticks,
    one_run,
    update_readme,
    uclient_run,
    wait_for_quiet,
)

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")

#: (key, path as in issue 19's table, unit, "lower" or "higher" is better)
ROWS = [
    ("allocate_cpu", "authenticated Allocate, CPU per Allocate (401 then signed, 64 in flight, one source address each)",
     "µs", "lower"),
    ("release_cpu", "Refresh LIFETIME 0 (deallocation), CPU each", "µs", "lower"),
    ("tls_rate", "TLS, 1 in flight, round trips/s (bench_stream)", "round trips/s", "higher"),
    ("hostile_cpu", "hostile datagrams, CPU each (bench_flood's mix)", "µs", "lower"),
    ("uclient_cpu", "paced many-client UDP (`turnutils_uclient -m 100`), CPU per packet", "µs", "lower"),
    ("udp_many_cpu", "UDP closed loop, 16 allocations × 8 in flight, CPU per round trip", "µs", "lower"),
    ("udp_one_rate", "UDP closed loop, 1 allocation × 32 in flight, round trips/s (1200 B)", "round trips/s", "higher"),
]  # fmt: skip
SHORT = {
    "allocate_cpu": "Allocate CPU",
    "release_cpu": "Refresh 0 CPU",
    "tls_rate": "TLS 1-in-flight rate",
    "hostile_cpu": "hostile datagram CPU",
    "uclient_cpu": "uclient -m 100 CPU/packet",
    "udp_many_cpu": "UDP 16×8 CPU/round trip",
    "udp_one_rate": "UDP 1×32 rate (1200 B)",
}


def other_cores(g0: int, t0: float, server_cpu_s: float, own_cpu_s: float) -> float:
    """Cores used by processes other than the server and this benchmark since ``g0``/``t0``."""
    wall = max(time.monotonic() - t0, 1e-6)
    return max(0.0, (global_cpu_ticks()[0] - g0) / CLK_TCK - server_cpu_s - own_cpu_s) / wall


class Session:
    """The long-lived servers of one variant: UDP (rows 1, 2, 6, 7) and UDP+TLS (row 3)."""

    def __init__(self, index: int, variant: Variant, args: argparse.Namespace, cert: Path, key: Path) -> None:
        from benchmarks.bench_hostile import HostileServer

        self.variant = variant
        self.index = index
        self.udp = variant.server(10000 + 3000 * index, 12999 + 3000 * index)
        self.tls = HostileServer(variant.kind, 19000 + 200 * index, 19199 + 200 * index, cert, key, variant.extra)
        self.tls.label, self.tls.root = variant.label + "-tls", variant.root
        self.many: Optional[Target] = None
        self.one: Optional[Target] = None

    def start(self, args: argparse.Namespace) -> List[str]:
        self.udp.start()
        self.tls.start()
        self.many = Target(self.udp, args.many_allocations)
        self.one = Target(self.udp, 1)
        return [self.udp.command_line(), self.tls.command_line()]

    def stop(self) -> None:
        for t in (self.many, self.one):
            if t is not None:
                try:
                    t.close()
                except Exception:
                    pass
        self.udp.stop()
        self.tls.stop()


def scale_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        allocations=args.alloc_count, window=64, rto=1.0, tries=4, clients_per_ip=1,
        phase_timeout=60.0, settle=args.settle, noise_limit=0.0, check_sample=min(50, args.alloc_count),
    )  # fmt: skip


def loop_args(args: argparse.Namespace, inflight: int) -> argparse.Namespace:
    return argparse.Namespace(inflight=inflight, warmup=args.warmup, measure=args.measure, timeout_ms=200, pin=False)


def measure_alloc(session: Session, args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    from benchmarks.bench_scale import one_cycle

    g0, t0 = global_cpu_ticks()[0], time.monotonic()
    me0 = _procs.self_cpu_ns()
    c0 = session.udp.cpu_ns()
    r = one_cycle(session.udp, scale_args(args))
    other = other_cores(g0, t0, (session.udp.cpu_ns() - c0) / 1e9, (_procs.self_cpu_ns() - me0) / 1e9)
    if r["allocated"] < args.alloc_count or r["released"] < r["allocated"]:
        raise RuntimeError("%s: allocated %d/%d, released %d (errors %s %s)" % (
            session.variant.label, r["allocated"], args.alloc_count, r["released"], r["alloc_errors"],
            r["release_errors"]))  # fmt: skip
    return {
        "allocate_cpu": {"value": r["alloc_server_cpu_us"], "other_cores": other, "rate": r["alloc_rate"]},
        "release_cpu": {"value": r["release_server_cpu_us"], "other_cores": other, "rate": r["release_rate"]},
    }


def measure_tls(session: Session, args: argparse.Namespace) -> Dict[str, float]:
    from benchmarks.bench_stream import closed_loop

    g0, t0, me0 = global_cpu_ticks()[0], time.monotonic(), _procs.self_cpu_ns()
    c0 = session.tls.cpu_ns()
    r = closed_loop(session.tls, True, 100, 1, args.warmup, args.measure, avoid=(10000, 19999))  # type: ignore[arg-type]
    other = other_cores(g0, t0, (session.tls.cpu_ns() - c0) / 1e9, (_procs.self_cpu_ns() - me0) / 1e9)
    return {"value": r["rt_per_s"], "cpu_us_per_rt": r["server_cpu_us_per_rt"], "other_cores": other}


def measure_flood(index: int, variant: Variant, args: argparse.Namespace) -> Dict[str, float]:
    from tests.adapters.test_flood import run_flood

    low = 19600 + 100 * index
    with variant.server(low, low + 99) as server:
        g0, t0, me0 = global_cpu_ticks()[0], time.monotonic(), _procs.self_cpu_ns()
        c0 = server.cpu_ns()
        r = run_flood(server.address, server.pid, (server.username, server.password), args.hostile,
                      args.hostile / args.hostile_rate)  # fmt: skip
        cpu = (server.cpu_ns() - c0) / 1e9
        other = other_cores(g0, t0, cpu, (_procs.self_cpu_ns() - me0) / 1e9)
    return {"value": cpu * 1e6 / r.hostile, "honest_lost": r.honest_sent - r.honest_back, "other_cores": other}


def measure_uclient(index: int, variant: Variant, args: argparse.Namespace) -> Dict[str, float]:
    ns = argparse.Namespace(uclient_clients=100, uclient_messages=args.uclient_messages, uclient_interval=5,
                            uclient_length=100, uclient_timeout=120.0)  # fmt: skip
    low = 24000 + 2000 * index
    for attempt in range(3):
        try:
            u = uclient_run(variant.label, ns, variant.server(low, low + 1999))
            break
        except RuntimeError as exc:  # turnutils_uclient gives up now and then on a loaded machine
            if attempt == 2:
                raise
            print("  %s: turnutils_uclient failed, once more: %s" % (variant.label, str(exc).splitlines()[-1]))
    if u["received"] == 0:
        raise RuntimeError("%s: turnutils_uclient relayed nothing" % variant.label)
    return {"value": u["cpu_us_per_pkt"], "lost": u["lost"], "other_cores": u["other_cores"], "argv": u["argv"]}


def measure_loop(target: Target, generator: str, args: argparse.Namespace, inflight: int, size: int,
                 key: str) -> Dict[str, float]:  # fmt: skip
    target.refresh()
    r = one_run(target, generator, loop_args(args, inflight), size)
    if not r["rt_per_s"]:
        raise RuntimeError("%s: no round trips" % target.server.label)
    return {
        "value": r["cpu_us_per_rt"] if key.endswith("cpu") else r["rt_per_s"],
        "rt_per_s": r["rt_per_s"], "cpu_us_per_rt": r["cpu_us_per_rt"], "lost": r["lost"],
        "other_cores": r["other_cores"], "generator_cores": r["client_cores"],
    }  # fmt: skip


def run_all(args: argparse.Namespace, variants: List[Variant]) -> Dict[str, Any]:
    from tests.certs import make_certificate

    tmp = tempfile.mkdtemp(prefix="bench-table-")
    generator = build_generator(tmp)
    if generator is None:
        raise RuntimeError("needs a C compiler (cc or gcc) for the closed-loop load generator")
    tls_cert, tls_key = make_certificate(Path(tmp) / "tls", ips=("127.0.0.1",))
    samples: Dict[str, Dict[str, List[Dict[str, Any]]]] = {k: {v.label: [] for v in variants} for k, *_ in ROWS}
    sessions = [Session(i, v, args, tls_cert, tls_key) for i, v in enumerate(variants)]
    commands: List[str] = []
    rows = [r for r in ROWS if r[0] in args.rows]
    wanted = {r[0] for r in rows}

    def note(key: str, label: str, run: int, m: Dict[str, Any]) -> None:
        samples[key][label].append(m)
        print("  run %d %-14s %-10s %12.2f  (other cores %.2f)" % (run + 1, key, label, m["value"], m["other_cores"]))

    def quiet() -> None:
        if args.quiet_wait > 0:
            wait_for_quiet(args.noise_limit, args.quiet_wait)

    try:
        for s in sessions:
            commands.extend(s.start(args))
            print("%s: UDP pid %d, TLS pid %d" % (s.variant.label, s.udp.pid, s.tls.pid))
        for run in range(args.runs):
            print("run %d of %d" % (run + 1, args.runs))
            for key, *_ in rows:
                for s in sessions:
                    label = s.variant.label
                    quiet()
                    if key == "allocate_cpu" or (key == "release_cpu" and "allocate_cpu" not in wanted):
                        both = measure_alloc(s, args)
                        for k, m in both.items():
                            if k in wanted:
                                note(k, label, run, m)
                    elif key == "release_cpu":
                        continue  # measured with allocate_cpu
                    elif key == "tls_rate":
                        note(key, label, run, measure_tls(s, args))
                    elif key == "hostile_cpu":
                        note(key, label, run, measure_flood(s.index, s.variant, args))
                    elif key == "uclient_cpu":
                        note(key, label, run, measure_uclient(s.index, s.variant, args))
                    elif key == "udp_many_cpu":
                        assert s.many is not None
                        note(key, label, run, measure_loop(s.many, generator, args, args.many_inflight, 100, key))
                    elif key == "udp_one_rate":
                        assert s.one is not None
                        note(key, label, run, measure_loop(s.one, generator, args, 32, 1200, key))
    finally:
        for s in sessions:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    labels = [v.label for v in variants]
    coturn = [v.label for v in variants if v.is_coturn]
    base = coturn[-1] if coturn else None
    out_rows = []
    for key, title, unit, better in rows:
        values = {}
        for label in labels:
            got = samples[key][label]
            values[label] = {
                "median": statistics.median(m["value"] for m in got),
                "samples": [m["value"] for m in got],
                "other_cores": [round(m["other_cores"], 3) for m in got],
                "details": got,
            }
        ratios = {}
        if base is not None:
            for label in labels:
                if label != base and values[base]["median"]:
                    ratios[label] = values[label]["median"] / values[base]["median"]
        out_rows.append({"key": key, "title": title, "short": SHORT[key], "unit": unit, "better": better,
                         "values": values, "ratio_to": base, "ratios": ratios})  # fmt: skip
    return {
        "benchmark": "bench_table",
        "servers": labels,
        "variants": [v.spec for v in variants],
        "runs": args.runs,
        "quick": args.quick,
        "rows": out_rows,
        "commands": commands,
        "settings": {k: getattr(args, k) for k in ("alloc_count", "hostile", "hostile_rate", "uclient_messages",
                                                   "warmup", "measure", "many_allocations", "many_inflight")},
    }  # fmt: skip


def meets(row: Dict[str, Any], ratio: float) -> bool:
    return ratio <= 1.0 if row["better"] == "lower" else ratio >= 1.0


def fmt(v: float, unit: str) -> str:
    if unit == "round trips/s":
        return "%.1fk" % (v / 1000) if v >= 10000 else "%.0f" % v
    return "%.1f µs" % v if v < 100 else "%.0f µs" % v


def render(result: Dict[str, Any]) -> str:
    labels = result["servers"]
    out = ["Run: `python -m benchmarks.bench_table%s` on %s; %s." % (
        " " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "", result["when"], result["machine"])]  # fmt: skip
    out.append("")
    out.append("Every row measured on every server in each of %d runs, interleaved; medians. CPU = the server's "
               "process and its children, all threads. Target (issue 19): every row ≤ 1.0× coturn's CPU "
               "(≥ 1.0× its rate)." % result["runs"])  # fmt: skip
    out.append("")
    base = None
    for row in result["rows"]:
        base = row["ratio_to"]
    others = [lb for lb in labels if lb != base]
    out.append("| path | " + " | ".join(labels) + " | " + " | ".join("%s/%s" % (lb, base) for lb in others if base) + " |")
    out.append("|---|" + "---:|" * len(labels) + "---:|" * (len(others) if base else 0))
    for row in result["rows"]:
        cells = [fmt(row["values"][lb]["median"], row["unit"]) for lb in labels]
        rat = []
        if base:
            for lb in others:
                r = row["ratios"].get(lb)
                rat.append("**%.2f×** %s" % (r, "✓" if meets(row, r) else "✗") if r is not None else "—")
        out.append("| %s | %s | %s |" % (row["title"], " | ".join(cells), " | ".join(rat)))
    out.append("")
    noisy = max((max(v["other_cores"]) for row in result["rows"] for v in row["values"].values()), default=0.0)
    out.append("Other processes used up to %.2f of a core during a measurement (the machine may be shared; "
               "see `other_cores` in the JSON)." % noisy)  # fmt: skip
    out.append("")
    out.append("Server command lines (ports and the password vary per run; rows 4 and 5 start fresh servers "
               "with the same flags):")  # fmt: skip
    out.append("")
    out.append("```")
    out.extend(result["commands"])
    out.append("```")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=None, help="runs (default 5, with --quick 1)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 run, tiny counts, short windows")
    p.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
    p.add_argument("--variant", dest="variant_specs", action="append", default=[], metavar="SPEC",
                   help="LABEL=BASE[@ROOT] [ARG ...] as in bench_relay; default: ours and coturn")
    p.add_argument("--alloc-count", type=int, default=2000, help="Allocates (and releases) per run and server")
    p.add_argument("--hostile", type=int, default=50000, help="hostile datagrams per run and server")
    p.add_argument("--hostile-rate", type=float, default=8000.0, help="hostile datagrams per second (bench_flood's)")
    p.add_argument("--uclient-messages", type=int, default=1000, help="turnutils_uclient -n")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--measure", type=float, default=3.0)
    p.add_argument("--many-allocations", type=int, default=16)
    p.add_argument("--many-inflight", type=int, default=8)
    p.add_argument("--settle", type=float, default=0.5)
    p.add_argument("--noise-limit", type=float, default=0.15)
    p.add_argument("--quiet-wait", type=float, default=3.0, help="seconds at most to wait for a quiet machine "
                                                                 "before each measurement (0: never)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "bench_table.json"))
    p.add_argument("--figures", default=os.path.join(HERE, "figures"), help="'none' for no charts")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.quick:
        # run_flood sends at least 100 honest packets, one per 10 ms: 1.1 s of flood at the least
        args.alloc_count, args.hostile, args.uclient_messages = 64, int(1.1 * args.hostile_rate), 20
        args.warmup, args.measure, args.settle, args.quiet_wait = 0.2, 0.5, 0.1, 0.0
    try:
        variants = parse_variants(args.variant_specs or ["ours", "coturn"])
    except ValueError as exc:
        p.error(str(exc))
    for tool in ("turnutils_uclient", "turnutils_peer") if "uclient_cpu" in args.rows else ():
        if shutil.which(tool) is None:
            p.error("%s is not installed (Debian: apt-get install coturn)" % tool)
    print("machine:", machine_facts())
    t0 = time.monotonic()
    result = run_all(args, variants)
    result["when"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result["machine"] = machine_facts()
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["command"] = "python -m benchmarks.bench_table" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    body = render(result)
    print()
    print(body)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("wrote", args.json)
    if not args.no_readme:
        update_readme("bench_table", body)
        print("wrote", README)
    if args.figures != "none":
        draw_charts(args.json, args.figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
