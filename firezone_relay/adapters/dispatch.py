"""Event dispatch without the per-event log context, for the relay's own sockets.

Twisted's epoll reactor hands every ready descriptor to its selectable
through ``twisted.python.log.callWithLogger``: it asks the selectable for its
``logPrefix()``, pushes ``{"system": prefix}`` on the context stack, calls
``_doReadOrWrite`` and pops the context again.  That is about 3.8 µs per
event on this project's 2-core machine (a warm cache; more right after a
wake-up), while the relay's whole work on a datagram is a few µs.  When one
datagram or one stream message wakes the relay at a time (a paced client,
one message in flight on TCP/TLS, a flood), it is paid per packet.

``install(reactor)`` replaces ``doIteration`` on an ``EPollReactor`` with the
same loop, except that selectables whose type was registered with
``fast_type`` (the UDP ports and the TURN stream connections) are passed to
``_doReadOrWrite`` directly.  ``_doReadOrWrite`` already catches what a
``doRead`` raises, logs it and closes that selectable; what escapes it is
logged here and the other events of the poll are still dispatched.  What is
lost for those selectables only: the legacy ``system`` field of log events
emitted during their events (the relay's own log lines carry a namespace
and do not use it).  Every other selectable (HTTP, the portal websocket,
listening ports) keeps Twisted's dispatch.  Any other reactor is left as it
is, and so is an ``EPollReactor`` whose ``doPoll`` is not Twisted's own or
that lacks the private attributes the loop uses (another Twisted version).

``install`` also replaces the reactor's ``mainLoop`` (``_make_main_loop``)
with one that calls ``runUntilCurrent`` only when a timed call is due or a
thread queued one, and computes the poll timeout inline: Twisted's loop
makes about eight Python calls per wake-up before it polls, which a relay
woken once per packet pays per packet.

The stream connections' direct write (``direct_socket``, ``unsent``) is the
other use of Twisted's private parts, kept here beside it, guarded the same way.
"""

from __future__ import annotations

import errno
import select
import sys
from typing import Any, Callable, Optional, Set

from twisted.python import log

_FAST_TYPES: Set[type] = set()


def fast_type(kind: type) -> type:
    """Register ``kind`` (a selectable class) for direct dispatch; usable as a decorator."""
    _FAST_TYPES.add(kind)
    return kind


def direct_socket(transport: Any) -> Any:
    """The socket of a TCP ``transport`` that ``unsent`` can look into, or
    None (TLS's wrapper, another Twisted): then write through the transport.

    The stream connections write straight on the socket when Twisted holds
    nothing unsent (``StreamProtocol._write``): a loop iteration and two
    epoll_ctl calls less per write.  No public interface says whether a
    ``FileDescriptor`` holds unsent bytes (``IPushProducer`` only says when
    its buffer is full), so ``unsent`` reads its two private buffers; this
    guard keeps a Twisted without them on the public path."""
    if not all(hasattr(transport, name) for name in ("_tempDataLen", "dataBuffer")):
        return None
    return getattr(transport, "socket", None)


def unsent(transport: Any) -> bool:
    """Whether a transport ``direct_socket`` accepted holds bytes not yet sent."""
    return bool(transport._tempDataLen or transport.dataBuffer)


def _epoll_reactor_type() -> Any:
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return None
    return EPollReactor


def installed(reactor: Any) -> bool:
    return getattr(reactor, "_firezone_fast_dispatch", False) is True


def install(reactor: Any) -> bool:
    """Make ``reactor`` dispatch the registered types directly.  Returns
    whether it is (now or already) installed; idempotent."""
    if installed(reactor):
        return True
    epoll = _epoll_reactor_type()
    if epoll is None or type(reactor) is not epoll or type(reactor).doPoll is not epoll.doPoll:
        return False
    # The loop below uses these private parts of Twisted's reactor; a Twisted
    # without them keeps its own dispatch rather than failing at start-up.
    if not all(hasattr(reactor, name) for name in ("_poller", "_selectables", "_doReadOrWrite")):
        return False
    reactor.doIteration = _make_do_poll(reactor)
    if all(hasattr(reactor, name) for name in _MAIN_LOOP_PARTS) and None not in _base_logging():
        reactor.mainLoop = _make_main_loop(reactor)
    reactor._firezone_fast_dispatch = True
    return True


#: The private parts of Twisted's ``ReactorBase`` the main loop below uses.
_MAIN_LOOP_PARTS = ("_started", "_newTimedCalls", "_pendingTimedCalls", "_insertNewDelayedCalls", "threadCallQueue")

#: The longest poll timeout, as ``ReactorBase.timeout`` has it (epoll's int milliseconds).
_LONGEST = 2147483


def _base_logging() -> Any:
    """Twisted's handler of what escapes a main loop iteration and the
    logger of ``twisted.internet.base`` (None for either one missing)."""
    from twisted.internet import base

    return getattr(base, "_topHandler", None), getattr(base, "_log", None)


def _make_main_loop(reactor: Any) -> Callable[[], None]:
    """``ReactorBase.mainLoop``, without two calls per iteration that have
    nothing to do when no timed call is due (the common case for a relay
    woken by a packet): ``runUntilCurrent`` runs only when a timed call is
    due or a thread queued one, and ``timeout`` is computed inline.  Each
    wake-up saves about six Python calls (``runUntilCurrent``, ``timeout``,
    two ``_insertNewDelayedCalls``, the handler's ``__enter__`` and
    ``__exit__``).  What an iteration raises is logged by Twisted's own
    handler, as in ``mainLoop``, and the loop carries on."""
    top_handler, base_log = _base_logging()
    seconds = reactor.seconds
    run_until_current = reactor.runUntilCurrent
    insert_new = reactor._insertNewDelayedCalls

    def mainLoop() -> None:
        while reactor._started:
            with top_handler:
                while reactor._started:
                    if reactor._newTimedCalls:
                        insert_new()
                    pending = reactor._pendingTimedCalls
                    now = seconds()
                    if reactor.threadCallQueue or (pending and pending[0].time <= now):
                        run_until_current()
                        if reactor._newTimedCalls:
                            insert_new()
                        pending = reactor._pendingTimedCalls
                        now = seconds()
                    if pending:
                        delay = pending[0].time - now
                        timeout: Optional[float] = 0 if delay < 0 else delay if delay < _LONGEST else _LONGEST
                    else:
                        timeout = None
                    reactor.doIteration(reactor.running and timeout)
        base_log.info("Main loop terminated.")

    return mainLoop


def _make_do_poll(reactor: Any) -> Callable[[Optional[float]], None]:
    selectables = reactor._selectables
    do_read_or_write = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    fast = _FAST_TYPES  # the set itself: a type registered later counts too
    call_with_logger = log.callWithLogger
    readable = select.EPOLLIN

    def doPoll(timeout: Optional[float]) -> None:
        # Twisted's EPollReactor.doPoll, but for the registered types.
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = reactor._poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if type(selectable) in fast:
                try:
                    if event == readable and selectable.fileno() != -1:
                        # _doReadOrWrite's read case, inline: one call less per event.
                        try:
                            why = selectable.doRead()
                        except BaseException:
                            why = sys.exc_info()[1]
                            log.err()
                        if why:
                            disconnect(selectable, why, True)
                    else:
                        do_read_or_write(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.err(None, "error dispatching an event of %r" % (selectable,))
            else:
                call_with_logger(selectable, do_read_or_write, selectable, fd, event)

    return doPoll
