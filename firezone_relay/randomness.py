"""The relay's random numbers: the system's CSPRNG, read in blocks.

``random.SystemRandom.getrandbits`` makes one ``getrandom`` system call per
call; the core draws 32 bits per port it tries for an Allocate (RFC 8656
§7.2: relayed ports at random) and 96 per nonce key or token.
``BufferedSystemRandom`` reads ``os.urandom`` 4 KiB at a time and serves the
bits from that block: the same source and the same unpredictability, one
system call per few hundred draws.  A forked child (``os.register_at_fork``)
drops the block it inherited, so two processes never serve the same bytes.
"""

from __future__ import annotations

import os
import weakref

__all__ = ["BufferedSystemRandom"]

_BLOCK = 4096

#: Every instance, so that a fork can empty each one's block.
_instances: "weakref.WeakSet[BufferedSystemRandom]" = weakref.WeakSet()


class BufferedSystemRandom:
    """``getrandbits(k)`` (all the core asks of its random source) from
    ``os.urandom``, read ``block`` bytes at a time."""

    def __init__(self, block: int = _BLOCK) -> None:
        self._block = block
        self._buffer = b""
        self._pos = 0
        _instances.add(self)

    def getrandbits(self, k: int, /) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        n = (k + 7) >> 3
        pos = self._pos
        if pos + n > len(self._buffer):
            self._buffer = os.urandom(max(self._block, n))
            pos = 0
        self._pos = pos + n
        return int.from_bytes(self._buffer[pos : pos + n], "big") >> ((n << 3) - k)

    def forget(self) -> None:
        """Drop the unread bytes (after a fork: the parent has them too)."""
        self._buffer = b""
        self._pos = 0


def _after_fork_in_child() -> None:
    for instance in list(_instances):
        instance.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
