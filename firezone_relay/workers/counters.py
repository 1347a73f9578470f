"""The counters of ``--workers N``: the supervisor's ``/metrics`` (SPEC §9).

The pool fetches each ready worker's metric samples (``fetch_counters``,
every ``supervisor.COUNTER_INTERVAL`` seconds); ``WorkersCollector`` serves
them summed.  Counters stay monotonic across a worker's restart: the dead
run's last counters join its slot's base (``keep_counters``).
"""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Tuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet import defer

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
            key = (sample, tuple(sorted(labels.items())))
            base[key] = base.get(key, 0.0) + value
    slot.samples = []


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
        """The XDP program's counters (the supervisor owns it), in the same
        families as the workers' userspace ones (``datapath="xdp"``)."""
        fast_path = self.pool.fast_path
        xdp = fast_path.counters() if fast_path is not None else None
        if xdp is None:
            return

        def family(name: str, type_: str, doc: str) -> Tuple[str, str, str]:
            return families.get(name, (name, type_, doc))

        def key(sample: str, **labels: str) -> Tuple[str, Tuple[Tuple[str, str], ...]]:
            return (sample, tuple(sorted(labels.items())))

        for unit in ("bytes", "packets"):
            name = "relay_data_relayed_%s" % unit
            for direction in ("client_to_peer", "peer_to_client"):
                add(family(name, "counter", "Relayed %s." % unit), key(name + "_total", direction=direction, datapath="xdp"),
                    float(xdp.total(unit, direction)))
        names = {4: "ipv4", 6: "ipv6"}
        by_family = family("relay_xdp_relayed_packets", "counter",
                           "Packets relayed by the XDP fast path, by direction and client/peer address family.")
        for (direction, cf, pf), count in sorted(xdp.packets.items()):
            add(by_family, key("relay_xdp_relayed_packets_total", direction=direction, client_family=names[cf],
                               peer_family=names[pf]), float(count))
        add(family("relay_xdp_hairpin_packets", "counter",
                   "Packets the XDP fast path relayed from one client of this relay straight to another."),
            key("relay_xdp_hairpin_packets_total"), float(xdp.hairpin))
        passed = family("relay_xdp_passed_packets", "counter",
                        "TURN-port datagrams the XDP fast path left to userspace, by reason (miss: no binding).")
        for reason, count in sorted(xdp.passed.items()):
            add(passed, key("relay_xdp_passed_packets_total", reason=reason), float(count))
        errors = getattr(fast_path, "errors", None)
        if errors is not None:
            failed = family("relay_xdp_map_errors", "counter", "XDP map writes that failed, by kind.")
            for kind in sorted(set(errors) | {"full"}):
                add(failed, key("relay_xdp_map_errors_total", kind=kind), float(errors[kind]))

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
                    add((name, type_, doc), (sample, tuple(sorted(labels.items()))), value)
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
