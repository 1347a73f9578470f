"""Closed-loop ChannelData round trips through one real allocation, ours vs coturn.

    python -m benchmarks.bench_relay            # ~2-3 minutes; prints and updates benchmarks/README.md

Both servers run on loopback, started here (``benchmarks/_procs.py`` has the
exact command lines).  For each server one allocation is made with a channel
bound to an echo peer on 127.0.0.1; a load generator keeps ``--inflight``
ChannelData datagrams in flight (client -> relay -> peer -> relay -> client,
a new one sent as soon as one returns, a lost one replaced after
``--timeout-ms``), ``--warmup`` seconds of warm-up, then ``--measure`` seconds
measured; ``--runs`` runs per server and size, interleaved between the
servers, medians reported.  Each round trip is two relayed packets; the relay
CPU per packet is the server's CPU time over the measured window (every
thread) divided by twice the round trips.

The load generator is a small C program (below), compiled with ``cc`` at run
time into a temporary directory, batching with recvmmsg/sendmmsg; it gets the
Python client's sockets by descriptor.  Without a C compiler a pure-Python
generator is used instead (``--client python``), which is slower than coturn.

The machine is shared: every run also records the CPU used by *other*
processes (``/proc/stat`` minus server and generator); a run where they used
more than ``--noise-limit`` of a core is repeated (a bounded number of times)
and flagged when it stays noisy.

Then ``turnutils_uclient -c -m 100`` (coturn's test client, 100 clients, no
RTCP allocation) sends paced 100-byte messages through each server to
``turnutils_peer`` and reports loss.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import resource
import select
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from benchmarks import _procs
from benchmarks._procs import Server, free_port, machine_facts
from benchmarks._turnclient import TurnClient

CHANNEL = 0x4000
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------
# The C load generator.

C_SOURCE = r'''
/* Closed-loop ChannelData load generator for benchmarks/bench_relay.py.
 *
 *   _closed_loop CLIENT_FDS PEER_FD CHANNEL SIZE INFLIGHT WARMUP_S MEASURE_S TIMEOUT_MS [GSO]
 *
 * CLIENT_FDS: comma-separated UDP sockets, each connected to the TURN server
 * and holding its own allocation with CHANNEL bound to the address of PEER_FD
 * (set up by the Python side).  PEER_FD: the peer's bound UDP socket;
 * everything it receives is echoed back to the sender (the relay's
 * allocation port of that client).
 *
 * Each client has INFLIGHT slots, each keeping one ChannelData datagram of
 * SIZE payload bytes in flight: when it comes back (client -> relay -> peer ->
 * relay -> client) the RTT is recorded and the slot sends the next one.  A
 * slot silent for TIMEOUT_MS counts one loss and sends a new datagram.  After
 * WARMUP_S seconds the counters restart and "WARM" is printed; after
 * MEASURE_S more seconds one "DONE ..." line with the results is printed and
 * the program exits.  Batched with recvmmsg/sendmmsg so that the generator
 * costs little CPU.
 *
 * GSO=1 (``--generator-gso``): what one batch sends to one destination (a
 * client's datagrams to the server, the echoes to one allocation port) leaves
 * in one UDP_SEGMENT send, which the kernel cuts into the same datagrams
 * before they reach the destination socket; loopback's transmit and IP
 * receive path, which the sender pays, then runs once per batch rather than
 * once per datagram.  A kernel that refuses UDP_SEGMENT turns it off.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAXPKT 2048
#define MAXCLIENTS 1024
#define MAX_SAMPLES (16u * 1024u * 1024u)
#define GSO_BYTES 60000 /* payload bytes at most in one UDP_SEGMENT send */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t self_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

struct slot { uint32_t seq; uint64_t sent; };

static int client_fds[MAXCLIENTS], nclients, peer_fd, channel, size, inflight, nslots;
static struct slot *slots;
static unsigned char out_buf[BATCH][MAXPKT];
static struct iovec out_iov[BATCH];
static struct mmsghdr out_msgs[BATCH];
static int out_n, out_fd = -1;
static uint64_t sent_total, send_errors;
static int gso;

/* msgs[0..n): one destination (``name``, NULL when connected), every datagram
 * ``len`` bytes but perhaps the last.  With GSO, as UDP_SEGMENT sends of up to
 * GSO_BYTES; returns how many datagrams went out, or -1 when the kernel
 * refused UDP_SEGMENT (GSO is then off and nothing was sent). */
static int send_segmented(int fd, struct mmsghdr *msgs, int n, int len, void *name, socklen_t namelen) {
    static struct iovec iov[BATCH];
    union { char buf[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; } u;
    int per = GSO_BYTES / len, off = 0;
    if (!gso) return -1;
    if (per > BATCH) per = BATCH;
    while (off < n) {
        int k = n - off < per ? n - off : per;
        struct msghdr h;
        memset(&h, 0, sizeof h);
        for (int i = 0; i < k; i++) iov[i] = *msgs[off + i].msg_hdr.msg_iov;
        h.msg_name = name;
        h.msg_namelen = namelen;
        h.msg_iov = iov;
        h.msg_iovlen = k;
        if (k > 1) {
            memset(&u, 0, sizeof u);
            h.msg_control = u.buf;
            h.msg_controllen = sizeof u.buf;
            struct cmsghdr *cm = CMSG_FIRSTHDR(&h);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t seg = (uint16_t)len;
            memcpy(CMSG_DATA(cm), &seg, sizeof seg);
        }
        if (sendmsg(fd, &h, 0) >= 0) { off += k; continue; }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            struct pollfd p = {fd, POLLOUT, 0};
            poll(&p, 1, 10);
            continue;
        }
        if (off == 0 && k > 1 && (errno == EINVAL || errno == EIO || errno == ENOPROTOOPT || errno == EOPNOTSUPP)) {
            gso = 0;
            fprintf(stderr, "UDP_SEGMENT refused (%s): GSO off\n", strerror(errno));
            return -1;
        }
        break; /* e.g. ECONNREFUSED: the rest is counted, the slots time out */
    }
    return off;
}

static void flush_sends(void) {
    if (gso && out_n > 1) {
        int r = send_segmented(out_fd, out_msgs, out_n, 4 + size, NULL, 0);
        if (r >= 0) {
            sent_total += r;
            send_errors += out_n - r;
            out_n = 0;
            return;
        }
    }
    int off = 0;
    while (off < out_n) {
        int r = sendmmsg(out_fd, out_msgs + off, out_n - off, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd p = {out_fd, POLLOUT, 0};
                poll(&p, 1, 10);
                continue;
            }
            send_errors += out_n - off; /* e.g. ECONNREFUSED: counted, the slot times out */
            break;
        }
        sent_total += r;
        off += r;
    }
    out_n = 0;
}

/* Slot i belongs to client i / inflight; sends are batched per client socket. */
static void queue_send(int i, uint64_t t) {
    int fd = client_fds[i / inflight];
    if (out_n && (out_fd != fd || out_n == BATCH)) flush_sends();
    out_fd = fd;
    unsigned char *b = out_buf[out_n];
    slots[i].seq++;
    slots[i].sent = t;
    b[0] = channel >> 8; b[1] = channel & 0xff;
    b[2] = size >> 8; b[3] = size & 0xff;
    memcpy(b + 4, &i, 4);
    memcpy(b + 8, &slots[i].seq, 4);
    out_iov[out_n].iov_base = b;
    out_iov[out_n].iov_len = 4 + size;
    memset(&out_msgs[out_n].msg_hdr, 0, sizeof(struct msghdr));
    out_msgs[out_n].msg_hdr.msg_iov = &out_iov[out_n];
    out_msgs[out_n].msg_hdr.msg_iovlen = 1;
    out_n++;
}

/* Echoes in_msgs[0..n) (with their senders in msg_name) as GSO sends: each
 * sender's datagrams of one length, in their order, in one send. */
static void echo_segmented(struct mmsghdr *in, struct iovec *iov, int n) {
    static struct mmsghdr grp[BATCH];
    static char done[BATCH];
    memset(done, 0, n);
    for (int i = 0; i < n; i++) {
        if (done[i]) continue;
        int k = 0;
        unsigned len = in[i].msg_len;
        struct msghdr *a = &in[i].msg_hdr;
        for (int j = i; j < n; j++) {
            struct msghdr *b = &in[j].msg_hdr;
            if (done[j] || in[j].msg_len != len || b->msg_namelen != a->msg_namelen
                || memcmp(b->msg_name, a->msg_name, a->msg_namelen) != 0) continue;
            done[j] = 1;
            iov[j].iov_len = len;
            grp[k++] = in[j];
        }
        if (send_segmented(peer_fd, grp, k, (int)len, a->msg_name, a->msg_namelen) < 0) {
            /* GSO refused: this group one datagram a message */
            for (int g = 0; g < k; g++) sendmsg(peer_fd, &grp[g].msg_hdr, 0);
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 9 && argc != 10) {
        fprintf(stderr, "usage: %s CLIENT_FDS PEER_FD CHANNEL SIZE INFLIGHT WARMUP_S MEASURE_S TIMEOUT_MS [GSO]\n", argv[0]);
        return 2;
    }
    for (char *p = argv[1]; *p && nclients < MAXCLIENTS;) {
        client_fds[nclients++] = (int)strtol(p, &p, 10);
        if (*p == ',') p++;
    }
    peer_fd = atoi(argv[2]);
    channel = atoi(argv[3]);
    size = atoi(argv[4]);
    inflight = atoi(argv[5]);
    double warmup_s = atof(argv[6]), measure_s = atof(argv[7]);
    uint64_t timeout_ns = (uint64_t)atoi(argv[8]) * 1000000ull;
    gso = argc == 10 && atoi(argv[9]) != 0;
    if (size < 8 || size + 4 > MAXPKT || inflight < 1 || nclients < 1) {
        fprintf(stderr, "bad size, inflight or client list\n");
        return 2;
    }
    nslots = nclients * inflight;
    for (int c = 0; c < nclients; c++)
        fcntl(client_fds[c], F_SETFL, fcntl(client_fds[c], F_GETFL) | O_NONBLOCK);
    fcntl(peer_fd, F_SETFL, fcntl(peer_fd, F_GETFL) | O_NONBLOCK);
    for (int i = 0; i < BATCH; i++) memset(out_buf[i], 0xab, MAXPKT);

    slots = calloc(nslots, sizeof *slots);
    uint32_t *samples = malloc(MAX_SAMPLES * sizeof(uint32_t));
    struct pollfd *pfds = calloc(nclients + 1, sizeof *pfds);
    if (!slots || !samples || !pfds) return 3;
    size_t nsamples = 0;
    uint64_t lost = 0, stale = 0, done = 0;

    static unsigned char in_buf[BATCH][MAXPKT];
    static struct iovec in_iov[BATCH];
    static struct mmsghdr in_msgs[BATCH];
    static struct sockaddr_storage in_addr[BATCH];

    uint64_t start = now_ns();
    uint64_t warm_end = start + (uint64_t)(warmup_s * 1e9);
    uint64_t end = warm_end + (uint64_t)(measure_s * 1e9);
    int warm = 0;
    uint64_t t_measure = 0, cpu_measure = 0, sent_measure = 0;
    uint64_t last_scan = start;

    for (int i = 0; i < nslots; i++) queue_send(i, start);
    flush_sends();

    pfds[0].fd = peer_fd; pfds[0].events = POLLIN;
    for (int c = 0; c < nclients; c++) { pfds[c + 1].fd = client_fds[c]; pfds[c + 1].events = POLLIN; }
    for (;;) {
        uint64_t t = now_ns();
        if (!warm && t >= warm_end) {
            warm = 1;
            nsamples = 0; lost = 0; stale = 0; done = 0;
            t_measure = t; cpu_measure = self_cpu_ns(); sent_measure = sent_total;
            printf("WARM\n");
            fflush(stdout);
        }
        if (t >= end) break;
        if (t - last_scan >= 5000000ull) { /* timeouts, every 5 ms */
            last_scan = t;
            for (int i = 0; i < nslots; i++) {
                if (t - slots[i].sent >= timeout_ns) {
                    lost++;
                    queue_send(i, t);
                }
            }
            flush_sends();
        }
        int pr = poll(pfds, nclients + 1, 5);
        if (pr <= 0) continue;
        if (pfds[0].revents & POLLIN) { /* the echo peer */
            for (;;) {
                for (int i = 0; i < BATCH; i++) {
                    in_iov[i].iov_base = in_buf[i];
                    in_iov[i].iov_len = MAXPKT;
                    memset(&in_msgs[i].msg_hdr, 0, sizeof(struct msghdr));
                    in_msgs[i].msg_hdr.msg_iov = &in_iov[i];
                    in_msgs[i].msg_hdr.msg_iovlen = 1;
                    in_msgs[i].msg_hdr.msg_name = &in_addr[i];
                    in_msgs[i].msg_hdr.msg_namelen = sizeof in_addr[i];
                }
                int n = recvmmsg(peer_fd, in_msgs, BATCH, MSG_DONTWAIT, NULL);
                if (n <= 0) break;
                if (gso) {
                    echo_segmented(in_msgs, in_iov, n);
                    if (n < BATCH) break;
                    continue;
                }
                for (int i = 0; i < n; i++) in_iov[i].iov_len = in_msgs[i].msg_len;
                int off = 0;
                while (off < n) {
                    int r = sendmmsg(peer_fd, in_msgs + off, n - off, 0);
                    if (r < 0) {
                        if (errno == EINTR) continue;
                        if (errno == EAGAIN || errno == EWOULDBLOCK) {
                            struct pollfd p = {peer_fd, POLLOUT, 0};
                            poll(&p, 1, 10);
                            continue;
                        }
                        break;
                    }
                    off += r;
                }
                if (n < BATCH) break;
            }
        }
        for (int c = 0; c < nclients; c++) {
            if (!(pfds[c + 1].revents & (POLLIN | POLLERR))) continue;
            int fd = client_fds[c];
            for (;;) { /* the TURN client c */
                for (int i = 0; i < BATCH; i++) {
                    in_iov[i].iov_base = in_buf[i];
                    in_iov[i].iov_len = MAXPKT;
                    memset(&in_msgs[i].msg_hdr, 0, sizeof(struct msghdr));
                    in_msgs[i].msg_hdr.msg_iov = &in_iov[i];
                    in_msgs[i].msg_hdr.msg_iovlen = 1;
                }
                int n = recvmmsg(fd, in_msgs, BATCH, MSG_DONTWAIT, NULL);
                if (n <= 0) break;
                uint64_t tr = now_ns();
                for (int i = 0; i < n; i++) {
                    unsigned char *b = in_buf[i];
                    if (in_msgs[i].msg_len < 12 || (b[0] & 0xC0) != 0x40) continue;
                    int slot; uint32_t seq;
                    memcpy(&slot, b + 4, 4);
                    memcpy(&seq, b + 8, 4);
                    if (slot < c * inflight || slot >= (c + 1) * inflight || seq != slots[slot].seq) { stale++; continue; }
                    uint64_t rtt = tr - slots[slot].sent;
                    if (nsamples < MAX_SAMPLES) samples[nsamples++] = rtt > 0xffffffffull ? 0xffffffffu : (uint32_t)rtt;
                    done++;
                    queue_send(slot, tr);
                }
                flush_sends();
                if (n < BATCH) break;
            }
        }
    }
    uint64_t t_end = now_ns();
    uint64_t cpu_end = self_cpu_ns();
    qsort(samples, nsamples, sizeof(uint32_t), cmp_u32);
    double p50 = nsamples ? samples[nsamples / 2] / 1e6 : 0.0;
    double p99 = nsamples ? samples[(size_t)(nsamples * 0.99)] / 1e6 : 0.0;
    printf("DONE roundtrips=%llu elapsed_ns=%llu lost=%llu stale=%llu sent=%llu send_errors=%llu "
           "p50_ms=%.4f p99_ms=%.4f client_cpu_ns=%llu\n",
           (unsigned long long)done, (unsigned long long)(t_end - t_measure), (unsigned long long)lost,
           (unsigned long long)stale, (unsigned long long)(sent_total - sent_measure),
           (unsigned long long)send_errors, p50, p99, (unsigned long long)(cpu_end - cpu_measure));
    fflush(stdout);
    return 0;
}
'''


def build_generator(directory: str) -> Optional[str]:
    """Compile ``C_SOURCE``; the binary's path, or None without a working C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = os.path.join(directory, "closed_loop.c")
    exe = os.path.join(directory, "closed_loop")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    r = subprocess.run([cc, "-O2", "-Wall", "-o", exe, src], capture_output=True, text=True)
    if r.returncode != 0:
        print("C compiler failed, using the Python generator:\n" + r.stderr, file=sys.stderr)
        return None
    return exe


# ---------------------------------------------------------------------------
# The Python load generator (fallback): same protocol and output.


def python_closed_loop(
    client: socket.socket, peer: socket.socket, size: int, inflight: int, warmup: float, measure: float, timeout_ms: int, report: Any
) -> Dict[str, float]:
    client.setblocking(False)
    peer.setblocking(False)
    header = CHANNEL.to_bytes(2, "big") + size.to_bytes(2, "big")
    filler = b"\xab" * (size - 8)
    seqs = [0] * inflight
    sent_at = [0] * inflight
    ns = time.monotonic_ns
    timeout_ns = timeout_ms * 1_000_000
    samples: List[int] = []
    lost = stale = 0
    csend = client.send
    crecv = client.recv
    precvfrom = peer.recvfrom
    psendto = peer.sendto

    def send(i: int, t: int) -> None:
        seqs[i] += 1
        sent_at[i] = t
        try:
            csend(header + i.to_bytes(4, "little") + seqs[i].to_bytes(4, "little") + filler)
        except OSError:
            pass

    start = ns()
    warm_end = start + int(warmup * 1e9)
    end = warm_end + int(measure * 1e9)
    warm = False
    t_measure = cpu_measure = 0
    last_scan = start
    for i in range(inflight):
        send(i, start)
    ep = select.epoll()
    ep.register(client.fileno(), select.EPOLLIN)
    ep.register(peer.fileno(), select.EPOLLIN)
    cfd = client.fileno()
    while True:
        t = ns()
        if not warm and t >= warm_end:
            warm = True
            samples = []
            lost = stale = 0
            t_measure, cpu_measure = t, time.process_time_ns()
            report()
        if t >= end:
            break
        if t - last_scan >= 5_000_000:
            last_scan = t
            for i in range(inflight):
                if t - sent_at[i] >= timeout_ns:
                    lost += 1
                    send(i, t)
        for fd, _ev in ep.poll(0.005):
            if fd == cfd:
                while True:
                    try:
                        data = crecv(2048)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    tr = ns()
                    i = int.from_bytes(data[4:8], "little")
                    if len(data) < 12 or i >= inflight or int.from_bytes(data[8:12], "little") != seqs[i]:
                        stale += 1
                        continue
                    samples.append(tr - sent_at[i])
                    send(i, tr)
            else:
                while True:
                    try:
                        data, addr = precvfrom(2048)
                    except BlockingIOError:
                        break
                    try:
                        psendto(data, addr)
                    except OSError:
                        pass
    ep.close()
    t_end = ns()
    samples.sort()
    n = len(samples)
    return {
        "roundtrips": n,
        "elapsed_ns": t_end - t_measure,
        "lost": lost,
        "stale": stale,
        "p50_ms": samples[n // 2] / 1e6 if n else 0.0,
        "p99_ms": samples[int(n * 0.99)] / 1e6 if n else 0.0,
        "client_cpu_ns": time.process_time_ns() - cpu_measure,
    }


# ---------------------------------------------------------------------------
# Machine-wide CPU, to see other processes.


def global_cpu_ticks() -> Tuple[int, int]:
    """(user+nice+system, idle+iowait) ticks since boot, all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[0] + fields[1] + fields[2], fields[3] + fields[4]


def wait_for_quiet(limit_cores: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the machine is idle; returns the busy cores last seen."""
    end = time.monotonic() + max_wait
    while True:
        b0, _ = global_cpu_ticks()
        time.sleep(0.5)
        b1, _ = global_cpu_ticks()
        busy = (b1 - b0) / CLK_TCK / 0.5
        if busy <= limit_cores or time.monotonic() >= end:
            return busy
        time.sleep(0.5)


# ---------------------------------------------------------------------------


class Target:
    """A running server with ``allocations`` allocations (one client socket
    each), every one with its channel bound to our one echo peer."""

    def __init__(self, server: Server, allocations: int = 1) -> None:
        self.server = server
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        for s in (self.peer,):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        self.clients: List[TurnClient] = []
        self.relayed_all: List[Tuple[str, int]] = []
        for _ in range(allocations):
            client = TurnClient(server.address, server.username, server.password)
            self.clients.append(client)
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
            self.relayed_all.append(client.allocate(lifetime=3600))
            client.channel_bind(CHANNEL, self.peer.getsockname())
        self.client = self.clients[0]
        self.relayed = self.relayed_all[0]

    def client_fds(self) -> List[int]:
        return [c.sock.fileno() for c in self.clients]

    def workers(self) -> Dict[int, int]:
        """Slot -> pid of a ``--workers N`` relay's workers (from its log); {} otherwise."""
        if workers_of(self.server) < 2:
            return {}
        try:
            with open(self.server.log_path, errors="replace") as f:
                started = re.findall(r"worker (\d+) started \(pid (\d+)\)", f.read())
        except OSError:
            return {}
        return {int(slot): int(pid) for slot, pid in started}  # the last start of each slot

    def clients_per_worker(self) -> List[int]:
        """How many of the client sockets (5-tuples) ``SO_REUSEPORT`` gave each
        worker: the worker that holds an allocation owns the slice of its port."""
        count = workers_of(self.server)
        if count < 2:
            return []
        from firezone_relay.workers.options import slices

        spread = [0] * count
        for i, (low, high) in enumerate(slices(self.server.lowest_port, self.server.highest_port, count)):
            spread[i] = sum(1 for _host, port in self.relayed_all if low <= port <= high)
        return spread

    def drain(self) -> None:
        """Throw away datagrams left over from the previous run."""
        time.sleep(0.2)
        for s in [c.sock for c in self.clients] + [self.peer]:
            s.setblocking(False)
            while True:
                try:
                    s.recv(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    break
            s.setblocking(True)

    def refresh(self) -> None:
        """Keep the channels (and their permissions) fresh between runs."""
        for c in self.clients:
            c.sock.settimeout(1.0)
            c.channel_bind(CHANNEL, self.peer.getsockname())

    def close(self) -> None:
        for c in self.clients:
            try:
                c.refresh(0)
            except Exception:
                pass
            c.close()
        self.peer.close()


def workers_of(server: Server) -> int:
    """N of our relay's ``--workers N`` (1 without it, 0 for coturn)."""
    if not server.kind.startswith("ours"):
        return 0
    count = 1
    for i, word in enumerate(server.extra):
        value = server.extra[i + 1] if word == "--workers" and i + 1 < len(server.extra) else (
            word.split("=", 1)[1] if word.startswith("--workers=") else None)
        if value is not None:
            count = int(value) if value.isdigit() else len(os.sched_getaffinity(0))
    return count


def pin_process(pid: int, cpus: set) -> None:  # type: ignore[type-arg]
    """Pin every thread of ``pid`` to ``cpus``."""
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def one_run(target: Target, generator: Optional[str], args: argparse.Namespace, size: int) -> Dict[str, Any]:
    server = target.server
    target.drain()
    snap: Dict[str, Any] = {}

    workers = target.workers()

    def mark_start() -> None:
        snap["w0"] = {slot: _procs.cpu_ns(pid) for slot, pid in workers.items()}
        snap["top0"] = _procs.cpu_ns(server.pid)
        snap["cpu0"] = server.cpu_ns()
        snap["g0"] = global_cpu_ticks()[0]

    if generator is not None:
        cfds, pfd = target.client_fds(), target.peer.fileno()
        proc = subprocess.Popen(
            [generator, ",".join(map(str, cfds)), str(pfd), str(CHANNEL), str(size), str(args.inflight),
             str(args.warmup), str(args.measure), str(args.timeout_ms)]
            + (["1"] if getattr(args, "generator_gso", False) else []),
            pass_fds=tuple(cfds) + (pfd,), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        if args.pin:
            os.sched_setaffinity(proc.pid, {0})
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if line.strip() != "WARM":
                raise RuntimeError("load generator failed: %r" % line)
            mark_start()
            line = proc.stdout.readline()  # type: ignore[union-attr]
            cpu1, g1, top1 = server.cpu_ns(), global_cpu_ticks()[0], _procs.cpu_ns(server.pid)
            w1 = {slot: _procs.cpu_ns(pid) for slot, pid in workers.items()}
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not line.startswith("DONE"):
            raise RuntimeError("load generator failed: %r" % line)
        result: Dict[str, float] = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
    else:
        if len(target.clients) > 1:
            raise RuntimeError("the Python load generator drives one allocation only (use --client c)")
        saved = os.sched_getaffinity(0)
        if args.pin:
            os.sched_setaffinity(0, {0})
        try:
            result = python_closed_loop(
                target.client.sock, target.peer, size, args.inflight, args.warmup, args.measure, args.timeout_ms, mark_start
            )
        finally:
            os.sched_setaffinity(0, saved)
        cpu1, g1, top1 = server.cpu_ns(), global_cpu_ticks()[0], _procs.cpu_ns(server.pid)
        w1 = {slot: _procs.cpu_ns(pid) for slot, pid in workers.items()}
        target.client.sock.setblocking(True)
        target.peer.setblocking(True)
    elapsed = result["elapsed_ns"] / 1e9
    rt = result["roundtrips"]
    server_cpu = (cpu1 - snap["cpu0"]) / 1e9
    client_cpu = result["client_cpu_ns"] / 1e9
    other = max(0.0, (g1 - snap["g0"]) / CLK_TCK - server_cpu - (client_cpu if generator else 0.0))
    if generator is None:
        other = max(0.0, other - client_cpu)
    return {
        "rt_per_s": rt / elapsed,
        "cpu_us_per_pkt": server_cpu * 1e6 / (2 * rt) if rt else float("nan"),
        "cpu_us_per_rt": server_cpu * 1e6 / rt if rt else float("nan"),
        # the process started alone (with --workers N > 1: the supervisor, which relays nothing)
        "top_cpu_us_per_rt": (top1 - snap["top0"]) / 1e3 / rt if rt else float("nan"),
        # with --workers N > 1: each worker's CPU (worker 0 first) per round trip of the whole relay
        "worker_cpu_us_per_rt": [(w1[k] - snap["w0"][k]) / 1e3 / rt if rt else float("nan") for k in sorted(w1)],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "lost": result["lost"],
        "server_cores": server_cpu / elapsed,
        "client_cores": client_cpu / elapsed,
        "other_cores": other / elapsed,
    }


def otlp_server(args: argparse.Namespace) -> Server:
    """``ours`` with ``--otlp-grpc-endpoint`` at a closed loopback port (a dead
    collector): every export fails and retries in the SDK's thread while the
    relay is measured.  ``OTEL_METRIC_EXPORT_INTERVAL`` (``--otlp-interval-ms``)
    is short so that failures keep happening during each measured window."""
    if args.otlp_endpoint == "none":  # A/A control: the same relay without OTLP
        return Server("ours-otlp", 23000, 23999)
    endpoint = args.otlp_endpoint
    if endpoint == "closed":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            endpoint = "127.0.0.1:%d" % s.getsockname()[1]  # closed again when we leave: connection refused
    os.environ["OTEL_METRIC_EXPORT_INTERVAL"] = str(args.otlp_interval_ms)
    return Server("ours-otlp", 23000, 23999, extra=["--otlp-grpc-endpoint", endpoint])


def idle_cpu(servers: List[Server], seconds: float) -> Dict[str, float]:
    """CPU milliseconds per second each server uses with no traffic (its
    timers, and for ours-otlp the exporter failing and retrying)."""
    before = {s.kind: s.cpu_ns() for s in servers}
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return {s.kind: (s.cpu_ns() - before[s.kind]) / 1e6 / elapsed for s in servers}


def otlp_evidence(server: Server) -> str:
    """What ours-otlp's log says about its exporter (proof that it was pushing and failing)."""
    try:
        with open(server.log_path, errors="replace") as f:
            text = f.read()
    except OSError as exc:
        return "log unreadable: %s" % exc
    started = "OTLP: pushing metrics to" in text
    failures = len(re.findall(r"OTLP: exporting metrics to \S+ failed \((\d+) in a row\)", text))
    counts = re.findall(r"failed \((\d+) in a row\)", text)
    return "exporter %s; %d rate-limited failure warnings logged, the last after %s failed exports in a row" % (
        "started" if started else "NOT started", failures, counts[-1] if counts else "0")


def default_servers(args: argparse.Namespace) -> List[Server]:
    """The servers of a run without ``--variant``: ours, ours-python, ours-otlp (as asked) and coturn."""
    servers = [Server("ours", 20000, 20999), Server("coturn", 21000, 21999)]
    if args.python_io:
        servers.insert(1, Server("ours-python", 22000, 22999))
    if args.otlp:
        servers.insert(1, otlp_server(args))
    return servers


def variant_servers(variants: List[_procs.Variant], low: int = 20000, span: int = 1000) -> List[Server]:
    """One server per variant, each with its own slice of allocation ports."""
    return [v.server(low + i * span, low + (i + 1) * span - 1) for i, v in enumerate(variants)]


def measure_target(target: Target, generator: Optional[str], args: argparse.Namespace, size: int, run: int,
                   wait_budget: List[float]) -> Dict[str, float]:  # fmt: skip
    """One measured run on ``target``: waits (bounded) for a quiet machine, repeats a noisy run up to
    ``--retries`` times and returns the attempt least disturbed by other processes."""
    s = target.server
    attempts: List[Dict[str, float]] = []
    for attempt in range(args.retries + 1):
        if wait_budget[0] > 0:
            t0 = time.monotonic()
            wait_for_quiet(args.noise_limit, min(wait_budget[0], 20.0))
            wait_budget[0] -= time.monotonic() - t0
        target.refresh()
        r = one_run(target, generator, args, size)
        r["noisy"] = r["other_cores"] > args.noise_limit
        print("  %-8s %5d B run %d%s: %8.0f rt/s  %6.2f us/pkt  p50 %.3f ms  p99 %.3f ms  lost %d  "
              "server %.2f cores, generator %.2f, other %.2f%s"
              % (s.label, size, run + 1, " (retry %d)" % attempt if attempt else "", r["rt_per_s"],
                 r["cpu_us_per_pkt"], r["p50_ms"], r["p99_ms"], r["lost"], r["server_cores"],
                 r["client_cores"], r["other_cores"], "  NOISY" if r["noisy"] else ""))  # fmt: skip
        if r["worker_cpu_us_per_rt"]:
            print("           per process, us CPU per round trip: supervisor %.3f, workers %s (clients %s)"
                  % (r["top_cpu_us_per_rt"], " / ".join("%.2f" % x for x in r["worker_cpu_us_per_rt"]),
                     "/".join(map(str, target.clients_per_worker()))))  # fmt: skip
        attempts.append(r)
        if not r["noisy"]:
            break
    return min(attempts, key=lambda x: x["other_cores"])


def median_row(label: str, size: int, rs: List[Dict[str, Any]]) -> Dict[str, Any]:
    row: Dict[str, Any] = {"server": label, "size": size, "runs": len(rs)}
    for key in ("rt_per_s", "cpu_us_per_pkt", "cpu_us_per_rt", "top_cpu_us_per_rt", "p50_ms", "p99_ms", "server_cores", "client_cores",
                "other_cores"):  # fmt: skip
        row[key] = statistics.median(x[key] for x in rs)
    row["lost"] = sum(x["lost"] for x in rs)
    row["noisy"] = sum(1 for x in rs if x["noisy"])
    row["samples"] = {k: [x[k] for x in rs] for k in ("rt_per_s", "cpu_us_per_rt")}
    if rs and rs[0].get("worker_cpu_us_per_rt"):
        row["worker_cpu_us_per_rt"] = [statistics.median(x["worker_cpu_us_per_rt"][i] for x in rs)
                                       for i in range(len(rs[0]["worker_cpu_us_per_rt"]))]  # fmt: skip
    return row


def closed_loop(args: argparse.Namespace, generator: Optional[str]) -> Tuple[List[Dict[str, Any]], List[str]]:
    rows: List[Dict[str, Any]] = []
    commands: List[str] = []
    servers = variant_servers(args.variants) if args.variants else default_servers(args)
    targets: Dict[str, Target] = {}
    wait_budget = [args.quiet_wait_total]
    try:
        for s in servers:
            s.start()
            commands.append(s.command_line())
            targets[s.label] = Target(s, args.allocations)
            if args.pin:
                pin_process(s.pid, {1})
            print("%s: pid %d (+%d child processes), listening %s:%d, %d allocation(s), relayed %s, %d threads"
                  % (s.label, s.pid, len(_procs.descendants(s.pid)), *s.address, args.allocations,
                     ", ".join("%s:%d" % a for a in targets[s.label].relayed_all[:4])
                     + (" ..." if args.allocations > 4 else ""), _procs.thread_count(s.pid)))  # fmt: skip
            if targets[s.label].clients_per_worker():
                print("%s: clients per worker (SO_REUSEPORT): %s"
                      % (s.label, "/".join(map(str, targets[s.label].clients_per_worker()))))  # fmt: skip
        if args.otlp and args.otlp_idle_seconds > 0:
            args.otlp_idle = idle_cpu([s for s in servers if s.kind in ("ours", "ours-otlp")], args.otlp_idle_seconds)
            print("idle CPU (ms per s): %s" % ", ".join("%s %.2f" % kv for kv in args.otlp_idle.items()))
        for size in args.sizes:
            runs: Dict[str, List[Dict[str, float]]] = {s.label: [] for s in servers}
            for run in range(args.runs):
                for s in servers:
                    runs[s.label].append(measure_target(targets[s.label], generator, args, size, run, wait_budget))
            for s in servers:
                rows.append(median_row(s.label, size, runs[s.label]))
                spread = targets[s.label].clients_per_worker()
                if spread:
                    rows[-1]["clients_per_worker"] = spread
        for s in servers:
            if s.kind == "ours-otlp":
                args.otlp_evidence = otlp_evidence(s)
                print("ours-otlp:", args.otlp_evidence)
    finally:
        for t in targets.values():
            try:
                t.close()
            except Exception:
                pass
        for s in servers:
            s.stop()
    return rows, commands


# ---------------------------------------------------------------------------
# turnutils_uclient, many clients, paced.


def uclient_run(kind: str, args: argparse.Namespace, server: Optional[Server] = None) -> Dict[str, Any]:
    """``turnutils_uclient -m N`` through a fresh server (``kind`` in 22000-23999, or ``server`` as given)."""
    uclient = shutil.which("turnutils_uclient")
    peer_exe = shutil.which("turnutils_peer")
    if uclient is None or peer_exe is None:
        raise RuntimeError("turnutils_uclient / turnutils_peer not installed")
    peer_port = free_port()
    peer = subprocess.Popen([peer_exe, "-L", "127.0.0.1", "-p", str(peer_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _procs.track(peer)
    if server is None:
        server = Server(kind, 22000, 23999)
    kind = server.label
    try:
        server.start()
        argv = [
            uclient, "-c", "-m", str(args.uclient_clients), "-n", str(args.uclient_messages),
            "-z", str(args.uclient_interval), "-l", str(args.uclient_length),
            "-u", server.username, "-w", server.password,
            "-e", "127.0.0.1", "-r", str(peer_port), "-p", str(server.port), "127.0.0.1",
        ]  # fmt: skip
        cpu0 = server.cpu_ns()
        g0, peer0 = global_cpu_ticks()[0], _procs.cpu_ns(peer.pid)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=args.uclient_timeout)
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (server.cpu_ns() - cpu0) / 1e9
        busy = (global_cpu_ticks()[0] - g0) / CLK_TCK - (_procs.cpu_ns(peer.pid) - peer0) / 1e9
        text = out.stdout + out.stderr
        m_lost = re.search(r"Total lost packets (\d+) \(([\d.]+)%\), total send dropped (\d+) \(([\d.]+)%\)", text)
        m_rtt = re.search(r"Average round trip delay ([\d.]+) ms; min = (\d+) ms, max = (\d+) ms", text)
        m_msgs = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)\s*$", text, re.M)
        m_time = re.search(r"Total transmit time is (\d+)", text)
        if not m_lost or not m_msgs:
            raise RuntimeError("unexpected turnutils_uclient output (rc %d):\n%s" % (out.returncode, text[-2000:]))
        sent, recv = (int(x) for x in m_msgs[-1])
        result: Dict[str, Any] = {
            "server": kind,
            "argv": " ".join(os.path.basename(a) if a == uclient else a for a in argv),
            "sent": sent,
            "received": recv,
            "lost": int(m_lost.group(1)),
            "lost_pct": float(m_lost.group(2)),
            "send_dropped": int(m_lost.group(3)),
            "rtt_avg_ms": float(m_rtt.group(1)) if m_rtt else float("nan"),
            "rtt_max_ms": int(m_rtt.group(3)) if m_rtt else -1,
            "transmit_s": int(m_time.group(1)) if m_time else -1,
            "wall_s": wall,
            "server_cpu_s": cpu,
            "cpu_us_per_pkt": cpu * 1e6 / (2 * recv) if recv else float("nan"),
            "uclient_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
        }
        result["other_cores"] = max(0.0, busy - cpu - result["uclient_cpu_s"]) / wall
        return result
    finally:
        server.stop()
        if peer.poll() is None:
            peer.kill()
        peer.wait()
        _procs._started.pop(peer.pid, None)


# ---------------------------------------------------------------------------
# Report.


def render(rows: List[Dict[str, Any]], uc: List[Dict[str, Any]], commands: List[str], args: argparse.Namespace,
           generator: str) -> str:  # fmt: skip
    out = []
    out.append("Run: `python -m benchmarks.bench_relay%s` on %s UTC; %s." % (
        " " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "",
        datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), machine_facts()))  # fmt: skip
    out.append("")
    shape = ("one allocation per server, channel to an echo peer on 127.0.0.1, %d datagrams in flight" % args.inflight
             if args.allocations == 1 else
             "%d allocations per server (one client socket each, %d datagrams in flight on each, %d in all), each "
             "with a channel to one echo peer on 127.0.0.1" % (args.allocations, args.inflight,
                                                               args.allocations * args.inflight))  # fmt: skip
    out.append("Closed loop: %s, "
               "%g s warm-up + %g s measured, median of %d runs (interleaved between the servers); load generator: %s%s. "
               "One round trip = 2 relayed packets; CPU = the server's CPU time (all threads, and its child "
               "processes: a supervisor's workers) / relayed packets."
               % (shape, args.warmup, args.measure, args.runs, generator,
                  "; server (all threads) pinned to CPU 1, generator to CPU 0" if args.pin else ""))  # fmt: skip
    out.append("")
    out.append("| server | payload | round trips/s | relay CPU µs/packet | RTT p50 ms | RTT p99 ms | lost | server cores | generator cores | other cores |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        out.append("| %s | %d B | %.0f | %.2f | %.3f | %.3f | %d | %.2f | %.2f | %.2f%s |" % (
            r["server"], r["size"], r["rt_per_s"], r["cpu_us_per_pkt"], r["p50_ms"], r["p99_ms"], r["lost"],
            r["server_cores"], r["client_cores"], r["other_cores"],
            " (%d noisy)" % r["noisy"] if r["noisy"] else ""))  # fmt: skip
    out.append("")
    for r in rows:
        if r.get("worker_cpu_us_per_rt"):
            out.append("- %s, %d B, per process (CPU µs per round trip of the whole relay, medians): supervisor %.3f; %s. "
                       "`SO_REUSEPORT` gave the workers %s of the %d client 5-tuples." % (
                r["server"], r["size"], r["top_cpu_us_per_rt"],
                ", ".join("worker %d %.2f" % (i, x) for i, x in enumerate(r["worker_cpu_us_per_rt"])),
                "/".join(map(str, r.get("clients_per_worker", []))) or "?", args.allocations))  # fmt: skip
    if any(r.get("worker_cpu_us_per_rt") for r in rows):
        out.append("")
    if not args.variants:
        out.append("`ours` reads and sends with the C extension (`--udp-io batched`: recvmmsg/sendmmsg, every datagram "
                   "still through the Python core); `ours-python` is the same relay with `--udp-io python`.")
        out.append("")
    by = {(r["server"], r["size"]): r for r in rows}
    out.extend(ratio_lines(rows, args.sizes))
    out.append("")
    if args.otlp:
        if args.otlp_endpoint == "none":
            out.append("A/A control (`--otlp-endpoint none`): `ours-otlp` is a second `ours` without OTLP.")
        else:
            out.append("`ours-otlp` is `ours` pushing OTLP to %s (`OTEL_METRIC_EXPORT_INTERVAL=%d`). "
                       "Target: ≥ 0.97× `ours`. Its log: %s." % (
                           "a dead collector (a closed loopback port)" if args.otlp_endpoint == "closed"
                           else "`%s`" % args.otlp_endpoint,
                           args.otlp_interval_ms, getattr(args, "otlp_evidence", "not read")))  # fmt: skip
        out.append("")
        idle = getattr(args, "otlp_idle", None)
        if idle:
            out.append("Idle, no traffic, %g s: %s CPU ms per second." % (
                args.otlp_idle_seconds, ", ".join("`%s` %.2f" % kv for kv in idle.items())))  # fmt: skip
            out.append("")
        out.append("| payload | ours-otlp / ours round trips/s | ours-otlp / ours CPU per packet |")
        out.append("|---:|---:|---:|")
        for size in args.sizes:
            o, b = by.get(("ours-otlp", size)), by.get(("ours", size))
            if o and b:
                out.append("| %d B | **%.3f×** | %.3f× |" % (
                    size, o["rt_per_s"] / b["rt_per_s"], o["cpu_us_per_pkt"] / b["cpu_us_per_pkt"]))  # fmt: skip
        out.append("")
    if args.variants:
        out.append("Variants: " + "; ".join("`%s`" % v.spec for v in args.variants) + ".")
        out.append("")
    if uc:
        out.append("Many clients: `%s` (u/w: each server's credentials) against `turnutils_peer`:" % uc[0]["argv"].split(" -u ")[0])
        out.append("")
        out.append("| server | sent | received | lost | send dropped | avg RTT ms | max RTT ms | transmit s | server CPU s | µs/packet | uclient CPU s | other cores |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for u in uc:
            out.append("| %s | %d | %d | %d (%.2f %%) | %d | %.3f | %d | %d | %.2f | %.2f | %.1f | %.2f |" % (
                u["server"], u["sent"], u["received"], u["lost"], u["lost_pct"], u["send_dropped"], u["rtt_avg_ms"],
                u["rtt_max_ms"], u["transmit_s"], u["server_cpu_s"], u["cpu_us_per_pkt"], u["uclient_cpu_s"],
                u["other_cores"]))  # fmt: skip
        out.append("")
    out.append("Server command lines (ports and the password vary per run):")
    out.append("")
    out.append("```")
    out.extend(commands)
    out.append("```")
    return "\n".join(out)


def ratio_lines(rows: List[Dict[str, Any]], sizes: List[int]) -> List[str]:
    """Markdown: every server against coturn, and every one against the first server listed."""
    labels: List[str] = []
    for r in rows:
        if r["server"] not in labels:
            labels.append(r["server"])
    by = {(r["server"], r["size"]): r for r in rows}
    bases = []
    if "coturn" in labels:
        bases.append("coturn")
    if labels and labels[0] != "coturn" and len([x for x in labels if x != "coturn"]) > 1:
        bases.append(labels[0])
    out = []
    for base in bases:
        out.append("| server | payload | /%s round trips/s | /%s CPU per packet |" % (base, base))
        out.append("|---|---:|---:|---:|")
        for label in labels:
            if label == base or (base != "coturn" and label == "coturn"):
                continue
            for size in sizes:
                o, c = by.get((label, size)), by.get((base, size))
                if o and c:
                    out.append("| %s | %d B | **%.2f×** | %.2f× |" % (
                        label, size, o["rt_per_s"] / c["rt_per_s"], o["cpu_us_per_pkt"] / c["cpu_us_per_pkt"]))  # fmt: skip
        out.append("")
    return out[:-1] if out else out


def write_json(path: str, payload: Dict[str, Any]) -> None:
    import json

    payload = dict(payload, machine=machine_facts(),
                   when=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   command="python -m " + __spec_name() + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""))  # fmt: skip
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print("wrote", path)


def __spec_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) or "benchmarks.bench_relay"


def draw_charts(json_path: str, figures_dir: Optional[str]) -> None:
    """Draw the figures for ``json_path`` when matplotlib is installed (the ``bench`` extra)."""
    if figures_dir is None:
        return
    try:
        from benchmarks import charts
    except ImportError as exc:  # matplotlib absent: the benchmark still ran
        print("no charts (%s): pip install '.[bench]'" % exc)
        return
    for path in charts.draw(json_path, figures_dir):
        print("drew", path)


def update_readme(section: str, body: str) -> None:
    begin, end = "<!-- %s:begin -->" % section, "<!-- %s:end -->" % section
    try:
        with open(README) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Benchmarks\n"
    block = "%s\n%s\n%s" % (begin, body, end)
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(README, "w") as f:
        f.write(text)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1200])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--measure", type=float, default=3.0)
    p.add_argument("--timeout-ms", type=int, default=200, help="a datagram not back after this is counted lost")
    p.add_argument("--generator-gso", action="store_true",
                   help="the C generator sends each batch for one destination as one UDP GSO send (UDP_SEGMENT): "
                        "the same datagrams reach every server, the generator's kernel work per datagram is smaller")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False,
                   help="pin the server (all threads) to CPU 1 and the load generator to CPU 0")
    p.add_argument("--client", choices=("auto", "c", "python"), default="auto")
    p.add_argument("--noise-limit", type=float, default=0.15, help="other processes' CPU (cores) above which a run is repeated")
    p.add_argument("--retries", type=int, default=2, help="repetitions of a noisy run")
    p.add_argument("--quiet-wait-total", type=float, default=90.0, help="seconds in all to wait for an idle machine")
    p.add_argument("--no-uclient", action="store_true")
    p.add_argument("--uclient-clients", type=int, default=100)
    p.add_argument("--uclient-messages", type=int, default=1000)
    p.add_argument("--uclient-interval", type=int, default=5, help="ms between messages of one client")
    p.add_argument("--uclient-length", type=int, default=100)
    p.add_argument("--uclient-timeout", type=float, default=120.0)
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--python-io", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure our relay with --udp-io python (pure-Python UDP I/O)")
    p.add_argument("--otlp", action=argparse.BooleanOptionalAction, default=False,
                   help="also measure our relay pushing OTLP to a dead collector (ours-otlp; needs the otlp extra)")
    p.add_argument("--otlp-interval-ms", type=int, default=1000, help="OTEL_METRIC_EXPORT_INTERVAL of ours-otlp")
    p.add_argument("--otlp-endpoint", default="closed",
                   help="ours-otlp's collector: closed (a closed loopback port, the default), host:port, "
                        "or none (an A/A control: ours-otlp without OTLP, to see the noise between two relays)")
    p.add_argument("--otlp-idle-seconds", type=float, default=20.0,
                   help="with --otlp, first measure both relays' CPU with no traffic for this long")
    p.add_argument("--allocations", type=int, default=1,
                   help="allocations per server, one client socket each, --inflight datagrams in flight on each "
                        "(e.g. --allocations 16 --inflight 8; needs the C generator)")
    p.add_argument("--variant", dest="variant_specs", action="append", default=[], metavar="SPEC",
                   help="a server to measure, repeatable, instead of the default set: LABEL=BASE[@ROOT] [ARG ...], "
                        "BASE ours or coturn, ARGs appended to its command line, e.g. "
                        "--variant 'w1=ours --workers 1' --variant 'w2=ours --workers 2' --variant coturn")
    p.add_argument("--json", help="write the results here as JSON (default with --variant or --allocations: "
                                  "benchmarks/results/bench_relay.json)")
    p.add_argument("--figures", default=os.path.join(os.path.dirname(README), "figures"),
                   help="draw the charts into this directory (when matplotlib is installed); 'none' for no charts")
    args = p.parse_args(argv)
    try:
        args.variants = _procs.parse_variants(args.variant_specs)
    except ValueError as exc:
        p.error(str(exc))
    if args.allocations < 1 or args.inflight < 1:
        p.error("--allocations and --inflight must be at least 1")

    tmp = tempfile.mkdtemp(prefix="bench-relay-")
    generator = None if args.client == "python" else build_generator(tmp)
    if args.client == "c" and generator is None:
        print("no C compiler", file=sys.stderr)
        return 1
    if generator is None and args.allocations > 1:
        print("--allocations > 1 needs the C load generator (no C compiler found)", file=sys.stderr)
        return 1
    gen_name = "C (recvmmsg/sendmmsg, single thread)" if generator else "Python (epoll, single thread)"
    if generator and args.generator_gso:
        gen_name = "C (recvmmsg, UDP GSO sends per destination, single thread)"
    print("machine:", machine_facts())
    print("load generator:", gen_name)
    rows, commands = closed_loop(args, generator)
    uc: List[Dict[str, Any]] = []
    if not args.no_uclient:
        for i, kind in enumerate([v.label for v in args.variants] or ["ours", "coturn"]):
            wait_for_quiet(args.noise_limit, 20.0)
            variant = args.variants[i] if args.variants else None
            u = uclient_run(kind, args, variant.server(22000 + 1000 * i, 22999 + 1000 * i) if variant else None)
            print("uclient %-6s sent %d received %d lost %d (%.2f%%) send dropped %d, avg RTT %.3f ms, "
                  "server CPU %.2f s (%.2f us/pkt), uclient CPU %.1f s, wall %.1f s, other processes %.2f cores"
                  % (kind, u["sent"], u["received"], u["lost"], u["lost_pct"], u["send_dropped"], u["rtt_avg_ms"],
                     u["server_cpu_s"], u["cpu_us_per_pkt"], u["uclient_cpu_s"], u["wall_s"], u["other_cores"]))  # fmt: skip
            uc.append(u)
    body = render(rows, uc, commands, args, gen_name)
    print()
    print(body)
    section = "bench_relay_otlp" if args.otlp else "bench_relay"
    if args.allocations > 1:
        section += "_many"
    if args.variants:
        section += "_variants"
    section += "_pinned" if args.pin else ""
    if not args.no_readme:
        update_readme(section, body)
        print("\nwrote", README)
    json_path = args.json
    if json_path is None and (args.variants or args.allocations > 1):
        json_path = os.path.join(os.path.dirname(README), "results", section + ".json")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        write_json(json_path, {
            "benchmark": "bench_relay", "section": section, "allocations": args.allocations,
            "inflight": args.inflight, "runs": args.runs, "warmup": args.warmup, "measure": args.measure,
            "servers": [v.label for v in args.variants] or list(dict.fromkeys(r["server"] for r in rows)),
            "variants": [v.spec for v in args.variants], "rows": rows, "uclient": uc, "commands": commands,
        })  # fmt: skip
        if args.figures != "none":
            draw_charts(json_path, args.figures)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
