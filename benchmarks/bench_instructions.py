"""Instructions per unit of work, counted by valgrind: a number that a loaded machine does not move.

    python -m benchmarks.bench_instructions                      # this tree: stream and flood rows
    python -m benchmarks.bench_instructions --root /tmp/old      # another export of the tree
    python -m benchmarks.bench_instructions --cases tls,tcp --trips 2000
    python -m benchmarks.bench_instructions --cases udp --annotate /tmp/udp.txt

Wall-clock benchmarks (bench_stream, bench_flood) measure what an operator
sees, but on a shared machine their medians move by 20-50 % between runs.
For a before/after of a change to the Python code this counts the
user-space instructions (valgrind ``callgrind``, ``Ir``) the relay executes:

* ``tls`` / ``tcp``: a ``twistd firezone-relay`` started under callgrind
  with instrumentation off; one connection, one allocation, a channel to a
  UDP echo peer; after 200 warm-up round trips, instrumentation is switched
  on (``callgrind_control -i on``) for ``--trips`` round trips of 100-byte
  ChannelData, one in flight (client -> relay over the stream -> peer over
  UDP -> relay -> client), then off.  Reported: instructions per round trip.
* ``udp``: the same for a UDP client (the batched C reader): one
  allocation, a channel to a UDP echo peer, 100-byte ChannelData one in
  flight, so that every datagram wakes the relay on its own, as in the
  paced many-client case (``turnutils_uclient -m 100``): the per-wake-up
  cost (dispatch, the read, the core, the send).  Instructions per round
  trip (two relayed datagrams); ``--annotate FILE`` keeps callgrind's
  per-function breakdown (``callgrind_annotate``) of the last case.
* ``flood``: the core alone (``Relay.handle_client_input`` and draining its
  commands, no I/O) fed bench_flood's eight hostile kinds in turn from 50
  sources, the reflection guard off so that every request gets its reply;
  instructions per datagram, from two runs of different lengths (the
  difference cancels start-up).  ``flood:<kind>`` for one kind (``b1``,
  ``r37``, ``bind``, ``unauth``, ``forged``, ``chan``, ``send``, ``r1400``).

Instructions are not time (a cache miss costs more than an add; the kernel's
share, sends and wake-ups, is not counted), so the wall-clock benchmarks
stay the measure of record.  ``--root`` runs another export of the tree
(``git archive <commit> | tar -x -C DIR`` and the built ``_udpio``
extension copied in).  Needs valgrind (Debian package ``valgrind``).
Everything listens on 127.0.0.1; every process started is killed by PID.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List

REPO = Path(__file__).resolve().parents[1]

_FLOOD_CORE = r'''
import random, sys
sys.path.insert(0, sys.argv[3])
from firezone_relay.core.relay import Relay
from firezone_relay.core.config import RelayConfig
from firezone_relay.core import stun
from firezone_relay.core.auth import REALM, make_credentials
rnd = random.Random(5)
rb = lambda n: bytes(rnd.getrandbits(8) for _ in range(n))
cfg = RelayConfig(auth_secret="5a" * 32, public_ip4="127.0.0.1", listen_port=3478, lowest_port=22000,
                  highest_port=22199, allow_loopback_peers=True, unauthenticated_rate=0)
relay = Relay(cfg, random.Random(1))
forged_user, _ = make_credentials("%064x" % 1, 1900000000, "mallory")
peer = ("127.0.0.1", 40000)
kinds = {
    "b1": rb(1), "r37": rb(37), "bind": b"\x00\x01\x00\x00" + rb(16),
    "unauth": stun.encode(stun.ALLOCATE, stun.REQUEST, rb(12), [(stun.REQUESTED_TRANSPORT, 17)]),
    "forged": stun.encode(stun.ALLOCATE, stun.REQUEST, rb(12), [(stun.REQUESTED_TRANSPORT, 17),
        (stun.USERNAME, forged_user), (stun.REALM, REALM), (stun.NONCE, "obMatJos2gAAA1.forged")], integrity_key=b"guess"),
    "chan": stun.encode_channel_data(0x4001, rb(100)),
    "send": stun.encode(stun.SEND, stun.INDICATION, rb(12), [(stun.XOR_PEER_ADDRESS, peer), (stun.DATA, b"x" * 64)]),
    "r1400": rb(1400),
}
kind, n = sys.argv[1], int(sys.argv[2])
seq = list(kinds.values()) if kind == "all" else [kinds[kind]]
senders = [("127.0.1.%d" % (i + 1), 40000 + i) for i in range(50)]
handle, next_command = relay.handle_client_input, relay.next_command
for i in range(n):
    handle(seq[i % len(seq)], senders[i % 50], 1800000000.0 + i * 0.000125)
    while next_command() is not None:
        pass
'''


def _collected(output: str) -> int:
    for line in output.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1])
    raise RuntimeError("no callgrind total in:\n" + output[-2000:])


def flood_core(root: Path, kind: str, count: int) -> float:
    """Instructions per datagram in the core for one hostile kind (or ``all``)."""
    with tempfile.TemporaryDirectory(prefix="bench-ir-") as tmp:
        script = Path(tmp) / "flood_core.py"
        script.write_text(_FLOOD_CORE)
        totals = []
        for n in (count // 2, count + count // 2):
            out = subprocess.run(
                ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, str(script), kind,
                 str(n), str(root)],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            totals.append(_collected(out.stderr))
    return (totals[1] - totals[0]) / count


def stream_round_trips(root: Path, tls: bool, trips: int) -> float:
    """Instructions of the relay per TLS or TCP round trip, one in flight."""
    sys.path.insert(0, str(REPO))
    from benchmarks import bench_stream as b
    from tests.certs import make_certificate

    work = Path(tempfile.mkdtemp(prefix="bench-ir-"))
    cert, key = make_certificate(work / "tls", ips=("127.0.0.1",))
    low, high = 34000, 34199
    server = b.Server("ours", cert, key, low, high, work)
    out = work / "callgrind.out"
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=%s" % out] + server.argv
    env = dict(os.environ, PYTHONPATH=str(root))
    with open(work / "server.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", server.tls_port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the relay did not start under valgrind; see %s" % (work / "server.log"))
                time.sleep(0.5)
        time.sleep(1.0)
        client = b.StreamClient(server, tls)
        client.allocate()
        peer = b.echo_peer((low, high))
        peer.settimeout(30)
        client.channel_bind(peer.getsockname())
        sock = client.sock
        sock.settimeout(30)
        frame = struct.pack("!HH", b.CHANNEL, 100) + os.urandom(100)

        def loop(n: int) -> None:
            for _ in range(n):
                sock.sendall(frame)
                data, addr = peer.recvfrom(65536)
                peer.sendto(data, addr)
                got = b""
                while len(got) < len(frame):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("the relay closed the connection")
                    got += chunk

        _instrumented(proc, loop, trips)
        total = _callgrind_total(out)
        sock.close()
        peer.close()
        return total / trips
    finally:
        proc.kill()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def _instrumented(proc: "subprocess.Popen[bytes]", loop: Callable[[int], None], trips: int) -> None:
    """Warm up with 200 round trips, then count the instructions of
    ``trips`` more (callgrind's instrumentation on around them) and dump."""
    loop(200)
    control = ["callgrind_control"]
    subprocess.run(control + ["-i", "on", str(proc.pid)], capture_output=True, check=True, timeout=60)
    loop(trips)
    subprocess.run(control + ["-i", "off", str(proc.pid)], capture_output=True, check=True, timeout=60)
    subprocess.run(control + ["-d", str(proc.pid)], capture_output=True, check=True, timeout=60)
    time.sleep(2.0)


def _callgrind_total(out: Path) -> int:
    total = 0
    for path in glob.glob(str(out) + "*"):
        with open(path) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
    return total


def udp_round_trips(root: Path, trips: int, annotate: str = "") -> float:
    """Instructions of the relay per UDP ChannelData round trip, one in flight."""
    sys.path.insert(0, str(REPO))
    from benchmarks import _procs
    from benchmarks._turnclient import wait_for_binding
    from benchmarks.bench_relay import CHANNEL, Target

    work = Path(tempfile.mkdtemp(prefix="bench-ir-"))
    out = work / "callgrind.out"
    server = _procs.Server("ours", 34200, 34399, root=None if root == REPO else str(root))
    server.port = _procs.free_port()
    argv, env = server._command()
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=%s" % out] + argv
    with open(work / "server.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_binding(server.address, 300.0)
        server.proc = proc
        target = Target(server, 1)
        sock, peer = target.client.sock, target.peer
        sock.settimeout(30)
        peer.settimeout(30)
        frame = struct.pack("!HH", CHANNEL, 100) + os.urandom(100)

        def loop(n: int) -> None:
            for _ in range(n):
                sock.send(frame)
                data, addr = peer.recvfrom(65536)
                peer.sendto(data, addr)
                if len(sock.recv(65536)) != len(frame):
                    raise RuntimeError("a short ChannelData came back")
                # A pause, so that the relay sleeps in epoll_wait before each datagram.
                time.sleep(0.0005)

        _instrumented(proc, loop, trips)
        if annotate:
            dumps = sorted(glob.glob(str(out) + "*"), key=os.path.getmtime)
            with open(annotate, "w") as f:  # by function: exclusive, then inclusive
                for inclusive in ("no", "yes"):
                    f.flush()
                    subprocess.run(["callgrind_annotate", "--inclusive=" + inclusive, dumps[-1]], stdout=f, timeout=120)
        return _callgrind_total(out) / trips
    finally:
        server.proc = None
        proc.kill()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(REPO), help="the tree to measure (default: this one)")
    parser.add_argument("--cases", default="tls,tcp,flood", help="tls, tcp, flood, flood:<kind>; comma-separated")
    parser.add_argument("--trips", type=int, default=2000, help="round trips (tls, tcp) or datagrams (flood) counted")
    parser.add_argument("--annotate", default="", help="udp: write callgrind_annotate's breakdown to this file")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed", file=sys.stderr)
        return 2
    root = Path(args.root).resolve()
    print("| tree | case | instructions (user space) |")
    print("|---|---|---:|")
    for case in [c for c in args.cases.split(",") if c]:
        if case in ("tls", "tcp"):
            value, unit = stream_round_trips(root, case == "tls", args.trips), "per round trip"
        elif case == "udp":
            value, unit = udp_round_trips(root, args.trips, args.annotate), "per round trip"
        elif case == "flood" or case.startswith("flood:"):
            kind = case.partition(":")[2] or "all"
            value, unit = flood_core(root, kind, args.trips), "per datagram (%s)" % kind
        else:
            print("unknown case %r" % case, file=sys.stderr)
            return 2
        print("| %s | %s | %.1fk %s |" % (root, case, value / 1000, unit), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
