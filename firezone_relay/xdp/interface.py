"""What the host's network interfaces are and can do, for the XDP fast path:
MTU and addresses (``ioctl``), the driver (``ethtool``) and the XDP features
the kernel reports (generic netlink, ``netdev`` family).

Stdlib only, like ``loader``; ``loader`` imports it inside the methods that
need it, because setup.py loads loader.py on its own, outside the package.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import socket
import struct
from typing import Dict, Optional

_SIOCGIFMTU = 0x8921
_SIOCGIFADDR = 0x8915


def _ifreq(name: str) -> bytes:
    return struct.pack("16s24x", name.encode()[:15])


def interface_mtu(name: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = fcntl.ioctl(s.fileno(), _SIOCGIFMTU, _ifreq(name))
    return int(struct.unpack_from("i", raw, 16)[0])


def interface_ip4(name: str) -> Optional[str]:
    """The interface's primary IPv4 address, or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, _ifreq(name))
    except OSError:
        return None
    return socket.inet_ntop(socket.AF_INET, raw[20:24])


def interface_ip6(name: str) -> Optional[str]:
    """The interface's first global IPv6 address (``/proc/net/if_inet6``), or None."""
    try:
        with open("/proc/self/net/if_inet6") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # address ifindex prefixlen scope flags name; scope 0 = global,
        # flag 0x40 = tentative (not usable yet), 0x20 = deprecated is still fine
        if len(fields) == 6 and fields[5] == name and int(fields[3], 16) == 0 and not int(fields[4], 16) & 0x40:
            return str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    return None


_SIOCETHTOOL = 0x8946
_ETHTOOL_GDRVINFO = 0x00000003


def interface_driver(name: str) -> Optional[str]:
    """The interface's driver name (``ethtool -i``), or None when it has none."""
    info = ctypes.create_string_buffer(196)  # struct ethtool_drvinfo
    struct.pack_into("=I", info, 0, _ETHTOOL_GDRVINFO)
    request = struct.pack("16sP", name.encode()[:15], ctypes.addressof(info)).ljust(40, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s.fileno(), _SIOCETHTOOL, request)
    except OSError:
        return None
    return info.raw[4:36].split(b"\0", 1)[0].decode(errors="replace") or None


# netdev_xdp_act bits (include/uapi/linux/netdev.h)
XDP_ACT_BASIC = 1 << 0
XDP_ACT_NDO_XMIT = 1 << 2

_NETLINK_GENERIC = 16
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_ID = 1
_CTRL_ATTR_FAMILY_NAME = 2
_NETDEV_CMD_DEV_GET = 1
_NETDEV_A_DEV_IFINDEX = 1
_NETDEV_A_DEV_XDP_FEATURES = 3


def _nlattr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + bytes(-length % 4)


def _genl_request(sock: socket.socket, family: int, cmd: int, attrs: bytes, seq: int) -> Dict[int, bytes]:
    body = struct.pack("=BBH", cmd, 1, 0) + attrs
    sock.send(struct.pack("=IHHII", 16 + len(body), family, _NLM_F_REQUEST, seq, 0) + body)
    reply = sock.recv(65536)
    length, kind = struct.unpack_from("=IH", reply, 0)
    if kind == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", reply, 16)[0]
        raise OSError(code, os.strerror(code))
    out: Dict[int, bytes] = {}
    offset = 20  # nlmsghdr + genlmsghdr
    while offset + 4 <= length:
        alen, akind = struct.unpack_from("=HH", reply, offset)
        if alen < 4:
            break
        out[akind & 0x3FFF] = reply[offset + 4 : offset + alen]
        offset += (alen + 3) & ~3
    return out


def interface_xdp_features(ifindex: int) -> Optional[int]:
    """The interface's ``xdp-features`` bits from the kernel's ``netdev``
    generic netlink family (Linux >= 6.3), or None when it cannot say."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC) as sock:
            sock.settimeout(2.0)
            family = _genl_request(
                sock, _GENL_ID_CTRL, _CTRL_CMD_GETFAMILY, _nlattr(_CTRL_ATTR_FAMILY_NAME, b"netdev\0"), 1
            )
            family_id = struct.unpack("=H", family[_CTRL_ATTR_FAMILY_ID][:2])[0]
            dev = _genl_request(
                sock, family_id, _NETDEV_CMD_DEV_GET, _nlattr(_NETDEV_A_DEV_IFINDEX, struct.pack("=I", ifindex)), 2
            )
            return int(struct.unpack("=Q", dev[_NETDEV_A_DEV_XDP_FEATURES][:8])[0])
    except (OSError, KeyError, struct.error):
        return None


def native_tx_problem(interface: str, ifindex: int) -> Optional[str]:
    """Why relaying in native mode would lose frames on this interface
    although the driver accepts the program, or None.

    A veth hands the frames we send back out into the other end's NAPI ring,
    which only exists while that end has GRO on or an XDP program of its own;
    without it the kernel drops every frame (``veth_xdp_xmit``).  The kernel
    (6.4+) reflects exactly that in this end's ``ndo-xmit`` XDP feature.
    (With GRO alone, XDP_TX frames would wait in that ring for the next
    packet: in native mode on a veth the program sends with XDP_REDIRECT,
    which is flushed.)"""
    if interface_driver(interface) != "veth":
        return None
    features = interface_xdp_features(ifindex)
    if features is None:
        return (
            "%s is a veth and this kernel does not report whether the other end of the pair can "
            "receive XDP frames (netdev xdp-features, Linux >= 6.3)" % interface
        )
    if not features & XDP_ACT_NDO_XMIT:
        return (
            "%s is a veth whose other end has neither GRO nor an XDP program, so frames relayed in native mode "
            "would be dropped (on the other end: ethtool -K <dev> gro on)" % interface
        )
    return None
