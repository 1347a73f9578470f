"""One worker process of ``--workers N``: ``python -m firezone_relay.workers.worker SLOT PARENT_PID``.

Started by the supervisor (``pool.WorkerPool``) with:

* fd 0 / fd 1: the control channel (AMP, ``protocol``); fd 1 is moved
  away at once and fd 1 becomes a copy of fd 2, so that nothing printed can
  corrupt the channel;
* fd 2: the supervisor's stderr, where this worker logs;
* the listening sockets (UDP, TCP, TLS; per family) the supervisor made
  with ``SO_REUSEPORT``, at the descriptor numbers ``Configure`` names.

It waits for ``Configure``, builds the same shell as a single-process relay
(``adapters.shell.Shell`` with the UDP and stream transports) around its own
``Relay`` core, whose allocation range is this worker's slice, adopts the
passed sockets instead of binding, and answers: the supervisor counts it
ready.  Allocation notices go back to the supervisor.

It never outlives the supervisor: when the control channel closes (the
supervisor exited or was killed) the worker stops, and the kernel sends it
SIGKILL when its parent dies (``PR_SET_PDEATHSIG``) in case it is stuck.
SIGTERM, SIGINT and SIGHUP are ignored: a terminal's or a service
manager's signal to the whole process group reaches the supervisor, which
drains the workers itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import zlib
from typing import Any, Dict, List, Optional, cast

from twisted.logger import Logger
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from firezone_relay.workers import protocol as P

log = Logger(namespace="firezone_relay.workers.worker")

#: The supervisor reports these itself (its readiness, its drain, its portal).
SUPERVISOR_METRICS = frozenset(("relay_ready", "relay_draining", "relay_portal_connected"))


def die_with_parent(parent: int) -> None:
    """SIGKILL when the parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``);
    exit at once if it is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the closed pipe still ends us
        pass
    if os.getppid() != parent:
        os._exit(0)


def _snapshot(registry: Any) -> bytes:
    """The registry's samples as compressed JSON:
    ``[[name, type, documentation, [[sample, {labels}, value], ...]], ...]``."""
    families = []
    for metric in registry.collect():
        if metric.name in SUPERVISOR_METRICS:
            continue
        samples = [[s.name, dict(s.labels), s.value] for s in metric.samples]
        families.append([metric.name, metric.type, metric.documentation, samples])
    return zlib.compress(json.dumps(families, separators=(",", ":")).encode("utf-8"), 1)


class WorkerProcessCollector:
    """This worker's CPU time and memory (the supervisor sums the workers'
    and keeps a dead one's CPU seconds, so the total never goes back)."""

    def collect(self) -> Any:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        times = os.times()
        yield CounterMetricFamily(
            "relay_worker_cpu_seconds", "CPU time (user and system) of the worker processes.",
            value=times.user + times.system,
        )
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
            return
        yield GaugeMetricFamily("relay_worker_resident_memory_bytes", "Resident memory of the worker processes.", value=rss)


class WorkerControl(P.QuietAMP):
    """The worker's end of the control channel."""

    def __init__(self, slot: int, reactor: Any) -> None:
        super().__init__()
        self.slot = slot
        self.reactor = reactor
        self.relay: Any = None
        self.shell: Any = None
        self.registry: Any = None
        self._snapshot = b""
        #: This reactor turn's allocation notices (``[port, user]``, ``[port]``
        #: for a removal), sent together at its end (``P.encode_notices``).
        self._notices: List[List[Any]] = []

    # --- supervisor -> worker ----------------------------------------------------

    @P.Configure.responder
    def configure(self, config: str) -> Dict[str, Any]:
        build_worker(self, json.loads(config))
        return {"pid": os.getpid()}

    @P.Counters.responder
    def counters(self, offset: int) -> Dict[str, Any]:
        if offset == 0 or not self._snapshot:
            self._snapshot = _snapshot(self.registry) if self.registry is not None else zlib.compress(b"[]")
        data = self._snapshot[offset : offset + P.PAGE]
        return {"data": data, "total": len(self._snapshot)}

    @P.Evict.responder
    def evict(self, port: int) -> Dict[str, Any]:
        evicted = bool(self.relay is not None and self.relay.evict(port, "replaced"))
        if evicted:
            self.shell.pump()
        return {"evicted": evicted}

    @P.Drain.responder
    def drain(self) -> Dict[str, Any]:
        if self.relay is not None and not self.relay.draining:
            self.relay.start_draining()
            log.info("worker {slot} draining {allocations} allocations (new Allocates get 508)",
                     slot=self.slot, allocations=self.relay.allocation_count)
        return {}

    @P.Stop.responder
    def stop(self) -> Dict[str, Any]:
        self.reactor.callLater(0, self._stop)
        return {}

    # --- worker -> supervisor ------------------------------------------------------

    def channel_bound(self, command: Any) -> None:
        self._channel(True, command)

    def channel_unbound(self, command: Any) -> None:
        self._channel(False, command)

    def _channel(self, bound: bool, command: Any) -> None:
        if len(command.client) != 2:  # a stream client: not in the XDP maps
            return
        self._send_notices()  # its allocation is known to the supervisor first
        self.callRemote(
            P.ChannelChanged,
            bound=bound,
            client_ip=command.client[0],
            client_port=command.client[1],
            channel=command.channel,
            peer_ip=command.peer[0],
            peer_port=command.peer[1],
            port=command.port,
            family=command.family,
        )

    def allocation_event(self, command: Any) -> None:
        from firezone_relay.core import commands as C

        if not self._notices:
            self.reactor.callLater(0, self._send_notices)
        if isinstance(command, C.AllocationCreated):
            self._notices.append([command.port, command.username])
        else:
            self._notices.append([command.port])

    def _send_notices(self) -> None:
        notices, self._notices = self._notices, []
        if notices:
            for data in P.encode_notices(notices):
                self.callRemote(P.AllocationNotices, notices=data)

    # --- life cycle ----------------------------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._stop()

    def _stop(self) -> None:
        if self.reactor.running:
            self.reactor.stop()


def build_worker(control: WorkerControl, config: Dict[str, Any]) -> None:
    """The shell, core and transports of one worker, serving at once."""
    from firezone_relay.adapters import dispatch
    from firezone_relay.adapters.connection import StreamLimits
    from firezone_relay.adapters.gcfreeze import freeze_startup_objects
    from firezone_relay.adapters.metrics import StreamCollector, make_registry
    from firezone_relay.core.relay import Relay, RelayConfig
    from firezone_relay.randomness import BufferedSystemRandom
    from firezone_relay.service import make_transports
    from firezone_relay.workers.adopted import WorkerShell

    if control.relay is not None:
        raise RuntimeError("configured twice")
    _start_logging(config)
    fields = dict(config["relay"])
    fields["nonce_key"] = bytes.fromhex(config["nonce_key"])
    for name in ("allow_peers", "deny_peers", "rest_secrets", "service_ports", "own_addresses"):
        fields[name] = tuple(fields[name])
    relay = Relay(RelayConfig(**fields), BufferedSystemRandom())
    if config["draining"]:
        relay.start_draining()
    shell = WorkerShell(
        relay,
        reactor=control.reactor,
        batched_io={"auto": None, "batched": True, "python": False}[config["udp_io"]],
        on_allocation=control.allocation_event,
        fast_path=control if config.get("xdp") else None,  # the supervisor's XDP maps
    )
    stream = make_transports(
        shell,
        config["transport"],
        StreamLimits(**config["stream_limits"]),
        fds=(
            {int(k): v for k, v in config["udp_fds"].items()},
            {(k.split(":")[0], int(k.split(":")[1])): v for k, v in config["stream_fds"].items()},
        ),
    )
    dispatch.install(control.reactor)
    registry, _ = make_registry(relay, None, process_metrics=False, drop_sources=[shell.drops, stream.drops], shell=shell)
    registry.register(StreamCollector(stream))
    registry.register(WorkerProcessCollector())
    control.relay, control.shell, control.registry = relay, shell, registry
    shell.startService()
    control.reactor.callWhenRunning(freeze_startup_objects)  # as the single process does (gcfreeze)
    log.info(
        "worker {slot} (pid {pid}) serving: allocation ports {lowest}-{highest}, UDP I/O {udp_io}",
        udp_io="batched" if shell.io is not None else "python",
        slot=control.slot,
        pid=os.getpid(),
        lowest=fields["lowest_port"],
        highest=fields["highest_port"],
    )


def _start_logging(config: Dict[str, Any]) -> None:
    from twisted.logger import ILogObserver, LogLevel, globalLogBeginner, textFileLogObserver

    from firezone_relay import logs

    slot = config["slot"]
    levels = logs.LogLevels(
        LogLevel.levelWithName(config["log_level"][0]),
        LogLevel.levelWithName(config["log_level"][1]) if config["log_level"][1] else None,
    )
    if config["log_format"] == "json":
        inner = logs.json_observer(sys.stderr)

        def observer(event: Dict[str, Any]) -> None:
            event["worker"] = slot
            inner(event)

    else:
        plain = logs.faster_text(textFileLogObserver(sys.stderr))  # the single process's cheaper formatter

        def observer(event: Dict[str, Any]) -> None:
            level = event.get("log_level")
            event["log_system"] = "worker-%d %s#%s" % (
                slot, event.get("log_namespace", "-"), level.name if level is not None else "-"
            )
            plain(event)

    globalLogBeginner.beginLoggingTo([logs.level_filter(cast(ILogObserver, observer), levels)], redirectStandardIO=False)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    slot, parent = int(argv[0]), int(argv[1])
    die_with_parent(parent)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # The control channel keeps the real stdout; fd 1 becomes stderr.
    control_out = os.dup(1)
    os.dup2(2, 1)
    from twisted.internet import reactor
    from twisted.internet._posixstdio import StandardIO

    control = WorkerControl(slot, reactor)
    StandardIO(control, stdin=0, stdout=control_out, reactor=reactor)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    return 0


if __name__ == "__main__":  # pragma: no cover - the supervisor runs it
    sys.exit(main())
