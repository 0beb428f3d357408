"""The scanner's detectors end to end: the real daemon scans a world seeded in the fake
AWS (tests/fakes/fake_aws.py) through an assumed role. A table of seeded resources names
the findings expected; everything else in the world is in use or a trap (a snapshot used by
a disabled AMI, a protected volume, an instance with no datapoints, an associated EIP) and
must not be reported. Also: pagination (page size 2), a throttled check makes the scan
partial and names the check, a worker killed mid-scan does not stop the scan, and every
credential read is audited with the scan id."""
import datetime
import json
import os
import signal
import time
import uuid

import pytest

from conftest import Server, wait_until

PASSWORD = "correct horse battery staple"
ACCT = "111111111111"
REGION = "us-east-1"
EXT = "ext-detectors-0001"
ROLE = "CloudSweepScan"
NOW = datetime.datetime.now(datetime.timezone.utc)
OLD = "2024-01-01T00:00:00Z"


def ago(days):
    return (NOW - datetime.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def daily(ns, name, dim, value, values):
    """One datapoint a day at noon, yesterday first, for each value."""
    base = NOW.replace(hour=12, minute=0, second=0, microsecond=0)
    pts = [{"Timestamp": (base - datetime.timedelta(days=i + 1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Value": v} for i, v in enumerate(values)]
    return {"Namespace": ns, "MetricName": name, "Dimensions": {dim: value}, "Datapoints": pts}


def protect(tags=None):
    t = {"cloudsweep:protect": "yes"}
    t.update(tags or {})
    return t


ALB_BUSY = f"arn:aws:elasticloadbalancing:{REGION}:{ACCT}:loadbalancer/app/busy/0123456789abcdef"
ALB_EMPTY = f"arn:aws:elasticloadbalancing:{REGION}:{ACCT}:loadbalancer/app/empty/1111111111111111"
ALB_SICK = f"arn:aws:elasticloadbalancing:{REGION}:{ACCT}:loadbalancer/app/sick/2222222222222222"
ALB_QUIET = f"arn:aws:elasticloadbalancing:{REGION}:{ACCT}:loadbalancer/app/quiet/3333333333333333"

# (kind, resource, expected finding type or None): the seeded world and what must be found.
WORLD = [
    ("volumes", {"VolumeId": "vol-unattached", "Size": 100, "VolumeType": "gp3"},
     "ebs_unattached"),
    ("volumes", {"VolumeId": "vol-protected", "Size": 100, "VolumeType": "gp3",
                 "Tags": protect()}, None),
    ("volumes", {"VolumeId": "vol-inuse", "Size": 50, "VolumeType": "gp3",
                 "Attachments": [{"InstanceId": "i-busy"}]}, None),
    ("volumes", {"VolumeId": "vol-on-stopped", "Size": 30, "VolumeType": "gp3",
                 "Attachments": [{"InstanceId": "i-stopped-old"}]}, "ebs_stopped_instance"),
    ("volumes", {"VolumeId": "vol-on-recent", "Size": 30, "VolumeType": "gp3",
                 "Attachments": [{"InstanceId": "i-stopped-new"}]}, None),
    ("volumes", {"VolumeId": "vol-gp2", "Size": 500, "VolumeType": "gp2",
                 "Attachments": [{"InstanceId": "i-busy"}]}, "ebs_gp2_to_gp3"),
    ("instances", {"InstanceId": "i-busy", "InstanceType": "m5.large"}, None),
    ("instances", {"InstanceId": "i-idle", "InstanceType": "m5.large"}, "ec2_idle"),
    ("instances", {"InstanceId": "i-nodata", "InstanceType": "m5.large"}, None),
    ("instances", {"InstanceId": "i-stopped-old", "InstanceType": "m5.large",
                   "State": "stopped", "StopTime": OLD}, None),
    ("instances", {"InstanceId": "i-stopped-new", "InstanceType": "m5.large",
                   "State": "stopped", "StopTime": ago(2)}, None),
    ("snapshots", {"SnapshotId": "snap-orphan", "VolumeId": "vol-gone", "StartTime": OLD,
                   "VolumeSize": 20}, "ebs_snapshot_orphaned"),
    ("snapshots", {"SnapshotId": "snap-ami", "VolumeId": "vol-gone", "StartTime": OLD}, None),
    ("snapshots", {"SnapshotId": "snap-young", "VolumeId": "vol-gone",
                   "StartTime": ago(3)}, None),
    ("snapshots", {"SnapshotId": "snap-live", "VolumeId": "vol-inuse", "StartTime": OLD}, None),
    ("snapshots", {"SnapshotId": "snap-backup", "VolumeId": "vol-gone", "StartTime": OLD,
                   "Tags": {"aws:backup:source-resource": "arn:x"}}, None),
    ("snapshots", {"SnapshotId": "snap-protected", "VolumeId": "vol-gone", "StartTime": OLD,
                   "Tags": protect()}, None),
    ("images", {"ImageId": "ami-disabled", "State": "disabled", "SnapshotIds": ["snap-ami"],
                "DeprecationTime": OLD}, None),
    ("addresses", {"AllocationId": "eipalloc-free"}, "eip_unassociated"),
    ("addresses", {"AllocationId": "eipalloc-used", "InstanceId": "i-busy"}, None),
    ("network_interfaces", {"NetworkInterfaceId": "eni-free"}, "eni_unattached"),
    ("network_interfaces", {"NetworkInterfaceId": "eni-used",
                            "Attachment": {"InstanceId": "i-busy"}}, None),
    ("nat_gateways", {"NatGatewayId": "nat-idle"}, "nat_gateway_idle"),
    ("nat_gateways", {"NatGatewayId": "nat-busy"}, None),
    ("load_balancers", {"LoadBalancerName": "busy", "LoadBalancerArn": ALB_BUSY}, None),
    ("load_balancers", {"LoadBalancerName": "empty", "LoadBalancerArn": ALB_EMPTY}, "lb_idle"),
    ("load_balancers", {"LoadBalancerName": "sick", "LoadBalancerArn": ALB_SICK}, "lb_idle"),
    ("load_balancers", {"LoadBalancerName": "quiet", "LoadBalancerArn": ALB_QUIET}, "lb_idle"),
    ("target_groups", {"TargetGroupName": "tg-busy", "LoadBalancerArns": [ALB_BUSY],
                       "Targets": [{"Id": "i-busy"}]}, None),
    ("target_groups", {"TargetGroupName": "tg-sick", "LoadBalancerArns": [ALB_SICK],
                       "Targets": [{"Id": "i-busy", "State": "unhealthy"}]}, None),
    ("target_groups", {"TargetGroupName": "tg-quiet", "LoadBalancerArns": [ALB_QUIET],
                       "Targets": [{"Id": "i-busy"}]}, None),
    ("classic_load_balancers", {"LoadBalancerName": "clb-dead", "Instances": [
        {"InstanceId": "i-busy", "State": "OutOfService"}]}, "lb_idle"),
    ("db_instances", {"DBInstanceIdentifier": "db-stopped", "DBInstanceStatus": "stopped"},
     "rds_stopped"),
    ("db_instances", {"DBInstanceIdentifier": "db-idle"}, "rds_idle"),
    ("db_instances", {"DBInstanceIdentifier": "db-busy"}, None),
    ("db_instances", {"DBInstanceIdentifier": "db-protected", "DBInstanceStatus": "stopped",
                      "Tags": protect()}, None),
]

METRICS = [
    daily("AWS/EC2", "CPUUtilization", "InstanceId", "i-busy", [60.0] * 14),
    daily("AWS/EC2", "NetworkIn", "InstanceId", "i-busy", [5e8] * 14),
    daily("AWS/EC2", "NetworkOut", "InstanceId", "i-busy", [5e8] * 14),
    daily("AWS/EC2", "CPUUtilization", "InstanceId", "i-idle", [1.0] * 14),
    daily("AWS/EC2", "NetworkIn", "InstanceId", "i-idle", [1000.0] * 14),
    daily("AWS/EC2", "NetworkOut", "InstanceId", "i-idle", [1000.0] * 14),
    daily("AWS/NATGateway", "BytesOutToDestination", "NatGatewayId", "nat-idle", [0.0] * 30),
    daily("AWS/NATGateway", "BytesInFromSource", "NatGatewayId", "nat-idle", [0.0] * 30),
    daily("AWS/NATGateway", "BytesOutToDestination", "NatGatewayId", "nat-busy", [1e9] * 30),
    daily("AWS/ApplicationELB", "RequestCount", "LoadBalancer", "app/busy/0123456789abcdef",
          [5000.0] * 7),
    daily("AWS/ApplicationELB", "RequestCount", "LoadBalancer", "app/quiet/3333333333333333",
          [3.0] * 7),
    daily("AWS/RDS", "DatabaseConnections", "DBInstanceIdentifier", "db-idle", [0.0] * 7),
    daily("AWS/RDS", "DatabaseConnections", "DBInstanceIdentifier", "db-busy", [4.0] * 7),
]

def world(page_size=2, regions=(REGION,)):
    res = {}
    for kind, r, _ in WORLD:
        res.setdefault(kind, []).append(json.loads(json.dumps(r)))
    res["metrics"] = json.loads(json.dumps(METRICS))
    doc = {"page_size": page_size, "regions": list(regions),
           "accounts": {ACCT: {"roles": [{"name": ROLE, "external_id": EXT}],
                               "regions": {REGION: res}}}}
    return doc


ID_FIELD = {"volumes": "VolumeId", "instances": "InstanceId", "snapshots": "SnapshotId",
            "addresses": "AllocationId", "network_interfaces": "NetworkInterfaceId",
            "nat_gateways": "NatGatewayId", "load_balancers": "LoadBalancerArn",
            "classic_load_balancers": "LoadBalancerName",
            "db_instances": "DBInstanceIdentifier"}


def expected_ids():
    return sorted((typ, r[ID_FIELD[kind]]) for kind, r, typ in WORLD if typ)


def sql(pg, q):
    return pg.psql(q, db=pg.dbname).strip()


def post(srv, path, body, tok):
    return srv.https("POST", path, headers={"Content-Type": "application/json",
                                            "Authorization": f"Bearer {tok}"},
                     body=json.dumps(body).encode())


def get(srv, path, tok):
    return srv.get(path, headers={"Authorization": f"Bearer {tok}"})


@pytest.fixture(scope="module")
def srv(workdir, tls_files, pg, fake_aws):
    s = Server(workdir, tls_files, pg, name="detectors",
               options={**fake_aws.options, "workers": 2, "scan_lease_s": 3, "scan_poll_s": 1,
                        "aws_regions": "us-east-1,eu-west-1", "aws_attempts": 3})
    s.start()
    wait_until(lambda: all(s.get("/ready").status == 200 for _ in range(8)), 15,
               what="every worker ready")
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def org(srv, fake_aws):
    # A fresh organization per test: the workers cache assumed-role credentials per
    # (organization, role), and a reset of the fake forgets the ones it issued.
    email = f"u{uuid.uuid4().hex[:12]}@example.com"
    r = srv.https("POST", "/api/v1/auth/signup", headers={"Content-Type": "application/json"},
                  body=json.dumps({"email": email, "password": PASSWORD,
                                   "org_name": "Detectors"}).encode())
    assert r.status == 201, r
    org_id = r.json()["org"]["id"]
    r = srv.https("POST", "/api/v1/auth/login", headers={"Content-Type": "application/json"},
                  body=json.dumps({"email": email, "password": PASSWORD}).encode())
    tok = r.json()["access_token"]
    r = post(srv, "/api/v1/aws-accounts",
             {"account_id": ACCT, "account_name": "Seeded",
              "role_arn": f"arn:aws:iam::{ACCT}:role/{ROLE}", "external_id": EXT,
              "regions": [REGION, "eu-west-1"]}, tok)
    assert r.status == 201, r
    return {"id": org_id, "token": tok, "account": r.json()["id"]}


def run_scan(srv, org, body=None, timeout=60):
    b = {"aws_account_ids": [org["account"]], "regions": [REGION]}
    b.update(body or {})
    r = post(srv, "/api/v1/scans", b, org["token"])
    assert r.status == 202, r
    sid = r.json()["id"]

    def done():
        s = get(srv, f"/api/v1/scans/{sid}", org["token"]).json()
        return s if s["status"] in ("succeeded", "partial", "failed") else None
    return wait_until(done, timeout, what="scan finished")


def findings(srv, org, sid):
    r = get(srv, f"/api/v1/waste-items?scan_id={sid}&limit=500", org["token"])
    assert r.status == 200, r
    return r.json()["items"]


def test_each_detector_finds_exactly_the_seeded_waste(srv, pg, org, fake_aws):
    fake_aws.reset(world(page_size=2))
    scan = run_scan(srv, org)
    assert scan["status"] == "succeeded", scan
    items = findings(srv, org, scan["id"])
    got = sorted((i["type"], i["resource_id"]) for i in items)
    assert got == expected_ids()
    for i in items:
        assert i["region"] == REGION and i["details"].get("why"), i
        assert i["estimated_monthly_cost_usd"] is not None
    by = {i["resource_id"]: i for i in items}
    assert float(by["vol-unattached"]["estimated_monthly_cost_usd"]) > 0
    assert float(by["eipalloc-free"]["estimated_monthly_cost_usd"]) > 0
    assert float(by["vol-gp2"]["estimated_monthly_cost_usd"]) > 0
    assert by["i-idle"]["details"]["idle_days"] >= 4
    # The instance without datapoints is not idle: the scan says there was not enough data.
    notes = [e for e in scan["errors"] if e.get("code") == "insufficient_data"]
    assert any("i-nodata" in e["message"] for e in notes), scan["errors"]
    # Pages of 2 were followed; CloudWatch was asked in batches, not per resource.
    calls = fake_aws.calls()["calls"]
    vols = [c for c in calls if c.get("action") == "DescribeVolumes"]
    assert len(vols) >= 3, len(vols)
    cw = [c for c in calls if c.get("action") == "GetMetricData"]
    assert 1 <= len(cw) <= 12, len(cw)
    assert scan["progress"]["api_calls"] >= len(vols) + len(cw)
    # The disabled AMI was looked for.
    imgs = [c for c in calls if c.get("action") == "DescribeImages"]
    assert imgs and all(c["params"].get("IncludeDisabled") == "true" for c in imgs), imgs[:1]


def test_throttled_check_makes_the_scan_partial(srv, pg, org, fake_aws):
    fake_aws.reset(world(page_size=50))
    fake_aws.faults([{"type": "throttle", "action": "DescribeAddresses"}])
    scan = run_scan(srv, org)
    fake_aws.faults([])
    assert scan["status"] == "partial", scan
    skipped = [e for e in scan["errors"] if e.get("check") == "eip_unassociated"]
    assert skipped and skipped[0]["code"] == "RequestLimitExceeded", scan["errors"]
    assert "DescribeAddresses" in skipped[0]["message"]
    got = {(i["type"], i["resource_id"]) for i in findings(srv, org, scan["id"])}
    assert ("eip_unassociated", "eipalloc-free") not in got
    assert ("ebs_unattached", "vol-unattached") in got


def test_credential_reads_are_audited_with_the_scan_id(srv, pg, org, fake_aws):
    fake_aws.reset(world(page_size=50))
    scan = run_scan(srv, org, {"checks": ["eip_unassociated"]})
    assert scan["status"] == "succeeded", scan
    rows = sql(pg, f"SELECT details::text FROM audit_events WHERE event_type = "
                   f"'credential.read' AND org_id = '{org['id']}' AND details::text LIKE "
                   f"'%{scan['id']}%'").splitlines()
    assert len(rows) == 1, rows
    assert EXT not in "\n".join(rows)
    # The role was assumed with the organization as source identity.
    sts = [c for c in fake_aws.calls()["calls"] if c.get("action") == "AssumeRole"]
    assert sts and all(c["params"]["SourceIdentity"] == org["id"] and
                       c["params"]["RoleSessionName"] == "scan" and
                       c["params"]["ExternalId"] == EXT for c in sts), sts


def test_killed_worker_mid_scan_still_completes(srv, pg, org, fake_aws):
    fake_aws.reset(world(page_size=50, regions=(REGION, "eu-west-1")))
    fake_aws.faults([{"type": "latency", "ms": 1500, "action": "DescribeVolumes"}])
    r = post(srv, "/api/v1/scans", {"aws_account_ids": [org["account"]],
                                    "regions": [REGION, "eu-west-1"]}, org["token"])
    assert r.status == 202, r
    sid = r.json()["id"]

    def owner():
        v = sql(pg, f"SELECT lease_owner FROM scan_units WHERE scan_id = '{sid}' AND "
                    f"status = 'running' LIMIT 1")
        return v.split("/")[0] if v else None
    pid = int(wait_until(owner, 30, interval=0.05, what="a unit running"))
    assert pid in srv.workers()
    os.kill(pid, signal.SIGKILL)
    fake_aws.faults([])

    def done():
        s = get(srv, f"/api/v1/scans/{sid}", org["token"])
        if s.status != 200:
            return None
        s = s.json()
        return s if s["status"] in ("succeeded", "partial", "failed") else None
    scan = wait_until(done, 90, what="scan finished after a worker died")
    assert scan["status"] == "succeeded", scan
    assert scan["progress"]["units_done"] == 2
    got = sorted((i["type"], i["resource_id"]) for i in findings(srv, org, sid))
    assert got == expected_ids()
