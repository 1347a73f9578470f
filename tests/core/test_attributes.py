"""Attribute value codecs (core/attributes.py), on their own."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import attributes, stun

TID = bytes(range(12))


class AttributeCodecTests(SynchronousTestCase):
    def test_bounds_agree_with_the_message_decoder(self) -> None:
        self.assertEqual(attributes.MAX_UNKNOWN_ENTRIES, stun.MAX_ATTRIBUTES)
        self.assertEqual(attributes.MAGIC_COOKIE, stun.MAGIC_COOKIE)

    def test_xor_address_round_trip_and_masking(self) -> None:
        for address in (("192.0.2.1", 3478), ("2001:db8::1", 65535), ("::", 0)):
            raw = attributes.encode_xor_address(address, TID)
            self.assertEqual(attributes.decode_xor_address(raw, TID), address)
            self.assertNotEqual(raw, attributes.encode_address(address, TID))
            self.assertEqual(attributes.decode_address(attributes.encode_address(address, TID), TID), address)

    def test_malformed_values_raise_attribute_value_error(self) -> None:
        bad = [
            (attributes.decode_xor_address, b"\x00\x01\x00"),
            (attributes.decode_u32, b"\x00\x00\x00"),
            (attributes.decode_channel_number, b"\x40"),
            (attributes.decode_error_code, b"\x00\x00\x09\x64"),  # class 9
            (attributes.text_codec(4)[0], b"\xff\xfe"),
            (attributes.text_codec(4)[0], b"12345"),
        ]
        for decoder, value in bad:
            self.assertRaises(attributes.AttributeValueError, decoder, value, TID)

    def test_a_malformed_value_makes_the_request_a_400(self) -> None:
        data = bytearray(stun.encode(stun.BINDING, stun.REQUEST, TID, [(stun.LIFETIME, 600)]))
        data[22:24] = b"\x00\x03"  # LIFETIME of 3 bytes, padded
        with self.assertRaises(stun.StunDecodeError) as caught:
            stun.decode(bytes(data))
        self.assertEqual(caught.exception.error_code, 400)

    def test_every_codec_in_the_table_is_one_of_these(self) -> None:
        module_functions = {v for v in vars(attributes).values() if callable(v)}
        for atype, (decoder, encoder) in attributes.CODECS.items():
            for function in (decoder, encoder):
                self.assertTrue(function in module_functions or function.__module__ == attributes.__name__, (atype, function))


class RegistryTests(SynchronousTestCase):
    def test_stun_re_exports_every_registry_value(self) -> None:
        from firezone_relay.core import iana

        self.assertIn("BINDING", iana.__all__)
        for name in iana.__all__:
            self.assertIs(getattr(stun, name), getattr(iana, name), name)

    def test_values_are_distinct_within_each_registry(self) -> None:
        from firezone_relay.core import iana

        methods = [iana.BINDING, iana.ALLOCATE, iana.REFRESH, iana.SEND, iana.DATA_METHOD, iana.CREATE_PERMISSION, iana.CHANNEL_BIND]
        self.assertEqual(len(set(methods)), len(methods))
        self.assertEqual(set(iana.METHOD_NAMES), set(methods))
        self.assertTrue(all(300 <= code <= 699 for code in iana.REASONS))
