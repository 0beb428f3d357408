"""A server with vault_provider = kms against the fake's KMS (needs the ring.c/rewrap.c
wiring): `keys rotate` creates kek-1.kms from nothing, the server unwraps it at start,
accounts are sealed, the API rotates to version 2 (kek-2.kms), a restart unwraps both and
every account still opens (the verify check decrypts each one)."""
import json
import subprocess
import uuid

from conftest import BINARY, FAKE_AWS_SERVICE_ACCOUNT, Server

PASSWORD = "correct horse battery staple"
REGION = "eu-west-1"


def call(srv, method, path, tok, body=None):
    h = {"Authorization": f"Bearer {tok}"}
    if body is not None:
        h["Content-Type"] = "application/json"
    return srv.https(method, path, headers=h,
                     body=json.dumps(body).encode() if body is not None else None)


def test_kms_server(workdir, tls_files, pg, fake_aws):
    accounts = [f"{uuid.uuid4().int % 10**12:012d}" for _ in range(2)]
    seed = {"accounts": {FAKE_AWS_SERVICE_ACCOUNT: {"regions": {REGION: {"kms_keys": [
        {"Aliases": ["alias/cloudsweep"]}]}}}}}
    for a in accounts:
        seed["accounts"][a] = {"roles": [{"name": "Audit", "external_id": f"ext-{a}"}]}
    fake_aws.reset(seed)
    vault = workdir / "kmsvault"
    vault.mkdir(mode=0o700)
    s = Server(workdir, tls_files, pg, name="kms",
               options={**fake_aws.options, "vault_provider": "kms",
                        "vault_kms_key_id": "alias/cloudsweep", "vault_kms_region": REGION,
                        "vault_key_dir": vault, "aws_verify_on_create": 0})
    s.write_conf()
    r = subprocess.run([str(BINARY), "-c", str(s.conf), "keys", "rotate"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    assert sorted(p.name for p in vault.iterdir()) == ["kek-1.kms"]
    s.start()
    s.wait_ready()
    email = f"k{uuid.uuid4().hex[:12]}@example.com"
    r = s.https("POST", "/api/v1/auth/signup", headers={"Content-Type": "application/json"},
                body=json.dumps({"email": email, "password": PASSWORD,
                                 "org_name": "Kms"}).encode())
    assert r.status == 201, r
    r = s.https("POST", "/api/v1/auth/login", headers={"Content-Type": "application/json"},
                body=json.dumps({"email": email, "password": PASSWORD}).encode())
    tok = r.json()["access_token"]

    def create(a):
        r = call(s, "POST", "/api/v1/aws-accounts", tok,
                 {"account_id": a, "account_name": "K",
                  "role_arn": f"arn:aws:iam::{a}:role/Audit", "external_id": f"ext-{a}",
                  "regions": [REGION]})
        assert r.status == 201, r
        return r.json()

    first = create(accounts[0])
    assert first["key_version"] == 1
    r = call(s, "POST", "/api/v1/admin/keys/rotate", tok, {})
    assert r.status == 201 and r.json()["version"] == 2, r
    assert sorted(p.name for p in vault.iterdir()) == ["kek-1.kms", "kek-2.kms"]
    second = create(accounts[1])
    assert second["key_version"] == 2
    s.stop()
    s.start()
    s.wait_ready()
    for acct in (first, second):
        r = call(s, "POST", f"/api/v1/aws-accounts/{acct['id']}/verify", tok, {})
        assert r.status == 200 and r.json()["ok"] is True, r
    gen = [c for c in fake_aws.calls(service="kms")["calls"]
           if c["action"] == "GenerateDataKey"]
    assert [c["params"]["EncryptionContext"] for c in gen] == \
        [{"cloudsweep-kek-version": "1"}, {"cloudsweep-kek-version": "2"}]
    problems = s.finish()
    assert not problems, problems
