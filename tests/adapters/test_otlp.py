"""OTLP/gRPC metrics push (SPEC §7, ``--otlp-grpc-endpoint``).

The end-to-end tests run a real OTLP/gRPC receiver in this process (grpcio
serving ``opentelemetry.proto.collector.metrics.v1.MetricsService/Export``
on loopback) and a real ``twistd firezone-relay``; a real TURN client makes
an allocation, a permission, a channel and relays datagrams of known sizes
to a real UDP peer, and the test reads what the relay pushed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import textwrap
import threading
import time
import urllib.request
from concurrent import futures
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from firezone_relay.adapters import otlp
from tests.interop import support

INTERVAL_MS = "200"


def _grpc_modules() -> Tuple[Any, Any, Any]:
    try:
        import grpc  # type: ignore[import-untyped]
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
    except ImportError as exc:  # pragma: no cover - the test extra installs them
        raise unittest.SkipTest("grpcio / opentelemetry-proto not installed (pip install '.[test]'): %s" % exc)
    return grpc, metrics_service_pb2, metrics_service_pb2_grpc


class Receiver:
    """An OTLP/gRPC metrics receiver on 127.0.0.1 that keeps every request."""

    def __init__(self, port: int = 0) -> None:
        grpc, pb2, pb2_grpc = _grpc_modules()
        self.requests: List[Any] = []
        self.lock = threading.Lock()
        receiver = self

        class Servicer(pb2_grpc.MetricsServiceServicer):  # type: ignore[misc, name-defined]
            def Export(self, request: Any, context: Any) -> Any:
                with receiver.lock:
                    receiver.requests.append(request)
                return pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb2_grpc.add_MetricsServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:%d" % port)
        if not self.port:
            raise RuntimeError("could not bind the OTLP receiver to 127.0.0.1:%d" % port)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)

    def snapshot(self) -> List[Any]:
        with self.lock:
            return list(self.requests)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(items: Any) -> Dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


def metrics(requests: List[Any]) -> Iterator[Tuple[Dict[str, Any], str, Any]]:
    """(resource attributes, scope name, Metric) for every metric pushed."""
    for request in requests:
        for rm in request.resource_metrics:
            resource = attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    yield resource, sm.scope.name, metric


def named(requests: List[Any], name: str) -> List[Any]:
    return [m for _r, _s, m in metrics(requests) if m.name == name]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Environ:
    """Sets variables in os.environ for the relay started meanwhile (support.Relay copies it)."""

    def __init__(self, **values: str) -> None:
        self.values = values
        self.saved: Dict[str, Optional[str]] = {}

    def __enter__(self) -> None:
        for k, v in self.values.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_relay(test: unittest.TestCase, endpoint: str, **env: str) -> support.Relay:
    values = {"OTEL_METRIC_EXPORT_INTERVAL": INTERVAL_MS, **env}
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", otlp.TEMPORALITY_ENV):
        values.setdefault(name, "")
    with _Environ(**values):
        return support.Relay(test, extra=["--otlp-grpc-endpoint=%s" % endpoint])


def wait_until(test: unittest.TestCase, what: str, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            test.fail("%s not seen within %.0f s" % (what, timeout))
        time.sleep(0.05)


def health_port(relay: support.Relay) -> int:
    for r in relay.records():
        text = str(r.get("msg", ""))
        if text.startswith("HTTP health and metrics on "):
            return int(text.split()[5].rsplit(":", 1)[1])
    raise AssertionError("no health address in the log:\n" + relay.output())


def prometheus_responses(relay: support.Relay) -> Dict[Tuple[str, str, str], float]:
    """relay_responses_total from the relay's own /metrics (the same counters, another path)."""
    body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % health_port(relay), timeout=5).read().decode()
    out: Dict[Tuple[str, str, str], float] = {}
    for line in body.splitlines():
        if line.startswith("relay_responses_total{"):
            labels, value = line[len("relay_responses_total{"):].rsplit("} ", 1)
            parsed = dict(part.split("=", 1) for part in labels.split(","))
            key = (parsed["message_type"].strip('"'), parsed["response_class"].strip('"'), parsed["error_code"].strip('"'))
            out[key] = float(value)
    return out


def response_totals(requests: List[Any]) -> Dict[Tuple[str, str, Any], int]:
    """relay.responses summed over every (delta) push, by attributes."""
    totals: Dict[Tuple[str, str, Any], int] = {}
    for m in named(requests, "relay.responses"):
        for p in m.sum.data_points:
            a = attributes(p.attributes)
            key = (a.get("message_type"), a.get("response_class"), a.get("error_code"))
            totals[key] = totals.get(key, 0) + p.as_int
    return totals


class TurnTraffic:
    """A blocking TURN client and a UDP peer on loopback (benchmarks' stdlib client)."""

    def __init__(self, relay: support.Relay) -> None:
        from benchmarks._turnclient import TurnClient

        username, password = support.credentials()
        self.client = TurnClient(("127.0.0.1", relay.listen_port), username, password)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.settimeout(5)
        self.client.sock.settimeout(5)

    def close(self) -> None:
        self.client.close()
        self.peer.close()

    def round_trip(self, n: int) -> float:
        """One ChannelData to the peer and its echo back; the seconds it took."""
        from benchmarks._turnclient import channel_data

        t0 = time.monotonic()
        self.client.sock.send(channel_data(0x4000, b"x" * n))
        data, source = self.peer.recvfrom(65535)
        self.peer.sendto(data, source)
        back = self.client.sock.recv(65535)
        assert len(back) >= 4 + n, len(back)
        return time.monotonic() - t0

    def relay_sizes(self, to_peer: List[int], to_client: List[int]) -> None:
        from benchmarks._turnclient import channel_data

        relayed = self.client.allocate()
        self.client.create_permission(self.peer.getsockname())
        self.client.channel_bind(0x4000, self.peer.getsockname())
        source = None
        for n in to_peer:
            self.client.sock.send(channel_data(0x4000, b"x" * n))
            data, source = self.peer.recvfrom(65535)
            assert len(data) == n, (len(data), n)
        assert source is not None and source[1] == relayed[1], (source, relayed)
        for n in to_client:
            self.peer.sendto(b"y" * n, source)
            data = self.client.sock.recv(65535)
            assert len(data) >= 4 + n and data[:2] == b"\x40\x00", data[:4]


class EndToEndTests(unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.receiver = Receiver()
        self.addCleanup(self.receiver.stop)

    def test_names_attributes_values_and_resource(self) -> None:
        relay = start_relay(
            self,
            "127.0.0.1:%d" % self.receiver.port,
            OTEL_RESOURCE_ATTRIBUTES="service.instance.id=relay-7,deployment.environment=test",
        )
        traffic = TurnTraffic(relay)
        self.addCleanup(traffic.close)
        # 50 -> (0,100], 150 -> (100,200], 1300 -> (1200,1300]; 250 -> (200,300]
        traffic.relay_sizes([50, 150, 1300], [250])

        def allocated() -> Any:
            points = [p for m in named(self.receiver.snapshot(), "relay.active_allocations") for p in m.sum.data_points]
            return points and points[-1].as_int == 1

        wait_until(self, "relay.active_allocations = 1", allocated)

        def sized() -> Any:
            total = sum(p.count for m in named(self.receiver.snapshot(), "relay.packet.size") for p in m.histogram.data_points)
            return total >= 4

        wait_until(self, "four relayed packets in relay.packet.size", sized)
        prometheus = prometheus_responses(relay)
        expected_totals = {(t, c, int(code) if code else None): int(v) for (t, c, code), v in prometheus.items()}
        # The last counts of the scripted traffic get pushed too.
        wait_until(self, "relay.responses adding up to /metrics' relay_responses_total",
                   lambda: response_totals(self.receiver.snapshot()) == expected_totals)  # fmt: skip
        requests = self.receiver.snapshot()

        # Resource: upstream's two attributes plus OTEL_RESOURCE_ATTRIBUTES.
        resources = {tuple(sorted(r.items())) for r, _s, _m in metrics(requests)}
        self.assertEqual(len(resources), 1, resources)
        resource = dict(next(iter(resources)))
        self.assertEqual(resource["service.name"], "relay")
        self.assertEqual(resource["service.namespace"], "firezone")
        self.assertEqual(resource["service.instance.id"], "relay-7")
        self.assertEqual(resource["deployment.environment"], "test")
        self.assertEqual(resource["telemetry.sdk.language"], "python")
        self.assertEqual({s for _r, s, _m in metrics(requests)}, {"relay"})
        self.assertEqual(
            {m.name for _r, _s, m in metrics(requests)},
            {"relay.active_allocations", "relay.responses", "relay.packet.size"},
        )

        # relay.active_allocations: a cumulative up/down counter.
        active = named(requests, "relay.active_allocations")
        for m in active:
            self.assertEqual(m.unit, "{allocation}")
            self.assertEqual(m.WhichOneof("data"), "sum")
            self.assertFalse(m.sum.is_monotonic)
            self.assertEqual(m.sum.aggregation_temporality, 2)  # CUMULATIVE
            self.assertEqual([attributes(p.attributes) for p in m.sum.data_points], [{}])
        self.assertEqual(active[-1].sum.data_points[0].as_int, 1)

        # relay.responses: a monotonic delta counter (upstream's LowMemory);
        # the deltas add up to what the relay's own Prometheus counters say.
        totals: Dict[Tuple[str, str, Any], int] = {}
        for m in named(requests, "relay.responses"):
            self.assertEqual(m.unit, "{response}")
            self.assertTrue(m.sum.is_monotonic)
            self.assertEqual(m.sum.aggregation_temporality, 1)  # DELTA
            for p in m.sum.data_points:
                a = attributes(p.attributes)
                key = (a.pop("message_type"), a.pop("response_class"), a.pop("error_code", None))
                self.assertEqual(a, {}, "unexpected attributes")
                totals[key] = totals.get(key, 0) + p.as_int
        self.assertEqual(totals[("allocate", "error", 401)], 1)
        self.assertEqual(totals[("allocate", "success", None)], 1)
        self.assertEqual(totals[("createpermission", "success", None)], 1)
        self.assertEqual(totals[("channelbind", "success", None)], 1)
        self.assertGreaterEqual(totals[("binding", "success", None)], 1)  # support.Relay's readiness probe
        self.assertEqual(totals, expected_totals)
        for key in totals:
            self.assertIsInstance(key[2], (int, type(None)))

        # relay.packet.size: upstream's bounds, bytes, by datapath, delta.
        buckets = [0] * 16
        count = total = 0
        for m in named(requests, "relay.packet.size"):
            self.assertEqual(m.unit, "By")
            self.assertEqual(m.histogram.aggregation_temporality, 1)  # DELTA
            for p in m.histogram.data_points:
                self.assertEqual(attributes(p.attributes), {"relay.datapath": "userspace"})
                self.assertEqual(list(p.explicit_bounds), [100.0 * i for i in range(1, 16)])
                buckets = [a + b for a, b in zip(buckets, p.bucket_counts)]
                count += p.count
                total += p.sum
        self.assertEqual(count, 4)
        self.assertEqual(total, 50 + 150 + 1300 + 250)
        expected = [0] * 16
        for index in (0, 1, 12, 2):
            expected[index] += 1
        self.assertEqual(buckets, expected)

        # The allocation goes away: the gauge follows.
        traffic.client.refresh(0)
        wait_until(self, "relay.active_allocations = 0", lambda: named(self.receiver.snapshot(), "relay.active_allocations")[-1].sum.data_points[0].as_int == 0)
        relay.assert_healthy()

    def test_otel_service_name_and_cumulative_preference(self) -> None:
        relay = start_relay(
            self,
            "http://127.0.0.1:%d" % self.receiver.port,
            OTEL_SERVICE_NAME="relay-eu-1",
            **{otlp.TEMPORALITY_ENV: "cumulative"},
        )
        traffic = TurnTraffic(relay)
        self.addCleanup(traffic.close)
        traffic.relay_sizes([700], [])

        def pushed() -> Any:
            for m in named(self.receiver.snapshot(), "relay.packet.size"):
                for p in m.histogram.data_points:
                    if p.count == 1:
                        return m
            return None

        m = wait_until(self, "relay.packet.size with the relayed packet", pushed)
        self.assertEqual(m.histogram.aggregation_temporality, 2)  # CUMULATIVE
        point = m.histogram.data_points[0]
        self.assertEqual(point.sum, 700)
        self.assertEqual(list(point.bucket_counts)[6], 1)
        requests = self.receiver.snapshot()
        resource = next(r for r, _s, _m in metrics(requests))
        self.assertEqual(resource["service.name"], "relay-eu-1")
        self.assertEqual(resource["service.namespace"], "firezone")
        responses = named(requests, "relay.responses")
        self.assertTrue(responses)
        self.assertTrue(all(r.sum.aggregation_temporality == 2 for r in responses))
        relay.assert_healthy()

    def test_dead_collector_never_blocks_and_warns_once(self) -> None:
        port = free_tcp_port()  # nothing listens there (yet)
        self.receiver.stop()
        relay = start_relay(self, "127.0.0.1:%d" % port, OTEL_EXPORTER_OTLP_TIMEOUT="1")
        traffic = TurnTraffic(relay)
        self.addCleanup(traffic.close)

        def warned() -> List[Dict[str, Any]]:
            return [r for r in relay.records() if "OTLP: exporting metrics to http://127.0.0.1:%d failed" % port in str(r.get("msg", ""))]

        wait_until(self, "the export failure warning", warned)
        # Relaying goes on meanwhile, while the exporter keeps failing and
        # retrying in its thread: 3 s of round trips, none slow.
        traffic.relay_sizes([100], [100])
        slowest, count, started = 0.0, 0, time.monotonic()
        while time.monotonic() - started < 3.0:
            slowest = max(slowest, traffic.round_trip(100))
            count += 1
        self.assertGreater(count, 100)
        self.assertLess(slowest, 0.5)
        lines = warned()
        self.assertEqual(len(lines), 1, "the warning is rate-limited: %r" % (lines,))
        self.assertEqual(lines[0]["level"], "warn")
        self.assertNotIn("Traceback", relay.output())
        relay.assert_healthy()
        self.assertEqual((relay.stderr_path.read_text() if relay.stderr_path.exists() else "").strip(), "")

        # The collector comes up: the next export works and says so.
        receiver = Receiver(port)
        self.addCleanup(receiver.stop)
        wait_until(self, "a push to the late collector", lambda: named(receiver.snapshot(), "relay.active_allocations"))
        relay.wait_for("the recovery line", lambda r: any("works again" in str(x.get("msg", "")) for x in r.records()))
        self.assertEqual(named(receiver.snapshot(), "relay.active_allocations")[-1].sum.data_points[0].as_int, 1)


class StartupErrorTests(unittest.TestCase):
    timeout = 60

    def run_twistd(self, args: List[str], env: Optional[Dict[str, str]] = None) -> "subprocess.CompletedProcess[str]":
        cwd = self.mktemp()
        os.makedirs(cwd)
        return subprocess.run(
            support.TWISTD + ["-n", "--pidfile=", "firezone-relay", "--health-check-addr=127.0.0.1:0"] + args,
            cwd=cwd, env={**support.relay_env(), **(env or {})}, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def assertOneClearLine(self, result: "subprocess.CompletedProcess[str]", fragment: str) -> None:
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if fragment in line]
        self.assertEqual(len(lines), 1, output[-2000:])

    def test_endpoint_that_is_not_a_url(self) -> None:
        for value in ("not a url", "ftp://collector:4317", "collector", "http://collector:4317/v1/metrics", "[::1:4317"):
            result = self.run_twistd(["--otlp-grpc-endpoint", value])
            self.assertOneClearLine(result, "--otlp-grpc-endpoint: %r is not a URL" % value)
        result = self.run_twistd([], env={"OTLP_GRPC_ENDPOINT": "::::"})
        self.assertOneClearLine(result, "is not a URL")

    def test_bad_sdk_variables(self) -> None:
        result = self.run_twistd(["--otlp-grpc-endpoint", "127.0.0.1:4317"], env={otlp.TEMPORALITY_ENV: "sometimes"})
        self.assertOneClearLine(result, "%s must be cumulative, delta or lowmemory" % otlp.TEMPORALITY_ENV)
        result = self.run_twistd(["--otlp-grpc-endpoint", "127.0.0.1:4317"], env={"OTEL_METRIC_EXPORT_INTERVAL": "soon"})
        self.assertOneClearLine(result, "OTEL_METRIC_EXPORT_INTERVAL: 'soon' is not a number of milliseconds")

    def test_extra_not_installed(self) -> None:
        # A package that shadows the installed SDK, as if the extra were missing.
        shadow = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(shadow, "opentelemetry"))
        with open(os.path.join(shadow, "opentelemetry", "__init__.py"), "w") as f:
            f.write(textwrap.dedent('raise ImportError("No module named opentelemetry (test shadow)")\n'))
        env = support.relay_env()
        env["PYTHONPATH"] = shadow + os.pathsep + env["PYTHONPATH"]
        result = self.run_twistd(["--otlp-grpc-endpoint", "127.0.0.1:4317"], env=env)
        self.assertOneClearLine(result, "pip install 'firezone-relay[otlp]'")
        # Without the flag, the relay does not need the SDK at all.
        self.assertEqual(otlp.missing_sdk(), "")


class OptionsTests(unittest.SynchronousTestCase):
    """``--otlp-grpc-endpoint`` / ``OTLP_GRPC_ENDPOINT`` in ``tap.Options``."""

    def parse(self, args: List[str], environ: Dict[str, str]) -> Any:
        from firezone_relay import tap

        options = tap.Options(environ=environ)
        options.parseOptions(args)
        return options

    def test_off_by_default_and_when_empty(self) -> None:
        self.assertIsNone(self.parse([], {})["otlp-grpc-endpoint"])
        self.assertIsNone(self.parse([], {"OTLP_GRPC_ENDPOINT": " "})["otlp-grpc-endpoint"])

    def test_env_and_flag_normalised(self) -> None:
        self.assertEqual(self.parse([], {"OTLP_GRPC_ENDPOINT": "collector:4317"})["otlp-grpc-endpoint"],
                         "http://collector:4317")  # fmt: skip
        options = self.parse(["--otlp-grpc-endpoint", "https://c.example:4317"], {"OTLP_GRPC_ENDPOINT": "x:1"})
        self.assertEqual(options["otlp-grpc-endpoint"], "https://c.example:4317")

    def test_bad_values_are_usage_errors(self) -> None:
        from twisted.python import usage

        with self.assertRaises(usage.UsageError) as caught:
            self.parse(["--otlp-grpc-endpoint", "collector"], {})
        self.assertIn("'collector' is not a URL (no port)", str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(["--otlp-grpc-endpoint", "c:1"], {"OTEL_METRIC_EXPORT_INTERVAL": "-5"})
        self.assertIn("OTEL_METRIC_EXPORT_INTERVAL must be a positive number", str(caught.exception))
        # The exporter's own variables, which the SDK would raise on with a traceback (or ignore until an export).
        for environ, fragment in [
            ({"OTEL_EXPORTER_OTLP_TIMEOUT": "abc"}, "OTEL_EXPORTER_OTLP_TIMEOUT: 'abc' is not a number of seconds"),
            ({"OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "0"}, "must be a positive number of seconds"),
            ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_COMPRESSION must be gzip, deflate or none"),
            ({"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent.pem"}, "OTEL_EXPORTER_OTLP_CERTIFICATE: '/nonexistent.pem' cannot be read"),
            ({"OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": " br "}, "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION must be gzip, deflate or none (got ' br ')"),
            ({"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/nonexistent.crt"}, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE: '/nonexistent.crt' cannot be read"),
            ({"OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY": " /nonexistent.key"}, "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY: '/nonexistent.key' cannot be read"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(["--otlp-grpc-endpoint", "https://c:1"], environ)
            self.assertIn(fragment, str(caught.exception))
        self.assertEqual(
            self.parse(["--otlp-grpc-endpoint", "c:1"], {"OTEL_EXPORTER_OTLP_COMPRESSION": "GZIP", "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5"})[
                "otlp-grpc-endpoint"
            ],
            "http://c:1",
        )


class ParseEndpointTests(unittest.SynchronousTestCase):
    def test_upstream_form_and_urls(self) -> None:
        self.assertEqual(otlp.parse_endpoint("127.0.0.1:4317"), "http://127.0.0.1:4317")
        self.assertEqual(otlp.parse_endpoint("otel-collector:4317"), "http://otel-collector:4317")
        self.assertEqual(otlp.parse_endpoint(" localhost:4317 "), "http://localhost:4317")
        self.assertEqual(otlp.parse_endpoint("[::1]:4317"), "http://[::1]:4317")
        self.assertEqual(otlp.parse_endpoint("http://collector.example:4317"), "http://collector.example:4317")
        self.assertEqual(otlp.parse_endpoint("https://collector.example:443/"), "https://collector.example:443")

    def test_not_urls(self) -> None:
        for value in ("", " ", "host", "host:", "host:0", "host:99999", "host:port", "a b:1", "ftp://h:1",
                      "http://user:pw@h:1", "http://h:1/v1/metrics", "http://h:1?x=1", "[::1", "[zz::1]:1",
                      "-bad-.example:1", "h\x00:1"):  # fmt: skip
            with self.assertRaises(ValueError, msg=value) as caught:
                otlp.parse_endpoint(value)
            self.assertIn("is not a URL", str(caught.exception))


class WarningLimiterTests(unittest.SynchronousTestCase):
    def test_once_per_interval_with_the_count_held_back(self) -> None:
        now = [100.0]
        lines: List[str] = []
        limiter = otlp.WarningLimiter(lines.append, interval=60.0, clock=lambda: now[0])
        self.assertTrue(limiter.warn("export", "failed"))
        for _ in range(5):
            now[0] += 10
            self.assertFalse(limiter.warn("export", "failed"))
        self.assertTrue(limiter.warn("other", "other"))
        now[0] += 15
        self.assertTrue(limiter.warn("export", "failed"))
        self.assertEqual(lines, ["failed", "other", "failed (5 more like this in the last 65 s)"])
        limiter.reset("export")
        self.assertTrue(limiter.warn("export", "failed"))


class SnapshotSourceTests(unittest.TestCase):
    """The collecting thread never reads the relay: the reactor does."""

    def test_read_runs_on_the_reactor_thread_once_per_collection(self) -> "defer.Deferred[Any]":
        reactor_thread = threading.get_ident()
        reads: List[int] = []

        def read() -> otlp.Snapshot:
            reads.append(threading.get_ident())
            return otlp.Snapshot(len(reads), len(reads), (), ())

        source = otlp.SnapshotSource(read, reactor.callFromThread, lambda: threading.get_ident() == reactor_thread)

        def collect() -> List[Any]:
            first = source.get()
            second = source.get()  # the same collection: the same snapshot
            consumed = source.consume()
            after = source.get()  # a new collection
            return [first, second, consumed, after]

        d = threads.deferToThread(collect)

        def check(result: List[Any]) -> None:
            first, second, consumed, after = result
            self.assertIs(first, second)
            self.assertIs(first, consumed)
            self.assertIsNot(after, first)
            self.assertEqual(reads, [reactor_thread, reactor_thread])

        d.addCallback(check)
        return d

    def test_reactor_that_does_not_answer(self) -> None:
        timeouts: List[int] = []
        source = otlp.SnapshotSource(
            lambda: otlp.Snapshot(0, 0, (), ()), lambda f: None, lambda: False, timeout=0.05,
            on_timeout=lambda: timeouts.append(1),
        )  # fmt: skip
        self.assertIsNone(source.get())
        self.assertEqual(timeouts, [1])

    def test_an_unconsumed_snapshot_is_not_reused_forever(self) -> None:
        reads: List[int] = []

        def read() -> otlp.Snapshot:
            reads.append(1)
            return otlp.Snapshot(len(reads), len(reads), (), ())

        source = otlp.SnapshotSource(read, lambda f: None, lambda: True)
        first = source.get()
        self.assertIs(source.get(), first)
        source.max_age = 0.0
        time.sleep(0.01)
        self.assertIsNot(source.get(), first)
        self.assertEqual(len(reads), 2)

    def test_in_the_reactor_thread_it_reads_directly(self) -> None:
        calls: List[Any] = []
        source = otlp.SnapshotSource(
            lambda: otlp.Snapshot(1, 2, (), ()), calls.append, lambda: True
        )
        snapshot = source.consume()
        assert snapshot is not None
        self.assertEqual(snapshot.active_allocations, 2)
        self.assertEqual(calls, [])

