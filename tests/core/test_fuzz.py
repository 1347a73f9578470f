"""Fuzzing the whole core: random and mutated STUN/ChannelData from many sources.

CI runs a fixed example budget (``FUZZ_EXAMPLES``, default 300 sequences);
``python -m benchmarks.fuzz_long`` runs the same target for longer.  Every
input that ever crashed or hung the core is kept in ``fuzz_corpus/`` (one
hex line per datagram, ``#`` comments) and replayed by
``CorpusRegressionTests``.
"""

from __future__ import annotations

import os
import pathlib
import random
from typing import Optional

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import stun
from firezone_relay.core.relay import Relay

from .harness import NOW, PEER, PUBLIC4, Driver, credentials, make_relay

CORPUS = pathlib.Path(__file__).parent / "fuzz_corpus"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
#: Far-future credentials, so the clock never expires them during a sequence.
CREDS = credentials(expiry=NOW + 10**8)

SOURCES = [("198.51.100.%d" % i, 40000 + i) for i in range(1, 7)] + [("2001:db8:5::%d" % i, 1000 + i) for i in range(1, 3)]
PEERS = [PEER, ("1.1.1.1", 53), ("127.0.0.1", 3478), (PUBLIC4, 50000), ("2606:4700::1111", 443)]


def templates(driver: Driver, sender: stun.Address) -> list[bytes]:
    """Valid messages a real client would send; the fuzzer mutates them."""
    d = driver
    out = [
        stun.encode(stun.BINDING, stun.REQUEST, d.next_tid(), [], fingerprint=True),
        stun.encode(stun.ALLOCATE, stun.REQUEST, d.next_tid(), [(stun.REQUESTED_TRANSPORT, 17)]),
        d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17), (stun.LIFETIME, 30)], sender, CREDS),
        d.signed(stun.ALLOCATE, [(stun.REQUESTED_TRANSPORT, 17), (stun.ADDITIONAL_ADDRESS_FAMILY, 2), (stun.EVEN_PORT, True)], sender, CREDS, sha256=True),
        d.signed(stun.REFRESH, [(stun.LIFETIME, 0)], sender, CREDS),
        d.signed(stun.REFRESH, [(stun.LIFETIME, 60)], sender, CREDS, fingerprint=True),
        d.signed(stun.CREATE_PERMISSION, [(stun.XOR_PEER_ADDRESS, p) for p in PEERS], sender, CREDS),
        d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x4001), (stun.XOR_PEER_ADDRESS, PEER)], sender, CREDS),
        d.signed(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, 0x7FFF), (stun.XOR_PEER_ADDRESS, (PUBLIC4, 50001))], sender, CREDS),
        stun.encode(stun.SEND, stun.INDICATION, d.next_tid(), [(stun.XOR_PEER_ADDRESS, PEER), (stun.DATA, b"hello")]),
        stun.encode_channel_data(0x4001, b"payload"),
        stun.encode_channel_data(0x7FFF, b"x" * 33, pad=True),
    ]
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        if choice == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif choice == 2:
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice == 3 and len(buf) >= 4:
            i = rng.choice([2, min(len(buf) - 2, 22)])
            buf[i : i + 2] = rng.randrange(65536).to_bytes(2, "big")
        elif choice == 4 and len(buf) > 24:
            i = rng.randrange(20, len(buf) - 4)
            buf[i : i + 2] = rng.choice([0x0008, 0x0012, 0x000C, 0x8028, 0x001C, 0x0013, 0x7FFF]).to_bytes(2, "big")
        elif choice == 5 and buf:
            buf[0] = rng.choice([0x00, 0x01, 0x40, 0x7F, 0x80, 0xFF])
    return bytes(buf)


def check_bounded(relay: Relay) -> None:
    footprint = relay.memory_footprint()
    assert footprint["allocations"] <= len(SOURCES), footprint
    assert footprint["pending"] == 0, footprint
    assert footprint["timers"] <= 64 + 4 * (footprint["by_port"] + footprint["permissions"] + footprint["channels"] + footprint["reservations"]), footprint


def run_sequence(steps: list[tuple[int, int, int, int, float]], seed: int, relay: Optional[Relay] = None) -> Driver:
    """Replay one fuzz sequence; raises only if the core misbehaves."""
    d = Driver(relay or make_relay(public_ip6="2001:db8::1", allow_loopback_peers=bool(seed & 1), unauthenticated_rate=0 if seed & 2 else 32.0))
    rng = random.Random(seed)
    per_source: dict[stun.Address, tuple[float, list[bytes]]] = {}
    for kind, source_index, template_index, peer_index, dt in steps:
        sender = SOURCES[source_index % len(SOURCES)]
        made, pool = per_source.get(sender, (float("-inf"), []))
        if d.now - made > 300:  # keep the nonces fresh so requests get past authentication
            pool = templates(d, sender)
            per_source[sender] = (d.now, pool)
        if kind == 0:
            data = pool[template_index % len(pool)]
        elif kind == 1:
            data = mutate(pool[template_index % len(pool)], rng)
        elif kind == 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        else:
            data = b""
        if kind == 3:
            ports = list(d.relay._by_port) or [50000]
            d.peer(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))), PEERS[peer_index % len(PEERS)], ports[peer_index % len(ports)])
        else:
            d.client(data, sender)
        if dt:
            d.advance(dt)
        check_bounded(d.relay)
    return d


STEP = st.tuples(
    st.integers(0, 3),
    st.integers(0, len(SOURCES) - 1),
    st.integers(0, 11),
    st.integers(0, len(PEERS) - 1),
    st.sampled_from([0.0, 0.0, 0.0, 0.5, 31.0, 301.0, 601.0, 3601.0]),
)


class CoreFuzzTests(SynchronousTestCase):
    @given(st.lists(STEP, min_size=1, max_size=60), st.integers(0, 3))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_any_input_sequence(self, steps: list[tuple[int, int, int, int, float]], seed: int) -> None:
        d = run_sequence(steps, seed)
        # Everything goes away once time passes, and every opened port is closed.
        d.advance(10**5)
        assert all(v == 0 for v in d.relay.memory_footprint().values()), d.relay.memory_footprint()
        assert d.open_ports == set(), d.open_ports


class CorpusRegressionTests(SynchronousTestCase):
    def test_corpus_inputs_are_handled(self) -> None:
        files = sorted(CORPUS.glob("*.hex"))
        self.assertGreater(len(files), 0, "the fuzz corpus is empty")
        for path in files:
            d = Driver(make_relay(public_ip6="2001:db8::1", allow_loopback_peers=True, unauthenticated_rate=0))
            d.allocate(SOURCES[0], creds=credentials())
            for line in path.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                d.client(bytes.fromhex(line), SOURCES[0])
                d.advance(1)
            check_bounded(d.relay)
