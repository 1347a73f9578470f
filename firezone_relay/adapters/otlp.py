"""OTLP/gRPC metrics push, as upstream (SPEC §7): ``--otlp-grpc-endpoint``.

What is sent.  Upstream's instruments, from meter ``relay``, with upstream's
names, units and attributes:

- ``relay.active_allocations`` ({allocation}, non-monotonic sum, cumulative):
  allocations in service (one per allocation port, dual-stack counts once).
- ``relay.responses`` ({response}, monotonic sum): success and error responses
  to binding/allocate/refresh/channelbind/createpermission, attributes
  ``response_class`` (success/error), ``message_type`` and, for errors only,
  ``error_code`` (an integer attribute).
- ``relay.packet.size`` (By, histogram, bounds 100, 200, ... 1500): payload
  size of every relayed packet, attribute ``relay.datapath`` = ``userspace``
  (the core) or ``xdp`` (the fast path, when attached).

Upstream's ``relay.xdp.processing.duration`` is not sent: our XDP program
does not time packets.  Temporality follows upstream's ``LowMemory``
exporter by default: the up/down counter cumulative, the counter and the
histogram delta; ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``
(``cumulative`` / ``delta`` / ``lowmemory``) changes that.  The resource is
``service.name=relay``, ``service.namespace=firezone`` and the SDK's
``telemetry.sdk.*``, overridden by ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES``.  The SDK reads its other standard variables
(``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_METRIC_EXPORT_TIMEOUT``,
``OTEL_EXPORTER_OTLP_TIMEOUT``, ``..._HEADERS``, ``..._CERTIFICATE``,
``..._COMPRESSION``).

Nothing on the per-packet path.  The figures are the integers the core
already keeps for Prometheus (``Relay.stats``, ``allocation_count``, the XDP
program's counters).  The counters are observable (asynchronous)
instruments, read when the SDK collects.  The SDK has no observable
histogram, so ``relay.packet.size`` is built from the core's bucket counters
by ``RelayMetricExporter`` and added to the batch before it is encoded.

Threads.  The SDK's ``PeriodicExportingMetricReader`` collects and exports in
its own thread; the gRPC call (and its retries to a dead collector) happen
there, so the reactor never waits for the network.  The relay's state
belongs to the reactor thread: the dicts it reads (``stats.responses``) gain
keys while packets are handled, and iterating a dict that another thread
changes can raise.  So the collecting thread never reads the relay itself:
``SnapshotSource`` asks the reactor (``callFromThread``) for one copy of
everything, waits for it at most ``SNAPSHOT_TIMEOUT`` seconds, and all
instruments of one collection use that copy (consistent with each other).
The reactor's part costs a few microseconds once per export interval.  When
the reactor does not answer in time (it is stopping), that collection
reports nothing and a warning is logged.  When the SDK collects on the
reactor thread itself, the copy is made directly.

Failures.  An export that fails (a dead or refusing collector) is one
warning line, at most once per ``WARN_INTERVAL`` seconds with the count of
failures since the last line, and one line when exports work again.  The
SDK's and the exporter's own Python log records are routed through the same
limiter (no tracebacks).  Log lines reach ``twisted.logger`` through the
reactor.  Stopping waits at most ``SHUTDOWN_WAIT`` seconds for the last push.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from firezone_relay.adapters.otlpconfig import (  # noqa: F401 (checked at parse time by tap; part of this API)
    TEMPORALITY_ENV,
    check_environment,
    missing_sdk,
    parse_endpoint,
    temporality_preference,
)

log = Logger(namespace="firezone_relay.adapters.otlp")

#: Meter (instrumentation scope) name, as upstream.
METER = "relay"
#: Resource attributes upstream always sets; the environment overrides them.
DEFAULT_RESOURCE = {"service.name": "relay", "service.namespace": "firezone"}
#: The methods whose responses upstream counts in ``relay.responses``.
UPSTREAM_MESSAGE_TYPES = frozenset({"binding", "allocate", "refresh", "channelbind", "createpermission"})
#: Upper bounds of ``relay.packet.size`` (upstream's), in bytes.
PACKET_SIZE_BOUNDS = tuple(float(100 * (i + 1)) for i in range(15))
SNAPSHOT_TIMEOUT = 5.0
WARN_INTERVAL = 60.0
SHUTDOWN_WAIT = 2.0


# ---------------------------------------------------------------------------
# The snapshot: one copy of the relay's figures per collection.


@dataclass(frozen=True)
class Snapshot:
    #: When it was taken (``time.time_ns()``).
    time_ns: int
    active_allocations: int
    #: ((message_type, response_class, error code or 0), count), upstream's methods only
    responses: Tuple[Tuple[Tuple[str, str, int], int], ...]
    #: datapath -> (16 bucket counts as ``RelayStats.packet_sizes``, sum of bytes)
    packet_sizes: Tuple[Tuple[str, Tuple[int, ...], int], ...]


def take_snapshot(relay: Any, fast_path: Any = None) -> Snapshot:
    """The figures, read on the reactor thread (the only writer)."""
    stats = relay.stats
    responses = tuple(
        sorted((key, count) for key, count in stats.responses.items() if key[0] in UPSTREAM_MESSAGE_TYPES)
    )
    sizes: List[Tuple[str, Tuple[int, ...], int]] = [
        ("userspace", tuple(stats.packet_sizes), int(stats.client_to_peer_bytes + stats.peer_to_client_bytes))
    ]
    xdp = fast_path.counters() if fast_path is not None else None
    if xdp is not None:
        xdp_bytes = xdp.total("bytes", "client_to_peer") + xdp.total("bytes", "peer_to_client")
        sizes.append(("xdp", tuple(xdp.sizes), int(xdp_bytes)))
    return Snapshot(time.time_ns(), int(relay.allocation_count), responses, tuple(sizes))


class SnapshotSource:
    """Hands the collecting thread one ``Snapshot`` per collection.

    ``read``: makes a snapshot; it runs on the reactor thread, scheduled
    with ``call_from_thread`` (``reactor.callFromThread``), unless
    ``in_reactor_thread()`` says we are already there.  ``get`` returns the
    current collection's snapshot (taking it on first use); ``consume``
    returns it and starts a new collection (the exporter calls it once per
    export, after the SDK ran every instrument's callback).
    """

    def __init__(
        self,
        read: Callable[[], Snapshot],
        call_from_thread: Callable[..., Any],
        in_reactor_thread: Callable[[], bool],
        timeout: float = SNAPSHOT_TIMEOUT,
        on_timeout: Optional[Callable[[], None]] = None,
    ) -> None:
        self._read = read
        self._call_from_thread = call_from_thread
        self._in_reactor_thread = in_reactor_thread
        self.timeout = timeout
        self._on_timeout = on_timeout
        self._current: Optional[Snapshot] = None
        self._taken = False
        self._taken_at = 0.0
        #: Seconds after which ``get`` takes a new snapshot even if the
        #: current one was not consumed (one collection takes milliseconds).
        self.max_age = 1.0
        self._lock = threading.Lock()

    def get(self) -> Optional[Snapshot]:
        with self._lock:
            # A snapshot not consumed (an export that never came) is not
            # reused by a later collection.
            if not self._taken or time.monotonic() - self._taken_at > self.max_age:
                self._current = self._fetch()
                self._taken, self._taken_at = True, time.monotonic()
            return self._current

    def consume(self) -> Optional[Snapshot]:
        with self._lock:
            current = self._current if self._taken else self._fetch()
            self._current, self._taken = None, False
            return current

    def _fetch(self) -> Optional[Snapshot]:
        if self._in_reactor_thread():
            return self._read()
        box: List[Snapshot] = []
        done = threading.Event()

        def on_reactor() -> None:
            try:
                box.append(self._read())
            finally:
                done.set()

        self._call_from_thread(on_reactor)
        if not done.wait(self.timeout) or not box:
            if self._on_timeout is not None:
                self._on_timeout()
            return None
        return box[0]


# ---------------------------------------------------------------------------
# Rate-limited warnings from any thread.


class WarningLimiter:
    """At most one line per key every ``interval`` seconds; the next line
    says how many were held back.  ``emit(text)`` is called with the line
    (it must be safe from any thread)."""

    def __init__(self, emit: Callable[[str], None], interval: float = WARN_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self.interval = interval
        self._clock = clock
        self._last: Dict[str, float] = {}
        self._held: Dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, key: str, text: str) -> bool:
        """Emit ``text`` unless ``key`` was emitted less than ``interval`` ago."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            text = "%s (%d more like this in the last %.0f s)" % (text, held, now - (last or now))
        self._emit(text)
        return True

    def reset(self, key: str) -> None:
        with self._lock:
            self._last.pop(key, None)
            self._held.pop(key, None)


class _BridgeHandler(logging.Handler):
    """The SDK's and exporter's Python log records, as rate-limited lines.

    Records of the exporter itself (retries, the final failure) are only
    remembered as the reason shown in ``RelayMetricExporter``'s warning.
    """

    def __init__(self, limiter: WarningLimiter) -> None:
        super().__init__(logging.WARNING)
        self.limiter = limiter
        #: The last message of the OTLP exporter's logger (why an export failed).
        self.last_exporter_message = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a record with bad arguments: show the template
            text = str(record.msg)
        text = " ".join(text.split())
        if record.name.startswith("opentelemetry.exporter"):
            self.last_exporter_message = text
            return
        self.limiter.warn("%s:%s" % (record.name, record.msg), "OTLP: %s" % (text,))


# ---------------------------------------------------------------------------
# The exporter wrapper: adds relay.packet.size, reports failures.


def make_exporter(inner: Any, source: SnapshotSource, preference: str, endpoint: str,
                  limiter: WarningLimiter, bridge: Optional[_BridgeHandler], info: Callable[[str], None]) -> Any:
    """A ``MetricExporter`` around the OTLP exporter ``inner`` (see the module doc)."""
    from opentelemetry.sdk.metrics import (
        Counter,
        Histogram,
        ObservableCounter,
        ObservableGauge,
        ObservableUpDownCounter,
        UpDownCounter,
    )
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        HistogramDataPoint,
        Metric,
        MetricExporter,
        MetricExportResult,
        MetricsData,
        ResourceMetrics,
        ScopeMetrics,
    )
    from opentelemetry.sdk.metrics.export import Histogram as HistogramData
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    cumulative, delta = AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA
    # Upstream's relay.responses is a synchronous counter: delta under
    # LowMemory and Delta, cumulative only under Cumulative.
    counters = cumulative if preference == "cumulative" else delta
    temporality: Dict[type, Any] = {
        Counter: counters,
        ObservableCounter: counters,
        Histogram: counters,
        UpDownCounter: cumulative,
        ObservableUpDownCounter: cumulative,
        ObservableGauge: cumulative,
    }

    class RelayMetricExporter(MetricExporter):  # type: ignore[misc, valid-type, unused-ignore]  # typed only with the SDK installed
        def __init__(self) -> None:
            super().__init__(preferred_temporality=temporality)
            self.inner = inner
            self.histogram_temporality = counters
            self.start_ns = time.time_ns()
            self._previous: Dict[str, Tuple[Tuple[int, ...], int]] = {}
            self._previous_ns = self.start_ns
            self.failures = 0

        def _packet_size(self, snapshot: Optional[Snapshot]) -> Optional[Any]:
            if snapshot is None:
                return None
            points = []
            for datapath, buckets, total in snapshot.packet_sizes:
                if self.histogram_temporality == delta:
                    before, before_total = self._previous.get(datapath, ((0,) * len(buckets), 0))
                    if any(b < a for a, b in zip(before, buckets)) or total < before_total:
                        before, before_total = (0,) * len(buckets), 0  # the counters were reset
                    counts = tuple(b - a for a, b in zip(before, buckets))
                    value, start = total - before_total, self._previous_ns
                else:
                    counts, value, start = buckets, total, self.start_ns
                self._previous[datapath] = (buckets, total)
                if not sum(counts):
                    continue
                points.append(HistogramDataPoint(
                    attributes={"relay.datapath": datapath},
                    start_time_unix_nano=start,
                    time_unix_nano=snapshot.time_ns,
                    count=sum(counts),
                    sum=value,
                    bucket_counts=list(counts),
                    explicit_bounds=list(PACKET_SIZE_BOUNDS),
                    min=None,  # type: ignore[arg-type]  # unknown from bucket counters: not in the OTLP point
                    max=None,  # type: ignore[arg-type]
                ))  # fmt: skip
            self._previous_ns = snapshot.time_ns
            if not points:
                return None
            return Metric(
                name="relay.packet.size",
                description="Payload size of relayed packets",
                unit="By",
                data=HistogramData(data_points=points, aggregation_temporality=self.histogram_temporality),
            )

        def _with_packet_size(self, metrics_data: Any, metric: Any) -> Any:
            if metric is None or not metrics_data.resource_metrics:
                return metrics_data
            resource_metrics = list(metrics_data.resource_metrics)
            first = resource_metrics[0]
            scopes = list(first.scope_metrics)
            for i, scope in enumerate(scopes):
                if scope.scope.name == METER:
                    scopes[i] = ScopeMetrics(scope.scope, list(scope.metrics) + [metric], scope.schema_url)
                    break
            else:
                scopes.append(ScopeMetrics(InstrumentationScope(METER), [metric], ""))
            resource_metrics[0] = ResourceMetrics(first.resource, scopes, first.schema_url)
            return MetricsData(resource_metrics)

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
            try:
                data = self._with_packet_size(metrics_data, self._packet_size(source.consume()))
                result = self.inner.export(data, timeout_millis=timeout_millis, **kwargs)
                reason = bridge.last_exporter_message if bridge is not None else ""
            except Exception as exc:  # never into the SDK's thread as a traceback
                result, reason = MetricExportResult.FAILURE, "%s: %s" % (type(exc).__name__, exc)
            if result is MetricExportResult.SUCCESS:
                if self.failures:
                    info("OTLP: exporting metrics to %s works again (after %d failed exports)" % (endpoint, self.failures))
                    limiter.reset("export")
                self.failures = 0
            else:
                self.failures += 1
                limiter.warn(
                    "export",
                    "OTLP: exporting metrics to %s failed (%d in a row); retrying at the next interval%s"
                    % (endpoint, self.failures, ": " + reason if reason else ""),
                )
            return result

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return bool(self.inner.force_flush(timeout_millis=timeout_millis))

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            try:
                self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)
            except Exception:  # pragma: no cover - best effort at exit
                pass

    return RelayMetricExporter()


def make_resource(environ: Mapping[str, str]) -> Any:
    """Upstream's resource, then ``OTEL_RESOURCE_ATTRIBUTES`` /
    ``OTEL_SERVICE_NAME`` on top (the SDK's own detector reads them)."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    env = OTELResourceDetector().detect()
    return Resource.create(DEFAULT_RESOURCE).merge(env)


# ---------------------------------------------------------------------------
# The service.


class OtlpService(Service):
    """Pushes the relay's metrics to ``endpoint`` (``parse_endpoint``'s form)
    while running.  ``relay``: the core; ``fast_path``: the XDP service or
    None.  The SDK is imported here, in ``startService`` (after twistd's
    fork, so its thread belongs to the daemon)."""

    def __init__(self, endpoint: str, relay: Any, fast_path: Any = None, environ: Optional[Mapping[str, str]] = None,
                 reactor: Any = None) -> None:
        import os

        self.endpoint = endpoint
        self.relay = relay
        self.fast_path = fast_path
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self._reactor = reactor
        self.provider: Any = None
        self.source: Optional[SnapshotSource] = None
        self.limiter: Optional[WarningLimiter] = None
        self._bridge: Optional[_BridgeHandler] = None
        self._reactor_thread = 0

    def _warn_from_any_thread(self, text: str) -> None:
        self._reactor.callFromThread(log.warn, "{text}", text=text)

    def _info_from_any_thread(self, text: str) -> None:
        self._reactor.callFromThread(log.info, "{text}", text=text)

    def startService(self) -> None:
        super().startService()
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        self._reactor_thread = threading.get_ident()
        self.limiter = WarningLimiter(self._warn_from_any_thread)
        self._bridge = _BridgeHandler(self.limiter)
        otel_logger = logging.getLogger("opentelemetry")
        otel_logger.addHandler(self._bridge)
        # Not to the root logger nor, once the bridge is gone at stop, to
        # Python's last-resort handler (stderr): a NullHandler stays.
        otel_logger.propagate = False
        if not any(isinstance(h, logging.NullHandler) for h in otel_logger.handlers):
            otel_logger.addHandler(logging.NullHandler())

        limiter = self.limiter

        def snapshot_late() -> None:
            limiter.warn("snapshot", "OTLP: the reactor did not hand over the figures within %.0f s; "
                         "this collection is skipped" % SNAPSHOT_TIMEOUT)  # fmt: skip

        self.source = SnapshotSource(
            lambda: take_snapshot(self.relay, self.fast_path),
            self._reactor.callFromThread,
            lambda: threading.get_ident() == self._reactor_thread,
            on_timeout=snapshot_late,
        )
        preference = temporality_preference(self.environ)
        inner = OTLPMetricExporter(endpoint=self.endpoint, insecure=self.endpoint.startswith("http://"))
        exporter = make_exporter(inner, self.source, preference, self.endpoint, self.limiter, self._bridge,
                                 self._info_from_any_thread)
        reader = PeriodicExportingMetricReader(exporter)
        resource = make_resource(self.environ)
        self.provider = MeterProvider(metric_readers=[reader], resource=resource, shutdown_on_exit=False)
        meter = self.provider.get_meter(METER)
        self._instruments(meter)
        attributes = ", ".join("%s=%s" % item for item in sorted(resource.attributes.items())
                               if not item[0].startswith("telemetry.sdk."))
        log.info(
            "OTLP: pushing metrics to {endpoint} every {interval:g} s ({temporality} temporality; resource {resource})",
            endpoint=self.endpoint,
            interval=float(self.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip() or 60000) / 1000.0,
            temporality=preference,
            resource=attributes,
        )

    def _instruments(self, meter: Any) -> None:
        from opentelemetry.metrics import Observation

        source = self.source
        assert source is not None

        def active_allocations(options: Any) -> Iterable[Any]:
            snapshot = source.get()
            if snapshot is not None:
                yield Observation(snapshot.active_allocations)

        def responses(options: Any) -> Iterable[Any]:
            snapshot = source.get()
            if snapshot is None:
                return
            for (message_type, response_class, code), count in snapshot.responses:
                attributes: Dict[str, Any] = {"response_class": response_class, "message_type": message_type}
                if code:
                    attributes["error_code"] = int(code)
                yield Observation(count, attributes)

        meter.create_observable_up_down_counter(
            "relay.active_allocations", callbacks=[active_allocations], unit="{allocation}",
            description="Allocations in service")  # fmt: skip
        meter.create_observable_counter(
            "relay.responses", callbacks=[responses], unit="{response}",
            description="STUN responses sent, by method, class and error code")  # fmt: skip

    def stopService(self) -> "Optional[defer.Deferred[None]]":
        super().stopService()
        provider, self.provider = self.provider, None
        if provider is None:
            return None
        # The last push happens in the SDK's thread and needs the reactor
        # for its snapshot, so the reactor must keep running meanwhile: the
        # shutdown runs in a daemon thread and the stop waits for it at most
        # SHUTDOWN_WAIT seconds (a dead collector never holds up the exit).
        reactor = self._reactor
        d: defer.Deferred[None] = defer.Deferred()

        bridge, self._bridge = self._bridge, None

        def shut() -> None:
            try:
                provider.shutdown(timeout_millis=SHUTDOWN_WAIT * 1000)
            except Exception:  # pragma: no cover - best effort at exit
                pass
            if bridge is not None:
                logging.getLogger("opentelemetry").removeHandler(bridge)
            reactor.callFromThread(lambda: None if d.called else d.callback(None))

        threading.Thread(target=shut, name="otlp-shutdown", daemon=True).start()
        timer = reactor.callLater(SHUTDOWN_WAIT + 0.5, lambda: None if d.called else d.callback(None))
        d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return d


def make_service(endpoint: str, relay: Any, fast_path: Any = None) -> OtlpService:
    service = OtlpService(endpoint, relay, fast_path)
    service.setName("otlp")
    return service


__all__: Sequence[str] = (
    "OtlpService",
    "SnapshotSource",
    "WarningLimiter",
    "check_environment",
    "make_service",
    "missing_sdk",
    "parse_endpoint",
    "take_snapshot",
)
