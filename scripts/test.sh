#!/usr/bin/env bash
# Set up .venv (if needed), make sure PostgreSQL server binaries exist, run pytest.
# Usage: scripts/test.sh [pytest args...]   (default: -q)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_setup.sh

setup_venv test,dev
ensure_postgres

if [[ $# -eq 0 ]]; then
    set -- -q
fi
exec .venv/bin/python -m pytest "$@"
