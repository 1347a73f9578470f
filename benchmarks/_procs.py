"""Start and stop the servers under test; read their CPU time and RSS.

Both servers run on loopback, on a free listen port, with an allocation port
range given by the caller.  Every process started here is remembered and
killed by its PID at exit (``atexit`` and SIGTERM/SIGINT), and ``Server`` is a
context manager, so an interrupted benchmark leaves nothing behind.  Nothing
here ever signals a process it did not start.

CPU time is the sum over the server's threads of ``/proc/<pid>/task/*/
schedstat`` (nanoseconds on the CPU), which counts every coturn thread and is
finer than the clock ticks of ``/proc/<pid>/stat``; RSS is ``VmRSS`` from
``/proc/<pid>/status``.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from benchmarks._turnclient import wait_for_binding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REALM = "firezone"
# A fixed secret: the benchmark mints its own credentials for it.
SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"

_started: Dict[int, subprocess.Popen] = {}  # type: ignore[type-arg]


def _kill_all() -> None:
    for pid, proc in list(_started.items()):
        if proc.poll() is None:
            try:
                os.kill(pid, signal.SIGKILL)
                proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        _started.pop(pid, None)


def _on_signal(signum: int, frame: object) -> None:
    _kill_all()
    sys.exit(128 + signum)


_handlers: Dict[str, bool] = {}


def install_handlers() -> None:
    """Kill every process started here at exit and on SIGTERM/SIGINT/SIGHUP.

    Installed by the first ``Server.start`` (or ``track``), not on import, so
    that importing this module (a test reading its CPU helpers) leaves the
    importer's signal handling alone."""
    if _handlers:
        return
    _handlers["done"] = True
    atexit.register(_kill_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def track(proc: "subprocess.Popen[Any]") -> None:
    """Remember ``proc`` to kill it by PID at exit (see ``install_handlers``)."""
    install_handlers()
    _started[proc.pid] = proc


def credentials(ttl: int = 86400) -> Tuple[str, str]:
    """A username/password pair our relay accepts (coturn gets a static user with this password)."""
    from firezone_relay.core.auth import make_credentials

    return make_credentials(SECRET, int(time.time()) + ttl, "benchmark")


#: coturn's ``--user name:password`` splits at the first ':', so its static
#: user cannot be our ``<expiry>:<salt>`` name; it gets this name and the same password.
COTURN_USER = "bench"


def free_port() -> int:
    """A UDP port free on 127.0.0.1 right now (from the kernel's ephemeral range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds."""
    total = 0
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except FileNotFoundError:
        return 0
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return total


def descendants(pid: int) -> List[int]:
    """Every live process below ``pid`` (a supervisor's workers, and theirs).

    Found by the parent PID field of ``/proc/*/stat``: the
    ``/proc/<pid>/task/<tid>/children`` files need CONFIG_PROC_CHILDREN,
    which not every kernel has."""
    parents: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(name))
    out: List[int] = []
    todo = list(parents.get(pid, ()))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(parents.get(child, ()))
    return out


def tree_cpu_ns(pid: int) -> int:
    """CPU time of ``pid`` and of every live process below it (all threads)."""
    return cpu_ns(pid) + sum(cpu_ns(c) for c in descendants(pid))


def self_cpu_ns() -> int:
    return cpu_ns(os.getpid())


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tree_rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` plus that of every live process below it."""
    total = 0
    for p in [pid] + descendants(pid):
        try:
            total += rss_kb(p)
        except OSError:
            pass
    return total


def thread_count(pid: int) -> int:
    try:
        return len(os.listdir("/proc/%d/task" % pid))
    except FileNotFoundError:
        return 0


_extension: Dict[str, str] = {}


def ensure_extension() -> None:
    """Build the relay's optional C extension (batched UDP I/O) in this checkout.

    Our server runs from the checkout with ``--udp-io batched``, so a build
    failure stops the benchmark here, with the compiler's output, instead of
    measuring the slower pure-Python path under the name "ours".
    """
    if "done" in _extension:
        return
    r = subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError("could not build firezone_relay.adapters._udpio:\n" + r.stdout)
    _extension["done"] = "yes"


def check_extension(root: str) -> None:
    """Another checkout's ``_udpio`` extension must be built there already (we never write into it)."""
    d = os.path.join(root, "firezone_relay", "adapters")
    if not os.path.isdir(d) or not any(n.startswith("_udpio") and n.endswith(".so") for n in os.listdir(d)):
        raise RuntimeError("%s has no built firezone_relay/adapters/_udpio*.so (run build_ext --inplace there)" % root)


class Variant:
    """One server configuration to measure: ``LABEL=BASE[@ROOT] [ARG ...]``.

    ``BASE`` is ``ours`` or ``coturn`` (or ``ours-python``); the ARGs are
    appended to its command line as they are (``'ours-w2=ours --workers 2'``,
    ``'coturn-1=coturn --relay-threads 1'``).  ``@ROOT`` runs our relay from
    another checkout (its ``firezone_relay`` on ``PYTHONPATH``, read only: its
    ``_udpio`` extension must already be built there).  Without ``LABEL=``
    the label is the whole spec's first word."""

    def __init__(self, spec: str) -> None:
        words = shlex.split(spec)
        if not words:
            raise ValueError("empty variant")
        head, self.extra = words[0], words[1:]
        self.label, _, base = head.partition("=")
        if not base:
            base = self.label
        base, _, root = base.partition("@")
        if base not in ("ours", "ours-python", "coturn"):
            raise ValueError("variant %r: the base must be ours, ours-python or coturn" % spec)
        self.kind = base
        self.root = os.path.abspath(root) if root else None
        self.spec = spec

    @property
    def is_coturn(self) -> bool:
        return self.kind == "coturn"

    def server(self, lowest_port: int, highest_port: int) -> "Server":
        return Server(self.kind, lowest_port, highest_port, self.extra, label=self.label, root=self.root)

    def __repr__(self) -> str:
        return "Variant(%r)" % self.spec


def parse_variants(specs: List[str]) -> List[Variant]:
    """``Variant``s from the command line; labels must be distinct."""
    out = [Variant(s) for s in specs]
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise ValueError("variant labels must be distinct: %s" % labels)
    return out


class Server:
    """One server process: ``kind`` is ``"ours"`` (batched UDP I/O, the C
    extension), ``"ours-python"`` (``--udp-io python``) or ``"coturn"``;
    ``label`` names it in reports (default: ``kind``), ``root`` is the
    checkout our relay runs from (default: this one)."""

    def __init__(self, kind: str, lowest_port: int, highest_port: int, extra: Optional[List[str]] = None,
                 label: Optional[str] = None, root: Optional[str] = None) -> None:  # fmt: skip
        self.kind = kind
        self.label = label or kind
        self.root = root
        self.lowest_port = lowest_port
        self.highest_port = highest_port
        self.extra = list(extra or [])
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None  # type: ignore[type-arg]
        self.dir = tempfile.mkdtemp(prefix="bench-%s-" % self.label)
        self.log_path = os.path.join(self.dir, "server.log")
        self.argv: List[str] = []
        username, password = credentials()
        self.password = password
        self.username = username if kind.startswith("ours") else COTURN_USER

    @property
    def address(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _command(self) -> Tuple[List[str], Dict[str, str]]:
        env = dict(os.environ)
        if self.kind in ("ours", "ours-python", "ours-otlp"):
            root = self.root or REPO
            if self.root is not None:
                check_extension(self.root)
            elif self.kind != "ours-python":
                ensure_extension()
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            argv = [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "firezone-relay",
                "--listen-port", str(self.port),
                "--lowest-port", str(self.lowest_port),
                "--highest-port", str(self.highest_port),
                "--public-ip4-addr", "127.0.0.1",
                "--bind-ip4-addr", "127.0.0.1",
                "--health-check-addr", "127.0.0.1:%d" % free_port(),
                "--allow-loopback-peers",
                "--auth-secret", SECRET,
                "--udp-io", "python" if self.kind == "ours-python" else "batched",
            ]  # fmt: skip
        elif self.kind == "coturn":
            turnserver = shutil.which("turnserver")
            if turnserver is None:
                raise RuntimeError("coturn's turnserver is not installed")
            argv = [
                turnserver,
                "-n",
                "--listening-ip", "127.0.0.1",
                "--relay-ip", "127.0.0.1",
                "--listening-port", str(self.port),
                "--min-port", str(self.lowest_port),
                "--max-port", str(self.highest_port),
                "--realm", REALM,
                "--lt-cred-mech",
                "--user", "%s:%s" % (COTURN_USER, self.password),
                "--allow-loopback-peers",
                "--no-multicast-peers",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--pidfile", os.path.join(self.dir, "turnserver.pid"),
                "--userdb", os.path.join(self.dir, "turndb"),
                "--log-file", "stdout",
                "--simple-log",
            ]  # fmt: skip
        else:
            raise ValueError(self.kind)
        return argv + self.extra, env

    def start(self) -> "Server":
        last_error: Optional[BaseException] = None
        for _attempt in range(3):
            self.port = free_port()
            while self.lowest_port <= self.port <= self.highest_port:
                self.port = free_port()
            self.argv, env = self._command()
            os.makedirs(self.dir, exist_ok=True)
            log = open(self.log_path, "ab")
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir
                )
            finally:
                log.close()
            track(self.proc)
            try:
                wait_for_binding(self.address, 20.0)
                return self
            except TimeoutError as exc:
                last_error = exc
                self.stop(keep_logs=True)
        raise RuntimeError("%s did not start: %s (log: %s)" % (self.kind, last_error, self.log_path))

    def stop(self, keep_logs: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                # Our relay drains on the first SIGTERM; the second one exits at once.
                for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
                    try:
                        os.kill(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        finally:
            _started.pop(proc.pid, None)
        if not keep_logs and not os.environ.get("BENCH_KEEP_LOGS"):
            shutil.rmtree(self.dir, ignore_errors=True)  # set BENCH_KEEP_LOGS=1 to keep the server logs

    def cpu_ns(self) -> int:
        """CPU time of the server and of its child processes (a supervisor's workers)."""
        return tree_cpu_ns(self.pid)

    def rss_kb(self) -> int:
        return tree_rss_kb(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command_line(self) -> str:
        """The command as run, with the repo path and per-run values shortened for the README."""
        out = []
        for a in self.argv:
            if a == sys.executable:
                a = "python"
            out.append(a if not any(c in a for c in " ;()") else "'%s'" % a)
        return " ".join(out)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def machine_facts() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    coturn = "?"
    try:
        out = subprocess.run(["turnserver", "--version"], capture_output=True, text=True, timeout=5)
        coturn = (out.stdout or out.stderr).strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return "%d CPU cores (%s), %d MiB RAM, Linux %s, Python %s, coturn %s" % (
        os.cpu_count() or 0,
        model,
        mem,
        os.uname().release,
        sys.version.split()[0],
        coturn,
    )
