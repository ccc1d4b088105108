#!/usr/bin/env bash
# dcvv-tools bench http against a gateway on PostgreSQL (docs/benchmarks.md, "Against a gateway on PostgreSQL").
#
# Starts a throwaway PostgreSQL cluster (Debian's initdb + pg_ctl, as the tests do in
# tests/it/support/postgres.rs: 127.0.0.1 on a free port and a unix socket in a temporary
# directory, SCRAM password logins over TCP, the server run as `postgres` through runuser
# when this script runs as root), then a gateway `serve` on it and `dcvv-tools bench http`
# against that gateway. Everything it starts is stopped and its directory deleted when it
# exits, however it exits.
#
# The gateway uses the committed hsm-config/gateway.toml with the one line that names the
# SQLite file left out (the store takes exactly one of sqlite_path and database_url), and the
# environment layer for the rest:
#   DCVV_GATEWAY__STORE__DATABASE_URL=postgres://postgres@127.0.0.1:PORT/dcvv
#   DCVV_GATEWAY__STORE__DATABASE_PASSWORD_FILE=<tmp>/superuser.pw
#   DCVV_GATEWAY__AUDIT__DIRECTORY=<tmp>/audit       (one audit directory per instance)
#   DCVV_GATEWAY__SERVER__LISTEN=127.0.0.1:GW_PORT  (beside a gateway on 8443)
#
# Needs ./softhsm-setup.sh first (token, keys, TLS, demo client) and a release build
# (target/release/dcvv-gateway and target/release/dcvv-tools).
# Usage: scripts/bench-postgres.sh [dcvv-tools bench http options, e.g. --seconds 2 --rate 600 --json]
# Environment: GW_PORT (default 8444), CARGO_TARGET_DIR (where the release build is),
#              KEEP_LOGS=1 to keep the temporary directory (logs) after the run.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="${CARGO_TARGET_DIR:-$repo/target}/release/dcvv-gateway"
tools_bin="${CARGO_TARGET_DIR:-$repo/target}/release/dcvv-tools"
gw_port="${GW_PORT:-8444}"

die() { echo "bench-postgres.sh: $*" >&2; exit 1; }

[ -x "$bin" ] || die "no release build at $bin (cargo build --release --locked; set CARGO_TARGET_DIR if it is elsewhere)"
[ -x "$tools_bin" ] || die "no release build at $tools_bin (cargo build --release --locked; set CARGO_TARGET_DIR if it is elsewhere)"
[ -f "$repo/.softhsm/env" ] || die "no .softhsm/env: run ./softhsm-setup.sh first"
# shellcheck source=/dev/null
. "$repo/.softhsm/env"
[ -n "${DCVV_CLIENT_SECRET_FILE:-}" ] && [ -r "$DCVV_CLIENT_SECRET_FILE" ] \
    || die "the demo client's secret file is missing: run ./softhsm-setup.sh"

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] && [ -x "$pg_bin/pg_ctl" ] \
    || die "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin (./softhsm-setup.sh --deps-only)"

as_pg=()
if [ "$(id -u)" -eq 0 ]; then
    id -u postgres >/dev/null 2>&1 || die "running as root but there is no postgres user to run the server as"
    as_pg=(runuser -u postgres --)
fi

# A port nothing listens on (bash's /dev/tcp connect fails).
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pg_port=""
for p in $(shuf -i 20000-60000 -n 50); do
    if port_free "$p"; then pg_port=$p; break; fi
done
[ -n "$pg_port" ] || die "no free port for PostgreSQL"
port_free "$gw_port" || die "port $gw_port is in use (set GW_PORT)"

tmp=$(mktemp -d /tmp/dcvv-bench-pg.XXXXXX)
gw_pid=""
cleanup() {
    local status=$?
    if [ -n "$gw_pid" ]; then
        kill -TERM "$gw_pid" 2>/dev/null || true
        wait "$gw_pid" 2>/dev/null || true
    fi
    if [ -f "$tmp/data/postmaster.pid" ]; then
        "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$tmp/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [ "${KEEP_LOGS:-0}" = 1 ] || [ "$status" -ne 0 ]; then
        echo "bench-postgres.sh: logs kept in $tmp (gateway.log, postgres.log)" >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
pwfile="$tmp/superuser.pw"
(umask 077 && printf '%s\n' "$password" >"$pwfile")
if [ ${#as_pg[@]} -gt 0 ]; then
    chown postgres: "$tmp"
    chown postgres: "$pwfile"
fi

echo "PostgreSQL: initdb in $tmp/data, port $pg_port ($pg_bin)" >&2
"${as_pg[@]}" "$pg_bin/initdb" -D "$tmp/data" -U postgres --auth-local=trust \
    --auth-host=scram-sha-256 --pwfile "$pwfile" -E UTF8 --locale=C.UTF-8 --no-sync \
    >"$tmp/initdb.log" 2>&1 || { cat "$tmp/initdb.log" >&2; die "initdb failed"; }
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$tmp/data" -l "$tmp/postgres.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $tmp" start >/dev/null \
    || { cat "$tmp/postgres.log" >&2; die "pg_ctl start failed"; }
"${as_pg[@]}" "$pg_bin/createdb" -h "$tmp" -p "$pg_port" -U postgres dcvv

# The committed config without its sqlite_path line; its relative paths ("../.softhsm/...")
# made absolute, as the copy lives in the temporary directory.
sed -e '/^[[:space:]]*sqlite_path[[:space:]]*=/d' -e "s|\"\\.\\./|\"$repo/|g" \
    "$repo/hsm-config/gateway.toml" >"$tmp/gateway.toml"
mkdir -p "$tmp/audit"
export DCVV_GATEWAY__STORE__DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/dcvv"
export DCVV_GATEWAY__STORE__DATABASE_PASSWORD_FILE="$pwfile"
export DCVV_GATEWAY__AUDIT__DIRECTORY="$tmp/audit"
export DCVV_GATEWAY__SERVER__LISTEN="127.0.0.1:$gw_port"

echo "gateway: serve on https://localhost:$gw_port, store $DCVV_GATEWAY__STORE__DATABASE_URL" >&2
"$bin" --config "$tmp/gateway.toml" serve >"$tmp/gateway.log" 2>&1 &
gw_pid=$!
ready=""
for _ in $(seq 1 100); do
    kill -0 "$gw_pid" 2>/dev/null || { cat "$tmp/gateway.log" >&2; die "the gateway exited"; }
    if curl -sf --cacert "$repo/.softhsm/tls/ca.pem" "https://localhost:$gw_port/readyz" >/dev/null; then
        ready=1; break
    fi
    sleep 0.2
done
[ -n "$ready" ] || { cat "$tmp/gateway.log" >&2; die "the gateway did not get ready in 20 s"; }

DCVV_CLIENT_SECRET=$(cat "$DCVV_CLIENT_SECRET_FILE")
export DCVV_CLIENT_SECRET
"$tools_bin" --config "$tmp/gateway.toml" bench http \
    --url "https://localhost:$gw_port" --apikey cms-demo --secret-env DCVV_CLIENT_SECRET \
    --cacert "$repo/.softhsm/tls/ca.pem" --gateway-pid "$gw_pid" "$@"
