"""Smoke tests of the benchmark harnesses (issues 17 and 19), in their quick forms.

They measure nothing worth reading (tiny counts, short windows, a loaded CI
machine): they prove that the modes run end to end against real servers --
our relay through twistd and coturn's turnserver on loopback -- and that the
JSON they write holds what the charts and the README tables are drawn from.
Each benchmark runs as its own process (``python -m benchmarks...``), as an
operator runs it: ``benchmarks._procs`` installs signal handlers that have no
place in the test runner.  The benchmarks start and kill their servers by PID.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict

from twisted.trial.unittest import TestCase

from .interop.support import unavailable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchmarkSmokeTests(TestCase):
    def setUp(self) -> None:
        for tool in ("turnserver", "turnutils_uclient", "turnutils_peer"):
            if shutil.which(tool) is None:
                unavailable(self, "%s not found on PATH (Debian package: coturn)" % tool)
        if shutil.which("cc") is None and shutil.which("gcc") is None:
            unavailable(self, "no C compiler (cc or gcc) for the benchmarks' load generator")
        self.tmp = tempfile.mkdtemp(prefix="bench-smoke-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def bench(self, module: str, *argv: str, timeout: float = 150.0) -> "subprocess.CompletedProcess[str]":
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def ok(self, module: str, *argv: str) -> Dict[str, Any]:
        path = os.path.join(self.tmp, module.rsplit(".", 1)[1] + ".json")
        r = self.bench(module, *argv, "--json", path, "--figures", os.path.join(self.tmp, "figures"))
        self.assertEqual(r.returncode, 0, "%s failed:\n%s\n%s" % (module, r.stdout[-3000:], r.stderr[-3000:]))
        with open(path) as f:
            data: Dict[str, Any] = json.load(f)
        self.output = r.stdout
        return data

    def assert_chart(self, name: str) -> None:
        """With matplotlib (the bench extra) the command drew its chart; without, it said so and still succeeded."""
        png = os.path.join(self.tmp, "figures", name + ".png")
        if importlib.util.find_spec("matplotlib") is not None:
            with open(png, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        else:
            self.assertIn("no charts", self.output)
            self.assertFalse(os.path.exists(png))

    def test_relay_many_allocations_with_variants(self) -> None:
        """16 × 2 closed loop through three variants; the extra args reach the relay's command line."""
        data = self.ok(
            "benchmarks.bench_relay", "--allocations", "16", "--inflight", "2", "--runs", "1", "--sizes", "100",
            "--warmup", "0.2", "--measure", "0.4", "--no-uclient", "--no-readme", "--quiet-wait-total", "0",
            "--retries", "0", "--variant", "a=ours", "--variant", "b=ours --udp-io python", "--variant", "coturn",
        )  # fmt: skip
        self.assertEqual(data["servers"], ["a", "b", "coturn"])
        self.assertEqual(data["allocations"], 16)
        rows = {r["server"]: r for r in data["rows"]}
        for label in ("a", "b", "coturn"):
            self.assertGreater(rows[label]["rt_per_s"], 0, label)
            self.assertGreater(rows[label]["cpu_us_per_rt"], 0, label)
        self.assertTrue(data["commands"][0].endswith("--udp-io batched"), data["commands"][0])
        self.assertTrue(data["commands"][1].endswith("--udp-io batched --udp-io python"), data["commands"][1])
        self.assertIn("| a | 100 B | **", self.output)  # a/coturn ratio row
        self.assertIn("| b | 100 B | **", self.output)
        self.assert_chart("bench_relay_many_variants")

    def test_relay_workers_per_process_and_gso_generator(self) -> None:
        """With --workers 2: each worker's CPU and how SO_REUSEPORT spread the 16 clients; the GSO generator relays."""
        data = self.ok(
            "benchmarks.bench_relay", "--allocations", "16", "--inflight", "2", "--runs", "1", "--sizes", "100",
            "--warmup", "0.2", "--measure", "0.4", "--no-uclient", "--no-readme", "--quiet-wait-total", "0",
            "--retries", "0", "--generator-gso", "--variant", "w1=ours", "--variant", "w2=ours --workers 2",
        )  # fmt: skip
        rows = {r["server"]: r for r in data["rows"]}
        self.assertNotIn("worker_cpu_us_per_rt", rows["w1"])
        self.assertNotIn("clients_per_worker", rows["w1"])
        self.assertEqual(len(rows["w2"]["worker_cpu_us_per_rt"]), 2)
        self.assertTrue(all(x > 0 for x in rows["w2"]["worker_cpu_us_per_rt"]), rows["w2"])
        self.assertEqual(len(rows["w2"]["clients_per_worker"]), 2)
        self.assertEqual(sum(rows["w2"]["clients_per_worker"]), 16)
        for label in ("w1", "w2"):
            self.assertGreater(rows[label]["rt_per_s"], 0, label)
        self.assertIn("UDP GSO sends", self.output)
        self.assertIn("per process, us CPU per round trip: supervisor", self.output)
        self.assertRegex(self.output, r"- w2, 100 B, per process .* `SO_REUSEPORT` gave the workers \d+/\d+ of the 16")

    def test_scale_variants_interleaved(self) -> None:
        data = self.ok(
            "benchmarks.bench_scale", "--allocations", "40", "--window", "16", "--cycles", "1", "--settle", "0.1",
            "--noise-limit", "0", "--check-sample", "5", "--runs", "2", "--no-readme",
            "--variant", "w=ours", "--variant", "coturn",
        )  # fmt: skip
        self.assertEqual([r["server"] for r in data["results"]], ["w", "coturn", "w", "coturn"])
        for label in ("w", "coturn"):
            s = data["summary"][label]
            self.assertEqual(s["runs"], 2)
            self.assertGreater(s["alloc_rate"], 0)
            self.assertGreater(s["release_server_cpu_us"], 0)
        for r in data["results"]:
            self.assertEqual(r["cycles"][0]["allocated"], 40)
            self.assertEqual(r["cycles"][0]["released"], 40)
        self.assert_chart("bench_scale_variants")

    def test_table_quick(self) -> None:
        """Issue 19's table in quick form; the flood row is left to tests/adapters/test_flood (its 1 s minimum)."""
        data = self.ok(
            "benchmarks.bench_table", "--quick", "--no-readme", "--rows", "allocate_cpu", "release_cpu", "tls_rate",
            "uclient_cpu", "udp_many_cpu", "udp_one_rate",
        )  # fmt: skip
        self.assertEqual(data["servers"], ["ours", "coturn"])
        keys = [r["key"] for r in data["rows"]]
        self.assertEqual(keys, ["allocate_cpu", "release_cpu", "tls_rate", "uclient_cpu", "udp_many_cpu", "udp_one_rate"])
        for row in data["rows"]:
            for label in ("ours", "coturn"):
                self.assertGreater(row["values"][label]["median"], 0, (row["key"], label))
            self.assertEqual(row["ratio_to"], "coturn")
            self.assertAlmostEqual(row["ratios"]["ours"],
                                   row["values"]["ours"]["median"] / row["values"]["coturn"]["median"])  # fmt: skip
        self.assertIn("| Refresh LIFETIME 0 (deallocation), CPU each |", self.output)
        self.assert_chart("bench_table")

    def test_bad_variant_is_one_clear_line(self) -> None:
        r = self.bench("benchmarks.bench_relay", "--variant", "x=nginx", "--no-readme")
        self.assertEqual(r.returncode, 2)
        self.assertIn("the base must be ours, ours-python or coturn", r.stderr)
        self.assertNotIn("Traceback", r.stderr)


class TreeCpuTests(TestCase):
    def test_child_process_cpu_counted(self) -> None:
        """A supervisor's workers are its child processes: their CPU is the server's CPU."""
        from benchmarks import _procs

        busy = "import time\nt = time.process_time() + 0.3\nwhile time.process_time() < t: pass\ntime.sleep(30)\n"
        parent = subprocess.Popen(
            [sys.executable, "-c", "import subprocess, sys, time\n"
             "c = subprocess.Popen([sys.executable, '-c', %r])\nprint(c.pid, flush=True)\ntime.sleep(30)\n" % busy],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        child = 0

        def stop() -> None:
            for pid in (child, parent.pid):
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            parent.wait(10)

        self.addCleanup(stop)
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 20
        while _procs.cpu_ns(child) < 300_000_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertGreaterEqual(_procs.cpu_ns(child), 300_000_000)
        self.assertEqual(_procs.descendants(parent.pid), [child])
        self.assertGreaterEqual(_procs.tree_cpu_ns(parent.pid), _procs.cpu_ns(parent.pid) + 300_000_000)
        self.assertLess(_procs.cpu_ns(parent.pid), 300_000_000)

