"""``firezone_relay.adapters.dispatch`` on real epoll reactors (not the one trial runs)."""

from __future__ import annotations

import socket
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

    def test_an_idle_poll_and_a_timeout(self) -> None:
        dispatch.install(self.reactor)
        self.reactor.doIteration(0)
        self.reactor.doIteration(0.001)
        self.assertEqual(self.flushLoggedErrors(), [])

