"""TURN over TCP and TLS: round trips ours vs coturn, and 5,000 held connections.

    python -m benchmarks.bench_stream              # ~2 minutes
    python -m benchmarks.bench_stream --inflight 8 --runs 5 --connections 1000

1. Closed loop through one allocation.  For each server (this relay, and
   coturn's ``turnserver`` with the equivalent flags: loopback, long-term
   credentials, loopback peers allowed, the same certificate) and each
   transport (TCP, TLS): one connection, one allocation, a channel bound to a
   UDP echo peer on 127.0.0.1.  The generator keeps ``--inflight`` ChannelData
   messages of ``--size`` bytes in flight (client -> relay over the stream ->
   peer over UDP -> relay -> client), sending the next as soon as one comes
   back (``--inflight`` levels, 1 = latency-bound, 32 = throughput);
   ``--warmup`` seconds, then ``--measure`` seconds counted.  Reported:
   round trips per second, and the server's CPU time per round trip (every
   thread, from /proc/<pid>/task/*/schedstat), the fairer number when the
   generator (Python, one core) is the bottleneck.  Runs interleave the two
   servers; medians.

2. Scale: ``--connections`` TCP connections to each server, each with an
   allocation held (401 then a signed Allocate, pipelined over non-blocking
   sockets), 50 per source address (127.0.x.y); the server's RSS before and after, divided by the number of
   connections, is the memory per connection (its allocation's UDP socket
   included).  Then every connection is checked to be still open.

Every process is started here, killed by its PID at exit, and listens on
127.0.0.1 only.  Needs coturn (Debian package ``coturn``) for the comparison;
without it only our numbers are printed.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import hmac
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from firezone_relay.core import stun  # noqa: E402
from firezone_relay.core.auth import REALM, make_credentials  # noqa: E402
from firezone_relay.core.framing import Deframer  # noqa: E402

SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"
COTURN_USER = "bench"
CHANNEL = 0x4000
PER_SOURCE = 50

_started: Dict[int, "subprocess.Popen[bytes]"] = {}


def _kill_started() -> None:
    for pid, proc in list(_started.items()):
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        _started.pop(pid, None)


atexit.register(_kill_started)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ns(pid: int) -> int:
    total = 0
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except FileNotFoundError:
        return 0
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def threads(pid: int) -> int:
    return len(os.listdir("/proc/%d/task" % pid))


# --- servers -----------------------------------------------------------------


class Server:
    """``ours`` (twistd firezone-relay) or ``coturn`` (turnserver) on 127.0.0.1."""

    def __init__(self, kind: str, cert: Path, key: Path, low: int, high: int, workdir: Path) -> None:
        self.kind = kind
        self.port = self.tls_port = low
        while low <= self.port <= high:  # the ephemeral range may overlap the allocation range
            self.port = free_port(socket.SOCK_DGRAM)
        while low <= self.tls_port <= high:
            self.tls_port = free_port()
        self.dir = workdir / kind
        self.dir.mkdir(parents=True, exist_ok=True)
        username, password = make_credentials(SECRET, int(time.time()) + 86400, "bench")
        self.password = password
        self.username = username if kind == "ours" else COTURN_USER
        if kind == "ours":
            self.argv = [
                sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "firezone-relay",
                "--listen-port=%d" % self.port, "--tls-port=%d" % self.tls_port,
                "--lowest-port=%d" % low, "--highest-port=%d" % high,
                "--public-ip4-addr=127.0.0.1", "--bind-ip4-addr=127.0.0.1",
                "--health-check-addr=127.0.0.1:%d" % free_port(),
                "--allow-loopback-peers", "--auth-secret=%s" % SECRET,
                "--tls-cert=%s" % cert, "--tls-key=%s" % key,
                "--max-connections=20000",
            ]  # fmt: skip
        else:
            turnserver = shutil.which("turnserver")
            if turnserver is None:
                raise RuntimeError("coturn's turnserver is not installed")
            self.argv = [
                turnserver, "-n",
                "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1",
                "--listening-port", str(self.port), "--tls-listening-port", str(self.tls_port),
                "--min-port", str(low), "--max-port", str(high),
                "--realm", REALM, "--lt-cred-mech", "--user", "%s:%s" % (COTURN_USER, password),
                "--cert", str(cert), "--pkey", str(key),
                "--allow-loopback-peers", "--no-multicast-peers", "--no-cli", "--no-dtls",
                "--pidfile", str(self.dir / "turnserver.pid"), "--userdb", str(self.dir / "turndb"),
                "--log-file", "stdout", "--simple-log",
            ]  # fmt: skip
        self.proc: Optional["subprocess.Popen[bytes]"] = None

    def start(self) -> "Server":
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.dir / "server.log", "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=self.dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        _started[self.proc.pid] = self.proc
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=0.2).close()
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("%s did not start; see %s" % (self.kind, self.dir / "server.log"))
                time.sleep(0.1)
        time.sleep(0.3)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            proc.send_signal(sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        _started.pop(proc.pid, None)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def version(self) -> str:
        if self.kind == "ours":
            return "firezone-relay (this tree)"
        out = subprocess.run([self.argv[0], "--version"], capture_output=True, text=True, timeout=5)
        return "coturn " + (out.stdout or out.stderr).strip().splitlines()[-1]


# --- a stream TURN client --------------------------------------------------------


class StreamClient:
    """Blocking setup over one TCP or TLS connection: Allocate, ChannelBind."""

    def __init__(self, server: Server, tls: bool) -> None:
        raw = socket.create_connection(("127.0.0.1", server.tls_port if tls else server.port), timeout=5)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.sock: socket.socket = ctx.wrap_socket(raw)
        else:
            self.sock = raw
        self.deframer = Deframer()
        self.frames: List[bytes] = []
        self.username = server.username
        self.key = stun.long_term_key(server.username, REALM, server.password)
        self.nonce = ""

    def _frame(self) -> bytes:
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.frames.extend(self.deframer.feed(data))
        return self.frames.pop(0)

    def request(self, method: int, attributes: List[Tuple[int, Any]], signed: bool = True) -> stun.Message:
        for _ in range(3):
            tid = os.urandom(12)
            attrs = list(attributes)
            if signed:
                attrs += [(stun.USERNAME, self.username), (stun.REALM, REALM), (stun.NONCE, self.nonce)]
                data = stun.encode(method, stun.REQUEST, tid, attrs, integrity_key=self.key)
            else:
                data = stun.encode(method, stun.REQUEST, tid, attrs)
            self.sock.sendall(data)
            while True:
                frame = self._frame()
                if frame[0] < 0x40 and frame[8:20] == tid:
                    break
            message = stun.decode(frame)
            error = message.get(stun.ERROR_CODE)
            if isinstance(error, tuple) and error[0] in (401, 438) and message.get_str(stun.NONCE):
                self.nonce = message.get_str(stun.NONCE) or ""
                if not signed or error[0] == 438:
                    signed = True
                    continue
            return message
        return message

    def allocate(self) -> Tuple[str, int]:
        # Unsigned first: the 401 brings the nonce, then request() signs and retries.
        response = self.request(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17)], signed=False)
        relayed = response.get_address(stun.XOR_RELAYED_ADDRESS)
        if relayed is None:
            raise RuntimeError("Allocate failed: %r" % (response.get(stun.ERROR_CODE),))
        return relayed

    def channel_bind(self, peer: Tuple[str, int]) -> None:
        response = self.request(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, CHANNEL), (stun.XOR_PEER_ADDRESS, peer)])
        if response.msg_class != stun.SUCCESS:
            raise RuntimeError("ChannelBind failed: %r" % (response.get(stun.ERROR_CODE),))


# --- 1. closed loop ------------------------------------------------------------------


def closed_loop(
    server: Server, tls: bool, size: int, inflight: int, warmup: float, measure: float, avoid: Tuple[int, int] = (0, -1)
) -> Dict[str, Any]:
    client = StreamClient(server, tls)
    relayed = client.allocate()
    peer = echo_peer(avoid)
    client.channel_bind(peer.getsockname())
    peer.setblocking(False)
    sock = client.sock
    sock.setblocking(False)
    payload = os.urandom(size)
    frame = struct.pack("!HH", CHANNEL, size) + payload + b"\0" * (-size % 4)
    frame_len = len(frame)
    relay_addr = ("127.0.0.1", relayed[1])
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "client")
    sel.register(peer, selectors.EVENT_READ, "peer")
    pending = b""
    sock.sendall(frame * inflight) if not tls else _send_all(sock, frame * inflight)
    done = 0
    start = time.monotonic()
    warm_at = start + warmup
    end_at = warm_at + measure
    counted_from: Optional[Tuple[float, int, int]] = None
    while True:
        now = time.monotonic()
        if counted_from is None and now >= warm_at:
            counted_from = (now, done, _server_cpu_ns(server))
        if now >= end_at:
            break
        for key, _ in sel.select(0.5):
            if key.data == "peer":
                while True:
                    try:
                        data, addr = peer.recvfrom(65536)
                    except BlockingIOError:
                        break
                    peer.sendto(data, addr)
            else:
                while True:
                    try:
                        data = sock.recv(262144)
                    except (BlockingIOError, ssl.SSLWantReadError):
                        break
                    if not data:
                        raise ConnectionError("%s closed the connection" % server.kind)
                    pending += data
                    if not (tls and sock.pending()):  # type: ignore[attr-defined]
                        break
                n = len(pending) // frame_len
                if n:
                    pending = pending[n * frame_len :]
                    done += n
                    _send_all(sock, frame * n)
    assert counted_from is not None
    elapsed = time.monotonic() - counted_from[0]
    trips = done - counted_from[1]
    cpu = _server_cpu_ns(server) - counted_from[2]
    sel.close()
    sock.close()
    peer.close()
    return {"rt_per_s": trips / elapsed, "server_cpu_us_per_rt": cpu / 1000.0 / max(trips, 1), "trips": trips}


def _server_cpu_ns(server: Any) -> int:
    """The server's CPU so far; a ``_procs.Server`` (bench_table) counts its child processes too."""
    return int(server.cpu_ns()) if hasattr(server, "cpu_ns") else cpu_ns(server.pid)


def echo_peer(avoid: Tuple[int, int]) -> socket.socket:
    """A UDP socket on 127.0.0.1 whose port is outside ``avoid`` (the
    servers' allocation ranges).  The servers' relayed addresses are on
    127.0.0.1 too: a peer on a port inside our relay's range is, to the
    relay, one of its own relayed addresses, so ChannelData to it is
    hairpinned to that (absent) allocation and dropped, and the closed loop
    stalls at 0 round trips."""
    while True:
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        if not avoid[0] <= peer.getsockname()[1] <= avoid[1]:
            return peer
        peer.close()


def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            time.sleep(0)
            continue
        view = view[sent:]


# --- 2. scale --------------------------------------------------------------------------


def hold_connections(server: Server, count: int, timeout: float = 120.0) -> Dict[str, Any]:
    """``count`` TCP connections, each with an allocation; RSS per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count * 2 + 100), hard))
    key = stun.long_term_key(server.username, REALM, server.password)
    time.sleep(1.0)
    rss_before = rss_kb(server.pid)
    sel = selectors.DefaultSelector()
    conns: Dict[int, Dict[str, Any]] = {}
    started = time.monotonic()
    connect_errors = 0
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # PER_SOURCE connections per source address (127.0.x.y): the relay
        # limits unauthenticated replies per source IP (a burst of 64), as it
        # limits connections per IP (256 by default).
        s.bind(("127.0.%d.%d" % (1 + i // PER_SOURCE // 250, 1 + i // PER_SOURCE % 250), 0))
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", server.port))
        if err not in (0, 115):  # EINPROGRESS
            connect_errors += 1
            s.close()
            continue
        state = {"sock": s, "deframer": Deframer(), "stage": "connecting", "tid": os.urandom(12)}
        conns[s.fileno()] = state
        sel.register(s, selectors.EVENT_WRITE, state)
        if i % 200 == 199:  # let the server accept (its backlog is finite)
            _pump_scale(sel, key, server, 0.0)
    allocated = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        allocated = sum(1 for c in conns.values() if c["stage"] == "allocated")
        failed = sum(1 for c in conns.values() if c["stage"] == "failed")
        if allocated + failed >= len(conns):
            break
        _pump_scale(sel, key, server, 0.2)
    setup_seconds = time.monotonic() - started
    time.sleep(1.0)
    rss_after = rss_kb(server.pid)
    # Still there?  A Binding on every connection, answered on every one.
    alive = 0
    for c in conns.values():
        if c["stage"] != "allocated":
            continue
        try:
            c["sock"].setblocking(True)
            c["sock"].settimeout(5)
            tid = os.urandom(12)
            c["sock"].sendall(stun.encode(stun.BINDING, stun.REQUEST, tid, []))
            data = b""
            while len(data) < 20:
                chunk = c["sock"].recv(4096)
                if not chunk:
                    break
                data += chunk
            alive += data[8:20] == tid
        except OSError:
            pass
    for c in conns.values():
        c["sock"].close()
    sel.close()
    failures = sorted({c.get("error", "") for c in conns.values() if c["stage"] == "failed"})
    return {
        "connections": count,
        "allocated": allocated,
        "alive": alive,
        "failures": failures[:5],
        "connect_errors": connect_errors,
        "setup_seconds": round(setup_seconds, 1),
        "rss_before_mb": round(rss_before / 1024, 1),
        "rss_after_mb": round(rss_after / 1024, 1),
        "kb_per_connection": round((rss_after - rss_before) / max(allocated, 1), 1),
    }


def _pump_scale(sel: selectors.BaseSelector, key: bytes, server: Server, timeout: float) -> None:
    for sk, events in sel.select(timeout):
        c = sk.data
        s = c["sock"]
        if c["stage"] == "connecting":
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                c["stage"], c["error"] = "failed", "connect"
                sel.unregister(s)
                continue
            s.send(stun.encode(stun.ALLOCATE, stun.REQUEST, c["tid"], [(stun.REQUESTED_TRANSPORT, 17)]))
            c["stage"] = "challenged"
            sel.modify(s, selectors.EVENT_READ, c)
            continue
        try:
            data = s.recv(65536)
        except BlockingIOError:
            continue
        except OSError as exc:
            c["stage"], c["error"] = "failed", repr(exc)
            sel.unregister(s)
            continue
        if not data:
            c["stage"], c["error"] = "failed", "closed by server"
            sel.unregister(s)
            continue
        for frame in c["deframer"].feed(data):
            message = stun.decode(frame)
            error = message.get(stun.ERROR_CODE)
            if c["stage"] == "challenged" and isinstance(error, tuple) and error[0] == 401:
                c["tid"] = os.urandom(12)
                attrs = [
                    (stun.REQUESTED_TRANSPORT, 17),
                    (stun.USERNAME, server.username),
                    (stun.REALM, REALM),
                    (stun.NONCE, message.get_str(stun.NONCE)),
                ]
                s.send(stun.encode(stun.ALLOCATE, stun.REQUEST, c["tid"], attrs, integrity_key=key))
                c["stage"] = "signed"
            elif c["stage"] == "signed" and message.msg_class == stun.SUCCESS:
                c["stage"] = "allocated"
                sel.unregister(s)
            else:
                c["stage"], c["error"] = "failed", "error %r" % (error,)
                sel.unregister(s)


# --- main ----------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100, help="ChannelData payload bytes")
    parser.add_argument("--inflight", default="1,32", help="messages in flight, comma-separated levels")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--measure", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--servers", default="ours,coturn")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from tests.certs import make_certificate

    workdir = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    cert, key = make_certificate(workdir / "tls", ips=("127.0.0.1",))
    kinds = [k for k in args.servers.split(",") if k]
    if "coturn" in kinds and shutil.which("turnserver") is None:
        print("coturn's turnserver not found: measuring ours only", file=sys.stderr)
        kinds.remove("coturn")
    # Allocation ports above the range the test suite draws from (20000-30000),
    # with room to skip ports other processes hold.
    port_span = max(args.connections * 6 // 5 + 100, 200)
    low = 33000
    servers = {}
    for i, kind in enumerate(kinds):
        servers[kind] = Server(kind, cert, key, low + i * port_span, low + (i + 1) * port_span - 1, workdir)

    results: Dict[str, Any] = {"machine": machine(), "args": vars(args), "closed_loop": {}, "scale": {}}
    print("# TURN over TCP/TLS: %s" % results["machine"])
    levels = [int(x) for x in str(args.inflight).split(",") if x]
    print("\n## Closed loop: %d-byte ChannelData, %g s measured, median of %d interleaved runs\n"
          % (args.size, args.measure, args.runs))
    for kind, server in servers.items():
        server.start()
        results.setdefault("versions", {})[kind] = server.version()
        results.setdefault("threads", {})[kind] = threads(server.pid)
    samples: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
    for _ in range(args.runs):
        for inflight in levels:
            for transport in ("tcp", "tls"):
                for kind, server in servers.items():
                    r = closed_loop(
                        server, transport == "tls", args.size, inflight, args.warmup, args.measure,
                        avoid=(low, low + len(servers) * port_span - 1),
                    )  # fmt: skip
                    samples.setdefault((kind, transport, inflight), []).append(r)
    print("| transport | in flight | server | round trips/s | server CPU µs per round trip "
          "| ours/coturn: rate | ours/coturn: CPU per round trip |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for transport in ("tcp", "tls"):
        for inflight in levels:
            medians = {}
            for kind in servers:
                runs = samples[(kind, transport, inflight)]
                medians[kind] = {
                    "rt_per_s": statistics.median(r["rt_per_s"] for r in runs),
                    "server_cpu_us_per_rt": statistics.median(r["server_cpu_us_per_rt"] for r in runs),
                    "runs": runs,
                }
            results["closed_loop"]["%s/%d" % (transport, inflight)] = medians
            for kind in servers:
                m = medians[kind]
                rate = cpu = ""
                if kind == "ours" and "coturn" in medians:
                    rate = "%.2f×" % (m["rt_per_s"] / medians["coturn"]["rt_per_s"])
                    cpu = "%.2f×" % (m["server_cpu_us_per_rt"] / medians["coturn"]["server_cpu_us_per_rt"])
                print("| %s | %d | %s | %.0f | %.1f | %s | %s |" % (
                    transport.upper(), inflight, kind, m["rt_per_s"], m["server_cpu_us_per_rt"], rate, cpu))

    print("\n## %d concurrent TCP connections, one allocation each\n" % args.connections)
    print("| server | allocated | still answering | setup s | RSS before MB | RSS after MB | KiB per connection |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, server in servers.items():
        server.stop()
        server.start()  # a fresh process: the RSS delta is the connections' alone
        r = hold_connections(server, args.connections)
        results["scale"][kind] = r
        print("| %s | %d | %d | %.1f | %.1f | %.1f | %.1f |" % (
            kind, r["allocated"], r["alive"], r["setup_seconds"], r["rss_before_mb"], r["rss_after_mb"],
            r["kb_per_connection"]))
        if r["failures"]:
            print("  failures (%s): %s" % (kind, r["failures"]))
        server.stop()
    print("\nservers: %s; threads: %s" % (results["versions"], results["threads"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return "%d CPU cores (%s), Linux %s, Python %s" % (os.cpu_count() or 0, model, os.uname().release,
                                                     sys.version.split()[0])


if __name__ == "__main__":
    sys.exit(main())
