"""Closed-loop round trips through a TURN relay in network namespaces (root).

One command::

    sudo .venv/bin/python -m benchmarks.bench_xdp [--runs 5] [--seconds 5] [--window 64]
        [--xdp-modes generic auto] [--router-gro native|all|none]

Topology (``tests/xdp/netns.py``): client, peer, router and one namespace per
relay configuration (so that no server's traffic crosses another server's
XDP program), joined by veth pairs through the router.  A small C load generator (compiled
here with cc) keeps ``--window`` datagrams in flight from the client and an
echo in the peer namespace returns each one; every answer sends the next
datagram.  Configurations, each measured at 100 B and 1200 B payloads:

(a) no relay: client -> router -> peer echo and back (the ceiling);
(e) no relay, but routed through a namespace like a relay's: client ->
    router -> "fwd" (plain kernel IP forwarding, back out of its one
    interface) -> router -> peer echo, and the same way back: the hops every
    relayed datagram takes in this topology, without any TURN work;
(b) our relay with the XDP fast path, once per ``--xdp-modes`` entry
    (``--ebpf-attach-mode``; ``generic`` in namespace "relay", ``auto`` in
    namespace "xdpauto", where the router's end of the veth gets GRO on so
    that native mode can deliver: see benchmarks/README.md);
(c) our relay, userspace only (the Twisted process relays);
(d) coturn (``turnserver``, one relay thread per CPU by default);
(c) and (d) share the namespace "plain", which has no XDP program.

For (b)-(d) the client holds an allocation and a channel to the echo, so a
round trip is two relayed datagrams (client->peer and peer->client).

Reported per configuration and size, medians over ``--runs`` runs of
``--seconds`` each: round trips/s; machine CPU per round trip (busy time of
all CPUs from ``/proc/stat``, load generator and echo included); and the
relay's own CPU per relayed datagram: the relay process's CPU time for (c)
and (d), the XDP program's run time (``kernel.bpf_stats_enabled``) for (b),
taken in a separate 1 s run after the timed ones: run-time statistics cost
two clock reads per program run, which the timed runs must not pay.

Every namespace is deleted and every process started here is killed at the
end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.xdp.netns import (  # noqa: E402
    ADDR,
    HIGHEST,
    LISTEN_PORT,
    LOWEST,
    SECRET,
    BlockingTurnClient,
    RelayProcess,
    Topology,
    need_root,
)

CHAN = 0x4000
PEER_PORT = 7000
COTURN_USER = ("bench", "bench-password")

LOOP_C = r"""
/* Closed-loop UDP load: "echo FD" reflects datagrams to their sender;
 * "client FD PREFIXHEX SIZE WINDOW SECONDS" keeps WINDOW datagrams of SIZE
 * payload bytes (after PREFIX) in flight on a connected socket and prints
 * the round trips completed in SECONDS. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <netinet/in.h>

#define BATCH 64
static unsigned char bufs[BATCH][65536];

static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int fd = atoi(argv[2]);
    /* Python leaves sockets with a timeout non-blocking: block here. */
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_storage addrs[BATCH];
    if (!strcmp(argv[1], "echo")) {
        for (;;) {
            for (int i = 0; i < BATCH; i++) {
                iov[i].iov_base = bufs[i]; iov[i].iov_len = sizeof bufs[i];
                memset(&msgs[i], 0, sizeof msgs[i]);
                msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
                msgs[i].msg_hdr.msg_name = &addrs[i]; msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
            }
            int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
            if (n <= 0) { if (errno == EINTR) continue; return 1; }
            for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
            sendmmsg(fd, msgs, n, 0);
        }
    }
    if (argc < 7) return 2;
    size_t plen = strlen(argv[3]) / 2, size = atoi(argv[4]);
    int window = atoi(argv[5]);
    double seconds = atof(argv[6]);
    unsigned char out[65536];
    for (size_t i = 0; i < plen; i++) sscanf(argv[3] + 2 * i, "%2hhx", &out[i]);
    memset(out + plen, 'x', size);
    size_t len = plen + size;
    /* Late answers of a previous run would widen the window: drain them. */
    usleep(200000);
    while (recv(fd, bufs[0], sizeof bufs[0], MSG_DONTWAIT) >= 0 || errno == ECONNREFUSED) {}
    struct timeval tv = {0, 50000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct mmsghdr smsgs[BATCH];
    struct iovec siov = {out, len};
    for (int i = 0; i < BATCH; i++) { memset(&smsgs[i], 0, sizeof smsgs[i]); smsgs[i].msg_hdr.msg_iov = &siov; smsgs[i].msg_hdr.msg_iovlen = 1; }
    int w = window > BATCH ? BATCH : window;
    sendmmsg(fd, smsgs, w, 0);
    long done = 0, lost_windows = 0;
    double end = now() + seconds;
    while (now() < end) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i]; iov[i].iov_len = sizeof bufs[i];
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) { lost_windows++; sendmmsg(fd, smsgs, w, 0); continue; }
            if (errno == EINTR || errno == ECONNREFUSED) continue;
            perror("recvmmsg"); return 1;
        }
        done += n;
        sendmmsg(fd, smsgs, n, 0);
    }
    printf("%ld %ld\n", done, lost_windows);
    return 0;
}
"""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="bench-xdp-")
        self.loop = os.path.join(self.tmp, "loop")
        self.procs: List[subprocess.Popen] = []  # type: ignore[type-arg]
        self.topology = Topology("fzb")
        #: (e)'s own namespaces: its router needs policy rules, which would
        #: slow every route lookup of the main router.
        self.forwarding: Optional[Topology] = None
        self.relays: List[RelayProcess] = []
        self.router_programs: List[object] = []
        #: kernel.bpf_stats_enabled as found, restored at the end
        self.bpf_stats_before: Optional[str] = None
        with open("/proc/loadavg") as f:
            self.load_before = " ".join(f.read().split()[:3])

    # --- plumbing -----------------------------------------------------------------------

    def build(self) -> None:
        src = os.path.join(self.tmp, "loop.c")
        with open(src, "w") as f:
            f.write(LOOP_C)
        subprocess.run(["cc", "-O2", "-o", self.loop, src], check=True)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        self.procs = []
        if self.router_programs:
            with self.topology.entered("router"):
                for program in self.router_programs:
                    program.close()  # type: ignore[attr-defined]
            self.router_programs = []
        self.topology.destroy()
        if self.forwarding is not None:
            self.forwarding.destroy()
        self.set_bpf_stats(None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def spawn(self, argv: Sequence[str], fds: Sequence[int] = (), **kw: object) -> subprocess.Popen:  # type: ignore[type-arg]
        proc = subprocess.Popen(list(argv), pass_fds=tuple(fds), **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def start_echo(self, family: int) -> socket.socket:
        s = self.topology.socket("peer", family)
        s.bind((ADDR["peer"][family == 6], PEER_PORT))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.spawn([self.loop, "echo", str(s.fileno())], fds=[s.fileno()])
        return s

    def client_socket(self, family: int = 4) -> socket.socket:
        s = self.topology.socket("client", family)
        s.bind((ADDR["client"][family == 6], 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        return s

    # --- measurements -----------------------------------------------------------------------

    @staticmethod
    def busy_jiffies() -> Tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    @staticmethod
    def process_cpu(pid: int) -> float:
        """CPU seconds of ``pid`` and its children still running (ip netns exec execs in place)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/%d/stat" % pid) as f:
            parts = f.read().rsplit(")", 1)[1].split()
        total += (int(parts[11]) + int(parts[12])) / tick
        return total

    def set_bpf_stats(self, on: Optional[bool]) -> None:
        """kernel.bpf_stats_enabled on or off; None: back to the value found."""
        path = "/proc/sys/kernel/bpf_stats_enabled"
        try:
            if self.bpf_stats_before is None:
                if on is None:
                    return
                with open(path) as f:
                    self.bpf_stats_before = f.read().strip()
            value = self.bpf_stats_before if on is None else ("1" if on else "0")
            with open(path, "w") as f:
                f.write(value)
        except OSError:
            pass

    def bpf_stats(self, role: str) -> Tuple[int, int]:
        """(run_time_ns, run_cnt) of the XDP program on the eth0 of ``role``."""
        out = self.topology.ip(role, "-d", "link", "show", "dev", "eth0").stdout
        prog_id = None
        words = out.split()
        for i, w in enumerate(words):
            if w == "id" and i > 0 and "xdp" in " ".join(words[max(0, i - 8) : i]):
                prog_id = words[i + 1]
                break
        if prog_id is None:
            return 0, 0
        import json

        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", prog_id], capture_output=True, text=True).stdout or "{}")
        return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))

    def run_client(
        self, sock: socket.socket, prefix: bytes, size: int, pid: Optional[int], xdp: Optional[str], seconds: Optional[float] = None
    ) -> Dict[str, float]:
        """``xdp``: the namespace role whose XDP program to account (run-time
        statistics on for this run), or None."""
        seconds = self.args.seconds if seconds is None else seconds
        if xdp:
            self.set_bpf_stats(True)
        cpu0 = self.process_cpu(pid) if pid else 0.0
        bpf0 = self.bpf_stats(xdp) if xdp else (0, 0)
        busy0, all0 = self.busy_jiffies()
        done = subprocess.run(
            [self.loop, "client", str(sock.fileno()), prefix.hex(), str(size), str(self.args.window), str(seconds)],
            pass_fds=(sock.fileno(),),
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        busy1, all1 = self.busy_jiffies()
        cpu1 = self.process_cpu(pid) if pid else 0.0
        bpf1 = self.bpf_stats(xdp) if xdp else (0, 0)
        if xdp:
            self.set_bpf_stats(False)
        count, lost = (int(x) for x in done.stdout.split())
        rts = count / seconds
        tick = os.sysconf("SC_CLK_TCK")
        result = {
            "rts": rts,
            "machine_us_per_rt": (busy1 - busy0) / tick / max(count, 1) * 1e6,
            "lost_windows": lost,
        }
        if xdp:
            runs = max(bpf1[1] - bpf0[1], 1)
            result["relay_us_per_pkt"] = (bpf1[0] - bpf0[0]) / runs / 1000.0
        elif pid:
            result["relay_us_per_pkt"] = (cpu1 - cpu0) / max(2 * count, 1) * 1e6
        return result

    # --- configurations ------------------------------------------------------------------------
    #
    # All servers run at once, each on its own listen port and allocation range
    # (the XDP program only looks at its relay's ports and passes the others),
    # and the runs are interleaved: (a) (b) (c) (d), (a) (b) (c) (d), ... so that
    # background load on a shared machine spreads over every configuration alike.

    def turn_socket(self, role: str, port: int, credentials: Optional[Tuple[str, str]] = None) -> socket.socket:
        server = self.topology.addr[role][0]
        sock = self.client_socket()
        client = BlockingTurnClient(sock, (server, port))
        client.allocate(SECRET, credentials=credentials)
        error = client.channel_bind(CHAN, (ADDR["peer"][0], PEER_PORT))
        if error is not None:
            raise RuntimeError("ChannelBind failed with %s" % error)
        sock.connect((server, port))
        return sock

    def start_ours(self, role: str, index: int, mode: Optional[str]) -> Tuple[socket.socket, int, str]:
        """Our relay in ``role``'s namespace; ``mode`` the XDP attach mode, None for userspace only.
        Returns (socket, pid, the mode the XDP program attached in and how it sends, or "")."""
        relay = RelayProcess(
            self.topology,
            self.tmp,
            xdp=mode is not None,
            listen_port=LISTEN_PORT + index,
            ports=(LOWEST + 1000 * index, HIGHEST + 1000 * index),
            metrics_port=9108 + index,
            attach_mode=mode,
            role=role,
        )
        self.procs.append(relay.proc)
        self.relays.append(relay)
        relay.wait_ready()
        attached = ""
        if mode is not None:
            output = relay.output()
            found = re.search(r"XDP fast path attached to eth0 \((\w+) mode, sending with (\w+)", output)
            if found is None:
                raise RuntimeError("the XDP fast path did not attach:\n%s" % output[-3000:])
            attached = "%s, %s" % found.groups()
            fallback = re.search(r'"msg": "XDP native \(driver\) mode not used on eth0[^"]*: ([^"]*)"', output)
            if fallback:
                print("  XDP %s: native mode not used: %s" % (mode, fallback.group(1)), flush=True)
        return self.turn_socket(role, LISTEN_PORT + index), relay.proc.pid, attached

    def start_forwarding(self) -> socket.socket:
        """(e): a topology of its own whose "relay" namespace only forwards
        (kernel IP forwarding, out of the interface it came in on, as XDP_TX
        sends): client -> router -> relay -> router -> peer and back.  The
        router sends what the client sends to the peer, and what the peer
        answers, through the relay namespace (policy rules), and what comes
        back from there straight on."""
        t = self.forwarding = Topology("fzf")
        t.create()
        t.exec("relay", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for conf in ("all", "eth0"):
            t.exec("relay", "sysctl", "-q", "-w", "net.ipv4.conf.%s.send_redirects=0" % conf)
        relay = ADDR["relay"][0]
        t.ip("router", "route", "add", "default", "via", relay, "table", "101")
        t.ip("router", "route", "add", "10.0.1.0/24", "dev", "to-client", "table", "100")
        t.ip("router", "route", "add", "10.0.2.0/24", "dev", "to-peer", "table", "100")
        t.ip("router", "rule", "add", "iif", "to-relay", "lookup", "100", "pref", "100")
        t.ip("router", "rule", "add", "iif", "to-client", "to", ADDR["peer"][0], "lookup", "101", "pref", "101")
        t.ip("router", "rule", "add", "iif", "to-peer", "to", ADDR["client"][0], "lookup", "101", "pref", "102")
        for conf in ("all", "to-relay", "to-client", "to-peer"):
            t.exec("router", "sysctl", "-q", "-w", "net.ipv4.conf.%s.rp_filter=0" % conf)
        echo = t.socket("peer", 4)
        echo.bind((ADDR["peer"][0], PEER_PORT))
        echo.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.spawn([self.loop, "echo", str(echo.fileno())], fds=[echo.fileno()])
        sock = t.socket("client", 4)
        sock.bind((ADDR["client"][0], 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.connect((ADDR["peer"][0], PEER_PORT))
        forwarded0 = self.forwarded()
        sock.send(b"probe")
        sock.settimeout(5)
        sock.recv(64)
        if self.forwarded() - forwarded0 < 2:
            raise RuntimeError("(e): the probe did not go through the forwarding namespace")
        return sock

    def forwarded(self) -> int:
        """IP datagrams forwarded by (e)'s relay namespace (ForwDatagrams)."""
        assert self.forwarding is not None
        lines = [line.split() for line in self.forwarding.exec("relay", "cat", "/proc/net/snmp").stdout.splitlines() if line.startswith("Ip:")]
        return int(lines[1][lines[0].index("ForwDatagrams")])

    def start_coturn(self, role: str) -> Optional[Tuple[socket.socket, int]]:
        turnserver = shutil.which("turnserver")
        if turnserver is None:
            print("  (d) coturn: turnserver not installed (apt-get install coturn); skipped")
            return None
        port = LISTEN_PORT + 99
        address = self.topology.addr[role][0]
        argv = [
            "ip", "netns", "exec", self.topology.ns[role], turnserver,
            "--listening-ip", address, "--relay-ip", address,
            "--listening-port", str(port), "--min-port", str(LOWEST + 2000), "--max-port", str(HIGHEST + 2000),
            "--realm", "firezone", "--lt-cred-mech", "--user", "%s:%s" % COTURN_USER,
            "--allowed-peer-ip", ADDR["peer"][0], "--no-multicast-peers", "--no-cli", "--no-tls", "--no-dtls",
            "--pidfile", os.path.join(self.tmp, "turnserver.pid"), "--userdb", os.path.join(self.tmp, "turndb"),
            "--log-file", os.path.join(self.tmp, "turnserver.log"), "--simple-log", "--no-stdout-log",
        ]
        proc = self.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                return self.turn_socket(role, port, COTURN_USER), proc.pid
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)

    def main(self) -> int:
        self.set_bpf_stats(False)
        self.build()
        self.topology.create()
        a = self.args
        configs = a.configs
        modes = a.xdp_modes if "b" in configs else []
        roles = {mode: ("relay" if i == 0 else "xdp%s" % mode) for i, mode in enumerate(modes)}
        n = 4
        for mode, role in roles.items():
            if role != "relay":
                self.topology.add_relay(role, n)
                n += 1
        if "c" in configs or "d" in configs:
            self.topology.add_relay("plain", n)
        for mode, role in roles.items():
            if a.router_gro == "all" or (a.router_gro == "native" and mode != "generic"):
                self.topology.exec("router", "ethtool", "-K", "to-%s" % role, "gro", "on")
        if a.router_xdp:
            from firezone_relay.xdp import loader

            for mode, role in roles.items():
                if mode != "generic":
                    # A pass-everything program (ours, disabled) on the router's end.
                    with self.topology.entered("router"):
                        program = loader.XdpProgram(loader.build_object(self.tmp), "to-%s" % role)
                        program.configure(loader.Settings(LISTEN_PORT, LOWEST, HIGHEST), enabled=False)
                        program.attach("driver")
                    self.router_programs.append(program)
        if a.router_gro == "all":
            for role in ("client", "peer", "plain"):
                if role in self.topology.ns:
                    self.topology.exec("router", "ethtool", "-K", "to-%s" % role, "gro", "on")
        self.start_echo(4)
        direct = self.client_socket()
        direct.connect((ADDR["peer"][0], PEER_PORT))
        # name -> (socket, server pid or None, ChannelData framing, namespace of the XDP program or None)
        setups: Dict[str, Tuple[socket.socket, Optional[int], bool, Optional[str]]] = {
            "(a) no relay": (direct, None, False, None)
        }
        if "e" in configs:
            setups["(e) no relay, forwarded by a namespace like the relay's"] = (self.start_forwarding(), None, False, None)
        for index, (mode, role) in enumerate(roles.items()):
            sock, pid, attached = self.start_ours(role, index, mode)
            setups["(b) XDP %s (%s)" % (mode, attached)] = (sock, pid, True, role)
        if "c" in configs:
            sock, pid, _ = self.start_ours("plain", 10, None)
            setups["(c) our relay, userspace"] = (sock, pid, True, None)
        if "d" in configs:
            started = self.start_coturn("plain")
            if started is not None:
                setups["(d) coturn %s" % coturn_version()] = (started[0], started[1], True, None)
        results: Dict[str, Dict[int, List[Dict[str, float]]]] = {name: {} for name in setups}
        for size in self.args.sizes:
            for name, (sock, pid, framed, xdp) in setups.items():
                prefix = struct.pack("!HH", CHAN, size) if framed else b""
                self.run_client_warmup(sock, prefix, size)
                results[name][size] = []
            for _ in range(self.args.runs):
                for name, (sock, pid, framed, xdp) in setups.items():
                    prefix = struct.pack("!HH", CHAN, size) if framed else b""
                    # (b): no process CPU (the relay process is idle), no run-time statistics (see below)
                    results[name][size].append(self.run_client(sock, prefix, size, None if xdp else pid, None))
            for name, (sock, pid, framed, xdp) in setups.items():
                if xdp:
                    prefix = struct.pack("!HH", CHAN, size)
                    probe = self.run_client(sock, prefix, size, None, xdp, seconds=1.0)
                    for r in results[name][size]:
                        r["relay_us_per_pkt"] = probe["relay_us_per_pkt"]
            for name in setups:
                runs = results[name][size]
                print(
                    "  %-30s %5d B: %9.0f round trips/s (median of %d; %d stalls of 50 ms refilled)"
                    % (name, size, statistics.median(r["rts"] for r in runs), len(runs), sum(r["lost_windows"] for r in runs)),
                    flush=True,
                )
        for relay in self.relays:
            relay.stop()
        self.report(results)
        return 0

    def run_client_warmup(self, sock: socket.socket, prefix: bytes, size: int) -> None:
        subprocess.run(
            [self.loop, "client", str(sock.fileno()), prefix.hex(), str(size), str(self.args.window), "1"],
            pass_fds=(sock.fileno(),), capture_output=True, timeout=30,
        )

    def report(self, results: Dict[str, Dict[int, List[Dict[str, float]]]]) -> None:
        a = self.args
        print()
        print(
            "IPv4, window %d, medians of %d x %g s, %d CPUs, kernel %s, router GRO %s%s, load average before: %s"
            % (
                a.window, a.runs, a.seconds, os.cpu_count() or 0, os.uname().release, a.router_gro,
                ", router XDP pass program" if a.router_xdp else "", self.load_before,
            )
        )
        print()
        print(
            "| configuration | payload | round trips/s | vs no relay | vs (e) forwarded | vs coturn "
            "| machine CPU µs / round trip | relay CPU µs / relayed packet |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        base = results["(a) no relay"]
        forwarded = next((v for k, v in results.items() if k.startswith("(e)")), None)
        coturn = next((v for k, v in results.items() if k.startswith("(d)")), None)

        def vs(runs: List[Dict[str, float]], other: Optional[Dict[int, List[Dict[str, float]]]], size: int) -> str:
            if other is None or other[size] is runs:
                return "–"
            return "%.2f×" % (statistics.median(r["rts"] for r in runs) / statistics.median(r["rts"] for r in other[size]))

        for name, by_size in results.items():
            for size, runs in by_size.items():
                rts = statistics.median(r["rts"] for r in runs)
                machine = statistics.median(r["machine_us_per_rt"] for r in runs)
                relay = [r["relay_us_per_pkt"] for r in runs if "relay_us_per_pkt" in r]
                print(
                    "| %s | %d B | %.0f | %s | %s | %s | %.1f | %s |"
                    % (
                        name, size, rts, vs(runs, base, size) if runs is not base[size] else "1.00×",
                        vs(runs, forwarded, size), vs(runs, coturn, size) if not name.startswith(("(a)", "(e)")) else "–",
                        machine,
                        ("%.2f" % statistics.median(relay)) if relay else "–",
                    )
                )


def coturn_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "coturn"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    return out.split("-")[0] if out else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1200])
    parser.add_argument("--configs", nargs="+", default=["a", "b", "c", "d", "e"], help="subset of a b c d e ((a) always runs)")
    parser.add_argument(
        "--xdp-modes", nargs="+", default=["generic", "auto"], choices=["generic", "auto", "driver"],
        help="one (b) relay per --ebpf-attach-mode, each in its own namespace",
    )
    parser.add_argument(
        "--router-gro", default="native", choices=["native", "all", "none"],
        help="GRO on the router's end of the veth: of relays in auto/driver mode (native), of every link (all), "
        "or nowhere (none: auto then falls back to generic on veth)",
    )
    parser.add_argument(
        "--router-xdp", action="store_true",
        help="attach a pass-everything XDP program (native) on the router's end of relays in auto/driver mode, "
        "the other way to give that veth end a receive ring (combine with --router-gro none)",
    )
    args = parser.parse_args(argv)
    reason = need_root()
    if reason is not None:
        print("bench_xdp: %s" % reason, file=sys.stderr)
        return 2
    bench = Bench(args)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return bench.main()
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
