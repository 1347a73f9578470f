#!/usr/bin/env bash
# Install the relay into ./.venv (a regular install: an editable one hides the
# twistd plugin) and run it in the foreground in standalone mode.
# Extra arguments go to the relay, e.g. `bash scripts/run.sh --listen-port 3479`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check .
# twistd imports this checkout (the current directory), so the optional C
# extension is built here too; without it the relay says so and runs slower.
build_extension || echo "could not build the _udpio C extension: pure-Python UDP I/O" >&2
exec .venv/bin/twistd -n --pidfile= firezone-relay "$@"
