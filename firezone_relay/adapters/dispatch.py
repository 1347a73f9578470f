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

Two more savings for the registered types, which matter when one datagram
wakes the relay at a time (the paced case: ~1.6 µs of Python per wake-up
went to ``mainLoop``'s ``runUntilCurrent``/``timeout`` and
``_doReadOrWrite`` around a read of a few µs):

* a selectable whose ``direct_read`` is set (a UDP port: its batched read)
  has it called on a plain read event instead of ``_doReadOrWrite`` and
  ``doRead``; an exception from it is logged and the selectable closed, as
  ``_doReadOrWrite`` does;
* when every event of a poll went to a registered type, ``doPoll`` polls
  again itself instead of returning to ``mainLoop``, as long as no timed
  call is new (``callLater`` during the events) or due, no call from a
  thread is queued, the reactor is not stopping and the caller's timeout
  has not passed: exactly the cases in which ``mainLoop``'s turn would have
  done nothing before the next poll.  Any other selectable's event (the
  waker of ``callFromThread`` and of signals, HTTP, the portal) ends it.

When the C extension ``_udpio`` is built, the wait and the direct reads
of a poll's events run in ``_udpio.poll`` (``epoll_wait``; the
``direct_read`` of each leading event that has one is called there, a
failure handed back to be logged and closed as above), and so do the
checks above and the polls again while they pass; the events from the
first other one on come back in order to the loop here.  The same calls
in the same order, without a Python bytecode per datagram event or per
wake-up.

The stream connections' direct write (``direct_socket``) is the
other use of Twisted's private parts, kept here beside it, guarded the same way.
"""

from __future__ import annotations

import errno
from typing import Any, Callable, Optional, Set

from twisted.python import log
from twisted.python.failure import Failure

try:  # the optional C extension (setup.py): the poll and its direct reads in C
    from firezone_relay.adapters import _udpio as _udpio_module

    _c_poll: Optional[Callable[..., Any]] = _udpio_module.poll
except ImportError:  # not built: the same loop in Python
    _c_poll = None

_FAST_TYPES: Set[type] = set()


def fast_type(kind: type) -> type:
    """Register ``kind`` (a selectable class) for direct dispatch; usable as
    a decorator.  Its instances have a ``direct_read`` attribute: None, or a
    callable run instead of ``doRead`` on a plain read event (the class
    attribute is set to None here unless the class defines one)."""
    if not hasattr(kind, "direct_read"):
        kind.direct_read = None  # type: ignore[attr-defined]
    _FAST_TYPES.add(kind)
    return kind


def direct_socket(transport: Any) -> Any:
    """The socket of a TCP ``transport`` whose unsent bytes
    ``StreamProtocol._write`` can look into, or None (TLS's wrapper, another
    Twisted): then write through the transport.

    The stream connections write straight on the socket when Twisted holds
    nothing unsent (``StreamProtocol._write``): a loop iteration and two
    epoll_ctl calls less per write.  No public interface says whether a
    ``FileDescriptor`` holds unsent bytes (``IPushProducer`` only says when
    its buffer is full), so ``_write`` reads its two private buffers; this
    guard keeps a Twisted without them on the public path."""
    if not all(hasattr(transport, name) for name in ("_tempDataLen", "dataBuffer")):
        return None
    return getattr(transport, "socket", None)


def disconnect(reactor: Any, selectable: Any, why: BaseException) -> None:
    """What Twisted's ``_doReadOrWrite`` does after a read of ``selectable``
    returned or raised ``why``: remove it from the reactor and tell it the
    connection is lost.  For a ``direct_read``, which bypasses
    ``_doReadOrWrite``; the reactor's private ``_disconnectSelectable`` is
    called here only (no public interface ends a selectable that way)."""
    reactor._disconnectSelectable(selectable, why, True)


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
    reactor.doIteration = _make_do_poll(reactor, _c_poll)
    reactor._firezone_fast_dispatch = True
    return True


def _make_do_poll(reactor: Any, c_poll: Optional[Callable[..., Any]] = None) -> Callable[[Optional[float]], None]:
    """The ``doIteration`` that ``install`` puts on ``reactor``; with
    ``c_poll`` (``_udpio.poll``, what ``install`` passes when the extension
    is built) the wait and the direct reads of its events run in C: the
    same calls in the same order as the loop below, without a Python
    bytecode per event (per wake-up, this loop cost about as much as the
    relay's core on a ChannelData datagram)."""
    from select import EPOLLIN  # Linux only, as the EPollReactor this serves

    selectables = reactor._selectables
    do_read_or_write = reactor._doReadOrWrite
    fast = _FAST_TYPES  # the set itself: a type registered later counts too
    call_with_logger = log.callWithLogger
    poll = reactor._poller.poll
    epfd = reactor._poller.fileno() if c_poll is not None else -1
    seconds = reactor.seconds
    # The parts of the reactor's state that say "back to mainLoop" (below).
    inner_loop = all(
        hasattr(reactor, name) for name in ("_newTimedCalls", "_pendingTimedCalls", "threadCallQueue", "_justStopped")
    )

    # What c_poll needs to poll again itself (the checks below): the reactor.
    loop_state = reactor if inner_loop else None

    def direct_failed(selectable: Any, exc: BaseException) -> None:
        """A direct read raised ``exc`` (in ``c_poll`` or the loop below):
        log it and close the selectable, as ``_doReadOrWrite`` does after a
        failed ``doRead``."""
        log.err(Failure(exc, type(exc), exc.__traceback__), "error dispatching an event of %r" % (selectable,))
        try:
            disconnect(reactor, selectable, exc)
        except BaseException:
            log.err(None, "error closing %r" % (selectable,))

    def doPoll(timeout: Optional[float]) -> None:
        # Twisted's EPollReactor.doPoll, but for the registered types; and
        # while only they had events, poll again here (see the module
        # docstring) until mainLoop has something to do.
        if timeout is None or timeout < 0:
            timeout, end = -1, None  # wait indefinitely
        else:
            end = seconds() + timeout
        events: Any
        while True:
            if c_poll is not None:
                # The direct reads ran there, and so did the checks below
                # and the polls again while only direct reads had events
                # (an int: back to mainLoop).  What is left (from the first
                # other event on, in order) goes on here.
                got = c_poll(epfd, timeout, len(selectables), selectables, fast, direct_failed, loop_state, end)
                if type(got) is int:
                    return
                events = got
            else:
                try:
                    events = poll(timeout, len(selectables))
                except OSError as err:
                    if err.errno == errno.EINTR:
                        return
                    raise
                if not events:
                    return
            only_fast = True
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                if type(selectable) in fast:
                    direct = selectable.direct_read if event == EPOLLIN else None
                    try:
                        if direct is not None:
                            direct()
                        else:
                            do_read_or_write(selectable, fd, event)
                    except KeyboardInterrupt:
                        raise
                    except BaseException as exc:
                        if direct is not None:
                            # What _doReadOrWrite does after a failed doRead.
                            direct_failed(selectable, exc)
                        else:
                            log.err(None, "error dispatching an event of %r" % (selectable,))
                else:
                    only_fast = False
                    call_with_logger(selectable, do_read_or_write, selectable, fd, event)
            # Back to mainLoop (timed calls, calls from threads, stopping)
            # unless only the relay's sockets had events and none of that is due.
            if (
                not only_fast
                or timeout == 0
                or not inner_loop
                or reactor._newTimedCalls
                or reactor.threadCallQueue
                or reactor._justStopped
            ):
                return
            now = seconds()
            remaining = None if end is None else end - now
            pending = reactor._pendingTimedCalls
            if pending:
                due = pending[0].time - now
                if remaining is None or due < remaining:
                    remaining = due
            if remaining is None:
                timeout = -1
            elif remaining <= 0:
                return
            else:
                timeout = remaining

    return doPoll
