"""The supervisor's end of one worker's control channel (SPEC §9).

A ``WorkerProcess`` is one run of a worker process: Twisted AMP
(``SupervisorControl``, commands in ``protocol``) over the child's
stdin/stdout (``_Pipe``).  The channel is bounded: a worker's messages are
read at most at ``CONTROL_RATE`` per second, and handling them may take at
most ``CONTROL_SHARE`` of the supervisor's time (both with bursts of twice
that, ``Budget``); beyond, the supervisor stops reading that worker's pipe
until the budget refills (the worker's own writes wait), so a flooding
worker costs the supervisor a bounded share of its time and nothing else,
however fast or loaded the host.  What the messages mean is the pool's
(``supervisor.WorkerPool``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List

from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from firezone_relay.adapters._twisted import cancel_attributes
from firezone_relay.workers import protocol as P

if TYPE_CHECKING:
    from firezone_relay.workers.pool import Slot, WorkerPool

#: Far above a real worker's rate (two notices per allocation, two per
#: channel with XDP; a worker allocates a few thousand a second).
CONTROL_RATE = 20000.0
#: Seconds per second of the supervisor's time one worker's messages may take.
CONTROL_SHARE = 0.2


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

    @P.ChannelChanged.responder
    def channel_changed(self, bound: bool, **fields: Any) -> Dict[str, Any]:
        self.pool.channel_changed(self.slot, bound, fields)
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
        cancel_attributes(self, "_resume")
        self.control.connectionLost(reason)
        self.pool.worker_ended(self.slot, self, reason)

