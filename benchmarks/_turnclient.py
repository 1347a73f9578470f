"""A minimal TURN-over-UDP client for the benchmarks (RFC 8489 / RFC 8656).

Plain sockets and the standard library only, so that it measures servers
rather than depending on the relay's own codec: the same bytes go to our
relay and to coturn.  Long-term credentials (key = MD5(username:realm:
password), MESSAGE-INTEGRITY = HMAC-SHA1); the first request of a 5-tuple
gets 401 with a NONCE and is retried signed, and a 438 (stale nonce) is
retried once more with the fresh nonce.

``TurnClient`` is blocking with timeouts and retransmissions (setup only);
``allocate_request`` / ``parse`` are the pieces the pipelined scale benchmark
uses on its own non-blocking sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import time
from typing import Dict, List, Optional, Tuple

MAGIC = 0x2112A442
_MAGIC_BYTES = struct.pack(">I", MAGIC)
_HDR = struct.Struct(">HHI")
_AH = struct.Struct(">HH")

# Methods.
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

# Attributes.
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_TRANSPORT = 0x0019
XOR_MAPPED_ADDRESS = 0x0020

REQUESTED_UDP = b"\x11\x00\x00\x00"

Attrs = List[Tuple[int, bytes]]


def msg_type(method: int, cls: int) -> int:
    """STUN message type of ``method`` and class (0 request, 1 indication, 2 success, 3 error)."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 1) << 4)
        | ((cls & 2) << 7)
    )


def split_type(mtype: int) -> Tuple[int, int]:
    method = (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2)
    cls = ((mtype & 0x0010) >> 4) | ((mtype & 0x0100) >> 7)
    return method, cls


def long_term_key(username: str, realm: str, password: str) -> bytes:
    return hashlib.md5(("%s:%s:%s" % (username, realm, password)).encode("utf-8")).digest()


def xor_address(ip: str, port: int) -> bytes:
    """XOR-PEER-ADDRESS value of an IPv4 address."""
    raw = socket.inet_aton(ip)
    x = bytes(a ^ b for a, b in zip(raw, _MAGIC_BYTES))
    return struct.pack(">BBH", 0, 1, port ^ (MAGIC >> 16)) + x


def decode_xor_address(value: bytes) -> Tuple[str, int]:
    family = value[1]
    port = struct.unpack(">H", value[2:4])[0] ^ (MAGIC >> 16)
    if family != 1:
        raise ValueError("only IPv4 addresses are handled here")
    ip = bytes(a ^ b for a, b in zip(value[4:8], _MAGIC_BYTES))
    return socket.inet_ntoa(ip), port


def encode(mtype: int, tid: bytes, attrs: Attrs, key: Optional[bytes] = None) -> bytes:
    """A STUN message; with ``key``, signed with MESSAGE-INTEGRITY (last attribute)."""
    parts = []
    for atype, value in attrs:
        parts.append(_AH.pack(atype, len(value)))
        parts.append(value)
        pad = -len(value) & 3
        if pad:
            parts.append(b"\x00" * pad)
    body = b"".join(parts)
    if key is None:
        return _HDR.pack(mtype, len(body), MAGIC) + tid + body
    header = _HDR.pack(mtype, len(body) + 24, MAGIC) + tid
    mac = hmac.new(key, header + body, hashlib.sha1).digest()
    return header + body + _AH.pack(MESSAGE_INTEGRITY, 20) + mac


def parse(data: bytes) -> Optional[Tuple[int, bytes, Dict[int, bytes]]]:
    """``(message type, transaction id, {attribute type: first value})`` or ``None``."""
    if len(data) < 20 or data[0] & 0xC0:
        return None
    mtype, length, magic = _HDR.unpack_from(data)
    if magic != MAGIC or 20 + length > len(data):
        return None
    attrs: Dict[int, bytes] = {}
    pos, end = 20, 20 + length
    while pos + 4 <= end:
        atype, alen = _AH.unpack_from(data, pos)
        pos += 4
        if atype not in attrs:
            attrs[atype] = data[pos : pos + alen]
        pos += alen + (-alen & 3)
    return mtype, data[4 + 4 : 20], attrs


def error_code(attrs: Dict[int, bytes]) -> Optional[int]:
    value = attrs.get(ERROR_CODE)
    if value is None or len(value) < 4:
        return None
    return (value[2] & 7) * 100 + value[3]


def new_tid() -> bytes:
    return os.urandom(12)


def allocate_request(
    tid: bytes,
    username: Optional[str] = None,
    realm: Optional[bytes] = None,
    nonce: Optional[bytes] = None,
    key: Optional[bytes] = None,
    lifetime: Optional[int] = None,
) -> bytes:
    """An Allocate request for UDP; unsigned when ``key`` is None (gets 401 + nonce)."""
    attrs: Attrs = [(REQUESTED_TRANSPORT, REQUESTED_UDP)]
    if lifetime is not None:
        attrs.append((LIFETIME, struct.pack(">I", lifetime)))
    if key is not None:
        assert username is not None and realm is not None and nonce is not None
        attrs += [(USERNAME, username.encode("utf-8")), (REALM, realm), (NONCE, nonce)]
    return encode(msg_type(ALLOCATE, 0), tid, attrs, key)


def signed_request(method: int, tid: bytes, attrs: Attrs, username: str, realm: bytes, nonce: bytes, key: bytes) -> bytes:
    return encode(
        msg_type(method, 0),
        tid,
        attrs + [(USERNAME, username.encode("utf-8")), (REALM, realm), (NONCE, nonce)],
        key,
    )


def channel_data(channel: int, payload: bytes) -> bytes:
    return struct.pack(">HH", channel, len(payload)) + payload


class TurnError(Exception):
    def __init__(self, method: int, code: Optional[int], reason: str = "") -> None:
        super().__init__("%s failed: %s %s" % (method, code, reason))
        self.code = code


class TurnClient:
    """One blocking UDP TURN client (one 5-tuple, at most one allocation)."""

    def __init__(
        self,
        server: Tuple[str, int],
        username: str,
        password: str,
        bind: Tuple[str, int] = ("127.0.0.1", 0),
        timeout: float = 0.5,
        tries: int = 6,
    ) -> None:
        self.server = server
        self.username = username
        self.password = password
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.connect(server)
        self.timeout = timeout
        self.tries = tries
        self.realm: Optional[bytes] = None
        self.nonce: Optional[bytes] = None
        self.key: Optional[bytes] = None
        self.relayed: Optional[Tuple[str, int]] = None
        self.mapped: Optional[Tuple[str, int]] = None

    def close(self) -> None:
        self.sock.close()

    def _transact(self, request: bytes, tid: bytes) -> Tuple[int, Dict[int, bytes]]:
        for attempt in range(self.tries):
            self.sock.send(request)
            deadline = time.monotonic() + self.timeout * (attempt + 1)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(left)
                try:
                    data = self.sock.recv(65535)
                except socket.timeout:
                    break
                parsed = parse(data)
                if parsed is not None and parsed[1] == tid:
                    return parsed[0], parsed[2]
        raise TimeoutError("no response from %s:%d" % self.server)

    def binding(self) -> Tuple[str, int]:
        tid = new_tid()
        mtype, attrs = self._transact(encode(msg_type(BINDING, 0), tid, []), tid)
        if split_type(mtype)[1] != 2:
            raise TurnError(BINDING, error_code(attrs))
        return decode_xor_address(attrs[XOR_MAPPED_ADDRESS])

    def request(self, method: int, attrs: Attrs) -> Dict[int, bytes]:
        """A signed request; fetches or refreshes the nonce on 401/438."""
        for _ in range(3):
            tid = new_tid()
            if self.key is None:
                req = encode(msg_type(method, 0), tid, attrs)
            else:
                assert self.realm is not None and self.nonce is not None
                req = signed_request(method, tid, attrs, self.username, self.realm, self.nonce, self.key)
            mtype, rattrs = self._transact(req, tid)
            cls = split_type(mtype)[1]
            if cls == 2:
                return rattrs
            code = error_code(rattrs)
            if code in (401, 438) and NONCE in rattrs and (self.key is None or code == 438):
                self.nonce = rattrs[NONCE]
                self.realm = rattrs.get(REALM, self.realm)
                assert self.realm is not None
                self.key = long_term_key(self.username, self.realm.decode("utf-8"), self.password)
                continue
            raise TurnError(method, code, rattrs.get(ERROR_CODE, b"")[4:].decode("utf-8", "replace"))
        raise TurnError(method, None, "authentication loop")

    def allocate(self, lifetime: Optional[int] = None) -> Tuple[str, int]:
        attrs: Attrs = [(REQUESTED_TRANSPORT, REQUESTED_UDP)]
        if lifetime is not None:
            attrs.append((LIFETIME, struct.pack(">I", lifetime)))
        rattrs = self.request(ALLOCATE, attrs)
        self.relayed = decode_xor_address(rattrs[XOR_RELAYED_ADDRESS])
        if XOR_MAPPED_ADDRESS in rattrs:
            self.mapped = decode_xor_address(rattrs[XOR_MAPPED_ADDRESS])
        return self.relayed

    def create_permission(self, peer: Tuple[str, int]) -> None:
        self.request(CREATE_PERMISSION, [(XOR_PEER_ADDRESS, xor_address(*peer))])

    def channel_bind(self, channel: int, peer: Tuple[str, int]) -> None:
        self.request(
            CHANNEL_BIND, [(CHANNEL_NUMBER, struct.pack(">HH", channel, 0)), (XOR_PEER_ADDRESS, xor_address(*peer))]
        )

    def refresh(self, lifetime: int) -> None:
        self.request(REFRESH, [(LIFETIME, struct.pack(">I", lifetime))])


def wait_for_binding(server: Tuple[str, int], deadline_s: float = 15.0) -> None:
    """Block until ``server`` answers a STUN Binding request (or raise)."""
    end = time.monotonic() + deadline_s
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(server)
            s.settimeout(0.2)
            tid = new_tid()
            try:
                s.send(encode(msg_type(BINDING, 0), tid, []))
                data = s.recv(2048)
                parsed = parse(data)
                if parsed is not None and parsed[1] == tid:
                    return
            except (socket.timeout, ConnectionRefusedError):
                pass
        if time.monotonic() > end:
            raise TimeoutError("%s:%d does not answer STUN Binding" % server)
        time.sleep(0.1)
