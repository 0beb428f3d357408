"""The credential store end to end: POST/GET/DELETE /api/v1/aws-accounts and
/api/v1/provider-credentials against the real daemon and Postgres. Validation (every
rule of the contract, injection strings), roles, other organizations' ids (404),
duplicates (409), soft delete that wipes the sealed secrets, and the security checks:
no column of the database, no API response, no audit row and no log line ever holds a
secret in clear."""
import json
import uuid

import pytest

from conftest import Server

PASSWORD = "correct horse battery staple"
ACCOUNT = "123456789012"
ARN = f"arn:aws:iam::{ACCOUNT}:role/CloudSweepAudit"


def post(srv, path, body, tok, method="POST"):
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {tok}"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return srv.https(method, path, headers=h, body=data)


def get(srv, path, tok):
    return srv.get(path, headers={"Authorization": f"Bearer {tok}"})


def delete(srv, path, tok):
    return srv.https("DELETE", path, headers={"Authorization": f"Bearer {tok}"})


def sql(pg, q):
    return pg.psql(q, db=pg.dbname)


@pytest.fixture(scope="module")
def srv(workdir, tls_files, pg):
    s = Server(workdir, tls_files, pg, name="awsaccounts",
               options={"max_body_bytes": 65536,
                        "aws_regions": "us-east-1,us-west-2 eu-west-1"})
    s.start()
    s.wait_ready()
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class Org:
    """An organization with an owner, and members of other roles added on demand."""

    def __init__(self, srv, pg):
        self.srv, self.pg = srv, pg
        self.owner = self._signup()
        self.id = self.owner["org"]
        self.tokens = {"owner": self.owner["token"]}

    def _signup(self):
        email = f"u{uuid.uuid4().hex[:12]}@example.com"
        r = self.srv.https("POST", "/api/v1/auth/signup",
                           headers={"Content-Type": "application/json"},
                           body=json.dumps({"email": email, "password": PASSWORD,
                                            "org_name": "Creds"}).encode())
        assert r.status == 201, r
        body = r.json()
        return {"email": email, "user": body["user"]["id"], "org": body["org"]["id"],
                "token": self._login(email)}

    def _login(self, email):
        r = self.srv.https("POST", "/api/v1/auth/login",
                           headers={"Content-Type": "application/json"},
                           body=json.dumps({"email": email, "password": PASSWORD}).encode())
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


@pytest.fixture(scope="module")
def org(srv, pg):
    return Org(srv, pg)


def role_body(account=None, ext=None, **kw):
    account = account or f"{uuid.uuid4().int % 10**12:012d}"
    b = {"account_id": account, "account_name": "Production",
         "role_arn": f"arn:aws:iam::{account}:role/CloudSweepAudit",
         "external_id": ext or f"ext-{uuid.uuid4().hex}", "regions": ["us-east-1", "eu-west-1"]}
    b.update(kw)
    return b


def keys_body(account=None, secret=None):
    account = account or f"{uuid.uuid4().int % 10**12:012d}"
    return {"account_id": account, "account_name": "Legacy keys",
            "access_key_id": "AKIA" + uuid.uuid4().hex[:16].upper(),
            "secret_access_key": secret or uuid.uuid4().hex + "Sx/+" + uuid.uuid4().hex[:4],
            "regions": ["us-west-2"]}


def whole_db_text(pg):
    """Every row of every table, as text: where a secret in clear would show."""
    tables = [t for t in sql(pg, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
              .split() if t]
    return "\n".join(sql(pg, f"SELECT row_to_json(t)::text FROM {t} t") for t in tables)


def test_role_account_lifecycle(srv, pg, org):
    tok = org.token("owner")
    body = role_body(ext="ExtId-Secret-0042")
    r = post(srv, "/api/v1/aws-accounts", body, tok)
    assert r.status == 201, r
    acct = r.json()
    assert acct["account_id"] == body["account_id"]
    assert acct["kind"] == "role" and acct["role_arn"] == body["role_arn"]
    assert acct["external_id_last4"] == "0042"
    assert acct["regions"] == ["us-east-1", "eu-west-1"]
    assert acct["status"] == "pending" and acct["key_version"] >= 1
    assert "external_id" not in acct and b"ExtId-Secret" not in r.body
    assert r.header("Cache-Control") == "no-store"
    uuid.UUID(acct["id"])

    r = get(srv, f"/api/v1/aws-accounts/{acct['id']}", tok)
    assert r.status == 200 and r.json() == acct
    r = get(srv, "/api/v1/aws-accounts", tok)
    assert r.status == 200 and acct["id"] in [a["id"] for a in r.json()["items"]]
    assert b"ExtId-Secret" not in r.body

    blob = sql(pg, f"SELECT external_id_enc FROM aws_accounts WHERE id = '{acct['id']}'").strip()
    assert blob.startswith("v1:") and "ExtId-Secret" not in blob

    r = delete(srv, f"/api/v1/aws-accounts/{acct['id']}", tok)
    assert r.status == 204, r
    row = sql(pg, "SELECT coalesce(external_id_enc, 'NULL'), coalesce(secret_access_key_enc, "
                  f"'NULL'), deleted_at IS NOT NULL FROM aws_accounts WHERE id = '{acct['id']}'")
    assert row.strip() == "NULL|NULL|t"
    assert get(srv, f"/api/v1/aws-accounts/{acct['id']}", tok).status == 404
    assert delete(srv, f"/api/v1/aws-accounts/{acct['id']}", tok).status == 404
    assert acct["id"] not in [a["id"] for a in get(srv, "/api/v1/aws-accounts", tok)
                              .json()["items"]]
    events = sql(pg, "SELECT event_type || ' ' || actor FROM audit_events WHERE resource_id = "
                     f"'{acct['id']}' ORDER BY seq").split("\n")
    assert [e.split()[0] for e in events if e] == ["credential.created", "credential.deleted"]
    assert all(e.split()[1] == org.owner["user"] for e in events if e)


def test_key_pair_account(srv, pg, org):
    tok = org.token("owner")
    body = keys_body(secret="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    r = post(srv, "/api/v1/aws-accounts", body, tok)
    assert r.status == 201, r
    acct = r.json()
    assert acct["kind"] == "keys" and acct["role_arn"] is None
    assert acct["access_key_id_last4"] == body["access_key_id"][-4:]
    assert body["secret_access_key"].encode() not in r.body
    assert body["access_key_id"].encode() not in r.body
    row = sql(pg, f"SELECT secret_access_key_enc FROM aws_accounts WHERE id = '{acct['id']}'")
    assert row.startswith("v1:") and "wJalrXUtnFEMI" not in row
    details = sql(pg, "SELECT details::text FROM audit_events WHERE event_type = "
                      f"'credential.created' AND resource_id = '{acct['id']}'")
    d = json.loads(details)
    assert d["kind"] == "access_key" and d["access_key_id"].startswith("hmac-sha256:")
    assert body["access_key_id"] not in details


BAD = [
    ({"account_id": None}, "account_id"),
    ({"account_id": "12345678901"}, "account_id"),
    ({"account_id": "1234567890123"}, "account_id"),
    ({"account_id": "12345678901a"}, "account_id"),
    ({"account_id": "123456789012' OR '1'='1"}, "account_id"),
    ({"account_id": 123456789012}, "account_id"),
    ({"account_id": "１２３４５６７８９０１２"}, "account_id"),
    ({"account_name": ""}, "account_name"),
    ({"account_name": "x" * 256}, "account_name"),
    ({"account_name": "<script>alert(1)</script>"}, "account_name"),
    ({"account_name": "Robert'); DROP TABLE aws_accounts;--"}, "account_name"),
    ({"account_name": 'say "hi"'}, "account_name"),
    ({"account_name": "tab\there"}, "account_name"),
    ({"account_name": None}, "account_name"),
    ({"account_name": ["x"]}, "account_name"),
    ({"role_arn": "arn:aws:iam::999999999999:role/CloudSweepAudit"}, "role_arn"),
    ({"role_arn": "arn:aws:iam::ACCOUNT:role/"}, "role_arn"),
    ({"role_arn": "arn:aws:iam::ACCOUNT:role/bad name"}, "role_arn"),
    ({"role_arn": "arn:aws:iam::ACCOUNT:role/path/name"}, "role_arn"),
    ({"role_arn": "arn:aws:iam::ACCOUNT:user/CloudSweepAudit"}, "role_arn"),
    ({"role_arn": "arn:aws-cn:iam::ACCOUNT:role/x"}, "role_arn"),
    ({"role_arn": "arn:aws:iam::ACCOUNT:role/x;rm -rf /"}, "role_arn"),
    ({"role_arn": None}, "role_arn"),
    ({"external_id": "1234567"}, "external_id"),
    ({"external_id": "x" * 65}, "external_id"),
    ({"external_id": None}, "external_id"),
    ({"external_id": 12345678}, "external_id"),
    ({"regions": []}, "regions"),
    ({"regions": "us-east-1"}, "regions"),
    ({"regions": ["mars-north-1"]}, "regions"),
    ({"regions": ["ap-south-1"]}, "regions"),  # a real region, not on this allow-list
    ({"regions": ["us-east-1", "us-east-1"]}, "regions"),
    ({"regions": ["us-east-1'; --"]}, "regions"),
    ({"regions": [1]}, "regions"),
    ({"regions": None}, "regions"),
    ({"access_key_id": "AKIAABCDEFGHIJKLMNOP"}, "role_arn"),  # both kinds at once
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_validation(srv, pg, org, change, field):
    body = role_body(account=ACCOUNT)
    for k, v in change.items():
        if isinstance(v, str):
            v = v.replace("ACCOUNT", body["account_id"])
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    before = sql(pg, "SELECT count(*) FROM aws_accounts").strip()
    r = post(srv, "/api/v1/aws-accounts", body, org.token("owner"))
    assert r.status == 400, r
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and field in err["message"], err
    assert sql(pg, "SELECT count(*) FROM aws_accounts").strip() == before
    ext = body.get("external_id")
    if isinstance(ext, str):
        assert ext.encode() not in r.body


@pytest.mark.parametrize("change,field", [
    ({"access_key_id": "akia_lower_case_1234"}, "access_key_id"),
    ({"access_key_id": "AKIA1"}, "access_key_id"),
    ({"secret_access_key": "short"}, "secret_access_key"),
    ({"secret_access_key": "has spaces in the secret key value"}, "secret_access_key"),
    ({"secret_access_key": None}, "secret_access_key"),
])
def test_key_pair_validation(srv, org, change, field):
    body = keys_body()
    for k, v in change.items():
        if v is None:
            body.pop(k)
        else:
            body[k] = v
    r = post(srv, "/api/v1/aws-accounts", body, org.token("owner"))
    assert r.status == 400, r
    assert field in r.json()["error"]["message"]


def test_bodies_that_are_not_accounts(srv, org):
    tok = org.token("owner")
    for raw in (b"{not json", b"[]", b'"x"', json.dumps({"external_id": "x" * 100}).encode()):
        r = post(srv, "/api/v1/aws-accounts", raw, tok)
        assert r.status == 400 and r.json()["error"]["code"] == "invalid_request", r
    r = post(srv, "/api/v1/aws-accounts", {}, tok)
    assert r.status == 400 and "account_id" in r.json()["error"]["message"]


def test_duplicate_is_conflict_until_deleted(srv, org):
    tok = org.token("owner")
    body = role_body()
    r = post(srv, "/api/v1/aws-accounts", body, tok)
    assert r.status == 201, r
    again = post(srv, "/api/v1/aws-accounts", role_body(account=body["account_id"]), tok)
    assert again.status == 409 and again.json()["error"]["code"] == "conflict", again
    assert delete(srv, f"/api/v1/aws-accounts/{r.json()['id']}", tok).status == 204
    r = post(srv, "/api/v1/aws-accounts", role_body(account=body["account_id"]), tok)
    assert r.status == 201, r


def test_same_account_in_two_orgs(srv, pg, org):
    other = Org(srv, pg)
    body = role_body()
    assert post(srv, "/api/v1/aws-accounts", body, org.token("owner")).status == 201
    assert post(srv, "/api/v1/aws-accounts", role_body(account=body["account_id"]),
                other.token("owner")).status == 201


@pytest.mark.parametrize("role,read,write", [
    ("viewer", 403, 403), ("member", 200, 403), ("admin", 200, 201), ("owner", 200, 201),
])
def test_roles(srv, org, role, read, write):
    tok = org.token(role)
    mine = post(srv, "/api/v1/aws-accounts", role_body(), org.token("owner")).json()
    assert get(srv, "/api/v1/aws-accounts", tok).status == read
    assert get(srv, f"/api/v1/aws-accounts/{mine['id']}", tok).status == read
    assert get(srv, "/api/v1/provider-credentials", tok).status == read
    r = post(srv, "/api/v1/aws-accounts", role_body(), tok)
    assert r.status == write, r
    if write == 403:
        assert r.json()["error"]["code"] == "forbidden"
        assert delete(srv, f"/api/v1/aws-accounts/{mine['id']}", tok).status == 403
        assert post(srv, "/api/v1/provider-credentials",
                    {"provider": "gcp", "name": "x", "secret": "{}"}, tok).status == 403
    else:
        assert delete(srv, f"/api/v1/aws-accounts/{mine['id']}", tok).status == 204


def test_other_orgs_ids_are_not_found(srv, pg, org):
    mine = post(srv, "/api/v1/aws-accounts", role_body(), org.token("owner")).json()
    other = Org(srv, pg)
    tok = other.token("owner")
    for r in (get(srv, f"/api/v1/aws-accounts/{mine['id']}", tok),
              delete(srv, f"/api/v1/aws-accounts/{mine['id']}", tok),
              get(srv, f"/api/v1/aws-accounts/{uuid.uuid4()}", tok),
              get(srv, "/api/v1/aws-accounts/not-a-uuid", tok)):
        # (verify of another org's account: test_verify.py, whose server reaches AWS)
        assert r.status == 404 and r.json()["error"]["code"] == "not_found", r
    assert get(srv, "/api/v1/aws-accounts", tok).json()["items"] == []
    # Still there for its owner.
    assert get(srv, f"/api/v1/aws-accounts/{mine['id']}", org.token("owner")).status == 200


def test_verify_is_not_implemented_yet(srv, org):
    mine = post(srv, "/api/v1/aws-accounts", role_body(), org.token("owner")).json()
    r = post(srv, f"/api/v1/aws-accounts/{mine['id']}/verify", {}, org.token("owner"))
    assert r.status == 501 and r.json()["error"]["code"] == "not_implemented", r
    r = post(srv, f"/api/v1/aws-accounts/{mine['id']}/verify", {}, org.token("member"))
    assert r.status == 403


def test_pagination(srv, pg):
    o = Org(srv, pg)
    tok = o.token("owner")
    ids = {post(srv, "/api/v1/aws-accounts", role_body(), tok).json()["id"] for _ in range(5)}
    seen, cursor = [], None
    while True:
        r = get(srv, "/api/v1/aws-accounts?limit=2" + (f"&cursor={cursor}" if cursor else ""),
                tok)
        assert r.status == 200, r
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [a["id"] for a in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 and set(seen) == ids
    for bad in ("limit=0", "limit=501", "limit=x", "cursor=nope"):
        assert get(srv, f"/api/v1/aws-accounts?{bad}", tok).status == 400


def test_provider_credentials(srv, pg, org):
    tok = org.token("owner")
    secret = json.dumps({"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----"
                         "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"})
    r = post(srv, "/api/v1/provider-credentials", {"provider": "gcp", "name": "GCP prod",
                                                   "secret": secret}, tok)
    assert r.status == 201, r
    cred = r.json()
    assert cred["provider"] == "gcp" and cred["name"] == "GCP prod" and "secret" not in cred
    assert b"MIIEvQIBADANBg" not in r.body
    r = get(srv, "/api/v1/provider-credentials", tok)
    assert r.status == 200 and [c["id"] for c in r.json()["items"]] == [cred["id"]]
    assert b"MIIEvQIBADANBg" not in r.body
    row = sql(pg, f"SELECT secret_enc FROM provider_credentials WHERE id = '{cred['id']}'")
    assert row.startswith("v1:") and "MIIEvQIBADANBg" not in row
    for body, field in [({"provider": "aws", "name": "x", "secret": "s"}, "provider"),
                        ({"provider": "azure", "name": "<b>", "secret": "s"}, "name"),
                        ({"provider": "azure", "name": "x", "secret": ""}, "secret"),
                        ({"provider": "azure", "name": "x", "secret": {"a": 1}}, "secret")]:
        r = post(srv, "/api/v1/provider-credentials", body, tok)
        assert r.status == 400 and field in r.json()["error"]["message"], r


def test_no_secret_anywhere(srv, pg, org):
    """Plaintext secrets appear in no column of any table, no audit row and no log line."""
    tok = org.token("owner")
    ext = "NeedleExternal-" + uuid.uuid4().hex[:12]
    key = "NeedleSecretKey" + uuid.uuid4().hex
    prov = "NeedleProvider-" + uuid.uuid4().hex
    assert post(srv, "/api/v1/aws-accounts", role_body(ext=ext), tok).status == 201
    assert post(srv, "/api/v1/aws-accounts", keys_body(secret=key), tok).status == 201
    assert post(srv, "/api/v1/provider-credentials",
                {"provider": "azure", "name": "Azure", "secret": prov}, tok).status == 201
    # A rejected body with a secret in it must not leak either.
    r = post(srv, "/api/v1/aws-accounts", role_body(ext=ext + "-rejected", regions=["nowhere"]),
             tok)
    assert r.status == 400
    db = whole_db_text(pg)
    logs = srv.log.read_text(errors="replace") + srv.stderr.read_text(errors="replace")
    for needle in (ext, key, prov, "Needle"):
        assert needle not in db, needle
        assert needle not in logs, needle
