"""The command union (core/commands.py): closed, frozen, and matchable."""

from __future__ import annotations

import dataclasses
from typing import get_args

from twisted.trial.unittest import SynchronousTestCase

from firezone_relay.core import commands as C


def _leaves(union: object) -> set[type]:
    out: set[type] = set()
    for arg in get_args(union):
        out |= _leaves(arg) if get_args(arg) else {arg}
    return out


def describe(command: C.Command) -> str:
    """What a shell does with each command, by ``match`` with positional patterns."""
    match command:
        case C.SendDatagram(port, family, destination, payload):
            return "send %d bytes from %d/%d to %s" % (len(payload), port, family, destination[0])
        case C.OpenPort(port, family, dont_fragment):
            return "open %d/%d df=%s" % (port, family, dont_fragment)
        case C.ClosePort(port, family):
            return "close %d/%d" % (port, family)
        case C.ChannelBound(client, channel, peer, port, family):
            return "bound %#x" % channel
        case C.ChannelUnbound(client, channel, peer, port, family):
            return "unbound %#x" % channel
        case C.PermissionAdded(client, port, peer_ip):
            return "permit " + peer_ip
        case C.PermissionRemoved(client, port, peer_ip):
            return "forbid " + peer_ip
        case C.AllocationCreated(client, username, port, relayed, lifetime):
            return "created %d" % port
        case C.AllocationDeleted(client, username, port, reason):
            return "deleted %d: %s" % (port, reason)
    raise AssertionError(command)


class CommandUnionTests(SynchronousTestCase):
    def test_every_command_class_is_in_the_union_and_frozen(self) -> None:
        defined = {
            value for value in vars(C).values()
            if isinstance(value, type) and dataclasses.is_dataclass(value) and not value.__name__.startswith("_")
        }
        self.assertEqual(_leaves(C.Command), defined)
        self.assertEqual(_leaves(C.ShellCommand) | _leaves(C.Notice), defined)
        self.assertEqual(_leaves(C.ShellCommand) & _leaves(C.Notice), set())
        for cls in defined:
            self.assertTrue(cls.__dataclass_params__.frozen, cls)  # type: ignore[attr-defined]

    def test_match_tells_every_command_apart(self) -> None:
        client, peer = ("198.51.100.7", 40000), ("203.0.113.9", 7000)
        cases = [
            (C.SendDatagram(3478, 4, client, b"abc"), "send 3 bytes from 3478/4 to 198.51.100.7"),
            (C.OpenPort(50000, 6, True), "open 50000/6 df=True"),
            (C.ClosePort(50000, 4), "close 50000/4"),
            (C.ChannelBound(client, 0x4000, peer, 50000, 4), "bound 0x4000"),
            (C.ChannelUnbound(client, 0x4000, peer, 50000, 4), "unbound 0x4000"),
            (C.PermissionAdded(client, 50000, "203.0.113.9"), "permit 203.0.113.9"),
            (C.PermissionRemoved(client, 50000, "203.0.113.9"), "forbid 203.0.113.9"),
            (C.AllocationCreated(client, "u", 50000, (("192.0.2.1", 50000),), 600), "created 50000"),
            (C.AllocationDeleted(client, "u", 50000, "expired"), "deleted 50000: expired"),
        ]
        for command, expected in cases:
            self.assertEqual(describe(command), expected)

    def test_bound_and_unbound_are_different_commands(self) -> None:
        client, peer = ("198.51.100.7", 40000), ("203.0.113.9", 7000)
        bound, unbound = C.ChannelBound(client, 0x4000, peer, 50000, 4), C.ChannelUnbound(client, 0x4000, peer, 50000, 4)
        self.assertNotEqual(bound, unbound)
        self.assertNotIsInstance(unbound, C.ChannelBound)
        self.assertNotEqual(C.PermissionAdded(client, 1, "x"), C.PermissionRemoved(client, 1, "x"))
        self.assertEqual(bound, C.ChannelBound(client, 0x4000, peer, 50000, 4))
        self.assertIn("ChannelUnbound", repr(unbound))
