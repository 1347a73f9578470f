"""The supervisor of ``--workers N`` (N > 1): the twistd process (``build_supervisor``).

Theory of operation (SPEC §9).  The supervisor relays nothing itself.  It

* creates every listening socket once, one per worker and listener, with
  ``SO_REUSEPORT``, and keeps them open for its whole life (``listeners``);
* spawns the workers (``worker.py``) with ``reactor.spawnProcess``, those
  sockets in ``childFDs`` and a Twisted AMP control channel on the child's
  stdin/stdout (``control``, ``protocol``); each gets a disjoint slice of
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
* bounds the control channel (``control``); a worker that breaks the
  protocol (an allocation outside its slice, a malformed message) is
  killed (and restarted);
* keeps ``--user-allocation-limit`` across workers from their allocation
  notices: when a user holds more than the limit, its oldest allocation is
  evicted (``Evict``) wherever it lives;
* serves ``/metrics`` from the workers' samples (fetched every
  ``COUNTER_INTERVAL`` seconds), summed; counters stay monotonic across a
  worker's restart (``counters``);
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

from typing import Any, Callable

from twisted.logger import Logger

from firezone_relay.adapters.http import Readiness
from firezone_relay.workers.counters import WorkersCollector
from firezone_relay.workers.pool import WorkerPool

log = Logger(namespace="firezone_relay.workers.supervisor")


class PoolReadiness(Readiness):
    """``serving`` while every worker of the pool (``relay``) is ready:
    derived, so what ``Readiness`` and the portal's ``init`` set is ignored."""

    @property
    def serving(self) -> bool:
        return bool(self.relay.all_ready)

    @serving.setter
    def serving(self, value: bool) -> None:
        pass


def build_supervisor(options: Any, reactor: Any, secret: str, top: Any) -> Any:
    """The services of a supervisor into ``top``: the pool, HTTP, portal and drain."""
    from firezone_relay.reload import ReloadService
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
    from firezone_relay.service import make_xdp_service

    # The XDP program starts before the workers (and so stops after them).
    xdp = make_xdp_service(options)
    if xdp is not None:
        xdp.setServiceParent(top)
    pool = WorkerPool(options, secret, reactor, fast_path=xdp)
    readiness = PoolReadiness(pool, portal_required=bool(options["token"]))
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

    # SIGHUP is answered (and the previous handler put back at stop) as the
    # single process's reload is, with a line saying it does nothing yet.
    ReloadService(lambda: log.warn("SIGHUP: reloading is not supported with --workers above 1 yet; ignored"), reactor).setServiceParent(top)
    return top

