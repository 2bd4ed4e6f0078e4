#!/usr/bin/env bash
# The copystream demo: export a 1,000,000-row table from a throwaway PostgreSQL server, kill the
# export midway with SIGKILL, resume it, verify it, and compare it byte for byte with psql \copy.
# Sets up .venv and (as root, when missing) PostgreSQL first. Nothing outside a temporary
# directory is touched; the server is stopped and its files removed at the end.
# Usage: scripts/demo.sh [--rows N] [--keep]     (see scripts/demo_helper.py --help)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_setup.sh

echo "=== setup: .venv with copystream[test], PostgreSQL server binaries"
# pip's build output is noise here; show it only if the install fails.
log=$(mktemp)
if ! (setup_venv test) >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "error: setting up .venv failed (output above)" >&2
    exit 1
fi
rm -f "$log"
ensure_postgres

exec .venv/bin/python scripts/demo_helper.py "$@"
