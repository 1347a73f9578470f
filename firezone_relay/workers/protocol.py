"""The supervisor <-> worker control channel: Twisted AMP commands.

Supervisor -> worker: ``Configure`` (the worker's whole configuration, the
secret included, as JSON; the answer means the worker serves), ``Counters``
(its metric samples, zlib-compressed JSON, in pages of at most ``PAGE``
bytes), ``Evict`` (delete the allocation on a port: its user's newer one
lives in another worker), ``Drain`` and ``Stop``.

Worker -> supervisor: ``AllocationNotices`` (a reactor turn's new and
removed allocations, port and username: the supervisor keeps
``--user-allocation-limit`` across the workers and counts allocations for
the drain), ``ChannelChanged`` (a UDP client's channel bound or unbound, for
the XDP maps).

Nothing here is on the per-packet path.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

from twisted.internet.protocol import connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

#: Bytes of one ``Counters`` page (AMP values hold at most 65535 bytes).
PAGE = 60000


class Configure(amp.Command):
    arguments = [(b"config", amp.Unicode())]
    response = [(b"pid", amp.Integer())]


class Counters(amp.Command):
    #: ``offset`` 0 takes a new snapshot; later pages continue it.
    arguments = [(b"offset", amp.Integer())]
    response = [(b"data", amp.String()), (b"total", amp.Integer())]


class Evict(amp.Command):
    arguments = [(b"port", amp.Integer())]
    response = [(b"evicted", amp.Boolean())]


class Drain(amp.Command):
    pass


class Stop(amp.Command):
    requiresAnswer = False


#: ``json.dumps`` for notices: compact, ASCII (a username's lone surrogates survive).
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def encode_notices(notices: Sequence[Sequence[Any]]) -> List[bytes]:
    """``notices`` (``[port, user]`` for a new allocation, ``[port]`` for a
    removed one, in order) as the values of as few ``AllocationNotices`` as
    fit: each at most ``PAGE`` bytes (an AMP value holds 65535), so that a
    turn that removes thousands of allocations (their common expiry) is
    several boxes rather than one the protocol refuses."""
    data = _dumps(notices).encode("ascii")
    if len(data) <= PAGE or len(notices) < 2:
        return [data]
    half = len(notices) // 2
    return encode_notices(notices[:half]) + encode_notices(notices[half:])


class Notices(amp.Argument):
    """A list of allocation notices as one JSON value (``encode_notices``;
    a list is encoded as it is).  Decoded: ``{"port": int, "user": str}`` for
    a new allocation, ``{"port": int, "user": None}`` for a removed one.

    One JSON value in place of an ``AmpList`` of boxes: with thousands of
    Allocates a second, parsing the ``AmpList`` was two fifths of the
    supervisor's CPU (``json`` does it in C)."""

    def toString(self, inObject: Any) -> bytes:
        if isinstance(inObject, bytes):
            return inObject
        return _dumps([[n["port"]] if n.get("user") is None else [n["port"], n["user"]] for n in inObject]).encode("ascii")

    def fromString(self, inString: bytes) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        notices = json.loads(inString)
        if type(notices) is not list:
            raise ValueError("allocation notices: not a list")
        for notice in notices:
            if type(notice) is not list or not 1 <= len(notice) <= 2 or type(notice[0]) is not int:
                raise ValueError("allocation notices: bad notice %r" % (notice,))
            user: Optional[str] = None
            if len(notice) == 2:
                user = notice[1]
                if type(user) is not str:
                    raise ValueError("allocation notices: bad user %r" % (user,))
            out.append({"port": notice[0], "user": user})
        return out


class AllocationNotices(amp.Command):
    """The new allocations (with their user) and the removed ones (``user``
    absent) of one reactor turn of a worker, in order: one
    box instead of one per allocation (with thousands of Allocates a second,
    a box each was a sixth of an Allocate's CPU in worker and supervisor),
    or a few when they do not fit in one AMP value (``encode_notices``)."""

    arguments = [(b"notices", Notices())]
    requiresAnswer = False


class ChannelChanged(amp.Command):
    """A channel ``bound`` (or unbound), for the XDP maps the supervisor owns
    (``--ebpf-offloading``)."""

    arguments = [
        (b"bound", amp.Boolean()),
        (b"client_ip", amp.Unicode()),
        (b"client_port", amp.Integer()),
        (b"channel", amp.Integer()),
        (b"peer_ip", amp.Unicode()),
        (b"peer_port", amp.Integer()),
        (b"port", amp.Integer()),
        (b"family", amp.Integer()),
    ]
    requiresAnswer = False


class QuietAMP(amp.AMP):
    """AMP without its "connection established/lost" log lines: the
    supervisor says when a worker starts and ends, with its pid."""

    def makeConnection(self, transport: Any) -> None:
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
