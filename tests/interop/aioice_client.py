"""aioice's TURN client against a relay, run as its own process (asyncio).

    python aioice_client.py '<json config>'

Config keys: ``server`` [host, port], ``username``, ``password``, ``lifetime``
(requested allocation lifetime), ``channel_refresh_time``, ``count`` (datagrams),
``sizes`` (payload sizes, cycled), ``duration`` (seconds to spread the
datagrams over; 0 = all at once), ``timeout``.

Allocates with ``aioice.turn.create_turn_endpoint``, sends the datagrams
through the relay to a plain asyncio UDP echo socket on 127.0.0.1, collects
the echoes, then closes the TURN transport (aioice sends Refresh LIFETIME 0)
and waits for ``connection_lost``.  Prints one JSON object on stdout; exits 0
even when the exchange was incomplete (the test judges the numbers), 2 on an
exception (with ``error`` in the JSON).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

from aioice import turn

Address = Tuple[str, int]
ECHO_SOCKET_BUFFER = 4 * 1024 * 1024


class Echo(asyncio.DatagramProtocol):
    """The peer: echoes every datagram to its source and records the sources."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.sources: List[Address] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.sources.append((addr[0], addr[1]))
        assert self.transport is not None
        self.transport.sendto(data, addr)


class Client(asyncio.DatagramProtocol):
    """The TURN user: records what comes back through the relay."""

    def __init__(self) -> None:
        self.received: Dict[int, bytes] = {}
        self.senders: List[Address] = []
        self.errors: List[str] = []
        self.lost = asyncio.get_running_loop().create_future()
        self.all_back = asyncio.Event()
        self.expected = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.senders.append((addr[0], addr[1]))
        if len(data) >= 4:
            (seq,) = struct.unpack("!I", data[:4])
            self.received[seq] = data
        if len(self.received) >= self.expected:
            self.all_back.set()

    def error_received(self, exc: Exception) -> None:
        self.errors.append(repr(exc))

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.lost.done():
            self.lost.set_result(repr(exc) if exc else None)


def payload(seq: int, size: int) -> bytes:
    body = os.urandom(max(size - 4, 0))
    return (struct.pack("!I", seq) + body)[: max(size, 4)]


async def main(config: Dict[str, Any]) -> Dict[str, Any]:
    loop = asyncio.get_running_loop()
    result: Dict[str, Any] = {}
    echo_transport, echo = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    # The peer shares this process's event loop with the client, which sends
    # its burst before either reads: give the peer room for the whole burst
    # (Linux caps it at net.core.rmem_max), or the kernel drops at the peer.
    echo_transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ECHO_SOCKET_BUFFER)
    try:
        peer = echo_transport.get_extra_info("sockname")[:2]
        result["peer"] = list(peer)
        started = time.monotonic()
        transport, client = await asyncio.wait_for(
            turn.create_turn_endpoint(
                Client,
                server_addr=tuple(config["server"]),
                username=config["username"],
                password=config["password"],
                lifetime=config.get("lifetime", 600),
                channel_refresh_time=config.get("channel_refresh_time", 500),
            ),
            timeout=config.get("timeout", 10),
        )
        result["allocate_seconds"] = time.monotonic() - started
        result["relayed"] = list(transport.get_extra_info("sockname"))
        result["mapped"] = list(transport.get_extra_info("related_address"))

        count = int(config.get("count", 50))
        sizes = list(config.get("sizes", [100]))
        duration = float(config.get("duration", 0))
        client.expected = count
        sent: Dict[int, bytes] = {}
        started = time.monotonic()
        for seq in range(count):
            data = payload(seq, sizes[seq % len(sizes)])
            sent[seq] = data
            transport.sendto(data, peer)
            if duration:
                await asyncio.sleep(duration / count)
            elif seq % 50 == 49:
                # Bursts of 50, with a breath for the loop to read echoes:
                # this tests the relay, not the kernel buffers of this process.
                await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(client.all_back.wait(), timeout=config.get("timeout", 10))
        except asyncio.TimeoutError:
            pass
        result["exchange_seconds"] = time.monotonic() - started
        result["sent"] = len(sent)
        result["sent_bytes"] = sum(len(v) for v in sent.values())
        result["received"] = len(client.received)
        result["intact"] = sum(1 for k, v in client.received.items() if sent.get(k) == v)
        result["corrupted"] = sorted(k for k, v in client.received.items() if sent.get(k) != v)
        result["missing"] = sorted(set(sent) - set(client.received))[:20]
        result["peer_received"] = len(echo.sources)
        result["peer_sources"] = sorted({"%s:%d" % a for a in echo.sources})
        result["client_senders"] = sorted({"%s:%d" % a for a in client.senders})
        result["send_errors"] = client.errors

        # Close: aioice sends Refresh LIFETIME 0, then closes its socket.
        started = time.monotonic()
        transport.close()
        try:
            lost = await asyncio.wait_for(client.lost, timeout=config.get("timeout", 10))
            result["closed"] = True
            result["close_error"] = lost
        except asyncio.TimeoutError:
            result["closed"] = False
        result["close_seconds"] = time.monotonic() - started
    finally:
        echo_transport.close()
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        out = asyncio.run(main(json.loads(sys.argv[1])))
        code = 0
    except Exception as exc:  # report, don't hide: the test prints it
        out = {"error": "%s: %s" % (type(exc).__name__, exc), "traceback": traceback.format_exc()}
        code = 2
    print(json.dumps(out))
    sys.exit(code)
