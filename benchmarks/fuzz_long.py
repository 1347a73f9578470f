"""A longer run of the core fuzz target (tests/core/test_fuzz.py).

    python -m benchmarks.fuzz_long [--examples 20000]

CI runs the same target with FUZZ_EXAMPLES=300.  A failure prints
hypothesis' minimal reproduction; add the offending datagrams to
tests/core/fuzz_corpus/ as a new .hex file so CI replays them for ever.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000)
    args = parser.parse_args()
    env = dict(os.environ, FUZZ_EXAMPLES=str(args.examples))
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "twisted.trial", "tests.core.test_fuzz.CoreFuzzTests"], env=env, check=False
    )
    print("%d fuzz sequences in %.0f s: %s" % (args.examples, time.monotonic() - start, "passed" if result.returncode == 0 else "FAILED"))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
