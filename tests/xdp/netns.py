"""Network namespaces for the XDP tests and benchmark, and a blocking TURN client.

``Topology`` creates four namespaces with unique names (random suffix)::

    client 10.0.1.2 fd00:1::2 --\\
    peer   10.0.2.2 fd00:2::2 ---- router (forwarding) .1 / ::1 on each link
    relay  10.0.3.2 fd00:3::2 --/

and deletes them (with their veth pairs) in ``destroy()``.  The peer also
has 10.0.2.3 / fd00:2::3, which the relay is not told to allow (the denied
peer).  Traffic stays inside the namespaces.  TX checksum offload is off on
the endpoints: a locally sent datagram otherwise crosses a veth with only the
pseudo-header sum (CHECKSUM_PARTIAL), which XDP cannot fix up.

``Topology.socket(ns, family)`` makes a socket *inside* a namespace: the
calling thread enters the namespace with ``setns``, creates the socket and
returns; a socket keeps the namespace it was created in.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from firezone_relay.core import stun
from firezone_relay.core.auth import REALM, make_credentials

CLONE_NEWNET = 0x40000000
ROLES = ("client", "peer", "relay", "router")

ADDR = {
    "client": ("10.0.1.2", "fd00:1::2"),
    "peer": ("10.0.2.2", "fd00:2::2"),
    "denied": ("10.0.2.3", "fd00:2::3"),
    "relay": ("10.0.3.2", "fd00:3::2"),
}
_LINK = {"client": 1, "peer": 2, "relay": 3}

_libc = ctypes.CDLL(None, use_errno=True)


def need_root() -> Optional[str]:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "XDP namespace tests need root (network namespaces, veth, BPF)"
    for tool in ("ip", "ethtool"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return "%s is not installed (apt-get install iproute2 ethtool)" % tool
    return None


def run(argv: Sequence[str], timeout: float = 20.0, check: bool = True) -> "subprocess.CompletedProcess[str]":
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(argv), done.stderr.strip()))
    return done


class Topology:
    def __init__(self, prefix: str = "fzx") -> None:
        suffix = os.urandom(3).hex()
        self.prefix, self.suffix = prefix, suffix
        self.ns: Dict[str, str] = {role: "%s-%s-%s" % (prefix, role[:3], suffix) for role in ROLES}
        self.created: List[str] = []
        #: role -> (IPv4, IPv6) of its eth0 (``ADDR`` plus relays added with ``add_relay``)
        self.addr: Dict[str, Tuple[str, str]] = dict(ADDR)

    def __enter__(self) -> "Topology":
        self.create()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()

    def ip(self, role: str, *args: str, check: bool = True) -> "subprocess.CompletedProcess[str]":
        return run(["ip", "-n", self.ns[role], *args], check=check)

    def exec(self, role: str, *argv: str, check: bool = True, timeout: float = 20.0) -> "subprocess.CompletedProcess[str]":
        return run(["ip", "netns", "exec", self.ns[role], *argv], check=check, timeout=timeout)

    def create(self) -> None:
        try:
            for role in ROLES:
                run(["ip", "netns", "add", self.ns[role]])
                self.created.append(self.ns[role])
                self.ip(role, "link", "set", "lo", "up")
            for role, n in _LINK.items():
                self._link(role, n)
            self.exec("router", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            self.exec("router", "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
            self.wait_reachable()
        except BaseException:
            self.destroy()
            raise

    def _link(self, role: str, n: int) -> None:
        # Created straight inside the two namespaces: nothing in the root one.
        run(
            [
                "ip", "-n", self.ns[role], "link", "add", "eth0", "type", "veth",
                "peer", "name", "to-%s" % role, "netns", self.ns["router"],
            ]
        )
        v4, v6 = self.addr[role]
        self.ip(role, "addr", "add", v4 + "/24", "dev", "eth0")
        self.ip(role, "-6", "addr", "add", v6 + "/64", "dev", "eth0", "nodad")
        if role == "peer":
            d4, d6 = ADDR["denied"]
            self.ip(role, "addr", "add", d4 + "/24", "dev", "eth0")
            self.ip(role, "-6", "addr", "add", d6 + "/64", "dev", "eth0", "nodad")
        self.ip(role, "link", "set", "eth0", "up")
        self.ip(role, "route", "add", "default", "via", "10.0.%d.1" % n)
        self.ip(role, "-6", "route", "add", "default", "via", "fd00:%d::1" % n)
        dev = "to-%s" % role
        self.ip("router", "addr", "add", "10.0.%d.1/24" % n, "dev", dev)
        self.ip("router", "-6", "addr", "add", "fd00:%d::1/64" % n, "dev", dev, "nodad")
        self.ip("router", "link", "set", dev, "up")
        self.exec(role, "ethtool", "-K", "eth0", "tx", "off")

    def add_relay(self, role: str, n: int) -> None:
        """One more namespace like "relay" on its own router link ``to-<role>``:
        10.0.n.2 / fd00:n::2 (n >= 4).  Deleted by ``destroy()``."""
        self.ns[role] = "%s-%s-%s" % (self.prefix, role, self.suffix)
        self.addr[role] = ("10.0.%d.2" % n, "fd00:%d::2" % n)
        run(["ip", "netns", "add", self.ns[role]])
        self.created.append(self.ns[role])
        self.ip(role, "link", "set", "lo", "up")
        self._link(role, n)
        self.wait_reachable(pairs=(("client", role), ("peer", role)))

    def wait_reachable(self, timeout: float = 10.0, pairs: Sequence[Tuple[str, str]] = ()) -> None:
        """Until UDP gets through client<->relay<->peer in both families (neighbours resolved, DAD done)."""
        deadline = time.monotonic() + timeout
        for a, b in pairs or (("client", "relay"), ("peer", "relay"), ("client", "peer")):
            for family in (4, 6):
                for src, dst in ((a, b), (b, a)):
                    rx = self.socket(dst, family)
                    tx = self.socket(src, family)
                    try:
                        rx.bind((self.addr[dst][family == 6], 0))
                        rx.settimeout(0.1)
                        while True:
                            tx.sendto(b"probe", rx.getsockname()[:2])
                            try:
                                rx.recvfrom(64)
                                break
                            except socket.timeout:
                                if time.monotonic() > deadline:
                                    raise RuntimeError("%s cannot reach %s over IPv%d" % (src, dst, family)) from None
                    finally:
                        rx.close()
                        tx.close()

    def destroy(self) -> None:
        for name in reversed(self.created):
            run(["ip", "netns", "del", name], check=False)
        self.created = []

    # --- inside a namespace ---------------------------------------------------------------

    @contextmanager
    def entered(self, role: str) -> Iterator[None]:
        """The calling thread inside ``role``'s network namespace."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open("/run/netns/%s" % self.ns[role], os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns %s" % self.ns[role])
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(own)
            os.close(target)

    def socket(self, role: str, family: int, kind: int = socket.SOCK_DGRAM, proto: int = 0) -> socket.socket:
        with self.entered(role):
            af = socket.AF_INET if family == 4 else (socket.AF_INET6 if family == 6 else family)
            s = socket.socket(af, kind, proto)
        if af == socket.AF_INET6 and kind == socket.SOCK_DGRAM:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return s

    def snmp(self, role: str) -> Dict[str, int]:
        """``Udp*`` and ``Udp6*`` counters of a namespace."""
        out: Dict[str, int] = {}
        text = self.exec(role, "cat", "/proc/net/snmp", "/proc/net/snmp6").stdout
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Udp:") and i + 1 < len(lines) and lines[i + 1].startswith("Udp:"):
                names, values = line.split()[1:], lines[i + 1].split()[1:]
                if names and not names[0].isdigit():
                    out.update(("Udp" + n, int(v)) for n, v in zip(names, values))
            elif line.startswith("Udp6"):
                parts = line.split()
                if len(parts) == 2:
                    out[parts[0]] = int(parts[1])
        return out

    def xdp_attached(self, role: str = "relay", dev: str = "eth0") -> bool:
        return "xdp" in self.ip(role, "link", "show", "dev", dev).stdout


# --- a blocking TURN client ------------------------------------------------------------------


class TurnError(Exception):
    pass


class BlockingTurnClient:
    """TURN over UDP with blocking sockets (setup only; the data path is raw bytes).

    Messages are built with the relay's own codec; interop with other
    clients is tested elsewhere (tests/interop).
    """

    def __init__(self, sock: socket.socket, server: Tuple[str, int], timeout: float = 2.0) -> None:
        self.sock = sock
        self.server = server
        self.timeout = timeout
        self.username = self.key = self.nonce = None  # type: Any
        self.realm = REALM
        self.relayed: List[Tuple[str, int]] = []
        sock.settimeout(timeout)

    def request(self, method: int, attributes: List[Tuple[int, object]], signed: bool = True) -> stun.Message:
        for _ in range(3):
            tid = os.urandom(12)
            attrs = list(attributes)
            if signed:
                attrs += [(stun.USERNAME, self.username), (stun.REALM, self.realm), (stun.NONCE, self.nonce)]
                data = stun.encode(method, stun.REQUEST, tid, attrs, integrity_key=self.key)
            else:
                data = stun.encode(method, stun.REQUEST, tid, attrs)
            response = self._exchange(tid, data)
            error = response.get(stun.ERROR_CODE)
            if isinstance(error, tuple) and error[0] in (401, 438) and response.get_str(stun.NONCE):
                self.nonce = response.get_str(stun.NONCE)
                if response.get_str(stun.REALM) and response.get_str(stun.REALM) != self.realm:
                    self.realm = response.get_str(stun.REALM)
                    self.key = stun.long_term_key(self.username, self.realm, self.password)
                if signed or error[0] == 401:
                    signed = True
                    continue
            return response
        return response

    def _exchange(self, tid: bytes, data: bytes) -> stun.Message:
        deadline = time.monotonic() + self.timeout * 3
        while time.monotonic() < deadline:
            self.sock.sendto(data, self.server)
            try:
                while True:
                    reply, _ = self.sock.recvfrom(65535)
                    if reply and reply[0] < 0x40 and len(reply) >= 20:
                        message = stun.decode(reply)
                        if message.transaction_id == tid:
                            return message
            except socket.timeout:
                continue
        raise TurnError("no answer from %s" % (self.server,))

    def allocate(
        self,
        secret: str,
        attributes: Sequence[Tuple[int, object]] = (),
        lifetime: int = 600,
        credentials: Optional[Tuple[str, str]] = None,
    ) -> List[Tuple[str, int]]:
        """Allocate with Firezone credentials for ``secret``, or plain long-term ``credentials``."""
        if credentials is None:
            credentials = make_credentials(secret, int(time.time()) + 3600, "xdp")
        self.username, self.password = credentials
        self.key = stun.long_term_key(self.username, self.realm, self.password)
        attrs: List[Tuple[int, object]] = [(stun.REQUESTED_TRANSPORT, 17), (stun.LIFETIME, lifetime), *attributes]
        response = self.request(stun.ALLOCATE, attrs, signed=False)
        if response.msg_class != stun.SUCCESS:
            raise TurnError("Allocate failed: %r" % (response.get(stun.ERROR_CODE),))
        self.relayed = [a for a in response.get_all(stun.XOR_RELAYED_ADDRESS) if isinstance(a, tuple)]
        return self.relayed

    def channel_bind(self, channel: int, peer: Tuple[str, int]) -> Optional[int]:
        """None on success, else the error code."""
        response = self.request(stun.CHANNEL_BIND, [(stun.CHANNEL_NUMBER, channel), (stun.XOR_PEER_ADDRESS, peer)])
        if response.msg_class == stun.SUCCESS:
            return None
        error = response.get(stun.ERROR_CODE)
        return error[0] if isinstance(error, tuple) else -1

    def refresh(self, lifetime: int) -> None:
        self.request(stun.REFRESH, [(stun.LIFETIME, lifetime)])

    def send_channel(self, channel: int, data: bytes) -> None:
        self.sock.sendto(channel.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data, self.server)

    def recv(self, timeout: Optional[float] = None) -> Optional[bytes]:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            while True:
                data, _ = self.sock.recvfrom(65535)
                if data and data[0] >= 0x40:
                    return data
        except socket.timeout:
            return None
        finally:
            self.sock.settimeout(self.timeout)


def recv(sock: socket.socket, timeout: float = 2.0) -> Optional[Tuple[bytes, Any]]:
    sock.settimeout(timeout)
    try:
        return sock.recvfrom(65535)
    except socket.timeout:
        return None


def http_get(topology: Topology, role: str, host: str, port: int, path: str, timeout: float = 5.0) -> str:
    """A plain HTTP/1.0 GET from inside a namespace; the body."""
    s = topology.socket(role, 4, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path, host)).encode())
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        s.close()
    return b"".join(chunks).split(b"\r\n\r\n", 1)[-1].decode(errors="replace")


# --- the relay process ------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = [
    __import__("sys").executable,
    "-c",
    "from twisted.scripts.twistd import run; run()",
]
SECRET = "8d2f1c3b5a7e9d0f2b4c6e8a0c2e4f6a8b0d2f4a6c8e0a2c4e6f8a0b2d4f6a8c"
LISTEN_PORT = 3478
LOWEST, HIGHEST = 40000, 40099  # deliberately not the defaults: the program must read them
METRICS = ("127.0.0.1", 9108)


class RelayProcess:
    """``twistd -n firezone-relay`` inside the relay namespace, JSON logs in a file."""

    def __init__(
        self,
        topology: Topology,
        workdir: str,
        xdp: bool = True,
        extra: Sequence[str] = (),
        listen_port: int = LISTEN_PORT,
        ports: Tuple[int, int] = (LOWEST, HIGHEST),
        metrics_port: int = METRICS[1],
        attach_mode: Optional[str] = "generic",
        python: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        role: str = "relay",
    ) -> None:
        """``attach_mode`` None: no ``--ebpf-attach-mode`` (the default).
        ``python``: the interpreter of an installed relay (default: this one,
        with this source tree first on PYTHONPATH); ``env``: variables to set;
        ``role``: the namespace (``Topology.add_relay``)."""
        self.topology = topology
        self.role = role
        self.address = topology.addr[role]
        self.listen_port = listen_port
        self.metrics_port = metrics_port
        self.log_path = os.path.join(workdir, "relay-%d.log" % listen_port)
        args = [
            "-n",
            "--pidfile=",
            "firezone-relay",
            "--listen-port=%d" % listen_port,
            "--lowest-port=%d" % ports[0],
            "--highest-port=%d" % ports[1],
            "--public-ip4-addr=%s" % self.address[0],
            "--public-ip6-addr=%s" % self.address[1],
            "--allow-peer=%s/32" % ADDR["peer"][0],
            "--allow-peer=%s/128" % ADDR["peer"][1],
            "--auth-secret=%s" % SECRET,
            "--health-check-addr=%s:%d" % (METRICS[0], metrics_port),
            "--log-format=json",
        ]
        if xdp:
            args += ["--ebpf-offloading=eth0"]
            if attach_mode is not None:
                args += ["--ebpf-attach-mode=%s" % attach_mode]
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("FIREZONE_", "EBPF_", "PUBLIC_", "LISTEN_"))}
        if python is None:
            environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
        else:
            environ.pop("PYTHONPATH", None)
        environ["PYTHONUNBUFFERED"] = "1"
        environ.update(env or {})
        twistd = [python, *TWISTD[1:]] if python is not None else TWISTD
        ip = shutil.which("ip") or "ip"  # found on our PATH, not on the relay's
        self.argv = [ip, "netns", "exec", topology.ns[role], *twistd, *args, *extra]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=workdir, env=environ, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def output(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until a Binding request from the client namespace is answered."""
        sock = self.topology.socket("client", 4)
        try:
            client = BlockingTurnClient(sock, (self.address[0], self.listen_port), timeout=0.2)
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("relay exited with %s:\n%s" % (self.proc.returncode, self.output()))
                try:
                    client.request(stun.BINDING, [], signed=False)
                    return
                except TurnError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("relay not answering:\n%s" % self.output()) from None
        finally:
            sock.close()

    def metrics(self) -> Dict[str, float]:
        """``/metrics`` as {'name{labels}': value}."""
        text = http_get(self.topology, self.role, METRICS[0], self.metrics_port, "/metrics")
        out: Dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (a drain), a second SIGTERM after a moment, SIGKILL as the last resort."""
        proc = self.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5.0)
        return proc.returncode
