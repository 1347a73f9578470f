"""``twistd firezone-relay``: options, the credentials command, and the real process."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from firezone_relay import credentials, logs, tap
from firezone_relay.core import stun
from firezone_relay.core.auth import generate_password
from tests.helpers import TurnClient, free_udp_port, listen, port_range, tid, unavailable

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-3b1f0c2e9d-do-not-print"


def parse(args: Sequence[str] = (), environ: Optional[Dict[str, str]] = None) -> tap.Options:
    options = tap.Options(environ=environ or {})
    options.parseOptions(list(args))
    return options


class OptionsTests(unittest.SynchronousTestCase):
    def assertUsageError(self, args: Sequence[str], fragment: str, environ: Optional[Dict[str, str]] = None) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            parse(args, environ)
        self.assertIn(fragment, str(caught.exception))

    def test_defaults(self) -> None:
        o = parse()
        self.assertIsNone(o["public-ip4-addr"])
        self.assertIsNone(o["public-ip6-addr"])
        self.assertEqual(o["bind-ip4-addr"], "0.0.0.0")
        self.assertEqual(o["bind-ip6-addr"], "::")
        self.assertEqual((o["listen-port"], o["lowest-port"], o["highest-port"]), (3478, 49152, 65535))
        self.assertEqual(o["api-url"], "wss://api.firezone.dev")
        self.assertIsNone(o["token"])
        self.assertIsNone(o["name"])
        self.assertIsNone(o["rng-seed"])
        self.assertEqual(o["log-format"], "human")
        self.assertEqual(o["health-check-addr"], ("0.0.0.0", 8080))
        self.assertIsNone(o["auth-secret"])
        self.assertEqual(o["user-allocation-limit"], 0)  # standalone: no limit
        self.assertEqual(o["max-allocations"], 0)
        self.assertFalse(o["allow-loopback-peers"])
        self.assertEqual((o["allow-peer"], o["deny-peer"]), ((), ()))
        self.assertIsNone(o["drain-timeout"])
        self.assertEqual(o["socket-buffer"], 4 * 1024 * 1024)

    def test_environment(self) -> None:
        o = parse(
            environ={
                "LISTEN_PORT": "3479",
                "PUBLIC_IP4_ADDR": "203.0.113.7",
                "PUBLIC_IP6_ADDR": "2001:db8::7",
                "FIREZONE_API_URL": "ws://localhost:4000",
                "FIREZONE_NAME": "relay-1",
                "RNG_SEED": "42",
                "LOG_FORMAT": "json",
                "ALLOW_LOOPBACK_PEERS": "true",
                "ALLOW_PEER": "10.0.0.0/8, 192.168.1.0/24",
                "DENY_PEER": "203.0.113.0/24",
                "MAX_ALLOCATIONS": "100",
                "DRAIN_TIMEOUT": "30",
                "SOCKET_BUFFER": "0",
            }
        )
        self.assertEqual(o["listen-port"], 3479)
        self.assertEqual(o["public-ip4-addr"], "203.0.113.7")
        self.assertEqual(o["public-ip6-addr"], "2001:db8::7")
        self.assertEqual(o["api-url"], "ws://localhost:4000")
        self.assertEqual(o["name"], "relay-1")
        self.assertEqual(o["rng-seed"], 42)
        self.assertEqual(o["log-format"], "json")
        self.assertTrue(o["allow-loopback-peers"])
        self.assertEqual(o["allow-peer"], ("10.0.0.0/8", "192.168.1.0/24"))
        self.assertEqual(o["deny-peer"], ("203.0.113.0/24",))
        self.assertEqual(o["max-allocations"], 100)
        self.assertEqual(o["drain-timeout"], 30.0)
        self.assertEqual(o["socket-buffer"], 0)
        self.assertFalse(parse(environ={"ALLOW_LOOPBACK_PEERS": "0"})["allow-loopback-peers"])

    def test_flag_beats_environment(self) -> None:
        environ = {"LISTEN_PORT": "3479", "ALLOW_PEER": "10.0.0.0/8", "FIREZONE_NAME": "env"}
        o = parse(["--listen-port", "3480", "--allow-peer", "192.0.2.0/24", "--name=flag"], environ)
        self.assertEqual(o["listen-port"], 3480)
        self.assertEqual(o["allow-peer"], ("192.0.2.0/24",))  # replaces, not appends
        self.assertEqual(o["name"], "flag")
        # Even when the flag's value equals the default.
        self.assertEqual(parse(["--listen-port", "3478"], environ)["listen-port"], 3478)
        # Repeatable flags accumulate on the command line.
        o = parse(["--deny-peer", "192.0.2.0/24", "--deny-peer", "2001:db8::/32"])
        self.assertEqual(o["deny-peer"], ("192.0.2.0/24", "2001:db8::/32"))

    def test_a_replaced_value_is_not_checked(self) -> None:
        # The per-flag checks run as each value is parsed (the coerce
        # column); a value the flag (or the environment) replaces is not
        # parsed at all, so it neither stops the start nor is blamed on
        # the flag that replaced it.
        environ = {"LISTEN_PORT": "not-a-port", "UDP_IO": "bogus"}
        o = parse(["--listen-port", "3480", "--udp-io=python"], environ)
        self.assertEqual((o["listen-port"], o["udp-io"]), (3480, "python"))
        self.assertUsageError([], "LISTEN_PORT: --listen-port: 'not-a-port' is not an integer", {"LISTEN_PORT": "not-a-port"})

    def test_coerce_errors_keep_their_own_message(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            parse(["--lowest-port", "80"])
        self.assertEqual(str(caught.exception), "--lowest-port must be between 1024 and 65535 (got 80)")

    def test_user_allocation_limit_default_depends_on_mode(self) -> None:
        self.assertEqual(parse(["--token", "abc"])["user-allocation-limit"], 1)
        self.assertEqual(parse(["--token", "abc", "--user-allocation-limit", "3"])["user-allocation-limit"], 3)
        self.assertEqual(parse()["user-allocation-limit"], 0)

    def test_address_errors(self) -> None:
        self.assertUsageError(["--public-ip4-addr", "nope"], "--public-ip4-addr: 'nope' is not an IPv4 address")
        self.assertUsageError(["--public-ip4-addr", "2001:db8::1"], "is an IPv6 address, expected IPv4")
        self.assertUsageError(["--public-ip6-addr", "203.0.113.1"], "is an IPv4 address, expected IPv6")
        self.assertUsageError(["--bind-ip4-addr", "::"], "--bind-ip4-addr")
        self.assertUsageError(["--bind-ip6-addr", "0.0.0.0"], "--bind-ip6-addr")
        self.assertUsageError([], "PUBLIC_IP4_ADDR" if False else "not an IPv4 address", {"PUBLIC_IP4_ADDR": "x"})

    def test_port_errors(self) -> None:
        self.assertUsageError(["--listen-port", "abc"], "--listen-port: 'abc' is not an integer")
        self.assertUsageError(["--listen-port", "0"], "--listen-port must be between 1 and 65535")
        self.assertUsageError(["--listen-port", "70000"], "--listen-port must be between 1 and 65535")
        self.assertUsageError(["--lowest-port", "1000"], "--lowest-port must be between 1024 and 65535")
        self.assertUsageError(["--highest-port", "65536"], "--highest-port must be between 1024 and 65535")
        self.assertUsageError(["--lowest-port", "50000", "--highest-port", "40000"], "must not be above --highest-port")
        self.assertUsageError(["--listen-port", "50000"], "must not be inside the allocation range 49152-65535")
        self.assertUsageError([], "is not an integer", {"LOWEST_PORT": "low"})

    def test_other_errors(self) -> None:
        self.assertUsageError(["--allow-peer", "10.0.0.0/33"], "--allow-peer: '10.0.0.0/33' is not a CIDR")
        self.assertUsageError(["--deny-peer", "nonsense"], "--deny-peer: 'nonsense' is not a CIDR")
        self.assertUsageError(["--log-format", "xml"], "--log-format must be human or json")
        self.assertUsageError(["--udp-io", "fast"], "--udp-io must be auto, batched or python")
        self.patch(tap, "_udpio_missing", lambda: "No module named '_udpio'")
        self.assertUsageError(["--udp-io", "batched"], "needs the C extension firezone_relay.adapters._udpio")
        self.assertUsageError(["--health-check-addr", "8080"], "--health-check-addr: '8080' is not host:port")
        self.assertUsageError(["--health-check-addr", "localhost:80"], "with an IP address as host")
        self.assertUsageError(["--health-check-addr", "0.0.0.0:http"], "is not an integer")
        self.assertEqual(parse(["--health-check-addr", "[::1]:9000"])["health-check-addr"], ("::1", 9000))
        self.assertUsageError(["--max-allocations", "-1"], "--max-allocations must not be negative")
        self.assertUsageError(["--user-allocation-limit", "-2"], "--user-allocation-limit must not be negative")
        self.assertUsageError(["--socket-buffer", "-1"], "--socket-buffer must not be negative")
        self.assertUsageError(["--drain-timeout", "soon"], "--drain-timeout: 'soon' is not a number")
        self.assertUsageError(["--drain-timeout", "-5"], "--drain-timeout must be a non-negative number")
        self.assertUsageError(["--rng-seed", "x"], "--rng-seed: 'x' is not an integer")
        self.assertUsageError([], "ALLOW_LOOPBACK_PEERS: 'maybe' is not a boolean", {"ALLOW_LOOPBACK_PEERS": "maybe"})

    def test_tls_errors(self) -> None:
        """Each bad --tls-cert/--tls-key is refused at start-up with what is wrong."""
        from tests.certs import make_certificate

        directory = Path(self.mktemp())
        cert, key = make_certificate(directory, stem="one")
        other_cert, other_key = make_certificate(directory, stem="two")
        garbage = directory / "garbage.pem"
        garbage.write_text("not a certificate\n")
        self.assertUsageError(["--tls-cert", str(cert)], "--tls-cert and --tls-key go together")
        self.assertUsageError(["--tls-key", str(key)], "--tls-cert and --tls-key go together")
        missing = str(directory / "missing.pem")
        self.assertUsageError(["--tls-cert", missing, "--tls-key", str(key)], "cannot be used: %s: No such file" % missing)
        self.assertUsageError(["--tls-cert", str(cert), "--tls-key", str(other_key)], "KEY_VALUES_MISMATCH")
        self.assertUsageError(["--tls-cert", str(garbage), "--tls-key", str(key)], "not a PEM certificate chain")
        self.assertUsageError(["--tls-cert", str(cert), "--tls-key", str(garbage)], "not a PEM certificate chain")
        self.assertUsageError(
            ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-port", "3478"], "--tls-port (3478) must differ"
        )
        options = parse(["--tls-cert", str(other_cert), "--tls-key", str(other_key)])
        self.assertEqual(options["tls-cert"], str(other_cert))

    def test_auth_secret(self) -> None:
        secret = "s3cret" * 6  # 36 characters
        self.assertEqual(parse(["--auth-secret", secret])["auth-secret"], secret)
        self.assertUsageError(["--auth-secret", ""], "--auth-secret must not be empty")
        self.assertUsageError(["--auth-secret", "a:b" + "x" * 32], "without spaces or ':'")
        self.assertUsageError(["--auth-secret", "a b" + "x" * 32], "without spaces or ':'")
        self.assertUsageError(["--auth-secret", "x" * 257], "at most 256 characters")
        self.assertUsageError(["--auth-secret", secret, "--token", "t"], "--auth-secret is for standalone mode only")

    def test_short_auth_secret_is_refused(self) -> None:
        """SPEC §3 (issue 14 item 11): a given secret shorter than 32 characters is refused."""
        self.assertUsageError(["--auth-secret", "s3cret"], "--auth-secret must be at least 32 characters (got 6)")
        self.assertUsageError(["--auth-secret", "x" * 31], "at least 32 characters (got 31)")
        self.assertEqual(parse(["--auth-secret", "x" * 32])["auth-secret"], "x" * 32)
        self.assertUsageError([], "at least 32 characters (got 6)", environ={tap.env_name("auth-secret"): "s3cret"})

    def test_portal_mode_options(self) -> None:
        o = parse(environ={"FIREZONE_TOKEN": TOKEN, "FIREZONE_PORTAL_CA_FILE": "/etc/ca.pem"})
        self.assertEqual((o["token"], o["portal-ca-file"]), (TOKEN, "/etc/ca.pem"))
        self.assertIsNone(parse(environ={"FIREZONE_PORTAL_CA_FILE": "/etc/ca.pem"})["portal-ca-file"])
        with self.assertRaises(usage.UsageError) as caught:
            parse(["--api-url", "ftp://portal"], environ={"FIREZONE_TOKEN": TOKEN})
        self.assertIn("--api-url must be a ws://, wss://, http:// or https:// URL", str(caught.exception))
        self.assertNotIn(TOKEN, str(caught.exception))

    def test_token_file(self) -> None:
        path = Path(self.mktemp())
        path.write_text("  %s\n" % TOKEN)
        self.assertEqual(parse(["--token", str(path.resolve())])["token"], TOKEN)
        self.assertEqual(parse(environ={"FIREZONE_TOKEN": str(path.resolve())})["token"], TOKEN)
        self.assertEqual(parse(["--token", TOKEN])["token"], TOKEN)  # not a file: the token itself
        self.assertUsageError(["--token", "/nonexistent/token"], "--token names a file that cannot be read")
        self.assertUsageError(["--token", "./nonexistent-token"], "--token names a file that cannot be read")
        empty = Path(self.mktemp())
        empty.write_text("\n")
        self.assertUsageError(["--token", str(empty.resolve())], "--token names an empty file")

    def test_help_never_shows_the_token(self) -> None:
        options = tap.Options(environ={"FIREZONE_TOKEN": TOKEN, "LISTEN_PORT": "3999"})
        text = str(options)
        self.assertIn("FIREZONE_TOKEN", text)
        self.assertNotIn(TOKEN, text)
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit):
            options.parseOptions(["--help"])
        self.assertNotIn(TOKEN, out.getvalue())
        self.assertIn("--listen-port", out.getvalue())

    def test_json_log_format_sets_twistds_logger(self) -> None:
        from twisted.scripts.twistd import ServerOptions

        config = ServerOptions()
        config.parseOptions(["-n", "firezone-relay", "--log-format", "json", "--listen-port", "3479"])
        self.assertIs(config["logger"], logs.json_observer)
        # Without json, twistd's own observer (here: text on stdout) is still
        # what writes, behind the --log-level filter.
        config = ServerOptions()
        config.parseOptions(["-n", "firezone-relay", "--listen-port", "3479"])
        self.assertIs(config["logger"], logs.twistd_observer)
        out = io.StringIO()
        with redirect_stdout(out):
            observer = config["logger"]()
        observer({"log_level": LogLevel.info, "log_namespace": "x", "log_format": "shown {n}", "n": 1, "log_time": 0.0})
        observer({"log_level": LogLevel.debug, "log_namespace": "x", "log_format": "hidden", "log_time": 0.0})
        self.assertIn("shown 1", out.getvalue())
        self.assertNotIn("hidden", out.getvalue())


class SecretAndAddressTests(unittest.SynchronousTestCase):
    def test_generated_secret(self) -> None:
        a, generated = tap.make_secret(None, 7)
        self.assertTrue(generated)
        self.assertEqual(len(a), 64)
        self.assertEqual(a, a.lower())
        int(a, 16)
        self.assertEqual(tap.make_secret(None, 7)[0], a)  # deterministic with --rng-seed
        self.assertNotEqual(tap.make_secret(None, 8)[0], a)
        self.assertNotEqual(tap.make_secret(None, None)[0], tap.make_secret(None, None)[0])
        self.assertEqual(tap.make_secret("given", None), ("given", False))

    def test_detect_public_ip4(self) -> None:
        ip = tap.detect_public_ip4()
        if ip is not None:
            socket.inet_aton(ip)

    def test_nofile_limit(self) -> None:
        result = tap.raise_nofile_limit()
        if result is not None:
            import resource

            self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], result[1])


class JsonLogTests(unittest.SynchronousTestCase):
    def test_format(self) -> None:
        from twisted.logger import Logger

        out = io.StringIO()
        observer = logs.json_observer(out)
        logger = Logger(namespace="test.ns", observer=observer)
        logger.info("hello {who}", who="world", port=3478, obj=object())
        try:
            1 / 0
        except ZeroDivisionError:
            logger.failure("it broke")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(first["msg"], "hello world")
        self.assertEqual((first["level"], first["namespace"]), ("info", "test.ns"))
        self.assertEqual((first["who"], first["port"]), ("world", 3478))
        self.assertNotIn("obj", first)
        self.assertTrue(first["ts"].endswith("Z"))
        self.assertEqual(second["level"], "critical")
        self.assertIn("ZeroDivisionError", second["traceback"])


class CredentialsCommandTests(unittest.SynchronousTestCase):
    secret = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"

    def run_main(self, argv: List[str], now: Optional[float] = None) -> str:
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(credentials.main(argv, now=now), 0)
        return out.getvalue()

    def test_spec_vector(self) -> None:
        text = self.run_main(["--secret", self.secret, "--expiry", "1892160000", "--salt", "n23JJ2wKKtt30oXi"])
        self.assertEqual(
            text,
            "username=1892160000:n23JJ2wKKtt30oXi\npassword=00hqldgk5xLeKKOB+xls9mHMVtgqzie9DulfgQwMv68\n",
        )

    def test_ttl_random_salt_and_json(self) -> None:
        data = json.loads(self.run_main(["--secret", "abc", "--ttl", "60", "--json"], now=1000.0))
        expiry, salt = data["username"].split(":")
        self.assertEqual((int(expiry), data["expiry"]), (1060, 1060))
        self.assertEqual(len(salt), 16)
        self.assertEqual(data["password"], generate_password("abc", 1060, salt))
        lines = self.run_main(["--secret", "abc"], now=1000.0).splitlines()
        self.assertTrue(lines[0].startswith("username=4600:"))  # default ttl 3600
        self.assertTrue(lines[1].startswith("password="))

    def test_errors_exit_2(self) -> None:
        for argv in (
            [],
            ["--secret", "x", "--ttl", "0"],
            ["--secret", "x", "--ttl", "5", "--expiry", "9"],
            ["--secret", "x", "--salt", "a:b"],
            ["--secret", "x", "--ttl", "soon"],
        ):
            err = io.StringIO()
            with self.assertRaises(SystemExit) as caught:
                from contextlib import redirect_stderr

                with redirect_stderr(err):
                    credentials.main(argv)
            self.assertEqual(caught.exception.code, 2, argv)
            self.assertIn("error", err.getvalue())

    def test_module_is_runnable(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "firezone_relay.credentials", "--secret", "s", "--expiry", "10", "--salt", "x"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "username=10:x\npassword=%s\n" % generate_password("s", 10, "x"))


class MakeServiceTests(unittest.TestCase):
    """makeService in-process: the composition root wires a working relay."""

    timeout = 15

    @defer.inlineCallbacks
    def test_standalone_service_answers_and_logs_the_secret_once(self) -> Any:
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        listen_port = free_udp_port((4,))
        low, high = port_range(32, avoid=[listen_port])
        options = parse(
            [
                "--listen-port=%d" % listen_port,
                "--lowest-port=%d" % low,
                "--highest-port=%d" % high,
                "--public-ip4-addr=127.0.0.1",
                "--bind-ip4-addr=127.0.0.1",
                "--rng-seed=3",
                "--socket-buffer=0",
                "--health-check-addr=127.0.0.1:0",
            ]
        )
        service = tap.makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        client = TurnClient(("127.0.0.1", listen_port))
        port = listen(client)
        self.addCleanup(port.stopListening)
        response = yield client.request(stun.BINDING, signed=False)
        self.assertEqual(response.msg_class, stun.SUCCESS)
        secret = tap.make_secret(None, 3)[0]
        mentions = [e for e in events if secret in str(e.get("auth_secret", ""))]
        self.assertEqual(len(mentions), 1)
        from twisted.logger import formatEvent

        self.assertIn("firezone-relay-credentials --secret %s" % secret, formatEvent(mentions[0]))
        # With the secret from the log, TURN works.
        _, response = yield client.allocate(secret, int(time.time()) + 60)
        self.assertEqual(response.msg_class, stun.SUCCESS, response)


# --- the real process --------------------------------------------------------

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistd_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREZONE_", "LISTEN_", "PUBLIC_", "BIND_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def binding_roundtrip(port: int, deadline: float) -> Optional[stun.Message]:
    """Send Binding requests to 127.0.0.1:port until one is answered or the deadline passes."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.2)
        while time.time() < deadline:
            t = tid()
            s.sendto(stun.encode(stun.BINDING, stun.REQUEST, t, []), ("127.0.0.1", port))
            try:
                data, _ = s.recvfrom(2048)
            except (socket.timeout, ConnectionRefusedError):
                continue
            message = stun.decode(data)
            if message.transaction_id == t:
                return message
    return None


class ProcessTests(unittest.TestCase):
    timeout = 60

    def run_twistd(self, args: Sequence[str], env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
        cwd = self.mktemp()
        os.makedirs(cwd)
        return subprocess.run(
            TWISTD + ["-n", "--pidfile=", "firezone-relay"] + list(args),
            cwd=cwd,
            env=env or twistd_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def test_bad_flags_exit_nonzero_with_the_message(self) -> None:
        result = self.run_twistd(["--listen-port", "70000"])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--listen-port must be between 1 and 65535", result.stderr + result.stdout)
        result = self.run_twistd(["--public-ip4-addr", "not-an-ip"])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("is not an IPv4 address", result.stderr + result.stdout)

    def test_short_auth_secret_exits_nonzero_with_one_line(self) -> None:
        result = self.run_twistd(["--auth-secret", "s3cret"])
        self.assertNotEqual(result.returncode, 0)
        output = result.stderr + result.stdout
        self.assertIn("--auth-secret must be at least 32 characters (got 6)", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("s3cret", output)  # the rejected secret is not echoed
        result = self.run_twistd([], env=twistd_env(AUTH_SECRET="s3cret"))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--auth-secret must be at least 32 characters", result.stderr + result.stdout)

    def test_token_not_printed(self) -> None:
        result = self.run_twistd(["--api-url", "ftp://portal"], env=twistd_env(FIREZONE_TOKEN=TOKEN))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--api-url must be", result.stderr + result.stdout)
        self.assertNotIn(TOKEN, result.stderr + result.stdout)
        result = self.run_twistd(["--help"], env=twistd_env(FIREZONE_TOKEN=TOKEN))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--listen-port", result.stdout)
        self.assertNotIn(TOKEN, result.stdout + result.stderr)

    def start(self, extra: Sequence[str], attempt: int = 1, twistd_args: Sequence[str] = ()) -> Any:
        listen_port = free_udp_port((4,))
        low, high = port_range(32, avoid=[listen_port])
        cwd = self.mktemp()
        os.makedirs(cwd)
        proc = subprocess.Popen(
            TWISTD
            + list(twistd_args)
            + [
                "-n",
                "--pidfile=",
                "firezone-relay",
                "--listen-port=%d" % listen_port,
                "--lowest-port=%d" % low,
                "--highest-port=%d" % high,
                "--public-ip4-addr=127.0.0.1",
                "--bind-ip4-addr=127.0.0.1",
                "--health-check-addr=127.0.0.1:0",
            ]
            + list(extra),
            cwd=cwd,
            env=twistd_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)

        self.addCleanup(kill)
        if binding_roundtrip(listen_port, time.time() + 20) is None and proc.poll() is not None and attempt < 3:
            # It exited before answering: most likely another parallel test
            # took the port between our check and its bind.  Try other ports.
            return self.start(extra, attempt + 1, twistd_args)
        return proc, listen_port

    def stop(self, proc: Any) -> str:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        self.assertIsNotNone(proc.returncode)
        self.assertIn(proc.returncode, (0, -signal.SIGTERM, 128 + signal.SIGTERM), err)
        return str(out) + str(err)

    def test_standalone_process_answers_binding_then_stops_on_sigterm(self) -> None:
        proc, port = self.start([])
        response = binding_roundtrip(port, time.time() + 20)
        self.assertIsNotNone(response, "no Binding response from the relay process")
        assert response is not None
        self.assertEqual(response.msg_class, stun.SUCCESS)
        output = self.stop(proc)
        self.assertEqual(output.count("generated auth secret"), 1, output)
        self.assertIn("firezone-relay-credentials --secret", output)
        # Which UDP I/O it runs is said once (batched in CI, where the extension is built).
        if tap._udpio_missing():
            self.assertEqual(output.count("UDP I/O: pure Python, slower: the C extension is not built"), 1, output)
        else:
            self.assertEqual(output.count("UDP I/O: batched (recvmmsg/sendmmsg"), 1, output)
        # twistd's default reactor on Linux is epoll: the direct dispatch is on.
        self.assertEqual(output.count("event dispatch: the relay's sockets without Twisted's per-event log context"), 1, output)

    def test_unauthenticated_replies_on_the_wire_are_small(self) -> None:
        """Issue 14 item 4 through a real process: no SOFTWARE, at most 4x the request."""
        proc, port = self.start([])
        self.assertIsNotNone(binding_roundtrip(port, time.time() + 20))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(5)
            for method, expected in ((stun.BINDING, 32), (stun.ALLOCATE, 72), (stun.REFRESH, 72)):
                request = stun.encode(method, stun.REQUEST, tid(), [])
                self.assertEqual(len(request), 20)
                s.sendto(request, ("127.0.0.1", port))
                data, _ = s.recvfrom(2048)
                reply = stun.decode(data)
                self.assertEqual(reply.transaction_id, request[8:20])
                self.assertIsNone(reply.get(stun.SOFTWARE), reply)
                self.assertEqual(len(data), expected, reply)
        self.stop(proc)

    def test_another_reactor_keeps_twisteds_dispatch(self) -> None:
        proc, port = self.start([], twistd_args=["--reactor=poll"])
        response = binding_roundtrip(port, time.time() + 20)
        self.assertIsNotNone(response, "no Binding response from the relay on the poll reactor")
        output = self.stop(proc)
        self.assertIn("event dispatch: Twisted's (PollReactor)", output)

    def test_udp_io_python_and_batched(self) -> None:
        proc, port = self.start(["--udp-io", "python"])
        self.assertIsNotNone(binding_roundtrip(port, time.time() + 20))
        self.assertIn("UDP I/O: pure Python (--udp-io python)", self.stop(proc))
        if tap._udpio_missing():
            unavailable(self, "the _udpio extension is not built: --udp-io batched must refuse to start")
        proc, port = self.start(["--udp-io", "batched"])
        self.assertIsNotNone(binding_roundtrip(port, time.time() + 20))
        self.assertIn("UDP I/O: batched", self.stop(proc))

    def test_json_log_format(self) -> None:
        proc, port = self.start(["--log-format", "json"])
        self.assertIsNotNone(binding_roundtrip(port, time.time() + 20))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        lines = [line for line in out.splitlines() if line.strip()]
        self.assertTrue(lines, err)
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                self.fail("stdout line is not JSON: %r" % line)
        self.assertTrue(all({"ts", "level", "namespace", "msg"} <= set(r) for r in records))
        secret_lines = [r for r in records if "generated auth secret" in r["msg"]]
        self.assertEqual(len(secret_lines), 1)
        self.assertEqual(len(secret_lines[0]["auth_secret"]), 64)


class ReflectionGuardOptionTests(unittest.TestCase):
    def test_unauthenticated_rate_flags(self) -> None:
        options = parse(["--public-ip4-addr", "192.0.2.1", "--unauthenticated-rate", "5", "--unauthenticated-burst", "7"])
        config = tap.relay_config(options, "ab" * 32)
        self.assertEqual((config.unauthenticated_rate, config.unauthenticated_burst), (5.0, 7))
        self.assertEqual(parse([], {"UNAUTHENTICATED_RATE": "0"})["unauthenticated-rate"], 0.0)
        defaults = tap.relay_config(parse(["--public-ip4-addr", "192.0.2.1"]), "ab" * 32)
        self.assertEqual((defaults.unauthenticated_rate, defaults.unauthenticated_burst), (100.0, 200))
        for bad in (["--unauthenticated-rate", "-1"], ["--unauthenticated-rate", "fast"], ["--unauthenticated-rate", "inf"], ["--unauthenticated-burst", "0"]):
            with self.assertRaises(usage.UsageError):
                parse(bad)
