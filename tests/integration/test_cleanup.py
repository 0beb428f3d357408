"""Cleanup of approved waste items against the fake AWS: the dry run reports whether the
action would succeed (DryRunOperation / UnauthorizedOperation), a resource that changed
between approval and cleanup is refused with 409 resource_changed and the item goes back
to open, the real run snapshots a volume before deleting it and stores the outcome with
the AWS request id and a waste_item.cleaned audit row, one table covers every other
action, an AWS error fails the item with its message, only approved items are cleaned,
the blast-radius caps (per request, per day) and the grace period refuse, members get
403 and other organizations 404."""
import concurrent.futures
import json
import uuid

import pytest

from conftest import Server, waste_item_sql

PASSWORD = "correct horse battery staple"
ACCT = "111111111111"
DENY_ACCT = "222222222222"
EXT = "ext-cleanup-0123456789"
REGION = "us-east-1"
MAX_PER_REQUEST = 3
MAX_PER_DAY = 6


def sql(pg, q):
    return pg.psql(q, db=pg.dbname).strip()


def call(srv, method, path, tok, body=None):
    h = {"Authorization": f"Bearer {tok}"}
    data = None
    if body is not None:
        h["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    return srv.https(method, path, headers=h, body=data)


def world(resources, deny_resources=None):
    """The fake's state: our role in ACCT (and a role denied deletes in DENY_ACCT)."""
    return {"regions": [REGION], "accounts": {
        ACCT: {"roles": [{"name": "CloudSweep", "external_id": EXT}],
               "regions": {REGION: resources}},
        DENY_ACCT: {"roles": [{"name": "CloudSweep", "external_id": EXT,
                               "deny": ["ec2:Delete*"]}],
                    "regions": {REGION: deny_resources or {}}},
    }}


def calls(fake_aws, **filters):
    return fake_aws.calls(**filters)["calls"]


def region_state(fake_aws, acct=ACCT):
    return fake_aws.state()["accounts"][acct]["regions"][REGION]


@pytest.fixture(scope="module")
def srv(workdir, tls_files, pg, fake_aws):
    fake_aws.reset(world({}))
    s = Server(workdir, tls_files, pg, name="cleanup",
               options={**fake_aws.options, "aws_regions": REGION,
                        "cleanup_max_items_per_request": MAX_PER_REQUEST,
                        "cleanup_max_items_per_day": MAX_PER_DAY})
    s.start()
    s.wait_ready()
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class Org:
    """An organization (owner = admin+), its AWS accounts and seeded waste items."""

    def __init__(self, srv, pg):
        self.srv, self.pg = srv, pg
        u = self._signup()
        self.id, self.tok = u["org"], u["token"]
        self.tokens = {"owner": self.tok}
        self.scan = sql(pg, f"INSERT INTO scans (org_id, status, account_ids) VALUES "
                            f"('{self.id}', 'succeeded', '{{}}') RETURNING id").splitlines()[0]
        self.accounts = {}

    def _signup(self):
        email = f"u{uuid.uuid4().hex[:12]}@example.com"
        r = call(self.srv, "POST", "/api/v1/auth/signup", None,
                 {"email": email, "password": PASSWORD, "org_name": "Sweepers"})
        assert r.status == 201, r
        body = r.json()
        return {"email": email, "user": body["user"]["id"], "org": body["org"]["id"],
                "token": self._login(email)}

    def _login(self, email):
        r = call(self.srv, "POST", "/api/v1/auth/login", None,
                 {"email": email, "password": PASSWORD})
        assert r.status == 200, r
        return r.json()["access_token"]

    def token(self, role):
        if role not in self.tokens:
            u = self._signup()
            sql(self.pg, f"DELETE FROM memberships WHERE user_id = '{u['user']}'; "
                         f"INSERT INTO memberships (org_id, user_id, role) VALUES "
                         f"('{self.id}', '{u['user']}', '{role}')")
            self.tokens[role] = self._login(u["email"])
        return self.tokens[role]

    def account(self, acct=ACCT):
        if acct not in self.accounts:
            r = call(self.srv, "POST", "/api/v1/aws-accounts", self.tok,
                     {"account_id": acct, "account_name": "Prod",
                      "role_arn": f"arn:aws:iam::{acct}:role/CloudSweep", "external_id": EXT,
                      "regions": [REGION]})
            assert r.status == 201, r
            self.accounts[acct] = r.json()["id"]
        return self.accounts[acct]

    def item(self, type_, resource_id, approve=True, acct=ACCT):
        iid = sql(self.pg, waste_item_sql(self.id, self.scan, self.account(acct), REGION, type_,
                                          resource_id)).splitlines()[0]
        if approve:
            r = call(self.srv, "POST", f"/api/v1/waste-items/{iid}/approve", self.tok, {})
            assert r.status == 200, r
        return iid

    def cleanup(self, iid, dry_run=None, tok=None):
        body = {} if dry_run is None else {"dry_run": dry_run}
        return call(self.srv, "POST", f"/api/v1/waste-items/{iid}/cleanup", tok or self.tok,
                    body)

    def batch(self, ids, dry_run=False):
        return call(self.srv, "POST", "/api/v1/waste-items/cleanup", self.tok,
                    {"ids": ids, "dry_run": dry_run})


def test_dry_run_reports_without_acting(srv, pg, fake_aws):
    fake_aws.reset(world({"volumes": [{"VolumeId": "vol-dry"}]},
                         {"volumes": [{"VolumeId": "vol-denied"}]}))
    org = Org(srv, pg)
    ok = org.item("ebs_unattached", "vol-dry")
    r = org.cleanup(ok, dry_run=True)
    assert r.status == 200, r
    body = r.json()
    assert body["would_succeed"] is True and body["action"] == "DeleteVolume", body
    assert body["dry_run"] is True
    dels = calls(fake_aws, action="DeleteVolume")
    assert [c["params"].get("DryRun") for c in dels] == ["true"]
    assert not calls(fake_aws, action="CreateSnapshot")
    assert [v["VolumeId"] for v in region_state(fake_aws)["volumes"]] == ["vol-dry"]
    denied = org.item("ebs_unattached", "vol-denied", acct=DENY_ACCT)
    r = org.cleanup(denied, dry_run=True)
    assert r.status == 200, r
    assert r.json()["would_succeed"] is False
    assert "UnauthorizedOperation" in r.json()["message"]
    # A dry run changes nothing on the item.
    assert sql(pg, f"SELECT status, outcome IS NULL FROM waste_items WHERE id = '{ok}'") \
        == "approved|t"


def test_refuses_when_the_resource_changed(srv, pg, fake_aws):
    fake_aws.reset(world({"volumes": [{"VolumeId": "vol-chg"}],
                          "addresses": [{"AllocationId": "eipalloc-chg"}]}))
    org = Org(srv, pg)
    vol = org.item("ebs_unattached", "vol-chg")
    eip = org.item("eip_unassociated", "eipalloc-chg")
    gone = org.item("nat_gateway_idle", "nat-gone")
    # Between approval and cleanup the volume was attached and the address associated.
    fake_aws.reset(world({"volumes": [{"VolumeId": "vol-chg",
                                       "Attachments": [{"InstanceId": "i-1"}]}],
                          "addresses": [{"AllocationId": "eipalloc-chg",
                                         "InstanceId": "i-1"}]}))
    for iid, changed in ((vol, "attached"), (eip, "associated"), (gone, "gone")):
        r = org.cleanup(iid)
        assert r.status == 409, r
        assert r.json()["error"]["code"] == "resource_changed"
        item = sql(pg, f"SELECT status, outcome->>'changed' FROM waste_items "
                       f"WHERE id = '{iid}'")
        assert item == f"open|{changed}", item
    assert not calls(fake_aws, action="DeleteVolume")
    assert not calls(fake_aws, action="ReleaseAddress")
    assert len(region_state(fake_aws)["volumes"]) == 1
    # Refused means re-approval first.
    assert org.cleanup(vol).status == 409


def test_real_deletion_snapshots_the_volume_first(srv, pg, fake_aws):
    fake_aws.reset(world({"volumes": [{"VolumeId": "vol-real", "Size": 42}]}))
    org = Org(srv, pg)
    iid = org.item("ebs_unattached", "vol-real")
    r = org.cleanup(iid, dry_run=False)
    assert r.status == 200, r
    item = r.json()
    assert item["status"] == "cleaned" and item["cleaned_at"], item
    st = region_state(fake_aws)
    assert st["volumes"] == []
    snaps = [s for s in st["snapshots"] if s["VolumeId"] == "vol-real"]
    assert len(snaps) == 1 and item["outcome"]["snapshot_id"] == snaps[0]["SnapshotId"]
    seq = [c["action"] for c in calls(fake_aws, service="ec2")]
    assert seq.index("CreateSnapshot") < seq.index("DeleteVolume")
    delete = calls(fake_aws, action="DeleteVolume")[-1]
    assert item["aws_request_id"] == delete["request_id"] and delete["request_id"]
    audit = sql(pg, f"SELECT details->>'aws_request_id', details->>'snapshot_id' FROM "
                    f"audit_events WHERE event_type = 'waste_item.cleaned' AND resource_id = "
                    f"'{iid}'")
    assert audit == f"{delete['request_id']}|{snaps[0]['SnapshotId']}"
    # Cleaned items are not cleaned twice.
    r = org.cleanup(iid)
    assert r.status == 409 and r.json()["error"]["code"] == "conflict"


LB_ARN = f"arn:aws:elasticloadbalancing:{REGION}:{ACCT}:loadbalancer/app/idle/0123456789abcdef"

# type, resource id, seed, check of the fake's region state afterwards
ACTIONS = [
    ("ebs_snapshot_orphaned", "snap-old", {"snapshots": [{"SnapshotId": "snap-old",
                                                          "VolumeId": "vol-x"}]},
     lambda st: st["snapshots"] == []),
    ("eip_unassociated", "eipalloc-idle", {"addresses": [{"AllocationId": "eipalloc-idle"}]},
     lambda st: st["addresses"] == []),
    ("eni_unattached", "eni-idle", {"network_interfaces": [{"NetworkInterfaceId": "eni-idle"}]},
     lambda st: st["network_interfaces"] == []),
    ("nat_gateway_idle", "nat-idle", {"nat_gateways": [{"NatGatewayId": "nat-idle"}]},
     lambda st: st["nat_gateways"][0]["State"] == "deleted"),
    ("ec2_idle", "i-idle", {"instances": [{"InstanceId": "i-idle"}]},
     lambda st: st["instances"][0]["State"] == "stopped"),
    ("ebs_gp2_to_gp3", "vol-gp2", {"volumes": [{"VolumeId": "vol-gp2", "VolumeType": "gp2",
                                                "Attachments": [{"InstanceId": "i-1"}]}]},
     lambda st: st["volumes"][0]["VolumeType"] == "gp3"),
    ("lb_idle", LB_ARN, {"load_balancers": [{"LoadBalancerName": "idle",
                                             "LoadBalancerArn": LB_ARN}]},
     lambda st: st["load_balancers"] == []),
    ("rds_idle", "db-idle", {"db_instances": [{"DBInstanceIdentifier": "db-idle"}]},
     lambda st: st["db_instances"][0]["DBInstanceStatus"] == "stopped"),
    ("rds_stopped", "db-stopped", {"db_instances": [{"DBInstanceIdentifier": "db-stopped",
                                                     "DBInstanceStatus": "stopped"}]},
     lambda st: st["db_instances"] == [] and st["db_snapshots"][0]["DBSnapshotIdentifier"]
     .startswith("cloudsweep-final-db-stopped-")),
]


@pytest.mark.parametrize("type_,rid,seed,check", ACTIONS, ids=[a[0] for a in ACTIONS])
def test_each_action(srv, pg, fake_aws, type_, rid, seed, check):
    fake_aws.reset(world(seed))
    org = Org(srv, pg)
    iid = org.item(type_, rid)
    r = org.cleanup(iid, dry_run=False)
    assert r.status == 200, r
    assert r.json()["status"] == "cleaned", r.json()
    assert r.json()["aws_request_id"]
    assert check(region_state(fake_aws)), region_state(fake_aws)


def test_aws_error_fails_the_item(srv, pg, fake_aws):
    fake_aws.reset(world({"db_instances": [{"DBInstanceIdentifier": "db-prot",
                                            "DBInstanceStatus": "stopped",
                                            "DeletionProtection": True}]}))
    org = Org(srv, pg)
    iid = org.item("rds_stopped", "db-prot")
    r = org.cleanup(iid)
    assert r.status == 200, r
    item = r.json()
    assert item["status"] == "failed" and item["cleaned_at"] is None
    assert item["outcome"]["error_code"] == "InvalidParameterCombination"
    assert "deletion protection" in item["outcome"]["message"]
    assert len(region_state(fake_aws)["db_instances"]) == 1
    assert sql(pg, f"SELECT result FROM audit_events WHERE event_type = 'waste_item.cleaned' "
                   f"AND resource_id = '{iid}'") == "error"


def test_only_approved_items_and_roles(srv, pg, fake_aws):
    fake_aws.reset(world({"addresses": [{"AllocationId": "eipalloc-open"}]}))
    org = Org(srv, pg)
    opened = org.item("eip_unassociated", "eipalloc-open", approve=False)
    r = org.cleanup(opened)
    assert r.status == 409 and r.json()["error"]["code"] == "conflict", r
    approved = org.item("eip_unassociated", "eipalloc-open2")
    for role in ("member", "viewer"):
        r = org.cleanup(approved, tok=org.token(role))
        assert r.status == 403, r
    other = Org(srv, pg)
    r = other.cleanup(approved)
    assert r.status == 404 and r.json()["error"]["code"] == "not_found", r
    r = org.cleanup(str(uuid.uuid4()))
    assert r.status == 404
    r = org.cleanup(approved, dry_run="yes")
    assert r.status == 400 and "dry_run" in r.json()["error"]["message"]
    assert not calls(fake_aws, action="ReleaseAddress")


def test_batch_and_caps(srv, pg, fake_aws):
    fake_aws.reset(world({"addresses": [{"AllocationId": f"eipalloc-b{i}"} for i in range(3)]}))
    org = Org(srv, pg)
    ids = [org.item("eip_unassociated", f"eipalloc-b{i}") for i in range(3)]
    open_one = org.item("eip_unassociated", "eipalloc-none", approve=False)
    r = org.batch(ids + [open_one])
    assert r.status == 409 and r.json()["error"]["code"] == "cleanup_batch_too_large", r
    r = org.batch([ids[0], ids[0]])
    assert r.status == 400
    r = org.batch(ids[:2] + [open_one], dry_run=True)
    assert r.status == 200, r
    res = r.json()["results"]
    assert [x.get("would_succeed") for x in res] == [True, True, None]
    assert res[2]["error"]["code"] == "conflict"
    r = org.batch(ids[:2] + [open_one])
    assert r.status == 200, r
    res = r.json()["results"]
    assert [x["ok"] for x in res] == [True, True, False]
    assert [x["item"]["status"] for x in res[:2]] == ["cleaned", "cleaned"]
    assert [a["AllocationId"] for a in region_state(fake_aws)["addresses"]] == ["eipalloc-b2"]
    # Per day: 2 attempts so far; pretend 4 more happened today.
    sql(pg, f"UPDATE waste_items SET outcome = jsonb_build_object('attempted_at', now()::text) "
            f"WHERE id IN (SELECT id FROM waste_items WHERE org_id = '{org.id}' AND "
            f"outcome IS NULL AND id <> '{ids[2]}' LIMIT 1)")
    for _ in range(3):
        org.item("eip_unassociated", f"eipalloc-{uuid.uuid4().hex[:8]}", approve=False)
    sql(pg, f"UPDATE waste_items SET outcome = jsonb_build_object('attempted_at', now()::text) "
            f"WHERE org_id = '{org.id}' AND outcome IS NULL AND status = 'open' AND "
            f"id <> '{open_one}'")
    r = org.cleanup(ids[2])
    assert r.status == 429 and r.json()["error"]["code"] == "cleanup_daily_limit", r
    # Dry runs do not count against the cap.
    assert org.cleanup(ids[2], dry_run=True).status == 200
    assert len(region_state(fake_aws)["addresses"]) == 1


def test_daily_cap_holds_across_racing_requests(srv, pg, fake_aws):
    n = 6
    fake_aws.reset(world({"addresses": [{"AllocationId": f"eipalloc-r{i}"} for i in range(n)]}))
    org = Org(srv, pg)
    ids = [org.item("eip_unassociated", f"eipalloc-r{i}") for i in range(n)]
    # MAX_PER_DAY - 2 cleanups already today: two more may act, whoever asks at once.
    for _ in range(MAX_PER_DAY - 2):
        org.item("eip_unassociated", f"eipalloc-{uuid.uuid4().hex[:8]}", approve=False)
    sql(pg, f"UPDATE waste_items SET outcome = jsonb_build_object('attempted_at', now()::text) "
            f"WHERE org_id = '{org.id}' AND status = 'open'")
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        rs = list(ex.map(org.cleanup, ids))
    codes = sorted(r.status for r in rs)
    assert codes == [200, 200] + [429] * (n - 2), [(r.status, r.json()) for r in rs]
    assert all(r.json()["error"]["code"] == "cleanup_daily_limit" for r in rs if r.status == 429)
    assert len(calls(fake_aws, action="ReleaseAddress")) == 2
    assert len(region_state(fake_aws)["addresses"]) == n - 2


def test_grace_period_marks_then_acts(workdir, tls_files, pg, fake_aws):
    fake_aws.reset(world({"addresses": [{"AllocationId": "eipalloc-grace"}]}))
    s = Server(workdir, tls_files, pg, name="cleanup-grace",
               options={**fake_aws.options, "aws_regions": REGION, "cleanup_grace_days": 2})
    s.start()
    s.wait_ready()
    try:
        org = Org(s, pg)
        iid = org.item("eip_unassociated", "eipalloc-grace", approve=False)
        r = call(s, "POST", f"/api/v1/waste-items/{iid}/approve", org.tok, {})
        assert r.status == 200 and r.json()["status"] == "approved", r
        mark = r.json()["marked_for_deletion"]
        assert mark["ok"] is True and mark["tag"] == "cloudsweep:marked-for-deletion", mark
        tags = region_state(fake_aws)["addresses"][0]["Tags"]
        assert {"Key": "cloudsweep:marked-for-deletion", "Value": mark["value"]} in tags
        r = org.cleanup(iid)
        assert r.status == 409 and r.json()["error"]["code"] == "grace_period", r
        sql(pg, f"UPDATE waste_items SET approved_at = now() - interval '3 days' "
                f"WHERE id = '{iid}'")
        r = org.cleanup(iid)
        assert r.status == 200 and r.json()["status"] == "cleaned", r
    finally:
        problems = s.finish()
    assert not problems, problems


def test_one_cleanup_at_a_time(srv, pg, fake_aws):
    fake_aws.reset(world({"addresses": [{"AllocationId": "eipalloc-busy"}]}))
    org = Org(srv, pg)
    iid = org.item("eip_unassociated", "eipalloc-busy")
    # Another request claimed the item a moment ago and is still acting.
    sql(pg, f"UPDATE waste_items SET outcome = jsonb_build_object('in_progress', true, "
            f"'attempted_at', now()::text) WHERE id = '{iid}'")
    r = org.cleanup(iid)
    assert r.status == 409 and "in progress" in r.json()["error"]["message"], r
    assert not calls(fake_aws, action="ReleaseAddress")
    # A claim left behind by a worker that died is taken over after 10 minutes.
    sql(pg, f"UPDATE waste_items SET outcome = jsonb_build_object('in_progress', true, "
            f"'attempted_at', (now() - interval '11 minutes')::text) WHERE id = '{iid}'")
    r = org.cleanup(iid)
    assert r.status == 200 and r.json()["status"] == "cleaned", r
