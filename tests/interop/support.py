"""Real processes for the interop tests: the relay (``twistd firezone-relay``),
coturn's echo peer, and the plumbing to run foreign clients against them.

Everything listens on loopback only, on ports chosen at random; every process
is started by the test that uses it and killed (by its own PID) in that
test's cleanup.  Every wait is bounded.

Missing tools: outside CI the test is skipped with the reason; with ``CI`` set
in the environment nothing may skip, so the same condition fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.trial.unittest import TestCase

from firezone_relay import tap
from firezone_relay.core.auth import make_credentials
from tests.helpers import free_udp_port, ipv6_available, port_range, unavailable

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

#: A fixed secret (the SPEC §3 test vector's): credentials are minted in the test.
SECRET = "4c98bf59c99b3e467ecd7cf9d6b3e5279645fca59be67bc5bb4af3cf653761ab"

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
STARTUP_TIMEOUT = 15.0
MAGIC_COOKIE = 0x2112A442


def require_tool(test: TestCase, name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(test, "%s not found on PATH (Debian package: coturn)" % name)
    assert path is not None
    return path


def require_module(test: TestCase, name: str) -> None:
    if importlib.util.find_spec(name) is None:
        unavailable(test, "Python module %r is not installed for %s (pip install %s)" % (name, sys.executable, name))


def require_ipv6(test: TestCase) -> None:
    if not ipv6_available():
        unavailable(test, "cannot bind a UDP socket on ::1 (no IPv6 loopback)")


def credentials(ttl: int = 3600, salt: str = "interop") -> tuple[str, str]:
    """A username (``<expiry>:<salt>``) and password for SECRET."""
    return make_credentials(SECRET, int(time.time()) + ttl, salt)


def relay_env() -> Dict[str, str]:
    """This environment minus anything the relay reads as a flag, plus PYTHONPATH = the repo."""
    names = {tap.env_name(entry[0]) for entry in list(tap.Options.optParameters) + list(tap.Options.optFlags)}
    names |= {tap.env_name("allow-peer"), tap.env_name("deny-peer")}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def binding_request(transaction_id: bytes) -> bytes:
    return struct.pack("!HHI", 0x0001, 0, MAGIC_COOKIE) + transaction_id


def binding_answered(host: str, port: int, timeout: float = 0.2) -> bool:
    """One Binding request; True when a response with our transaction id comes back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    transaction_id = os.urandom(12)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(binding_request(transaction_id), (host, port))
            data, _ = s.recvfrom(2048)
        except (socket.timeout, ConnectionRefusedError):
            return False
    return len(data) >= 20 and data[0:2] == b"\x01\x01" and data[8:20] == transaction_id


def two_free_ports(families: Sequence[int]) -> int:
    """``p`` such that ``p`` and ``p + 1`` are free for UDP on the loopbacks given
    (coturn's echo peer listens on both, the second for RTCP)."""
    for _ in range(200):
        port = free_udp_port(families)
        if port >= 65535:
            continue
        sockets: List[socket.socket] = []
        try:
            for family in families:
                s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(s)
                if family == 6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(("::1" if family == 6 else "127.0.0.1", port + 1))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no two consecutive free UDP ports found")


def _stop(proc: "subprocess.Popen[Any]", grace: float = 3.0) -> None:
    """Terminate then kill one process we started (by its PID, via Popen)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.kill()
    proc.wait(timeout=10)


class Relay:
    """``twistd -n firezone-relay`` on loopback with JSON logs in a file."""

    def __init__(
        self,
        test: TestCase,
        ipv6: bool = False,
        range_size: int = 40,
        extra: Sequence[str] = (),
        avoid: Sequence[int] = (),
        port_base: int = 20000,
    ) -> None:
        self.test = test
        self.ipv6 = ipv6
        families = (4, 6) if ipv6 else (4,)
        self.listen_port = free_udp_port(families)
        self.lowest_port, self.highest_port = port_range(range_size, avoid=[self.listen_port, *avoid], base=port_base)
        self.directory = Path(test.mktemp())
        self.directory.mkdir(parents=True)
        self.log_path = self.directory / "relay.log"
        self.stderr_path = self.directory / "relay.stderr"
        args = [
            "-n",
            "--pidfile=",
            "firezone-relay",
            "--listen-port=%d" % self.listen_port,
            "--lowest-port=%d" % self.lowest_port,
            "--highest-port=%d" % self.highest_port,
            "--public-ip4-addr=127.0.0.1",
            "--bind-ip4-addr=127.0.0.1",
            "--allow-loopback-peers",
            "--auth-secret=%s" % SECRET,
            "--health-check-addr=127.0.0.1:0",
            "--log-format=json",
        ]
        if ipv6:
            args += ["--public-ip6-addr=::1", "--bind-ip6-addr=::1"]
        self.argv = TWISTD + args + list(extra)
        with open(self.log_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, cwd=str(self.directory), env=relay_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )
        test.addCleanup(_stop, self.proc)
        self._wait_ready()

    # --- start-up ----------------------------------------------------------

    def _wait_ready(self) -> None:
        hosts = ["127.0.0.1"] + (["::1"] if self.ipv6 else [])
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for host in hosts:
            while not binding_answered(host, self.listen_port):
                if self.proc.poll() is not None:
                    self.test.fail("relay exited with %s before answering a Binding:\n%s" % (self.proc.returncode, self.output()))
                if time.monotonic() > deadline:
                    self.test.fail("relay did not answer a Binding on [%s]:%d within %.0f s:\n%s"
                                   % (host, self.listen_port, STARTUP_TIMEOUT, self.output()))

    # --- logs ----------------------------------------------------------------

    def output(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return text[-6000:] + ("\n--- stderr ---\n" + err[-3000:] if err.strip() else "")

    def records(self) -> List[Dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a half-written last line; the next read sees it whole
            if isinstance(record, dict):
                records.append(record)
        return records

    def created(self) -> List[Dict[str, Any]]:
        return [r for r in self.records() if str(r.get("msg", "")).startswith("allocation created")]

    def deleted(self) -> List[Dict[str, Any]]:
        return [r for r in self.records() if str(r.get("msg", "")).startswith("allocation deleted")]

    def wait_for(self, what: str, predicate: Callable[["Relay"], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                self.test.fail("relay log: %s not seen within %.0f s:\n%s" % (what, timeout, self.output()))
            time.sleep(0.05)

    def assert_healthy(self) -> None:
        """Still running, and nothing logged at error level or with a traceback."""
        if self.proc.poll() is not None:
            self.test.fail("relay exited with %s:\n%s" % (self.proc.returncode, self.output()))
        bad = [r for r in self.records() if r.get("level") in ("error", "critical") or "traceback" in r]
        self.test.assertEqual(bad, [], "the relay logged errors")


class EchoPeer:
    """coturn's ``turnutils_peer``: echoes UDP on ``port`` and ``port + 1``."""

    def __init__(self, test: TestCase, ipv6: bool = False) -> None:
        binary = require_tool(test, "turnutils_peer")
        families = (4, 6) if ipv6 else (4,)
        self.port = two_free_ports(families)
        argv = [binary, "-L", "127.0.0.1"] + (["-L", "::1"] if ipv6 else []) + ["-p", str(self.port)]
        directory = Path(test.mktemp())
        directory.mkdir(parents=True)
        with open(directory / "peer.log", "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=str(directory), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        test.addCleanup(_stop, self.proc, 1.0)
        hosts = ["127.0.0.1"] + (["::1"] if ipv6 else [])
        deadline = time.monotonic() + 5.0
        for host in hosts:
            for port in (self.port, self.port + 1):
                while not self._echoes(host, port):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        test.fail("turnutils_peer is not echoing on [%s]:%d" % (host, port))

    @staticmethod
    def _echoes(host: str, port: int) -> bool:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        probe = b"probe-" + os.urandom(8).hex().encode()
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(probe, (host, port))
                data, _ = s.recvfrom(2048)
            except (socket.timeout, ConnectionRefusedError):
                return False
        return data == probe


def run_tool(argv: Sequence[str], timeout: float, cwd: Optional[str] = None) -> "subprocess.CompletedProcess[str]":
    """Run a client to completion (it is killed if it outlives ``timeout``)."""
    proc = subprocess.Popen(list(argv), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        raise AssertionError("%s did not finish within %.0f s; output:\n%s" % (" ".join(argv), timeout, out[-4000:]))
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, "")
