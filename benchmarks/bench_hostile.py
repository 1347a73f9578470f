"""Worst-case input shapes, ours vs coturn: the relay's CPU per datagram for each.

    python -m benchmarks.bench_hostile [--runs 3] [--seconds 2.0] [--no-readme]   # ~2-4 minutes; updates benchmarks/README.md

Both servers are started here on loopback (our relay through ``twistd
firezone-relay`` with the batched UDP reader, coturn's ``turnserver``; the
same command lines as the other benchmarks, see ``benchmarks/_procs.py``,
plus a TLS listener with one self-signed certificate for both) and get the
same catalogue of hostile shapes, built once with this module's own STUN
encoder (``benchmarks/_turnclient.py``) so that both see the same bytes:

- a typical signed request (CreatePermission with one peer, on a real
  allocation): the yardstick for the "≤ 20×" target, and the probe on an
  allocation's 5-tuple (see below);
- an honest 20-byte Binding (the probe elsewhere);
- max attributes: a 65,504-byte Binding of 16,371 empty attributes of type
  0x7001 (comprehension-required, unknown), and the same with 0x8F01
  (comprehension-optional, unknown);
- max IPv6 addresses: a Binding with 2,728 IPv6 XOR-PEER-ADDRESS attributes
  (65,492 bytes, as many as fit in one UDP datagram);
- max CreatePermission peers: a signed CreatePermission on a real allocation
  with as many distinct IPv4 XOR-PEER-ADDRESS attributes as fit in 65,504
  bytes (about 5,450);
- the three "max" shapes again at 16,384 bytes (4,091 attributes, 681 IPv6
  addresses, about 1,350 peers): coturn 4.6.1 does not read a UDP datagram
  over 16,384 bytes at all (a 16,384-byte Binding is answered, a
  16,388-byte one is not), so at 64 KiB its figure is the cost of dropping;
- 64 KiB junk: 65,504 random bytes whose first two bits are 00 (looks like
  STUN) and random bytes whose first two bits are not 00;
- 64 KiB ChannelData on an unbound channel, from a client with an allocation;
- a 401 storm: unauthenticated 28-byte Allocates;
- a TLS ClientHello storm: TCP connections to the TLS port that each send
  one ClientHello, read the server's first flight and close.

How a shape is measured (one server at a time; the two servers alternate
shape by shape, and the order flips from run to run).  The sender works in
closed loop: a batch of datagrams, then a probe from the same socket (so
from the same 5-tuple: the server reads it after the batch, even coturn,
whose UDP listeners are per-thread ``SO_REUSEPORT`` sockets), and the next
batch only once the probe is answered, so the server is never
asked to queue more than a batch.  The batch size adapts (doubling while a
batch is answered within 50 ms, up to a per-shape cap), and every shape is
bounded by a count and by ``--seconds`` of sending.  Unauthenticated shapes
come from a fresh source address in 127.64.0.0/10 for each batch: our relay
caps replies to unauthenticated requests per source address (the reflection
guard, 200 burst), and a spoofing attacker is not held by it, so every
datagram here gets the full treatment (decode and reply).

relay CPU per datagram = (the server's CPU time over the shape, every
thread of it and of its child processes if any, from ``/proc/<pid>/task/*/
schedstat``: the same quantity as ``utime+stime`` of ``/proc/<pid>/stat``,
at nanosecond rather than clock-tick resolution; minus the probes, at
their cost measured in the same run) / datagrams the server
received (sent minus the drops counted on its listening sockets in
``/proc/net/udp``).  For the TLS storm a "datagram" is
one connection with its ClientHello.  Medians of ``--runs`` runs.

After each shape the server must still answer an honest Binding from a new
address (within 5 s), and its process must still be running.

Targets (issue 14): every shape ≤ 20× our typical signed request, and ≤ 2×
coturn's cost for the same shape.  Loopback only; every loop is bounded in
count and time; only processes started here are stopped, by PID.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import hmac
import os
import random
import select
import shutil
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Counter, Dict, List, Optional, Sequence, Tuple

from benchmarks import _turnclient as T
from benchmarks._procs import Server, machine_facts
from benchmarks._procs import tree_cpu_ns as _procs_tree_cpu_ns
from benchmarks.bench_relay import README, update_readme

# --- targets ----------------------------------------------------------------

RATIO_TO_SIGNED = 20.0
RATIO_TO_COTURN = 2.0

MAX_STUN = 65504  # the largest STUN message (a multiple of 4) in one IPv4 UDP datagram (65,507)
COTURN_MAX = 16384  # the largest UDP datagram coturn 4.6.1 reads (measured, see SHAPES)
PROBE_TIMEOUT = 2.0  # retransmit a probe unanswered for this long
PROBE_GIVE_UP = 30.0  # a shape stops (and the server counts as stalled) after this long without an answer
HONEST_DEADLINE = 5.0


# --- source addresses -------------------------------------------------------


class Sources:
    """Fresh loopback source addresses: 127.64.0.1, 127.64.0.2, ... (all of 127/8 is loopback)."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> str:
        while True:
            self.n += 1
            a, b, c = (self.n >> 16) & 63, (self.n >> 8) & 255, self.n & 255
            if c not in (0, 255):
                return "127.%d.%d.%d" % (64 + a, b, c)


SOURCES = Sources()


def udp_socket(source: Optional[str], server: Tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.bind((source or "127.0.0.1", 0))
    s.connect(server)
    return s


def tree_cpu_ns(pid: int) -> int:
    """CPU time of ``pid`` and of every process below it (worker processes, if the relay has any).

    ``_procs.tree_cpu_ns``: children found by parent PID in ``/proc/*/stat``, since
    ``/proc/<pid>/task/<tid>/children`` is missing on kernels without CONFIG_PROC_CHILDREN
    (this machine's), where the old walk counted the parent alone."""
    return _procs_tree_cpu_ns(pid)


def udp_drops(port: int) -> int:
    """Datagrams dropped so far by every UDP socket bound to local ``port`` (``/proc/net/udp``)."""
    total = 0
    suffix = ":%04X" % port
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 13 and fields[1].endswith(suffix):
                total += int(fields[-1])
    return total


# --- servers ------------------------------------------------------------------


class HostileServer(Server):
    """``_procs.Server`` with a TLS listener (both servers use the same certificate)."""

    def __init__(self, kind: str, low: int, high: int, cert: Path, key: Path, extra: Sequence[str] = ()) -> None:
        super().__init__(kind, low, high, list(extra))
        self.cert = cert
        self.key = key
        self.tls_port = 0

    def _command(self) -> Tuple[List[str], Dict[str, str]]:
        argv, env = super()._command()
        self.tls_port = self.port
        while self.tls_port == self.port or self.lowest_port <= self.tls_port <= self.highest_port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.tls_port = s.getsockname()[1]
        if self.kind == "coturn":
            argv = [a for a in argv if a != "--no-tls"]
            argv += ["--tls-listening-port", str(self.tls_port), "--cert", str(self.cert), "--pkey", str(self.key)]
        else:
            argv += ["--tls-port", str(self.tls_port), "--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        return argv, env

    def start(self) -> "HostileServer":
        # Other work on the machine may take a port between our choice and the server's bind:
        # then the server exits, and it is started again on new ports.
        for attempt in range(3):
            super().start()
            deadline = time.monotonic() + 10
            while self.alive() and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.tls_port), timeout=0.5).close()
                    return self
                except OSError:
                    time.sleep(0.1)
            try:
                with open(self.log_path, errors="replace") as f:
                    tail = f.read()[-2000:]
            except OSError:
                tail = ""
            print("%s did not listen on its TLS port %d (attempt %d); its log ends:\n%s"
                  % (self.kind, self.tls_port, attempt + 1, tail), file=sys.stderr)  # fmt: skip
            self.stop()
            self.dir = tempfile.mkdtemp(prefix="bench-%s-" % self.kind)
            self.log_path = os.path.join(self.dir, "server.log")
        raise RuntimeError("%s does not listen on its TLS port" % self.kind)


class Target:
    """A running server with three allocations: one for the typical signed
    request and the 64 KiB ChannelData, one for each max-peers CreatePermission
    (so that their thousands of permissions do not weigh on the typical one)."""

    def __init__(self, server: HostileServer) -> None:
        self.server = server
        self.kind = server.kind
        self.typical = self._client()
        self.peers = self._client()
        self.peers16 = self._client()
        # The probes' costs, measured each run by the "honest Binding" and "typical" shapes.
        self.binding_ns = 0.0
        self.typical_ns = 0.0

    def _client(self) -> T.TurnClient:
        # Each allocation from its own source address, so that no two share a reflection-guard bucket.
        client = T.TurnClient(self.server.address, self.server.username, self.server.password, bind=(SOURCES.next(), 0))
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        client.allocate(lifetime=3600)
        return client

    def close(self) -> None:
        self.typical.close()
        self.peers.close()
        self.peers16.close()


# --- shapes ---------------------------------------------------------------------


class Payloads:
    """The datagrams of one shape: templates cycled, each STUN message sent
    with a new transaction id (and, when ``key`` is given, re-signed), so no
    server can answer from a transaction cache."""

    def __init__(self, templates: List[bytes], stun: bool = True, key: Optional[bytes] = None) -> None:
        self.templates = templates
        self.stun = stun
        self.key = key

    def __getitem__(self, i: int) -> bytes:
        data = self.templates[i % len(self.templates)]
        if not self.stun:
            return data
        data = data[:8] + os.urandom(12) + data[20:]
        if self.key is not None:  # MESSAGE-INTEGRITY is the last attribute (24 bytes)
            data = data[:-20] + hmac.new(self.key, data[:-24], hashlib.sha1).digest()
        return data


class Shape:
    """One hostile shape: how its datagrams are built and where they come from.

    ``source`` is ``"fresh"`` (a new source address per batch), ``"typical"``,
    ``"peers"`` or ``"peers16"`` (the 5-tuple of that allocation, for signed requests and
    ChannelData), or ``"tls"`` (TCP connections to the TLS port).
    """

    def __init__(
        self, key: str, title: str, source: str, count: int, max_batch: int,
        build: Callable[[Target], Payloads],
    ) -> None:  # fmt: skip
        self.key = key
        self.title = title
        self.source = source
        self.count = count
        self.max_batch = max_batch
        self.build = build


def build_binding(target: Target) -> Payloads:
    return Payloads([T.encode(T.msg_type(T.BINDING, 0), T.new_tid(), [])])


def build_max_attributes(atype: int, size: int = MAX_STUN) -> Callable[[Target], Payloads]:
    count = (size - 20) // 4  # 16,371 empty attributes in 65,504 bytes

    def build(target: Target) -> Payloads:
        body = struct.pack(">HH", atype, 0) * count
        return Payloads([struct.pack(">HHI", T.msg_type(T.BINDING, 0), len(body), T.MAGIC) + T.new_tid() + body])

    return build


def xor_address6(tid: bytes, ip: bytes, port: int) -> bytes:
    """XOR-*-ADDRESS value of an IPv6 address (RFC 8489 §14.2)."""
    mask = struct.pack(">I", T.MAGIC) + tid
    return struct.pack(">BBH", 0, 2, port ^ (T.MAGIC >> 16)) + bytes(a ^ b for a, b in zip(ip, mask))


def build_max_ipv6(size: int = MAX_STUN) -> Callable[[Target], Payloads]:
    count = (size - 20) // 24  # 2,728 attributes of 4 + 20 bytes in 65,504 bytes

    def build(target: Target) -> Payloads:
        rng = random.Random(6)
        tid = T.new_tid()  # replaced per datagram: the addresses stay distinct global unicast ones
        attrs = [(T.XOR_PEER_ADDRESS, xor_address6(tid, b"\x20\x01" + rng.randbytes(14), rng.randrange(1, 65536)))
                 for _ in range(count)]  # fmt: skip
        return Payloads([T.encode(T.msg_type(T.BINDING, 0), tid, attrs)])

    return build


def _signed(client: T.TurnClient, method: int, attrs: T.Attrs) -> Payloads:
    """A signed request with ``client``'s current nonce (a signed Refresh first keeps both current)."""
    client.refresh(3600)
    assert client.realm is not None and client.nonce is not None and client.key is not None
    message = T.signed_request(method, T.new_tid(), attrs, client.username, client.realm, client.nonce, client.key)
    return Payloads([message], key=client.key)


def build_typical(target: Target) -> Payloads:
    target.typical.refresh(3600)
    assert target.typical.key is not None
    return Payloads([typical_request(target.typical, T.new_tid())], key=target.typical.key)


def build_max_peers(size: int = MAX_STUN) -> Callable[[Target], Payloads]:
    def build(target: Target) -> Payloads:
        client = target.peers if size == MAX_STUN else target.peers16
        client.refresh(3600)  # the nonce whose length is counted below
        assert client.realm is not None and client.nonce is not None
        fixed = 20 + 24  # header, MESSAGE-INTEGRITY
        for value in (client.username.encode(), client.realm, client.nonce):
            fixed += 4 + len(value) + (-len(value) & 3)
        count = (size - fixed) // 12
        peers = [(T.XOR_PEER_ADDRESS, T.xor_address("127.%d.%d.%d" % (200 + (i >> 16), (i >> 8) & 255, i & 255), 9))
                 for i in range(1, count + 1)]  # fmt: skip
        payloads = _signed(client, T.CREATE_PERMISSION, peers)
        assert size - 12 < len(payloads[0]) <= size, len(payloads[0])
        return payloads

    return build


def build_new_peers(target: Target) -> Payloads:
    """The most policy work one accepted CreatePermission asks for: 32 peers
    (SPEC §1's maximum), each datagram's 31 allowed ones never seen before (no
    cache helps), the 32nd denied (multicast), so every peer is judged and the
    403 leaves no permission behind to hit the per-allocation cap.  The 31 are
    public addresses (11.0.0.0/8), which pass every default range: the longest
    judgement (a loopback peer under --allow-loopback-peers is admitted early).
    No datagram goes to them: a CreatePermission sends nothing to its peers."""
    client = target.peers
    client.refresh(3600)
    assert client.realm is not None and client.nonce is not None and client.key is not None
    templates = []
    for k in range(NEW_PEER_TEMPLATES):
        peers = [(T.XOR_PEER_ADDRESS, T.xor_address("11.%d.%d.%d" % (n >> 16, (n >> 8) & 255, n & 255), 9))
                 for n in range(k * 31, k * 31 + 31)]  # fmt: skip
        peers.append((T.XOR_PEER_ADDRESS, T.xor_address("224.0.0.1", 9)))
        templates.append(T.signed_request(T.CREATE_PERMISSION, T.new_tid(), peers, client.username, client.realm,
                                          client.nonce, client.key))  # fmt: skip
    return Payloads(templates, key=client.key)


NEW_PEER_TEMPLATES = 1000  # x 31 distinct peers: far more than the relay's policy cache (4,096)


def build_password_algorithms(target: Target) -> Payloads:
    """64 attributes (SPEC §1's maximum) of the most work each: PASSWORD-ALGORITHMS of 8 entries."""
    value = struct.pack(">16H", *[x for i in range(8) for x in (1 + i % 2, 0)])
    return Payloads([T.encode(T.msg_type(T.BINDING, 0), T.new_tid(), [(0x8002, value)] * 64)])


def build_junk(stun_bits: bool) -> Callable[[Target], Payloads]:
    def build(target: Target) -> Payloads:
        out = []
        for _ in range(8):
            data = bytearray(os.urandom(MAX_STUN))
            if stun_bits:
                data[0] &= 0x3F
            else:
                data[0] = random.randrange(0x40, 0x100)
            out.append(bytes(data))
        return Payloads(out, stun=False)

    return build


def build_channel_data(target: Target) -> Payloads:
    return Payloads([T.channel_data(0x4FFF, os.urandom(MAX_STUN - 4))], stun=False)


def build_unauthenticated_allocate(target: Target) -> Payloads:
    return Payloads([T.allocate_request(T.new_tid())])


def build_client_hellos(target: Target) -> Payloads:
    """ClientHellos from Python's ``ssl`` (TLS 1.3 with 1.2 offered, as a usual client sends)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = []
    for _ in range(8):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        out.append(outgoing.read())
    return Payloads(out, stun=False)


BINDING_KEY = "binding"
TYPICAL_KEY = "typical"

SHAPES: List[Shape] = [
    Shape(BINDING_KEY, "honest Binding (20 B)", "fresh", 10000, 128, build_binding),
    Shape(TYPICAL_KEY, "typical signed request: CreatePermission, 1 peer", "typical", 10000, 128, build_typical),
    Shape("attrs-required", "max attributes: Binding, 16,371 × 0x7001 (65,504 B)", "fresh", 1000, 16,
          build_max_attributes(0x7001)),
    Shape("attrs-optional", "max attributes: Binding, 16,371 × 0x8F01 (65,504 B)", "fresh", 1000, 16,
          build_max_attributes(0x8F01)),
    Shape("ipv6", "max IPv6 addresses: Binding, 2,728 × XOR-PEER-ADDRESS (65,492 B)", "fresh", 1000, 16,
          build_max_ipv6()),
    Shape("peers", "max CreatePermission peers: signed, ~5,450 peers (65,5xx B)", "peers", 1000, 16,
          build_max_peers()),
    # coturn 4.6.1 does not read UDP datagrams over 16,384 bytes (a 16,384-byte Binding
    # is answered, a 16,388-byte one is not): the same shapes at the largest size it decodes.
    Shape("attrs-required-16k", "max attributes at 16 KiB: Binding, 4,091 × 0x7001 (16,384 B)", "fresh", 1000, 32,
          build_max_attributes(0x7001, COTURN_MAX)),
    Shape("ipv6-16k", "max IPv6 addresses at 16 KiB: Binding, 681 × XOR-PEER-ADDRESS (16,364 B)", "fresh", 1000, 32,
          build_max_ipv6(COTURN_MAX)),
    Shape("peers-16k", "max CreatePermission peers at 16 KiB: signed, ~1,350 peers (16,3xx B)", "peers16", 1000, 32,
          build_max_peers(COTURN_MAX)),
    # The worst shapes within the bounds: 32 peers, 64 attributes.
    Shape("new-peers", "max accepted CreatePermission: signed, 32 peers, 31 never seen (403 for the 32nd)", "peers",
          1000, 32, build_new_peers),
    Shape("ipv6-64", "64 IPv6 addresses: Binding, 64 × XOR-PEER-ADDRESS (1,556 B)", "fresh", 1000, 32,
          build_max_ipv6(20 + 64 * 24)),
    Shape("algorithms-64", "64 × PASSWORD-ALGORITHMS of 8 entries: Binding (2,324 B)", "fresh", 1000, 32,
          build_password_algorithms),
    Shape("junk-00", "64 KiB junk, first bits 00", "fresh", 2000, 16, build_junk(True)),
    Shape("junk-other", "64 KiB junk, first bits not 00", "fresh", 2000, 16, build_junk(False)),
    Shape("channel-data", "64 KiB ChannelData, unbound channel (client with allocation)", "typical", 2000, 16,
          build_channel_data),
    Shape("401", "401 storm: unauthenticated Allocate (28 B)", "fresh", 10000, 128, build_unauthenticated_allocate),
    Shape("tls", "TLS ClientHello storm (per connection)", "tls", 1000, 16, build_client_hellos),
]  # fmt: skip


# --- measuring ------------------------------------------------------------------


class Result:
    def __init__(self, kind: str, shape: str) -> None:
        self.kind = kind
        self.shape = shape
        self.size = 0
        self.sent = 0
        self.received = 0  # by the server: sent minus its socket's drops
        self.drops = 0
        self.probes = 0
        self.cpu_ns = 0
        self.us = float("nan")
        self.replies: Counter[str] = collections.Counter()
        self.stalled = False
        self.honest_ms: Optional[float] = None
        self.alive = True
        self.seconds = 0.0


def classify(data: bytes) -> str:
    parsed = T.parse(data)
    if parsed is None:
        return "non-STUN"
    method, cls = T.split_type(parsed[0])
    if cls == 2:
        return "success"
    if cls == 3:
        return str(T.error_code(parsed[2]))
    return "other"


def binding_request(tid: bytes) -> bytes:
    return T.encode(T.msg_type(T.BINDING, 0), tid, [])


def typical_request(client: T.TurnClient, tid: bytes) -> bytes:
    """The typical signed request: CreatePermission for one peer, with ``client``'s credentials."""
    assert client.realm is not None and client.nonce is not None and client.key is not None
    peer = [(T.XOR_PEER_ADDRESS, T.xor_address("127.200.0.1", 9))]
    return T.signed_request(T.CREATE_PERMISSION, tid, peer, client.username, client.realm, client.nonce, client.key)


def probe(
    sock: socket.socket, replies: Counter[str], give_up: float, alive: Callable[[], bool] = lambda: True,
    request_for: Callable[[bytes], bytes] = binding_request,
) -> Tuple[bool, int]:  # fmt: skip
    """Send a request (a Binding unless ``request_for`` says otherwise) and
    wait for its answer, tallying every other reply on ``sock``.

    Gives up after ``give_up`` seconds or once ``alive()`` is false.
    Returns (answered, requests sent)."""
    tid = T.new_tid()
    request = request_for(tid)
    sent = 0
    end = time.monotonic() + give_up
    while time.monotonic() < end:
        sock.send(request)
        sent += 1
        retransmit = min(end, time.monotonic() + PROBE_TIMEOUT)
        while True:
            left = retransmit - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([sock], [], [], min(left, 0.5))
            if not ready:
                if not alive():
                    return False, sent
                continue
            try:
                data = sock.recv(65535)
            except ConnectionRefusedError:
                continue
            parsed = T.parse(data)
            if parsed is not None and parsed[1] == tid:
                return True, sent
            replies[classify(data)] += 1
    return False, sent


def _sleep_until_quiet(sock: socket.socket, replies: Counter[str]) -> None:
    """Drain what is left on ``sock`` (replies after the probe, rare)."""
    sock.setblocking(False)
    try:
        while True:
            replies[classify(sock.recv(65535))] += 1
    except (BlockingIOError, ConnectionRefusedError):
        pass


def measure_udp(target: Target, shape: Shape, seconds: float) -> Result:
    res = Result(target.kind, shape.key)
    payloads = shape.build(target)
    res.size = len(payloads[0])
    # On an allocation's 5-tuple the probe is the typical signed request: an authenticated
    # reply, which no reflection guard holds back however many error replies went before.
    client = {"typical": target.typical, "peers": target.peers, "peers16": target.peers16}.get(shape.source)
    fixed: Optional[socket.socket] = None
    request_for: Callable[[bytes], bytes] = binding_request
    probe_ns = target.binding_ns
    if client is not None:
        fixed = client.sock
        request_for = lambda tid: typical_request(client, tid)  # noqa: E731
        probe_ns = target.typical_ns
    if fixed is not None:
        _sleep_until_quiet(fixed, collections.Counter())
        fixed.setblocking(True)
    port = target.server.port
    answered = 0
    batch = 1
    drops0 = udp_drops(port)
    cpu0 = tree_cpu_ns(target.server.pid)
    t0 = time.monotonic()
    while res.sent < shape.count and (time.monotonic() - t0 < seconds or res.sent == 0):
        k = min(batch, shape.count - res.sent)
        sock = fixed if fixed is not None else udp_socket(SOURCES.next(), target.server.address)
        try:
            b0 = time.monotonic()
            for i in range(k):
                sock.send(payloads[res.sent + i])
            res.sent += k
            ok, n = probe(sock, res.replies, PROBE_GIVE_UP, target.server.alive, request_for)
            res.probes += n
            answered += ok
            if not ok:
                res.stalled = True
                break
            took = time.monotonic() - b0
            if took < 0.05 and batch < shape.max_batch:
                batch = min(shape.max_batch, batch * 2)
            elif took > 0.2 and batch > 1:
                batch //= 2
        finally:
            if fixed is None:
                sock.close()
    cpu1 = tree_cpu_ns(target.server.pid)
    drops = res.drops = udp_drops(port) - drops0
    res.seconds = time.monotonic() - t0
    res.cpu_ns = cpu1 - cpu0
    res.received = max(0, res.sent + res.probes - drops - answered)
    if shape.key in (BINDING_KEY, TYPICAL_KEY):  # the probes are datagrams of the shape
        res.received = max(0, res.sent + res.probes - drops)
        work = float(res.cpu_ns)
    else:
        work = res.cpu_ns - answered * probe_ns
    if res.received:
        res.us = work / res.received / 1000.0
    return res


def measure_tls(target: Target, shape: Shape, seconds: float) -> Result:
    res = Result(target.kind, shape.key)
    hellos = shape.build(target)
    res.size = len(hellos[0])
    batch = 1
    address = ("127.0.0.1", target.server.tls_port)
    cpu0 = tree_cpu_ns(target.server.pid)
    t0 = time.monotonic()
    while res.sent < shape.count and (time.monotonic() - t0 < seconds or res.sent == 0):
        k = min(batch, shape.count - res.sent)
        source = SOURCES.next()
        b0 = time.monotonic()
        socks: List[socket.socket] = []
        try:
            for i in range(k):
                s = socket.socket()
                socks.append(s)
                s.bind((source, 0))
                s.settimeout(5.0)
                s.connect(address)
                s.sendall(hellos[res.sent + i])
            res.sent += k
            for s in socks:
                try:
                    first = s.recv(65536)
                except (socket.timeout, ConnectionResetError):
                    first = None
                if first is None:
                    res.replies["none"] += 1
                elif not first:
                    res.replies["closed"] += 1
                elif first[0] == 0x16:
                    res.replies["ServerHello"] += 1
                elif first[0] == 0x15:
                    res.replies["alert"] += 1
                else:
                    res.replies["other"] += 1
        except OSError as exc:
            res.replies["connect: %s" % exc.__class__.__name__] += 1
            res.stalled = True
            break
        finally:
            for s in socks:
                s.close()
        took = time.monotonic() - b0
        if took < 0.05 and batch < shape.max_batch:
            batch = min(shape.max_batch, batch * 2)
        elif took > 0.2 and batch > 1:
            batch //= 2
    # Let the server see the last closes before reading its CPU time.
    time.sleep(0.1)
    sock = udp_socket(SOURCES.next(), target.server.address)
    try:
        ok, n = probe(sock, collections.Counter(), PROBE_GIVE_UP, target.server.alive)
    finally:
        sock.close()
    res.probes = n
    res.cpu_ns = tree_cpu_ns(target.server.pid) - cpu0
    res.seconds = time.monotonic() - t0
    res.received = res.sent
    if res.sent:
        res.us = (res.cpu_ns - ok * target.binding_ns) / res.sent / 1000.0
    return res


def honest_binding_ms(target: Target) -> Optional[float]:
    """Round trip of one honest Binding from a new address, or None after HONEST_DEADLINE."""
    sock = udp_socket(SOURCES.next(), target.server.address)
    try:
        t0 = time.monotonic()
        ok, _ = probe(sock, collections.Counter(), HONEST_DEADLINE, target.server.alive)
        return (time.monotonic() - t0) * 1000.0 if ok else None
    finally:
        sock.close()


def measure(target: Target, shape: Shape, seconds: float) -> Result:
    if shape.source == "tls":
        res = measure_tls(target, shape, seconds)
    else:
        res = measure_udp(target, shape, seconds)
    if shape.key == BINDING_KEY and res.received:
        target.binding_ns = res.cpu_ns / res.received
    if shape.key == TYPICAL_KEY and res.received:
        target.typical_ns = res.cpu_ns / res.received
    res.alive = target.server.alive()
    if not res.alive:  # its CPU time is gone with it
        res.us = float("nan")
    res.honest_ms = honest_binding_ms(target) if res.alive else None
    return res


# --- report -----------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def top_reply(results: Sequence[Result]) -> str:
    total: Counter[str] = collections.Counter()
    sent = 0
    for r in results:
        total.update(r.replies)
        sent += r.sent
    if not total:
        return "none"
    parts = ["%s %.0f%%" % (name, 100.0 * n / max(1, sent)) for name, n in total.most_common(2)]
    return ", ".join(parts)


def verdict(ratio: float, limit: float) -> str:
    if ratio != ratio:
        return "n/a"
    return ("%.1f× %s" if ratio >= 0.95 else "%.2f× %s") % (ratio, "PASS" if ratio <= limit else "**FAIL**")


def render(results: Dict[Tuple[str, str], List[Result]], args: argparse.Namespace, commands: List[str],
           started: str, wall: float) -> str:  # fmt: skip
    lines = []
    extra = "".join(" --ours-arg=%s" % a for a in args.ours_arg)
    lines.append("Run: `python -m benchmarks.bench_hostile --runs %d --seconds %g%s` on %s; %s; %.0f s in all."
                 % (args.runs, args.seconds, extra, started, machine_facts(), wall))  # fmt: skip
    lines.append("")
    lines.append("Relay CPU per datagram (every thread, schedstat), median of %d runs; each shape ≤ %d datagrams "
                 "and ≤ %g s of sending per server and run, in closed loop with a probe after each batch "
                 "(an honest Binding, or on an allocation's 5-tuple the typical signed request; its cost, "
                 "measured in the first two rows, subtracted). Targets: ≤ %g× our typical signed request, ≤ %g× coturn."
                 % (args.runs, max(s.count for s in SHAPES), args.seconds, RATIO_TO_SIGNED, RATIO_TO_COTURN))  # fmt: skip
    lines.append("")
    lines.append("| shape | bytes | ours µs/datagram | ours / typical signed | coturn µs/datagram | ours / coturn "
                 "| datagrams ours / coturn | replies ours | replies coturn | honest Binding after, worst ms ours / coturn |")  # fmt: skip
    lines.append("|---|---:|---:|---|---:|---|---:|---|---|---|")
    typical = median([r.us for r in results[(TYPICAL_KEY, "ours")]])
    fails = 0
    for shape in SHAPES:
        ours = results[(shape.key, "ours")]
        theirs = results.get((shape.key, "coturn"), [])
        u, c = median([r.us for r in ours]), median([r.us for r in theirs])
        to_signed, to_coturn = u / typical, u / c
        if to_signed > RATIO_TO_SIGNED or to_coturn > RATIO_TO_COTURN:
            fails += 1

        def honest(rs: List[Result]) -> str:
            if not rs:
                return "not run"
            if any(not r.alive for r in rs):
                return "DIED"
            if any(r.honest_ms is None for r in rs) or any(r.stalled for r in rs):
                return "**no answer**"
            return "%.1f" % max(r.honest_ms or 0.0 for r in rs)

        lines.append("| %s | %d | %.1f | %s | %.1f | %s | %d / %d | %s | %s | %s / %s |" % (
            shape.title, (ours or theirs or [Result("", "")])[0].size, u, verdict(to_signed, RATIO_TO_SIGNED), c, verdict(to_coturn, RATIO_TO_COTURN),
            sum(r.received for r in ours), sum(r.received for r in theirs), top_reply(ours), top_reply(theirs),
            honest(ours), honest(theirs)))  # fmt: skip
    lines.append("")
    drops = {kind: sum(r.drops for (_, k), rs in results.items() if k == kind for r in rs) for kind in ("ours", "coturn")}
    lines.append("%d of %d shapes miss a target. \"datagrams\": received by the server over all runs (sent minus "
                 "the drops on its UDP sockets, %d for ours and %d for coturn in all); replies: share of the datagrams "
                 "sent, by reply (an error code, success, or for TLS the first record of the server's answer)."
                 % (fails, len(SHAPES), drops["ours"], drops["coturn"]))  # fmt: skip
    lines.append("")
    lines.append("Server command lines (ports and the password vary per run):")
    lines.append("")
    lines.append("```")
    lines.extend(commands)
    lines.append("```")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="sending time per shape, server and run (at least one batch)")
    p.add_argument("--shapes", nargs="+", choices=[s.key for s in SHAPES], help="measure only these (plus the probe and the typical request)")
    p.add_argument("--no-coturn", action="store_true")
    p.add_argument("--ours-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for our relay's command line (repeatable), e.g. --ours-arg=--workers=2")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args(argv)
    if args.shapes:
        keep = set(args.shapes) | {BINDING_KEY, TYPICAL_KEY}
        SHAPES[:] = [s for s in SHAPES if s.key in keep]

    from tests.certs import make_certificate

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    wall0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    cert, key = make_certificate(workdir / "tls", ips=("127.0.0.1",))
    kinds = ["ours"] + ([] if args.no_coturn else ["coturn"])
    servers = [HostileServer(kind, 16000 + 200 * i, 16199 + 200 * i, cert, key, args.ours_arg if kind == "ours" else ())
               for i, kind in enumerate(kinds)]  # fmt: skip
    targets: List[Target] = []
    results: Dict[Tuple[str, str], List[Result]] = collections.defaultdict(list)
    died: set[str] = set()
    print("machine:", machine_facts())
    try:
        for server in servers:
            server.start()
            targets.append(Target(server))
        commands = [s.command_line() for s in servers]
        for run in range(args.runs):
            order = targets if run % 2 == 0 else targets[::-1]
            for shape in SHAPES:
                for target in order:
                    if target.kind in died:
                        continue
                    r = measure(target, shape, args.seconds)
                    results[(shape.key, target.kind)].append(r)
                    print("run %d %-18s %-6s %6d datagrams (%d probes, %d dropped, %.1f s) %10.1f us/datagram; replies %s; "
                          "honest Binding %s"
                          % (run + 1, shape.key, target.kind, r.received, r.probes, r.drops, r.seconds, r.us,
                             dict(r.replies.most_common(3)), "%.1f ms" % r.honest_ms if r.honest_ms is not None
                             else "NO ANSWER"), flush=True)  # fmt: skip
                    if not r.alive:  # reported as DIED; the other server goes on
                        died.add(target.kind)
                        print("%s DIED during %s (log: %s)" % (target.kind, shape.key, target.server.log_path), flush=True)
                        os.environ["BENCH_KEEP_LOGS"] = "1"
    finally:
        for t in targets:
            t.close()
        for server in servers:
            server.stop()
            if not os.environ.get("BENCH_KEEP_LOGS"):  # also the directory of a server never started
                shutil.rmtree(server.dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    body = render(results, args, commands, started, time.monotonic() - wall0)
    print()
    print(body)
    if not args.no_readme:
        update_readme("bench_hostile", body)
        print("\nwrote", README)
    return 1 if died else 0


if __name__ == "__main__":
    sys.exit(main())
