"""Issue 14 items 6, 10, 15: the options and host facts behind the peer
policy and the quotas, and a real ``twistd firezone-relay`` that refuses its
own service ports on every local address."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.python import usage
from twisted.trial import unittest

from firezone_relay import tap
from firezone_relay.adapters import host
from firezone_relay.core import stun
from tests.adapters.test_drain import SECRET, RelayProcess, binding_answered
from tests.helpers import Collector, TurnClient, error_code, free_udp_port, listen
from tests.test_tap import parse

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 93.184.216.0/24 2 0 2
        |-- 93.184.216.0
           /24 link UNICAST
        |-- 93.184.216.34
           /32 host LOCAL
        |-- 93.184.216.35
           /32 host LOCAL
"""
IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
26064700000000000000000068100001 02 40 00 80     eth0
fe8000000000000000fc00fffe000001 02 40 20 80     eth0
"""


class HostFactsTests(unittest.SynchronousTestCase):
    def write(self, text: str) -> str:
        path = Path(self.mktemp())
        path.write_text(text)
        return str(path)

    def test_local_addresses_from_proc(self) -> None:
        fib, inet6 = self.write(FIB_TRIE), self.write(IF_INET6)
        self.assertEqual(
            host.local_ipv4_networks(fib), ["127.0.0.0/8", "127.0.0.1/32", "93.184.216.34/32", "93.184.216.35/32"]
        )
        self.assertEqual(host.local_ipv6_addresses(inet6), ["::1", "2606:4700::6810:1", "fe80::fc:ff:fe00:1"])
        # A wildcard bind means every local address of the family; a specific one, itself.
        self.assertEqual(host.own_addresses(["0.0.0.0", None], fib, inet6), host.local_ipv4_networks(fib))
        self.assertEqual(host.own_addresses(["10.0.0.5", "::"], fib, inet6), ["10.0.0.5"] + host.local_ipv6_addresses(inet6))
        self.assertEqual(host.own_addresses(["2001:DB8:0::5", "0:0::0", "not an ip"], fib, inet6),
                         ["2001:db8::5"] + host.local_ipv6_addresses(inet6))
        # Unreadable: the loopback still counts.
        missing = str(Path(self.mktemp()))
        self.assertEqual(host.own_addresses(["0.0.0.0", "::"], missing, missing), ["127.0.0.0/8", "::1"])

    def test_ephemeral_overlap(self) -> None:
        path = self.write("32768\t60999\n")
        self.assertEqual(host.ephemeral_port_range(path), (32768, 60999))
        message = host.ephemeral_overlap(49152, 65535, path)
        assert message is not None
        self.assertIn("allocation port range 49152-65535", message)
        self.assertIn("ephemeral port range 32768-60999", message)
        self.assertIsNotNone(host.ephemeral_overlap(20000, 32768, path))
        self.assertIsNotNone(host.ephemeral_overlap(60999, 61000, path))
        self.assertIsNone(host.ephemeral_overlap(20000, 32767, path))
        self.assertIsNone(host.ephemeral_overlap(61000, 65535, path))
        self.assertIsNone(host.ephemeral_overlap(49152, 65535, self.write("garbage")))
        self.assertIsNone(host.ephemeral_overlap(49152, 65535, str(Path(self.mktemp()))))


class CapOptionTests(unittest.SynchronousTestCase):
    def test_caps_default_to_256_and_follow_flags_and_environment(self) -> None:
        config = tap.relay_config(parse(["--public-ip4-addr", "192.0.2.1"]), "ab" * 32)
        self.assertEqual((config.max_permissions, config.max_channels), (256, 256))
        options = parse(["--public-ip4-addr", "192.0.2.1", "--max-permissions-per-allocation", "1000",
                         "--max-channels-per-allocation", "16384"])
        config = tap.relay_config(options, "ab" * 32)
        self.assertEqual((config.max_permissions, config.max_channels), (1000, 16384))
        env = {"MAX_PERMISSIONS_PER_ALLOCATION": "7", "MAX_CHANNELS_PER_ALLOCATION": "9"}
        options = parse([], env)
        self.assertEqual((options["max-permissions-per-allocation"], options["max-channels-per-allocation"]), (7, 9))

    def test_bad_caps_are_one_clear_error(self) -> None:
        for args, fragment in [
            (["--max-permissions-per-allocation", "0"], "--max-permissions-per-allocation must be between 1 and 65536"),
            (["--max-permissions-per-allocation", "many"], "is not an integer"),
            (["--max-channels-per-allocation", "16385"], "--max-channels-per-allocation must be between 1 and 16384"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                parse(args)
            self.assertIn(fragment, str(caught.exception))

    def test_service_ports_and_own_addresses_reach_the_core(self) -> None:
        options = parse(["--public-ip4-addr", "192.0.2.1", "--health-check-addr", "0.0.0.0:9100",
                         "--bind-ip4-addr", "10.0.0.5", "--bind-ip6-addr", "2001:db8::5"])
        config = tap.relay_config(options, "ab" * 32)
        self.assertEqual(tuple(config.service_ports), (9100, 9999))  # health, control endpoint
        self.assertEqual(list(config.own_addresses)[:2], ["10.0.0.5", "2001:db8::5"])
        self.assertIn("127.0.0.0/8", config.own_addresses)  # the health server listens on 0.0.0.0
        options["tls-cert"] = "cert.pem"  # TLS served: its port is a service port too
        self.assertEqual(tap.service_ports(options), (9100, 5349, 9999))
        options["control-endpoint"] = None  # --control-endpoint off
        self.assertEqual(tap.service_ports(options), (9100, 5349))
        wildcard = tap.relay_config(parse(["--public-ip4-addr", "192.0.2.1"]), "ab" * 32)
        self.assertIn("127.0.0.0/8", wildcard.own_addresses)


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OwnServicePortProcessTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_local_spellings_of_the_listener_and_health_port_are_refused(self) -> None:
        ephemeral = host.ephemeral_port_range()
        self.assertIsNotNone(ephemeral, "Linux has /proc/sys/net/ipv4/ip_local_port_range")
        assert ephemeral is not None
        health = _free_tcp_port()
        listen_port = free_udp_port((4,))
        # An allocation range inside the kernel's ephemeral range, clear of the listen port.
        high = ephemeral[1]
        while high - 31 <= listen_port <= high:
            high -= 64
        low = high - 31
        relay = RelayProcess(self, [
            "--auth-secret", SECRET,
            "--bind-ip4-addr=0.0.0.0",
            "--listen-port=%d" % listen_port,
            "--lowest-port=%d" % low,
            "--highest-port=%d" % high,
            "--health-check-addr=127.0.0.1:%d" % health,
        ])
        relay.listen_port = listen_port
        client = TurnClient(relay.server)
        self.addCleanup(listen(client).stopListening)
        peer = Collector()
        self.addCleanup(listen(peer).stopListening)
        yield binding_answered(client)
        _, response = yield client.allocate(SECRET, int(time.time()) + 3600)
        self.assertEqual(response.msg_class, stun.SUCCESS, response)
        number = 0x4000
        for target in [("127.0.0.2", listen_port), ("127.0.0.1", listen_port), ("127.0.0.1", health),
                       ("127.1.2.3", health)]:
            reply: Any = yield client.request(
                stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, number), (stun.XOR_PEER_ADDRESS, target)]
            )
            self.assertEqual(error_code(reply), 403, target)
            number += 1
        # --allow-loopback-peers still admits an ordinary loopback peer.
        reply = yield client.request(
            stun.CHANNEL_BIND,
            [(stun.CHANNEL_NUMBER, number), (stun.XOR_PEER_ADDRESS, ("127.0.0.1", peer.transport.getHost().port))],
        )
        self.assertEqual(reply.msg_class, stun.SUCCESS, reply)
        # Issue 14 item 15: one line naming both ranges.
        yield relay.wait_log("overlaps the kernel's ephemeral port range")
        lines = [line for line in relay.output().splitlines() if "overlaps the kernel's ephemeral port range" in line]
        self.assertEqual(len(lines), 1, relay.output())
        self.assertIn("allocation port range %d-%d" % (low, high), lines[0])
        self.assertIn("ephemeral port range %d-%d" % ephemeral, lines[0])

    @defer.inlineCallbacks
    def test_no_overlap_no_warning(self) -> None:
        relay = RelayProcess(self, ["--auth-secret", SECRET])  # its range lies below the ephemeral range
        client = TurnClient(relay.server)
        self.addCleanup(listen(client).stopListening)
        yield binding_answered(client)
        ephemeral = host.ephemeral_port_range()
        assert ephemeral is not None
        text = relay.output()
        low = int(text.split("allocation ports ")[1].split("-")[0])
        self.assertLess(low + 31, ephemeral[0], "the test needs a range below the ephemeral one")
        self.assertNotIn("overlaps the kernel's ephemeral port range", text)
