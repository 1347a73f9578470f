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
