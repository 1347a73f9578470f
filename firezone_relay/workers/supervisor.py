"""The supervisor of ``--workers N`` (N > 1): the twistd process.

Theory of operation (SPEC §9).  The supervisor relays nothing itself.  It

* creates every listening socket once, one per worker and listener (UDP on
  the listen port, TCP on it, TLS on ``--tls-port``; per address family
  served), all with ``SO_REUSEPORT``, and keeps them open for its whole
  life: the kernel spreads clients over the workers by their 5-tuple, and
  since a dead worker's sockets stay in the group, its restart never moves
  another client to another worker (what arrives for the dead worker waits
  in its socket's queue until the new one reads it);
* spawns the workers (``worker.py``) with ``reactor.spawnProcess``, those
  sockets in ``childFDs`` and a Twisted AMP control channel on the child's
  stdin/stdout (``protocol``); each gets a disjoint slice of
  ``--lowest-port``..``--highest-port``, the secret and the nonce key (so a
  nonce or a credential is valid in every worker);
* counts a worker ready once it answers ``Configure``; ``/readyz`` is ready
  when every worker is (and, in portal mode, the portal joined);
* restarts a worker that exits or dies, after a backoff that doubles
  (``BACKOFF_FIRST`` .. ``BACKOFF_MAX``) while it keeps failing and starts
  over once a worker ran ``STABLE`` seconds; each loss is logged and counted
  (``relay_worker_restarts_total``); a worker that does not answer
  ``Configure`` within ``READY_TIMEOUT`` is killed and restarted the same way,
  and so is a ready one that leaves a counters request unanswered for
  ``UNRESPONSIVE`` seconds (its reactor is stuck);
* bounds the control channel: a worker's messages are read at most at
  ``CONTROL_RATE`` per second, and handling them may take at most
  ``CONTROL_SHARE`` of the supervisor's time (both with bursts of twice
  that); beyond, the supervisor stops reading that worker's pipe until the
  budget refills (the worker's own writes wait), so a flooding worker costs
  the supervisor a bounded share of its time and nothing else, however
  fast or loaded the host; a worker that breaks the protocol (an allocation outside
  its slice, a malformed message) is killed (and restarted);
* keeps ``--user-allocation-limit`` across workers from their allocation
  notices: when a user holds more than the limit, its oldest allocation is
  evicted (``Evict``) wherever it lives;
* serves ``/metrics`` from the workers' samples (fetched every
  ``COUNTER_INTERVAL`` seconds), summed; counters stay monotonic across a
  worker's restart (the dead worker's last counters are kept);
* drains: the ``DrainController`` (SIGTERM once: drain every worker and exit
  0 when none holds an allocation; twice: stop at once) works on this pool
  as on a single relay (``allocation_count``, ``start_draining``,
  ``watch_allocations``);
* at exit closes the control channels (workers stop when theirs closes) and
  kills what is left after ``STOP_TIMEOUT``.  A supervisor killed with -9
  leaves no worker: each sees its control channel close (and has
  ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import signal
import socket
import sys
import time
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from firezone_relay.adapters._twisted import cancel_call
from firezone_relay.workers import protocol as P
from firezone_relay.workers.options import parse_workers, slices

log = Logger(namespace="firezone_relay.workers.supervisor")

#: The module a worker runs (``python -m``); tests name a faulty one.
WORKER_MODULE_ENV = "FIREZONE_RELAY_WORKER_MODULE"
WORKER_MODULE = "firezone_relay.workers.worker"
#: Generous: a loaded host can take seconds to import and start a worker.
READY_TIMEOUT = 20.0
#: A ready worker that leaves a counters request unanswered this long is stuck: killed, restarted.
UNRESPONSIVE = 30.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: A worker that ran this long before it died starts the backoff over.
STABLE = 10.0
COUNTER_INTERVAL = 1.0
STOP_TIMEOUT = 5.0
#: Far above a real worker's rate (two notices per allocation, two per
#: channel with XDP; a worker allocates a few thousand a second).
CONTROL_RATE = 20000.0
#: Seconds per second of the supervisor's time one worker's messages may take.
CONTROL_SHARE = 0.2
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_LISTEN_BACKLOG = 1024
_LOOPBACK = {4: "127.0.0.1", 6: "::1"}


def _is_local(ip: str) -> bool:
    """True when ``ip`` is one of this host's addresses (it can be bound)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def siblings(options: Any) -> Dict[int, Tuple[str, str]]:
    """family -> (local address, public address) for the families whose
    public address cannot reach the other workers' allocation ports
    directly (1:1 NAT: not local, or not the address bound)."""
    out: Dict[int, Tuple[str, str]] = {}
    for family in (4, 6):
        public = options["public-ip%d-addr" % family]
        if not public:
            continue
        bind = options["bind-ip%d-addr" % family]
        unspecified = ipaddress.ip_address(bind).is_unspecified
        if _is_local(public) and (unspecified or ipaddress.ip_address(bind) == ipaddress.ip_address(public)):
            continue
        out[family] = (_LOOPBACK[family] if unspecified else bind, public)
    return out


# --- the control channel over the child's pipes ------------------------------------


class _PipeAddress:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __repr__(self) -> str:
        return "worker pid %d" % self.pid


class _Pipe:
    """AMP's transport: writes go to the child's stdin."""

    def __init__(self, process: "WorkerProcess") -> None:
        self.process = process

    def write(self, data: bytes) -> None:
        transport = self.process.transport
        if transport is not None and not self.process.ended:
            transport.writeToChild(0, data)

    def writeSequence(self, data: List[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        transport = self.process.transport
        if transport is not None and not self.process.ended:
            transport.closeStdin()

    abortConnection = loseConnection

    def getPeer(self) -> _PipeAddress:
        return _PipeAddress(self.process.pid)

    getHost = getPeer


class SupervisorControl(P.QuietAMP):
    """The supervisor's end of one worker's control channel."""

    def __init__(self, pool: "WorkerPool", slot: "Slot") -> None:
        super().__init__()
        self.pool = pool
        self.slot = slot
        self.budget = Budget(CONTROL_RATE)

    def ampBoxReceived(self, box: Any) -> None:
        process = self.slot.process
        if not self.budget.take(1.0) and process is not None:
            process.throttle(self.budget.wait())
        super().ampBoxReceived(box)

    @P.AllocationCreated.responder
    def allocation_created(self, port: int, user: str) -> Dict[str, Any]:
        self.pool.allocation_created(self.slot, port, user)
        return {}

    @P.AllocationRemoved.responder
    def allocation_removed(self, port: int) -> Dict[str, Any]:
        self.pool.allocation_removed(self.slot, port)
        return {}

    @P.AllocationNotices.responder
    def allocation_notices(self, notices: List[Dict[str, Any]]) -> Dict[str, Any]:
        pool, slot = self.pool, self.slot
        for notice in notices:
            user = notice.get("user")
            if user is None:
                pool.allocation_removed(slot, notice["port"])
            else:
                pool.allocation_created(slot, notice["port"], user)
        return {}

    @P.ChannelBound.responder
    def channel_bound(self, **fields: Any) -> Dict[str, Any]:
        self.pool.channel_changed(self.slot, True, fields)
        return {}

    @P.ChannelUnbound.responder
    def channel_unbound(self, **fields: Any) -> Dict[str, Any]:
        self.pool.channel_changed(self.slot, False, fields)
        return {}


class Budget:
    """A token bucket: ``rate`` per second, bursts of twice that."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 2 * rate
        self.at = time.monotonic()

    def take(self, amount: float) -> bool:
        """Spend ``amount``; False once the bucket is empty (it may go below zero)."""
        now = time.monotonic()
        self.tokens = min(2 * self.rate, self.tokens + (now - self.at) * self.rate) - amount
        self.at = now
        return self.tokens >= 0

    def wait(self) -> float:
        """Seconds until the bucket is back above zero."""
        return max(0.0, -self.tokens / self.rate)


class WorkerProcess(ProcessProtocol):
    """One run of a worker process; ``Slot`` holds what outlives it."""

    def __init__(self, pool: "WorkerPool", slot: "Slot") -> None:
        self.pool = pool
        self.slot = slot
        self.control = SupervisorControl(pool, slot)
        self.pid = 0
        self.ended = False
        self.started = time.monotonic()
        self.budget = Budget(CONTROL_SHARE)
        self._resume: Any = None

    def connectionMade(self) -> None:
        self.pid = int(getattr(self.transport, "pid", 0) or 0)
        self.control.makeConnection(_Pipe(self))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != 1 or self.ended:
            return
        started = time.perf_counter()
        try:
            self.control.dataReceived(data)
        except Exception as exc:
            self.pool.misbehaving(self.slot, "broke the control protocol (%s)" % (exc,))
        if not self.budget.take(time.perf_counter() - started):
            self.throttle(self.budget.wait())

    def throttle(self, seconds: float) -> None:
        """Read nothing more from this worker for ``seconds`` (its budget is spent)."""
        if self._resume is not None or self.ended:
            return
        reader = getattr(self.transport, "pipes", {}).get(1)
        if reader is None:
            return
        reader.stopReading()
        self.pool.throttled(self.slot)
        self._resume = self.pool.reactor.callLater(max(seconds, 0.01), self._read_again, reader)

    def _read_again(self, reader: Any) -> None:
        self._resume = None
        if not self.ended:
            reader.startReading()

    def kill(self) -> None:
        if self.ended or self.transport is None:
            return
        try:
            self.transport.signalProcess("KILL")
        except Exception:  # already gone
            pass

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        cancel_call(self._resume)
        self._resume = None
        self.control.connectionLost(reason)
        self.pool.worker_ended(self.slot, self, reason)


@dataclasses.dataclass
class Slot:
    """One worker position: its slice, its sockets and what survives restarts."""

    index: int
    lowest: int
    highest: int
    fds: Dict[str, int] = dataclasses.field(default_factory=dict)
    process: Optional[WorkerProcess] = None
    ready: bool = False
    ready_since: float = 0.0
    failures: int = 0
    restarts: int = 0
    #: allocation port -> username, from the worker's notices
    ports: Dict[int, str] = dataclasses.field(default_factory=dict)
    #: the current run's metric families, from ``Counters``
    samples: List[Any] = dataclasses.field(default_factory=list)
    #: counters of the runs that died: (name, type, doc) -> (sample, labels) -> value
    base: Dict[Tuple[str, str, str], Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]] = dataclasses.field(
        default_factory=dict
    )
    restart_call: Any = None
    ready_call: Any = None
    fetching: bool = False
    fetch_started: float = 0.0
    throttle_logged: float = -60.0
    #: the current run's channels in the XDP maps: (client, channel, peer, port, family)
    channels: set[Tuple[Any, ...]] = dataclasses.field(default_factory=set)
    #: allocation port -> how many of ``channels`` it holds
    channel_counts: Dict[int, int] = dataclasses.field(default_factory=dict)


class WorkerPool(Service):
    """The workers; see the module docstring.  ``relay`` is the pool itself
    for the ``DrainController`` (it asks ``relay.allocation_count``)."""

    name = "workers"

    def __init__(
        self,
        options: Any,
        secret: str,
        count: int,
        readiness: Any,
        reactor: Any,
        serve_at_start: bool = True,
        fast_path: Any = None,
    ) -> None:
        self.options = options
        #: The XDP service (``--ebpf-offloading``) whose maps the workers' channels feed, or None.
        self.fast_path = fast_path
        self.secret = secret
        self.count = count
        self.readiness = readiness
        self.reactor = reactor
        self.serve_at_start = serve_at_start
        self.relay = self
        self.nonce_key = os.urandom(32)
        self.slots = [Slot(i, low, high) for i, (low, high) in enumerate(
            slices(options["lowest-port"], options["highest-port"], count)
        )]
        self.module = os.environ.get(WORKER_MODULE_ENV, "").strip() or WORKER_MODULE
        self.restarts_total = 0
        self.throttled_total = 0
        self._draining = False
        self._stopping = False
        self._started = False
        self._sockets: List[socket.socket] = []
        self._watchers: List[Callable[[], None]] = []
        #: username -> [(slot index, port)], oldest first
        self._by_user: Dict[str, List[Tuple[int, int]]] = {}
        self._counters = LoopingCall(self._fetch_all)
        self._counters.clock = reactor
        self._ended: Dict[int, defer.Deferred[None]] = {}
        self.siblings = siblings(options)
        self._max_channels = int(options.get("max-channels-per-allocation") or 256)
        self.tcp_port = options["listen-port"]
        self.tls_port = options["tls-port"]

    # --- the drain's view (as a single relay) ------------------------------------

    @property
    def allocation_count(self) -> int:
        return sum(len(slot.ports) for slot in self.slots)

    @property
    def draining(self) -> bool:
        return self._draining

    def start_draining(self) -> None:
        self._draining = True
        for slot in self.slots:
            control = self._control(slot)
            if control is not None:
                control.callRemote(P.Drain).addErrback(lambda _: None)

    def watch_allocations(self, watcher: Callable[[], None]) -> None:
        self._watchers.append(watcher)

    def _changed(self) -> None:
        for watcher in self._watchers:
            watcher()

    # --- life cycle ------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.serve_at_start:
            self._make_sockets()

    def startService(self) -> None:
        super().startService()
        if self.serve_at_start:
            self.start_workers()
        self._counters.start(COUNTER_INTERVAL, now=False)

    def start_workers(self) -> None:
        """Open the listeners (if not yet) and start every worker (portal
        mode: on the portal's first ``init``)."""
        if self._started:  # a later init (portal reconnect): already serving
            return
        self._make_sockets()
        self._started = True
        log.info(
            "{count} workers: allocation ports {slices}; listeners shared with SO_REUSEPORT",
            count=self.count,
            slices=", ".join("%d-%d" % (s.lowest, s.highest) for s in self.slots),
        )
        for slot in self.slots:
            self._spawn(slot)

    def stopService(self) -> "defer.Deferred[Any]":
        super().stopService()
        self._stopping = True
        if self._counters.running:
            self._counters.stop()
        waits = []
        for slot in self.slots:
            cancel_call(slot.restart_call)
            cancel_call(slot.ready_call)
            slot.restart_call = slot.ready_call = None
            process = slot.process
            if process is None or process.ended:
                continue
            d: defer.Deferred[None] = defer.Deferred()
            self._ended[slot.index] = d
            try:
                process.control.callRemote(P.Stop)
            except Exception:
                pass
            if process.transport is not None:
                process.transport.closeStdin()  # the worker stops when its channel closes
            kill = self.reactor.callLater(STOP_TIMEOUT, process.kill)
            d.addBoth(_cancelling, kill)
            waits.append(d)
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        return defer.gatherResults(waits, consumeErrors=True)

    # --- sockets -----------------------------------------------------------------------

    def _make_sockets(self) -> None:
        if self._sockets:
            return
        options = self.options
        served = [(f, options["bind-ip%d-addr" % f]) for f in (4, 6) if options["public-ip%d-addr" % f]]
        kinds: List[Tuple[str, int]] = [("udp", socket.SOCK_DGRAM)]
        if options["max-connections"] > 0:
            kinds.append(("tcp", socket.SOCK_STREAM))
            if options["tls-cert"]:
                kinds.append(("tls", socket.SOCK_STREAM))
        for family, ip in served:
            for kind, type_ in kinds:
                self._probe(family, ip, kind, type_)
                for slot in self.slots:
                    sock = self._listener(family, ip, kind, type_)
                    slot.fds["%s:%d" % (kind, family)] = sock.fileno()

    def _probe(self, family: int, ip: str, kind: str, type_: int) -> None:
        """Bind the port once without ``SO_REUSEPORT`` first: a port another
        relay (or anything) holds is an error at start-up, as without
        workers, never a silent share of its traffic."""
        port = {"udp": self.options["listen-port"], "tcp": self.tcp_port, "tls": self.tls_port}[kind]
        probe = socket.socket(_AF[family], type_)
        try:
            if family == 6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if type_ == socket.SOCK_STREAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((ip, port))
        except OSError as exc:
            for other in self._sockets:
                other.close()
            self._sockets = []
            raise CannotListenError(ip, port, exc) from exc
        finally:
            probe.close()

    def _listener(self, family: int, ip: str, kind: str, type_: int) -> socket.socket:
        port = {"udp": self.options["listen-port"], "tcp": self.tcp_port, "tls": self.tls_port}[kind]
        sock = socket.socket(_AF[family], type_)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if type_ == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif self.options["socket-buffer"]:
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, opt, self.options["socket-buffer"])
                    except OSError:
                        pass  # best effort, as the single process
            sock.bind((ip, port))
            if type_ == socket.SOCK_STREAM:
                sock.listen(_LISTEN_BACKLOG)
            sock.setblocking(False)
            os.set_inheritable(sock.fileno(), False)
        except OSError as exc:
            sock.close()
            for other in self._sockets:
                other.close()
            self._sockets = []
            raise CannotListenError(ip, port, exc) from exc
        if port == 0:  # tests: the kernel's choice, shared by the other workers
            chosen = sock.getsockname()[1]
            if kind == "tls":
                self.tls_port = chosen
            else:
                self.tcp_port = chosen
        self._sockets.append(sock)
        return sock

    # --- workers -------------------------------------------------------------------------

    def worker_config(self, slot: Slot) -> Dict[str, Any]:
        from firezone_relay.service import relay_config, stream_limits

        options = self.options
        config = relay_config(options, self.secret)
        config = dataclasses.replace(
            config,
            lowest_port=slot.lowest,
            highest_port=slot.highest,
            relay_lowest_port=options["lowest-port"],
            relay_highest_port=options["highest-port"],
            sibling_ip4=self.siblings[4][0] if 4 in self.siblings else None,
            sibling_ip6=self.siblings[6][0] if 6 in self.siblings else None,
        )
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "nonce_key"}
        levels = options["log-level"]
        limits = dataclasses.asdict(stream_limits(options, self.count))
        return {
            "slot": slot.index,
            "relay": fields,
            "nonce_key": self.nonce_key.hex(),
            "draining": self._draining,
            "udp_io": options["udp-io"],
            "listen_port": options["listen-port"],
            "tls_port": self.tls_port,
            "tls_cert": options["tls-cert"],
            "tls_key": options["tls-key"],
            "bind": {str(f): options["bind-ip%d-addr" % f] for f in (4, 6) if options["public-ip%d-addr" % f]},
            "udp_fds": {k.split(":")[1]: fd for k, fd in slot.fds.items() if k.startswith("udp:")},
            "stream_fds": {k: fd for k, fd in slot.fds.items() if not k.startswith("udp:")},
            "stream_limits": limits,
            "siblings": {str(f): list(v) for f, v in self.siblings.items()},
            "log_format": options["log-format"],
            "xdp": self.fast_path is not None,
            "log_level": [levels.default.name, levels.relay.name if levels.relay is not None else None],
        }

    def _spawn(self, slot: Slot) -> None:
        slot.restart_call = None
        if self._stopping:
            return
        process = WorkerProcess(self, slot)
        slot.process = process
        slot.ready = False
        child_fds: Dict[int, Any] = {0: "w", 1: "r", 2: 2}
        for fd in slot.fds.values():
            child_fds[fd] = fd
        args = [sys.executable, "-m", self.module, str(slot.index), str(os.getpid())]
        self.reactor.spawnProcess(process, sys.executable, args, env=dict(os.environ), childFDs=child_fds)
        log.info("worker {slot} started (pid {pid}), allocation ports {lowest}-{highest}",
                 slot=slot.index, pid=process.pid, lowest=slot.lowest, highest=slot.highest)
        d = process.control.callRemote(P.Configure, config=json.dumps(self.worker_config(slot)))
        slot.ready_call = self.reactor.callLater(READY_TIMEOUT, self._not_ready, slot, process)
        d.addCallbacks(self._ready, self._configure_failed, callbackArgs=(slot, process), errbackArgs=(slot, process))

    def _ready(self, result: Dict[str, Any], slot: Slot, process: WorkerProcess) -> None:
        if slot.process is not process or process.ended:
            return
        cancel_call(slot.ready_call)
        slot.ready_call = None
        slot.ready = True
        slot.ready_since = time.monotonic()
        log.info("worker {slot} ready (pid {pid})", slot=slot.index, pid=process.pid)
        self._update_readiness()
        self._fetch_all()  # its metric families exist from now on
        if self._draining:  # the drain began while it started
            process.control.callRemote(P.Drain).addErrback(lambda _: None)

    def _configure_failed(self, failure: Failure, slot: Slot, process: WorkerProcess) -> None:
        if slot.process is not process or process.ended:
            return
        log.error("worker {slot} (pid {pid}) failed to start: {error}; killing it",
                  slot=slot.index, pid=process.pid, error=failure.getErrorMessage())
        process.kill()

    def _not_ready(self, slot: Slot, process: WorkerProcess) -> None:
        slot.ready_call = None
        if slot.process is not process or process.ended or slot.ready:
            return
        log.error(
            "worker {slot} (pid {pid}) did not become ready within {timeout:g} s; killing it",
            slot=slot.index, pid=process.pid, timeout=READY_TIMEOUT,
        )
        process.kill()

    def misbehaving(self, slot: Slot, why: str) -> None:
        process = slot.process
        if process is None or process.ended:
            return
        if not getattr(process, "condemned", False):
            process.condemned = True  # type: ignore[attr-defined]
            log.error("worker {slot} (pid {pid}) {why}; killing it", slot=slot.index, pid=process.pid, why=why)
        process.kill()

    def throttled(self, slot: Slot) -> None:
        """A worker spent its control budget: its pipe waits (``WorkerProcess.throttle``)."""
        self.throttled_total += 1
        now = time.monotonic()
        if now - slot.throttle_logged >= 60.0:
            slot.throttle_logged = now
            log.warn(
                "worker {slot} floods the control channel (over {rate:g} messages a second, or {share:.0%} "
                "of the supervisor's time): reading it no faster than that (logged at most once a minute)",
                slot=slot.index, rate=CONTROL_RATE, share=CONTROL_SHARE,
            )

    def worker_ended(self, slot: Slot, process: WorkerProcess, reason: Failure) -> None:
        waiter = self._ended.pop(slot.index, None)
        if waiter is not None:
            waiter.callback(None)
        if slot.process is not process:
            return
        cancel_call(slot.ready_call)
        slot.ready_call = None
        was_ready, slot.ready = slot.ready, False
        ran = time.monotonic() - (slot.ready_since if was_ready else process.started)
        slot.process = None
        self._keep_counters(slot)
        self._unbind_all(slot)
        for port in list(slot.ports):
            self._forget(slot, port)
        self._update_readiness()
        self._changed()
        if self._stopping:
            return
        slot.failures = 1 if was_ready and ran >= STABLE else slot.failures + 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (slot.failures - 1))
        slot.restarts += 1
        self.restarts_total += 1
        log.error(
            "worker {slot} (pid {pid}) {how}{when}; restarting it in {delay:g} s "
            "({failures} failure(s) in a row, {restarts} restart(s) of this worker)",
            slot=slot.index,
            pid=process.pid,
            how=_describe_end(reason),
            when="" if was_ready else " before it was ready",
            delay=delay,
            failures=slot.failures,
            restarts=slot.restarts,
        )
        slot.restart_call = self.reactor.callLater(delay, self._spawn, slot)

    def _update_readiness(self) -> None:
        if self.readiness is not None:
            self.readiness.serving = self.all_ready

    @property
    def all_ready(self) -> bool:
        return all(slot.ready for slot in self.slots)

    def _control(self, slot: Slot) -> Optional[SupervisorControl]:
        process = slot.process
        if process is None or process.ended:
            return None
        return process.control

    # --- allocations and the user limit ------------------------------------------------------

    def allocation_created(self, slot: Slot, port: int, user: str) -> None:
        if not slot.lowest <= port <= slot.highest:
            self.misbehaving(slot, "reported an allocation on port %d, outside its slice" % port)
            return
        if port in slot.ports:
            self._forget(slot, port)
        slot.ports[port] = user
        owned = self._by_user.setdefault(user, [])
        owned.append((slot.index, port))
        limit = self.options["user-allocation-limit"]
        while limit and len(owned) > limit:
            index, old = owned.pop(0)
            holder = self.slots[index]
            holder.ports.pop(old, None)
            control = self._control(holder)
            log.info(
                "user {user}: allocation on port {old} (worker {holder}) replaced by port {port} "
                "(worker {slot}): --user-allocation-limit {limit}",
                user=user, old=old, holder=index, port=port, slot=slot.index, limit=limit,
            )
            if control is not None:
                control.callRemote(P.Evict, port=old).addErrback(lambda _: None)
        self._changed()

    def allocation_removed(self, slot: Slot, port: int) -> None:
        self._forget(slot, port)
        self._changed()

    def _forget(self, slot: Slot, port: int) -> None:
        user = slot.ports.pop(port, None)
        if user is None:
            return
        owned = self._by_user.get(user)
        if owned is not None:
            try:
                owned.remove((slot.index, port))
            except ValueError:
                pass
            if not owned:
                del self._by_user[user]

    # --- the XDP maps ------------------------------------------------------------------------

    def channel_changed(self, slot: Slot, bound: bool, fields: Dict[str, Any]) -> None:
        from firezone_relay.core import commands as C

        port = fields["port"]
        key = (
            (fields["client_ip"], fields["client_port"]),
            fields["channel"],
            (fields["peer_ip"], fields["peer_port"]),
            port,
            fields["family"],
        )
        fast_path = self.fast_path
        if bound:
            if port not in slot.ports:
                return  # not (or no longer: just evicted) one of its allocations
            if key in slot.channels:
                return
            if slot.channel_counts.get(port, 0) >= self._max_channels:
                self.misbehaving(slot, "reported more channels on port %d than an allocation may hold" % port)
                return
            slot.channels.add(key)
            slot.channel_counts[port] = slot.channel_counts.get(port, 0) + 1
            if fast_path is not None:
                fast_path.channel_bound(C.ChannelBound(*key))
        elif key in slot.channels:
            slot.channels.discard(key)
            left = slot.channel_counts.get(port, 1) - 1
            if left > 0:
                slot.channel_counts[port] = left
            else:
                slot.channel_counts.pop(port, None)
            if fast_path is not None:
                fast_path.channel_unbound(C.ChannelUnbound(*key))

    def _unbind_all(self, slot: Slot) -> None:
        """A worker died: its channels leave the kernel's maps with it."""
        from firezone_relay.core import commands as C

        channels, slot.channels = slot.channels, set()
        slot.channel_counts.clear()
        if self.fast_path is not None:
            for key in channels:
                self.fast_path.channel_unbound(C.ChannelUnbound(*key))

    # --- counters ------------------------------------------------------------------------------

    def _fetch_all(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            control = self._control(slot)
            if control is None or not slot.ready:
                continue
            if not slot.fetching:
                slot.fetching = True
                slot.fetch_started = now
                self._fetch(slot, control).addBoth(self._fetched, slot)
            elif now - slot.fetch_started > UNRESPONSIVE:
                # Its reactor is stuck: its clients get nothing either.
                self.misbehaving(slot, "has not answered the supervisor for %g s" % UNRESPONSIVE)

    @defer.inlineCallbacks
    def _fetch(self, slot: Slot, control: SupervisorControl) -> Any:
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
        if slot.process is not None and slot.process.control is control:
            slot.samples = families

    def _fetched(self, result: Any, slot: Slot) -> None:
        slot.fetching = False
        if isinstance(result, Failure) and slot.process is not None and not slot.process.ended:
            log.warn("worker {slot}: counters not read: {error}", slot=slot.index, error=result.getErrorMessage())

    def _keep_counters(self, slot: Slot) -> None:
        """A run ended: its last counters join the slot's base, so that sums never go back."""
        for name, type_, doc, samples in slot.samples:
            if type_ not in ("counter", "histogram"):
                continue
            base = slot.base.setdefault((name, type_, doc), {})
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                base[key] = base.get(key, 0.0) + value
        slot.samples = []


def _cancelling(result: Any, call: Any) -> Any:
    cancel_call(call)
    return result


def _describe_end(reason: Failure) -> str:
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            return "was killed by %s" % signal.Signals(sig).name
        except ValueError:
            return "was killed by signal %d" % sig
    return "exited with status %s" % (getattr(value, "exitCode", None),)


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


def build_supervisor(options: Any, reactor: Any, secret: str, top: Any) -> Any:
    """The services of a supervisor into ``top``: the pool, HTTP, portal and drain."""
    from twisted.application.service import Service as _Service

    from firezone_relay.adapters.http import Readiness
    from firezone_relay.adapters.metrics import make_registry  # noqa: F401 (process collectors below)
    from firezone_relay.service import _add_portal_and_drain, add_health

    count = options["workers"]
    size = options["highest-port"] - options["lowest-port"] + 1
    if size < count:
        raise SystemExit(
            "firezone-relay: --workers %d needs at least %d allocation ports; --lowest-port..--highest-port has %d"
            % (count, count, size)
        )
    if options.get("control-endpoint"):
        log.info("control endpoint: off with --workers above 1 (not supported yet)")
    if options.get("otlp-grpc-endpoint"):
        log.warn("OTLP export (--otlp-grpc-endpoint) is off with --workers above 1 (not supported yet)")
    class PoolReadiness(Readiness):
        """Serving while every worker is ready (whatever the portal's ``init`` sets)."""

        @property
        def serving(self) -> bool:
            return pool.all_ready

        @serving.setter
        def serving(self, value: bool) -> None:
            pass

    readiness = PoolReadiness(None, portal_required=bool(options["token"]))
    from firezone_relay.service import make_xdp_service

    # The XDP program starts before the workers (and so stops after them).
    xdp = make_xdp_service(options)
    if xdp is not None:
        xdp.setServiceParent(top)
    pool = WorkerPool(options, secret, count, readiness, reactor, serve_at_start=not options["token"], fast_path=xdp)
    readiness.relay = pool
    pool.setServiceParent(top)

    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    registry.register(WorkersCollector(pool, readiness))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    add_health(options, top, registry, readiness)

    class _Shell:  # what _add_portal_and_drain needs of a shell: the drain's view and start_serving
        relay = pool

        @staticmethod
        def watch_allocations(watcher: Callable[[], None]) -> None:
            pool.watch_allocations(watcher)

        @staticmethod
        def start_serving() -> None:
            pool.start_workers()

    _add_portal_and_drain(options, top, _Shell(), secret, readiness, reactor)

    class _Hangup(_Service):
        def startService(self) -> None:
            super().startService()
            reactor.callWhenRunning(signal.signal, signal.SIGHUP, self._hangup)

        def _hangup(self, signum: int, frame: Any) -> None:
            reactor.callFromThread(
                log.warn, "SIGHUP: reloading is not supported with --workers above 1 yet; ignored"
            )

    _Hangup().setServiceParent(top)
    return top


__all__ = ["WorkerPool", "WorkersCollector", "build_supervisor", "parse_workers", "slices"]
