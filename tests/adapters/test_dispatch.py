"""``firezone_relay.adapters.dispatch`` on real epoll reactors (not the one trial runs)."""

from __future__ import annotations

import socket
import time
from typing import Any, List, Tuple

from twisted.internet import selectreactor
from twisted.python import context, log
from twisted.trial import unittest

from firezone_relay.adapters import dispatch, stream, udp

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # not Linux
    EPollReactor = None  # type: ignore[assignment,misc]


class _Readable:
    """A minimal IReadDescriptor on one end of a socket pair."""

    def __init__(self, sock: socket.socket, seen: List[Tuple[str, Any]], fail: bool = False) -> None:
        self.sock = sock
        self.seen = seen
        self.fail = fail
        self.lost: List[Any] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "readable-%d" % self.fileno()

    def doRead(self) -> None:
        self.sock.recv(100)
        self.seen.append((type(self).__name__, context.get(log.ILogContext)["system"]))
        if self.fail:
            raise ZeroDivisionError("a doRead bug")

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)


class _Fast(_Readable):
    pass


class _FailingLoss(_Fast):
    def connectionLost(self, reason: Any) -> None:
        raise ValueError("connectionLost bug too")


dispatch.fast_type(_Fast)
dispatch.fast_type(_FailingLoss)


class DispatchTests(unittest.TestCase):
    def setUp(self) -> None:
        if EPollReactor is None:
            raise unittest.SkipTest("epoll is Linux only")
        self.reactor = EPollReactor()
        self.addCleanup(self._close, self.reactor)

    @staticmethod
    def _close(reactor: Any) -> None:
        reactor._poller.close()
        reactor.waker.connectionLost(None)

    def readable(self, kind: type, seen: List[Tuple[str, Any]], **kw: Any) -> Any:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        selectable = kind(ours, seen, **kw)
        self.reactor.addReader(selectable)
        self.addCleanup(self.reactor.removeReader, selectable)  # before the sockets close
        theirs.send(b"x")
        return selectable

    def test_registered_types_skip_the_log_context_and_others_keep_it(self) -> None:
        self.assertTrue(dispatch.install(self.reactor))
        seen: List[Tuple[str, Any]] = []
        plain = self.readable(_Readable, seen)
        self.readable(_Fast, seen)
        self.reactor.doIteration(0)
        self.assertEqual(sorted(seen), [("_Fast", "-"), ("_Readable", plain.logPrefix())])

    def test_without_it_every_type_gets_the_log_context(self) -> None:
        seen: List[Tuple[str, Any]] = []
        fast = self.readable(_Fast, seen)
        self.reactor.doIteration(0)
        self.assertEqual(seen, [("_Fast", fast.logPrefix())])

    def test_a_failing_selectable_is_closed_and_the_other_events_still_run(self) -> None:
        dispatch.install(self.reactor)
        seen: List[Tuple[str, Any]] = []
        failing = self.readable(_Fast, seen, fail=True)
        doubly = self.readable(_FailingLoss, seen, fail=True)
        self.readable(_Readable, seen)
        self.reactor.doIteration(0)
        self.assertEqual(sorted(name for name, _ in seen), ["_FailingLoss", "_Fast", "_Readable"])
        self.assertEqual(len(failing.lost), 1)  # Twisted's _doReadOrWrite closed it
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)  # escaped _doReadOrWrite: logged here
        self.assertNotIn(doubly, self.reactor.getReaders())

    def test_only_twisteds_own_epoll_reactor_and_only_once(self) -> None:
        self.assertFalse(dispatch.installed(self.reactor))
        self.assertTrue(dispatch.install(self.reactor))
        patched = self.reactor.doIteration
        self.assertTrue(dispatch.install(self.reactor))
        self.assertIs(self.reactor.doIteration, patched)
        other = selectreactor.SelectReactor()
        self.addCleanup(other.waker.connectionLost, None)
        self.assertFalse(dispatch.install(other))

        class Custom(EPollReactor):  # type: ignore[misc,valid-type]
            def doPoll(self, timeout: Any) -> None:
                pass

        custom = Custom()
        self.addCleanup(self._close, custom)
        self.assertFalse(dispatch.install(custom))

    def test_a_twisted_without_the_private_parts_keeps_its_dispatch(self) -> None:
        selectables = self.reactor._selectables
        del self.reactor._selectables
        try:
            self.assertFalse(dispatch.install(self.reactor))
            self.assertFalse(dispatch.installed(self.reactor))
        finally:
            self.reactor._selectables = selectables

    def test_the_relays_selectables_are_registered(self) -> None:
        self.assertIn(udp._Reader, dispatch._FAST_TYPES)
        self.assertIn(stream._StreamServer, dispatch._FAST_TYPES)

    def test_direct_read_replaces_doread_on_read_events(self) -> None:
        dispatch.install(self.reactor)
        seen: List[Tuple[str, Any]] = []
        fast = self.readable(_Fast, seen)
        direct: List[str] = []
        fast.direct_read = lambda: (fast.sock.recv(100), direct.append("direct"))
        self.reactor.doIteration(0)
        self.assertEqual(direct, ["direct"])
        self.assertEqual(seen, [])  # doRead was not called

    def test_a_failing_direct_read_is_logged_and_closes_its_selectable(self) -> None:
        dispatch.install(self.reactor)
        seen: List[Tuple[str, Any]] = []
        failing = self.readable(_Fast, seen)

        def boom() -> None:
            failing.sock.recv(100)
            raise ZeroDivisionError("a direct read bug")

        failing.direct_read = boom
        other = self.readable(_Readable, seen)
        self.reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(failing.lost), 1)
        self.assertIsInstance(failing.lost[0].value, ZeroDivisionError)
        self.assertNotIn(failing, self.reactor.getReaders())
        self.assertEqual(seen, [("_Readable", other.logPrefix())])  # the other event still ran

    def _chain(self, then: Any) -> Tuple[List[str], Any, Any]:
        """Two fast readables: reading the first makes the second readable
        (a new event for the next poll); reading the second calls ``then``."""
        order: List[str] = []
        a_ours, a_theirs = socket.socketpair()
        b_ours, b_theirs = socket.socketpair()
        for s in (a_ours, a_theirs, b_ours, b_theirs):
            self.addCleanup(s.close)
        a, b = _Fast(a_ours, []), _Fast(b_ours, [])

        def read_a() -> None:
            a_ours.recv(100)
            order.append("a")
            b_theirs.send(b"y")

        def read_b() -> None:
            b_ours.recv(100)
            order.append("b")
            then()

        a.direct_read, b.direct_read = read_a, read_b
        for r in (a, b):
            self.reactor.addReader(r)
            self.addCleanup(self.reactor.removeReader, r)
        a_theirs.send(b"x")
        return order, a, b

    def test_only_fast_events_are_polled_again_without_returning(self) -> None:
        """An event that a fast read causes is handled in the same
        ``doIteration``, and a ``callLater`` made by a read ends it."""
        dispatch.install(self.reactor)
        called: List[int] = []
        order, _, _ = self._chain(lambda: self.reactor.callLater(0, called.append, 1))
        started = time.monotonic()
        self.reactor.doIteration(5.0)
        self.assertLess(time.monotonic() - started, 4.0)  # returned at the callLater, not at the timeout
        self.assertEqual(order, ["a", "b"])  # both reads in one doIteration
        self.assertEqual(called, [])  # the timed call is mainLoop's: not run here
        self.reactor.runUntilCurrent()
        self.assertEqual(called, [1])

    def test_polling_again_keeps_the_callers_timeout(self) -> None:
        dispatch.install(self.reactor)
        order, _, _ = self._chain(lambda: None)
        started = time.monotonic()
        self.reactor.doIteration(0.2)
        elapsed = time.monotonic() - started
        self.assertEqual(order, ["a", "b"])
        self.assertGreaterEqual(elapsed, 0.15)  # waited on for more events, as asked
        self.assertLess(elapsed, 3.0)  # and returned once the timeout passed

    def test_polling_again_stops_for_a_due_timed_call(self) -> None:
        dispatch.install(self.reactor)
        self.reactor.callLater(0.1, lambda: None)
        self.reactor.runUntilCurrent()  # now pending, not new
        order, _, _ = self._chain(lambda: None)
        started = time.monotonic()
        self.reactor.doIteration(5.0)
        self.assertEqual(order, ["a", "b"])
        self.assertLess(time.monotonic() - started, 3.0)  # back for the timed call at ~0.1 s

    def test_another_selectables_event_ends_the_iteration(self) -> None:
        dispatch.install(self.reactor)
        seen: List[Tuple[str, Any]] = []
        plain_ours, plain_theirs = socket.socketpair()
        self.addCleanup(plain_ours.close)
        self.addCleanup(plain_theirs.close)
        plain = _Readable(plain_ours, seen)
        self.reactor.addReader(plain)
        self.addCleanup(self.reactor.removeReader, plain)
        order, _, _ = self._chain(lambda: plain_theirs.send(b"z"))
        started = time.monotonic()
        self.reactor.doIteration(5.0)
        self.assertLess(time.monotonic() - started, 4.0)
        self.assertEqual(order, ["a", "b"])
        self.assertEqual(seen, [("_Readable", plain.logPrefix())])

    def test_an_idle_poll_and_a_timeout(self) -> None:
        dispatch.install(self.reactor)
        self.reactor.doIteration(0)
        self.reactor.doIteration(0.001)
        self.assertEqual(self.flushLoggedErrors(), [])



class PythonLoopDispatchTests(DispatchTests):
    """The same, with the loop in Python (what runs when ``_udpio`` is not built)."""

    def setUp(self) -> None:
        super().setUp()
        self.patch(dispatch, "_c_poll", None)


class CPollTests(unittest.TestCase):
    """``_udpio.poll``: the wait and the direct reads of ``doPoll`` in C."""

    def setUp(self) -> None:
        if EPollReactor is None:
            raise unittest.SkipTest("epoll is Linux only")
        from firezone_relay.adapters import shell

        if shell._udpio is None:
            raise unittest.SkipTest("the _udpio extension is not built (CI builds it: test_udpio)")
        self.poll = shell._udpio.poll
        import select

        self.epoll = select.epoll()
        self.addCleanup(self.epoll.close)
        self.selectables: dict = {}
        self.order: List[Any] = []
        self.failures: List[Tuple[Any, BaseException]] = []

    def selectable(self, kind: type, name: str, direct: Any = "read") -> Tuple[Any, socket.socket]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        s = kind(ours, [])
        if direct == "read":
            s.direct_read = lambda: (ours.recv(100), self.order.append(name))
        elif direct is not None:
            s.direct_read = direct
        self.selectables[ours.fileno()] = s
        self.epoll.register(ours.fileno(), select_epollin())
        return s, theirs

    def run_poll(self, timeout: float = 0) -> Any:
        return self.poll(self.epoll.fileno(), timeout, 16, self.selectables, dispatch._FAST_TYPES,
                         lambda s, exc: self.failures.append((s, exc)))  # fmt: skip

    def test_direct_reads_run_here_and_the_rest_comes_back_in_order(self) -> None:
        a, a_peer = self.selectable(_Fast, "a")
        plain, plain_peer = self.selectable(_Readable, "plain", direct=None)
        b, b_peer = self.selectable(_Fast, "b")
        for peer in (a_peer, plain_peer, b_peer):  # epoll reports them in the order they became ready
            peer.send(b"x")
        rest = self.run_poll()
        self.assertEqual(self.order, ["a"])  # b comes after plain: left for the caller
        self.assertEqual(rest, [(plain.fileno(), select_epollin()), (b.fileno(), select_epollin())])

    def test_all_direct_gives_the_count_and_an_idle_poll_zero(self) -> None:
        pairs = [self.selectable(_Fast, name) for name in ("a", "b", "c")]
        for _, peer in pairs:
            peer.send(b"x")
        self.assertEqual(self.run_poll(), 3)
        self.assertEqual(self.order, ["a", "b", "c"])
        started = time.monotonic()
        self.assertEqual(self.run_poll(0.05), 0)  # nothing ready: waits for the timeout
        self.assertGreaterEqual(time.monotonic() - started, 0.04)

    def test_a_fast_type_without_a_direct_read_and_an_unknown_fd(self) -> None:
        unknown, unknown_peer = self.selectable(_Fast, "unknown")
        del self.selectables[unknown.fileno()]  # not the reactor's (any more): skipped
        slow, slow_peer = self.selectable(_Fast, "slow", direct=None)
        unknown_peer.send(b"x")
        slow_peer.send(b"x")
        self.assertEqual(self.run_poll(), [(slow.fileno(), select_epollin())])
        self.assertEqual(self.order, [])

    def test_a_failing_direct_read_goes_to_failed_and_the_next_event_runs(self) -> None:
        def boom() -> None:
            raise ZeroDivisionError("a direct read bug")

        bad, bad_peer = self.selectable(_Fast, "bad", direct=boom)
        good, good_peer = self.selectable(_Fast, "good")
        bad_peer.send(b"x")
        good_peer.send(b"x")
        self.assertEqual(self.run_poll(), 2)
        self.assertEqual([(s, type(e)) for s, e in self.failures], [(bad, ZeroDivisionError)])
        self.assertIsNotNone(self.failures[0][1].__traceback__)
        self.assertEqual(self.order, ["good"])

    def test_keyboard_interrupt_propagates(self) -> None:
        def interrupt() -> None:
            s.sock.recv(100)
            if not self.order:
                self.order.append("interrupted")
                raise KeyboardInterrupt()

        s, peer = self.selectable(_Fast, "ki", direct=interrupt)
        peer.send(b"x")
        self.assertRaises(KeyboardInterrupt, self.run_poll)
        self.assertEqual(self.failures, [])
        peer.send(b"x")
        self.assertEqual(self.run_poll(), 1)  # not left "polling": usable again

    def test_other_base_exceptions_go_to_failed(self) -> None:
        """As dispatch's Python loop (and Twisted's ``_doReadOrWrite``): only
        KeyboardInterrupt propagates; SystemExit from a direct read is handed
        to ``failed`` like an Exception."""

        def leave() -> None:
            raise SystemExit(3)

        s, peer = self.selectable(_Fast, "exit", direct=leave)
        peer.send(b"x")
        self.assertEqual(self.run_poll(), 1)
        self.assertEqual([(f, type(e)) for f, e in self.failures], [(s, SystemExit)])

    def test_bad_arguments(self) -> None:
        fd = self.epoll.fileno()
        with self.assertRaises(ValueError):
            self.poll(fd, 0, 0, {}, set(), print)
        with self.assertRaises(TypeError):
            self.poll(fd, 0, 4, [], set(), print)
        with self.assertRaises(TypeError):
            self.poll(fd, 0, 4, {}, set())
        with self.assertRaises(OSError):
            self.poll(self.fileno_of_a_closed_socket(), 0, 4, {}, set(), print)

    def fileno_of_a_closed_socket(self) -> int:
        s = socket.socket()
        fd = s.fileno()
        s.close()
        return fd

    def test_with_the_reactor_it_polls_again_until_a_check_fails(self) -> None:
        class State:
            _newTimedCalls: List[Any] = []
            threadCallQueue: List[Any] = []
            _justStopped = False
            _pendingTimedCalls: List[Any] = []
            seconds = staticmethod(time.time)

        state = State()
        a, a_peer = self.selectable(_Fast, "a")
        b, b_peer = self.selectable(_Fast, "b")
        a.direct_read = lambda: (a.sock.recv(100), self.order.append("a"), b_peer.send(b"y"))
        b.direct_read = lambda: (b.sock.recv(100), self.order.append("b"), setattr(state, "_justStopped", True))
        a_peer.send(b"x")
        started = time.monotonic()
        got = self.poll(self.epoll.fileno(), 5.0, 16, self.selectables, dispatch._FAST_TYPES, print, state,
                        time.time() + 5.0)  # fmt: skip
        self.assertEqual((got, self.order), (0, ["a", "b"]))  # b's event came from a second poll in the call
        self.assertLess(time.monotonic() - started, 4.0)  # returned at the check, not at the timeout
        # The caller's deadline: after a's read nothing comes; back when it passes.
        state._justStopped = False
        a.direct_read = lambda: (a.sock.recv(100), self.order.append("a"))
        a_peer.send(b"x")
        started = time.monotonic()
        got = self.poll(self.epoll.fileno(), 0.2, 16, self.selectables, dispatch._FAST_TYPES, print, state,
                        time.time() + 0.2)  # fmt: skip
        self.assertEqual((got, self.order[2:]), (0, ["a"]))
        self.assertGreaterEqual(time.monotonic() - started, 0.15)
        # A pending timed call that is due ends it at once; a new one too.
        a_peer.send(b"x")

        class Due:
            time = 0.0

        state._pendingTimedCalls = [Due()]
        self.assertEqual(self.poll(self.epoll.fileno(), 5.0, 16, self.selectables, dispatch._FAST_TYPES, print, state,
                                   None), 0)  # fmt: skip
        self.assertEqual(self.order[3:], ["a"])

    def test_install_uses_it(self) -> None:
        calls: List[int] = []
        real = self.poll

        def counting(*args: Any) -> Any:
            calls.append(1)
            return real(*args)

        self.patch(dispatch, "_c_poll", counting)
        reactor = EPollReactor()
        self.addCleanup(DispatchTests._close, reactor)
        self.assertTrue(dispatch.install(reactor))
        reactor.doIteration(0)
        self.assertEqual(calls, [1])


def select_epollin() -> int:
    import select

    return select.EPOLLIN
