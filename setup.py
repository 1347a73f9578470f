"""Build configuration beyond setup.cfg: the optional C extension and the XDP object.

``firezone_relay.adapters._udpio`` batches the UDP per-packet path with
recvmmsg/sendmmsg (Linux).  It is optional: where it cannot be compiled (no C
compiler or Python headers, not Linux) the install still succeeds and the
relay uses its pure-Python reader, saying so in its start-up log.

``firezone_relay/xdp/relay_xdp.o``: the build_py step compiles the XDP
program with ``clang -O2 -g -target bpf`` and ships the object (and its
``.sha256`` sidecar naming the source) as package data, so a production host
needs only ``libbpf1`` at run time.  Without clang the build goes on, says so,
and the relay compiles the program at start-up instead (if clang is there
then).  ``FIREZONE_RELAY_XDP_OBJECT=required`` makes a missing clang or a
failed compile fail the build (for packaging and CI).
"""

import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(
        Extension(
            "firezone_relay.adapters._udpio",
            ["firezone_relay/adapters/_udpio.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-Wno-unused-parameter"],
            optional=True,
        )
    )


def _xdp_loader():
    """firezone_relay/xdp/loader.py loaded on its own (stdlib only), without
    importing the package or its dependencies."""
    path = os.path.join(HERE, "firezone_relay", "xdp", "loader.py")
    spec = importlib.util.spec_from_file_location("_firezone_relay_xdp_loader", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class BuildPyWithXdp(build_py):
    """build_py, then compile relay_xdp.c into the built package."""

    def run(self):
        super().run()
        if not self.dry_run:
            self.build_xdp_object()

    def _xdp_target_dir(self):
        if getattr(self, "editable_mode", False):  # pip install -e: the source tree is imported
            return os.path.join(HERE, "firezone_relay", "xdp")
        return os.path.join(self.build_lib, "firezone_relay", "xdp")

    def build_xdp_object(self):
        loader = _xdp_loader()
        required = os.environ.get("FIREZONE_RELAY_XDP_OBJECT", "").strip().lower() == "required"
        target = os.path.join(self._xdp_target_dir(), "relay_xdp.o")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            loader.compile_object(target)
        except loader.XdpError as exc:
            for stale in (target, target + loader.SIDECAR_SUFFIX):
                if os.path.exists(stale):
                    os.remove(stale)
            message = (
                "firezone-relay: the XDP object relay_xdp.o is NOT built into this package: %s. "
                "Relays installed from it compile the program at start-up with clang if it is there, "
                "else run without the XDP fast path." % (str(exc).splitlines()[0],)
            )
            if required:
                raise SystemExit(message + " (FIREZONE_RELAY_XDP_OBJECT=required)")
            print(message, file=sys.stderr)
            return
        print("firezone-relay: built the XDP object %s" % target, file=sys.stderr)

    def get_outputs(self, include_bytecode=1):
        outputs = list(super().get_outputs(include_bytecode))
        target = os.path.join(self.build_lib, "firezone_relay", "xdp", "relay_xdp.o")
        for path in (target, target + ".sha256"):
            if os.path.exists(path) and path not in outputs:
                outputs.append(path)
        return outputs


setup(ext_modules=extensions, cmdclass={"build_py": BuildPyWithXdp})
