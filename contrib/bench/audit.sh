#!/usr/bin/env bash
# Audit and rate-limit benchmark: audit writes/s under concurrent actions from
# many organizations (transactional refreshes and standalone 403 events), and
# the cost of the rate-limit middleware on an authenticated GET /api/v1/me
# (buckets disabled vs enabled with rates too high to refuse). Self-contained:
# starts its own throwaway Postgres and daemon (the integration-test harness).
#
# usage: contrib/bench/audit.sh [build-dir]   (default: build)
# env:   BENCH_WORKERS (2) BENCH_SECS (10) BENCH_ORGS (64) BENCH_THREADS (16)
#        BENCH_CONNS (64)
# Needs: wrk, Debian's python3, PostgreSQL server binaries (as the tests do).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-build}
ulimit -n 65536 2>/dev/null || true
CS_BINARY=$top/$build/cloudsweepd exec /usr/bin/python3 "$top/contrib/bench/audit.py"
