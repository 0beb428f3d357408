#!/usr/bin/python3
"""Audit and rate-limit benchmark (run through contrib/bench/audit.sh).

Starts a throwaway Postgres and cloudsweepd with the integration-test harness
(tests/integration/conftest.py), then measures:

1. audit writes/s under concurrent actions from many organizations:
   a. transactional: token refreshes (rotation + auth.refresh.succeeded in one
      transaction) by N users of N organizations, from T client threads;
   b. standalone: 403s of viewers of N organizations under wrk (each writes
      access.permission_denied in its own transaction);
   counted as committed audit_events rows over the run.
2. the cost of the rate-limit middleware on an authenticated GET /api/v1/me:
   wrk req/s and latency with every bucket disabled (rate 0) versus enabled
   with rates too high to refuse anything (the limiter does all its work).
"""
import base64
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import ssl
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TOP / "tests" / "integration"))
os.environ.setdefault("CS_BINARY", str(TOP / "build" / "cloudsweepd"))

import conftest  # noqa: E402

WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
SECS = int(os.environ.get("BENCH_SECS", "10"))
ORGS = int(os.environ.get("BENCH_ORGS", "64"))
THREADS = int(os.environ.get("BENCH_THREADS", "16"))
CONNS = int(os.environ.get("BENCH_CONNS", "64"))
PASSWORD = "correct horse battery staple"
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE


def call(port, method, path, body=None, tok=None):
    h = {"Content-Type": "application/json"}
    if tok:
        h["Authorization"] = f"Bearer {tok}"
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", method=method, headers=h,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, context=CTX, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def start(workdir, tls, pg, **opts):
    o = {"workers": WORKERS, "db_pool_size": 8, "log_level": "warn",
         "max_connections_per_ip": 100000, "alert_interval_s": 10,
         "argon2_memory_kib": 1024, "argon2_iterations": 1}
    o.update(opts)
    s = conftest.Server(workdir, tls, pg, options=o, name="bench")
    s.start()
    conftest.wait_until(lambda: s.get("/ready").status == 200, 30, what="ready")
    return s


def audit_count(pg):
    return int(pg.psql("SELECT count(*) FROM audit_events", db=pg.dbname).strip())


def wrk(url, tok=None, script=None, conns=CONNS):
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{SECS}s", "--latency"]
    if tok:
        cmd += ["-H", f"Authorization: Bearer {tok}"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, p50, p99, int(non2xx.group(1)) if non2xx else 0


def main():
    workdir = Path(tempfile.mkdtemp(prefix="cs-bench-audit-"))
    workdir.chmod(0o755)
    d = workdir / "tls"
    d.mkdir()
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    tls = (str(cert), str(key))
    sec = workdir / "secrets"
    (sec / "vault").mkdir(parents=True, mode=0o700)
    for f in (sec / "jwt_secret", sec / "audit_hmac_key", sec / "vault" / "kek-1"):
        f.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
        f.chmod(0o600)
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out",
                    str(sec / "sign.pem")], check=True, capture_output=True)
    conftest.SECRET_OPTIONS.update({
        "vault_key_dir": sec / "vault", "jwt_secret_file": sec / "jwt_secret",
        "audit_hmac_key_file": sec / "audit_hmac_key",
        "audit_signing_key_file": sec / "sign.pem"})
    pg = conftest.Postgres(workdir / "pg")
    pg.init()
    pg.start()
    servers = []
    try:
        pg.psql(f"CREATE DATABASE {pg.dbname}")
        conf = workdir / "migrate.conf"
        conf.write_text(f"tls_cert_file = {tls[0]}\ntls_key_file = {tls[1]}\n"
                        f"db_conninfo = {pg.conninfo}\nsql_dir = {conftest.SQL_DIR}\n")
        subprocess.run([str(conftest.BINARY), "migrate", "-c", str(conf)], check=True,
                       capture_output=True)

        # ---- 1a: transactional audit writes (refresh rotation), many orgs ----
        s = start(workdir, tls, pg, ratelimit_user_per_min=100000000,
                  ratelimit_anon_per_min=100000000, ratelimit_global_per_min=1000000000,
                  login_block_threshold=1000)
        servers.append(s)
        users = []
        for i in range(ORGS):
            email = f"bench{i}-{os.getpid()}@example.com"
            st, body = call(s.port, "POST", "/api/v1/auth/signup",
                            {"email": email, "password": PASSWORD, "org_name": f"Org {i}"})
            assert st == 201, st
            st, tok = call(s.port, "POST", "/api/v1/auth/login",
                           {"email": email, "password": PASSWORD})
            assert st == 200, st
            users.append({"org": body["org"]["id"], "refresh": tok["refresh_token"],
                          "access": tok["access_token"], "user": body["user"]["id"]})
        stop = time.monotonic() + SECS
        done = [0] * THREADS

        def refresher(k):
            mine = users[k::THREADS]
            conn = http.client.HTTPSConnection("127.0.0.1", s.port, context=CTX, timeout=30)
            j = 0
            while time.monotonic() < stop and mine:
                u = mine[j % len(mine)]
                conn.request("POST", "/api/v1/auth/refresh",
                             body=json.dumps({"refresh_token": u["refresh"]}),
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                body = r.read()
                if r.status == 200:
                    u["refresh"] = json.loads(body)["refresh_token"]
                    done[k] += 1
                j += 1
            conn.close()

        n0 = audit_count(pg)
        t0 = time.monotonic()
        ts = [threading.Thread(target=refresher, args=(k,)) for k in range(THREADS)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        dt = time.monotonic() - t0
        n1 = audit_count(pg)
        print(f"audit writes, refresh (transactional): {(n1 - n0) / dt:8.0f} rows/s "
              f"({sum(done)} refreshes, {ORGS} orgs, {THREADS} client threads, "
              f"{WORKERS} workers)")

        # ---- 1b: standalone audit writes (403 permission_denied), many orgs ----
        viewers = []
        for u in users:
            pg.psql(f"UPDATE memberships SET role = 'viewer' WHERE user_id = '{u['user']}'",
                    db=pg.dbname)
            st, tok = call(s.port, "POST", "/api/v1/auth/refresh",
                           {"refresh_token": u["refresh"]})
            assert st == 200, st
            u["refresh"] = tok["refresh_token"]
            viewers.append(tok["access_token"])
        lua = workdir / "viewers.lua"
        lua.write_text("tokens = {" + ",".join(f'"{t}"' for t in viewers) + "}\n"
                       "i = 0\nrequest = function()\n  i = i % #tokens + 1\n"
                       "  return wrk.format('GET', '/api/v1/audit', "
                       "{['Authorization'] = 'Bearer ' .. tokens[i]})\nend\n")
        n0 = audit_count(pg)
        t0 = time.monotonic()
        rps, p50, p99, refused = wrk(f"https://127.0.0.1:{s.port}/api/v1/audit",
                                     script=str(lua))
        time.sleep(1)  # let the last standalone writes commit
        n1 = audit_count(pg)
        dt = time.monotonic() - t0
        print(f"audit writes, 403 (standalone):        {(n1 - n0) / dt:8.0f} rows/s "
              f"(wrk {rps:.0f} req/s p50 {p50} p99 {p99}; {ORGS} orgs; "
              f"{n1 - n0} rows for {refused} 403s)")
        s.finish()
        servers.clear()

        # ---- 2: rate-limit middleware on an authenticated GET ----
        results = {}
        # Alternate off/on twice and keep each setting's better run: the machine is shared.
        for label, rate in (("limits off (rate 0)", 0), ("limits on (very high)", 100000000)) * 2:
            s = start(workdir, tls, pg, ratelimit_user_per_min=rate,
                      ratelimit_anon_per_min=rate, ratelimit_global_per_min=rate * 10)
            servers.append(s)
            st, tok = call(s.port, "POST", "/api/v1/auth/refresh",
                           {"refresh_token": users[0]["refresh"]})
            assert st == 200, st
            users[0]["refresh"] = tok["refresh_token"]
            r = wrk(f"https://127.0.0.1:{s.port}/api/v1/me", tok=tok["access_token"])
            if label not in results or r[0] > results[label][0]:
                results[label] = r
            s.finish()
            servers.clear()
        for label, (rps, p50, p99, bad) in results.items():
            print(f"GET /api/v1/me {label:22s} {rps:9.0f} req/s  p50 {p50:8s} p99 {p99:8s} "
                  f"non-2xx {bad}")
        off, on = results["limits off (rate 0)"][0], results["limits on (very high)"][0]
        print(f"rate-limit middleware overhead: {100 * (off - on) / off:5.1f}% of req/s")
    finally:
        for s in servers:
            s.finish()
        pg.stop(mode="immediate")


if __name__ == "__main__":
    main()
