"""Tests of the fake AWS itself, so that a daemon test passing against it means something.

The fake runs as a subprocess (HTTP and HTTPS on loopback) and is driven with botocore's
own clients (real SigV4 signing, real XML/JSON parsers) and with raw requests signed by a
small independent signer below, which can also sign wrongly on purpose. Raw sockets check
its HTTP/1.1 framing (chunked bodies, 100-continue, pipelining, refusals).

Run: /usr/bin/python3 -m pytest -q tests/fakes
"""

import concurrent.futures
import datetime
import hashlib
import hmac
import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from xml.etree import ElementTree

import botocore.config
import botocore.exceptions
import botocore.parsers
import botocore.session
import pytest

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_aws.py"

ACCT = "111111111111"
CUSTOMER = "222222222222"
AKID = "AKIAFAKEBASE0000001"
SECRET = "base-secret-0001"
LIMITED_AKID = "AKIAFAKELIMITED0002"
LIMITED_SECRET = "limited-secret-0002"
REGION = "us-east-1"
ROLE = "arn:aws:iam::%s:role/CloudSweepScan" % CUSTOMER
OPEN_ROLE = "arn:aws:iam::%s:role/Misconfigured" % CUSTOMER
READONLY_ROLE = "arn:aws:iam::%s:role/ReadOnly" % CUSTOMER
EXTERNAL_ID = "cs-ext-7f3a9c"
SESSION = botocore.session.get_session()  # one session: service models load once
NO_RETRY = botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=5,
                                  connect_timeout=5)


def world():
    """The seed most tests start from: a base account and a customer account."""
    now = datetime.datetime.now(datetime.timezone.utc)
    past = (now - datetime.timedelta(days=30)).isoformat()
    return {
        "page_size": 3,
        "accounts": {
            ACCT: {"access_keys": [
                {"id": AKID, "secret": SECRET, "user": "cloudsweep"},
                {"id": LIMITED_AKID, "secret": LIMITED_SECRET, "user": "limited",
                 "deny": ["ec2:Delete*", "sts:AssumeRole"]}],
                "regions": {REGION: {"kms_keys": [
                    {"KeyId": "1234abcd-0000-0000-0000-000000000001",
                     "Aliases": ["alias/cloudsweep"]},
                    {"KeyId": "1234abcd-0000-0000-0000-000000000002"}]}}},
            CUSTOMER: {
                "roles": [
                    {"name": "CloudSweepScan", "external_id": EXTERNAL_ID},
                    {"name": "Misconfigured"},
                    {"name": "ReadOnly", "external_id": EXTERNAL_ID,
                     "deny": ["ec2:Delete*", "ec2:Stop*", "rds:Delete*"]},
                ],
                "regions": {REGION: {
                    "volumes": [
                        {"VolumeId": "vol-%02d" % i, "Size": 10 + i,
                         "Tags": {"team": "a"} if i % 2 else {}} for i in range(7)
                    ] + [{"VolumeId": "vol-attached", "Attachments": [{"InstanceId": "i-run"}]}],
                    "snapshots": [{"SnapshotId": "snap-free", "VolumeId": "vol-00"},
                                  {"SnapshotId": "snap-ami", "VolumeId": "vol-01"},
                                  {"SnapshotId": "snap-other", "OwnerId": "999999999999"}],
                    "images": [
                        {"ImageId": "ami-live", "SnapshotIds": []},
                        {"ImageId": "ami-disabled", "State": "disabled",
                         "SnapshotIds": ["snap-ami"]},
                        {"ImageId": "ami-old", "DeprecationTime": past}],
                    "addresses": [{"AllocationId": "eipalloc-free", "PublicIp": "198.51.100.1"},
                                  {"AllocationId": "eipalloc-used", "PublicIp": "198.51.100.2",
                                   "InstanceId": "i-run"}],
                    "instances": [
                        {"InstanceId": "i-run", "LaunchTime": past},
                        {"InstanceId": "i-stopped", "State": "stopped", "LaunchTime": past,
                         "StopTime": past},
                        {"InstanceId": "i-gone", "State": "terminated"}],
                    "nat_gateways": [{"NatGatewayId": "nat-1", "Tags": {"env": "dev"}}],
                    "network_interfaces": [
                        {"NetworkInterfaceId": "eni-free"},
                        {"NetworkInterfaceId": "eni-used", "Attachment": {"InstanceId": "i-run"}}],
                    "load_balancers": [{"LoadBalancerName": "lb-%d" % i} for i in range(5)],
                    "target_groups": [{"TargetGroupName": "tg-1", "Targets": [
                        {"Id": "i-run", "State": "healthy"},
                        {"Id": "i-stopped", "State": "unhealthy"}]}],
                    "classic_load_balancers": [{"LoadBalancerName": "old-lb", "Instances": [
                        {"InstanceId": "i-run", "State": "OutOfService"}]}],
                    "db_instances": [{"DBInstanceIdentifier": "db-%02d" % i} for i in range(25)]
                    + [{"DBInstanceIdentifier": "db-protected", "DeletionProtection": True}],
                    "metrics": [{"Namespace": "AWS/EC2", "MetricName": "CPUUtilization",
                                 "Dimensions": {"InstanceId": "i-run"},
                                 "Datapoints": [{"Timestamp": (now - datetime.timedelta(
                                     hours=h)).isoformat(), "Value": float(h)}
                                     for h in range(1, 11)]}],
                }},
            },
        },
    }


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fake(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake-aws-tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, str(FAKE), "--http-port", "0", "--https-port",
                             "0", "--cert", str(cert), "--key", str(key)],
                            stdout=subprocess.PIPE, text=True)
    ports = json.loads(proc.stdout.readline())
    yield {"http": ports["http_port"], "https": ports["https_port"], "proc": proc,
           "cert": str(cert)}
    proc.terminate()
    proc.wait(10)


class Fake:
    def __init__(self, info):
        self.port = info["http"]
        self.https_port = info["https"]
        self.cert = info["cert"]
        self.url = "http://127.0.0.1:%d" % self.port
        self.session = SESSION

    def control(self, method, path, doc=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        body = json.dumps(doc).encode() if doc is not None else None
        conn.request(method, "/__fake/" + path, body=body)
        r = conn.getresponse()
        out = json.loads(r.read())
        conn.close()
        assert r.status == 200, out
        return out

    def faults(self, *rules, **kw):
        return self.control("POST", "faults", dict(kw, faults=list(rules)))

    def calls(self, **filters):
        q = urllib.parse.urlencode(filters)
        return self.control("GET", "calls" + ("?" + q if q else ""))["calls"]

    def client(self, service, akid=AKID, secret=SECRET, token=None, region=REGION, https=False,
               config=NO_RETRY):
        url = ("https://127.0.0.1:%d" % self.https_port) if https else self.url
        return self.session.create_client(
            service, endpoint_url=url, region_name=region, aws_access_key_id=akid,
            aws_secret_access_key=secret, aws_session_token=token,
            verify=self.cert if https else None, config=config)

    def customer(self, service, role=ROLE, external_id=EXTERNAL_ID, **kw):
        c = self.client("sts").assume_role(RoleArn=role, RoleSessionName="cloudsweep-test",
                                           ExternalId=external_id)["Credentials"]
        return self.client(service, c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"],
                           **kw)


@pytest.fixture
def aws(fake):
    f = Fake(fake)
    f.control("POST", "reset", world())
    return f


def code_of(exc_info):
    e = exc_info.value
    return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]


# ---------------------------------------------------------------------------------------
# An independent SigV4 signer (not botocore), able to sign wrongly on purpose
# ---------------------------------------------------------------------------------------


def _hmac(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign(method, host, path, query, headers, body, akid, secret, region, service, when=None,
         token=None):
    when = when or datetime.datetime.now(datetime.timezone.utc)
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    headers = dict(headers, Host=host, **{"X-Amz-Date": amz_date})
    if token:
        headers["X-Amz-Security-Token"] = token
    lower = {k.lower(): " ".join(v.split()) for k, v in headers.items()}
    signed = sorted(lower)
    canon_q = "&".join(sorted("%s=%s" % (urllib.parse.quote(k, safe="-_.~"),
                                         urllib.parse.quote(v, safe="-_.~"))
                              for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)))
    canonical = "\n".join([method, path, canon_q,
                           "".join("%s:%s\n" % (h, lower[h]) for h in signed),
                           ";".join(signed), hashlib.sha256(body).hexdigest()])
    scope = "%s/%s/%s/aws4_request" % (amz_date[:8], region, service)
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                     hashlib.sha256(canonical.encode()).hexdigest()])
    k = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret).encode(), amz_date[:8]), region), service),
              "aws4_request")
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = ("AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, "
                                "Signature=%s" % (akid, scope, ";".join(signed), sig))
    return headers


def raw(aws, service, params, akid=AKID, secret=SECRET, method="POST", when=None, token=None,
        tamper=None, sign_secret=None):
    """Sends a query-protocol request; returns (status, headers, body text)."""
    host = "127.0.0.1:%d" % aws.port
    form = urllib.parse.urlencode(params)
    body = form.encode() if method == "POST" else b""
    query = "" if method == "POST" else form
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"} \
        if method == "POST" else {}
    headers = sign(method, host, "/", query, headers, body, akid, sign_secret or secret, REGION,
                   service, when, token)
    if tamper:
        body = tamper(body)
    conn = http.client.HTTPConnection("127.0.0.1", aws.port, timeout=10)
    conn.request(method, "/" + ("?" + query if query else ""), body=body, headers=headers)
    r = conn.getresponse()
    out = (r.status, dict(r.getheaders()), r.read().decode())
    conn.close()
    return out


# ---------------------------------------------------------------------------------------
# Signature verification
# ---------------------------------------------------------------------------------------

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
EC2_Q = {"Action": "DescribeRegions", "Version": "2016-11-15"}
STS_Q = {"Action": "GetCallerIdentity", "Version": "2011-06-15"}


def test_independent_signer_is_accepted_post_and_get(aws):
    for method in ("POST", "GET"):
        status, headers, body = raw(aws, "ec2", dict(EC2_Q, **{"RegionName.1": "eu-west-1"}),
                                    method=method)
        assert status == 200, body
        assert '<DescribeRegionsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">' in body
        assert "<regionName>eu-west-1</regionName>" in body and "us-east-1" not in body
        assert "<requestId>%s</requestId>" % headers["x-amzn-RequestId"] in body


@pytest.mark.parametrize("service,params,case,status,code", [
    ("ec2", EC2_Q, "unknown_key", 401, "AuthFailure"),
    ("sts", STS_Q, "unknown_key", 403, "InvalidClientTokenId"),
    ("ec2", EC2_Q, "bad_secret", 403, "SignatureDoesNotMatch"),
    ("sts", STS_Q, "bad_secret", 403, "SignatureDoesNotMatch"),
    ("ec2", EC2_Q, "tampered_body", 403, "SignatureDoesNotMatch"),
    ("ec2", EC2_Q, "stale", 400, "RequestExpired"),
    ("sts", STS_Q, "stale", 403, "SignatureDoesNotMatch"),
    ("sts", STS_Q, "future", 403, "SignatureDoesNotMatch"),
])
def test_bad_requests_are_refused_like_aws(aws, service, params, case, status, code):
    kw = {}
    if case == "unknown_key":
        kw["akid"] = "AKIANOBODYKNOWSTHIS"
    elif case == "bad_secret":
        kw["sign_secret"] = "wrong"
    elif case == "tampered_body":
        kw["tamper"] = lambda b: b.replace(b"DescribeRegions", b"DescribeVolumes")
    elif case == "stale":
        kw["when"] = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=16)
    elif case == "future":
        kw["when"] = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=16)
    got_status, headers, body = raw(aws, service, params, **kw)
    assert got_status == status, body
    assert "<Code>%s</Code>" % code in body
    if service == "ec2":
        assert body.startswith("<?xml") and "<Response><Errors><Error>" in body
        assert "<RequestID>%s</RequestID>" % headers["x-amzn-RequestId"] in body
    else:
        assert '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">' in body
        assert "<Type>Sender</Type>" in body
    if case == "stale" and service == "sts":
        assert "Signature expired:" in body
    call = aws.calls()[-1]
    assert call["signature_verified"] is False and call["auth_error"] == code


def test_repeated_authorization_header_is_refused(aws):
    host = "127.0.0.1:%d" % aws.port
    body = urllib.parse.urlencode(STS_Q).encode()
    headers = sign("POST", host, "/", "", {"Content-Type": "application/x-www-form-urlencoded"},
                   body, AKID, SECRET, REGION, "sts")
    with socket.create_connection(("127.0.0.1", aws.port), timeout=10) as sock:
        head = "".join("%s: %s\r\n" % kv for kv in headers.items())
        head += "Authorization: %s\r\n" % headers["Authorization"]  # the same, twice
        sock.sendall(("POST / HTTP/1.1\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n"
                      % (head, len(body))).encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"<Code>IncompleteSignature</Code>" in answer


def test_slightly_skewed_clock_is_accepted(aws):
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=14)
    assert raw(aws, "sts", STS_Q, when=when)[0] == 200


def test_missing_authorization_and_wrong_scope(aws):
    conn = http.client.HTTPConnection("127.0.0.1", aws.port, timeout=5)
    conn.request("POST", "/", body=urllib.parse.urlencode(EC2_Q),
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    r = conn.getresponse()
    assert r.status == 401 and b"MissingAuthenticationToken" in r.read()
    status, _, body = raw(aws, "s3", EC2_Q)
    assert status == 403 and "Credential should be scoped to correct service" in body


def test_botocore_clients_verify_and_calls_are_logged(aws):
    aws.client("ec2").describe_regions()
    aws.client("sts").get_caller_identity()
    calls = aws.calls()
    assert [(c["service"], c["action"], c["signature_verified"], c["account"], c["status"])
            for c in calls] == [("ec2", "DescribeRegions", True, ACCT, 200),
                                ("sts", "GetCallerIdentity", True, ACCT, 200)]
    assert aws.calls(service="sts")[0]["region"] == REGION
    since = calls[-1]["seq"]
    aws.client("ec2").describe_regions()
    assert len(aws.calls(since=since)) == 1


def test_https_listener(aws):
    ident = aws.client("sts", https=True).get_caller_identity()
    assert ident["Account"] == ACCT
    assert aws.calls()[-1]["tls"] is True


# ---------------------------------------------------------------------------------------
# STS
# ---------------------------------------------------------------------------------------


def test_assume_role_with_right_external_id(aws):
    sts = aws.client("sts")
    r = sts.assume_role(RoleArn=ROLE, RoleSessionName="scan-1", ExternalId=EXTERNAL_ID,
                        DurationSeconds=900, SourceIdentity="alice")
    c = r["Credentials"]
    assert c["AccessKeyId"].startswith("ASIA") and len(c["AccessKeyId"]) == 20
    assert r["AssumedRoleUser"]["Arn"] == \
        "arn:aws:sts::%s:assumed-role/CloudSweepScan/scan-1" % CUSTOMER
    assert r["SourceIdentity"] == "alice"
    left = (c["Expiration"] - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 800 < left <= 900
    who = aws.client("sts", c["AccessKeyId"], c["SecretAccessKey"],
                     c["SessionToken"]).get_caller_identity()
    assert who["Account"] == CUSTOMER and who["UserId"].endswith(":scan-1")


@pytest.mark.parametrize("role,external_id,akid,secret,ok", [
    (ROLE, EXTERNAL_ID, AKID, SECRET, True),
    (ROLE, "wrong-id", AKID, SECRET, False),
    (ROLE, None, AKID, SECRET, False),
    (OPEN_ROLE, None, AKID, SECRET, True),  # no external-id condition: anyone gets in
    (OPEN_ROLE, "anything", AKID, SECRET, True),
    ("arn:aws:iam::%s:role/Nope" % CUSTOMER, EXTERNAL_ID, AKID, SECRET, False),
    (ROLE, EXTERNAL_ID, LIMITED_AKID, LIMITED_SECRET, False),  # caller lacks sts:AssumeRole
])
def test_assume_role_external_id_table(aws, role, external_id, akid, secret, ok):
    kw = {"RoleArn": role, "RoleSessionName": "s1"}
    if external_id:
        kw["ExternalId"] = external_id
    sts = aws.client("sts", akid, secret)
    if ok:
        assert sts.assume_role(**kw)["Credentials"]["AccessKeyId"].startswith("ASIA")
    else:
        with pytest.raises(botocore.exceptions.ClientError) as ei:
            sts.assume_role(**kw)
        assert code_of(ei) == ("AccessDenied", 403)
        assert "is not authorized to perform: sts:AssumeRole" in str(ei.value)


def test_assume_role_validation(aws):
    sts = aws.client("sts")
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        sts.assume_role(RoleArn=ROLE, RoleSessionName="s1", ExternalId=EXTERNAL_ID,
                        DurationSeconds=7200)
    assert code_of(ei) == ("ValidationError", 400)
    assert "MaxSessionDuration" in str(ei.value)


def test_session_credentials_need_token_and_expire(aws):
    c = aws.client("sts").assume_role(RoleArn=ROLE, RoleSessionName="s1",
                                      ExternalId=EXTERNAL_ID)["Credentials"]
    status, _, body = raw(aws, "sts", STS_Q, akid=c["AccessKeyId"], secret=c["SecretAccessKey"])
    assert status == 403 and "<Code>InvalidClientTokenId</Code>" in body
    status, _, body = raw(aws, "sts", STS_Q, akid=c["AccessKeyId"], secret=c["SecretAccessKey"],
                          token=c["SessionToken"] + "x")
    assert status == 403
    assert raw(aws, "sts", STS_Q, akid=c["AccessKeyId"], secret=c["SecretAccessKey"],
               token=c["SessionToken"])[0] == 200
    assert aws.control("POST", "expire-credentials", {"access_key_id": c["AccessKeyId"]})[
        "expired"] == 1
    status, _, body = raw(aws, "sts", STS_Q, akid=c["AccessKeyId"], secret=c["SecretAccessKey"],
                          token=c["SessionToken"])
    assert status == 403 and "<Code>ExpiredToken</Code>" in body
    ec2 = aws.client("ec2", c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        ec2.describe_regions()
    assert code_of(ei) == ("RequestExpired", 400)


# ---------------------------------------------------------------------------------------
# EC2
# ---------------------------------------------------------------------------------------


def test_volume_pagination_and_filters(aws):
    ec2 = aws.customer("ec2")
    first = ec2.describe_volumes()
    assert len(first["Volumes"]) == 3 and first["NextToken"]  # seeded default page size
    pages = list(ec2.get_paginator("describe_volumes").paginate(
        PaginationConfig={"PageSize": 5}))
    assert [len(p["Volumes"]) for p in pages] == [5, 3]
    assert [v["VolumeId"] for p in pages for v in p["Volumes"]] == \
        ["vol-%02d" % i for i in range(7)] + ["vol-attached"]
    paged = [c["params"] for c in aws.calls(action="DescribeVolumes")[-2:]]
    assert paged[0]["MaxResults"] == "5" and "NextToken" in paged[1]

    def ids(**kw):
        return sorted(v["VolumeId"] for p in ec2.get_paginator("describe_volumes").paginate(**kw)
                      for v in p["Volumes"])
    assert ids(Filters=[{"Name": "status", "Values": ["in-use"]}]) == ["vol-attached"]
    assert ids(Filters=[{"Name": "attachment.instance-id", "Values": ["i-run"]}]) == \
        ["vol-attached"]
    assert ids(Filters=[{"Name": "tag-key", "Values": ["team"]}]) == \
        ["vol-01", "vol-03", "vol-05"]
    assert ids(Filters=[{"Name": "status", "Values": ["available"]},
                        {"Name": "tag:team", "Values": ["a"]}]) == ["vol-01", "vol-03", "vol-05"]
    assert ids(VolumeIds=["vol-02"]) == ["vol-02"]


@pytest.mark.parametrize("kw,code", [
    ({"MaxResults": 4}, "InvalidParameterValue"),
    ({"MaxResults": 501}, "InvalidParameterValue"),
    ({"MaxResults": 5, "VolumeIds": ["vol-01"]}, "InvalidParameterCombination"),
    ({"NextToken": "garbage"}, "InvalidParameterValue"),
    ({"VolumeIds": ["vol-missing"]}, "InvalidVolume.NotFound"),
    ({"Filters": [{"Name": "no-such-filter", "Values": ["x"]}]}, "InvalidParameterValue"),
])
def test_describe_volumes_validation(aws, kw, code):
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        aws.customer("ec2").describe_volumes(**kw)
    assert code_of(ei) == (code, 400)


def test_describe_shapes_through_botocore(aws):
    ec2 = aws.customer("ec2")
    snaps = ec2.describe_snapshots(OwnerIds=["self"], MaxResults=5)["Snapshots"]
    assert sorted(s["SnapshotId"] for s in snaps) == ["snap-ami", "snap-free"]
    assert snaps[0]["OwnerId"] == CUSTOMER and snaps[0]["State"] == "completed"
    imgs = {i["ImageId"]: i for i in ec2.describe_images(Owners=["self"])["Images"]}
    assert set(imgs) == {"ami-live", "ami-old"}  # owners always see their deprecated AMIs
    assert "DeprecationTime" in imgs["ami-old"]
    # This botocore predates IncludeDisabled, so that one goes out raw.
    status, _, body = raw(aws, "ec2", {"Action": "DescribeImages", "Version": "2016-11-15",
                                       "Owner.1": "self", "IncludeDisabled": "true",
                                       "Filter.1.Name": "block-device-mapping.snapshot-id",
                                       "Filter.1.Value.1": "snap-ami"},
                          akid=LIMITED_AKID, secret=LIMITED_SECRET)
    assert status == 200 and "<imagesSet/>" not in body and "<imagesSet></imagesSet>" in body
    c = aws.client("sts").assume_role(RoleArn=ROLE, RoleSessionName="s1",
                                      ExternalId=EXTERNAL_ID)["Credentials"]
    status, _, body = raw(aws, "ec2", {"Action": "DescribeImages", "Version": "2016-11-15",
                                       "Owner.1": "self", "IncludeDisabled": "true",
                                       "Filter.1.Name": "block-device-mapping.snapshot-id",
                                       "Filter.1.Value.1": "snap-ami"},
                          akid=c["AccessKeyId"], secret=c["SecretAccessKey"],
                          token=c["SessionToken"])
    assert status == 200
    img = ElementTree.fromstring(body).find(".//{%s}imagesSet/{%s}item" % (EC2_NS, EC2_NS))
    assert img.findtext("{%s}imageId" % EC2_NS) == "ami-disabled"
    assert img.findtext("{%s}imageState" % EC2_NS) == "disabled"
    assert img.findtext(".//{%s}ebs/{%s}snapshotId" % (EC2_NS, EC2_NS)) == "snap-ami"
    addrs = {a["AllocationId"]: a for a in ec2.describe_addresses()["Addresses"]}
    assert "AssociationId" not in addrs["eipalloc-free"]
    assert addrs["eipalloc-used"]["InstanceId"] == "i-run"
    res = [i for p in ec2.get_paginator("describe_instances").paginate()
           for r in p["Reservations"] for i in r["Instances"]]
    st = {i["InstanceId"]: i for i in res}
    assert st["i-run"]["State"] == {"Code": 16, "Name": "running"}
    assert st["i-stopped"]["State"]["Name"] == "stopped"
    assert st["i-stopped"]["StateTransitionReason"].startswith("User initiated (")
    assert isinstance(st["i-run"]["LaunchTime"], datetime.datetime)
    stopped = ec2.describe_instances(Filters=[{"Name": "instance-state-name",
                                               "Values": ["stopped"]}])["Reservations"]
    assert [r["Instances"][0]["InstanceId"] for r in stopped] == ["i-stopped"]
    nat = ec2.describe_nat_gateways(Filter=[{"Name": "state", "Values": ["available"]}])
    assert [g["NatGatewayId"] for g in nat["NatGateways"]] == ["nat-1"]
    enis = ec2.describe_network_interfaces(Filters=[{"Name": "status",
                                                     "Values": ["available"]}])
    assert [e["NetworkInterfaceId"] for e in enis["NetworkInterfaces"]] == ["eni-free"]
    enis = ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id",
                                                     "Values": ["i-run"]}])
    assert enis["NetworkInterfaces"][0]["Attachment"]["InstanceId"] == "i-run"
    regions = [r["RegionName"] for r in ec2.describe_regions()["Regions"]]
    assert REGION in regions and "eu-central-1" in regions


@pytest.mark.parametrize("call,kwargs,code,status", [
    ("delete_volume", {"VolumeId": "vol-00"}, None, 200),
    ("delete_volume", {"VolumeId": "vol-attached"}, "VolumeInUse", 400),
    ("delete_volume", {"VolumeId": "vol-nope"}, "InvalidVolume.NotFound", 400),
    ("delete_snapshot", {"SnapshotId": "snap-free"}, None, 200),
    ("delete_snapshot", {"SnapshotId": "snap-ami"}, "InvalidSnapshot.InUse", 400),
    ("release_address", {"AllocationId": "eipalloc-free"}, None, 200),
    ("release_address", {"AllocationId": "eipalloc-used"}, "InvalidIPAddress.InUse", 400),
    ("release_address", {"AllocationId": "eipalloc-nope"}, "InvalidAllocationID.NotFound", 400),
    ("stop_instances", {"InstanceIds": ["i-run"]}, None, 200),
    ("stop_instances", {"InstanceIds": ["i-gone"]}, "IncorrectInstanceState", 400),
    ("stop_instances", {"InstanceIds": ["i-nope"]}, "InvalidInstanceID.NotFound", 400),
    ("delete_nat_gateway", {"NatGatewayId": "nat-1"}, None, 200),
    ("delete_nat_gateway", {"NatGatewayId": "nat-nope"}, "NatGatewayNotFound", 400),
    ("delete_network_interface", {"NetworkInterfaceId": "eni-free"}, None, 200),
    ("delete_network_interface", {"NetworkInterfaceId": "eni-used"},
     "InvalidNetworkInterface.InUse", 400),
    ("modify_volume", {"VolumeId": "vol-02", "VolumeType": "gp3", "Size": 50}, None, 200),
    ("create_snapshot", {"VolumeId": "vol-02", "Description": "pre-delete"}, None, 200),
    ("create_tags", {"Resources": ["vol-02", "i-run"], "Tags": [{"Key": "k", "Value": "v"}]},
     None, 200),
])
def test_mutations_and_dry_run(aws, call, kwargs, code, status):
    ec2 = aws.customer("ec2")
    readonly = aws.customer("ec2", role=READONLY_ROLE)
    # DryRun: 412 when it would be allowed, UnauthorizedOperation when the role may not.
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        getattr(ec2, call)(DryRun=True, **kwargs)
    if code and code.endswith("NotFound"):
        assert code_of(ei) == (code, status)
    else:
        assert code_of(ei) == ("DryRunOperation", 412)
    if call.startswith(("delete_", "stop_")):
        with pytest.raises(botocore.exceptions.ClientError) as ei:
            getattr(readonly, call)(DryRun=True, **kwargs)
        assert code_of(ei) == ("UnauthorizedOperation", 403)
    state_before = aws.control("GET", "state")
    if code:
        with pytest.raises(botocore.exceptions.ClientError) as ei:
            getattr(ec2, call)(**kwargs)
        assert code_of(ei) == (code, status)
        assert aws.control("GET", "state")["accounts"] == state_before["accounts"]
        return
    out = getattr(ec2, call)(**kwargs)
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 200
    dry = [c for c in aws.calls(action=call.title().replace("_", ""))
           if c["params"].get("DryRun") == "true"]
    assert dry, "DryRun calls are logged with their parameters"
    reg = aws.control("GET", "state")["accounts"][CUSTOMER]["regions"][REGION]
    if call == "delete_volume":
        assert "vol-00" not in [v["VolumeId"] for v in reg["volumes"]]
    elif call == "stop_instances":
        assert out["StoppingInstances"][0]["CurrentState"]["Name"] == "stopping"
        assert ec2.describe_instances(InstanceIds=["i-run"])["Reservations"][0]["Instances"][0][
            "State"]["Name"] == "stopped"
    elif call == "delete_nat_gateway":
        assert out["NatGatewayId"] == "nat-1"
        assert reg["nat_gateways"][0]["State"] == "deleted"
    elif call == "modify_volume":
        assert out["VolumeModification"]["TargetSize"] == 50
        assert out["VolumeModification"]["OriginalSize"] == 12
    elif call == "create_snapshot":
        assert out["SnapshotId"].startswith("snap-") and out["State"] == "pending"
        assert ec2.describe_snapshots(SnapshotIds=[out["SnapshotId"]])["Snapshots"][0][
            "VolumeId"] == "vol-02"
    elif call == "create_tags":
        vols = ec2.describe_volumes(Filters=[{"Name": "tag:k", "Values": ["v"]}])
        assert [v["VolumeId"] for v in vols["Volumes"]] == ["vol-02"]


def test_rendering_cache_follows_changes(aws):
    """Describes after a change show it, though the resources were rendered (cached) before."""
    ec2 = aws.customer("ec2")

    def vol(vid):
        return ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]

    def inst(iid):
        return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]

    assert "Tags" not in vol("vol-02") or not any(t["Key"] == "k" for t in vol("vol-02")["Tags"])
    assert inst("i-run")["State"]["Name"] == "running"
    ec2.create_tags(Resources=["vol-02"], Tags=[{"Key": "k", "Value": "v"}])
    ec2.modify_volume(VolumeId="vol-02", Size=50)
    ec2.stop_instances(InstanceIds=["i-run"])
    assert {"Key": "k", "Value": "v"} in vol("vol-02")["Tags"]
    assert vol("vol-02")["Size"] == 50
    assert inst("i-run")["State"]["Name"] == "stopped"
    aws.control("POST", "reset", world())
    again = aws.customer("ec2")  # the reset dropped the session credentials too
    assert again.describe_instances(InstanceIds=["i-run"])["Reservations"][0]["Instances"][0][
        "State"]["Name"] == "running"


def test_base_key_deny_list(aws):
    ec2 = aws.client("ec2", LIMITED_AKID, LIMITED_SECRET)
    ec2.describe_volumes()
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        ec2.delete_volume(VolumeId="vol-00", DryRun=True)
    assert code_of(ei) == ("UnauthorizedOperation", 403)


def test_accounts_and_regions_are_isolated(aws):
    assert aws.client("ec2").describe_volumes()["Volumes"] == []
    assert aws.customer("ec2", region="eu-west-1").describe_volumes()["Volumes"] == []


# ---------------------------------------------------------------------------------------
# ELB, RDS, CloudWatch
# ---------------------------------------------------------------------------------------


def test_elbv2(aws):
    elb = aws.customer("elbv2")
    pages = list(elb.get_paginator("describe_load_balancers").paginate())
    assert [len(p["LoadBalancers"]) for p in pages] == [3, 2]
    assert pages[0]["NextMarker"]
    lbs = [lb for p in pages for lb in p["LoadBalancers"]]
    assert lbs[0]["State"]["Code"] == "active" and lbs[0]["Type"] == "application"
    one = elb.describe_load_balancers(Names=["lb-2"], PageSize=1)["LoadBalancers"]
    assert one[0]["LoadBalancerName"] == "lb-2"
    tg = elb.describe_target_groups()["TargetGroups"][0]
    health = elb.describe_target_health(TargetGroupArn=tg["TargetGroupArn"])
    states = {d["Target"]["Id"]: d["TargetHealth"] for d in health["TargetHealthDescriptions"]}
    assert states["i-run"]["State"] == "healthy"
    assert states["i-stopped"]["Reason"] == "Target.FailedHealthChecks"
    elb.delete_load_balancer(LoadBalancerArn=lbs[0]["LoadBalancerArn"])
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        elb.describe_load_balancers(LoadBalancerArns=[lbs[0]["LoadBalancerArn"]])
    assert code_of(ei) == ("LoadBalancerNotFound", 400)
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        elb.describe_load_balancers(PageSize=401)
    assert code_of(ei) == ("ValidationError", 400)


def test_classic_elb(aws):
    elb = aws.customer("elb")
    lbs = elb.describe_load_balancers()["LoadBalancerDescriptions"]
    assert [lb["LoadBalancerName"] for lb in lbs] == ["old-lb"]
    assert lbs[0]["Instances"] == [{"InstanceId": "i-run"}]
    health = elb.describe_instance_health(LoadBalancerName="old-lb")["InstanceStates"]
    assert health[0]["State"] == "OutOfService"
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        elb.describe_instance_health(LoadBalancerName="nope")
    assert code_of(ei) == ("LoadBalancerNotFound", 400)
    body = raw(aws, "elasticloadbalancing", {"Action": "DescribeLoadBalancers",
                                             "Version": "2012-06-01"})[2]
    assert body.startswith('<DescribeLoadBalancersResponse xmlns="http://elasticloadbalancing.'
                           'amazonaws.com/doc/2012-06-01/"><DescribeLoadBalancersResult>')


def test_rds(aws):
    rds = aws.customer("rds")
    pages = list(rds.get_paginator("describe_db_instances").paginate(
        PaginationConfig={"PageSize": 20}))
    assert [len(p["DBInstances"]) for p in pages] == [20, 6]
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        rds.describe_db_instances(MaxRecords=10)
    assert code_of(ei) == ("InvalidParameterValue", 400)
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        rds.describe_db_instances(DBInstanceIdentifier="db-nope")
    assert code_of(ei) == ("DBInstanceNotFound", 404)
    out = rds.stop_db_instance(DBInstanceIdentifier="db-01")
    assert out["DBInstance"]["DBInstanceStatus"] == "stopping"
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        rds.stop_db_instance(DBInstanceIdentifier="db-01")
    assert code_of(ei) == ("InvalidDBInstanceState", 400)
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        rds.delete_db_instance(DBInstanceIdentifier="db-02")
    assert code_of(ei) == ("InvalidParameterCombination", 400)
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        rds.delete_db_instance(DBInstanceIdentifier="db-protected", SkipFinalSnapshot=True)
    assert code_of(ei) == ("InvalidParameterCombination", 400)
    out = rds.delete_db_instance(DBInstanceIdentifier="db-02",
                                 FinalDBSnapshotIdentifier="db-02-final")
    assert out["DBInstance"]["DBInstanceStatus"] == "deleting"
    reg = aws.control("GET", "state")["accounts"][CUSTOMER]["regions"][REGION]
    assert reg["db_snapshots"][0]["DBSnapshotIdentifier"] == "db-02-final"
    assert "db-02" not in [d["DBInstanceIdentifier"] for d in reg["db_instances"]]


def test_cloudwatch_get_metric_data(aws):
    cw = aws.customer("cloudwatch")
    now = datetime.datetime.now(datetime.timezone.utc)

    def query(qid, name, instance="i-run"):
        return {"Id": qid, "MetricStat": {"Metric": {
            "Namespace": "AWS/EC2", "MetricName": name,
            "Dimensions": [{"Name": "InstanceId", "Value": instance}]},
            "Period": 3600, "Stat": "Maximum"}}
    kw = dict(MetricDataQueries=[query("cpu", "CPUUtilization"), query("net", "NetworkIn")],
              StartTime=now - datetime.timedelta(days=1), EndTime=now)
    pages = list(cw.get_paginator("get_metric_data").paginate(**kw))
    assert len(pages) == 4  # ten datapoints, page size three
    assert pages[0]["MetricDataResults"][0]["StatusCode"] == "PartialData"
    assert pages[-1]["MetricDataResults"][0]["StatusCode"] == "Complete"
    values = [v for p in pages for r in p["MetricDataResults"] if r["Id"] == "cpu"
              for v in r["Values"]]
    assert sorted(values) == [float(h) for h in range(1, 11)]
    stamps = [s for p in pages for r in p["MetricDataResults"] if r["Id"] == "cpu"
              for s in r["Timestamps"]]
    assert stamps == sorted(stamps, reverse=True)  # TimestampDescending by default
    assert all(r["Values"] == [] for p in pages for r in p["MetricDataResults"]
               if r["Id"] == "net")  # unknown metric: empty, not an error
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        cw.get_metric_data(**dict(kw, StartTime=now, EndTime=now - datetime.timedelta(hours=1)))
    assert code_of(ei) == ("ValidationError", 400)


# ---------------------------------------------------------------------------------------
# KMS
# ---------------------------------------------------------------------------------------


def test_kms_round_trips_and_rejects_foreign_ciphertext(aws):
    kms = aws.client("kms")
    ctx = {"org": "42", "record": "cred-7"}
    dk = kms.generate_data_key(KeyId="alias/cloudsweep", KeySpec="AES_256",
                               EncryptionContext=ctx)
    assert len(dk["Plaintext"]) == 32 and dk["KeyId"].endswith("000000000001")
    assert kms.decrypt(CiphertextBlob=dk["CiphertextBlob"],
                       EncryptionContext=ctx)["Plaintext"] == dk["Plaintext"]
    enc = kms.encrypt(KeyId="1234abcd-0000-0000-0000-000000000002", Plaintext=b"hello")
    assert kms.decrypt(CiphertextBlob=enc["CiphertextBlob"])["Plaintext"] == b"hello"
    cases = [
        (dict(CiphertextBlob=dk["CiphertextBlob"], EncryptionContext={"org": "43"}),
         "InvalidCiphertextException"),
        (dict(CiphertextBlob=dk["CiphertextBlob"][:-1] + b"\x00", EncryptionContext=ctx),
         "InvalidCiphertextException"),
        (dict(CiphertextBlob=b"not a kms blob at all, just bytes"), "InvalidCiphertextException"),
        (dict(CiphertextBlob=enc["CiphertextBlob"], KeyId="alias/cloudsweep"),
         "IncorrectKeyException"),
    ]
    for kwargs, code in cases:
        with pytest.raises(botocore.exceptions.ClientError) as ei:
            kms.decrypt(**kwargs)
        assert code_of(ei) == (code, 400)
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        kms.generate_data_key(KeyId="alias/nope", KeySpec="AES_256")
    assert code_of(ei) == ("NotFoundException", 400)
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        aws.client("kms", secret="wrong").generate_data_key(KeyId="alias/cloudsweep",
                                                            KeySpec="AES_256")
    assert code_of(ei) == ("InvalidSignatureException", 400)
    assert aws.calls(service="kms")[0]["params"].get("Plaintext") is None


# ---------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("service,call,kwargs,code,status", [
    ("ec2", "describe_volumes", {}, "RequestLimitExceeded", 503),
    ("sts", "get_caller_identity", {}, "Throttling", 400),
    ("kms", "generate_data_key", {"KeyId": "alias/cloudsweep", "KeySpec": "AES_128"},
     "ThrottlingException", 400),
])
def test_throttle_next_n_calls(aws, service, call, kwargs, code, status):
    aws.faults({"type": "throttle", "service": service, "count": 2})
    client = aws.client(service)
    for _ in range(2):
        with pytest.raises(botocore.exceptions.ClientError) as ei:
            getattr(client, call)(**kwargs)
        assert code_of(ei) == (code, status)
    getattr(client, call)(**kwargs)
    assert [c["fault"] for c in aws.calls()] == ["throttle", "throttle", None]


def test_throttle_fraction_is_seeded(aws):
    def run():
        aws.faults({"type": "throttle", "service": "ec2", "action": "DescribeRegions",
                    "fraction": 0.5}, seed=7)
        ec2 = aws.client("ec2")
        out = []
        for _ in range(12):
            try:
                ec2.describe_regions()
                out.append("ok")
            except botocore.exceptions.ClientError as e:
                out.append(e.response["Error"]["Code"])
        return out
    first = run()
    assert 0 < first.count("RequestLimitExceeded") < len(first)
    assert run() == first  # same seed, same pattern


@pytest.mark.parametrize("status,service,code", [
    (500, "ec2", "InternalError"), (503, "ec2", "Unavailable"),
    (500, "rds", "InternalFailure"), (503, "rds", "ServiceUnavailable"),
])
def test_server_errors(aws, status, service, code):
    aws.faults({"type": "error", "status": status, "count": 1, "skip": 1})
    client = aws.customer(service)  # the AssumeRole call is skipped by the rule
    call = "describe_regions" if service == "ec2" else "describe_db_instances"
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        getattr(client, call)()
    assert code_of(ei) == (code, status)
    getattr(client, call)()


def raw_keepalive_exchange(aws, n_requests, timeout=2):
    """Signed DescribeRegions over one keep-alive connection; responses, then any exception."""
    conn = http.client.HTTPConnection("127.0.0.1", aws.port, timeout=timeout)
    host = "127.0.0.1:%d" % aws.port
    out = []
    for _ in range(n_requests):
        body = urllib.parse.urlencode(EC2_Q).encode()
        headers = sign("POST", host, "/", "", {"Content-Type":
                                               "application/x-www-form-urlencoded"},
                       body, AKID, SECRET, REGION, "ec2")
        try:
            conn.request("POST", "/", body=body, headers=headers)
            r = conn.getresponse()
            out.append((r.status, r.read()))
        except Exception as e:  # noqa: BLE001 - the exception type is the assertion
            out.append(e)
            break
    conn.close()
    return out


def test_connection_reset(aws):
    aws.faults({"type": "reset", "count": 1})
    out = raw_keepalive_exchange(aws, 1)
    assert isinstance(out[0], (ConnectionResetError, http.client.RemoteDisconnected))
    assert raw_keepalive_exchange(aws, 1)[0][0] == 200
    assert aws.calls()[0]["fault"] == "reset"


def test_truncated_and_malformed_bodies(aws):
    aws.faults({"type": "truncated", "count": 1})
    out = raw_keepalive_exchange(aws, 1)
    assert isinstance(out[0], http.client.IncompleteRead)
    aws.faults({"type": "malformed", "count": 1})
    with pytest.raises(botocore.parsers.ResponseParserError):
        aws.client("ec2").describe_regions()
    aws.faults({"type": "malformed", "count": 1})
    status, body = raw_keepalive_exchange(aws, 1)[0]
    assert status == 200
    with pytest.raises(ElementTree.ParseError):
        ElementTree.fromstring(body)


def test_hang_and_latency(aws):
    aws.faults({"type": "hang", "count": 1, "ms": 5000})
    t0 = time.monotonic()
    out = raw_keepalive_exchange(aws, 1, timeout=0.7)
    assert isinstance(out[0], (socket.timeout, TimeoutError))
    assert 0.6 < time.monotonic() - t0 < 2
    aws.faults({"type": "latency", "ms": 300, "service": "ec2"})  # also releases the hang
    t0 = time.monotonic()
    aws.client("ec2").describe_regions()
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    aws.client("sts").get_caller_identity()
    assert time.monotonic() - t0 < 0.3


def test_bad_fault_rule_is_refused(aws):
    conn = http.client.HTTPConnection("127.0.0.1", aws.port, timeout=5)
    conn.request("POST", "/__fake/faults", body=json.dumps({"faults": [{"type": "boom"}]}))
    assert conn.getresponse().status == 400


# ---------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------


def test_hundreds_of_concurrent_keepalive_connections(aws):
    n = 250
    conns = []
    for _ in range(n):
        c = http.client.HTTPConnection("127.0.0.1", aws.port, timeout=20)
        c.connect()
        conns.append(c)
    host = "127.0.0.1:%d" % aws.port
    body = urllib.parse.urlencode(STS_Q).encode()

    def exchange(conn):
        statuses = []
        for _ in range(2):  # the second request reuses the same connection
            headers = sign("POST", host, "/", "", {"Content-Type":
                                                   "application/x-www-form-urlencoded"},
                           body, AKID, SECRET, REGION, "sts")
            conn.request("POST", "/", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            statuses.append((r.status, r.getheader("Content-Length") is not None,
                             r.getheader("Connection")))
        return statuses

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(exchange, conns))
    for c in conns:
        c.close()
    assert all(s == [(200, True, None)] * 2 for s in results)
    assert len(aws.calls()) == 2 * n


def test_connection_close_is_honoured(aws):
    host = "127.0.0.1:%d" % aws.port
    body = urllib.parse.urlencode(STS_Q).encode()
    headers = sign("POST", host, "/", "", {"Content-Type": "application/x-www-form-urlencoded",
                                           "Connection": "close"},
                   body, AKID, SECRET, REGION, "sts")
    s = socket.create_connection(("127.0.0.1", aws.port), timeout=5)
    req = "POST / HTTP/1.1\r\n" + "".join("%s: %s\r\n" % kv for kv in headers.items()) + \
        "Content-Length: %d\r\n\r\n" % len(body)
    s.sendall(req.encode() + body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 200") and b"Connection: close" in data


def test_reset_and_state(aws):
    assert CUSTOMER in aws.control("GET", "state")["accounts"]
    aws.control("POST", "reset")
    assert aws.control("GET", "state")["accounts"] == {}
    assert aws.calls() == []


# ---------------------------------------------------------------------------------------
# HTTP framing (the fake's own HTTP/1.1 server)
# ---------------------------------------------------------------------------------------


def signed_request(aws, service, params, headers=None, chunks=None):
    """Raw bytes of a signed query-protocol POST; chunks = how to split a chunked body."""
    body = urllib.parse.urlencode(params).encode()
    signed = sign("POST", "127.0.0.1:%d" % aws.port, "/", "",
                  dict({"Content-Type": "application/x-www-form-urlencoded"}, **(headers or {})),
                  body, AKID, SECRET, REGION, service)
    if chunks is None:
        signed["Content-Length"] = str(len(body))
        framed = body
    else:
        signed["Transfer-Encoding"] = "chunked"
        framed, at = b"", 0
        for i, size in enumerate(chunks):
            part = body[at:at + size]
            at += size
            framed += b"%x%s\r\n%s\r\n" % (len(part), b";ext=1" if i == 0 else b"", part)
        framed += b"%x\r\n%s\r\n0\r\nX-Trailer: yes\r\n\r\n" % (len(body) - at, body[at:])
    head = "POST / HTTP/1.1\r\n" + "".join("%s: %s\r\n" % kv for kv in signed.items()) + "\r\n"
    return head.encode(), framed


def read_response(f):
    """(status, headers with lower-case names, body) of one response from a socket file."""
    status = int(f.readline().split()[1])
    headers = {}
    while True:
        line = f.readline().decode()
        if line in ("\r\n", ""):
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers.get("content-length", 0)))


def connect(aws):
    s = socket.create_connection(("127.0.0.1", aws.port), timeout=5)
    return s, s.makefile("rb")


def test_chunked_request_bodies(aws):
    s, f = connect(aws)
    for chunks in ([5, 7], [1], []):
        head, body = signed_request(aws, "ec2", EC2_Q, chunks=chunks)
        s.sendall(head + body)
        status, headers, out = read_response(f)
        assert status == 200 and b"<regionInfo>" in out, out
    s.close()
    assert [c["signature_verified"] for c in aws.calls()] == [True] * 3


def test_expect_100_continue(aws):
    s, f = connect(aws)
    head, body = signed_request(aws, "sts", STS_Q, headers={"Expect": "100-continue"})
    s.sendall(head)
    assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
    s.sendall(body)
    status, _, out = read_response(f)
    assert status == 200 and b"<Account>%s</Account>" % ACCT.encode() in out
    s.close()


def test_pipelined_requests_are_answered_in_order(aws):
    aws.faults({"type": "latency", "ms": 300, "service": "ec2"})
    s, f = connect(aws)
    batch = b""
    for params, service in ((EC2_Q, "ec2"), (STS_Q, "sts"), (EC2_Q, "ec2"), (STS_Q, "sts")):
        head, body = signed_request(aws, service, params)
        batch += head + body
    t0 = time.monotonic()
    s.sendall(batch)  # the slow EC2 calls must not be overtaken by the quick STS ones
    answers = [read_response(f) for _ in range(4)]
    assert time.monotonic() - t0 >= 0.6  # one at a time: the two latencies add up
    assert [a[0] for a in answers] == [200] * 4
    assert [b"DescribeRegionsResponse" in a[2] for a in answers] == [True, False, True, False]
    assert [c["action"] for c in aws.calls()] == ["DescribeRegions", "GetCallerIdentity"] * 2
    s.close()


@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/x\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded: line\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", 400),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"PATCH / HTTP/1.1\r\n\r\n", 501),
])
def test_malformed_requests_are_refused_and_closed(aws, request_bytes, status):
    s, f = connect(aws)
    s.sendall(request_bytes)
    got, headers, _ = read_response(f)
    assert (got, headers.get("connection")) == (status, "close")
    assert f.read() == b""  # and the connection closes
    s.close()
    assert aws.calls() == []


def test_http10_and_connection_close_end_the_connection(aws):
    for version, extra in (("HTTP/1.0", {}), ("HTTP/1.1", {"Connection": "close"})):
        s, f = connect(aws)
        head, body = signed_request(aws, "sts", STS_Q, headers=extra)
        s.sendall(head.replace(b"HTTP/1.1", version.encode(), 1) + body)
        status, headers, _ = read_response(f)
        assert (status, headers.get("connection")) == (200, "close")
        assert f.read() == b""
        s.close()


def test_latency_runs_concurrently_on_many_connections(aws):
    aws.faults({"type": "latency", "ms": 500})
    n = 120
    conns = [connect(aws) for _ in range(n)]
    requests = [b"".join(signed_request(aws, "sts", STS_Q)) for _ in range(n)]
    t0 = time.monotonic()
    for (s, _), req in zip(conns, requests):
        s.sendall(req)
    statuses = [read_response(f)[0] for _, f in conns]
    elapsed = time.monotonic() - t0
    assert statuses == [200] * n
    assert 0.5 <= elapsed < 2.5, elapsed  # not n x 0.5 s: the waits overlap
    assert aws.control("GET", "stats")["max_in_flight"] > n // 2
    for s, _ in conns:
        s.close()


def test_hang_is_released_by_a_new_fault_set(aws):
    aws.faults({"type": "hang", "ms": 60000})
    s, f = connect(aws)
    s.sendall(b"".join(signed_request(aws, "sts", STS_Q)))
    time.sleep(0.3)
    assert aws.control("GET", "stats")["in_flight"] == 1
    t0 = time.monotonic()
    aws.faults({"type": "latency", "ms": 1}, append=True)  # appending keeps it held
    time.sleep(0.2)
    assert aws.control("GET", "stats")["in_flight"] == 1
    aws.faults()  # replacing the rules releases it: an RST, no answer
    with pytest.raises(ConnectionResetError):
        read_response(f)
    assert time.monotonic() - t0 < 2
    s.close()
    assert aws.control("GET", "stats")["in_flight"] == 0
    assert [(c["fault"], c["status"]) for c in aws.calls()] == [("hang", 0)]


def test_dropping_faults_over_tls_leave_the_client_a_fresh_connection(aws):
    client = aws.client("sts", https=True)
    for fault, error in (("reset", botocore.exceptions.ConnectionClosedError),
                         ("truncated", botocore.parsers.ResponseParserError),
                         ("malformed", botocore.parsers.ResponseParserError)):
        aws.faults({"type": fault, "count": 1})
        with pytest.raises(error):
            client.get_caller_identity()
        assert client.get_caller_identity()["Account"] == ACCT  # the pool saw it closed
    assert [(c["fault"], c["tls"]) for c in aws.calls()] == [
        ("reset", True), (None, True), ("truncated", True), (None, True),
        ("malformed", True), (None, True)]
