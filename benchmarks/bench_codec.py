"""STUN codec throughput: ours against aioice.stun, same messages, same run.

    python -m benchmarks.bench_codec [--rounds N] [--iterations N]

Two operations a relay does for every authenticated request:

* decode + integrity check of a ChannelBind request carrying USERNAME,
  REALM, NONCE, CHANNEL-NUMBER, XOR-PEER-ADDRESS, MESSAGE-INTEGRITY and
  FINGERPRINT (what Firezone clients send every few minutes per peer);
* encode of its success response: SOFTWARE, MESSAGE-INTEGRITY, FINGERPRINT.

Each operation runs ``--rounds`` times for ``--iterations`` messages; the
table shows the median rate of the rounds in messages per second, and the
ratio ours / aioice.  Both codecs read and write the very same bytes: the
script checks that before timing anything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, List, Tuple

from aioice import stun as aioice_stun

from firezone_relay.core import auth, stun

SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"
USERNAME, PASSWORD = auth.make_credentials(SECRET, 1892160000, "n23JJ2wKKtt30oXi")
NONCE = auth.NonceFactory(b"k" * 32).issue(("198.51.100.20", 40000), 1700000000)
KEY = stun.long_term_key(USERNAME, auth.REALM, PASSWORD)
TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
PEER = ("203.0.113.7", 50000)
CHANNEL = 0x4001
SOFTWARE = "firezone-relay/0.1.0"


def request_bytes() -> bytes:
    return stun.encode(
        stun.CHANNEL_BIND,
        stun.REQUEST,
        TID,
        [
            (stun.USERNAME, USERNAME),
            (stun.REALM, auth.REALM),
            (stun.NONCE, NONCE),
            (stun.CHANNEL_NUMBER, CHANNEL),
            (stun.XOR_PEER_ADDRESS, PEER),
        ],
        integrity_key=KEY,
        fingerprint=True,
    )


REQUEST = request_bytes()


def ours_decode() -> None:
    message = stun.decode(REQUEST)
    if not stun.check_integrity(message, KEY):
        raise AssertionError("integrity")


def aioice_decode() -> None:
    message = aioice_stun.parse_message(REQUEST)
    if not message.check_message_integrity(KEY):
        raise AssertionError("integrity")


def ours_encode() -> bytes:
    return stun.encode(
        stun.CHANNEL_BIND,
        stun.SUCCESS,
        TID,
        [(stun.SOFTWARE, SOFTWARE)],
        integrity_key=KEY,
        fingerprint=True,
    )


def aioice_encode() -> bytes:
    message = aioice_stun.Message(
        aioice_stun.Method.CHANNEL_BIND,
        aioice_stun.Class.RESPONSE,
        TID,
        {"SOFTWARE": SOFTWARE},
    )
    message.add_message_integrity(KEY)  # adds FINGERPRINT too
    return bytes(message)


def check_same_messages() -> None:
    """Both codecs agree on every byte before we time them."""
    ours = stun.decode(REQUEST)
    theirs = aioice_stun.parse_message(REQUEST)
    assert ours.get(stun.USERNAME) == theirs.attributes["USERNAME"] == USERNAME
    assert ours.get(stun.NONCE) == theirs.attributes["NONCE"].decode() == NONCE
    assert ours.get(stun.CHANNEL_NUMBER) == theirs.attributes["CHANNEL-NUMBER"] == CHANNEL
    assert ours.get(stun.XOR_PEER_ADDRESS) == theirs.attributes["XOR-PEER-ADDRESS"] == PEER
    rebuilt = aioice_stun.Message(
        aioice_stun.Method.CHANNEL_BIND,
        aioice_stun.Class.REQUEST,
        TID,
        {
            "USERNAME": USERNAME,
            "REALM": auth.REALM,
            "NONCE": NONCE.encode(),
            "CHANNEL-NUMBER": CHANNEL,
            "XOR-PEER-ADDRESS": PEER,
        },
    )
    rebuilt.add_message_integrity(KEY)
    assert bytes(rebuilt) == REQUEST, "aioice encodes the request differently"
    assert ours_encode() == aioice_encode(), "the two responses differ"


def rate(func: Callable[[], object], iterations: int, rounds: int) -> float:
    """Median messages/s over ``rounds`` timed loops of ``iterations`` calls."""
    rates: List[float] = []
    loop = range(iterations)
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in loop:
            func()
        rates.append(iterations / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--target", type=float, default=1.5, help="minimum ratio ours/aioice")
    args = parser.parse_args(argv)

    check_same_messages()
    cases: List[Tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("decode+check ChannelBind request (%d B)" % len(REQUEST), ours_decode, aioice_decode),
        ("encode ChannelBind success (%d B)" % len(ours_encode()), ours_encode, aioice_encode),
    ]
    print(
        "Python %s, %d rounds x %d messages, median msg/s"
        % (sys.version.split()[0], args.rounds, args.iterations)
    )
    print("%-42s %12s %12s %8s" % ("operation", "ours", "aioice", "ratio"))
    worst = float("inf")
    for name, ours, theirs in cases:
        rate(ours, args.iterations // 10, 1)  # warm up
        rate(theirs, args.iterations // 10, 1)
        ours_rate = rate(ours, args.iterations, args.rounds)
        theirs_rate = rate(theirs, args.iterations, args.rounds)
        ratio = ours_rate / theirs_rate
        worst = min(worst, ratio)
        print("%-42s %12.0f %12.0f %7.2fx" % (name, ours_rate, theirs_rate, ratio))
    verdict = "meets" if worst >= args.target else "BELOW"
    print("lowest ratio %.2fx: %s the %.2fx target" % (worst, verdict, args.target))
    return 0 if worst >= args.target else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
