#!/usr/bin/env bash
# Login throughput (argon2id on the workers' hashing thread pools) and what it costs
# everything else: GET /health at a bounded load (64 connections, 10 ms think time)
# alone, then while wrk keeps logins in flight; logins alone too. Prints logins/s and
# the latency percentiles of each. Logins use the dev owner account and the default
# argon2 parameters (m = 19 MiB, t = 2, p = 1) of var/cloudsweepd.conf.
#
# usage: [CS_BINARY=build-rel/cloudsweepd] contrib/bench/login.sh [workers] [seconds] [login conns]
# Needs: `contrib/cloudsweep-dev up` run once (build, private Postgres, dev secrets, the
# first owner account), wrk (Debian).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
workers=${1:-2}
secs=${2:-10}
lconns=${3:-32}
tmp=$(mktemp -d)
trap 'kill $(cat "$tmp"/*.pid 2>/dev/null) 2>/dev/null || true; sleep 0.5; rm -rf "$tmp"' EXIT
ulimit -n 65536 2>/dev/null || true

var=$top/var
[ -f "$var/cloudsweepd.conf" ] || { echo "run contrib/cloudsweep-dev up once first" >&2; exit 1; }
"$top/contrib/cloudsweep-dev" status | grep -q 'postgres: *running' ||
	{ echo "the dev Postgres is not running: contrib/cloudsweep-dev up" >&2; exit 1; }

# Limits out of the way: every login here succeeds, from one address.
CLOUDSWEEP_PID_FILE=$tmp/cs.pidfile CLOUDSWEEP_LOG_LEVEL=warn \
CLOUDSWEEP_MAX_CONNECTIONS_PER_IP=100000 CLOUDSWEEP_RATELIMIT_USER_PER_MIN=100000000 \
CLOUDSWEEP_RATELIMIT_GLOBAL_PER_MIN=1000000000 CLOUDSWEEP_RATELIMIT_ANON_PER_MIN=100000000 \
	"${CS_BINARY:-$top/build/cloudsweepd}" -c "$var/cloudsweepd.conf" --port 18443 --workers "$workers" \
	2>"$tmp/cs.log" &
echo $! >"$tmp/cs.pid"
for _ in $(seq 100); do
	curl -skf https://127.0.0.1:18443/ready >/dev/null 2>&1 && break
	sleep 0.2
done
url=https://127.0.0.1:18443
pw=$(cat "$var/secrets/owner_password")
export LOGIN_BODY="{\"email\":\"owner@cloudsweep.dev\",\"password\":\"$pw\"}" THINK_MS=10
curl -skf "$url/api/v1/auth/login" -H 'Content-Type: application/json' -d "$LOGIN_BODY" \
	>/dev/null || { echo "the owner cannot log in" >&2; exit 1; }

report() { # name wrk-output
	awk -v n="$1" '/Requests\/sec/ { r = $2 } /^ +50%/ { p50 = $2 } /^ +99%/ { p99 = $2 }
		/Non-2xx/ { e = $NF } END { printf "%-26s %9s req/s  p50 %-8s p99 %-8s non-2xx %s\n",
		n, r, p50, p99, e ? e : 0 }' "$2"
}
health() {
	wrk -t1 -c64 -d"${secs}s" --latency -s "$top/contrib/bench/think.lua" "$url/health" >"$tmp/$1"
}
logins() { # output [seconds]
	wrk -t1 -c"$lconns" -d"${2:-$secs}s" --latency -s "$top/contrib/bench/login.lua" \
		"$url/api/v1/auth/login" >"$tmp/$1"
}

health health-alone
report "health alone" "$tmp/health-alone"
logins login-alone
report "logins alone ($lconns conns)" "$tmp/login-alone"
logins login-busy $((secs + 2)) &
echo $! >"$tmp/wrk.pid"
sleep 1
health health-busy
wait "$(cat "$tmp/wrk.pid")" 2>/dev/null || true
rm -f "$tmp/wrk.pid"
report "health during logins" "$tmp/health-busy"
report "logins with health" "$tmp/login-busy"
