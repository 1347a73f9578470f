"""The pump's datagrams leave together (issue 19: one ``sendto`` per Allocate
success was a fifth of an Allocate's CPU in the profile).

With the batched I/O, the ``SendDatagram`` commands of one pump are sent by
``io.send`` in sendmmsg calls at its end; what is queued for a port that
closes leaves before it closes; without the extension, each is sent at once
as before.  Real sockets on loopback.
"""

from __future__ import annotations

import socket
from typing import Any, List, Tuple

from twisted.application.service import Service
from twisted.internet import task
from twisted.trial import unittest

from firezone_relay.adapters import shell as shell_module
from firezone_relay.core import commands as C
from tests.adapters.test_udp import _FakeRelay, _udp
from tests.helpers import free_udp_port, unavailable


def receivers(n: int) -> List[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        socks.append(s)
    return socks


class PumpSendTests(unittest.TestCase):
    batched_io = True

    def setUp(self) -> None:
        if self.batched_io and shell_module._udpio is None:
            unavailable(self, "the _udpio extension is not built (python setup.py build_ext --inplace)")
        self.fake = _FakeRelay()
        self.service = _udp(self.fake, 0, bind_ip4="127.0.0.1", clock=task.Clock(), batched_io=self.batched_io)
        self.service.open_listeners()
        self.addCleanup(self.service.stopService)
        self.shell = self.service.shell
        self.socks = receivers(4)
        for s in self.socks:
            self.addCleanup(s.close)

    def stats(self) -> Tuple[int, int]:
        if self.shell.io is None:
            return (0, 0)
        s = self.shell.io.stats()
        return s["sent"], s["send_calls"]

    def dest(self, i: int) -> Any:
        return self.socks[i].getsockname()

    def received(self, i: int) -> Tuple[bytes, int]:
        data, source = self.socks[i].recvfrom(2048)
        return data, source[1]

    def test_replies_of_one_pump_leave_together(self) -> None:
        listen = self.service.listen_port
        self.fake.commands = [C.SendDatagram(listen, 4, self.dest(i), b"reply %d" % i) for i in range(4)]
        self.fake.commands.insert(2, C.AllocationCreated(("127.0.0.1", 1), "user", 1, (("127.0.0.1", 1),), 600))
        sent0, calls0 = self.stats()
        self.shell.pump()
        for i in range(4):
            self.assertEqual(self.received(i), (b"reply %d" % i, listen))
        sent1, calls1 = self.stats()
        if self.batched_io:
            self.assertEqual((sent1 - sent0, calls1 - calls0), (4, 1))
        self.assertEqual(sum(self.shell.drops.values()), 0)

    def test_what_a_closing_port_sends_leaves_before_it_closes(self) -> None:
        listen = self.service.listen_port
        port = free_udp_port((4,))
        self.fake.commands = [C.OpenPort(port, 4)]
        self.shell.pump()
        self.assertEqual(self.fake.port_results, [(port, 4, True)])
        self.fake.commands = [
            C.SendDatagram(listen, 4, self.dest(0), b"before"),
            C.SendDatagram(port, 4, self.dest(1), b"from the port"),
            C.ClosePort(port, 4),
            C.SendDatagram(listen, 4, self.dest(2), b"after"),
            C.SendDatagram(listen, 4, self.dest(3), b"after too"),
        ]
        sent0, calls0 = self.stats()
        self.shell.pump()
        self.assertEqual(self.received(0), (b"before", listen))
        self.assertEqual(self.received(1), (b"from the port", port))
        self.assertEqual(self.received(2), (b"after", listen))
        self.assertEqual(self.received(3), (b"after too", listen))
        self.assertEqual(sum(self.shell.drops.values()), 0, self.shell.drops)
        sent1, calls1 = self.stats()
        if self.batched_io:
            self.assertEqual((sent1 - sent0, calls1 - calls0), (4, 3))  # 1 + 1 before the close, 2 after

    def test_close_of_another_port_does_not_flush(self) -> None:
        listen = self.service.listen_port
        port = free_udp_port((4,))
        self.fake.commands = [C.OpenPort(port, 4)]
        self.shell.pump()
        self.fake.commands = [
            C.SendDatagram(listen, 4, self.dest(0), b"one"),
            C.ClosePort(port, 4),
            C.SendDatagram(listen, 4, self.dest(1), b"two"),
        ]
        sent0, calls0 = self.stats()
        self.shell.pump()
        self.assertEqual(self.received(0), (b"one", listen))
        self.assertEqual(self.received(1), (b"two", listen))
        sent1, calls1 = self.stats()
        if self.batched_io:
            self.assertEqual((sent1 - sent0, calls1 - calls0), (2, 1))

    def test_a_failing_send_is_counted_and_the_rest_still_goes(self) -> None:
        listen = self.service.listen_port
        self.fake.commands = [
            C.SendDatagram(listen, 4, self.dest(0), b"x" * 70000),  # too big
            C.SendDatagram(listen + 1 if listen < 65535 else listen - 1, 4, self.dest(1), b"no socket"),
            C.SendDatagram(listen, 4, self.dest(2), b"fine"),
        ]
        self.shell.pump()
        self.assertEqual(self.received(2), (b"fine", listen))
        self.assertEqual(self.shell.drops["send_too_big"], 1)
        self.assertEqual(self.shell.drops["no_socket"], 1)


    def test_a_stream_clients_reply_keeps_its_place(self) -> None:
        events: List[Any] = []

        class Stream(Service):
            def send(self, destination: Any, payload: bytes) -> None:
                events.append(("send", destination, payload))

            def allocation_event(self, command: Any) -> None:
                events.append(("event", type(command).__name__))

            def transport_of(self, client: Any) -> str:
                return "tcp"

            def begin_read(self) -> None:
                pass

            def end_read(self) -> None:
                pass

            def open_listeners(self) -> None:
                pass

        self.shell.attach_stream(Stream())
        listen = self.service.listen_port
        client = ("127.0.0.1", 40000, 7)
        self.fake.commands = [
            C.SendDatagram(listen, 4, self.dest(0), b"udp"),
            C.SendDatagram(listen, 4, client, b"reply"),
            C.AllocationDeleted(client, "user", 1, "refresh"),
        ]
        self.shell.pump()
        self.assertEqual(events, [("send", client, b"reply"), ("event", "AllocationDeleted")])
        self.assertEqual(self.received(0), (b"udp", listen))


class PythonIOPumpSendTests(PumpSendTests):
    """The same behaviour without the extension: each sent at once."""

    batched_io = False
