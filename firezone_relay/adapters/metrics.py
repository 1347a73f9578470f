"""Prometheus metrics and the periodic stats log line.

Theory of operation: the core keeps plain integers (``Relay.stats``, the
allocation/permission/channel counts) and the UDP adapter keeps its own drop
counters; nothing on the per-packet path does more than an integer addition.
``RelayCollector`` turns those integers into metric families when Prometheus
scrapes (``prometheus_client.registry.Collector.collect``), so a metric costs
nothing between scrapes and cannot drift from what the core counted.

``StatsLogger`` is the other reader of the same integers: every 10 s, while
bytes are moving, one INFO line like upstream's ``allocations=3 channels=5
throughput=1.23 MB/s``; nothing when the relay is idle.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from firezone_relay.adapters.connection import TRANSPORTS

log = Logger(namespace="firezone_relay.adapters.metrics")

#: The datapath label of what the core relays.
USERSPACE = "userspace"
#: The datapath label of what the XDP fast path relays (``firezone_relay.xdp``).
XDP = "xdp"
#: Upper bounds of ``relay_packet_size_bytes``; ``Relay.stats.packet_sizes[i]``
#: counts payloads in ``(100*i, 100*(i+1)]`` (0 included in index 0) and index
#: 15 those above 1500.
PACKET_SIZE_BOUNDS = tuple(100 * (i + 1) for i in range(15))
STATS_INTERVAL = 10.0

_FAMILY_LABEL = {4: "ipv4", 6: "ipv6"}


#: ``relay_data_relayed_<unit>_total``'s documentation, by unit.
_RELAYED_DOC = {
    "bytes": "Payload bytes relayed (ChannelData payload or the peer datagram), by direction and datapath.",
    "packets": "Packets relayed, by direction and datapath.",
}


def relayed(unit: str, client_to_peer: int, peer_to_client: int, xdp: Any) -> CounterMetricFamily:
    """``relay_data_relayed_<unit>_total`` by direction and datapath: the
    userspace counts, and the XDP fast path's (``xdp``: ``XdpCounters`` or None)."""
    family = CounterMetricFamily(
        "relay_data_relayed_%s_total" % unit, _RELAYED_DOC[unit], labels=["direction", "datapath"]
    )
    family.add_metric(["client_to_peer", USERSPACE], client_to_peer)
    family.add_metric(["peer_to_client", USERSPACE], peer_to_client)
    if xdp is not None:
        for direction in ("client_to_peer", "peer_to_client"):
            family.add_metric([direction, XDP], xdp.total(unit, direction))
    return family


def xdp_families(xdp: Any, errors: Optional[Mapping[str, int]]) -> Iterator[Metric]:
    """The XDP fast path's own families: ``xdp`` its ``XdpCounters``,
    ``errors`` its failed map writes by kind (None: not known).  The single
    process's ``/metrics`` and the supervisor's (``workers.counters``)."""
    by_family = CounterMetricFamily(
        "relay_xdp_relayed_packets_total",
        "Packets relayed by the XDP fast path, by direction and client/peer address family "
        "(different families: relayed across IPv4 and IPv6).",
        labels=["direction", "client_family", "peer_family"],
    )
    for (direction, cf, pf), count in sorted(xdp.packets.items()):
        by_family.add_metric([direction, _FAMILY_LABEL[cf], _FAMILY_LABEL[pf]], count)
    yield by_family
    yield CounterMetricFamily(
        "relay_xdp_hairpin_packets_total",
        "Packets the XDP fast path relayed from one client of this relay straight to another.",
        value=xdp.hairpin,
    )
    yield _counter_by(
        "relay_xdp_passed_packets_total",
        "TURN-port datagrams the XDP fast path left to userspace, by reason (miss: no binding).",
        ["reason"],
        xdp.passed,
    )
    if errors is not None:
        failed = CounterMetricFamily(
            "relay_xdp_map_errors_total",
            "XDP map writes that failed, by kind (full: a channel map was full, so that binding "
            "is relayed in userspace only); userspace relays whatever XDP does not.",
            labels=["kind"],
        )
        for kind in sorted(set(errors) | {"full"}):
            failed.add_metric([kind], errors[kind])
        yield failed


def _counter_by(name: str, documentation: str, labels: list[str], counts: Mapping[Any, int]) -> CounterMetricFamily:
    """A counter family with one sample per key of ``counts``, in key order:
    a key is the label value (one label) or the tuple of them."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in sorted(counts.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], count)
    return family


def _size_buckets(sizes: Sequence[int]) -> list[tuple[str, float]]:
    """``relay_packet_size_bytes`` buckets (cumulative, ``+Inf`` last) from
    the per-bucket counts ``Relay.stats.packet_sizes`` (or XDP's) keeps."""
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip(PACKET_SIZE_BOUNDS, sizes):
        cumulative += count
        buckets.append((str(bound), cumulative))
    buckets.append(("+Inf", sum(sizes)))
    return buckets


class RelayCollector(Collector):
    """Reads the core's counters (and the adapters' drop counters) at scrape time.

    ``relay``: the ``Relay`` core.  ``readiness``: an object with ``ready``,
    ``draining`` and ``portal_joined`` attributes (``http.Readiness``); without
    it the relay counts as ready unless the core is draining.  Drop counters
    of I/O adapters (``RelayService.drops``: reason -> count) are added with
    ``add_drop_source``; a reason counted in several places is summed.
    """

    def __init__(
        self,
        relay: Any,
        readiness: Any = None,
        drop_sources: Iterable[Mapping[str, int]] = (),
        shell: Any = None,
        fast_path: Any = None,
    ) -> None:
        self.relay = relay
        self.readiness = readiness
        self._drop_sources: list[Mapping[str, int]] = list(drop_sources)
        #: The XDP fast path (``XdpService``: ``counters()`` -> ``XdpCounters``
        #: or None while it is off), read at scrape time like the core.
        self.fast_path: Any = fast_path
        #: The shell (``shell.Shell``): its ``io`` is the batched UDP I/O
        #: (``stats()`` -> counters) or None for the pure-Python reader.
        self.shell: Any = shell

    def add_drop_source(self, drops: Mapping[str, int]) -> None:
        self._drop_sources.append(drops)

    def _flags(self) -> tuple[bool, bool, bool]:
        """``(ready, draining, portal_connected)``."""
        draining = bool(self.relay.draining)
        readiness = self.readiness
        if readiness is None:
            return not draining, draining, False
        draining = draining or bool(readiness.draining)
        return bool(readiness.ready) and not draining, draining, bool(readiness.portal_joined)

    def collect(self) -> Iterator[Metric]:
        relay = self.relay
        stats = relay.stats
        config = relay.config

        by_family = relay.allocation_count_by_family()
        active = GaugeMetricFamily(
            "relay_active_allocations",
            "Allocations in service, by relayed address family (a dual-stack allocation counts in both).",
            labels=["family"],
        )
        for family in (4, 6):
            active.add_metric([_FAMILY_LABEL[family]], by_family.get(family, 0))
        yield active

        yield GaugeMetricFamily(
            "relay_allocated_ports",
            "Allocation ports held by allocations in service (one per allocation, whatever its families).",
            value=relay.allocation_count,
        )
        yield GaugeMetricFamily(
            "relay_port_range_size",
            "Number of ports in the allocation port range (--lowest-port..--highest-port).",
            value=config.highest_port - config.lowest_port + 1,
        )
        yield CounterMetricFamily(
            "relay_allocations_total",
            "Allocations created since start.",
            value=stats.allocations_total,
        )

        responses = CounterMetricFamily(
            "relay_responses_total",
            "STUN responses sent, by method, class (success/error) and error code (empty for successes).",
            labels=["message_type", "response_class", "error_code"],
        )
        for (message_type, response_class, code), count in sorted(stats.responses.items()):
            responses.add_metric([message_type, response_class, str(code) if code else ""], count)
        yield responses

        yield GaugeMetricFamily("relay_channels_active", "Channels currently bound.", value=relay.channel_count)
        yield GaugeMetricFamily(
            "relay_permissions_active", "Permissions currently installed.", value=relay.permission_count
        )

        xdp = self.fast_path.counters() if self.fast_path is not None else None
        yield relayed("bytes", stats.client_to_peer_bytes, stats.peer_to_client_bytes, xdp)
        yield relayed("packets", stats.client_to_peer_packets, stats.peer_to_client_packets, xdp)
        if xdp is not None:
            yield from xdp_families(xdp, getattr(self.fast_path, "errors", None))

        histogram = HistogramMetricFamily(
            "relay_packet_size_bytes",
            "Payload size of relayed packets, by datapath.",
            labels=["datapath"],
        )
        userspace_bytes = stats.client_to_peer_bytes + stats.peer_to_client_bytes
        histogram.add_metric([USERSPACE], _size_buckets(stats.packet_sizes), sum_value=userspace_bytes)
        if xdp is not None:
            xdp_bytes = xdp.total("bytes", "client_to_peer") + xdp.total("bytes", "peer_to_client")
            histogram.add_metric([XDP], _size_buckets(xdp.sizes), sum_value=xdp_bytes)
        yield histogram

        drops = dict(stats.dropped)
        for source in self._drop_sources:
            for reason, count in list(source.items()):
                drops[reason] = drops.get(reason, 0) + count
        yield _counter_by(
            "relay_dropped_packets_total",
            "Datagrams dropped without a reply or a relay, by reason (core decisions and socket send errors).",
            ["reason"],
            drops,
        )
        yield _counter_by(
            "relay_auth_failures_total",
            "Requests that failed authentication, by reason (missing_credentials is the normal first 401 "
            "of every client; stale_nonce the normal 438 after a nonce expires).",
            ["reason"],
            stats.auth_failures,
        )

        if self.shell is not None:
            io = self.shell.io
            yield GaugeMetricFamily(
                "relay_udp_batched_io",
                "1 when UDP datagrams are read and sent in batches (recvmmsg/sendmmsg, the _udpio extension), "
                "0 with the pure-Python reader.",
                value=int(io is not None),
            )
            if io is not None:
                counts = io.stats()
                for name, key, text in (
                    ("relay_udp_read_batches_total", "batches", "recvmmsg calls that returned datagrams."),
                    ("relay_udp_read_datagrams_total", "datagrams", "Datagrams read by recvmmsg."),
                    ("relay_udp_send_batches_total", "send_calls", "sendmmsg calls."),
                    ("relay_udp_sent_datagrams_total", "sent", "Datagrams sent by sendmmsg."),
                ):
                    yield CounterMetricFamily(name, text, value=counts[key])

        ready, draining, portal_connected = self._flags()
        yield GaugeMetricFamily(
            "relay_portal_connected",
            "1 while joined to the portal, else 0 (always 0 in standalone mode).",
            value=int(portal_connected),
        )
        yield GaugeMetricFamily(
            "relay_draining", "1 once a drain has started (SIGTERM): no new allocations.", value=int(draining)
        )
        yield GaugeMetricFamily("relay_ready", "1 while /readyz answers 200, else 0.", value=int(ready))


def make_registry(
    relay: Any, readiness: Any = None, process_metrics: bool = True, **collector_options: Any
) -> tuple[CollectorRegistry, RelayCollector]:
    """A fresh registry with the relay's collector (``collector_options``:
    ``RelayCollector``'s keyword arguments ``drop_sources``, ``shell``,
    ``fast_path``) and, by default, the process and platform collectors
    (``process_*``, ``python_info``)."""
    registry = CollectorRegistry()
    collector = RelayCollector(relay, readiness, **collector_options)
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry, collector


def format_rate(bytes_per_second: float) -> str:
    """Human units, base 1000, three significant digits: ``"1.23 MB/s"``."""
    value = float(bytes_per_second)
    units = ("B/s", "kB/s", "MB/s", "GB/s", "TB/s")
    unit = units[0]
    for unit in units:
        if value < 999.5 or unit == units[-1]:
            break
        value /= 1000.0
    if value >= 99.95:
        text = "%.0f" % value
    elif value >= 9.995:
        text = "%.1f" % value
    else:
        text = "%.2f" % value
    return "%s %s" % (text, unit)


class StatsLogger(Service):
    """Logs allocations, channels and throughput every ``interval`` seconds,
    but only when bytes were relayed since the previous line."""

    def __init__(self, relay: Any, interval: float = STATS_INTERVAL, clock: Any = None, fast_path: Any = None) -> None:
        self.relay = relay
        #: The XDP fast path, whose bytes count in the throughput too.
        self.fast_path = fast_path
        self._last_xdp_bytes = 0
        self.interval = interval
        self.clock = clock
        self._loop: Optional[LoopingCall] = None
        self._last_bytes = 0
        self._last_time = 0.0

    def _total_bytes(self) -> int:
        stats = self.relay.stats
        return int(stats.client_to_peer_bytes + stats.peer_to_client_bytes) + self._xdp_bytes()

    def _xdp_bytes(self) -> int:
        xdp = self.fast_path.counters() if self.fast_path is not None else None
        if xdp is None:
            return 0
        return int(xdp.total("bytes", "client_to_peer") + xdp.total("bytes", "peer_to_client"))

    def startService(self) -> None:
        super().startService()
        loop = LoopingCall(self.tick)
        if self.clock is not None:
            loop.clock = self.clock
        self._last_bytes = self._total_bytes()
        self._last_xdp_bytes = self._xdp_bytes()
        self._last_time = loop.clock.seconds()
        self._loop = loop
        loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def tick(self) -> None:
        assert self._loop is not None
        now = self._loop.clock.seconds()
        total = self._total_bytes()
        moved = total - self._last_bytes
        elapsed = now - self._last_time
        self._last_bytes, self._last_time = total, now
        if moved <= 0 or elapsed <= 0:
            return
        rate = moved / elapsed
        text = "allocations={allocations} channels={channels} throughput={throughput}"
        fields: dict[str, Any] = dict(
            allocations=self.relay.allocation_count,
            channels=self.relay.channel_count,
            throughput=format_rate(rate),
            bytes_per_second=round(rate, 1),
        )
        if self.fast_path is not None:
            xdp_total = self._xdp_bytes()
            xdp_rate = max(0, xdp_total - self._last_xdp_bytes) / elapsed
            self._last_xdp_bytes = xdp_total
            text += " (xdp {xdp_throughput})"
            fields.update(xdp_throughput=format_rate(xdp_rate), xdp_bytes_per_second=round(xdp_rate, 1))
        log.info(text, **fields)


class StreamCollector(Collector):
    """Stream metrics, by ``transport`` label, read at scrape time.

    ``relay_active_allocations_by_transport`` covers UDP too: the core's
    allocation count minus those held by stream connections.
    """

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        by_transport = GaugeMetricFamily(
            "relay_active_allocations_by_transport",
            "Allocations in service, by the transport of the client leg (udp, tcp, tls).",
            labels=["transport"],
        )
        stream_total = sum(service.allocations[t] for t in TRANSPORTS)
        by_transport.add_metric(["udp"], max(0, service.relay.allocation_count - stream_total))
        for t in TRANSPORTS:
            by_transport.add_metric([t], service.allocations[t])
        yield by_transport

        connections = GaugeMetricFamily(
            "relay_stream_connections", "Open TURN client connections, by transport.", labels=["transport"]
        )
        counts: Dict[str, int] = {t: 0 for t in TRANSPORTS}
        for conn in service.connections.values():
            counts[conn.transport_name] += 1
        for t in TRANSPORTS:
            connections.add_metric([t], counts[t])
        yield connections

        accepted = CounterMetricFamily(
            "relay_stream_connections_accepted", "Connections accepted, by transport.", labels=["transport"]
        )
        for t in TRANSPORTS:
            accepted.add_metric([t], service.accepted[t])
        yield accepted

        yield _counter_by(
            "relay_stream_connections_rejected",
            "Connections refused at accept time, by transport and limit.",
            ["transport", "reason"],
            service.rejected,
        )
        yield _counter_by(
            "relay_stream_connections_closed",
            "Connections ended, by transport and reason (client: the client closed it; bad_frame, "
            "write_buffer, handshake_timeout, idle, auth_timeout, buffer_budget: the relay did).",
            ["transport", "reason"],
            service.closed,
        )

        yield GaugeMetricFamily(
            "relay_stream_buffered_bytes",
            "Bytes of partial input (frames, TLS records) held by all client connections between reads.",
            value=service.buffered,
        )

        yield _counter_by(
            "relay_stream_bytes",
            "Bytes read from and written to client connections (framing and TLS records excluded), by transport.",
            ["transport", "direction"],
            service.byte_totals(),
        )
