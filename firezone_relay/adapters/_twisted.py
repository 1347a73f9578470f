"""Small helpers the adapters share: one copy each.

``Counts`` (a zero-default dict of counters), ``format_address`` (the log
form of a client or peer address), ``default_reactor`` (the global reactor,
imported only when no reactor was injected) and ``LimitedLog`` (a log line
at most once per interval per kind, for events a remote party can cause at
will).
"""

from __future__ import annotations

import time
from typing import Any, Dict, Hashable, Optional, Sequence, TypeVar

from twisted.logger import Logger

K = TypeVar("K", bound=Hashable)

#: Seconds between two log lines of one rate-limited kind.
LOG_INTERVAL = 60.0


class Counts(Dict[K, int]):
    """Counters by key; an unknown key reads as 0 (and is not stored)."""

    def __missing__(self, key: K) -> int:
        return 0


def format_address(address: Sequence[Any]) -> str:
    """``1.2.3.4:5`` or ``[::1]:5``; a stream client's connection id (the
    third item) is left out."""
    ip, port = address[0], address[1]
    return "[%s]:%d" % (ip, port) if ":" in ip else "%s:%d" % (ip, port)


def default_reactor(reactor: Optional[Any] = None) -> Any:
    """``reactor`` if given, else Twisted's global reactor (imported late,
    so that importing an adapter never installs one)."""
    if reactor is not None:
        return reactor
    from twisted.internet import reactor as global_reactor

    return global_reactor


class LimitedLog:
    """Decides whether a line of a given kind may be logged now: at most once
    per ``interval`` seconds (monotonic time) per kind."""

    def __init__(self, log: Logger, interval: float = LOG_INTERVAL) -> None:
        self.log = log
        self.interval = interval
        self._last: Dict[Hashable, float] = {}

    def due(self, kind: Hashable) -> bool:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is None or now - last >= self.interval:
            self._last[kind] = now
            return True
        return False
