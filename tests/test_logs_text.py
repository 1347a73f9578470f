"""twistd's text log lines through ``logs.format_classic`` (issue 19: the
``allocation created`` line was a quarter of an Allocate's CPU).

The lines must be exactly what Twisted's ``formatEventAsClassicLogText``
writes, twistd's ``--logfile`` (and its SIGUSR1 rotation) and stdout must
keep working, and the level filter's cached answers must follow a change of
level at run time.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List

from twisted.logger import Logger, LogLevel, LogPublisher, formatEventAsClassicLogText
from twisted.trial import unittest

from firezone_relay import logs
from tests.helpers import free_udp_port, kill_if_running, port_range
from tests.test_tap import TWISTD, binding_roundtrip, twistd_env

#: twistd's text line: RFC 3339 time stamp (local offset), [namespace#level], message.
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] .+$")

ALLOCATION_CREATED = (
    "allocation created: client {client} ({transport}) user {username} port {port} relayed {relayed} lifetime {lifetime}s"
)


def sample_events() -> List[Dict[str, Any]]:
    """Events of every kind the formatter meets, each as ``Logger`` makes it."""
    events: List[Dict[str, Any]] = []
    log = Logger(namespace="firezone_relay.adapters.shell", observer=lambda e: events.append(dict(e)))
    log.info(ALLOCATION_CREATED, client="127.0.0.1:4000", transport="udp", username="1:salt", port=50000, relayed=["127.0.0.1:50000"], lifetime=600)  # fmt: skip
    log.info("channel {channel:#06x} {x!r} {y!s} {z!a} {{literal}} {w:>6}", channel=0x4001, x="é", y=b"b", z="é", w=3)
    log.info("two\nlines {a}", a="x\ny")
    log.info("a field that is missing: {nope}")
    log.info("called {f()} dotted {n.real} indexed {d[k]}", f=lambda: 3, n=4, d={"k": 5})
    log.info("")
    log.warn("nested spec {a:{width}}", a=3, width=5)
    log.error("{bad!x} conversion", bad=1)
    log.info("an unrepresentable value {v!r}", v=Unrepresentable())
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("with a traceback {a}", a=1)
    events.append({"log_format": "no time, no level, no namespace"})
    events.append({"log_format": "{0} positional {}", "log_time": 12.5})
    events.append({"log_format": "a system", "log_system": "mysystem", "log_time": time.time()})
    events.append({"log_format": "a system that is not text", "log_system": 7, "log_time": time.time()})
    events.append({"log_format": b"bytes {a}", "a": 1, "log_time": 12.5})
    events.append({"log_format": None, "log_time": 12.5})
    events.append({})
    # Just below a second: datetime rounds to microseconds, into the next second.
    events.append({"log_format": "rounded up", "log_time": 12.9999999, "log_level": LogLevel.info})
    events.append({"log_format": "same second", "log_time": 12.25, "log_level": LogLevel.info})
    events.append({"log_format": "same second", "log_time": 12.75, "log_level": LogLevel.info})
    events.append({"log_format": "next second", "log_time": 13.0, "log_level": LogLevel.info})
    events.append({"log_format": "far away", "log_time": 2e9 + 0.5, "log_level": LogLevel.info})
    return events


class Unrepresentable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class ClassicFormatTests(unittest.SynchronousTestCase):
    def test_same_text_as_twisted(self) -> None:
        for event in sample_events():
            self.assertEqual(logs.format_classic(event), formatEventAsClassicLogText(event), event)
        # Again, now that formats and the second's time stamp are cached.
        for event in reversed(sample_events()):
            self.assertEqual(logs.format_classic(event), formatEventAsClassicLogText(event), event)

    def test_time_stamp_follows_the_clock(self) -> None:
        base = 1.8e9
        lines = [logs.format_classic({"log_format": "x", "log_time": base + dt}) for dt in (0.1, 0.9, 1.0, 61.5, 0.2)]
        expected = [formatEventAsClassicLogText({"log_format": "x", "log_time": base + dt}) for dt in (0.1, 0.9, 1.0, 61.5, 0.2)]
        self.assertEqual(lines, expected)
        self.assertEqual(len({line.split(" ")[0] for line in lines}), 3, lines)  # type: ignore[union-attr]

    def test_many_formats_stay_bounded(self) -> None:
        for i in range(3000):
            event = {"log_format": "message %d {a}" % i, "a": i, "log_time": 5.0}
            self.assertEqual(logs.format_classic(event), formatEventAsClassicLogText(event))
        self.assertLessEqual(len(logs._parsed), logs._PARSED_MAX)


class TwistdObserverTests(unittest.SynchronousTestCase):
    """``twistd_observer`` (twistd's ``--logger`` under the relay) writes
    through ``format_classic`` to the file twistd chose."""

    def test_text_observer_uses_format_classic(self) -> None:
        calls: List[Dict[str, Any]] = []
        real = logs.format_classic

        def counting(event: Dict[str, Any]) -> Any:
            calls.append(event)
            return real(event)

        self.patch(logs, "format_classic", counting)
        out = io.StringIO()
        self.patch(sys, "stdout", out)  # twistd -n without --logfile: stdout, looked up when built
        self.patch(logs, "_twistd", {})
        logs.use_under_twistd({"logger": None, "nodaemon": True, "logfile": "", "syslog": False}, logs.parse_log_level("info"), False)  # fmt: skip
        observer = logs.twistd_observer()
        log = Logger(namespace="firezone_relay.adapters.shell", observer=LogPublisher(observer))
        log.info(ALLOCATION_CREATED, client="127.0.0.1:4000", transport="udp", username="1:salt", port=50000, relayed=["127.0.0.1:50000"], lifetime=600)  # fmt: skip
        log.debug("hidden at info")
        self.assertEqual(len(calls), 1)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], LINE)
        self.assertTrue(
            lines[0].endswith(
                " [firezone_relay.adapters.shell#info] allocation created: client 127.0.0.1:4000 (udp) user 1:salt "
                "port 50000 relayed ['127.0.0.1:50000'] lifetime 600s"
            ),
            lines[0],
        )

    def test_other_observers_are_left_alone(self) -> None:
        seen: List[Any] = []
        observer = seen.append
        self.assertIs(logs.faster_text(observer), observer)


class LevelFilterTests(unittest.SynchronousTestCase):
    def test_cached_levels_follow_a_change(self) -> None:
        seen: List[Dict[str, Any]] = []
        observer = logs.level_filter(seen.append, logs.parse_log_level("info"))
        self.addCleanup(logs._predicates.clear)
        relay = Logger(namespace="firezone_relay.adapters.shell", observer=observer)
        other = Logger(namespace="twisted.internet", observer=observer)
        for _ in range(2):  # the second time from the cache
            relay.debug("r-debug")
            relay.info("r-info")
            other.debug("o-debug")
            other.warn("o-warn")
        self.assertEqual([e["log_format"] for e in seen], ["r-info", "o-warn"] * 2)
        del seen[:]
        logs.apply_log_levels(logs.parse_log_level("warn,relay=debug"))
        relay.debug("r-debug")
        other.info("o-info")
        other.error("o-error")
        logs.apply_log_levels(logs.parse_log_level("error"))
        relay.warn("r-warn")
        relay.critical("r-critical")
        # Legacy and odd events: as before, a missing level is info, a missing namespace legacy.
        observer({"log_format": "no level", "log_namespace": "firezone_relay.x"})
        observer({"log_format": "error, no namespace", "log_level": LogLevel.error})
        self.assertEqual([e["log_format"] for e in seen], ["r-debug", "o-error", "r-critical", "error, no namespace"])


class TwistdLogFileTests(unittest.TestCase):
    """A real twistd with ``--logfile``: lines in twistd's format, and
    SIGUSR1 still rotates the file."""

    timeout = 60

    def test_logfile_lines_and_rotation(self) -> None:
        listen_port = free_udp_port((4,))
        low, high = port_range(16, avoid=[listen_port])
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        path = os.path.join(cwd, "relay.log")
        proc = subprocess.Popen(
            TWISTD
            + ["-n", "--pidfile=", "--logfile", path, "firezone-relay", "--listen-port=%d" % listen_port]
            + ["--lowest-port=%d" % low, "--highest-port=%d" % high, "--public-ip4-addr=127.0.0.1"]
            + ["--bind-ip4-addr=127.0.0.1", "--health-check-addr=127.0.0.1:0", "--max-connections=0"],
            cwd=cwd,
            env=twistd_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.assertIsNotNone(binding_roundtrip(listen_port, time.time() + 20))
            proc.send_signal(signal.SIGUSR1)
            deadline = time.time() + 10
            while not os.path.exists(path + ".1") and time.time() < deadline:
                time.sleep(0.05)
            self.assertTrue(os.path.exists(path + ".1"), os.listdir(cwd))
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        finally:
            kill_if_running(proc)
        with open(path + ".1") as f:
            before = f.read()
        with open(path) as f:
            after = f.read()
        self.assertIn("generated auth secret", before)
        self.assertIn("[-] HealthSite starting on", before)  # a legacy (twisted.python.log) line
        self.assertIn("Main loop terminated.", after)
        # The relay's start-up objects were frozen for the garbage collector (adapters/gcfreeze.py).
        self.assertRegex(before, r"\[firezone_relay.adapters.gcfreeze#info\] garbage collector: \d+ start-up objects frozen")
        for line in (before + after).splitlines():
            if not line.startswith("\t"):  # a continuation of a multi-line message
                self.assertRegex(line, LINE)



class RelayLoggerTests(unittest.SynchronousTestCase):
    """``logs.RelayLogger`` (the shell's per-allocation lines) makes the
    events Twisted's ``Logger`` makes."""

    def test_same_events_as_twisted(self) -> None:
        ours: List[Dict[str, Any]] = []
        theirs: List[Dict[str, Any]] = []
        fast = logs.RelayLogger(namespace="firezone_relay.adapters.udp", source=self, observer=ours.append)
        slow = Logger(namespace="firezone_relay.adapters.udp", source=self, observer=theirs.append)
        for logger in (fast, slow):
            logger.info("allocation deleted: port {port} ({reason})", port=5, reason="refresh")
            logger.warn("w")
            logger.emit(LogLevel.error, "e {x}", x=1)
        self.assertEqual(len(ours), len(theirs))
        for a, b in zip(ours, theirs):
            self.assertEqual(set(a), set(b))
            self.assertEqual(list(a), list(b))  # the same order (a JSON line's)
            self.assertIs(a["log_logger"], fast)
            for key in a:
                if key not in ("log_logger", "log_time"):
                    self.assertEqual(a[key], b[key], key)
            self.assertLess(abs(a["log_time"] - b["log_time"]), 5)
            self.assertEqual(logs.format_classic(dict(a, log_time=1.0)), logs.format_classic(dict(b, log_time=1.0)))

    def test_a_bad_level_is_reported_as_twisted_does(self) -> None:
        seen: List[Dict[str, Any]] = []
        logger = logs.RelayLogger(namespace="x", observer=seen.append)
        logger.emit("loud", "hello")  # type: ignore[arg-type]
        self.assertEqual(len(seen), 1)
        self.assertEqual(seen[0]["log_level"], LogLevel.critical)
        self.assertIn("invalid log level", seen[0]["log_format"])

    def test_trace(self) -> None:
        seen: List[Dict[str, Any]] = []
        observer = logs.level_filter(seen.append, logs.parse_log_level("info"))
        self.addCleanup(logs._predicates.clear)
        publisher = LogPublisher(observer)
        logger = logs.RelayLogger(namespace="firezone_relay.x", observer=publisher)
        trace: List[Any] = []
        logger.info("traced", log_trace=trace)
        self.assertEqual(len(seen), 1)
        self.assertEqual([t[0] for t in trace], [logger, publisher, observer])
        logger.debug("dropped", log_trace=[])
        self.assertEqual(len(seen), 1)
