"""The pool of ``--workers N`` (N > 1): spawns, configures, watches and
restarts the worker processes and keeps what is one per relay across them
(the user allocation limit, the drain's allocation count, the XDP channels,
the counters).  The theory of operation is in ``supervisor``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from firezone_relay.adapters._twisted import cancel_attributes, cancel_call
from firezone_relay.service import TRANSPORT_OPTIONS, relay_config, stream_limits
from firezone_relay.workers import protocol as P
from firezone_relay.workers.control import CONTROL_RATE, CONTROL_SHARE, SupervisorControl, WorkerProcess
from firezone_relay.workers.counters import fetch_counters, keep_counters
from firezone_relay.workers.listeners import Listeners, siblings
from firezone_relay.workers.options import slices

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
    #: the current run's channels in the XDP maps, by allocation port:
    #: port -> {(client, channel, peer, port, family)}
    channels: Dict[int, set[Tuple[Any, ...]]] = dataclasses.field(default_factory=dict)


class WorkerPool(Service):
    """The workers; see ``supervisor``'s docstring.  ``relay`` is the pool itself
    for the ``DrainController`` (it asks ``relay.allocation_count``)."""

    name = "workers"

    def __init__(self, options: Any, secret: str, reactor: Any, fast_path: Any = None) -> None:
        self.options = options
        self.count: int = options["workers"]
        #: In portal mode the workers start on the portal's first ``init`` (``start_workers``).
        self.serve_at_start = not options["token"]
        self.reactor = reactor
        #: The XDP service (``--ebpf-offloading``) whose maps the workers' channels feed, or None.
        self.fast_path = fast_path
        self.relay = self
        self.nonce_key = os.urandom(32)
        self.slots = [Slot(i, low, high) for i, (low, high) in enumerate(
            slices(options["lowest-port"], options["highest-port"], self.count)
        )]
        self.module = os.environ.get(WORKER_MODULE_ENV, "").strip() or WORKER_MODULE
        self.restarts_total = 0
        self.throttled_total = 0
        #: Read by the drain and ``/readyz`` (as ``Relay.draining``).
        self.draining = False
        self._stopping = False
        self._started = False
        self._watchers: List[Callable[[], None]] = []
        #: username -> {(slot index, port): None}, oldest first (a dict: removing
        #: one of a user's thousands of allocations is O(1), not a list's O(n))
        self._by_user: Dict[str, Dict[Tuple[int, int], None]] = {}
        self._counters = LoopingCall(self._fetch_all)
        self._counters.clock = reactor
        self._ended: Dict[int, defer.Deferred[None]] = {}
        sibling_ip = siblings(options)
        #: Every worker's core configuration but its slice (``worker_config``), made once.
        self.relay_config = dataclasses.replace(
            relay_config(options, secret),
            relay_lowest_port=options["lowest-port"],
            relay_highest_port=options["highest-port"],
            sibling_ip4=sibling_ip.get(4),
            sibling_ip6=sibling_ip.get(6),
        )
        self._max_channels = int(options.get("max-channels-per-allocation") or 256)
        self.listeners = Listeners(options)

    # --- the drain's view (as a single relay) ------------------------------------

    @property
    def allocation_count(self) -> int:
        return sum(len(slot.ports) for slot in self.slots)

    def start_draining(self) -> None:
        self.draining = True
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
            self.listeners.make(self.slots)

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
        self.listeners.make(self.slots)
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
            cancel_attributes(slot, "restart_call", "ready_call")
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
        self.listeners.close()
        return defer.gatherResults(waits, consumeErrors=True)

    # --- workers -------------------------------------------------------------------------

    def worker_config(self, slot: Slot) -> Dict[str, Any]:
        options = self.options
        config = dataclasses.replace(self.relay_config, lowest_port=slot.lowest, highest_port=slot.highest)
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "nonce_key"}
        levels = options["log-level"]
        limits = dataclasses.asdict(stream_limits(options, self.count))
        return {
            "slot": slot.index,
            "relay": fields,
            "nonce_key": self.nonce_key.hex(),
            "draining": self.draining,
            "udp_io": options["udp-io"],
            "transport": {name: options[name] for name in TRANSPORT_OPTIONS},
            "udp_fds": {k.split(":")[1]: fd for k, fd in slot.fds.items() if k.startswith("udp:")},
            "stream_fds": {k: fd for k, fd in slot.fds.items() if not k.startswith("udp:")},
            "stream_limits": limits,
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
        cancel_attributes(slot, "ready_call")
        slot.ready = True
        slot.ready_since = time.monotonic()
        log.info("worker {slot} ready (pid {pid})", slot=slot.index, pid=process.pid)
        self._fetch_all()  # its metric families exist from now on
        if self.draining:  # the drain began while it started
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
        cancel_attributes(slot, "ready_call")
        was_ready, slot.ready = slot.ready, False
        ran = time.monotonic() - (slot.ready_since if was_ready else process.started)
        slot.process = None
        keep_counters(slot)
        self._unbind_all(slot)
        for port in list(slot.ports):
            self._forget(slot, port)
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
        owned = self._by_user.setdefault(user, {})
        owned[(slot.index, port)] = None
        limit = self.options["user-allocation-limit"]
        while limit and len(owned) > limit:
            index, old = oldest = next(iter(owned))
            del owned[oldest]
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
            owned.pop((slot.index, port), None)
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
        held = slot.channels.get(port, set())
        if bound:
            if port not in slot.ports:
                return  # not (or no longer: just evicted) one of its allocations
            if key in held:
                return
            if len(held) >= self._max_channels:
                self.misbehaving(slot, "reported more channels on port %d than an allocation may hold" % port)
                return
            slot.channels.setdefault(port, held).add(key)
            if fast_path is not None:
                fast_path.channel_bound(C.ChannelBound(*key))
        elif key in held:
            held.discard(key)
            if not held:
                del slot.channels[port]
            if fast_path is not None:
                fast_path.channel_unbound(C.ChannelUnbound(*key))

    def _unbind_all(self, slot: Slot) -> None:
        """A worker died: its channels leave the kernel's maps with it."""
        from firezone_relay.core import commands as C

        channels, slot.channels = slot.channels, {}
        if self.fast_path is not None:
            for held in channels.values():
                for key in held:
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

    def _fetch(self, slot: Slot, control: SupervisorControl) -> "defer.Deferred[None]":
        def keep(families: List[Any]) -> None:
            if slot.process is not None and slot.process.control is control:
                slot.samples = families

        return fetch_counters(control).addCallback(keep)

    def _fetched(self, result: Any, slot: Slot) -> None:
        slot.fetching = False
        if isinstance(result, Failure) and slot.process is not None and not slot.process.ended:
            log.warn("worker {slot}: counters not read: {error}", slot=slot.index, error=result.getErrorMessage())


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
