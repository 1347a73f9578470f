"""The XDP object is built with the package and used without a compiler.

* setup.py's build_py compiles ``relay_xdp.c`` with clang into the built
  package (a wheel built with clang contains ``relay_xdp.o`` and its
  sidecar); without clang the build says so and goes on;
* the loader uses a shipped object only when it is a BPF object built from
  the source next to it, and compiles at start-up otherwise;
* a relay installed from that wheel into a fresh virtualenv attaches the fast
  path with no clang on its PATH (root, network namespaces).

Building needs a copy of the source tree in a temporary directory (never the
work tree: pip and setuptools write ``build/`` and ``*.egg-info`` next to
setup.py).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from contextlib import contextmanager
from typing import Dict, Iterator

from twisted.trial import unittest

from firezone_relay.xdp import loader
from tests.xdp import netns
from tests.xdp.netns import ADDR, LISTEN_PORT, SECRET, BlockingTurnClient, RelayProcess, Topology
from tests.xdp.test_xdp import _missing_tool, _skip_without_root

CHAN = 0x4000
_COPY = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "firezone_relay", "twisted")
_IGNORE = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "*.so", "relay_xdp.o", "relay_xdp.o.sha256", "dropin.cache", "*.egg-info", "build"
)
_WHEELS: Dict[str, str] = {}  # built once per test process


def _clang() -> str:
    clang = shutil.which("clang")
    if clang is None:
        _missing_tool("clang is not installed (apt-get install clang)")
    assert clang is not None
    return clang


def _source_copy(directory: str) -> str:
    """A copy of what a source distribution holds, without build products."""
    src = os.path.join(directory, "src")
    os.makedirs(src)
    for name in _COPY:
        path = os.path.join(netns.ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, name), ignore=_IGNORE)
        else:
            shutil.copy2(path, src)
    return src


def _wheel() -> str:
    """A wheel of this tree built with ``pip wheel --no-deps`` (clang on PATH)."""
    if "path" in _WHEELS and os.path.exists(_WHEELS["path"]):
        return _WHEELS["path"]
    _clang()
    directory = tempfile.mkdtemp(prefix="xdp-wheel-")
    src = _source_copy(directory)
    out = os.path.join(directory, "dist")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-v", "-w", out, src],
        capture_output=True, text=True, timeout=600, cwd=directory,
    )
    if done.returncode != 0:
        raise AssertionError("pip wheel failed:\n%s\n%s" % (done.stdout[-3000:], done.stderr[-3000:]))
    [name] = [n for n in os.listdir(out) if n.endswith(".whl")]
    _WHEELS["path"] = os.path.join(out, name)
    _WHEELS["log"] = done.stdout + done.stderr
    return _WHEELS["path"]


@contextmanager
def _path(value: str) -> Iterator[None]:
    old = os.environ.get("PATH")
    os.environ["PATH"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = old


class WheelTests(unittest.SynchronousTestCase):
    timeout = 600

    def test_a_wheel_built_with_clang_contains_the_object(self) -> None:
        wheel = _wheel()
        self.assertIn("firezone-relay: built the XDP object", _WHEELS["log"])
        directory = tempfile.mkdtemp(prefix="xdp-unzip-")
        self.addCleanup(shutil.rmtree, directory, True)
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            self.assertIn("firezone_relay/xdp/relay_xdp.o", names)
            self.assertIn("firezone_relay/xdp/relay_xdp.o.sha256", names)
            self.assertIn("firezone_relay/xdp/relay_xdp.c", names)
            record = z.read([n for n in names if n.endswith(".dist-info/RECORD")][0]).decode()
            z.extractall(directory)
        self.assertIn("firezone_relay/xdp/relay_xdp.o,sha256=", record)
        shipped = os.path.join(directory, "firezone_relay", "xdp")
        obj, source = os.path.join(shipped, "relay_xdp.o"), os.path.join(shipped, "relay_xdp.c")
        # A BPF object built from exactly the source that ships beside it.
        self.assertIsNone(loader.object_problem(obj, source))
        with open(obj + loader.SIDECAR_SUFFIX) as f:
            self.assertEqual(f.read().strip(), loader.source_digest(loader.SOURCE))
        # ... and the loader takes it as it is, with no compiler on PATH.
        empty = tempfile.mkdtemp(prefix="xdp-nopath-")
        self.addCleanup(shutil.rmtree, empty, True)
        with _path(empty):
            path, origin = loader.find_object(empty, prebuilt=obj, source=source)
        self.assertEqual(path, obj)
        self.assertIn("built with the package", origin)

    def test_without_clang_the_build_says_so_and_ships_no_object(self) -> None:
        directory = tempfile.mkdtemp(prefix="xdp-noclang-")
        self.addCleanup(shutil.rmtree, directory, True)
        src = _source_copy(directory)
        empty = os.path.join(directory, "empty-bin")
        os.makedirs(empty)
        build_lib = os.path.join(directory, "lib")
        env = dict(os.environ, PATH=empty)
        env.pop("FIREZONE_RELAY_XDP_OBJECT", None)
        done = subprocess.run(
            [sys.executable, "setup.py", "build_py", "--build-lib", build_lib],
            capture_output=True, text=True, timeout=120, cwd=src, env=env,
        )
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        self.assertIn("the XDP object relay_xdp.o is NOT built into this package: clang not found", done.stderr)
        built = os.path.join(build_lib, "firezone_relay", "xdp")
        self.assertTrue(os.path.exists(os.path.join(built, "relay_xdp.c")))
        self.assertFalse(os.path.exists(os.path.join(built, "relay_xdp.o")))
        self.assertFalse(os.path.exists(os.path.join(built, "relay_xdp.o.sha256")))
        # Packagers can make it mandatory.
        env["FIREZONE_RELAY_XDP_OBJECT"] = "required"
        done = subprocess.run(
            [sys.executable, "setup.py", "build_py", "--build-lib", build_lib],
            capture_output=True, text=True, timeout=120, cwd=src, env=env,
        )
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("FIREZONE_RELAY_XDP_OBJECT=required", done.stderr)
        self.assertNotIn("Traceback", done.stderr)


class ObjectChoiceTests(unittest.SynchronousTestCase):
    """``loader.find_object``: the shipped object when usable, else clang at start-up."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="xdp-choice-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.source = os.path.join(self.dir, "relay_xdp.c")
        shutil.copy(loader.SOURCE, self.source)
        self.obj = os.path.join(self.dir, "relay_xdp.o")

    def build(self) -> None:
        loader.compile_object(self.obj, _clang(), self.source)

    def test_missing_object(self) -> None:
        self.assertIn("is not there", loader.object_problem(self.obj, self.source) or "")

    def test_a_valid_object_is_used(self) -> None:
        self.build()
        self.assertIsNone(loader.object_problem(self.obj, self.source))
        work = os.path.join(self.dir, "work")
        os.makedirs(work)
        self.assertEqual(loader.find_object(work, prebuilt=self.obj, source=self.source)[0], self.obj)
        self.assertEqual(os.listdir(work), [])  # nothing compiled

    def test_not_bpf_not_elf_and_no_sidecar_are_refused(self) -> None:
        self.build()
        with open(self.obj, "r+b") as f:
            f.seek(18)
            f.write(struct.pack("<H", 62))  # EM_X86_64
        self.assertIn("is not a BPF object", loader.object_problem(self.obj, self.source) or "")
        with open(self.obj, "wb") as f:
            f.write(b"#!/bin/sh\necho not an object\n")
        self.assertIn("is not a 64-bit ELF object", loader.object_problem(self.obj, self.source) or "")
        self.build()
        os.remove(self.obj + loader.SIDECAR_SUFFIX)
        self.assertIn("has no .sha256 sidecar", loader.object_problem(self.obj, self.source) or "")

    def test_an_object_of_another_source_is_rebuilt_at_start_up(self) -> None:
        self.build()
        with open(self.source, "a") as f:
            f.write("\n/* changed after the build */\n")
        problem = loader.object_problem(self.obj, self.source)
        self.assertIn("was built from another version of relay_xdp.c", problem or "")
        work = os.path.join(self.dir, "work")
        os.makedirs(work)
        path, origin = loader.find_object(work, prebuilt=self.obj, source=self.source)
        self.assertEqual(path, os.path.join(work, "relay_xdp.o"))
        self.assertIn("compiled at start-up with", origin)
        self.assertIn("was built from another version", origin)
        self.assertIsNone(loader.object_problem(path, self.source))
        # Without clang there is nothing to fall back to: one sentence says both.
        empty = os.path.join(self.dir, "empty")
        os.makedirs(empty)
        with _path(empty):
            with self.assertRaises(loader.XdpError) as caught:
                loader.find_object(work, prebuilt=self.obj, source=self.source)
        self.assertIn("no usable prebuilt XDP object", str(caught.exception))
        self.assertIn("clang not found", str(caught.exception))


class InstalledRelayTests(unittest.SynchronousTestCase):
    """A relay installed from the wheel into a fresh virtualenv, no clang on its PATH."""

    timeout = 600

    def venv(self, wheel: str) -> str:
        directory = tempfile.mkdtemp(prefix="xdp-venv-")
        self.addCleanup(shutil.rmtree, directory, True)
        venv = os.path.join(directory, "venv")
        # No PYTHONPATH (trial -j sets one): it would put this work tree first.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120, env=env)
        python = os.path.join(venv, "bin", "python")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
            capture_output=True, text=True, timeout=300, env=env, cwd=directory,
        )
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, env=env,
        ).stdout.strip()
        # The dependencies (Twisted, ...) come from this test's environment,
        # after the venv's own site-packages: firezone_relay is the wheel's.
        with open(os.path.join(purelib, "zz-test-dependencies.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        where = subprocess.run(
            [python, "-c", "import firezone_relay.xdp.loader as l; print(l.PREBUILT)"],
            capture_output=True, text=True, check=True, cwd=directory, env=env,
        ).stdout.strip()
        self.assertEqual(where, os.path.join(purelib, "firezone_relay", "xdp", "relay_xdp.o"))
        self.assertTrue(os.path.exists(where))
        return python

    def test_relay_from_the_wheel_attaches_without_clang(self) -> None:
        _skip_without_root()
        wheel = _wheel()
        python = self.venv(wheel)
        bin_dir = os.path.dirname(python)
        self.assertIsNone(shutil.which("clang", path=bin_dir))
        topology = Topology()
        topology.create()
        self.addCleanup(topology.destroy)
        workdir = tempfile.mkdtemp(prefix="xdp-relay-")
        self.addCleanup(shutil.rmtree, workdir, True)
        relay = RelayProcess(topology, workdir, python=python, env={"PATH": bin_dir})
        self.addCleanup(relay.stop)
        relay.wait_ready()
        output = relay.output()
        shipped = os.path.join(os.path.dirname(os.path.dirname(python)), "lib")
        self.assertIn("XDP program: the object built with the package (%s" % shipped, output)
        self.assertIn("XDP fast path attached to eth0 (generic mode, sending with XDP_TX", output)
        self.assertNotIn("compiled at start-up", output)
        # and it relays in the kernel
        sock = topology.socket("client", 4)
        sock.bind((ADDR["client"][0], 0))
        self.addCleanup(sock.close)
        client = BlockingTurnClient(sock, (ADDR["relay"][0], LISTEN_PORT))
        client.allocate(SECRET)
        peer = topology.socket("peer", 4)
        peer.bind((ADDR["peer"][0], 0))
        peer.settimeout(2.0)
        self.addCleanup(peer.close)
        self.assertIsNone(client.channel_bind(CHAN, peer.getsockname()[:2]))
        client.send_channel(CHAN, b"no compiler here")
        self.assertEqual(peer.recvfrom(100)[0], b"no compiler here")
        metrics = relay.metrics()
        self.assertEqual(metrics['relay_data_relayed_packets_total{datapath="xdp",direction="client_to_peer"}'], 1)
        self.assertEqual(metrics['relay_data_relayed_packets_total{datapath="userspace",direction="client_to_peer"}'], 0)
