#!/usr/bin/env bash
# Set up .venv (if needed), make sure PostgreSQL server binaries exist, run pytest.
# Usage: scripts/test.sh [pytest args...]   (default: -q)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x .venv/bin/python ]]; then
    python=""
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            python=$candidate
            break
        fi
    done
    if [[ -z $python ]]; then
        echo "error: Python >= 3.11 is required to create .venv" >&2
        exit 1
    fi
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,dev]'

have_server() {
    command -v initdb >/dev/null && return 0
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
if ! have_server; then
    if [[ $(id -u) -eq 0 ]]; then
        echo "PostgreSQL server binaries not found; installing with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q postgresql
    else
        echo "error: PostgreSQL server binaries (initdb, postgres) not found." >&2
        echo "Install them, e.g.: sudo apt-get install -y postgresql" >&2
        exit 1
    fi
fi

if [[ $# -eq 0 ]]; then
    set -- -q
fi
exec .venv/bin/python -m pytest "$@"
