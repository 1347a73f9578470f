# Sourced by scripts/test.sh and scripts/run.sh: make sure ./.venv exists.
# Debian's python3 ships venv without ensurepip unless python3-venv is
# installed; as root we install it, otherwise we say what is missing.
ensure_venv() {
    local python=${PYTHON:-python3}
    if [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; then
        return 0
    fi
    rm -rf .venv
    if ! "$python" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "python3 -m venv failed: installing Debian's python3-venv" >&2
            apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
            "$python" -m venv .venv
        else
            echo "python3 -m venv failed: install python3-venv (needs root)" >&2
            return 1
        fi
    fi
}

# Build the optional C extension (firezone_relay/adapters/_udpio.c) next to
# the sources: trial, twistd started from the checkout and the benchmarks
# import this tree, not the installed copy.  Python.h comes with pyenv and
# python.org builds; Debian's own python3 needs python3-dev.  Returns 1 when
# it cannot be built (the relay then falls back to pure-Python UDP I/O).
build_extension() {
    local include
    include=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    if [ ! -f "$include/Python.h" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "Python.h not found: installing Debian's python3-dev" >&2
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-dev gcc
    fi
    .venv/bin/python -c 'import setuptools' 2>/dev/null \
        || .venv/bin/python -m pip install --quiet --disable-pip-version-check setuptools || return 1
    .venv/bin/python setup.py --quiet build_ext --inplace || return 1
}
