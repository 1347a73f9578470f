"""The relay's counters, read by the metrics collector at scrape time.

Plain integers and dicts, bumped inline on the per-packet path; the size
histogram's bucket of a payload is one lookup in ``SIZE_BUCKET``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Buckets of the relayed payload size histogram.
SIZE_BUCKETS = 16


def size_bucket(size: int) -> int:
    """The histogram index of a ``size``-byte payload: i counts sizes in
    (100*i, 100*(i+1)] for i < 15 (0 bytes count in bucket 0), 15 counts > 1500."""
    if size <= 0:
        return 0
    return (size - 1) // 100 if size <= 1500 else SIZE_BUCKETS - 1


#: ``size_bucket`` of every size a datagram or ChannelData payload can have
#: (0–65535): one index instead of an expression on the per-packet path.
SIZE_BUCKET = bytes(size_bucket(n) for n in range(0x10000))


@dataclass
class RelayStats:
    """Plain integer counters read by the metrics collector at scrape time."""

    allocations_total: int = 0
    client_to_peer_packets: int = 0
    client_to_peer_bytes: int = 0
    peer_to_client_packets: int = 0
    peer_to_client_bytes: int = 0
    #: (message_type, "success"|"error", error code or 0) -> count
    responses: dict[tuple[str, str, int], int] = field(default_factory=dict)
    #: reason -> count
    dropped: dict[str, int] = field(default_factory=dict)
    #: reason -> count
    auth_failures: dict[str, int] = field(default_factory=dict)
    #: histogram of relayed payload sizes, indexed by ``size_bucket``.
    packet_sizes: list[int] = field(default_factory=lambda: [0] * SIZE_BUCKETS)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def auth_failure(self, reason: str) -> None:
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

    def response(self, method_name: str, code: int) -> None:
        """Count a reply: a success when ``code`` is 0, else that error."""
        key = (method_name, "error" if code else "success", code)
        self.responses[key] = self.responses.get(key, 0) + 1
