"""The onboarding check of AWS accounts against the fake AWS: POST
/api/v1/aws-accounts/{id}/verify and the check run on create. A sound trust policy
(AssumeRole with the stored external id works, a wrong one is refused), a wrong stored
external id, a role that accepts any external id (flagged: the confused-deputy hole),
STS throttling then success, STS down (502, nothing hangs), access keys checked with
GetCallerIdentity, the audit rows (credential.read, credential.verified) without
secrets, other organizations (404) and roles without aws_accounts:write (403)."""
import json
import uuid

import pytest

from conftest import FAKE_AWS_SERVICE_ACCOUNT, Server

PASSWORD = "correct horse battery staple"
GOOD_EXT = "ext-Verify-Secret-0001"
KEY_ID = "AKIAVERIFYTESTKEY001"
KEY_SECRET = "verify-secret-key-material-0123456789abc"
SECRETS = (GOOD_EXT, KEY_SECRET, "ext-Wrong-Secret-0002", "ext-Any-Secret-0003")


def post(srv, path, body, tok):
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {tok}"}
    return srv.https("POST", path, headers=h, body=json.dumps(body).encode())


def sql(pg, q):
    return pg.psql(q, db=pg.dbname)


def acct_number():
    return f"{uuid.uuid4().int % 10**12:012d}"


@pytest.fixture(scope="module")
def srv(workdir, tls_files, pg, fake_aws):
    s = Server(workdir, tls_files, pg, name="verify",
               options={**fake_aws.options, "aws_verify_on_create": 0, "aws_attempts": 3,
                        "aws_deadline_ms": 4000, "aws_attempt_timeout_ms": 1500,
                        "aws_regions": "us-east-1 eu-west-1"})
    s.start()
    s.wait_ready()
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def srv_create(workdir, tls_files, pg, fake_aws):
    s = Server(workdir, tls_files, pg, name="verifycreate",
               options={**fake_aws.options, "aws_verify_on_create": 1,
                        "aws_regions": "us-east-1 eu-west-1"})
    s.start()
    s.wait_ready()
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class Org:
    def __init__(self, srv, pg):
        self.srv, self.pg = srv, pg
        email = f"v{uuid.uuid4().hex[:12]}@example.com"
        r = srv.https("POST", "/api/v1/auth/signup",
                      headers={"Content-Type": "application/json"},
                      body=json.dumps({"email": email, "password": PASSWORD,
                                       "org_name": "Verify"}).encode())
        assert r.status == 201, r
        self.id, self.user = r.json()["org"]["id"], r.json()["user"]["id"]
        self.token = self.login(email)

    def login(self, email):
        r = self.srv.https("POST", "/api/v1/auth/login",
                           headers={"Content-Type": "application/json"},
                           body=json.dumps({"email": email, "password": PASSWORD}).encode())
        assert r.status == 200, r
        return r.json()["access_token"]

    def role_account(self, account, ext, srv=None):
        r = post(srv or self.srv, "/api/v1/aws-accounts",
                 {"account_id": account, "account_name": "Prod",
                  "role_arn": f"arn:aws:iam::{account}:role/CloudSweepAudit",
                  "external_id": ext, "regions": ["eu-west-1"]}, self.token)
        assert r.status == 201, r
        return r.json()

    def verify(self, acct_id, tok=None):
        return post(self.srv, f"/api/v1/aws-accounts/{acct_id}/verify", {}, tok or self.token)


def seed_role(fake_aws, account, ext):
    fake_aws.reset({"accounts": {account: {"roles": [
        {"name": "CloudSweepAudit", "external_id": ext,
         "trusted_accounts": [FAKE_AWS_SERVICE_ACCOUNT]}]}}})


@pytest.fixture(scope="module")
def org(srv, pg):
    return Org(srv, pg)


def test_sound_trust_policy(srv, pg, org, fake_aws):
    account = acct_number()
    seed_role(fake_aws, account, GOOD_EXT)
    acct = org.role_account(account, GOOD_EXT)
    assert acct["status"] == "pending" and "verification" not in acct
    r = org.verify(acct["id"])
    assert r.status == 200, r
    doc = r.json()
    assert doc["ok"] is True and doc["external_id_enforced"] is True and "error" not in doc
    assert doc["assumed_role_arn"] == \
        f"arn:aws:sts::{account}:assumed-role/CloudSweepAudit/cloudsweep-verify"
    assert doc["account"]["status"] == "verified" and doc["account"]["verified_at"]
    assert doc["account"]["verify_error"] is None
    assert doc["account"]["external_id_enforced"] is True
    calls = fake_aws.calls(service="sts", action="AssumeRole")["calls"]
    assert [c["status"] for c in calls] == [200, 403]
    good, probe = (c["params"] for c in calls)
    assert good["ExternalId"] == GOOD_EXT and probe["ExternalId"] != GOOD_EXT
    assert good["RoleSessionName"] == "cloudsweep-verify"
    assert probe["RoleSessionName"] == "cloudsweep-verify-probe"
    assert good["SourceIdentity"] == org.id and calls[1]["error_code"] == "AccessDenied"
    # The audit trail: the read and the check, in that order, without the secret.
    rows = sql(pg, "SELECT event_type || '|' || result || '|' || coalesce(actor::text, '') "
                   "|| '|' || details::text FROM audit_events WHERE resource_id = "
                   f"'{acct['id']}' ORDER BY seq").strip().split("\n")
    kinds = [x.split("|")[0] for x in rows]
    assert kinds == ["credential.created", "credential.read", "credential.verified"], rows
    read, verified = rows[1].split("|", 3), rows[2].split("|", 3)
    assert json.loads(read[3])["purpose"] == "verify" and read[2] == org.user
    d = json.loads(verified[3])
    assert verified[1] == "success" and verified[2] == org.user
    assert d["ok"] is True and d["aws_request_id"] == calls[0]["request_id"]
    assert d["probe_request_id"] == calls[1]["request_id"]
    assert GOOD_EXT not in "\n".join(rows)
    # Again: no cached credentials hide a trust policy changed since.
    fake_aws.reset({"accounts": {account: {"roles": [
        {"name": "CloudSweepAudit", "external_id": None}]}}})
    r = org.verify(acct["id"])
    assert r.status == 200 and r.json()["ok"] is False, r
    assert r.json()["error"]["code"] == "external_id_not_enforced"


def test_wrong_stored_external_id(srv, pg, org, fake_aws):
    account = acct_number()
    seed_role(fake_aws, account, GOOD_EXT)
    acct = org.role_account(account, "ext-Wrong-Secret-0002")
    r = org.verify(acct["id"])
    assert r.status == 200, r
    doc = r.json()
    assert doc["ok"] is False and doc["error"]["code"] == "AccessDenied"
    assert "AssumeRole with the stored external id" in doc["error"]["message"]
    assert doc["assumed_role_arn"] is None and doc["external_id_enforced"] is None
    assert doc["account"]["status"] == "failed"
    assert doc["account"]["verify_error"].startswith("AccessDenied: ")
    assert doc["account"]["verified_at"] is None
    assert len(fake_aws.calls(service="sts", action="AssumeRole")["calls"]) == 1
    res = sql(pg, "SELECT result FROM audit_events WHERE event_type = 'credential.verified' "
                  f"AND resource_id = '{acct['id']}'").strip()
    assert res == "denied"


def test_role_without_external_id_is_flagged(srv, pg, org, fake_aws):
    account = acct_number()
    fake_aws.reset({"accounts": {account: {"roles": [
        {"name": "CloudSweepAudit", "external_id": None}]}}})
    acct = org.role_account(account, "ext-Any-Secret-0003")
    r = org.verify(acct["id"])
    assert r.status == 200, r
    doc = r.json()
    assert doc["ok"] is False and doc["external_id_enforced"] is False
    assert doc["error"]["code"] == "external_id_not_enforced"
    assert "sts:ExternalId" in doc["error"]["message"]
    assert doc["assumed_role_arn"].startswith(f"arn:aws:sts::{account}:assumed-role/")
    assert doc["account"]["status"] == "failed"
    assert doc["account"]["external_id_enforced"] is False
    assert doc["account"]["verify_error"].startswith("external_id_not_enforced: ")
    got = post(srv, "/api/v1/aws-accounts", {}, org.token)  # unrelated 400 keeps working
    assert got.status == 400
    r = srv.get(f"/api/v1/aws-accounts/{acct['id']}",
                headers={"Authorization": f"Bearer {org.token}"})
    assert r.json()["external_id_enforced"] is False


def test_throttled_then_ok(srv, org, fake_aws):
    account = acct_number()
    seed_role(fake_aws, account, GOOD_EXT)
    fake_aws.faults([{"type": "throttle", "service": "sts", "action": "AssumeRole",
                      "count": 2}])
    acct = org.role_account(account, GOOD_EXT)
    r = org.verify(acct["id"])
    assert r.status == 200 and r.json()["ok"] is True, r
    codes = [c["error_code"] for c in fake_aws.calls(service="sts")["calls"]]
    assert codes.count("Throttling") == 2 and codes[-1] == "AccessDenied"


@pytest.mark.parametrize("fault", [{"type": "reset"}, {"type": "error", "status": 503}])
def test_sts_down(srv, org, fake_aws, fault):
    account = acct_number()
    seed_role(fake_aws, account, GOOD_EXT)
    acct = org.role_account(account, GOOD_EXT)
    fake_aws.faults([{**fault, "service": "sts"}])
    r = org.verify(acct["id"])
    fake_aws.faults([])
    assert r.status == 502, r
    doc = r.json()
    assert doc["ok"] is False and doc["error"]["code"] == "aws_unavailable"
    assert "AWS STS did not answer" in doc["error"]["message"] and doc["request_id"]
    # Not known to be bad: the status stays, the error is recorded.
    assert doc["account"]["status"] == "pending"
    assert doc["account"]["verify_error"].startswith("aws_unavailable: ")


def test_access_keys(srv, pg, org, fake_aws):
    account = acct_number()
    fake_aws.reset({"accounts": {account: {"access_keys": [
        {"id": KEY_ID, "secret": KEY_SECRET, "user": "legacy"}]}}})
    body = {"account_id": account, "account_name": "Keys", "access_key_id": KEY_ID,
            "secret_access_key": KEY_SECRET, "regions": ["us-east-1"]}
    acct = post(srv, "/api/v1/aws-accounts", body, org.token).json()
    r = org.verify(acct["id"])
    assert r.status == 200, r
    doc = r.json()
    assert doc["ok"] is True and doc["external_id_enforced"] is None
    assert doc["assumed_role_arn"] == f"arn:aws:iam::{account}:user/legacy"
    assert doc["account"]["status"] == "verified"
    calls = fake_aws.calls(service="sts")["calls"]
    assert [(c["action"], c["access_key"]) for c in calls] == [("GetCallerIdentity", KEY_ID)]
    # The same keys stored for another account number: refused.
    other = acct_number()
    body = {**body, "account_id": other}
    acct2 = post(srv, "/api/v1/aws-accounts", body, org.token).json()
    doc = org.verify(acct2["id"]).json()
    assert doc["ok"] is False and doc["error"]["code"] == "account_mismatch"
    assert account in doc["error"]["message"]
    # Keys AWS does not know.
    fake_aws.reset()
    doc = org.verify(acct["id"]).json()
    assert doc["ok"] is False and doc["error"]["code"] == "InvalidClientTokenId"
    assert doc["account"]["status"] == "failed"


def test_no_secret_anywhere(srv, pg, org, fake_aws):
    dump = sql(pg, "SELECT row_to_json(a)::text FROM audit_events a "
                   "WHERE event_type LIKE 'credential.%'")
    dump += sql(pg, "SELECT verify_error FROM aws_accounts")
    logs = srv.log.read_text(errors="replace")
    for s in SECRETS:
        assert s not in dump and s not in logs


def test_other_org_and_roles(srv, pg, org, fake_aws):
    account = acct_number()
    seed_role(fake_aws, account, GOOD_EXT)
    acct = org.role_account(account, GOOD_EXT)
    other = Org(srv, pg)
    r = other.verify(acct["id"])
    assert r.status == 404 and r.json()["error"]["code"] == "not_found", r
    assert other.verify(str(uuid.uuid4())).status == 404
    assert other.verify("not-a-uuid").status == 404
    # A member of the owning organization may read accounts but not verify them.
    email = f"m{uuid.uuid4().hex[:12]}@example.com"
    r = srv.https("POST", "/api/v1/auth/signup", headers={"Content-Type": "application/json"},
                  body=json.dumps({"email": email, "password": PASSWORD,
                                   "org_name": "Tmp"}).encode())
    uid = r.json()["user"]["id"]
    sql(pg, f"DELETE FROM memberships WHERE user_id = '{uid}'; INSERT INTO memberships "
            f"(org_id, user_id, role) VALUES ('{org.id}', '{uid}', 'member')")
    r = org.verify(acct["id"], tok=org.login(email))
    assert r.status == 403, r
    assert fake_aws.calls(service="sts")["calls"] == []
    n = sql(pg, "SELECT count(*) FROM audit_events WHERE event_type IN ('credential.read', "
                f"'credential.verified') AND resource_id = '{acct['id']}'").strip()
    assert n == "0"


def test_verify_on_create(srv_create, pg, fake_aws):
    o = Org(srv_create, pg)
    account = acct_number()
    seed_role(fake_aws, account, GOOD_EXT)
    acct = o.role_account(account, GOOD_EXT)
    assert acct["status"] == "verified" and acct["verification"]["ok"] is True
    assert acct["verification"]["external_id_enforced"] is True
    # A failing check does not fail the create: the account is stored, flagged.
    account = acct_number()
    fake_aws.reset({"accounts": {account: {"roles": [
        {"name": "CloudSweepAudit", "external_id": None}]}}})
    acct = o.role_account(account, "ext-Any-Secret-0003")
    assert acct["status"] == "failed" and acct["external_id_enforced"] is False
    v = acct["verification"]
    assert v["ok"] is False and v["error"]["code"] == "external_id_not_enforced"
    r = srv_create.get(f"/api/v1/aws-accounts/{acct['id']}",
                       headers={"Authorization": f"Bearer {o.token}"})
    assert r.status == 200 and r.json()["status"] == "failed"


def test_client_gone_mid_check(srv, org, fake_aws):
    """The caller hangs up while STS hangs: the check is cancelled, nothing leaks or
    crashes (the sanitizer build checks), and the next check works."""
    account = acct_number()
    seed_role(fake_aws, account, GOOD_EXT)
    acct = org.role_account(account, GOOD_EXT)
    fake_aws.faults([{"type": "hang", "service": "sts", "ms": 3000}])
    with pytest.raises(OSError):
        srv.https("POST", f"/api/v1/aws-accounts/{acct['id']}/verify",
                  headers={"Content-Type": "application/json",
                           "Authorization": f"Bearer {org.token}"}, body=b"{}", timeout=0.5)
    fake_aws.faults([])
    r = org.verify(acct["id"])
    assert r.status == 200 and r.json()["ok"] is True, r
