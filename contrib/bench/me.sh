#!/usr/bin/env bash
# Load the authenticated GET /api/v1/me (JWT verification, revocation check,
# RBAC, one indexed Postgres query) over HTTPS keep-alive with wrk at 64 and
# 256 connections, against cloudsweepd and against the same endpoint written
# with Node.js Fastify + pg + fast-jwt (contrib/bench/fastify), both with the
# same number of worker processes, database pool size, certificate, secret
# and database. Prints requests/s and latency percentiles of each.
#
# usage: [CS_BINARY=build-rel/cloudsweepd] contrib/bench/me.sh [workers] [seconds]
# BENCH_THINK_MS=N: each connection waits N ms between requests (contrib/bench/think.lua),
# to read latency at a bounded load rather than at saturation.
# Needs: `contrib/cloudsweep-dev up` run once (build, private Postgres, dev
# secrets, the first owner account; Postgres keeps running after `up` ends),
# wrk and nodejs/npm (Debian), and the npm registry for the Fastify side
# (installed under contrib/bench/fastify/node_modules on first use).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
workers=${1:-2}
secs=${2:-15}
pool=4
tmp=$(mktemp -d)
export THINK_MS=${BENCH_THINK_MS:-20}
trap 'kill $(cat "$tmp"/*.pid 2>/dev/null) 2>/dev/null || true; sleep 0.5; rm -rf "$tmp"' EXIT
ulimit -n 65536 2>/dev/null || true

var=$top/var
[ -f "$var/cloudsweepd.conf" ] || { echo "run contrib/cloudsweep-dev up once first" >&2; exit 1; }
"$top/contrib/cloudsweep-dev" status | grep -q 'postgres: *running' ||
	{ echo "the dev Postgres is not running: contrib/cloudsweep-dev up" >&2; exit 1; }

# cloudsweepd on the dev configuration, with limits out of the way of the load.
CLOUDSWEEP_PID_FILE=$tmp/cs.pidfile CLOUDSWEEP_LOG_LEVEL=warn CLOUDSWEEP_DB_POOL_SIZE=$pool \
CLOUDSWEEP_MAX_CONNECTIONS_PER_IP=100000 CLOUDSWEEP_RATELIMIT_USER_PER_MIN=100000000 \
CLOUDSWEEP_RATELIMIT_GLOBAL_PER_MIN=1000000000 CLOUDSWEEP_RATELIMIT_ANON_PER_MIN=100000 \
	"${CS_BINARY:-$top/build/cloudsweepd}" -c "$var/cloudsweepd.conf" --port 18443 --workers "$workers" \
	2>"$tmp/cs.log" &
echo $! >"$tmp/cs.pid"
for _ in $(seq 100); do
	curl -skf https://127.0.0.1:18443/ready >/dev/null 2>&1 && break
	sleep 0.2
done

pw=$(cat "$var/secrets/owner_password")
token=$(curl -sk https://127.0.0.1:18443/api/v1/auth/login -H 'Content-Type: application/json' \
	-d "{\"email\":\"owner@cloudsweep.dev\",\"password\":\"$pw\"}" |
	/usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

# The Fastify reference, on the same database and secret.
if [ ! -d "$top/contrib/bench/fastify/node_modules" ]; then
	(cd "$top/contrib/bench/fastify" && npm install --silent --no-audit --no-fund >/dev/null)
fi
conninfo=$(sed -n 's/^db_conninfo *= *//p' "$var/cloudsweepd.conf")
pgval() { printf '%s\n' "$conninfo" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
PORT=18445 WORKERS=$workers POOL=$pool TLS_CERT=$var/tls/cert.pem TLS_KEY=$var/tls/key.pem \
JWT_SECRET_FILE=$var/secrets/jwt_secret PGHOST=$(pgval host) PGPORT=$(pgval port) \
PGDATABASE=$(pgval dbname) PGUSER=$(pgval user) \
	node "$top/contrib/bench/fastify/server.js" 2>"$tmp/node.log" &
echo $! >"$tmp/node.pid"
for _ in $(seq 100); do
	curl -skf -H "Authorization: Bearer $token" https://127.0.0.1:18445/api/v1/me >/dev/null 2>&1 &&
		break
	sleep 0.2
done

# "pid ticks" (user + system) of a process and its children; cpu_delta sums what the
# processes alive at the second snapshot spent since the first (pools open and close
# connections: a new one counts whole, one that closed meanwhile is left out).
tree_ticks() {
	for p in "$1" $(pgrep -P "$1"); do
		awk -v p="$p" '{ sub(/^.*\) /, ""); print p, $12 + $13 }' "/proc/$p/stat" 2>/dev/null
	done
}
cpu_delta() {
	awk -v hz="$(getconf CLK_TCK)" 'NR == FNR { t0[$1] = $2; next }
		{ d += $2 - t0[$1] } END { printf "%.1f", d / hz }' "$1" "$2"
}
pg_pid=$(head -1 "$var/pg/data/postmaster.pid")

for c in 64 256; do
	for target in "cloudsweepd https://127.0.0.1:18443/api/v1/me" \
		"fastify https://127.0.0.1:18445/api/v1/me"; do
		set -- $target
		curl -skf -H "Authorization: Bearer $token" "$2" >/dev/null ||
			{ echo "$1 does not answer GET /api/v1/me" >&2; exit 1; }
		srv=$(cat "$tmp/$([ "$1" = cloudsweepd ] && echo cs || echo node).pid")
		tree_ticks "$srv" >"$tmp/s0" && tree_ticks "$pg_pid" >"$tmp/d0"
		wrk -t2 -c"$c" -d"${secs}s" --latency ${BENCH_THINK_MS:+-s "$top/contrib/bench/think.lua"} \
			-H "Authorization: Bearer $token" "$2" >"$tmp/$1.out"
		tree_ticks "$srv" >"$tmp/s1" && tree_ticks "$pg_pid" >"$tmp/d1"
		[ -n "${BENCH_KEEP:-}" ] && cp "$tmp/$1.out" "$BENCH_KEEP.$1.$c"
		rps=$(awk '/Requests\/sec/ {print $2}' "$tmp/$1.out")
		p50=$(awk '/^ +50%/ {print $2}' "$tmp/$1.out")
		p99=$(awk '/^ +99%/ {print $2}' "$tmp/$1.out")
		errs=$(awk '/Non-2xx/ {print $NF}' "$tmp/$1.out")
		printf '%-12s workers=%s conns=%-4s %10s req/s  p50 %-8s p99 %-8s non-2xx %s  CPU s: server %s, postgres %s\n' \
			"$1" "$workers" "$c" "$rps" "$p50" "$p99" "${errs:-0}" \
			"$(cpu_delta "$tmp/s0" "$tmp/s1")" "$(cpu_delta "$tmp/d0" "$tmp/d1")"
	done
done
