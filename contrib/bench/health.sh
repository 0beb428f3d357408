#!/usr/bin/env bash
# Load GET /health over HTTPS keep-alive with wrk, against cloudsweepd and
# against nginx serving a static 200 over TLS 1.3 with the same number of
# workers, on the same machine and certificate. Prints requests/s and the
# latency distribution of both.
#
# usage: contrib/bench/health.sh [workers] [connections] [seconds]
# Needs: a built tree (build/cloudsweepd), wrk and nginx (Debian packages),
# and the dev certificate (contrib/cloudsweep-dev up creates var/tls).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
workers=${1:-2}
conns=${2:-256}
secs=${3:-15}
threads=2
tmp=$(mktemp -d)
trap 'kill $(cat "$tmp"/*.pid 2>/dev/null) 2>/dev/null || true; sleep 0.5; rm -rf "$tmp"' EXIT

cert=$top/var/tls/cert.pem
key=$top/var/tls/key.pem
if [ ! -f "$cert" ]; then
	mkdir -p "$tmp/tls"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
		-subj /CN=localhost -keyout "$tmp/tls/key.pem" -out "$tmp/tls/cert.pem" 2>/dev/null
	cert=$tmp/tls/cert.pem key=$tmp/tls/key.pem
fi
ulimit -n 65536 2>/dev/null || true

# cloudsweepd without a database: /health does not need one.
cat >"$tmp/cs.conf" <<CONF
port = 18443
workers = $workers
tls_cert_file = $cert
tls_key_file = $key
db_conninfo =
log_level = warn
pid_file = $tmp/cs.pid
max_connections_per_ip = 100000
CONF
"$top/build/cloudsweepd" -c "$tmp/cs.conf" 2>"$tmp/cs.log" &
echo $! >"$tmp/cs.pid"

cat >"$tmp/nginx.conf" <<CONF
worker_processes $workers;
pid $tmp/nginx.pid;
error_log $tmp/nginx.err;
events { worker_connections 65536; }
http {
  access_log off;
  server {
    listen 127.0.0.1:18444 ssl reuseport;
    ssl_certificate $cert;
    ssl_certificate_key $key;
    ssl_protocols TLSv1.3;
    keepalive_requests 1000000;
    location = /health { default_type application/json; return 200 '{"status":"ok"}'; }
  }
}
CONF
nginx -c "$tmp/nginx.conf" -p "$tmp" 2>/dev/null
sleep 1

for target in "cloudsweepd https://127.0.0.1:18443/health" "nginx https://127.0.0.1:18444/health"; do
	set -- $target
	wrk -t"$threads" -c"$conns" -d"${secs}s" --latency "$2" >"$tmp/$1.out"
	rps=$(awk '/Requests\/sec/ {print $2}' "$tmp/$1.out")
	p50=$(awk '/^ +50%/ {print $2}' "$tmp/$1.out")
	p99=$(awk '/^ +99%/ {print $2}' "$tmp/$1.out")
	printf '%-12s workers=%s conns=%s  %10s req/s  p50 %-8s p99 %s\n' "$1" "$workers" "$conns" "$rps" "$p50" "$p99"
done
