# Types of the C extension _udpio.c (batched UDP I/O); its header comment is the contract.
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

#: Datagrams per recvmmsg/sendmmsg call.
BATCH: int

Transmit = Tuple[int, int, Any, bytes]

def poll(
    epfd: int,
    timeout: float,
    maxevents: int,
    selectables: Dict[int, Any],
    fast: Set[type],
    failed: Callable[[Any, BaseException], None],
    reactor: Any = None,
    end: Optional[float] = None,
) -> "int | List[Tuple[int, int]]": ...

class Reader:
    def __call__(self) -> int: ...

class IO:
    def __init__(
        self,
        now: Callable[[], float],
        pump: Callable[[], None],
        fds: Dict[int, Dict[int, int]],
        fallback: Callable[[Transmit], None],
        send_failed: Callable[[int], None],
        internal_error: Callable[[str, BaseException], None],
    ) -> None: ...
    def reader(
        self,
        fd: int,
        owner: Any,
        entry: str,
        port: Optional[int],
        family: int,
        always_view: bool,
        refused: Callable[[], None],
    ) -> "Reader": ...
    def send(self, transmits: List[Transmit]) -> None: ...
    def stats(self) -> Dict[str, int]: ...
