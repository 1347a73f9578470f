"""The XDP fast path: the program on its own, and a real relay process.

Namespace tests need root (CI runs as root); they skip with the reason
otherwise.  Every test makes its own namespaces (``netns.Topology``, random
names) and deletes them in a cleanup, with the relay process stopped first.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.trial import unittest

from firezone_relay.core import commands as C
from firezone_relay.core import stun
from firezone_relay.xdp import loader
from firezone_relay.xdp.service import XdpService
from tests.helpers import in_ci
from tests.xdp import netns
from tests.xdp.netns import ADDR, HIGHEST, LISTEN_PORT, LOWEST, SECRET, BlockingTurnClient, RelayProcess, Topology

V4, V6 = 4, 6
CHAN = 0x4000


def _skip_without_root() -> None:
    reason = netns.need_root()
    if reason is not None:
        raise unittest.SkipTest(reason)


def _missing_tool(reason: str) -> None:
    """Skip outside CI; CI runs as root and installs the toolchain, so there it fails."""
    if in_ci() and os.geteuid() == 0:
        raise AssertionError("CI is set and we are root, so this XDP test must run, but: %s" % reason)
    raise unittest.SkipTest(reason)


def _clang_or_skip() -> None:
    if shutil.which("clang") is None and not os.path.exists(loader.PREBUILT):
        _missing_tool("clang is not installed (apt-get install clang)")


def _object(test: unittest.SynchronousTestCase) -> str:
    _clang_or_skip()
    directory = tempfile.mkdtemp(prefix="xdp-test-")
    test.addCleanup(shutil.rmtree, directory, True)
    return loader.build_object(directory)


# --- checksums, checked independently of the kernel -------------------------------------------


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_checksum_ok(frame: bytes) -> Tuple[bool, bytes]:
    """(checksum valid, UDP payload) of an Ethernet frame carrying IPv4/IPv6 UDP."""
    proto = struct.unpack("!H", frame[12:14])[0]
    if proto == 0x0800:
        ip = frame[14:]
        ihl = (ip[0] & 0xF) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        assert _sum16(ip[:ihl]) == 0xFFFF, "bad IPv4 header checksum"
        udp = ip[ihl:total]
        if udp[6:8] == b"\0\0":
            return True, udp[8:]
        pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    else:
        ip = frame[14:]
        plen = struct.unpack("!H", ip[4:6])[0]
        udp = ip[40 : 40 + plen]
        pseudo = ip[8:40] + struct.pack("!IxxxB", len(udp), 17)
    return _sum16(pseudo + udp) == 0xFFFF, udp[8:]


def _udp_payload(frame: bytes) -> bytes:
    """The UDP payload of an Ethernet frame, or b"" for anything else.

    Matching on "the payload occurs somewhere in the frame" is not enough:
    a 1-byte payload also occurs in neighbour discovery and other chatter.
    """
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00" and len(frame) >= 34 and frame[23] == 17:
        start = 14 + (frame[14] & 0x0F) * 4 + 8
        length = int.from_bytes(frame[start - 4 : start - 2], "big") - 8
        return frame[start : start + length]
    if ethertype == b"\x86\xdd" and len(frame) >= 62 and frame[20] == 17:
        length = int.from_bytes(frame[58:60], "big") - 8
        return frame[62 : 62 + length]
    return b""


class Capture:
    """Frames seen on an interface of a namespace (AF_PACKET, inbound)."""

    def __init__(self, topology: Topology, role: str, dev: str = "eth0", outgoing: bool = False) -> None:
        self.outgoing = outgoing
        self.sock = topology.socket(role, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((dev, 0))
        self.sock.settimeout(0.05)

    def frames(self, contains: bytes, wait: float = 1.0) -> List[bytes]:
        out: List[bytes] = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                frame, meta = self.sock.recvfrom(65535)
            except socket.timeout:
                if out:
                    break
                continue
            if (meta[2] == socket.PACKET_OUTGOING) == self.outgoing and _udp_payload(frame).endswith(contains):
                out.append(frame)
        return out

    def close(self) -> None:
        self.sock.close()


# --- tests without root ----------------------------------------------------------------------------


class LayoutTests(unittest.SynchronousTestCase):
    """The Python mirrors of the C structs (checked against BTF when bpftool exists)."""

    def test_key_packing_is_big_endian_wire_order(self) -> None:
        chan_map, chan_key, udp_map, udp_key = loader.XdpProgram._keys(("192.0.2.1", 0x1234), 0x4001, ("2001:db8::5", 80), 40000)
        self.assertEqual((chan_map, udp_map), ("chan_to_udp_46", "udp_to_chan_64"))
        self.assertEqual(chan_key, bytes([192, 0, 2, 1, 0x12, 0x34, 0x40, 0x01]))
        self.assertEqual(udp_key, socket.inet_pton(socket.AF_INET6, "2001:db8::5") + struct.pack(">HH", 40000, 80))

    def test_struct_sizes_match_btf(self) -> None:
        if shutil.which("bpftool") is None:
            _missing_tool("bpftool is not installed (apt-get install bpftool)")
        path = _object(self)
        out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", path], capture_output=True, text=True, check=True)
        types = {t.get("name"): t for t in json.loads(out.stdout)["types"] if t.get("kind") == "STRUCT"}
        self.assertEqual(types["relay_config"]["size"], loader.CONFIG.size)
        for family, name in ((4, "client_chan_v4"), (6, "client_chan_v6")):
            self.assertEqual(types[name]["size"], loader.CLIENT_CHAN[family].size)
        for family, name in ((4, "port_peer_v4"), (6, "port_peer_v6")):
            self.assertEqual(types[name]["size"], loader.PORT_PEER[family].size)
        offsets = {m["name"]: m["bits_offset"] // 8 for m in types["relay_config"]["members"]}
        self.assertEqual(
            offsets,
            {"public4": 0, "public6": 4, "int4": 20, "int6": 24, "listen_port": 40, "lowest_port": 42,
             "highest_port": 44, "mtu": 46, "flags": 48},
        )


class OptionsTests(unittest.SynchronousTestCase):
    def parse(self, args: List[str], environ: Optional[Dict[str, str]] = None) -> Any:
        from firezone_relay import tap

        options = tap.Options(environ=environ or {})
        options.parseOptions(args)
        return options

    def test_defaults_are_off_and_auto(self) -> None:
        o = self.parse([])
        self.assertIsNone(o["ebpf-offloading"])
        self.assertEqual(o["ebpf-attach-mode"], "auto")
        from firezone_relay import tap

        self.assertIsNone(tap.make_xdp_service(o))

    def test_flags_and_environment(self) -> None:
        o = self.parse(
            ["--ebpf-attach-mode", "driver", "--ebpf-int6-addr", "[2001:db8::1]"],
            {"EBPF_OFFLOADING": "eth1", "EBPF_INT4_ADDR": "192.0.2.9"},
        )
        self.assertEqual((o["ebpf-offloading"], o["ebpf-attach-mode"]), ("eth1", "driver"))
        self.assertEqual((o["ebpf-int4-addr"], o["ebpf-int6-addr"]), ("192.0.2.9", "2001:db8::1"))
        from firezone_relay import tap

        service = tap.make_xdp_service(o)
        self.assertEqual((service.interface, service.mode, service.settings.int4), ("eth1", "driver", "192.0.2.9"))

    def test_bad_values_are_refused(self) -> None:
        from twisted.python import usage

        for args, fragment in (
            (["--ebpf-attach-mode", "native"], "must be auto, driver or generic"),
            (["--ebpf-int4-addr", "2001:db8::1"], "expected IPv4"),
            (["--ebpf-int6-addr", "nope"], "not an IPv6 address"),
        ):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(args)
            self.assertIn(fragment, str(caught.exception))


class _FakeFastPath:
    """An ``XdpService`` stand-in whose counters a test sets."""

    def __init__(self) -> None:
        zero = {(d, c, p): 0 for d in ("client_to_peer", "peer_to_client") for c in (4, 6) for p in (4, 6)}
        self.value = loader.XdpCounters(dict(zero), dict(zero), 0, {r: 0 for r in loader.PASS_REASONS}, [0] * 16)

    def counters(self) -> loader.XdpCounters:
        return self.value


class MetricsTests(unittest.SynchronousTestCase):
    def test_xdp_series_next_to_userspace(self) -> None:
        from prometheus_client import generate_latest

        from firezone_relay.adapters.metrics import make_registry
        from tests.core.harness import make_relay

        relay = make_relay()
        registry, collector = make_registry(relay, process_metrics=False)
        fast_path = _FakeFastPath()
        collector.fast_path = fast_path
        c = fast_path.value
        c.packets[("client_to_peer", 4, 6)] = 3
        c.packets[("client_to_peer", 4, 4)] = 2
        c.bytes[("client_to_peer", 4, 6)] = 300
        c.packets[("peer_to_client", 6, 6)] = 7
        c.hairpin = 1
        c.passed["miss"] = 4
        c.sizes[1] = 5
        text = generate_latest(registry).decode()
        for line in (
            'relay_data_relayed_packets_total{datapath="xdp",direction="client_to_peer"} 5.0',
            'relay_data_relayed_packets_total{datapath="xdp",direction="peer_to_client"} 7.0',
            'relay_data_relayed_packets_total{datapath="userspace",direction="client_to_peer"} 0.0',
            'relay_data_relayed_bytes_total{datapath="xdp",direction="client_to_peer"} 300.0',
            'relay_xdp_relayed_packets_total{client_family="ipv4",direction="client_to_peer",peer_family="ipv6"} 3.0',
            "relay_xdp_hairpin_packets_total 1.0",
            'relay_xdp_passed_packets_total{reason="miss"} 4.0',
            'relay_packet_size_bytes_bucket{datapath="xdp",le="200"} 5.0',
        ):
            self.assertIn(line, text)
        collector.fast_path = None  # off: no xdp series at all
        self.assertNotIn('datapath="xdp"', generate_latest(registry).decode())

    def test_stats_line_counts_xdp_bytes(self) -> None:
        from twisted.internet import task
        from twisted.logger import globalLogPublisher

        from firezone_relay.adapters.metrics import StatsLogger
        from tests.core.harness import make_relay

        events: List[Dict[str, Any]] = []

        def observe(event: Dict[str, Any]) -> None:
            if event.get("log_namespace") == "firezone_relay.adapters.metrics":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        fast_path = _FakeFastPath()
        clock = task.Clock()
        service = StatsLogger(make_relay(), clock=clock, fast_path=fast_path)
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(10)
        self.assertEqual(events, [])
        fast_path.value.bytes[("peer_to_client", 4, 4)] = 20000
        clock.advance(10)
        [event] = events
        self.assertEqual((event["throughput"], event["xdp_throughput"]), ("2.00 kB/s", "2.00 kB/s"))


class _FakeProgram:
    def __init__(self, fail: bool = False) -> None:
        self.entries: Dict[Tuple[Any, ...], bool] = {}
        self.fail = fail

    def add_channel(self, client: Any, channel: int, peer: Any, port: int) -> None:
        if self.fail:
            raise loader.XdpError("map chan_to_udp_44 update: Argument list too long (E2BIG)")
        self.entries[(client, channel, peer, port)] = True

    def remove_channel(self, client: Any, channel: int, peer: Any, port: int) -> bool:
        return self.entries.pop((client, channel, peer, port), None) is not None

    def detach(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _raise_full(*args: Any) -> None:
    raise loader.XdpMapFull("map chan_to_udp_44 update: Argument list too long (E2BIG)")


class ServiceTests(unittest.SynchronousTestCase):
    def service(self, program: Any = None) -> XdpService:
        s = XdpService("eth0", "generic", loader.Settings(3478, 49152, 65535))
        s.program = program
        return s

    def test_mirrors_bound_and_unbound_channels(self) -> None:
        program = _FakeProgram()
        s = self.service(program)
        bound = C.ChannelBound(("192.0.2.1", 5000), CHAN, ("198.51.100.7", 6000), 50000, 4)
        s.channel_bound(bound)
        self.assertEqual(list(program.entries), [(("192.0.2.1", 5000), CHAN, ("198.51.100.7", 6000), 50000)])
        self.assertEqual(s.channels, 1)
        s.channel_unbound(C.ChannelUnbound(*(getattr(bound, f) for f in ("client", "channel", "peer", "port", "family"))))
        self.assertEqual(program.entries, {})
        self.assertEqual(s.channels, 0)

    def test_stream_clients_are_not_mirrored(self) -> None:
        program = _FakeProgram()
        s = self.service(program)
        s.channel_bound(C.ChannelBound(("192.0.2.1", 5000, 7), CHAN, ("198.51.100.7", 6000), 50000, 4))
        self.assertEqual(program.entries, {})

    def test_a_failed_map_write_is_counted_not_raised(self) -> None:
        s = self.service(_FakeProgram(fail=True))
        s.channel_bound(C.ChannelBound(("192.0.2.1", 5000), CHAN, ("198.51.100.7", 6000), 50000, 4))
        self.assertEqual(s.errors["bind"], 1)
        self.assertEqual(s.channels, 0)

    def test_a_full_map_is_counted_as_such_and_on_metrics(self) -> None:
        from prometheus_client import generate_latest

        from firezone_relay.adapters.metrics import make_registry
        from tests.core.harness import make_relay

        program = _FakeProgram()
        s = self.service(program)
        program.add_channel = _raise_full  # type: ignore[method-assign]
        s.channel_bound(C.ChannelBound(("192.0.2.1", 5000), CHAN, ("198.51.100.7", 6000), 50000, 4))
        self.assertEqual((s.errors["full"], s.errors["bind"], s.channels), (1, 0, 0))
        registry, collector = make_registry(make_relay(), process_metrics=False)
        fast_path = _FakeFastPath()
        fast_path.errors = s.errors  # type: ignore[attr-defined]
        collector.fast_path = fast_path
        text = generate_latest(registry).decode()
        self.assertIn('relay_xdp_map_errors_total{kind="full"} 1.0', text)

    def test_off_ignores_commands(self) -> None:
        s = self.service(None)
        s.channel_bound(C.ChannelBound(("192.0.2.1", 5000), CHAN, ("198.51.100.7", 6000), 50000, 4))
        self.assertIsNone(s.counters())
        self.assertIsNone(s.program)

    def test_load_failure_is_logged_and_leaves_the_fast_path_off(self) -> None:
        s = XdpService("no-such-if0", "generic", loader.Settings(3478, 49152, 65535))
        s.startService()
        self.addCleanup(s.stopService)
        self.assertIsNone(s.program)
        self.assertIsNotNone(s.failure)
        self.assertTrue(
            any(w in (s.failure or "") for w in ("no-such-if0", "clang", "libbpf")),
            s.failure,
        )


class VerifierTests(unittest.SynchronousTestCase):
    def test_a_rejected_program_is_reported_with_the_verifier_log(self) -> None:
        _skip_without_root()
        _clang_or_skip()
        directory = tempfile.mkdtemp(prefix="xdp-bad-")
        self.addCleanup(shutil.rmtree, directory, True)
        source = os.path.join(directory, "bad.c")
        with open(source, "w") as f:
            f.write(
                '#define SEC(n) __attribute__((section(n), used))\n'
                "struct xdp_md { unsigned int data, data_end; };\n"
                'char LICENSE[] SEC("license") = "GPL";\n'
                'SEC("xdp") int relay_xdp(struct xdp_md *ctx) '
                "{ unsigned char *d = (void *)(long)ctx->data; return d[100]; }\n"
            )
        subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-c", source, "-o", source + ".o"], check=True)
        with self.assertRaises(loader.XdpError) as caught:
            loader.XdpProgram(source + ".o", "lo")
        self.assertIn("the kernel refused the XDP program", str(caught.exception))
        self.assertIn("invalid access to packet", str(caught.exception))


    def test_not_root_is_reported_and_the_fast_path_stays_off(self) -> None:
        _skip_without_root()
        _clang_or_skip()
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            _missing_tool("setpriv (util-linux) is not installed")
        script = (
            "import sys; sys.path.insert(0, %r)\n"
            "from firezone_relay.xdp.loader import Settings\n"
            "from firezone_relay.xdp.service import XdpService\n"
            "s = XdpService('lo', 'generic', Settings(3478, 49152, 65535))\n"
            "s.startService()\n"
            "print(s.program is not None, s.failure)\n" % netns.ROOT
        )
        done = subprocess.run(
            [setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all",
             __import__("sys").executable, "-c", script],
            capture_output=True, text=True, timeout=120, cwd="/",
        )
        self.assertIn("False the kernel refused the XDP program: Operation not permitted", done.stdout, done.stderr)
        self.assertIn("needs root or CAP_BPF+CAP_NET_ADMIN", done.stdout)


# --- the program on its own, in namespaces ----------------------------------------------------------


class _Namespaced(unittest.SynchronousTestCase):
    def make_topology(self) -> Topology:
        _skip_without_root()
        _clang_or_skip()
        topology = Topology()
        topology.create()
        self.addCleanup(topology.destroy)
        return topology

    def sock(self, topology: Topology, role: str, family: int, ip: Optional[str] = None, port: int = 0) -> socket.socket:
        s = topology.socket(role, family)
        s.bind((ip or ADDR[role][family == 6], port))
        s.settimeout(1.0)
        self.addCleanup(s.close)
        return s


class ProgramTests(_Namespaced):
    """The program attached in the relay namespace, its maps written directly (no relay process)."""

    def attach(self, topology: Topology, mtu: Optional[int] = None) -> loader.XdpProgram:
        path = _object(self)
        with topology.entered("relay"):
            program = loader.XdpProgram(path, "eth0")  # the verifier accepts it on the first load
            self.addCleanup(program.close)
            program.configure(
                loader.Settings(
                    LISTEN_PORT, LOWEST, HIGHEST,
                    public4=ADDR["relay"][0], public6=ADDR["relay"][1], int4=ADDR["relay"][0], int6=ADDR["relay"][1],
                ),
                mtu=mtu,
            )
            program.attach("generic")
        return program

    def test_both_directions_every_family_pair(self) -> None:
        topology = self.make_topology()
        program = self.attach(topology)
        for cf in (V4, V6):
            for pf in (V4, V6):
                client = self.sock(topology, "client", cf)
                peer = self.sock(topology, "peer", pf)
                port = LOWEST + cf * 10 + pf
                caddr, paddr = client.getsockname()[:2], peer.getsockname()[:2]
                program.add_channel(caddr, CHAN + pf, paddr, port)
                payload = os.urandom(100)
                client.sendto(struct.pack("!HH", CHAN + pf, len(payload)) + payload, (ADDR["relay"][cf == 6], LISTEN_PORT))
                data, source = peer.recvfrom(2048)
                self.assertEqual((data, source[:2]), (payload, (ADDR["relay"][pf == 6], port)), (cf, pf))
                peer.sendto(payload[::-1], (ADDR["relay"][pf == 6], port))
                data, source = client.recvfrom(2048)
                self.assertEqual(data, struct.pack("!HH", CHAN + pf, 100) + payload[::-1], (cf, pf))
                self.assertEqual(source[:2], (ADDR["relay"][cf == 6], LISTEN_PORT))
        counters = program.counters()
        for direction in ("client_to_peer", "peer_to_client"):
            for cf in (V4, V6):
                for pf in (V4, V6):
                    self.assertEqual(counters.packets[(direction, cf, pf)], 1)
                    self.assertEqual(counters.bytes[(direction, cf, pf)], 100)
        for role in ("client", "peer"):
            snmp = topology.snmp(role)
            self.assertEqual((snmp["UdpInCsumErrors"], snmp["Udp6InCsumErrors"]), (0, 0), role)

    def test_checksums_of_every_rewrite_are_valid(self) -> None:
        topology = self.make_topology()
        program = self.attach(topology)
        for cf in (V4, V6):
            for pf in (V4, V6):
                for size in (1, 100, 1201):  # odd sizes: the checksum pads the last byte
                    client = self.sock(topology, "client", cf)
                    peer = self.sock(topology, "peer", pf)
                    port = LOWEST + 50
                    program.add_channel(client.getsockname()[:2], CHAN, peer.getsockname()[:2], port)
                    at_peer, at_client = Capture(topology, "peer"), Capture(topology, "client")
                    self.addCleanup(at_peer.close)
                    self.addCleanup(at_client.close)
                    payload = os.urandom(size)
                    client.sendto(struct.pack("!HH", CHAN, size) + payload, (ADDR["relay"][cf == 6], LISTEN_PORT))
                    self.assertEqual(peer.recvfrom(2048)[0], payload)
                    [frame] = at_peer.frames(payload)
                    self.assertEqual(udp_checksum_ok(frame), (True, payload), (cf, pf, size))
                    peer.sendto(payload, (ADDR["relay"][pf == 6], port))
                    client.recvfrom(2048)
                    [frame] = at_client.frames(payload)
                    self.assertEqual(udp_checksum_ok(frame), (True, struct.pack("!HH", CHAN, size) + payload))
                    program.remove_channel(client.getsockname()[:2], CHAN, peer.getsockname()[:2], port)

    def test_ipv4_without_checksum_stays_without_one_and_is_not_made_ipv6(self) -> None:
        topology = self.make_topology()
        program = self.attach(topology)
        client = self.sock(topology, "client", V4)
        client.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK: send UDP checksum 0
        peer4, peer6 = self.sock(topology, "peer", V4), self.sock(topology, "peer", V6)
        program.add_channel(client.getsockname()[:2], CHAN, peer4.getsockname()[:2], LOWEST)
        program.add_channel(client.getsockname()[:2], CHAN + 1, peer6.getsockname()[:2], LOWEST + 1)
        capture = Capture(topology, "peer")
        self.addCleanup(capture.close)
        client.sendto(struct.pack("!HH", CHAN, 5) + b"zero!", (ADDR["relay"][0], LISTEN_PORT))
        self.assertEqual(peer4.recvfrom(100)[0], b"zero!")
        [frame] = capture.frames(b"zero!")
        self.assertEqual(frame[14 + 20 + 6 : 14 + 20 + 8], b"\0\0")
        client.sendto(struct.pack("!HH", CHAN + 1, 5) + b"zero6", (ADDR["relay"][0], LISTEN_PORT))
        self.assertIsNone(netns.recv(peer6, 0.5))  # passed to userspace (no relay running here)
        self.assertEqual(program.counters().passed["no_checksum"], 1)

    def test_hairpin_between_two_clients(self) -> None:
        topology = self.make_topology()
        program = self.attach(topology)
        a, b = self.sock(topology, "client", V4), self.sock(topology, "client", V6)
        pa, pb = LOWEST + 1, LOWEST + 2
        public4 = ADDR["relay"][0]
        # A (IPv4) talks to B's IPv4 relayed address; B (IPv6 client) to A's.
        program.add_channel(a.getsockname()[:2], 0x4001, (public4, pb), pa)
        program.add_channel(b.getsockname()[:2], 0x4002, (public4, pa), pb)
        a.sendto(struct.pack("!HH", 0x4001, 3) + b"a2b", (ADDR["relay"][0], LISTEN_PORT))
        data, source = b.recvfrom(100)
        self.assertEqual((data, source[:2]), (struct.pack("!HH", 0x4002, 3) + b"a2b", (ADDR["relay"][1], LISTEN_PORT)))
        b.sendto(struct.pack("!HH", 0x4002, 3) + b"b2a", (ADDR["relay"][1], LISTEN_PORT))
        self.assertEqual(a.recvfrom(100)[0], struct.pack("!HH", 0x4001, 3) + b"b2a")
        self.assertEqual(program.counters().hairpin, 2)

    def test_removed_binding_stops_on_the_next_packet(self) -> None:
        topology = self.make_topology()
        program = self.attach(topology)
        client, peer = self.sock(topology, "client", V4), self.sock(topology, "peer", V4)
        binding = (client.getsockname()[:2], CHAN, peer.getsockname()[:2], LOWEST)
        program.add_channel(*binding)
        client.sendto(struct.pack("!HH", CHAN, 2) + b"on", (ADDR["relay"][0], LISTEN_PORT))
        self.assertEqual(peer.recvfrom(100)[0], b"on")
        self.assertTrue(program.remove_channel(*binding))
        client.sendto(struct.pack("!HH", CHAN, 3) + b"off", (ADDR["relay"][0], LISTEN_PORT))
        peer.sendto(b"off", (ADDR["relay"][0], LOWEST))
        self.assertIsNone(netns.recv(peer, 0.5))
        self.assertIsNone(netns.recv(client, 0.2))
        self.assertEqual(program.counters().passed["miss"], 2)

    def test_what_the_program_leaves_to_userspace(self) -> None:
        topology = self.make_topology()
        program = self.attach(topology, mtu=1500)
        client, peer = self.sock(topology, "client", V4), self.sock(topology, "peer", V4)
        program.add_channel(client.getsockname()[:2], CHAN, peer.getsockname()[:2], LOWEST)
        relay = (ADDR["relay"][0], LISTEN_PORT)
        client.sendto(struct.pack("!HH", CHAN, 2) + b"pad!", relay)  # padded
        client.sendto(struct.pack("!HH", CHAN, 9) + b"short", relay)  # length beyond the datagram
        client.sendto(b"\x40\x00\x00", relay)  # truncated header (malformed)
        client.sendto(stun.encode(stun.BINDING, stun.REQUEST, os.urandom(12), []), relay)  # STUN
        client.sendto(struct.pack("!HH", CHAN + 1, 1) + b"?", relay)  # unbound channel
        peer.sendto(b"x" * 1472, (ADDR["relay"][0], LOWEST))  # 1472 + 4 + 28 > MTU
        opts = self.sock(topology, "client", V4)
        opts.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"\x01\x01\x01\x00")  # IPv4 options
        program.add_channel(opts.getsockname()[:2], CHAN, peer.getsockname()[:2], LOWEST + 1)
        opts.sendto(struct.pack("!HH", CHAN, 4) + b"opts", relay)
        big = self.sock(topology, "client", V4)
        big.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = DONT: fragment locally
        program.add_channel(big.getsockname()[:2], CHAN, peer.getsockname()[:2], LOWEST + 2)
        big.sendto(struct.pack("!HH", CHAN, 3000) + b"f" * 3000, relay)
        self.assertIsNone(netns.recv(peer, 0.5))
        self.assertIsNone(netns.recv(client, 0.2))
        passed = program.counters().passed
        self.assertEqual(
            {k: passed[k] for k in ("padded", "malformed", "miss", "too_big", "ip_options", "fragment")},
            {"padded": 1, "malformed": 2, "miss": 1, "too_big": 1, "ip_options": 1, "fragment": 3},
        )
        self.assertEqual(sum(program.counters().packets.values()), 0)
        self.assertEqual(passed["dropped_short"], 0)

    def test_truncated_and_corrupted_frames_are_never_relayed_wrongly(self) -> None:
        """Every truncation and many random byte flips of a valid frame, sent at layer 2."""
        topology = self.make_topology()
        program = self.attach(topology)
        client, peer = self.sock(topology, "client", V4), self.sock(topology, "peer", V4)
        program.add_channel(client.getsockname()[:2], CHAN, peer.getsockname()[:2], LOWEST)
        payload = b"p" * 64
        capture = Capture(topology, "router", "to-relay", outgoing=True)
        self.addCleanup(capture.close)
        client.sendto(struct.pack("!HH", CHAN, len(payload)) + payload, (ADDR["relay"][0], LISTEN_PORT))
        self.assertEqual(peer.recvfrom(200)[0], payload)
        [valid] = [f for f in capture.frames(payload) if f[14 + 9] == 17 and f[14 + 16 : 14 + 20] == socket.inet_aton(ADDR["relay"][0])]
        capture.close()
        raw = topology.socket("router", socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.addCleanup(raw.close)
        raw.bind(("to-relay", 0))
        rng = random.Random(1234)
        variants = [valid[:n] for n in range(len(valid))]
        for _ in range(300):
            frame = bytearray(valid)
            for _ in range(rng.randint(1, 3)):
                frame[rng.randrange(14, 14 + 20 + 8 + 4)] = rng.randrange(256)
            variants.append(bytes(frame))
        sent = 0
        for frame in variants:
            try:
                raw.send(frame)
                sent += 1
            except OSError:  # shorter than an Ethernet header: the kernel refuses it
                pass
        self.assertGreater(sent, 300)
        deadline = time.monotonic() + 2.0
        received = []
        while time.monotonic() < deadline:
            got = netns.recv(peer, 0.3)
            if got is None:
                break
            received.append(got)
        # Truncations and header damage are passed (the stack drops them); a damaged
        # port, length or channel is a miss, padding or malformed; a damaged UDP
        # checksum is relayed with the damage intact (the incremental update keeps
        # it) and the receiving kernel drops it.  So the peer's socket only ever
        # gets the intact payload, from the allocation.
        for data, source in received:
            self.assertEqual((data, source[:2]), (payload, (ADDR["relay"][0], LOWEST)))
        counters = program.counters()
        self.assertEqual(counters.passed["dropped_short"], 0)
        self.assertGreater(counters.passed["malformed"], 0)
        self.assertGreater(counters.passed["bad_header_checksum"], 0)

    def test_driver_mode_on_veth(self) -> None:
        """Native XDP_TX on veth needs an XDP program on the other end of the pair too:
        our own, disabled (it passes everything), stands in for it."""
        topology = self.make_topology()
        path = _object(self)
        with topology.entered("router"):
            other_end = loader.XdpProgram(path, "to-relay")
            self.addCleanup(other_end.close)
            other_end.configure(loader.Settings(LISTEN_PORT, LOWEST, HIGHEST), enabled=False)
            self.assertEqual(other_end.attach("driver"), "driver")  # strict: attached although ...
            self.assertIn("neither GRO nor an XDP program", other_end.warning or "")  # ... said to be unable to send
        with topology.entered("relay"):
            program = loader.XdpProgram(path, "eth0")
            self.addCleanup(program.close)
            program.configure(loader.Settings(LISTEN_PORT, LOWEST, HIGHEST, public4=ADDR["relay"][0], int4=ADDR["relay"][0]))
            program.attach("driver")
            self.assertIsNone(program.warning)  # the other end has an XDP program now
            self.assertTrue(program.redirect)
        client, peer = self.sock(topology, "client", V4), self.sock(topology, "peer", V4)
        program.add_channel(client.getsockname()[:2], CHAN, peer.getsockname()[:2], LOWEST)
        client.sendto(struct.pack("!HH", CHAN, 6) + b"native", (ADDR["relay"][0], LISTEN_PORT))
        self.assertEqual(peer.recvfrom(100)[0], b"native")
        peer.sendto(b"back", (ADDR["relay"][0], LOWEST))
        self.assertEqual(client.recvfrom(100)[0], struct.pack("!HH", CHAN, 4) + b"back")
        shown = topology.ip("relay", "link", "show", "dev", "eth0").stdout
        self.assertIn("prog/xdp id", shown)
        self.assertNotIn("xdpgeneric", shown)  # native, not SKB mode
        with topology.entered("relay"):
            self.assertTrue(program.detach())

    def test_a_full_channel_map_leaves_the_newest_bindings_to_userspace(self) -> None:
        """Issue 14 item 10: the XDP service on maps of 3 entries, fed a fourth binding."""
        topology = self.make_topology()
        service = XdpService(
            "eth0", "generic",
            loader.Settings(LISTEN_PORT, LOWEST, HIGHEST, public4=ADDR["relay"][0], int4=ADDR["relay"][0], int6=ADDR["relay"][1]),
            map_entries=3,
        )
        with topology.entered("relay"):
            service.startService()

        def stop() -> None:
            with topology.entered("relay"):
                service.stopService()

        self.addCleanup(stop)
        self.assertIsNotNone(service.program, service.failure)
        client = self.sock(topology, "client", V4)
        peers = [self.sock(topology, "peer", V4) for _ in range(4)]
        caddr = client.getsockname()[:2]
        bound = [C.ChannelBound(caddr, CHAN + i, peers[i].getsockname()[:2], LOWEST + i, 4) for i in range(4)]
        for command in bound:
            service.channel_bound(command)
        self.assertEqual((service.channels, service.errors["full"], service.errors["bind"]), (3, 1, 0))
        relay = (ADDR["relay"][0], LISTEN_PORT)
        for i in range(3):  # the oldest three: in the kernel
            client.sendto(struct.pack("!HH", CHAN + i, 3) + b"old", relay)
            self.assertEqual(peers[i].recvfrom(100)[0], b"old", i)
        client.sendto(struct.pack("!HH", CHAN + 3, 3) + b"new", relay)
        self.assertIsNone(netns.recv(peers[3], 0.5))  # left to userspace (none runs here)
        counters = service.counters()
        assert counters is not None
        self.assertEqual((counters.passed["miss"], counters.total("packets", "client_to_peer")), (1, 3))
        # An unbinding makes room: the next binding is mirrored again.
        first = bound[0]
        service.channel_unbound(C.ChannelUnbound(first.client, first.channel, first.peer, first.port, first.family))
        service.channel_bound(bound[3])
        self.assertEqual((service.channels, service.errors["full"]), (3, 1))
        client.sendto(struct.pack("!HH", CHAN + 3, 3) + b"now", relay)
        self.assertEqual(peers[3].recvfrom(100)[0], b"now")

    def auto(self, topology: Topology) -> Tuple[loader.XdpProgram, str]:
        path = _object(self)
        with topology.entered("relay"):
            program = loader.XdpProgram(path, "eth0")
            self.addCleanup(program.close)
            program.configure(loader.Settings(LISTEN_PORT, LOWEST, HIGHEST, public4=ADDR["relay"][0], int4=ADDR["relay"][0]))
            mode = program.attach("auto")
        return program, mode

    def relays_both_ways(self, topology: Topology, program: loader.XdpProgram) -> None:
        client, peer = self.sock(topology, "client", V4), self.sock(topology, "peer", V4)
        program.add_channel(client.getsockname()[:2], CHAN, peer.getsockname()[:2], LOWEST)
        client.sendto(struct.pack("!HH", CHAN, 4) + b"auto", (ADDR["relay"][0], LISTEN_PORT))
        self.assertEqual(peer.recvfrom(100)[0], b"auto")
        peer.sendto(b"back", (ADDR["relay"][0], LOWEST))
        self.assertEqual(client.recvfrom(100)[0], struct.pack("!HH", CHAN, 4) + b"back")
        counters = program.counters()
        self.assertEqual(counters.total("packets", "client_to_peer"), 1)
        self.assertEqual(counters.total("packets", "peer_to_client"), 1)

    def test_auto_attaches_native_on_a_veth_whose_other_end_has_gro(self) -> None:
        """Native XDP_TX on a veth needs NAPI on the other end: GRO on is enough (no XDP program there)."""
        topology = self.make_topology()
        topology.exec("router", "ethtool", "-K", "to-relay", "gro", "on")
        program, mode = self.auto(topology)
        self.assertEqual((mode, program.mode, program.fallback, program.redirect), ("driver", "driver", None, True))
        shown = topology.ip("relay", "link", "show", "dev", "eth0").stdout
        self.assertIn("prog/xdp id", shown)
        self.assertNotIn("xdpgeneric", shown)
        self.relays_both_ways(topology, program)

    def test_auto_uses_generic_on_a_veth_whose_other_end_could_not_receive(self) -> None:
        """Without GRO or XDP on the other end the kernel would drop native XDP_TX frames: auto says so."""
        topology = self.make_topology()
        topology.exec("router", "ethtool", "-K", "to-relay", "gro", "off")
        program, mode = self.auto(topology)
        self.assertEqual(mode, "generic")
        self.assertIn("neither GRO nor an XDP program", program.fallback or "")
        self.assertIn("xdpgeneric", topology.ip("relay", "link", "show", "dev", "eth0").stdout)
        self.relays_both_ways(topology, program)

    def test_auto_falls_back_to_generic_when_the_driver_refuses(self) -> None:
        topology = self.make_topology()
        topology.exec("router", "ethtool", "-K", "to-relay", "gro", "on")
        topology.ip("router", "link", "set", "dev", "to-relay", "mtu", "9000")  # veth: too big for native XDP
        program, mode = self.auto(topology)
        self.assertEqual(mode, "generic")
        self.assertIn("could not attach XDP to eth0 in driver mode", program.fallback or "")
        self.assertIn("ERANGE", program.fallback or "")
        self.assertIn("xdpgeneric", topology.ip("relay", "link", "show", "dev", "eth0").stdout)
        self.relays_both_ways(topology, program)

    def test_driver_and_generic_stay_strict(self) -> None:
        topology = self.make_topology()
        topology.ip("router", "link", "set", "dev", "to-relay", "mtu", "9000")
        path = _object(self)
        with topology.entered("relay"):
            program = loader.XdpProgram(path, "eth0")
            self.addCleanup(program.close)
            with self.assertRaises(loader.XdpError) as caught:
                program.attach("driver")
            self.assertIn("in driver mode: Numerical result out of range", str(caught.exception))
            self.assertIsNone(program.mode)
            self.assertFalse(topology.xdp_attached())
            self.assertEqual(program.attach("generic"), "generic")
            self.assertIsNone(program.fallback)
            with self.assertRaises(loader.XdpError) as caught:
                loader.XdpProgram(path, "eth0").attach("auto")  # auto never replaces a program either
            self.assertIn("another XDP program is attached", str(caught.exception))

    def test_detach_and_reload_is_clean(self) -> None:
        topology = self.make_topology()
        program = self.attach(topology)
        self.assertTrue(topology.xdp_attached())
        with topology.entered("relay"):
            self.assertTrue(program.detach())
        self.assertFalse(topology.xdp_attached())
        program.close()
        self.attach(topology)  # a second load in the same namespace
        self.assertTrue(topology.xdp_attached())


# --- a real relay process --------------------------------------------------------------------------


class RelayProcessTests(_Namespaced):
    """``twistd firezone-relay --ebpf-offloading eth0`` in the relay namespace."""

    timeout = 120

    def start(
        self, topology: Topology, xdp: bool = True, extra: Tuple[str, ...] = (), attach_mode: Optional[str] = "generic"
    ) -> RelayProcess:
        directory = tempfile.mkdtemp(prefix="xdp-relay-")
        self.addCleanup(shutil.rmtree, directory, True)
        relay = RelayProcess(topology, directory, xdp=xdp, extra=extra, attach_mode=attach_mode)
        self.addCleanup(relay.stop)
        relay.wait_ready()
        return relay

    def client(self, topology: Topology, family: int, attributes: Tuple[Tuple[int, object], ...] = (), lifetime: int = 600) -> BlockingTurnClient:
        s = self.sock(topology, "client", family)
        c = BlockingTurnClient(s, (ADDR["relay"][family == 6], LISTEN_PORT))
        c.allocate(SECRET, attributes, lifetime=lifetime)
        return c

    def relayed(self, relay: RelayProcess) -> Dict[Tuple[str, str], float]:
        metrics = relay.metrics()
        out = {}
        for datapath in ("userspace", "xdp"):
            for direction in ("client_to_peer", "peer_to_client"):
                key = 'relay_data_relayed_packets_total{datapath="%s",direction="%s"}' % (datapath, direction)
                out[(datapath, direction)] = metrics.get(key, -1.0)
        return out

    def assert_one_relayed(self, topology: Any, relay: RelayProcess, payload: bytes, datapath: str) -> None:
        """A new client's ChannelData ``payload`` reaches a peer, counted
        once on ``datapath`` (xdp or userspace)."""
        c = self.client(topology, V4)
        peer = self.sock(topology, "peer", V4)
        self.assertIsNone(c.channel_bind(CHAN, peer.getsockname()[:2]))
        c.send_channel(CHAN, payload)
        self.assertEqual(peer.recvfrom(100)[0], payload)
        self.assertEqual(self.relayed(relay)[(datapath, "client_to_peer")], 1)

    def test_v4_v6_and_cross_family_go_through_xdp_only(self) -> None:
        topology = self.make_topology()
        relay = self.start(topology)
        dual = ((stun.ADDITIONAL_ADDRESS_FAMILY, stun.FAMILY_IPV6),)
        count = 0
        for cf, pf in ((V4, V4), (V6, V6), (V4, V6), (V6, V4)):
            attributes = dual if cf != pf else ((stun.REQUESTED_ADDRESS_FAMILY, stun.FAMILY_IPV6),) if cf == V6 else ()
            c = self.client(topology, cf, attributes)
            relayed = {_family(a[0]): a for a in c.relayed}
            peer = self.sock(topology, "peer", pf)
            self.assertIsNone(c.channel_bind(CHAN, peer.getsockname()[:2]))
            for i in range(5):
                payload = os.urandom(100 + i)
                c.send_channel(CHAN, payload)
                data, source = peer.recvfrom(2048)
                self.assertEqual((data, source[:2]), (payload, relayed[pf]), (cf, pf))
                peer.sendto(payload, relayed[pf])
                self.assertEqual(c.recv(), struct.pack("!HH", CHAN, len(payload)) + payload, (cf, pf))
                count += 1
        counts = self.relayed(relay)
        self.assertEqual(counts[("userspace", "client_to_peer")], 0)
        self.assertEqual(counts[("userspace", "peer_to_client")], 0)
        self.assertEqual(counts[("xdp", "client_to_peer")], count)
        self.assertEqual(counts[("xdp", "peer_to_client")], count)
        metrics = relay.metrics()
        for direction in ("client_to_peer", "peer_to_client"):
            for cf, pf in (("ipv4", "ipv6"), ("ipv6", "ipv4")):
                key = 'relay_xdp_relayed_packets_total{client_family="%s",direction="%s",peer_family="%s"}' % (cf, direction, pf)
                self.assertEqual(metrics[key], 5)
        for role in ("client", "peer"):
            snmp = topology.snmp(role)
            self.assertEqual((snmp["UdpInCsumErrors"], snmp["Udp6InCsumErrors"]), (0, 0), role)

    def test_hairpin_two_clients_of_the_relay(self) -> None:
        topology = self.make_topology()
        relay = self.start(topology)
        a, b = self.client(topology, V4), self.client(topology, V4)
        self.assertIsNone(a.channel_bind(0x4001, b.relayed[0]))
        self.assertIsNone(b.channel_bind(0x4002, a.relayed[0]))
        a.send_channel(0x4001, b"hello b")
        self.assertEqual(b.recv(), struct.pack("!HH", 0x4002, 7) + b"hello b")
        b.send_channel(0x4002, b"hello a")
        self.assertEqual(a.recv(), struct.pack("!HH", 0x4001, 7) + b"hello a")
        self.assertEqual(relay.metrics().get("relay_xdp_hairpin_packets_total"), 2)
        self.assertEqual(self.relayed(relay)[("userspace", "client_to_peer")], 0)

    def test_removal_and_expiry_stop_the_fast_path_on_the_next_packet(self) -> None:
        topology = self.make_topology()
        relay = self.start(topology)
        peer = self.sock(topology, "peer", V4)
        removed = self.client(topology, V4)
        expiring = self.client(topology, V4)
        expiring.refresh(2)  # RFC 8656 §7.2 gives an Allocate at least 600 s; a Refresh may shorten it
        for c in (removed, expiring):
            self.assertIsNone(c.channel_bind(CHAN, peer.getsockname()[:2]))
            c.send_channel(CHAN, b"before")
            self.assertEqual(peer.recvfrom(100)[0], b"before")
        removed.refresh(0)
        deadline = time.monotonic() + 10
        while "allocation deleted" not in relay.output() or relay.output().count("allocation deleted") < 2:
            self.assertLess(time.monotonic(), deadline, relay.output()[-2000:])
            time.sleep(0.2)
        for c in (removed, expiring):
            c.send_channel(CHAN, b"after")
            peer.sendto(b"after", c.relayed[0])
            self.assertIsNone(netns.recv(peer, 0.5))
            self.assertIsNone(c.recv(0.3))
        metrics = relay.metrics()
        self.assertEqual(metrics['relay_xdp_passed_packets_total{reason="miss"}'], 4)
        self.assertEqual(self.relayed(relay)[("xdp", "client_to_peer")], 2)

    def test_userspace_relays_what_xdp_passes(self) -> None:
        topology = self.make_topology()
        relay = self.start(topology)
        c = self.client(topology, V4)
        peer = self.sock(topology, "peer", V4)
        self.assertIsNone(c.channel_bind(CHAN, peer.getsockname()[:2]))
        c.sock.sendto(struct.pack("!HH", CHAN, 6) + b"padded" + b"\0\0", c.server)
        self.assertEqual(peer.recvfrom(100)[0], b"padded")
        peer.sendto(b"m" * 1472, c.relayed[0])  # too big for the MTU once framed: userspace fragments it
        self.assertEqual(c.recv(), struct.pack("!HH", CHAN, 1472) + b"m" * 1472)
        counts = self.relayed(relay)
        self.assertEqual((counts[("userspace", "client_to_peer")], counts[("userspace", "peer_to_client")]), (1, 1))
        metrics = relay.metrics()
        self.assertEqual(metrics['relay_xdp_passed_packets_total{reason="padded"}'], 1)
        self.assertEqual(metrics['relay_xdp_passed_packets_total{reason="too_big"}'], 1)

    def test_a_denied_peer_is_never_relayed(self) -> None:
        topology = self.make_topology()
        relay = self.start(topology)
        c = self.client(topology, V4)
        denied = self.sock(topology, "peer", V4, ip=ADDR["denied"][0])
        self.assertEqual(c.channel_bind(CHAN, denied.getsockname()[:2]), 403)
        c.send_channel(CHAN, b"to denied")
        denied.sendto(b"from denied", c.relayed[0])
        self.assertIsNone(netns.recv(denied, 0.5))
        self.assertIsNone(c.recv(0.3))
        counts = self.relayed(relay)
        self.assertEqual(sum(counts.values()), 0)

    def test_detached_after_exit_drain_included(self) -> None:
        topology = self.make_topology()
        relay = self.start(topology)
        self.assertTrue(topology.xdp_attached())
        c = self.client(topology, V4)
        relay.proc.terminate()  # a drain: waits for the allocation
        time.sleep(0.5)
        self.assertIsNone(relay.proc.poll())
        self.assertTrue(topology.xdp_attached())  # still relaying while draining
        c.refresh(0)
        self.assertEqual(relay.proc.wait(10), 0)
        self.assertFalse(topology.xdp_attached(), relay.output()[-2000:])
        self.assertIn("XDP fast path detached", relay.output())

    def test_auto_is_the_default_and_its_fallback_is_logged(self) -> None:
        topology = self.make_topology()
        topology.exec("router", "ethtool", "-K", "to-relay", "gro", "on")
        topology.ip("router", "link", "set", "dev", "to-relay", "mtu", "9000")  # the veth refuses native XDP
        relay = self.start(topology, attach_mode=None)
        output = relay.output()
        self.assertIn(
            "XDP native (driver) mode not used on eth0, attached in generic mode instead: "
            "could not attach XDP to eth0 in driver mode: Numerical result out of range (ERANGE)",
            output,
        )
        self.assertIn("XDP fast path attached to eth0 (generic mode, sending with XDP_TX, program id", output)
        self.assertIn("--ebpf-attach-mode auto)", output)
        self.assert_one_relayed(topology, relay, b"generic", "xdp")

    def test_auto_attaches_native_where_the_veth_allows_it(self) -> None:
        topology = self.make_topology()
        topology.exec("router", "ethtool", "-K", "to-relay", "gro", "on")
        relay = self.start(topology, attach_mode="auto")
        output = relay.output()
        self.assertIn("XDP fast path attached to eth0 (driver mode, sending with XDP_REDIRECT, program id", output)
        self.assertNotIn("not used on eth0", output)
        self.assertNotIn("xdpgeneric", topology.ip("relay", "link", "show", "dev", "eth0").stdout)
        c = self.client(topology, V4)
        peer = self.sock(topology, "peer", V4)
        self.assertIsNone(c.channel_bind(CHAN, peer.getsockname()[:2]))
        for i in range(5):
            c.send_channel(CHAN, b"native %d" % i)
            data, source = peer.recvfrom(100)
            self.assertEqual(data, b"native %d" % i)
            peer.sendto(b"back %d" % i, source)
            self.assertEqual(c.recv(), struct.pack("!HH", CHAN, 6) + b"back %d" % i)
        counts = self.relayed(relay)
        self.assertEqual((counts[("xdp", "client_to_peer")], counts[("xdp", "peer_to_client")]), (5, 5))
        self.assertEqual((counts[("userspace", "client_to_peer")], counts[("userspace", "peer_to_client")]), (0, 0))

    def test_driver_mode_is_strict(self) -> None:
        topology = self.make_topology()
        topology.ip("router", "link", "set", "dev", "to-relay", "mtu", "9000")
        relay = self.start(topology, xdp=False, extra=("--ebpf-offloading=eth0", "--ebpf-attach-mode=driver"))
        output = relay.output()
        self.assertIn("XDP fast path off, relaying in userspace only: could not attach XDP to eth0 in driver mode", output)
        self.assertFalse(topology.xdp_attached())
        self.assert_one_relayed(topology, relay, b"userspace", "userspace")

    def test_a_load_failure_leaves_the_relay_in_userspace(self) -> None:
        topology = self.make_topology()
        relay = self.start(topology, xdp=False, extra=("--ebpf-offloading=nosuch0",))
        self.assertIn("XDP fast path off, relaying in userspace only", relay.output())
        self.assert_one_relayed(topology, relay, b"userspace", "userspace")
        self.assertFalse(topology.xdp_attached())


def _family(ip: str) -> int:
    return V6 if ":" in ip else V4


class WorkersProcessTests(_Namespaced):
    """``--workers 2 --ebpf-offloading eth0``: every worker's channels reach
    the maps of the one program the supervisor owns (SPEC §9).  A worker's
    ChannelBound reaches the supervisor over the control channel, so the
    map entry follows the ChannelBind response by a moment (until then the
    worker relays in userspace)."""

    timeout = 120
    start = RelayProcessTests.start
    client = RelayProcessTests.client
    relayed = RelayProcessTests.relayed

    def workers(self, relay: RelayProcess) -> Dict[int, int]:
        """worker slot -> pid, from the supervisor's children."""
        out: Dict[int, int] = {}
        with open("/proc/%d/task/%d/children" % (relay.proc.pid, relay.proc.pid)) as f:
            children = [int(pid) for pid in f.read().split()]
        for pid in children:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
            if b"firezone_relay.workers.worker" in argv:
                out[int(argv[argv.index(b"firezone_relay.workers.worker") + 1])] = pid
        return out

    def test_every_worker_feeds_the_maps_and_a_dead_workers_channels_leave_them(self) -> None:
        from firezone_relay.workers.options import slices

        topology = self.make_topology()
        relay = self.start(topology, extra=("--workers=2",))
        deadline = time.monotonic() + 30
        while relay.metrics().get("relay_workers") != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(relay.metrics().get("relay_workers"), 2)
        parts = slices(LOWEST, HIGHEST, 2)
        clients = [self.client(topology, V4) for _ in range(10)]
        slot_of = {c: next(i for i, (low, high) in enumerate(parts) if low <= c.relayed[0][1] <= high) for c in clients}
        self.assertEqual(set(slot_of.values()), {0, 1}, "both workers hold allocations")
        peer = self.sock(topology, "peer", V4)
        for c in clients:
            self.assertIsNone(c.channel_bind(CHAN, peer.getsockname()[:2]))
        time.sleep(1.0)  # the workers' ChannelBound notices reach the supervisor's maps
        for i, c in enumerate(clients):
            payload = b"worker %d client %d" % (slot_of[c], i)
            c.send_channel(CHAN, payload)
            data, source = peer.recvfrom(2048)
            self.assertEqual((data, source[:2]), (payload, c.relayed[0]))
            peer.sendto(payload, c.relayed[0])
            self.assertEqual(c.recv(), struct.pack("!HH", CHAN, len(payload)) + payload)
        counts = self.relayed(relay)
        self.assertEqual(counts[("xdp", "client_to_peer")], len(clients))
        self.assertEqual(counts[("xdp", "peer_to_client")], len(clients))
        self.assertEqual(counts[("userspace", "client_to_peer")], 0)
        # Worker 0 dies: its channels leave the maps, so the kernel relays
        # nothing more for its (gone) allocations; worker 1's go on in XDP.
        os.kill(self.workers(relay)[0], 9)
        deadline = time.monotonic() + 10
        while relay.metrics().get("relay_worker_restarts_total") != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        dead = next(c for c in clients if slot_of[c] == 0)
        alive = next(c for c in clients if slot_of[c] == 1)
        peer.sendto(b"to a dead allocation", dead.relayed[0])
        self.assertIsNone(dead.recv(timeout=1.0), "the dead worker's channel is out of the maps")
        alive.send_channel(CHAN, b"still fast")
        self.assertEqual(peer.recvfrom(2048)[0], b"still fast")
        self.assertEqual(self.relayed(relay)[("xdp", "client_to_peer")], len(clients) + 1)
