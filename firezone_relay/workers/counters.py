"""The counters of ``--workers N``: the supervisor's ``/metrics`` (SPEC §9).

The pool fetches each ready worker's metric samples (``fetch_counters``,
every ``supervisor.COUNTER_INTERVAL`` seconds); ``WorkersCollector`` serves
them summed.  Counters stay monotonic across a worker's restart: the dead
run's last counters join its slot's base (``keep_counters``).
"""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Tuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet import defer

from firezone_relay.adapters.metrics import XDP, relayed, xdp_families
from firezone_relay.workers import protocol as P

if TYPE_CHECKING:
    from firezone_relay.workers.control import SupervisorControl
    from firezone_relay.workers.pool import Slot, WorkerPool


@defer.inlineCallbacks
def fetch_counters(control: "SupervisorControl") -> Any:
    """A worker's metric families (``Counters``, page by page)."""
    chunks: List[bytes] = []
    offset, total = 0, 1
    while offset < total:
        answer = yield control.callRemote(P.Counters, offset=offset)
        data = answer["data"]
        total = answer["total"]
        if not data:
            break
        chunks.append(data)
        offset += len(data)
        if offset > 64 * 1024 * 1024:
            raise ValueError("counters too large")
    families = json.loads(zlib.decompress(b"".join(chunks)))
    return families


def keep_counters(slot: "Slot") -> None:
    """A run ended: its last counters join the slot's base, so that sums never go back."""
    for name, type_, doc, samples in slot.samples:
        if type_ not in ("counter", "histogram"):
            continue
        base = slot.base.setdefault((name, type_, doc), {})
        for sample, labels, value in samples:
            key = _sample_key(sample, labels)
            base[key] = base.get(key, 0.0) + value
    slot.samples = []


def _sample_key(sample: str, labels: Mapping[str, str]) -> Tuple[str, Tuple[Tuple[str, str], ...]]:
    """A sample's name and labels as a key of the sums."""
    return (sample, tuple(sorted(labels.items())))


_Add = Callable[[Tuple[str, str, str], Tuple[str, Tuple[Tuple[str, str], ...]], float], None]


class WorkersCollector(Collector):
    """``/metrics`` of the supervisor: the workers' families summed (the
    dead runs' counters included), and the pool's own."""

    #: Flags, not amounts: the largest value, not the sum.
    MAXIMUM = frozenset(("relay_udp_batched_io",))

    def __init__(self, pool: WorkerPool, readiness: Any) -> None:
        self.pool = pool
        self.readiness = readiness

    def _add_xdp(self, add: _Add, families: Dict[str, Tuple[str, str, str]]) -> None:
        """The XDP program's counters (the supervisor owns it), as the single
        process shows them (``metrics.relayed``, ``metrics.xdp_families``),
        in the workers' families where they have them (their userspace
        samples are the workers' own)."""
        fast_path = self.pool.fast_path
        xdp = fast_path.counters() if fast_path is not None else None
        if xdp is None:
            return
        metrics: List[Metric] = [relayed(unit, 0, 0, xdp) for unit in ("bytes", "packets")]
        metrics.extend(xdp_families(xdp, getattr(fast_path, "errors", None)))
        for metric in metrics:
            family = families.get(metric.name, (metric.name, metric.type, metric.documentation))
            for sample in metric.samples:
                if sample.labels.get("datapath", XDP) == XDP:
                    add(family, _sample_key(sample.name, sample.labels), float(sample.value))

    def collect(self) -> Iterator[Metric]:
        merged: Dict[Tuple[str, str, str], Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]] = {}
        order: List[Tuple[str, str, str]] = []

        def add(family: Tuple[str, str, str], key: Tuple[str, Tuple[Tuple[str, str], ...]], value: float) -> None:
            if family not in merged:
                merged[family] = {}
                order.append(family)
            values = merged[family]
            if family[0] in self.MAXIMUM:
                values[key] = max(values.get(key, value), value)
            else:
                values[key] = values.get(key, 0.0) + value

        for slot in self.pool.slots:
            for name, type_, doc, samples in slot.samples:
                for sample, labels, value in samples:
                    add((name, type_, doc), _sample_key(sample, labels), value)
            for family, values in slot.base.items():
                for key, value in values.items():
                    add(family, key, value)
        self._add_xdp(add, {family[0]: family for family in order})
        for family in order:
            name, type_, doc = family
            metric = Metric(name, doc, type_)
            for (sample, labels), value in merged[family].items():
                metric.add_sample(sample, dict(labels), value)
            yield metric

        pool = self.pool
        yield GaugeMetricFamily("relay_workers", "Worker processes running and ready.",
                                value=sum(1 for slot in pool.slots if slot.ready))
        yield GaugeMetricFamily("relay_workers_configured", "Worker processes configured (--workers).", value=pool.count)
        yield CounterMetricFamily("relay_worker_restarts", "Worker processes restarted after they exited or died.",
                                  value=pool.restarts_total)
        yield CounterMetricFamily(
            "relay_worker_control_throttled",
            "Times a worker's control messages were read slower because it sent more than the supervisor's budget.",
            value=pool.throttled_total,
        )
        readiness = self.readiness
        draining = bool(readiness.draining)
        yield GaugeMetricFamily("relay_portal_connected",
                                "1 while joined to the portal, else 0 (always 0 in standalone mode).",
                                value=int(bool(readiness.portal_joined)))
        yield GaugeMetricFamily("relay_draining", "1 once a drain has started (SIGTERM): no new allocations.",
                                value=int(draining))
        yield GaugeMetricFamily("relay_ready", "1 while /readyz answers 200, else 0.",
                                value=int(bool(readiness.ready) and not draining))
