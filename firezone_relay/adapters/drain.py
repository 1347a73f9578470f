"""Process life cycle: the SIGTERM drain and the process exit status.

Drain (SPEC §6, "pattern B" of the style anchors §3.6).  twistd installs its
own SIGTERM/SIGINT handlers while the reactor starts ("during startup") and
turns a signal into ``reactor.stop()`` followed by re-raising the signal on
itself (exit status 143).  ``DrainController`` replaces them from
``reactor.callWhenRunning`` ("after startup"), so the last word is ours:

- first SIGTERM or SIGINT: the core refuses new Allocates (508) and keeps
  serving everything else; the portal websocket is closed cleanly and not
  reopened (the portal stops handing this relay to clients); ``draining``
  turns true (``/readyz`` 503, ``relay_draining``); the process stops with
  status 0 as soon as no allocation is left (at once if there is none);
- ``--drain-timeout`` bounds the wait: then it stops with status 0 too, like
  upstream's relay, which always exits 0 on SIGTERM — the timeout is the
  operator's chosen end of a drain, not a failure, and a non-zero status
  would make ``Restart=on-failure`` start a relay nobody asked for;
- a second signal stops at once, also with status 0 (upstream: "Forcing
  shutdown on repeated SIGTERM", ``Ok``).

"No allocation left" is checked whenever the relay service reports that an
allocation came or went, from a ``callLater(0)`` so that the pump that
deleted it has sent every datagram it produced (the Refresh response with
LIFETIME 0 included) before the reactor stops.

Exit status.  twistd has no way to say "exit 1": after the reactor stops it
returns normally (0) unless a signal was recorded.  ``ProcessControl.stop``
with a non-zero status therefore stops the reactor as usual (every
``stopService`` runs, twistd logs "Main loop terminated" and removes its
pidfile) and registers an ``atexit`` hook, which runs after twistd has
returned: it runs the other ``atexit`` hooks itself (coverage, logging),
flushes stdout/stderr and ends the process with ``os._exit(status)``.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import Any, Optional, Sequence

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from firezone_relay.adapters._twisted import SignalHandlers, WhenRunningService, cancel_attributes, default_reactor

log = Logger(namespace="firezone_relay.adapters.drain")

#: While draining, the allocation count is also looked at this often.
POLL_INTERVAL = 1.0


class ProcessControl:
    """Stops the reactor once, and makes the process exit with a status."""

    def __init__(self, reactor: Any = None) -> None:
        reactor = default_reactor(reactor)
        self.reactor = reactor
        self.exit_code: Optional[int] = None

    def stop(self, code: int = 0) -> None:
        """Stop the reactor; the process exits with ``code`` (the first call wins)."""
        if self.exit_code is not None:
            return
        self.exit_code = code
        if code != 0:
            atexit.register(_exit_with, code)
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def fail(self, reason: str) -> None:
        """A fatal error: exit status 1 (the reason is already logged)."""
        self.stop(1)


def _exit_with(code: int) -> None:
    atexit.unregister(_exit_with)
    try:
        atexit._run_exitfuncs()  # the hooks registered before ours (coverage, logging)
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        os._exit(code)


class DrainController(WhenRunningService):
    """First SIGTERM/SIGINT drains, the second stops; see the module docstring.

    ``relay_service`` is the ``RelayService`` (its ``relay`` is the core; it
    calls ``allocations_changed``, registered with ``watch_allocations``).
    ``portal`` is the ``PortalClient`` or ``None`` in standalone mode;
    ``readiness`` (``http.Readiness``, optional) gets ``draining``.
    ``process.stop(code)`` ends the process.
    """

    name = "drain"

    def __init__(
        self,
        relay_service: Any,
        process: ProcessControl,
        portal: Any = None,
        readiness: Any = None,
        drain_timeout: Optional[float] = None,
        reactor: Any = None,
        clock: Any = None,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
    ) -> None:
        reactor = default_reactor(reactor)
        self.relay_service = relay_service
        self.relay = relay_service.relay
        self.process = process
        self.portal = portal
        self.readiness = readiness
        self.drain_timeout = drain_timeout
        self.reactor = reactor
        self.clock = reactor if clock is None else clock
        self.signals = tuple(signals)
        self.draining = False
        self.signal_count = 0
        self._handlers = SignalHandlers(reactor, self.signals, self.handle_signal)
        self._check_call: Any = None
        self._timeout_call: Any = None
        self._poll_call: Any = None
        self._stopping = False
        relay_service.watch_allocations(self.allocations_changed)

    # --- life cycle -----------------------------------------------------------

    def stopService(self) -> None:
        super().stopService()
        self._cancel(("_check_call", "_timeout_call", "_poll_call"))
        if self.process.exit_code is None:
            # Stopped from outside (tests): give the signals back.  When the
            # process is going down our handlers stay: twistd's would turn a
            # late SIGTERM into exit status 143.
            self._handlers.uninstall()

    def when_running(self) -> None:
        # After twistd's own handlers (WhenRunningService), so ours win.
        if not self._handlers.installed:
            self._handlers.install()
            log.debug("drain signal handlers installed")

    # --- the drain --------------------------------------------------------------

    def handle_signal(self, signum: int) -> None:
        self.signal_count += 1
        name = _signal_name(signum)
        if self.signal_count == 1:
            self.start_draining(name)
        elif not self._stopping:
            log.warn(
                "{signal} again: stopping now with {allocations} allocations",
                signal=name,
                allocations=self.relay.allocation_count,
            )
            self._stop()

    def start_draining(self, why: str = "drain") -> None:
        if self.draining:
            return
        self.draining = True
        self.relay.start_draining()
        if self.readiness is not None:
            self.readiness.draining = True
        log.info(
            "{why}: draining {allocations} allocations (new Allocates get 508; "
            "send the signal again to stop at once{limit})",
            why=why,
            allocations=self.relay.allocation_count,
            limit="; stopping after %g s at the latest" % self.drain_timeout if self.drain_timeout is not None else "",
        )
        if self.portal is not None:
            self.portal.close()
        if self.drain_timeout is not None:
            self._timeout_call = self.clock.callLater(self.drain_timeout, self._timed_out)
        self._poll_call = self.clock.callLater(POLL_INTERVAL, self._poll)
        self.check()

    def allocations_changed(self) -> None:
        """Called by the relay service whenever an allocation is created or deleted."""
        if self.draining and self._check_call is None and not self._stopping:
            self._check_call = self.clock.callLater(0, self._deferred_check)

    def _deferred_check(self) -> None:
        self._check_call = None
        self.check()

    def _poll(self) -> None:
        # A safety net for deletions that no ``watch_allocations`` hook
        # reported (an adapter other than the UDP service pumping the core).
        self._poll_call = None
        self.check()
        if not self._stopping:
            self._poll_call = self.clock.callLater(POLL_INTERVAL, self._poll)

    def check(self) -> None:
        if self.draining and not self._stopping and self.relay.allocation_count == 0:
            log.info("drained: no allocation left, stopping")
            self._stop()

    def _timed_out(self) -> None:
        self._timeout_call = None
        if not self._stopping:
            log.warn(
                "drain timeout ({timeout} s): stopping with {allocations} allocations left",
                timeout=self.drain_timeout,
                allocations=self.relay.allocation_count,
            )
            self._stop()

    def _stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._cancel(("_check_call", "_timeout_call", "_poll_call"))
        self.process.stop(0)

    def _cancel(self, names: Sequence[str]) -> None:
        cancel_attributes(self, *names)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum

