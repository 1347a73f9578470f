"""``--config FILE`` parsing (firezone_relay.config): keys, types and error lines."""

from __future__ import annotations

import os
import tempfile

from twisted.trial import unittest

from firezone_relay.config import ConfigError, FlagSpec, load_config, parse_config

SPEC = FlagSpec(
    parameters=frozenset(("listen-port", "max-allocations", "unauthenticated-rate", "log-level")),
    flags=frozenset(("allow-loopback-peers",)),
    repeatable=frozenset(("allow-peer", "deny-peer")),
)


class ParseTests(unittest.TestCase):
    def test_values_become_arguments_in_file_order(self) -> None:
        text = (
            "# a comment\n"
            "listen-port = 3479\n"
            'allow-peer = ["203.0.113.0/24", "2001:db8::/32"]\n'
            "allow-loopback-peers = true\n"
            "unauthenticated-rate = 2.5\n"
            'deny-peer = "198.51.100.0/24"\n'
        )
        config = parse_config("relay.toml", text, SPEC)
        self.assertEqual(
            config.arguments(),
            [
                "--listen-port", "3479",
                "--allow-peer", "203.0.113.0/24",
                "--allow-peer", "2001:db8::/32",
                "--allow-loopback-peers",
                "--unauthenticated-rate", "2.5",
                "--deny-peer", "198.51.100.0/24",
            ],
        )
        self.assertEqual(config.where("allow-peer"), "relay.toml:3")

    def test_a_false_flag_gives_no_argument(self) -> None:
        self.assertEqual(parse_config("f", "allow-loopback-peers = false\n", SPEC).arguments(), [])

    def test_errors_name_file_line_and_key(self) -> None:
        cases = [
            ("listen-port = 1\nlisten_port = 2\n", "f.toml:2: unknown key 'listen_port' (did you mean 'listen-port'?)"),
            ("\n\nnope = 1\n", "f.toml:3: unknown key 'nope'"),
            ("allow-loopback-peers = 1\n", "f.toml:1: key 'allow-loopback-peers' must be true or false, not a number"),
            ("listen-port = true\n", "f.toml:1: key 'listen-port' must be a string or a number, not a boolean"),
            ("listen-port = [1]\n", "f.toml:1: key 'listen-port' must be a string or a number, not a list"),
            ("allow-peer = [1]\n", "f.toml:1: key 'allow-peer' must be a string or a list of strings, not a list with a number"),
            ("\n[relay]\nlisten-port = 1\n", "f.toml:2: [relay]: tables are not used"),
            ("max-allocations = 1979-05-27\n", "f.toml:1: key 'max-allocations' must be a string or a number, not a date"),
        ]
        for text, expected in cases:
            with self.assertRaises(ConfigError) as caught:
                parse_config("f.toml", text, SPEC)
            self.assertTrue(str(caught.exception).startswith(expected), (str(caught.exception), expected))

    def test_syntax_errors_carry_tomllibs_line(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config("f.toml", "listen-port = 1\nmax-allocations = = 2\n", SPEC)
        self.assertIn("f.toml: not valid TOML", str(caught.exception))
        self.assertIn("line 2", str(caught.exception))

    def test_duplicate_keys_are_a_syntax_error(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config("f.toml", "listen-port = 1\nlisten-port = 2\n", SPEC)
        self.assertIn("line 2", str(caught.exception))


class LoadTests(unittest.TestCase):
    def write(self, data: bytes) -> str:
        fd, path = tempfile.mkstemp(suffix=".toml")
        os.write(fd, data)
        os.close(fd)
        self.addCleanup(os.unlink, path)
        return path

    def test_missing_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_config("/nonexistent/relay.toml", SPEC)
        self.assertEqual(str(caught.exception), "/nonexistent/relay.toml: cannot be read: No such file or directory")

    def test_binary_file(self) -> None:
        path = self.write(b"listen-port = 1\n\xff\xfe\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path, SPEC)
        self.assertEqual(str(caught.exception), "%s:2: not UTF-8 text" % path)

    def test_huge_file(self) -> None:
        path = self.write(b"# " + b"x" * (1 << 20) + b"\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path, SPEC)
        self.assertIn("larger than", str(caught.exception))

    def test_a_good_file(self) -> None:
        path = self.write(b"max-allocations = 10\n")
        self.assertEqual(load_config(path, SPEC).arguments(), ["--max-allocations", "10"])
