#!/usr/bin/python3
"""Long-poll bench: park N clients on one scan across the workers, change the scan from
another connection (psql), and report how fast every parked client is answered, plus the
workers' resident memory per parked client.

usage: contrib/bench/longpoll.py [N] [WORKERS]      (defaults 5000 and 2)

Starts its own throwaway PostgreSQL and cloudsweepd with the integration harness
(tests/integration/conftest.py), like the tests do; CS_BINARY names the daemon
(default build/cloudsweepd). Raises its own open-file limit, which the daemon inherits.
The wake-up clock starts when the UPDATE is sent on an open psql session, so the figures
include the commit: an upper bound on the daemon's own latency.
"""
import json
import os
import resource
import selectors
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import conftest  # noqa: E402  (the harness: Postgres, Server, TLS helpers)


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    want = n * 2 + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    work = Path(tempfile.mkdtemp(prefix="cs-bench-longpoll-"))
    work.chmod(0o755)
    tls = work / "tls"
    tls.mkdir()
    cert, key = tls / "cert.pem", tls / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True)
    secrets_dir = work / "secrets"
    secrets_dir.mkdir(mode=0o700)
    import base64
    for name in ("jwt_secret", "audit_hmac_key"):
        (secrets_dir / name).write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
        (secrets_dir / name).chmod(0o600)
    (secrets_dir / "vault").mkdir(mode=0o700)
    (secrets_dir / "vault" / "kek-1").write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    (secrets_dir / "vault" / "kek-1").chmod(0o600)
    conftest.SECRET_OPTIONS.update({"vault_key_dir": secrets_dir / "vault",
                                    "jwt_secret_file": secrets_dir / "jwt_secret",
                                    "audit_hmac_key_file": secrets_dir / "audit_hmac_key"})
    pg = conftest.Postgres(work / "pg")
    pg.init()
    pg.start()
    server = None
    try:
        pg.psql(f"CREATE DATABASE {pg.dbname}")
        conf = work / "migrate.conf"
        conf.write_text(f"tls_cert_file = {cert}\ntls_key_file = {key}\n"
                        f"db_conninfo = {pg.conninfo}\nsql_dir = {conftest.SQL_DIR}\n")
        subprocess.run([str(conftest.BINARY), "migrate", "-c", str(conf)], check=True,
                       capture_output=True)
        server = conftest.Server(work, (str(cert), str(key)), pg, name="bench", options={
            "workers": workers, "log_level": "debug", "max_connections_per_ip": 1000000,
            "max_connections_per_worker": 1000000, "idle_timeout_ms": 120000,
            "db_pool_size": 8, "db_query_timeout_ms": 30000})
        server.start()
        hdr = {"Content-Type": "application/json"}
        email = f"bench{uuid.uuid4().hex[:8]}@example.com"
        body = {"email": email, "password": "correct horse battery staple", "org_name": "B"}
        conftest.wait_until(lambda: server.get("/ready").status == 200, 30, what="ready")
        r = server.https("POST", "/api/v1/auth/signup", hdr, json.dumps(body))
        assert r.status == 201, r
        tok = server.https("POST", "/api/v1/auth/login", hdr,
                           json.dumps(body)).json()["access_token"]
        auth = {"Authorization": f"Bearer {tok}"}
        org = server.get("/api/v1/me", headers=auth).json()["org"]["id"]
        acct = pg.psql(f"INSERT INTO aws_accounts (id, org_id, account_id, account_name, kind, "
                       f"role_arn, external_id_enc, regions) VALUES (gen_random_uuid(), "
                       f"'{org}', '123456789012', 'bench', 'role', 'arn:aws:iam::1:role/x', "
                       f"'sealed', '{{us-east-1}}') RETURNING id", db=pg.dbname).split()[0]
        h = dict(hdr, **auth)
        sid = server.https("POST", "/api/v1/scans", h,
                           json.dumps({"aws_account_ids": [acct]})).json()["id"]
        # The account's secret is a placeholder, so the scan fails; any final state will do.
        conftest.wait_until(lambda: server.get(f"/api/v1/scans/{sid}", headers=auth).json()[
            "status"] in ("succeeded", "partial", "failed"), 30, what="scan finished")
        version = server.get(f"/api/v1/scans/{sid}", headers=auth).json()["version"]
        pids = server.workers()
        before = rss_kib(pids)

        ctx = conftest.tls_context()
        req = (f"GET /api/v1/scans/{sid}?wait=60&since_version={version} HTTP/1.1\r\n"
               f"Host: x\r\nAuthorization: Bearer {tok}\r\n\r\n").encode()
        sel = selectors.DefaultSelector()

        def park(_):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            t = ctx.wrap_socket(s, server_hostname="localhost")
            t.sendall(req)
            t.setblocking(False)
            return t

        t_connect = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            conns = list(pool.map(park, range(n)))
        for i, t in enumerate(conns):
            sel.register(t, selectors.EVENT_READ, i)
        t_connect = time.monotonic() - t_connect
        # One psql session, connected before the clock starts.
        psql = subprocess.Popen([str(conftest.PG_BIN / "psql"), "-X", "-tA", "-h",
                                 str(pg.sockdir), "-p", str(pg.port), "-U", pg.user, "-d",
                                 pg.dbname], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, bufsize=1)
        psql.stdin.write("SELECT 'ready';\n")
        psql.stdin.flush()
        assert psql.stdout.readline().strip() == "ready"
        time.sleep(3)  # every first read done, every request parked
        parked_rss = rss_kib(pids)
        early = 0
        for key_, _ in sel.select(timeout=0):
            try:
                data = key_.fileobj.recv(65536)
                if data:
                    early += 1
                    if early == 1:
                        print("answered early:", data.split(b"\r\n\r\n")[-1][:200],
                              file=sys.stderr)
            except ssl.SSLWantReadError:
                pass  # TLS session tickets, no data
        t0 = time.monotonic()
        psql.stdin.write(f"UPDATE scans SET errors = '[{{\"code\": \"bench\"}}]' "
                         f"WHERE id = '{sid}';\n")
        psql.stdin.flush()
        assert psql.stdout.readline().startswith("UPDATE 1")
        t_commit = time.monotonic() - t0
        psql.stdin.close()
        psql.wait(10)
        bufs = [b""] * n
        done = {}
        deadline = time.monotonic() + 30
        while len(done) < n and time.monotonic() < deadline:
            for key_, _ in sel.select(timeout=1):
                i = key_.data
                try:
                    chunk = key_.fileobj.recv(65536)
                except ssl.SSLWantReadError:
                    continue
                bufs[i] += chunk
                if i not in done and b"\r\n\r\n" in bufs[i]:
                    done[i] = time.monotonic() - t0
                    sel.unregister(key_.fileobj)
        ok = sum(1 for i in done if b" 200 " in bufs[i].split(b"\r\n", 1)[0])
        lat = [v * 1000 for v in done.values()]
        print(f"{n} parked long polls on {workers} workers (connect+send {t_connect:.1f} s; "
              f"{early} answered before the change)")
        print(f"woken: {len(done)} ({ok} x 200) after one UPDATE (its commit took "
              f"{t_commit * 1000:.0f} ms and is included; the clock starts when it is sent)")
        if lat:
            print(f"wake-up latency ms: p50 {pct(lat, 50):.0f}  p90 {pct(lat, 90):.0f}  "
                  f"p99 {pct(lat, 99):.0f}  max {max(lat):.0f}")
        print(f"workers RSS {before} KiB -> {parked_rss} KiB parked: "
              f"{(parked_rss - before) / n:.1f} KiB per parked client (TLS connection included)")
        for line in server.log_lines():
            if isinstance(line, dict) and line.get("event") == "scan_longpoll_woken":
                print("server:", line.get("msg", line))
        for t in conns:
            t.close()
    finally:
        if server is not None:
            problems = server.finish()
            if problems:
                print("\n".join(problems)[:2000], file=sys.stderr)
        pg.stop(mode="immediate")
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
