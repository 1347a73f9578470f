"""ChannelData, RFC 8656 §12: the codec and the stream framing, in one place.

A ChannelData message is a 4-byte header (channel number 0x4000–0x7FFF,
payload length) and the payload (§12.4).  Over UDP the datagram ends it
(padding optional, ignored); over TCP/TLS it is padded to a multiple of 4
(§12.5).  ``encode``/``decode`` are the codec; ``is_channel_data`` and
``is_stun`` the first-two-bits demultiplexing (RFC 8656 §12 / SPEC §1) for
the shell's classification.  The relay's two per-packet paths inline the
same header arithmetic (a function call per packet costs more than the work)
and are tested against this codec.

Message boundaries on a stream transport (TCP, TLS): RFC 8656 §12.5.

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

from typing import Tuple

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
STUN_HEADER = 20
CHANNEL_HEADER = 4
#: The largest frame either kind can announce: a STUN header and 65532
#: attribute bytes (65535 rounded down to a multiple of 4).
MAX_FRAME = STUN_HEADER + 0xFFFC


#: RFC 8656 §12: the channel numbers a client may bind.
MIN_CHANNEL = 0x4000
MAX_CHANNEL = 0x7FFF


class FramingError(ValueError):
    """The peer sent bytes that cannot start a STUN or ChannelData frame,
    or a ChannelData message that ``decode`` cannot read."""


def is_channel_data(data: bytes) -> bool:
    """True when ``data`` starts like ChannelData (first two bits ``01``)."""
    return bool(data) and 0x40 <= data[0] < 0x80


def is_stun(data: bytes) -> bool:
    """True when ``data`` starts like a STUN message (first two bits ``00``)."""
    return bool(data) and data[0] < 0x40


def encode(channel: int, payload: bytes, pad: bool = False) -> bytes:
    """A ChannelData message; padded to 4 bytes only for stream transports."""
    if not MIN_CHANNEL <= channel <= MAX_CHANNEL:
        raise ValueError("channel number outside 0x4000-0x7FFF")
    n = len(payload)
    if n > 0xFFFF:
        raise ValueError("payload too long")
    frame = channel.to_bytes(2, "big") + n.to_bytes(2, "big") + payload
    if pad and n & 3:
        frame += b"\x00" * (-n % 4)
    return frame


def decode(data: bytes) -> Tuple[int, bytes]:
    """``(channel, payload)`` of one ChannelData message; trailing padding is
    ignored.  ``FramingError`` when the channel is outside 0x4000–0x7FFF or
    the length field exceeds the data."""
    if len(data) < CHANNEL_HEADER:
        raise FramingError("ChannelData shorter than its header")
    channel = (data[0] << 8) | data[1]
    if not MIN_CHANNEL <= channel <= MAX_CHANNEL:
        raise FramingError("not a ChannelData channel number")
    length = (data[2] << 8) | data[3]
    if length > len(data) - CHANNEL_HEADER:
        raise FramingError("ChannelData length exceeds the data")
    return channel, bytes(data[CHANNEL_HEADER : CHANNEL_HEADER + length])


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
