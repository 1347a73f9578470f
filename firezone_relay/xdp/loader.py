"""Compile, load, attach and drive the XDP program through the system libbpf.

Theory of operation: ``relay_xdp.c`` (next to this file) is compiled with
``clang -O2 -g -target bpf`` when the package is built (setup.py's build_py
step, ``compile_object``) and ships as ``relay_xdp.o`` with a
``relay_xdp.o.sha256`` sidecar naming the source it came from; at start-up
``find_object`` uses that object when it is a BPF ELF object of this
machine's byte order built from the source shipped beside it, and only
otherwise compiles the source into a temporary directory (so production
hosts need only ``libbpf1``, not clang).  The object is opened and loaded
with ``ctypes`` calls into ``libbpf.so.1`` (no Python dependency), attached
to one interface in generic (SKB) or driver (native) mode, or ``auto``:
native first, generic when the driver refuses (``XdpProgram.attach``), and
its maps are then written from the reactor thread only: userspace is the
single writer.
What the interface is and can do (MTU, addresses, driver, XDP features)
is asked in ``interface``.

Every failure raises ``XdpError`` with a sentence that says why (no clang,
no libbpf, not root, the verifier's log, an attach error); the caller logs it
and the relay goes on in userspace.  libbpf 1.x returns ``-errno`` from its
map and attach calls, and NULL with ``errno`` set from ``open``.

Map layouts (every field big-endian bytes, as on the wire, like upstream):

* ``chan_to_udp_<cf><pf>``: ``{client ip, client port, channel}`` ->
  ``{peer ip, allocation port, peer port}``
* ``udp_to_chan_<pf><cf>``: the inverse

where ``cf``/``pf`` are the client and peer families (4 or 6).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "relay_xdp.c")
PREBUILT = os.path.join(HERE, "relay_xdp.o")
#: Next to a built object: the SHA-256 (hex) of the ``relay_xdp.c`` it was compiled from.
SIDECAR_SUFFIX = ".sha256"
PROGRAM = "relay_xdp"
#: The channel maps, one per direction and client/peer family pair.
ROUTE_MAPS = tuple(
    "%s_%d%d" % (kind, a, b) for kind in ("chan_to_udp", "udp_to_chan") for a in (4, 6) for b in (4, 6)
)
CLANG_ARGS = ["-O2", "-g", "-target", "bpf"]

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
MODES = {"generic": XDP_FLAGS_SKB_MODE, "driver": XDP_FLAGS_DRV_MODE}

BPF_ANY = 0

# Mirrors of the C layouts (checked against the object's BTF in the tests).
CONFIG = struct.Struct("=4s16s4s16sHHHHI")
CFG_ENABLED, CFG_PUBLIC4, CFG_PUBLIC6, CFG_INT4, CFG_INT6, CFG_REDIRECT = 1, 2, 4, 8, 16, 32
CLIENT_CHAN = {4: struct.Struct(">4sHH"), 6: struct.Struct(">16sHH")}
PORT_PEER = CLIENT_CHAN  # {ip, allocation port, peer port}: the same shapes

# Counter indexes (enum in relay_xdp.c).
ST_PACKETS, ST_BYTES, ST_HAIRPIN = 0, 8, 16
PASS_REASONS = (
    "miss",
    "padded",
    "too_big",
    "ip_options",
    "fragment",
    "no_address",
    "no_checksum",
    "malformed",
    "adjust_failed",
    "dropped_short",  # XDP_DROP, not a pass: cannot happen, counted to prove it
    "not_local",
    "bad_header_checksum",
)
ST_PASS = 17
ST_SIZES = 32
ST_COUNT = 48

_LOG_SIZE = 4 << 20
_COMPILE_TIMEOUT = 120.0



class XdpError(Exception):
    """The fast path could not be set up; the message says why.

    ``code``: the errno behind it, when there is one."""

    def __init__(self, message: str, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.code = code


class XdpMapFull(XdpError):
    """A channel map is full: this binding stays in userspace (SPEC §5)."""


def _errno_text(code: int) -> str:
    return "%s (%s)" % (os.strerror(code), errno.errorcode.get(code, code))


# --- libbpf -------------------------------------------------------------------------


class _AttachOpts(ctypes.Structure):
    # struct bpf_xdp_attach_opts { size_t sz; int old_prog_fd; size_t :0; }
    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int), ("_pad", ctypes.c_int)]


def _libbpf() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:
        raise XdpError("libbpf.so.1 not found (install libbpf1 / libbpf-dev): %s" % exc) from None
    p, i, u32, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t
    sigs = {
        "bpf_object__open_file": (p, [ctypes.c_char_p, p]),
        "bpf_object__load": (i, [p]),
        "bpf_object__close": (None, [p]),
        "bpf_object__find_program_by_name": (p, [p, ctypes.c_char_p]),
        "bpf_object__find_map_fd_by_name": (i, [p, ctypes.c_char_p]),
        "bpf_program__fd": (i, [p]),
        "bpf_program__set_log_buf": (i, [p, ctypes.c_char_p, sz]),
        "bpf_program__set_log_level": (i, [p, u32]),
        "bpf_xdp_attach": (i, [i, i, u32, p]),
        "bpf_xdp_query_id": (i, [i, i, ctypes.POINTER(u32)]),
        "bpf_map_update_elem": (i, [i, p, p, ctypes.c_uint64]),
        "bpf_object__find_map_by_name": (p, [p, ctypes.c_char_p]),
        "bpf_map__set_max_entries": (i, [p, u32]),
        "bpf_map_delete_elem": (i, [i, p]),
        "bpf_map_lookup_elem": (i, [i, p, p]),
        "libbpf_num_possible_cpus": (i, []),
        "libbpf_set_print": (p, [p]),
    }
    for name, (restype, argtypes) in sigs.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise XdpError("libbpf.so.1 has no %s (libbpf >= 1.0 is needed)" % name) from None
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


# --- building ---------------------------------------------------------------------


def source_digest(path: str = SOURCE) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def compile_object(out: str, clang: Optional[str] = None, source: str = SOURCE) -> str:
    """Compile ``source`` into the BPF object ``out`` and write its sidecar
    (the source's SHA-256); returns ``out``.  Used by setup.py at build time
    and, as the fallback, at start-up."""
    clang = clang or shutil.which("clang")
    if clang is None:
        raise XdpError("clang not found (apt-get install clang)")
    digest = source_digest(source)
    cmd = [clang, *CLANG_ARGS, "-c", source, "-o", out]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise XdpError("could not run clang: %s" % exc) from None
    if done.returncode != 0:
        raise XdpError("clang failed to compile %s:\n%s" % (source, done.stderr.strip()[-4000:]))
    with open(out + SIDECAR_SUFFIX, "w") as f:
        f.write(digest + "\n")
    return out


_EM_BPF = 247
_ET_REL = 1


def object_problem(path: str = PREBUILT, source: str = SOURCE) -> Optional[str]:
    """Why the built object at ``path`` cannot be used, or None when it can:
    it must be a relocatable 64-bit ELF object for BPF in this machine's byte
    order, compiled from exactly the ``source`` next to it (its sidecar)."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except FileNotFoundError:
        return "%s is not there (it is built with the package only where clang is installed)" % path
    except OSError as exc:
        return "%s cannot be read: %s" % (path, exc)
    order = "<" if sys.byteorder == "little" else ">"
    if len(header) < 20 or header[:4] != b"\x7fELF" or header[4] != 2:
        return "%s is not a 64-bit ELF object" % path
    if header[5] != (1 if order == "<" else 2):
        return "%s was built for the other byte order" % path
    e_type, e_machine = struct.unpack_from(order + "HH", header, 16)
    if e_machine != _EM_BPF or e_type != _ET_REL:
        return "%s is not a BPF object (ELF type %d, machine %d)" % (path, e_type, e_machine)
    try:
        with open(path + SIDECAR_SUFFIX) as f:
            recorded = f.read().strip()
    except OSError:
        return "%s has no %s sidecar naming its source" % (path, SIDECAR_SUFFIX)
    if os.path.exists(source) and recorded != source_digest(source):
        return "%s was built from another version of %s" % (path, os.path.basename(source))
    return None


def find_object(
    directory: str, clang: Optional[str] = None, prebuilt: str = PREBUILT, source: str = SOURCE
) -> Tuple[str, str]:
    """``(path, origin)`` of the object to load: the one shipped with the
    package (``prebuilt``) when it is usable, else one compiled from
    ``source`` into ``directory`` with clang.  ``origin`` says which, and
    why, for the start-up log."""
    problem = object_problem(prebuilt, source)
    if problem is None:
        return prebuilt, "the object built with the package (%s)" % prebuilt
    clang = clang or shutil.which("clang")
    if clang is None:
        raise XdpError(
            "no usable prebuilt XDP object (%s) and clang not found to compile it at start-up "
            "(reinstall the package on a host with clang to ship the object, or apt-get install clang)" % problem
        )
    out = compile_object(os.path.join(directory, "relay_xdp.o"), clang, source)
    return out, "compiled at start-up with %s (%s)" % (clang, problem)


def build_object(directory: str, clang: Optional[str] = None) -> str:
    """The path of a compiled ``relay_xdp.o``: the prebuilt one shipped with
    the package if usable, else one compiled into ``directory`` with clang."""
    return find_object(directory, clang)[0]


def _packed(ip: Optional[str], family: int) -> bytes:
    if not ip:
        return bytes(4 if family == 4 else 16)
    return socket.inet_pton(socket.AF_INET if family == 4 else socket.AF_INET6, ip)


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


# --- the loaded program --------------------------------------------------------------------


class Settings(NamedTuple):
    """What the program relays: ChannelData to ``listen_port``, peer datagrams
    to ``lowest_port``-``highest_port``; ``public4``/``public6`` the relay's
    public addresses (hairpin); ``int4``/``int6`` the source addresses when a
    datagram changes family (None: unset, such datagrams go to userspace)."""

    listen_port: int
    lowest_port: int
    highest_port: int
    public4: Optional[str] = None
    public6: Optional[str] = None
    int4: Optional[str] = None
    int6: Optional[str] = None


@dataclass
class XdpCounters:
    """What the program counted, summed over CPUs."""

    #: (direction, client family, peer family) -> packets / bytes;
    #: direction "client_to_peer" or "peer_to_client".
    packets: Dict[Tuple[str, int, int], int]
    bytes: Dict[Tuple[str, int, int], int]
    hairpin: int
    #: reason -> datagrams handed to userspace (only TURN-port traffic counts)
    passed: Dict[str, int]
    #: as ``RelayStats.packet_sizes``
    sizes: List[int]

    def total(self, what: str, direction: str) -> int:
        table = self.packets if what == "packets" else self.bytes
        return sum(v for k, v in table.items() if k[0] == direction)


class XdpProgram:
    """One loaded and (after ``attach``) attached XDP program with its maps.

    ``configure`` writes its ``Settings`` and the longest IP packet it may
    send (``mtu``, default: the interface's).
    """

    def __init__(self, object_path: str, interface: str, map_entries: Optional[int] = None) -> None:
        """``map_entries``: the size of each channel map instead of the
        object's (65,536), e.g. a small one to test a full map."""
        self.interface = interface
        try:
            self.ifindex = socket.if_nametoindex(interface)
        except OSError:
            raise XdpError("no network interface named %r" % interface) from None
        self._lib = lib = _libbpf()
        self._obj: Optional[int] = None
        #: The mode attached in ("generic" or "driver") while attached.
        self.mode: Optional[str] = None
        #: After ``attach("auto")`` fell back to generic: why driver mode was not used.
        self.fallback: Optional[str] = None
        #: After ``attach("driver")``: why relaying may not work in that mode, if it may not.
        self.warning: Optional[str] = None
        #: Send with XDP_REDIRECT to the incoming interface instead of XDP_TX
        #: (native mode on a veth; see CFG_REDIRECT in relay_xdp.c).
        self.redirect = False
        self._config: Optional[List[object]] = None
        lib.libbpf_set_print(None)  # failures are reported through XdpError
        obj = lib.bpf_object__open_file(object_path.encode(), None)
        if not obj:
            raise XdpError("libbpf could not open %s: %s" % (object_path, _errno_text(ctypes.get_errno())))
        self._obj = obj
        try:
            prog = lib.bpf_object__find_program_by_name(obj, PROGRAM.encode())
            if not prog:
                raise XdpError("%s has no program %s" % (object_path, PROGRAM))
            if map_entries is not None:
                for name in ROUTE_MAPS:
                    bpf_map = lib.bpf_object__find_map_by_name(obj, name.encode())
                    if not bpf_map or lib.bpf_map__set_max_entries(bpf_map, map_entries):
                        raise XdpError("could not size the XDP map %s to %d entries" % (name, map_entries))
            log = ctypes.create_string_buffer(_LOG_SIZE)
            lib.bpf_program__set_log_buf(prog, log, _LOG_SIZE)
            err = lib.bpf_object__load(obj)
            if err:
                code = -err if err < 0 else ctypes.get_errno()
                text = log.value.decode(errors="replace").strip()
                hint = " (loading BPF programs needs root or CAP_BPF+CAP_NET_ADMIN)" if code == errno.EPERM else ""
                raise XdpError(
                    "the kernel refused the XDP program: %s%s%s"
                    % (_errno_text(code), hint, ("\nverifier log (tail):\n" + text[-3000:]) if text else "")
                )
            self.prog_fd = lib.bpf_program__fd(prog)
            self.maps: Dict[str, int] = {}
            for name in ["config", "stats", *ROUTE_MAPS]:
                fd = lib.bpf_object__find_map_fd_by_name(obj, name.encode())
                if fd < 0:
                    raise XdpError("the XDP object has no map %s" % name)
                self.maps[name] = fd
            self.ncpu = lib.libbpf_num_possible_cpus()
            if self.ncpu <= 0:
                raise XdpError("libbpf could not count the possible CPUs: %s" % _errno_text(-self.ncpu))
        except BaseException:
            self.close()
            raise

    # --- attach / detach ----------------------------------------------------------

    def attach(self, mode: str = "generic") -> str:
        """Attach to the interface; refuses to replace another XDP program.

        ``mode`` is ``generic``, ``driver`` (both strict) or ``auto``: driver
        mode unless the driver refuses it (or, on a veth, its other end could
        not receive the frames), then generic; ``fallback`` then says why.
        Returns the mode used.  In driver mode on a veth the program sends
        with XDP_REDIRECT instead of XDP_TX (``redirect``)."""
        self.fallback = self.warning = None
        from firezone_relay.xdp.interface import interface_driver, native_tx_problem  # not at the top: setup.py loads this file alone

        veth = interface_driver(self.interface) == "veth"
        if mode == "generic":
            self._set_redirect(False)
            self._attach("generic")
            return mode
        problem = native_tx_problem(self.interface, self.ifindex) if veth else None
        if mode == "driver":
            self._set_redirect(veth)
            self._attach("driver")
            self.warning = problem
            return mode
        if problem is None:
            self._set_redirect(veth)
            try:
                self._attach("driver")
                return "driver"
            except XdpError as exc:
                if exc.code in (errno.EBUSY, errno.EEXIST, errno.EPERM):
                    raise  # generic mode would fail the same way
                problem = str(exc)
        self._set_redirect(False)
        self._attach("generic")
        self.fallback = problem
        return "generic"

    def _attach(self, mode: str) -> None:
        flags = MODES[mode]
        err = self._lib.bpf_xdp_attach(self.ifindex, self.prog_fd, flags | XDP_FLAGS_UPDATE_IF_NOEXIST, None)
        if err:
            code = -err
            if code in (errno.EBUSY, errno.EEXIST):
                raise XdpError(
                    "another XDP program is attached to %s; not replacing it "
                    "(a stale one from a killed relay: ip link set dev %s xdp off)" % (self.interface, self.interface),
                    code,
                )
            hint = ""
            if code == errno.EOPNOTSUPP and mode == "driver":
                hint = " (the driver has no native XDP: use --ebpf-attach-mode generic or auto)"
            elif code == errno.ERANGE and mode == "driver":
                hint = " (on a veth: the MTU of the other end is too large for native XDP)"
            elif code == errno.EPERM:
                hint = " (needs root or CAP_NET_ADMIN)"
            raise XdpError(
                "could not attach XDP to %s in %s mode: %s%s" % (self.interface, mode, _errno_text(code), hint), code
            )
        self.mode = mode

    def attached_id(self) -> int:
        """The id of the XDP program on the interface in our mode, 0 if none."""
        prog_id = ctypes.c_uint32(0)
        flags = MODES[self.mode] if self.mode is not None else XDP_FLAGS_SKB_MODE
        self._lib.bpf_xdp_query_id(self.ifindex, flags, ctypes.byref(prog_id))
        return prog_id.value

    def detach(self) -> bool:
        """Detach if (and only if) our program is still the one attached.
        Idempotent; returns True when something was detached."""
        mode, self.mode = self.mode, None
        if mode is None:
            return False
        flags = MODES[mode]
        opts = _AttachOpts(ctypes.sizeof(_AttachOpts), self.prog_fd, 0)
        err = self._lib.bpf_xdp_attach(self.ifindex, -1, flags | XDP_FLAGS_REPLACE, ctypes.byref(opts))
        if err:
            raise XdpError("could not detach XDP from %s: %s" % (self.interface, _errno_text(-err)))
        return True

    def close(self) -> None:
        """Detach (best effort) and free the object and its descriptors."""
        try:
            self.detach()
        except XdpError:
            pass
        obj, self._obj = self._obj, None
        if obj:
            self._lib.bpf_object__close(obj)

    # --- maps ------------------------------------------------------------------------

    def _update(self, name: str, key: bytes, value: bytes) -> None:
        err = self._lib.bpf_map_update_elem(self.maps[name], key, value, BPF_ANY)
        if err:
            # A full hash map refuses new keys with E2BIG (existing ones still update).
            cls = XdpMapFull if -err == errno.E2BIG else XdpError
            raise cls("map %s update: %s" % (name, _errno_text(-err)))

    def _delete(self, name: str, key: bytes) -> bool:
        err = self._lib.bpf_map_delete_elem(self.maps[name], key)
        if err and -err != errno.ENOENT:
            raise XdpError("map %s delete: %s" % (name, _errno_text(-err)))
        return not err

    def _lookup(self, name: str, key: bytes, size: int) -> Optional[bytes]:
        buf = ctypes.create_string_buffer(size)
        err = self._lib.bpf_map_lookup_elem(self.maps[name], key, buf)
        if err:
            if -err == errno.ENOENT:
                return None
            raise XdpError("map %s lookup: %s" % (name, _errno_text(-err)))
        return buf.raw

    def configure(self, settings: Settings, mtu: Optional[int] = None, enabled: bool = True) -> None:
        if mtu is None:
            from firezone_relay.xdp.interface import interface_mtu  # not at the top: setup.py loads this file alone

            mtu = interface_mtu(self.interface)
        flags = (
            (CFG_ENABLED if enabled else 0)
            | (CFG_PUBLIC4 if settings.public4 else 0)
            | (CFG_PUBLIC6 if settings.public6 else 0)
            | (CFG_INT4 if settings.int4 else 0)
            | (CFG_INT6 if settings.int6 else 0)
        )
        self._config = [
            _packed(settings.public4, 4),
            _packed(settings.public6, 6),
            _packed(settings.int4, 4),
            _packed(settings.int6, 6),
            settings.listen_port,
            settings.lowest_port,
            settings.highest_port,
            min(mtu, 0xFFFF),
            flags,
        ]
        self._write_config()

    def _write_config(self) -> None:
        if self._config is None:
            return
        *fields, flags = self._config
        flags = (int(flags) & ~CFG_REDIRECT) | (CFG_REDIRECT if self.redirect else 0)  # type: ignore[call-overload]
        self._update("config", struct.pack("=I", 0), CONFIG.pack(*fields, flags))

    def _set_redirect(self, redirect: bool) -> None:
        if redirect != self.redirect:
            self.redirect = redirect
            self._write_config()

    @staticmethod
    def _keys(
        client: Tuple[str, int], channel: int, peer: Tuple[str, int], port: int
    ) -> Tuple[str, bytes, str, bytes]:
        cf, pf = _family(client[0]), _family(peer[0])
        chan_key = CLIENT_CHAN[cf].pack(_packed(client[0], cf), client[1], channel)
        udp_key = PORT_PEER[pf].pack(_packed(peer[0], pf), port, peer[1])
        return "chan_to_udp_%d%d" % (cf, pf), chan_key, "udp_to_chan_%d%d" % (pf, cf), udp_key

    def add_channel(self, client: Tuple[str, int], channel: int, peer: Tuple[str, int], port: int) -> None:
        """Mirror a usable channel binding, both directions."""
        chan_map, chan_key, udp_map, udp_key = self._keys(client, channel, peer, port)
        self._update(chan_map, chan_key, udp_key)
        try:
            self._update(udp_map, udp_key, chan_key)
        except XdpError:
            self._delete(chan_map, chan_key)
            raise

    def remove_channel(self, client: Tuple[str, int], channel: int, peer: Tuple[str, int], port: int) -> bool:
        """Remove both directions; False when there was nothing to remove."""
        chan_map, chan_key, udp_map, udp_key = self._keys(client, channel, peer, port)
        existed = self._delete(chan_map, chan_key)
        return self._delete(udp_map, udp_key) or existed

    def has_channel(self, client: Tuple[str, int], channel: int, peer: Tuple[str, int], port: int) -> bool:
        chan_map, chan_key, udp_map, udp_key = self._keys(client, channel, peer, port)
        return self._lookup(chan_map, chan_key, len(udp_key)) is not None

    def counters(self) -> XdpCounters:
        """Read every per-CPU counter and sum over CPUs."""
        fd = self.maps["stats"]
        ncpu = self.ncpu
        buf = ctypes.create_string_buffer(8 * ncpu)
        key = ctypes.c_uint32(0)
        values = [0] * ST_COUNT
        for index in range(ST_COUNT):
            key.value = index
            if self._lib.bpf_map_lookup_elem(fd, ctypes.byref(key), buf) == 0:
                values[index] = sum(struct.unpack("=%dQ" % ncpu, buf.raw))
        packets: Dict[Tuple[str, int, int], int] = {}
        nbytes: Dict[Tuple[str, int, int], int] = {}
        for d, direction in enumerate(("client_to_peer", "peer_to_client")):
            for c, cf in enumerate((4, 6)):
                for p, pf in enumerate((4, 6)):
                    i = d * 4 + c * 2 + p
                    packets[(direction, cf, pf)] = values[ST_PACKETS + i]
                    nbytes[(direction, cf, pf)] = values[ST_BYTES + i]
        passed = {reason: values[ST_PASS + i] for i, reason in enumerate(PASS_REASONS)}
        return XdpCounters(packets, nbytes, values[ST_HAIRPIN], passed, values[ST_SIZES : ST_SIZES + 16])
