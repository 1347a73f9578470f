#!/usr/bin/env bash
# Install everything the test suite needs, type-check the core and run trial.
# Ends with a plain "N passed, N failed[, N skipped]" line; exits non-zero when
# mypy or any test failed.
set -uo pipefail
cd "$(dirname "$0")/.."

# coturn's turnutils_uclient drives the interop tests.  They skip without it,
# except in CI, so CI must install it.
if ! command -v turnutils_uclient >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q coturn \
            || { echo "could not install coturn" >&2; [ "${CI:-}" = true ] && exit 1; }
        # The package enables a turnserver service on some systems; we only want the client tools.
        if command -v systemctl >/dev/null 2>&1; then systemctl disable --now coturn >/dev/null 2>&1 || true; fi
    else
        echo "turnutils_uclient not found and not root: skipping the coturn install (interop tests will skip)" >&2
    fi
fi

# Headless Chromium and its driver run the WebRTC tests (tests/browser) over
# UDP, TCP and TLS.  They skip without them, except in CI.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
            || { echo "could not install chromium" >&2; [ "${CI:-}" = true ] && exit 1; }
    else
        echo "chromium/chromedriver not found and not root: the browser tests will skip" >&2
    fi
fi

# promtool (Debian's prometheus package) checks the alert rules in deploy/
# (tests/test_deploy.py).  The package also ships a Prometheus server, which we
# do not want running: only the tool is used.
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; } \
            || { echo "could not install prometheus (promtool)" >&2; [ "${CI:-}" = true ] && exit 1; }
        if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
    else
        echo "promtool not found and not root: the alert-rule test will skip" >&2
    fi
fi

# The XDP fast path (tests/xdp): clang compiles the program, the system
# libbpf loads it, iproute2/ethtool build the test namespaces, bpftool checks
# the struct layouts against the object's BTF.  Root only (the tests skip
# without root); in CI the install must succeed.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    xdp_missing=0
    for tool in clang bpftool ip ethtool; do command -v "$tool" >/dev/null 2>&1 || xdp_missing=1; done
    [ -e /usr/include/bpf/libbpf.h ] || xdp_missing=1
    if [ "$xdp_missing" = 1 ]; then
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            clang llvm libbpf-dev bpftool iproute2 ethtool; } \
            || { echo "could not install the XDP toolchain" >&2; [ "${CI:-}" = true ] && exit 1; }
    fi
fi

. scripts/_venv.sh
ensure_venv || exit 1
# Regular install, not editable: an editable install hides the twistd plugin.
.venv/bin/python -m pip install --quiet --disable-pip-version-check '.[test]' || exit 1
# In CI the extension must build (tests/adapters/test_udpio.py also fails
# there without it); elsewhere the pure-Python path is tested alone.
build_extension || { echo "could not build the _udpio C extension" >&2; [ "${CI:-}" = true ] && exit 1; }

status=0
echo "== mypy --strict firezone_relay/core"
.venv/bin/python -m mypy --strict firezone_relay/core || status=1
echo "== mypy --strict --allow-untyped-calls firezone_relay (Twisted's settings, mypy-zope)"
.venv/bin/python -m mypy --strict --allow-untyped-calls firezone_relay || status=1

echo "== trial"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
.venv/bin/python -m twisted.trial -j2 tests 2>&1 | tee "$log"
trial_status=${PIPESTATUS[0]}
[ "$trial_status" = 0 ] || status=1

# Trial ends with e.g. "PASSED (skips=1, successes=9)" or
# "FAILED (failures=1, errors=2, successes=9)"; CI reads "N passed, N failed".
.venv/bin/python - "$log" "$trial_status" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
found = re.findall(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", text, re.M)
counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", found[-1][1])) if found else {}
passed = counts.get("successes", 0)
failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
if not found and sys.argv[2] != "0":
    failed = max(failed, 1)  # trial crashed before its summary
line = "%d passed, %d failed" % (passed, failed)
skipped = counts.get("skips", 0)
if skipped:
    line += ", %d skipped" % skipped
print(line)
PY
exit $status
