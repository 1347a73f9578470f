"""``--config FILE`` parsing (firezone_relay.config): keys, types and error lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from typing import Any, Optional

from twisted.internet import defer
from twisted.python import usage
from twisted.trial import unittest

from firezone_relay.config import ConfigError, FlagSpec, load_config, parse_config
from firezone_relay.core import stun

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


class OptionsTests(unittest.TestCase):
    """``--config`` in ``tap.Options``: flag > env > file > default, errors at the file's line."""

    def write(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(text)
        return path

    def parse(self, args: list[str], environ: Optional[dict[str, str]] = None) -> Any:
        from firezone_relay import tap

        options = tap.Options(environ=environ or {})
        options.parseOptions(args)
        return options

    def test_precedence(self) -> None:
        path = self.write('listen-port = 4000\nallow-peer = ["203.0.113.0/24", "198.51.100.0/24"]\n')
        self.assertEqual(self.parse([])["listen-port"], 3478)
        self.assertEqual(self.parse(["--config", path])["listen-port"], 4000)
        self.assertEqual(self.parse(["--config", path], {"LISTEN_PORT": "4001"})["listen-port"], 4001)
        self.assertEqual(self.parse(["--config=%s" % path, "--listen-port=4002"], {"LISTEN_PORT": "4001"})["listen-port"], 4002)
        self.assertEqual(self.parse([], {"CONFIG_FILE": path})["listen-port"], 4000)
        self.assertEqual(self.parse(["--config", path])["allow-peer"], ("203.0.113.0/24", "198.51.100.0/24"))
        self.assertEqual(self.parse(["--config", path], {"ALLOW_PEER": "192.0.2.0/24"})["allow-peer"], ("192.0.2.0/24",))
        self.assertEqual(
            self.parse(["--config", path, "--allow-peer", "100.64.0.0/10"], {"ALLOW_PEER": "192.0.2.0/24"})["allow-peer"],
            ("100.64.0.0/10",),
        )

    def test_a_bad_value_names_the_file_line_and_key(self) -> None:
        path = self.write("# limits\nmax-allocations = 10\nlowest-port = 70000\n")
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(["--config", path])
        self.assertEqual(
            str(caught.exception), "%s:3: key 'lowest-port': --lowest-port must be between 1024 and 65535 (got 70000)" % path
        )
        # The same value from the command line is the command line's error.
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(["--config", path, "--lowest-port", "70001"])
        self.assertTrue(str(caught.exception).startswith("--lowest-port must be"), str(caught.exception))

    def test_an_environment_value_names_its_variable(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse([], {"MAX_BPS": "abc"})
        self.assertEqual(str(caught.exception), "MAX_BPS: --max-bps: 'abc' is not an integer")
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(["--max-bps", "abc"], {"MAX_BPS": "1"})
        self.assertEqual(str(caught.exception), "--max-bps: 'abc' is not an integer")
        for value in (",", "a-secret-of-enough-length-0123456789,", "x,,y"):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse([], {"REST_AUTH_SECRETS": value})
            self.assertEqual(str(caught.exception), "REST_AUTH_SECRETS: an empty secret in the comma-separated list")
        self.assertEqual(self.parse([], {"REST_AUTH_SECRETS": ""})["rest-auth-secret"], ())

    def test_file_errors(self) -> None:
        path = self.write("max-allocation = 10\n")
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(["--config", path])
        self.assertEqual(
            str(caught.exception), "--config: %s:1: unknown key 'max-allocation' (did you mean 'max-allocations'?)" % path
        )
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(["--config", "/nonexistent.toml"])
        self.assertIn("/nonexistent.toml: cannot be read", str(caught.exception))


def _records(path: str) -> list[dict[str, Any]]:
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class ReloadProcessTests(unittest.TestCase):
    """A real relay with --config, changed and sent SIGHUP."""

    timeout = 90

    def wait_log(self, relay: Any, fragment: str, after: int) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            records = _records(str(relay.log_path))[after:]
            for record in records:
                if fragment in str(record.get("msg", "")):
                    return record
            time.sleep(0.05)
        self.fail("no log line with %r:\n%s" % (fragment, relay.output()))

    def hup(self, relay: Any, text: str, fragment: str) -> dict[str, Any]:
        with open(self.path, "w") as f:
            f.write(text)
        after = len(_records(str(relay.log_path)))
        relay.proc.send_signal(signal.SIGHUP)
        return self.wait_log(relay, fragment, after)

    @defer.inlineCallbacks
    def test_sighup_applies_live_keys_refuses_the_rest_and_keeps_allocations(self) -> Any:
        from tests.helpers import TurnClient, error_code, listen
        from tests.interop.support import SECRET, Relay

        self.path = os.path.abspath(self.mktemp() + ".toml")
        with open(self.path, "w") as f:
            f.write("max-allocations = 1\n")
        relay = Relay(self, extra=["--config", self.path])
        expiry = int(time.time()) + 3600
        clients = []
        for salt in ("a", "b"):
            client = TurnClient(("127.0.0.1", relay.listen_port))
            port = listen(client)
            self.addCleanup(port.stopListening)
            clients.append(client)
        _, first = yield clients[0].allocate(SECRET, expiry, salt="a")
        self.assertEqual(first.msg_class, stun.SUCCESS)
        _, refused = yield clients[1].allocate(SECRET, expiry, salt="b")
        self.assertEqual(error_code(refused), 508)

        record = self.hup(relay, "max-allocations = 0\nmax-bps = 50000\n", "configuration reloaded")
        self.assertIn("max-allocations=0", record["msg"])
        self.assertIn("max-bps=50000", record["msg"])
        _, second = yield clients[1].allocate(SECRET, expiry, salt="b")
        self.assertEqual(second.msg_class, stun.SUCCESS)
        refresh = yield clients[0].request(stun.REFRESH, [(stun.LIFETIME, 600)])
        self.assertEqual(refresh.msg_class, stun.SUCCESS)  # the first allocation survived

        # A file that does not parse: the error with its line, nothing changes.
        record = self.hup(relay, "max-allocations = 0\nmax-bps = = 1\n", "configuration reload failed")
        self.assertEqual(record["level"], "error")
        self.assertIn("line 2", record["msg"])
        # A key that cannot change live: named, refused; the live ones still apply.
        record = self.hup(relay, "max-allocations = 2\nsocket-buffer = 65536\n", "socket-buffer cannot change while running")
        self.assertEqual(record["level"], "warn")
        self.wait_log(relay, "configuration reloaded: max-allocations=2, max-bps=0", 0)
        # A bad value: file, line, key.
        record = self.hup(relay, "max-allocations = -1\n", "configuration reload failed")
        self.assertIn("%s:1: key 'max-allocations'" % self.path, record["msg"])
        # The log level: the reload's own line is still written, info lines after it are not.
        record = self.hup(relay, 'max-allocations = 0\nlog-level = "warn"\n', "configuration reloaded")
        self.assertIn("log-level=warn", record["msg"])
        third = TurnClient(("127.0.0.1", relay.listen_port))
        port = listen(third)
        self.addCleanup(port.stopListening)
        created = len(relay.created())
        _, final = yield third.allocate(SECRET, expiry, salt="c")
        self.assertEqual(final.msg_class, stun.SUCCESS)
        self.assertEqual(len(relay.created()), created)  # "allocation created" is info: hidden
        self.assertIsNone(relay.proc.poll())
        # The only error lines are the two failed reloads above.
        errors = [r["msg"] for r in relay.records() if r.get("level") in ("error", "critical") or "traceback" in r]
        self.assertEqual(len(errors), 2, errors)
        self.assertTrue(all(m.startswith("configuration reload failed") for m in errors), errors)

    def test_a_bad_file_at_start_up_is_one_clear_line_and_exit_2(self) -> None:
        from tests.interop.support import TWISTD, relay_env

        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write("listen-port = 3478\nallow-loopback-peers = \"yes\"\n")
        result = subprocess.run(
            TWISTD + ["-n", "--pidfile=", "firezone-relay", "--config", path],
            capture_output=True, text=True, timeout=60, env=relay_env(),
        )
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertIn("%s:2: key 'allow-loopback-peers' must be true or false, not a string" % path, output)
        self.assertNotIn("Traceback", output)
