"""Message boundaries on a stream transport (TCP, TLS): RFC 8656 §12.5.

A byte stream from a TURN client carries two kinds of message back to back,
told apart by the first two bits of the first byte (SPEC §1):

* ``00``: a STUN message, ``20 + length`` bytes, where ``length`` (bytes 2–3)
  counts the attributes and is a multiple of 4, and bytes 4–7 are the magic
  cookie;
* ``01``: ChannelData, ``4 + length`` bytes *padded to a multiple of 4*: on a
  stream the padding is part of the frame (RFC 8656 §12.5), so the next
  message starts on a 4-byte boundary.

Anything else cannot be resynchronised (there is no delimiter to look for),
so it is a ``FramingError`` and the connection is closed.  A frame is at
most ``MAX_FRAME`` bytes because both length fields are 16 bits: a partial
frame costs the shell at most that much buffer while it waits.

``frame_length`` is the whole parser; ``Deframer`` adds the buffer for code
that wants frames out of arbitrary chunks.  Pure functions of bytes: no I/O.
"""

from __future__ import annotations

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
STUN_HEADER = 20
CHANNEL_HEADER = 4
#: The largest frame either kind can announce: a STUN header and 65532
#: attribute bytes (65535 rounded down to a multiple of 4).
MAX_FRAME = STUN_HEADER + 0xFFFC


class FramingError(ValueError):
    """The peer sent bytes that cannot start a STUN or ChannelData frame."""


def frame_length(buffer: bytes, offset: int = 0) -> int:
    """The size of the frame starting at ``buffer[offset]``, or 0 when more
    bytes are needed to know it (fewer than 4, or fewer than 8 for STUN, whose
    magic cookie is checked).  ``FramingError`` when the bytes there cannot
    start a frame.  The frame may extend past the end of ``buffer``."""
    available = len(buffer) - offset
    if available < CHANNEL_HEADER:
        return 0
    first = buffer[offset]
    length = (buffer[offset + 2] << 8) | buffer[offset + 3]
    if first & 0xC0 == 0x40:
        return CHANNEL_HEADER + ((length + 3) & ~3)
    if first & 0xC0:
        raise FramingError("first byte 0x%02x starts neither STUN nor ChannelData" % first)
    if length & 3:
        raise FramingError("STUN length %d is not a multiple of 4" % length)
    if available < 8:
        return 0
    if buffer[offset + 4 : offset + 8] != MAGIC_COOKIE:
        raise FramingError("STUN message without the magic cookie")
    return STUN_HEADER + length


class Deframer:
    """Cuts a byte stream into frames: ``feed(chunk)`` returns the frames it
    completed (each one whole message, ChannelData with its padding) and keeps
    the partial one.  After a ``FramingError`` the stream is unusable."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def pending(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        frames: list[bytes] = []
        offset = 0
        end = len(buffer)
        while True:
            size = frame_length(buffer, offset)
            if size == 0 or offset + size > end:
                break
            frames.append(buffer[offset : offset + size] if offset or size != end else buffer)
            offset += size
        self._buffer = buffer[offset:] if offset else buffer
        return frames
