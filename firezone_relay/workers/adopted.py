"""A worker's shell and transports: today's, on sockets the supervisor made.

``AdoptedRelayService`` and ``AdoptedStreamService`` are the UDP and stream
transports of a single-process relay, except that their listeners are the
descriptors the supervisor passed (``SO_REUSEPORT`` sockets, one per worker
and per listener, so that the kernel keeps a client's 5-tuple on one worker
even while a worker restarts).  Allocation ports are the worker's own, in its
slice of the range, bound as usual.

``WorkerShell`` is the shell, which also tells the supervisor when an
allocation comes or goes, and, behind 1:1 NAT (the public address is not
the host's), gives a datagram from another worker's allocation port (sent
to the local ``sibling`` address, see ``core.peers``) the public address
as its source, so that the permission the client installed for it matches.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Dict, Tuple

from firezone_relay.adapters.shell import Shell
from firezone_relay.adapters.stream import StreamService
from firezone_relay.adapters.udp import RelayService

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


class WorkerShell(Shell):
    """``Shell`` plus the allocation notices and the sibling source mapping."""

    def __init__(self, relay: Any, on_allocation: Callable[[Any], None], **kwargs: Any) -> None:
        super().__init__(relay, **kwargs)
        self._on_allocation = on_allocation
        config = relay.config
        low = config.relay_lowest_port or config.lowest_port
        high = config.relay_highest_port or config.highest_port
        #: family -> (the local address another worker's allocation port
        #: sends from, the public address the client's permission names)
        siblings = {
            family: (local, public)
            for family, local, public in ((4, config.sibling_ip4, config.public_ip4), (6, config.sibling_ip6, config.public_ip6))
            if local is not None
        }
        if siblings:
            core_entry = self.handle_peer_traffic

            def from_sibling(data: Any, peer: Any, port: int, family: int, now: float) -> Any:
                mapping = siblings.get(family)
                if mapping is not None and peer[0] == mapping[0] and low <= peer[1] <= high:
                    peer = (mapping[1], peer[1])
                return core_entry(data, peer, port, family, now)

            self.handle_peer_traffic = from_sibling

    def _allocation_changed(self, command: Any) -> None:
        super()._allocation_changed(command)
        try:
            self._on_allocation(command)
        except Exception as exc:  # the control channel is gone: we stop soon anyway
            self.internal_error("control", exc)


class AdoptedRelayService(RelayService):
    """The UDP transport on the listen sockets ``fds`` (family -> descriptor)."""

    def __init__(self, shell: Shell, fds: Dict[int, int], **kwargs: Any) -> None:
        self.fds = dict(fds)
        super().__init__(shell, **kwargs)

    def _listen_socket(self, family: int) -> socket.socket:
        sock = socket.socket(_AF[family], socket.SOCK_DGRAM, fileno=self.fds.pop(family))
        sock.setblocking(False)
        return sock


class AdoptedStreamService(StreamService):
    """The stream transport on the listen sockets ``fds`` ((transport, family) -> descriptor)."""

    def __init__(self, shell: Shell, fds: Dict[Tuple[str, int], int], **kwargs: Any) -> None:
        self.fds = dict(fds)
        super().__init__(shell, **kwargs)

    def _listen_socket(self, transport_name: str, family: int, port: int) -> socket.socket:
        return socket.socket(_AF[family], socket.SOCK_STREAM, fileno=self.fds.pop((transport_name, family)))
