"""Paced many-client UDP (``turnutils_uclient -m 100``), ours vs coturn, interleaved, medians.

    python -m benchmarks.bench_paced --runs 5            # ~3-4 minutes
    python -m benchmarks.bench_paced --runs 1 --py-spy /tmp/paced.svg   # profile ours once

Each run starts a fresh server and ``turnutils_peer`` (``bench_relay.uclient_run``:
the same command lines and CPU accounting as bench_relay's many-client table),
alternating ours and coturn; the relay CPU per relayed packet is the server's
CPU time (all threads, ``/proc/<pid>/task/*/schedstat``) over twice the
messages received back.  Every process is started here and killed by PID;
each run is bounded by ``--uclient-timeout``.  ``--py-spy FILE`` records our
relay with py-spy (``pip install py-spy``) during its runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from benchmarks import _procs, bench_relay


def _profiled_run(kind: str, args: argparse.Namespace, out: str) -> Dict[str, Any]:
    """``uclient_run`` with py-spy attached to the server once it runs."""
    started = _procs.Server.start
    holder: Dict[str, Any] = {}

    def start(self: _procs.Server) -> _procs.Server:
        r = started(self)
        if args.attach:
            argv = args.attach.format(pid=self.pid, kind=self.kind).split()
        else:
            py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
            argv = [py_spy, "record", "-p", str(self.pid), "-o", out, "-r", str(args.rate), "-d",
                    str(int(args.uclient_timeout))]  # fmt: skip
            if args.nonblocking:
                argv.append("--nonblocking")
            if args.native:
                argv.append("--native")
            if out.endswith(".txt"):
                argv += ["-f", "raw"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _procs._started[proc.pid] = proc
        holder["spy"] = proc
        time.sleep(1.0)  # attached before the load starts
        return r

    _procs.Server.start = start  # type: ignore[method-assign]
    try:
        return bench_relay.uclient_run(kind, args)
    finally:
        _procs.Server.start = started  # type: ignore[method-assign]
        spy = holder.get("spy")
        if spy is not None:
            # py-spy writes its output when the target exits (stopped by uclient_run).
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
            _procs._started.pop(spy.pid, None)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--servers", nargs="+", default=["ours", "coturn"])
    p.add_argument("--uclient-clients", type=int, default=100)
    p.add_argument("--uclient-messages", type=int, default=1000)
    p.add_argument("--uclient-interval", type=int, default=5, help="ms between messages of one client")
    p.add_argument("--uclient-length", type=int, default=100)
    p.add_argument("--uclient-timeout", type=float, default=120.0)
    p.add_argument("--noise-limit", type=float, default=0.15)
    p.add_argument("--py-spy", default="", help="record our relay's runs with py-spy into this file")
    p.add_argument("--native", action="store_true", help="py-spy --native")
    p.add_argument("--nonblocking", action="store_true", help="py-spy --nonblocking (no pauses of the relay)")
    p.add_argument("--attach", default="",
                   help="instead of py-spy, run this command during the runs of --attach-to, e.g. "
                        "'perf record -g -o /tmp/{kind}.data -p {pid}' ({pid}, {kind} substituted)")
    p.add_argument("--attach-to", nargs="+", default=["ours"])
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = p.parse_args(argv)
    print("machine:", _procs.machine_facts())
    results: Dict[str, List[Dict[str, Any]]] = {k: [] for k in args.servers}
    for run in range(args.runs):
        for kind in args.servers:
            busy = bench_relay.wait_for_quiet(args.noise_limit, 10.0)
            for attempt in range(3):  # turnutils_uclient itself fails now and then (a channel number it reuses)
                try:
                    if (args.py_spy and kind.startswith("ours")) or (args.attach and kind in args.attach_to):
                        u = _profiled_run(kind, args, args.py_spy)
                    else:
                        u = bench_relay.uclient_run(kind, args)
                    break
                except RuntimeError as exc:
                    print("run %d %s attempt %d failed: %s" % (run + 1, kind, attempt + 1, str(exc)[-300:]), flush=True)
            else:
                raise RuntimeError("%s failed three times" % kind)
            results[kind].append(u)
            print("run %d %-6s recv %d lost %d  server CPU %.2f s  %.2f us/pkt  wall %.1f s  "
                  "uclient %.1f s  other %.2f cores (busy before %.2f)"
                  % (run + 1, kind, u["received"], u["lost"], u["server_cpu_s"], u["cpu_us_per_pkt"],
                     u["wall_s"], u["uclient_cpu_s"], u["other_cores"], busy), flush=True)  # fmt: skip
    print()
    med = {k: statistics.median(u["cpu_us_per_pkt"] for u in v) for k, v in results.items() if v}
    for kind, v in results.items():
        print("%-12s median %.2f us/pkt  (runs: %s)  other cores median %.2f" % (
            kind, med[kind], ", ".join("%.2f" % u["cpu_us_per_pkt"] for u in v),
            statistics.median(u["other_cores"] for u in v)))  # fmt: skip
    if "coturn" in med:
        for kind in med:
            if kind != "coturn":
                print("%s / coturn CPU per packet: %.2fx" % (kind, med[kind] / med["coturn"]))
    print("command: python -m benchmarks.bench_paced " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
