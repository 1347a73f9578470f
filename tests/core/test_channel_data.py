"""ChannelData (RFC 8656 §12): the codec, the demultiplexing and the stream
framing (§12.5: where one message ends on TCP and TLS)."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

import tests.hypothesis_profile  # noqa: F401
from firezone_relay.core import stun
from firezone_relay.core import channel_data as codec
from firezone_relay.core.channel_data import MAX_FRAME, Deframer, FramingError, decode, encode, frame_length, is_channel_data, is_stun
from tests.core.test_stun import RFC5769_REQUEST


def binding(attributes: int = 0) -> bytes:
    attrs = [(stun.SOFTWARE, "x" * (4 * attributes))] if attributes else []
    return stun.encode(stun.BINDING, stun.REQUEST, os.urandom(12), attrs)


def channel_data(payload: bytes, channel: int = 0x4001) -> bytes:
    """A stream frame: header, payload, padding to 4."""
    return channel.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload + b"\0" * (-len(payload) % 4)


class FrameLengthTests(unittest.SynchronousTestCase):
    def test_stun_by_its_length_field(self) -> None:
        message = binding(3)
        self.assertEqual(frame_length(message), len(message))
        self.assertEqual(frame_length(b"junk" + message, 4), len(message))

    def test_channel_data_is_padded_to_four(self) -> None:
        for n in range(0, 9):
            frame = channel_data(b"p" * n)
            self.assertEqual(frame_length(frame), 4 + n + (-n % 4))
            self.assertEqual(len(frame) % 4, 0)
        self.assertEqual(frame_length(b"\x7f\xff\xff\xff"), 4 + 0x10000)

    def test_needs_more_bytes(self) -> None:
        message = binding()
        for cut in range(0, 8):
            self.assertEqual(frame_length(message[:cut]), 0, cut)
        self.assertEqual(frame_length(b"\x40\x00\x00"), 0)
        # The length is known from 8 bytes on, before the frame is complete.
        self.assertEqual(frame_length(message[:8]), 20)

    def test_bad_first_bits(self) -> None:
        for first in (0x80, 0xBF, 0xC0, 0xFF):
            with self.assertRaises(FramingError):
                frame_length(bytes([first, 0, 0, 0]))

    def test_stun_length_not_multiple_of_four(self) -> None:
        with self.assertRaises(FramingError):
            frame_length(b"\x00\x01\x00\x05")

    def test_stun_without_cookie(self) -> None:
        with self.assertRaises(FramingError):
            frame_length(b"\x00\x01\x00\x00\x21\x12\xa4\x43" + b"\0" * 12)

    def test_largest_frames(self) -> None:
        self.assertEqual(frame_length(b"\x00\x01\xff\xfc\x21\x12\xa4\x42"), MAX_FRAME)
        self.assertLessEqual(frame_length(b"\x40\x00\xff\xff"), MAX_FRAME)


class DeframerTests(unittest.SynchronousTestCase):
    def test_byte_by_byte(self) -> None:
        message = binding(2)
        deframer = Deframer()
        out = []
        for i in range(len(message)):
            out += deframer.feed(message[i : i + 1])
        self.assertEqual(out, [message])
        self.assertEqual(deframer.pending, 0)

    def test_several_in_one_chunk_and_a_partial_tail(self) -> None:
        a, b, c = binding(), channel_data(b"hello"), binding(1)
        deframer = Deframer()
        self.assertEqual(deframer.feed(a + b + c[:7]), [a, b])
        self.assertEqual(deframer.pending, 7)
        self.assertEqual(deframer.feed(c[7:]), [c])

    def test_whole_chunk_is_not_copied(self) -> None:
        a = binding()
        self.assertIs(Deframer().feed(a)[0], a)

    def test_garbage_raises(self) -> None:
        deframer = Deframer()
        with self.assertRaises(FramingError):
            deframer.feed(binding() + b"\xff" * 8)

    @given(
        st.lists(
            st.one_of(
                st.integers(0, 10).map(binding),
                st.binary(max_size=300).map(channel_data),
            ),
            max_size=12,
        ),
        st.lists(st.integers(1, 400), max_size=30),
    )
    def test_any_split_gives_the_same_frames(self, frames: list[bytes], cuts: list[int]) -> None:
        stream = b"".join(frames)
        deframer = Deframer()
        out: list[bytes] = []
        position = 0
        for cut in cuts:
            out += deframer.feed(stream[position : position + cut])
            position += cut
        out += deframer.feed(stream[position:])
        self.assertEqual(out, frames)
        self.assertEqual(deframer.pending, 0)

    @given(st.binary(max_size=2000))
    def test_never_raises_anything_else_and_holds_at_most_one_frame(self, data: bytes) -> None:
        deframer = Deframer()
        try:
            frames = deframer.feed(data)
        except FramingError:
            return
        self.assertEqual(sum(len(f) for f in frames) + deframer.pending, len(data))
        self.assertLess(deframer.pending, MAX_FRAME)


class CodecTests(unittest.TestCase):
    """The ChannelData codec (RFC 8656 §12.4) and the first-two-bits demultiplexing."""

    @given(st.binary(max_size=80))
    def test_decode(self, data: bytes) -> None:
        try:
            channel, payload = decode(data)
        except FramingError:
            return
        self.assertTrue(0x4000 <= channel <= 0x7FFF)
        self.assertTrue(is_channel_data(data))
        self.assertEqual(data[4 : 4 + len(payload)], payload)

    @given(st.integers(0x4000, 0x7FFF), st.binary(max_size=100), st.booleans(), st.binary(max_size=7))
    def test_round_trip(self, channel: int, payload: bytes, pad: bool, trailing: bytes) -> None:
        frame = encode(channel, payload, pad=pad)
        self.assertTrue(is_channel_data(frame))
        self.assertEqual(len(frame), 4 + len(payload) + (-len(payload) % 4 if pad else 0))
        self.assertEqual(decode(frame), (channel, payload))
        self.assertEqual(decode(frame + trailing), (channel, payload))
        for cut in range(4, len(frame) - (len(frame) - 4 - len(payload))):
            self.assertRaises(FramingError, decode, frame[:cut])
        if pad:  # a padded frame is exactly one stream frame
            self.assertEqual(frame_length(frame), len(frame))

    def test_encode_refuses(self) -> None:
        self.assertRaises(ValueError, encode, 0x3FFF, b"x")
        self.assertRaises(ValueError, encode, 0x8000, b"x")
        self.assertRaises(ValueError, encode, 0x4000, b"x" * 0x10000)

    @given(st.binary(max_size=4))
    def test_classify(self, data: bytes) -> None:
        stun_kind, channel_kind = is_stun(data), is_channel_data(data)
        if not data or data[0] >= 0x80:
            self.assertEqual((stun_kind, channel_kind), (False, False))
        elif data[0] < 0x40:
            self.assertEqual((stun_kind, channel_kind), (True, False))
        else:
            self.assertEqual((stun_kind, channel_kind), (False, True))

    def test_stun_names_stay_importable(self) -> None:
        """The shell's tests still call ``stun.encode_channel_data``/``decode_channel_data``."""
        self.assertIs(stun.encode_channel_data, codec.encode)
        self.assertIs(stun.decode_channel_data, codec.decode)
        from firezone_relay.core import framing  # the stream adapter's import, until it moves

        self.assertIs(framing.Deframer, Deframer)
        self.assertIs(framing.frame_length, frame_length)


class ChannelDataExamples(unittest.SynchronousTestCase):
    """Examples of the codec (moved from test_stun with the codec)."""

    def test_decode(self) -> None:
        self.assertEqual(decode(b"\x40\x01\x00\x03abc\x00"), (0x4001, b"abc"))
        self.assertEqual(decode(b"\x40\x01\x00\x03abc"), (0x4001, b"abc"))
        self.assertEqual(decode(b"\x7f\xff\x00\x00"), (0x7FFF, b""))
        self.assertEqual(decode(bytearray(b"\x40\x00\x00\x01z\x00\x00\x00")), (0x4000, b"z"))
        for bad in (
            b"",
            b"\x40\x01\x00",
            b"\x40\x01\x00\x04abc",  # length exceeds the datagram
            b"\x3f\xff\x00\x00",
            b"\x80\x00\x00\x00",
            b"\xff\xff\x00\x00",
        ):
            self.assertRaises(FramingError, decode, bad)

    def test_encode(self) -> None:
        self.assertEqual(encode(0x4001, b"abc"), b"\x40\x01\x00\x03abc")
        self.assertEqual(encode(0x4001, b"abc", pad=True), b"\x40\x01\x00\x03abc\x00")
        self.assertEqual(encode(0x4001, b"abcd", pad=True), b"\x40\x01\x00\x04abcd")
        self.assertEqual(encode(0x7FFF, b""), b"\x7f\xff\x00\x00")
        self.assertRaises(ValueError, encode, 0x3FFF, b"")
        self.assertRaises(ValueError, encode, 0x8000, b"")
        self.assertRaises(ValueError, encode, 0x4000, b"x" * 0x10000)

    def test_classify_examples(self) -> None:
        self.assertEqual((is_stun(b""), is_channel_data(b"")), (False, False))
        self.assertEqual((is_stun(RFC5769_REQUEST), is_channel_data(RFC5769_REQUEST)), (True, False))
        self.assertEqual((is_stun(b"\x40\x00"), is_channel_data(b"\x40\x00")), (False, True))
        self.assertEqual((is_stun(b"\x7f"), is_channel_data(b"\x7f")), (False, True))
        self.assertEqual((is_stun(b"\x80"), is_channel_data(b"\x80")), (False, False))
        self.assertEqual((is_stun(b"\x16\x03\x01"), is_channel_data(b"\x16\x03\x01")), (True, False))  # TLS looks like STUN here; decode drops it
        self.assertEqual((is_stun(b"\xc0"), is_channel_data(b"\xc0")), (False, False))
