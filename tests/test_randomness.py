"""``randomness.BufferedSystemRandom``: the relay's random source without a
seed (ports, nonce key, tokens), read from ``os.urandom`` in blocks."""

from __future__ import annotations

import os

from twisted.trial import unittest

from firezone_relay import randomness
from firezone_relay.randomness import BufferedSystemRandom


class BufferedSystemRandomTests(unittest.SynchronousTestCase):
    def test_bits_in_range_for_every_width(self) -> None:
        rng = BufferedSystemRandom(block=64)
        for k in (0, 1, 7, 8, 9, 31, 32, 33, 64, 96, 256, 1000):
            values = [rng.getrandbits(k) for _ in range(50)]
            self.assertTrue(all(0 <= v < (1 << k) if k else v == 0 for v in values), (k, values))
            if k >= 32:
                self.assertEqual(len(set(values)), 50, k)  # no repeats: a repeat would be a reused block
        with self.assertRaises(ValueError):
            rng.getrandbits(-1)

    def test_every_bit_varies(self) -> None:
        rng = BufferedSystemRandom(block=16)
        ones = [0] * 32
        for _ in range(400):
            v = rng.getrandbits(32)
            for bit in range(32):
                ones[bit] += (v >> bit) & 1
        # Each bit set about half the time (binomial(400, 1/2): 200 +- 10; far outside 100-300 is broken).
        self.assertTrue(all(100 < n < 300 for n in ones), ones)

    def test_refills_come_from_os_urandom(self) -> None:
        reads = []
        real = os.urandom

        def counting(n: int) -> bytes:
            reads.append(n)
            return real(n)

        self.patch(randomness.os, "urandom", counting)
        rng = BufferedSystemRandom(block=64)
        for _ in range(32):
            rng.getrandbits(32)  # 4 bytes each: 128 bytes, two blocks
        self.assertEqual(reads, [64, 64])
        rng.getrandbits(8 * 100)  # larger than a block: read whole
        self.assertEqual(reads[-1], 100)

    def test_a_forked_child_does_not_reuse_the_parents_bytes(self) -> None:
        rng = BufferedSystemRandom()
        rng.getrandbits(32)  # the block is read now, before the fork
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report one draw and leave at once
            try:
                os.write(write_end, rng.getrandbits(128).to_bytes(16, "big"))
            finally:
                os._exit(0)
        os.close(write_end)
        child = b""
        while len(child) < 16:
            chunk = os.read(read_end, 16 - len(child))
            if not chunk:
                break
            child += chunk
        os.close(read_end)
        os.waitpid(pid, 0)
        parent = rng.getrandbits(128).to_bytes(16, "big")
        self.assertEqual(len(child), 16)
        self.assertNotEqual(child, parent)
