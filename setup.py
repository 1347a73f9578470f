"""Build configuration beyond setup.cfg: the optional C extension.

``firezone_relay.adapters._udpio`` batches the UDP per-packet path with
recvmmsg/sendmmsg (Linux).  It is optional: where it cannot be compiled (no C
compiler or Python headers, not Linux) the install still succeeds and the
relay uses its pure-Python reader, saying so in its start-up log.
"""

import sys

from setuptools import Extension, setup

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

setup(ext_modules=extensions)
