"""Closing allocation ports (issue 19: a Refresh LIFETIME 0 cost a Deferred
and a timed call per port).  The sockets closed in one reactor turn close
together at the start of the next, with one timed call; reads stop at once.
Real sockets on loopback, the real reactor."""

from __future__ import annotations

import os
import socket
from typing import Any, List

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.adapters.test_udp import _FakeRelay, _udp
from tests.helpers import free_udp_port


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class PortCloseTests(unittest.TestCase):
    timeout = 15

    def setUp(self) -> None:
        self.fake = _FakeRelay()
        self.service = _udp(self.fake, 0, bind_ip4="127.0.0.1")
        self.addCleanup(self.service.stopService)
        # Ports free right now (another test worker may hold any fixed window).
        self.ports: List[int] = []
        while len(self.ports) < 10:
            port = free_udp_port((4,))
            if port not in self.ports and self.service.open_port(port, 4, False):
                self.ports.append(port)

    @defer.inlineCallbacks
    def test_ports_closed_in_one_turn_close_together_at_the_next(self) -> Any:
        service = self.service
        fds = [service.shell.fds[4][p] for p in self.ports]
        readers = [service._ports[(p, 4)] for p in self.ports]
        calls_before = len(reactor.getDelayedCalls())
        for port in self.ports[:7]:
            service.close_port(port, 4)
        # Gone at once for senders and for the reactor; one timed call for all seven.
        self.assertEqual(len(reactor.getDelayedCalls()) - calls_before, 1)
        for port, reader in zip(self.ports[:7], readers):
            self.assertNotIn(port, service.shell.fds[4])
            self.assertNotIn(reader, reactor.getReaders())
        self.assertEqual(service.port_numbers(), sorted((p, 4) for p in self.ports[7:]))
        # The descriptors stay open until the next turn (no reuse of a number
        # a read in progress may still use), then all close.
        self.assertTrue(all(fd_open(fd) for fd in fds[:7]))
        yield task.deferLater(reactor, 0, lambda: None)
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertFalse(any(fd_open(fd) for fd in fds[:7]))
        self.assertTrue(all(fd_open(fd) for fd in fds[7:]))
        self.assertIsNone(service._to_close_done)
        # The port numbers are free again (unless another worker took one meanwhile).
        reopened = [port for port in self.ports[:7] if service.open_port(port, 4, False)]
        self.assertGreaterEqual(len(reopened), 5, reopened)

    def test_allocation_sockets_are_non_blocking(self) -> None:
        for port in self.ports:
            reader = self.service._ports[(port, 4)]
            self.assertFalse(reader.socket.getblocking())
            self.assertEqual(reader.socket.gettimeout(), 0.0)
            self.assertFalse(reader._v6)

    @defer.inlineCallbacks
    def test_stop_waits_for_pending_closes(self) -> Any:
        service = self.service
        fds = [service.shell.fds[4][p] for p in self.ports]
        service.close_port(self.ports[0], 4)
        yield service.stopService()
        self.assertFalse(any(fd_open(fd) for fd in fds))
        self.assertEqual(service.port_numbers(), [])
        self.assertIsNone(service._to_close_done)

    @defer.inlineCallbacks
    def test_a_closed_port_reads_nothing_more(self) -> Any:
        service = self.service
        port = self.ports[0]
        seen: List[Any] = []
        service.shell.handle_peer_traffic = lambda *args: seen.append(args)  # type: ignore[method-assign]
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        sender.sendto(b"before", ("127.0.0.1", port))
        for _ in range(50):
            if seen:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(seen), 1)
        service.close_port(port, 4)
        sender.sendto(b"after", ("127.0.0.1", port))
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(seen), 1)
