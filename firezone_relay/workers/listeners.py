"""The listening sockets of ``--workers N`` and the addresses they serve (SPEC §9).

The supervisor creates every listening socket once, one per worker and
listener (UDP on the listen port, TCP on it, TLS on ``--tls-port``; per
address family served), all with ``SO_REUSEPORT``, and keeps them open for
its whole life: the kernel spreads clients over the workers by their
5-tuple, and since a dead worker's sockets stay in the group, its restart
never moves another client to another worker (what arrives for the dead
worker waits in its socket's queue until the new one reads it).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

from twisted.internet.error import CannotListenError

from firezone_relay.service import served_binds

if TYPE_CHECKING:
    from firezone_relay.workers.pool import Slot

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_LISTEN_BACKLOG = 1024
_LOOPBACK = {4: "127.0.0.1", 6: "::1"}


def _is_local(ip: str) -> bool:
    """True when ``ip`` is one of this host's addresses (it can be bound)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def siblings(options: Any) -> Dict[int, str]:
    """family -> the local address at which the workers reach each other's
    allocation ports, for the families whose public address cannot (1:1
    NAT: not local, or not the address bound)."""
    out: Dict[int, str] = {}
    for family, bind in served_binds(options).items():
        public = options["public-ip%d-addr" % family]
        unspecified = ipaddress.ip_address(bind).is_unspecified
        if _is_local(public) and (unspecified or ipaddress.ip_address(bind) == ipaddress.ip_address(public)):
            continue
        out[family] = _LOOPBACK[family] if unspecified else bind
    return out


class Listeners:
    """Every listening socket of the pool, each worker's in its ``Slot.fds``."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.sockets: List[socket.socket] = []
        #: The port of each kind of listener (the option parser refuses port 0).
        self.ports = {"udp": options["listen-port"], "tcp": options["listen-port"], "tls": options["tls-port"]}

    def make(self, slots: Sequence["Slot"]) -> None:
        """Create the sockets (once): one per worker, listener and family."""
        if self.sockets:
            return
        options = self.options
        served = served_binds(options).items()
        kinds: List[Tuple[str, int]] = [("udp", socket.SOCK_DGRAM)]
        if options["max-connections"] > 0:
            kinds.append(("tcp", socket.SOCK_STREAM))
            if options["tls-cert"]:
                kinds.append(("tls", socket.SOCK_STREAM))
        for family, ip in served:
            for kind, type_ in kinds:
                self._probe(family, ip, kind, type_)
                for slot in slots:
                    sock = self._listener(family, ip, kind, type_)
                    slot.fds["%s:%d" % (kind, family)] = sock.fileno()

    def _probe(self, family: int, ip: str, kind: str, type_: int) -> None:
        """Bind the port once without ``SO_REUSEPORT`` first: a port another
        relay (or anything) holds is an error at start-up, as without
        workers, never a silent share of its traffic."""
        self._bind(family, ip, kind, type_, shared=False).close()

    def _listener(self, family: int, ip: str, kind: str, type_: int) -> socket.socket:
        sock = self._bind(family, ip, kind, type_, shared=True)
        self.sockets.append(sock)
        return sock

    def _bind(self, family: int, ip: str, kind: str, type_: int, shared: bool) -> socket.socket:
        """A socket bound to the port of ``kind``; ``shared``: with
        ``SO_REUSEPORT``, listening and non-blocking, for a worker.  A failure
        closes every listener: it is an error at start-up."""
        port = self.ports[kind]
        sock = socket.socket(_AF[family], type_)
        try:
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if type_ == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if type_ == socket.SOCK_DGRAM and self.options["socket-buffer"]:
                    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                        try:
                            sock.setsockopt(socket.SOL_SOCKET, opt, self.options["socket-buffer"])
                        except OSError:
                            pass  # best effort, as the single process
            sock.bind((ip, port))
            if shared:
                if type_ == socket.SOCK_STREAM:
                    sock.listen(_LISTEN_BACKLOG)
                sock.setblocking(False)
                os.set_inheritable(sock.fileno(), False)
        except OSError as exc:
            sock.close()
            self.close()
            raise CannotListenError(ip, port, exc) from exc
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []
