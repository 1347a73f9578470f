"""Small helpers the adapters share: one copy each.

``Counts`` (a zero-default dict of counters), ``format_address`` (the log
form of a client or peer address), ``default_reactor`` (the global reactor,
imported only when no reactor was injected), ``LimitedLog`` (a log line
at most once per interval per kind, for events a remote party can cause at
will), ``SignalHandlers`` (signal handlers that run on the reactor thread)
and ``WhenRunningService`` (a service with work for when the reactor runs).
"""

from __future__ import annotations

import importlib
import signal
import time
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, TypeVar

from twisted.application.service import Service

K = TypeVar("K", bound=Hashable)

#: Seconds between two log lines of one rate-limited kind.
LOG_INTERVAL = 60.0


class Counts(Dict[K, int]):
    """Counters by key; an unknown key reads as 0 (and is not stored)."""

    def __missing__(self, key: K) -> int:
        return 0


def format_address(address: Sequence[Any]) -> str:
    """``1.2.3.4:5`` or ``[::1]:5``; a stream client's connection id (the
    third item) is left out."""
    ip, port = address[0], address[1]
    return "[%s]:%d" % (ip, port) if ":" in ip else "%s:%d" % (ip, port)


def default_reactor(reactor: Optional[Any] = None) -> Any:
    """``reactor`` if given, else Twisted's global reactor (imported late,
    so that importing an adapter never installs one)."""
    if reactor is not None:
        return reactor
    from twisted.internet import reactor as global_reactor

    return global_reactor


class LimitedLog:
    """Decides whether a line of a given kind may be logged now: at most once
    per ``interval`` seconds (monotonic time) per kind."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: Dict[Hashable, float] = {}

    def due(self, kind: Hashable) -> bool:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is None or now - last >= self.interval:
            self._last[kind] = now
            return True
        return False

    def count(self, counts: Dict[K, int], kind: K) -> bool:
        """Count one more ``kind`` in ``counts`` (errors by kind); whether a
        line about it is due now."""
        counts[kind] += 1
        return self.due(kind)


def cancel_call(call: Optional[Any]) -> None:
    """Cancel a ``DelayedCall`` unless it is None, has run or was cancelled."""
    if call is not None and call.active():
        call.cancel()


class OneTimer:
    """The single ``DelayedCall`` of a sans-IO state machine that asks for an
    absolute deadline (``poll_timeout()``): ``arm(deadline)`` moves it
    (``reset``, not a new call), ``arm(None)`` or ``cancel()`` drops it.
    When it fires, ``fire(now)`` runs with ``now`` never before the deadline
    asked for (a clock may run a call a little early)."""

    def __init__(self, clock: Any, fire: Callable[[float], None]) -> None:
        self.clock = clock
        self.fire = fire
        #: The deadline the call is armed for, or None.
        self.deadline: Optional[float] = None
        self._call: Any = None

    @property
    def armed(self) -> bool:
        return self._call is not None

    def arm(self, deadline: Optional[float]) -> None:
        if deadline == self.deadline and (deadline is None or self._call is not None):
            return
        self.deadline = deadline
        if deadline is None:
            self.cancel()
            return
        delay = max(0.0, deadline - self.clock.seconds())
        call = self._call
        if call is not None and call.active():
            call.reset(delay)
        else:
            self._call = self.clock.callLater(delay, self._fired)

    def retry_in(self, seconds: float) -> None:
        """Fire again after ``seconds`` unless armed meanwhile (after a
        failed ``fire``: do not spin on the same deadline, do not stop)."""
        if self._call is None:
            self.deadline = None
            self._call = self.clock.callLater(seconds, self._fired)

    def cancel(self) -> None:
        call, self._call = self._call, None
        self.deadline = None
        cancel_call(call)

    def _fired(self) -> None:
        self._call = None
        deadline, self.deadline = self.deadline, None
        now = self.clock.seconds()
        if deadline is not None and deadline > now:
            now = deadline  # the machine never sees a time before the deadline it asked for
        self.fire(now)


def cancel_attributes(owner: Any, *names: str) -> None:
    """Set each named attribute of ``owner`` (a ``DelayedCall`` or None) to
    None and cancel the call it held."""
    for name in names:
        call = getattr(owner, name)
        setattr(owner, name, None)
        cancel_call(call)


def import_failure(*modules: str) -> str:
    """Why one of ``modules`` cannot be imported, or "" when all can (an
    optional dependency or extension, checked at start-up)."""
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError as exc:
        return str(exc) or "import failed"
    return ""


class ListenerService(Service):
    """A service whose listeners open in ``privilegedStartService``, before
    the reactor runs (and before twistd drops privileges), so that a port
    that cannot be bound stops twistd at start-up with the reason; and again
    at ``startService`` when used without ``privilegedStartService`` (tests).
    ``open_listeners`` must therefore do nothing for what is already open."""

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.open_listeners()

    def startService(self) -> None:
        super().startService()
        self.open_listeners()

    def open_listeners(self) -> None:
        raise NotImplementedError


class WhenRunningService(Service):
    """A service with work to do once the reactor runs: ``when_running()``,
    from ``reactor.callWhenRunning`` (after every service has started, and
    after twistd's own signal handlers, which the reactor installs "during
    startup"), unless the service was stopped before that."""

    reactor: Any

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._reactor_running)

    def _reactor_running(self) -> None:
        if self.running:
            self.when_running()

    def when_running(self) -> None:
        raise NotImplementedError


class SignalHandlers:
    """Handlers of ``signals`` that hop to the reactor thread, as Twisted's
    own do, and run ``handle(signum)`` there.  A service calls ``install``
    from ``reactor.callWhenRunning`` (after twistd's own handlers, which the
    reactor installs "during startup"); ``uninstall`` gives the previous
    handlers back."""

    def __init__(self, reactor: Any, signals: Sequence[int], handle: Callable[[int], None]) -> None:
        self.reactor = reactor
        self.signals = tuple(signals)
        self.handle = handle
        self._previous: Dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        if self._previous:
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.handle, signum)
