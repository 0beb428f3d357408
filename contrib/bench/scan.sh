#!/usr/bin/env bash
# Scan benchmark: one scan of 100 accounts x 10 regions against the fake AWS
# (several processes sharing the port, 50 ms latency per call, a few hundred
# resources per region). Prints wall time, AWS calls/s and peak RSS.
# Self-contained: starts its own Postgres, fakes and daemon (the
# integration-test harness).
#
# usage: contrib/bench/scan.sh [build-dir]   (default: build)
# env:   BENCH_WORKERS (2) BENCH_ACCOUNTS (100) BENCH_REGIONS (10)
#        BENCH_RESOURCES (200) BENCH_LATENCY_MS (50) BENCH_FAKES (3)
#        BENCH_UNITS (32: units a worker runs at once; 256 oversubscribes the
#        2 cores and the database pool: slower, and credential loads time out)
#        BENCH_IN_FLIGHT (256: the daemon's aws_max_in_flight per worker)
#        BENCH_FAKE (tests/fakes/fake_aws.py: the fake to run)
# Needs: Debian's python3 with python3-botocore, PostgreSQL server binaries.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-build}
ulimit -n 65536 2>/dev/null || true
CS_BINARY=$top/$build/cloudsweepd exec /usr/bin/python3 "$top/contrib/bench/scan.py"
