#!/usr/bin/python3
"""Scan benchmark (run through contrib/bench/scan.sh).

Starts a throwaway Postgres, several fake AWS processes sharing one HTTPS port
(SO_REUSEPORT, the same seed, 50 ms latency on every call; --prerender renders the
seeded resources' XML at start-up, so the fakes' CPU during the scan is mostly
signature checks and HTTP, not the daemon's competition) and cloudsweepd with
the integration-test harness (tests/integration/conftest.py); creates ACCOUNTS
key-pair accounts of one organization, each with REGIONS regions holding about
RESOURCES resources, runs one scan of every account and region with every
check, and prints the wall time from POST to the final status, the AWS calls
per second (the scan's api_calls counter, cross-checked with the fakes' logs)
and the peak RSS of the daemon's processes (VmHWM).
"""
import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TOP / "tests" / "integration"))
os.environ.setdefault("CS_BINARY", str(TOP / "build" / "cloudsweepd"))

import conftest  # noqa: E402

WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
ACCOUNTS = int(os.environ.get("BENCH_ACCOUNTS", "100"))
NREGIONS = int(os.environ.get("BENCH_REGIONS", "10"))
RESOURCES = int(os.environ.get("BENCH_RESOURCES", "200"))
LATENCY_MS = int(os.environ.get("BENCH_LATENCY_MS", "50"))
FAKES = int(os.environ.get("BENCH_FAKES", "3"))
FAKE = os.environ.get("BENCH_FAKE", str(TOP / "tests" / "fakes" / "fake_aws.py"))
PASSWORD = "correct horse battery staple"
REGIONS = ["us-east-1", "us-east-2", "us-west-1", "us-west-2", "eu-west-1", "eu-central-1",
           "ap-southeast-1", "ap-northeast-1", "eu-west-2", "ca-central-1"][:NREGIONS]
OLD = "2024-01-01T00:00:00Z"


def region_world(rng, n):
    """About n resources: a third of them waste of some kind."""
    vols, snaps, insts, addrs, enis, nats, dbs = [], [], [], [], [], [], []
    for i in range(int(n * 0.4)):
        v = {"VolumeId": f"vol-{i:08x}", "Size": rng.choice((8, 50, 200)),
             "VolumeType": rng.choice(("gp2", "gp3"))}
        if rng.random() < 0.7:
            v["Attachments"] = [{"InstanceId": f"i-{i % max(1, int(n * 0.15)):08x}"}]
        vols.append(v)
    for i in range(int(n * 0.15)):
        insts.append({"InstanceId": f"i-{i:08x}", "InstanceType": "m5.large",
                      **({"State": "stopped", "StopTime": OLD} if i % 5 == 0 else {})})
    for i in range(int(n * 0.2)):
        snaps.append({"SnapshotId": f"snap-{i:08x}", "VolumeId": f"vol-gone{i:04x}",
                      "StartTime": OLD, "VolumeSize": 8})
    for i in range(int(n * 0.1)):
        addrs.append({"AllocationId": f"eipalloc-{i:08x}",
                      **({"InstanceId": f"i-{i:08x}"} if i % 2 else {})})
    for i in range(int(n * 0.08)):
        enis.append({"NetworkInterfaceId": f"eni-{i:08x}",
                     **({"Attachment": {"InstanceId": f"i-{i:08x}"}} if i % 2 else {})})
    for i in range(max(1, int(n * 0.02))):
        nats.append({"NatGatewayId": f"nat-{i:08x}"})
    for i in range(max(1, int(n * 0.03))):
        dbs.append({"DBInstanceIdentifier": f"db-{i:04x}",
                    **({"DBInstanceStatus": "stopped"} if i % 3 == 0 else {})})
    return {"volumes": vols, "snapshots": snaps, "instances": insts, "addresses": addrs,
            "network_interfaces": enis, "nat_gateways": nats, "db_instances": dbs,
            "load_balancers": [{"LoadBalancerName": "lb-a"}],
            "classic_load_balancers": [{"LoadBalancerName": "clb-a"}]}


def make_seed(keys):
    rng = random.Random(7)
    accounts = {}
    for acct, kid, secret in keys:
        regions = {r: region_world(rng, RESOURCES) for r in REGIONS}
        accounts[acct] = {"access_keys": [{"id": kid, "secret": secret, "user": "cloudsweep"}],
                          "regions": regions}
    return {"page_size": 1000, "regions": REGIONS, "accounts": accounts}


def vm_hwm_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def cpu_s(pid):
    """(user, system) CPU seconds of one process ((0, 0) once it is gone)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    return int(f[11]) / hz, int(f[12]) / hz


def cpu_sum(pids):
    us = [cpu_s(p) for p in pids]
    return sum(u for u, _ in us), sum(s for _, s in us)


def children(ppid):
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == ppid:
                    out.append(int(d.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


def cpu_groups(fakes, pg, s):
    """CPU seconds by group: the fakes, Postgres (postmaster and backends), the daemon."""
    pm = int((pg.data / "postmaster.pid").read_text().split()[0])
    return {"fakes": cpu_sum(p.pid for p in fakes),
            "postgres": cpu_sum([pm] + children(pm)),
            "cloudsweepd": cpu_sum([s.pid] + s.workers())}


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up through finally
    workdir = Path(tempfile.mkdtemp(prefix="cs-bench-scan-"))
    workdir.chmod(0o755)
    d = workdir / "tls"
    d.mkdir()
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"],
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

    keys = [(f"{100000000000 + i:012d}", "AKIA" + f"BENCH{i:011d}", f"bench-secret-{i:027d}")
            for i in range(ACCOUNTS)]
    seed = workdir / "seed.json"
    seed.write_text(json.dumps(make_seed(keys)))
    faults = workdir / "faults.json"
    faults.write_text(json.dumps([{"type": "latency", "ms": LATENCY_MS}]))
    fakes = []
    port = 0
    pg = conftest.Postgres(workdir / "pg")
    s = None
    try:
        for i in range(FAKES):
            p = subprocess.Popen(
                ["/usr/bin/python3", FAKE,
                 "--http-port", "0", "--https-port", str(port), "--cert", tls[0], "--key",
                 tls[1], "--seed", str(seed), "--faults", str(faults), "--reuse-port",
                 "--prerender"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            fakes.append(p)
            ports = json.loads(p.stdout.readline())
            port = ports["https_port"]
        print(f"# {FAKES} fake AWS processes on :{port}, {ACCOUNTS} accounts x "
              f"{len(REGIONS)} regions x ~{RESOURCES} resources, {LATENCY_MS} ms latency")
        pg.init()
        pg.start()
        pg.psql(f"CREATE DATABASE {pg.dbname}")
        conf = workdir / "migrate.conf"
        conf.write_text(f"tls_cert_file = {tls[0]}\ntls_key_file = {tls[1]}\n"
                        f"db_conninfo = {pg.conninfo}\nsql_dir = {conftest.SQL_DIR}\n")
        subprocess.run([str(conftest.BINARY), "migrate", "-c", str(conf)], check=True,
                       capture_output=True)
        s = conftest.Server(workdir, tls, pg, name="bench", options={
            "workers": WORKERS, "db_pool_size": 8, "log_level": "warn",
            "argon2_memory_kib": 1024, "argon2_iterations": 1,
            "aws_endpoint_url": f"https://127.0.0.1:{port}", "aws_ca_file": tls[0],
            "aws_verify_on_create": 0, "aws_regions": ",".join(REGIONS),
            "scan_worker_units": int(os.environ.get("BENCH_UNITS", "32")),
            "aws_max_in_flight": int(os.environ.get("BENCH_IN_FLIGHT", "256")),
            "scan_max_running": 100000,
            "scan_max_running_per_org": 100000, "max_body_bytes": 65536,
            "ratelimit_user_per_min": 100000000, "ratelimit_anon_per_min": 100000000,
            "ratelimit_global_per_min": 1000000000, "login_block_threshold": 1000})
        s.start()
        conftest.wait_until(lambda: s.get("/ready").status == 200, 30, what="ready")
        def call(*args, **kw):
            """s.https, retried while the daemon answers 503 (its pool still connecting)."""
            deadline = time.monotonic() + 30
            while True:
                r = s.https(*args, **kw)
                if r.status != 503 or time.monotonic() > deadline:
                    return r
                time.sleep(0.2)

        email = "bench@example.com"
        hj = {"Content-Type": "application/json"}
        r = call("POST", "/api/v1/auth/signup", headers=hj, body=json.dumps(
            {"email": email, "password": PASSWORD, "org_name": "Bench"}).encode())
        assert r.status == 201, r
        r = call("POST", "/api/v1/auth/login", headers=hj, body=json.dumps(
            {"email": email, "password": PASSWORD}).encode())
        h = {**hj, "Authorization": f"Bearer {r.json()['access_token']}"}
        ids = []
        for acct, kid, secret in keys:
            r = call("POST", "/api/v1/aws-accounts", headers=h, body=json.dumps(
                {"account_id": acct, "account_name": "bench", "access_key_id": kid,
                 "secret_access_key": secret, "regions": REGIONS}).encode())
            assert r.status == 201, r
            ids.append(r.json()["id"])
        cpu0 = cpu_groups(fakes, pg, s)
        t0 = time.monotonic()
        r = s.https("POST", "/api/v1/scans", headers=h, body=json.dumps(
            {"aws_account_ids": ids, "regions": REGIONS}).encode())
        assert r.status == 202, r
        sid = r.json()["id"]
        scan = None
        while True:
            r = s.https("GET", f"/api/v1/scans/{sid}?wait=30&since_version="
                        f"{scan['version'] if scan else 0}", headers=h, timeout=40)
            if r.status == 503:  # the pool is busy with the scan: as a client would, retry
                time.sleep(0.1)
                continue
            assert r.status == 200, r
            scan = r.json()
            if scan["status"] in ("succeeded", "partial", "failed"):
                break
        wall = time.monotonic() - t0
        cpu1 = cpu_groups(fakes, pg, s)
        pids = [s.pid] + s.workers()
        rss = {p: vm_hwm_kib(p) for p in pids}
        calls = scan["progress"]["api_calls"]
        print(f"scan {sid}: {scan['status']}, {scan['progress']['units_done']}/"
              f"{scan['progress']['units_total']} units, {scan['progress']['items_found']} "
              f"items, estimated savings ${scan['estimated_monthly_savings_usd']}/month")
        print(f"wall time            {wall:.2f} s")
        print(f"AWS calls            {calls} ({calls / wall:.0f} calls/s)")
        print("peak RSS (VmHWM)     " + ", ".join(
            f"{'master' if p == s.pid else 'worker'} {kib / 1024:.1f} MiB"
            for p, kib in rss.items()))
        print("CPU during the scan  " + ", ".join(
            f"{k} {cpu1[k][0] + cpu1[k][1] - cpu0[k][0] - cpu0[k][1]:.1f} s "
            f"({cpu1[k][1] - cpu0[k][1]:.1f} system)" for k in cpu1))
        errs = scan["errors"]
        codes = {}
        for e in errs:
            codes[e.get("code")] = codes.get(e.get("code"), 0) + 1
        print(f"unit errors/notes    {codes}")
    finally:
        if s is not None:
            s.stop()
        for p in fakes:
            p.send_signal(signal.SIGTERM)
        for p in fakes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        pg.stop(mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
