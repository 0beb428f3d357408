"""Scans end to end against the real daemon and Postgres: creating a scan validates the
request against the organization's live AWS accounts, workers claim its units under a
lease and the scan rolls up to succeeded (no detectors exist yet, so units finish at once);
the long poll wakes on a version change made by another connection and times out with the
unchanged scan; a client that leaves is released; two workers never run the same unit; a
lapsed lease is reclaimed; waste items are approved and dismissed with audit rows; the
savings report totals them; other organizations get 404."""
import json
import threading
import time
import uuid

import pytest

from conftest import Server, request_bytes, wait_until, waste_item_sql

PASSWORD = "correct horse battery staple"


def post(server, path, body, headers=None):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return server.https("POST", path, headers=h, body=json.dumps(body).encode())


def sql(pg, q):
    return pg.psql(q, db=pg.dbname).strip()


@pytest.fixture(scope="module")
def srv(workdir, tls_files, pg, fake_aws):
    s = Server(workdir, tls_files, pg, name="scans",
               options={**fake_aws.options, "workers": 2, "log_level": "debug",
                        "scan_lease_s": 3, "scan_poll_s": 1, "aws_verify_on_create": 0})
    s.fake_aws = fake_aws
    s.start()
    wait_until(lambda: all(s.get("/ready").status == 200 for _ in range(12)), 15,
               what="every worker ready")
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class Org:
    def __init__(self, srv, pg, role=None):
        email = f"u{uuid.uuid4().hex[:12]}@example.com"
        r = post(srv, "/api/v1/auth/signup", {"email": email, "password": PASSWORD,
                                              "org_name": "Scanners"})
        assert r.status == 201, r
        self.org_id = r.json()["org"]["id"] if "org" in r.json() else None
        r = post(srv, "/api/v1/auth/login", {"email": email, "password": PASSWORD})
        assert r.status == 200, r
        self.token = r.json()["access_token"]
        me = srv.get("/api/v1/me", headers=self.h).json()
        self.org_id = me["org"]["id"]
        self.srv, self.pg = srv, pg

    @property
    def h(self):
        return {"Authorization": f"Bearer {self.token}"}

    def account(self, regions=("us-east-1", "eu-west-1")):
        """A role account created through the API, its role seeded in the fake AWS (with no
        resources: every check runs and finds nothing)."""
        nr = f"{uuid.uuid4().int % 10**12:012d}"
        ext = f"ext-{uuid.uuid4().hex}"
        self.srv.fake_aws.control("POST", "seed", {"accounts": {nr: {
            "roles": [{"name": "CloudSweepScan", "external_id": ext}]}}})
        r = self.post("/api/v1/aws-accounts", {
            "account_id": nr, "account_name": "test",
            "role_arn": f"arn:aws:iam::{nr}:role/CloudSweepScan", "external_id": ext,
            "regions": list(regions)})
        assert r.status == 201, r
        return r.json()["id"]

    def get(self, path, **kw):
        return self.srv.get(path, headers=self.h, **kw)

    def post(self, path, body):
        return post(self.srv, path, body, self.h)


def finished(org, sid):
    r = org.get(f"/api/v1/scans/{sid}")
    return r.json() if r.json()["status"] in ("succeeded", "partial", "failed") else None


def test_create_scan_rolls_up_to_succeeded(srv, pg):
    org = Org(srv, pg)
    a1, a2 = org.account(), org.account(("us-east-1", "us-west-2", "eu-west-1"))
    r = org.post("/api/v1/scans", {"aws_account_ids": [a1, a2], "regions": ["us-east-1"]})
    assert r.status == 202, r
    body = r.json()
    assert body["status"] == "queued" and body["version"] >= 1
    sid = body["id"]
    assert sql(pg, f"SELECT count(*) FROM scan_units WHERE scan_id = '{sid}'") == "2"
    done = wait_until(lambda: finished(org, sid), 15, what="scan finished")
    assert done["status"] == "succeeded", done
    assert done["progress"]["units_total"] == 2 and done["progress"]["units_done"] == 2
    assert done["started_at"] and done["finished_at"] and done["errors"] == []
    assert done["version"] > body["version"]
    # Every region of the account when none is asked for.
    r = org.post("/api/v1/scans", {"aws_account_ids": [a2]})
    assert r.status == 202, r
    assert sql(pg, f"SELECT count(*) FROM scan_units WHERE scan_id = '{r.json()['id']}'") == "3"
    rows = sql(pg, f"SELECT resource_id FROM audit_events WHERE event_type = 'scan.created' "
                   f"AND org_id = '{org.org_id}'").splitlines()
    assert sid in rows
    lst = org.get("/api/v1/scans?limit=1")
    assert lst.status == 200 and len(lst.json()["items"]) == 1 and lst.json()["next_cursor"]
    nxt = org.get(f"/api/v1/scans?limit=1&cursor={lst.json()['next_cursor']}").json()
    assert nxt["items"][0]["id"] == sid and nxt["next_cursor"] is None


@pytest.mark.parametrize("body,field", [
    ({}, "aws_account_ids"),
    ({"aws_account_ids": []}, "aws_account_ids"),
    ({"aws_account_ids": ["not-a-uuid"]}, "aws_account_ids"),
    ({"aws_account_ids": [str(uuid.uuid4())]}, "aws_account_ids"),
    ({"aws_account_ids": "ACCOUNT", "regions": ["us-east-1"]}, "aws_account_ids"),
    ({"aws_account_ids": ["ACCOUNT"], "regions": ["mars-north-1"]}, "regions"),
    ({"aws_account_ids": ["ACCOUNT"], "regions": ["Robert'); DROP"]}, "regions"),
    ({"aws_account_ids": ["ACCOUNT"], "checks": ["bitcoin_miner"]}, "checks"),
    ({"aws_account_ids": ["ACCOUNT"], "settings": {"ec2_cpu_percent": 500}}, "settings"),
    ({"aws_account_ids": ["ACCOUNT"], "settings": {"nope": 1}}, "settings"),
])
def test_create_validation(srv, pg, body, field):
    org = Org(srv, pg)
    acct = org.account()
    body = json.loads(json.dumps(body).replace("ACCOUNT", acct))
    r = org.post("/api/v1/scans", body)
    assert r.status == 400, r
    assert r.json()["error"]["code"] == "invalid_request"
    assert field in r.json()["error"]["message"], r


def test_other_org_is_404(srv, pg):
    a, b = Org(srv, pg), Org(srv, pg)
    acct = a.account()
    sid = a.post("/api/v1/scans", {"aws_account_ids": [acct]}).json()["id"]
    assert b.get(f"/api/v1/scans/{sid}").status == 404
    assert b.get(f"/api/v1/scans/{sid}?wait=1&since_version=0").status == 404
    # B cannot scan A's account either; the answer does not say it exists.
    r = b.post("/api/v1/scans", {"aws_account_ids": [acct]})
    assert r.status == 400 and "aws_account_ids" in r.json()["error"]["message"]
    assert b.get("/api/v1/scans").json()["items"] == []
    assert b.get(f"/api/v1/scans/{uuid.uuid4()}").status == 404


def long_poll(org, sid, since, wait, out):
    t0 = time.monotonic()
    r = org.get(f"/api/v1/scans/{sid}?wait={wait}&since_version={since}", timeout=wait + 10)
    out.append((time.monotonic() - t0, r))


def test_long_poll_wakes_on_change_and_times_out(srv, pg):
    org = Org(srv, pg)
    sid = org.post("/api/v1/scans", {"aws_account_ids": [org.account()]}).json()["id"]
    done = wait_until(lambda: finished(org, sid), 15, what="scan finished")
    v = done["version"]
    # An answer at once when the scan is already newer.
    r = org.get(f"/api/v1/scans/{sid}?wait=30&since_version={v - 1}")
    assert r.status == 200 and r.json()["version"] == v
    # Parked until a change made by another connection (psql here).
    out = []
    t = threading.Thread(target=long_poll, args=(org, sid, v, 30, out))
    t.start()
    time.sleep(1.0)
    assert not out, "the poll answered before any change"
    sql(pg, f"UPDATE scans SET errors = '[{{\"code\": \"test\"}}]' WHERE id = '{sid}'")
    t.join(20)
    assert out, "the long poll was not woken"
    elapsed, r = out[0]
    assert r.status == 200 and r.json()["version"] == v + 1 and elapsed < 29
    # Times out with the unchanged scan.
    out = []
    long_poll(org, sid, v + 1, 1, out)
    elapsed, r = out[0]
    assert r.status == 200 and r.json()["version"] == v + 1 and elapsed >= 0.9
    for q in ("wait=61&since_version=1", "wait=x&since_version=1", "wait=5&since_version=-1"):
        r = org.get(f"/api/v1/scans/{sid}?{q}")
        assert r.status == 400 and r.json()["error"]["code"] == "invalid_request", q


def test_disconnected_poller_is_released(srv, pg):
    org = Org(srv, pg)
    sid = org.post("/api/v1/scans", {"aws_account_ids": [org.account()]}).json()["id"]
    v = wait_until(lambda: finished(org, sid), 15, what="scan finished")["version"]
    for _ in range(10):
        c = srv.raw()
        c.send(request_bytes("GET", f"/api/v1/scans/{sid}?wait=60&since_version={v}",
                             headers={"Authorization": f"Bearer {org.token}"}))
        assert not c.readable(0.2)
        c.close()
    # The server stays healthy and a change still wakes a fresh poller.
    out = []
    t = threading.Thread(target=long_poll, args=(org, sid, v, 30, out))
    t.start()
    time.sleep(0.5)
    sql(pg, f"UPDATE scans SET errors = '[]'::jsonb || '[{{\"code\": \"x\"}}]' WHERE id = '{sid}'")
    t.join(20)
    assert out and out[0][1].status == 200
    assert srv.get("/health").status == 200
    bad = [l for l in srv.log_lines() if isinstance(l, dict) and l.get("level") == "error"]
    assert not bad, bad


def test_two_workers_never_run_the_same_unit(srv, pg):
    org = Org(srv, pg)
    regions = ("us-east-1", "us-east-2", "us-west-1", "us-west-2", "eu-west-1")
    accts = [org.account(regions) for _ in range(8)]
    sid = org.post("/api/v1/scans", {"aws_account_ids": accts}).json()["id"]
    done = wait_until(lambda: finished(org, sid), 30, what="scan finished")
    assert done["status"] == "succeeded" and done["progress"]["units_done"] == 40
    starts = {}
    for line in srv.log_lines():
        if isinstance(line, dict) and line.get("event") == "scan_unit_started" \
                and sid in line.get("msg", json.dumps(line)):
            unit = json.dumps(line).split("unit ")[1].split(" ")[0]
            starts[unit] = starts.get(unit, 0) + 1
    assert len(starts) == 40 and set(starts.values()) == {1}, starts
    assert sql(pg, f"SELECT max(attempts) FROM scan_units WHERE scan_id = '{sid}'") == "1"


def test_lapsed_lease_is_reclaimed(srv, pg):
    org = Org(srv, pg)
    acct = org.account(("us-east-1",))
    sid = sql(pg, f"INSERT INTO scans (org_id, account_ids, units_total) VALUES "
                  f"('{org.org_id}', '{{{acct}}}', 1) RETURNING id").splitlines()[0]
    # A unit a dead worker held: running, lease in the past, never finished.
    sql(pg, f"INSERT INTO scan_units (scan_id, org_id, aws_account_id, region, status, "
            f"lease_owner, lease_expires_at, attempts) VALUES ('{sid}', '{org.org_id}', "
            f"'{acct}', 'us-east-1', 'running', 'dead/worker', now() - interval '1 s', 1)")
    done = wait_until(lambda: finished(org, sid), 15, what="reclaimed unit finished")
    assert done["status"] == "succeeded"
    assert sql(pg, f"SELECT attempts FROM scan_units WHERE scan_id = '{sid}'") == "2"
    # One abandoned too often fails instead, and the scan says so.
    sid2 = sql(pg, f"INSERT INTO scans (org_id, account_ids, units_total) VALUES "
                   f"('{org.org_id}', '{{{acct}}}', 1) RETURNING id").splitlines()[0]
    sql(pg, f"INSERT INTO scan_units (scan_id, org_id, aws_account_id, region, status, "
            f"lease_owner, lease_expires_at, attempts) VALUES ('{sid2}', '{org.org_id}', "
            f"'{acct}', 'us-east-1', 'running', 'dead/worker', now() - interval '1 s', 3)")
    done = wait_until(lambda: finished(org, sid2), 15, what="abandoned unit failed")
    assert done["status"] == "failed" and done["errors"][0]["code"] == "abandoned"


def seed_items(pg, org, sid, acct):
    rows = [("ebs_unattached", "vol-1", "us-east-1", 8.0), ("ebs_unattached", "vol-2", "us-east-1", 2.5),
            ("eip_unassociated", "eipalloc-1", "eu-west-1", 3.65)]
    ids = []
    for typ, res, region, cost in rows:
        ids.append(sql(pg, waste_item_sql(org.org_id, sid, acct, region, typ, res,
                                          cost)).splitlines()[0])
    return ids


def test_waste_items_approve_dismiss_and_report(srv, pg):
    org, other = Org(srv, pg), Org(srv, pg)
    acct = org.account()
    sid = org.post("/api/v1/scans", {"aws_account_ids": [acct]}).json()["id"]
    v = wait_until(lambda: finished(org, sid), 15, what="scan finished")["version"]
    ids = seed_items(pg, org, sid, acct)
    items = org.get(f"/api/v1/waste-items?scan_id={sid}").json()["items"]
    assert {i["resource_id"] for i in items} == {"vol-1", "vol-2", "eipalloc-1"}
    assert org.get("/api/v1/waste-items?type=eip_unassociated").json()["items"][0][
        "estimated_monthly_cost_usd"] == 3.65
    assert org.get("/api/v1/waste-items?status=bogus").status == 400
    # Approval by another connection wakes a poller on the scan.
    out = []
    t = threading.Thread(target=long_poll, args=(org, sid, v, 30, out))
    t.start()
    time.sleep(0.5)
    r = org.post(f"/api/v1/waste-items/{ids[0]}/approve", {})
    assert r.status == 200 and r.json()["status"] == "approved", r
    t.join(20)
    assert out and out[0][1].json()["version"] > v and out[0][1].json()["items"]["approved"] == 1
    assert org.post(f"/api/v1/waste-items/{ids[1]}/dismiss", {}).status == 200
    assert org.post(f"/api/v1/waste-items/{ids[1]}/dismiss", {}).status == 409
    assert other.post(f"/api/v1/waste-items/{ids[0]}/approve", {}).status == 404
    assert other.get(f"/api/v1/waste-items?scan_id={sid}").json()["items"] == []
    ev = sql(pg, f"SELECT event_type FROM audit_events WHERE resource_id IN "
                 f"('{ids[0]}', '{ids[1]}') ORDER BY seq").splitlines()
    assert ev == ["waste_item.approved", "waste_item.dismissed"]
    rep = org.get("/api/v1/reports/savings").json()
    assert rep["total_monthly_usd"] == pytest.approx(11.65) and rep["items"] == 2
    assert {g["type"]: g["monthly_usd"] for g in rep["by_type"]} == pytest.approx(
        {"ebs_unattached": 8.0, "eip_unassociated": 3.65})
    assert {g["region"] for g in rep["by_region"]} == {"us-east-1", "eu-west-1"}
    assert rep["by_account"][0]["account_id"] == acct and rep["pricing"]["as_of"]
    assert other.get("/api/v1/reports/savings").json()["total_monthly_usd"] == 0
    scan = org.get(f"/api/v1/scans/{sid}").json()
    assert scan["estimated_monthly_savings_usd"] == pytest.approx(11.65)


def test_no_scan_warnings_in_the_log(srv):
    # Runs last in this module: nothing above made the executor or the long poll complain.
    bad = [l for l in srv.log_lines() if isinstance(l, dict)
           and l.get("level") in ("warn", "error", "fatal")
           and str(l.get("event", "")).startswith("scan_")]
    assert not bad, bad[:5]
