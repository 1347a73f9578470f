#!/usr/bin/env bash
# Install the relay into ./.venv (a regular install: an editable one hides the
# twistd plugin) and run it in the foreground in standalone mode.
# Extra arguments go to the relay, e.g. `bash scripts/run.sh --listen-port 3479`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check .
exec .venv/bin/twistd -n --pidfile= firezone-relay "$@"
