"""Upstream's command line and environment (issue 15 item 4).

``twistd firezone-relay TOKEN [NAME]`` as upstream's positional arguments,
``--log-level`` / ``LOG_LEVEL`` / ``RUST_LOG``, debug lines hidden by default,
and bad input as one error line with a non-zero exit, through real twistd
processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.python import usage
from twisted.trial import unittest

from firezone_relay import logs
from firezone_relay.logs import LogLevels, parse_log_level
from tests.helpers import free_udp_port, kill_if_running, port_range
from tests.portal_stub import TOKEN as STUB_TOKEN
from tests.portal_stub import StubPortal
from tests.test_tap import TWISTD, TOKEN, binding_roundtrip, parse, twistd_env

#: Logged at debug by the drain controller at every start (adapters/drain.py).
DEBUG_LINE = "drain signal handlers installed"
#: Logged at info by twistd itself (namespace twisted.*), not by the relay.
TWISTD_INFO = "starting up"
RELAY_INFO = "generated auth secret"


class PositionalTests(unittest.SynchronousTestCase):
    def assertUsageError(self, args: Sequence[str], fragment: str, environ: Optional[Dict[str, str]] = None) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            parse(args, environ)
        self.assertIn(fragment, str(caught.exception))
        return str(caught.exception)

    def test_token_and_name_as_arguments(self) -> None:
        o = parse([TOKEN, "relay-7"])
        self.assertEqual((o["token"], o["name"]), (TOKEN, "relay-7"))
        self.assertEqual(o["user-allocation-limit"], 1)  # portal mode
        o = parse([TOKEN])
        self.assertEqual((o["token"], o["name"]), (TOKEN, None))

    def test_options_before_and_after_the_arguments(self) -> None:
        o = parse(["--listen-port", "3479", TOKEN, "--lowest-port=50000", "relay-7", "--allow-loopback-peers"])
        self.assertEqual((o["token"], o["name"], o["listen-port"], o["lowest-port"]), (TOKEN, "relay-7", 3479, 50000))
        self.assertTrue(o["allow-loopback-peers"])
        # "--" ends the options: a token may then start with a dash.
        self.assertEqual(parse(["--", "-odd-token"])["token"], "-odd-token")

    def test_arguments_beat_the_environment_like_flags(self) -> None:
        o = parse([TOKEN, "relay-7"], {"FIREZONE_TOKEN": "from-env", "FIREZONE_NAME": "env-name"})
        self.assertEqual((o["token"], o["name"]), (TOKEN, "relay-7"))
        o = parse([], {"FIREZONE_TOKEN": TOKEN, "FIREZONE_NAME": "env-name"})
        self.assertEqual((o["token"], o["name"]), (TOKEN, "env-name"))

    def test_given_twice_or_too_many(self) -> None:
        message = self.assertUsageError(["--token", "other-token", TOKEN], "TOKEN is given twice")
        self.assertNotIn(TOKEN, message)
        self.assertUsageError(["--name", "a", TOKEN, "b"], "NAME is given twice")
        self.assertUsageError([TOKEN, "name", "extra"], "Wrong number of arguments")

    def test_empty_or_whitespace_token(self) -> None:
        for args, environ in [
            ([""], None),
            (["  \t"], None),
            (["--token", ""], None),
            (["--token", " "], None),
            ([], {"FIREZONE_TOKEN": ""}),
            ([], {"FIREZONE_TOKEN": "\n"}),
        ]:
            self.assertUsageError(args, "the portal token (TOKEN, --token or FIREZONE_TOKEN) is empty", environ)


class LogLevelParseTests(unittest.SynchronousTestCase):
    def test_levels_and_directives(self) -> None:
        info = LogLevel.info
        cases = {
            "": LogLevels(info, None),
            "info": LogLevels(info, None),
            "DEBUG": LogLevels(LogLevel.debug, None),
            "trace": LogLevels(LogLevel.debug, None),
            "warn": LogLevels(LogLevel.warn, None),
            "warning": LogLevels(LogLevel.warn, None),
            "error": LogLevels(LogLevel.error, None),
            "off": LogLevels(LogLevel.critical, None),
            "2": LogLevels(LogLevel.warn, None),
            "warn,relay=debug": LogLevels(LogLevel.warn, LogLevel.debug),
            " error , firezone_relay=info ": LogLevels(LogLevel.error, info),
            "firezone_relay=trace": LogLevels(info, LogLevel.debug),  # upstream's smoke test
            "relay::server=debug,warn": LogLevels(LogLevel.warn, LogLevel.debug),
            "relay=warn,wire=debug": LogLevels(info, LogLevel.debug),  # the more verbose wins
            "snownet=debug,str0m=warn": LogLevels(info, None),  # other programs' targets
            "relay[span{x=1}]=debug": LogLevels(info, LogLevel.debug),
            "relay": LogLevels(info, LogLevel.debug),  # a bare target: all of it
            "info,debug": LogLevels(LogLevel.debug, None),  # the last global one
        }
        for text, expected in cases.items():
            self.assertEqual(parse_log_level(text), expected, text)
        for bad in ("nonsense", "info,loud", "relay=loud", "relay=", "=debug,x"):
            with self.assertRaises(ValueError, msg=bad):
                parse_log_level(bad)

    def test_flag_environment_and_precedence(self) -> None:
        self.assertEqual(parse()["log-level"], LogLevels(LogLevel.info, None))
        self.assertEqual(parse(["--log-level", "debug"])["log-level"].default, LogLevel.debug)
        self.assertEqual(parse([], {"LOG_LEVEL": "warn"})["log-level"].default, LogLevel.warn)
        self.assertEqual(parse([], {"RUST_LOG": "warn,relay=debug"})["log-level"], LogLevels(LogLevel.warn, LogLevel.debug))
        # LOG_LEVEL (ours) wins over RUST_LOG (often inherited); the flag over both.
        self.assertEqual(parse([], {"LOG_LEVEL": "error", "RUST_LOG": "debug"})["log-level"], LogLevels(LogLevel.error, None))
        self.assertEqual(parse(["--log-level=info"], {"LOG_LEVEL": "error", "RUST_LOG": "debug"})["log-level"].default, LogLevel.info)
        # A bad RUST_LOG is not looked at when LOG_LEVEL is set.
        self.assertEqual(parse([], {"LOG_LEVEL": "info", "RUST_LOG": "nonsense"})["log-level"].default, LogLevel.info)
        for args, environ in [(["--log-level", "nonsense"], None), ([], {"LOG_LEVEL": "nonsense"}), ([], {"RUST_LOG": "loud"})]:
            with self.assertRaises(usage.UsageError) as caught:
                parse(args, environ)
            self.assertIn("--log-level (LOG_LEVEL, RUST_LOG):", str(caught.exception))
            self.assertIn("is not a log level", str(caught.exception))

    def test_filter(self) -> None:
        seen: List[Dict[str, Any]] = []
        observer = logs.level_filter(seen.append, parse_log_level("warn,relay=debug"))

        def emit(level: Any, namespace: Optional[str], text: str) -> None:
            event: Dict[str, Any] = {"log_format": text}
            if level is not None:
                event["log_level"] = level
            if namespace is not None:
                event["log_namespace"] = namespace
            observer(event)

        emit(LogLevel.debug, "firezone_relay.adapters.drain", "relay debug")
        emit(LogLevel.info, "twisted.scripts._twistd_unix.UnixAppLogger", "twistd info")
        emit(LogLevel.warn, "twisted.internet", "twisted warn")
        emit(None, None, "legacy without level or namespace")  # info: hidden at warn
        emit(LogLevel.critical, None, "critical without namespace")
        self.assertEqual([e["log_format"] for e in seen], ["relay debug", "twisted warn", "critical without namespace"])


class ProcessTests(unittest.TestCase):
    timeout = 120

    def run_relay(self, extra: Sequence[str] = (), env: Optional[Dict[str, str]] = None) -> str:
        """Start a standalone relay, wait for a Binding answer, SIGTERM it; its output."""
        for _ in range(3):
            listen_port = free_udp_port((4,))
            low, high = port_range(16, avoid=[listen_port])
            cwd = self.mktemp()
            os.makedirs(cwd)
            log_path = os.path.join(cwd, "relay.log")
            with open(log_path, "w") as log_file:
                proc = subprocess.Popen(
                    TWISTD
                    + ["-n", "--pidfile=", "firezone-relay", "--listen-port=%d" % listen_port]
                    + ["--lowest-port=%d" % low, "--highest-port=%d" % high, "--public-ip4-addr=127.0.0.1"]
                    + ["--bind-ip4-addr=127.0.0.1", "--health-check-addr=127.0.0.1:0", "--max-connections=0"]
                    + list(extra),
                    cwd=cwd,
                    env=twistd_env(**(env or {})),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            try:
                answered = binding_roundtrip(listen_port, time.time() + 20) is not None
                if answered:
                    proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
            finally:
                kill_if_running(proc)
            with open(log_path) as f:
                output = f.read()
            if answered:
                return output
        self.fail("the relay never answered a Binding:\n" + output)

    def test_debug_lines_hidden_by_default(self) -> None:
        output = self.run_relay()
        self.assertIn(RELAY_INFO, output)
        self.assertIn(TWISTD_INFO, output)
        self.assertNotIn(DEBUG_LINE, output)

    def test_log_level_debug_by_flag_and_environment(self) -> None:
        for extra, env in [(["--log-level", "debug"], None), ([], {"LOG_LEVEL": "debug"}), ([], {"RUST_LOG": "debug"})]:
            output = self.run_relay(extra, env)
            self.assertIn(DEBUG_LINE, output, (extra, env))
            self.assertIn(RELAY_INFO, output, (extra, env))

    def test_rust_log_directives_and_precedence(self) -> None:
        # warn globally, debug for the relay: the relay's info and debug lines
        # show, twistd's own info lines do not.
        output = self.run_relay(env={"RUST_LOG": "warn,relay=debug"})
        self.assertIn(DEBUG_LINE, output)
        self.assertIn(RELAY_INFO, output)
        self.assertNotIn(TWISTD_INFO, output)
        # LOG_LEVEL beats RUST_LOG.
        output = self.run_relay(env={"LOG_LEVEL": "warn", "RUST_LOG": "debug"})
        self.assertNotIn(DEBUG_LINE, output)
        self.assertNotIn(RELAY_INFO, output)
        self.assertNotIn(TWISTD_INFO, output)

    def test_json_format_is_filtered_too(self) -> None:
        for level, shown in [("info", False), ("debug", True)]:
            output = self.run_relay(["--log-format", "json", "--log-level", level])
            records = [json.loads(line) for line in output.splitlines() if line.strip()]
            self.assertTrue(any(RELAY_INFO in r["msg"] for r in records))
            self.assertEqual(any(r["msg"] == DEBUG_LINE and r["level"] == "debug" for r in records), shown, level)

    def run_bad(self, args: Sequence[str], env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
        cwd = self.mktemp()
        os.makedirs(cwd)
        return subprocess.run(
            TWISTD + ["-n", "--pidfile=", "firezone-relay"] + list(args),
            cwd=cwd,
            env=twistd_env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def test_bad_input_is_one_line_and_non_zero(self) -> None:
        for args, env, fragment in [
            ([""], None, "the portal token (TOKEN, --token or FIREZONE_TOKEN) is empty"),
            (["   "], None, "the portal token (TOKEN, --token or FIREZONE_TOKEN) is empty"),
            ([], {"FIREZONE_TOKEN": " "}, "the portal token (TOKEN, --token or FIREZONE_TOKEN) is empty"),
            ([], {"LOG_LEVEL": "nonsense"}, "'nonsense' is not a log level"),
            ([], {"RUST_LOG": "relay=loud"}, "'loud' is not a log level"),
            (["--log-level", "nonsense"], None, "'nonsense' is not a log level"),
            (["--token", "x-" + TOKEN, TOKEN], None, "TOKEN is given twice"),
            ([TOKEN, "name", "extra"], None, "Wrong number of arguments"),
            (["--listen-port", "70000"], None, "--listen-port must be between 1 and 65535"),
        ]:
            result = self.run_bad(args, env)
            self.assertEqual(result.returncode, 1, (args, env, result.stdout, result.stderr))
            lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
            self.assertEqual(len(lines), 1, (args, env, lines))
            self.assertIn(fragment, lines[0])
            self.assertTrue(lines[0].startswith("firezone-relay: error: "), lines[0])
            self.assertNotIn("Traceback", result.stdout + result.stderr)
            self.assertNotIn(TOKEN, lines[0])


class PositionalPortalProcessTests(unittest.TestCase):
    """``twistd firezone-relay --api-url URL TOKEN NAME`` against the stand-in portal."""

    timeout = 60

    @defer.inlineCallbacks
    def test_token_and_name_arguments_reach_the_portal(self) -> Any:
        from tests.adapters.test_drain import RelayProcess

        stub = StubPortal()
        stub.start()
        self.addCleanup(stub.stop)
        relay = RelayProcess(self, ["--api-url", stub.url(), STUB_TOKEN, "relay-by-argument"])
        request = yield stub.wait("connect", 1, timeout=20)
        self.assertEqual(request.headers.get("x-authorization"), "Bearer " + STUB_TOKEN)
        self.assertEqual(request.params["name"], ["relay-by-argument"])
        join = yield stub.wait("join", 1)
        self.assertRegex(join["payload"]["stamp_secret"], r"^[0-9a-f]{64}$")
        self.assertTrue(relay.running())
        relay.signal(signal.SIGTERM)  # drain: closes the websocket, no allocation → exit 0
        code = yield relay.wait_exit(20)
        self.assertEqual(code, 0, relay.output())
        yield stub.wait("close", 1)
        self.assertNotIn(STUB_TOKEN, relay.output())
