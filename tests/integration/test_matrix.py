"""The authorization matrix: every API route the daemon registers × every role × the
caller's own organization and another one × no token, an expired, a revoked and a
wrongly signed token, each with the code the contract's table gives.

The routes come from the binary itself (`cloudsweepd routes`), so a route added later is
in the matrix without touching this file, and one added without a permission never gets
this far: the daemon refuses to start with it. The expected codes come from the
permission table below, which is the contract's (api.md, "Roles and permissions"), not
from the daemon's own table.
"""

import base64
import hashlib
import hmac
import json
import re
import subprocess
import time
import uuid

import pytest

from conftest import BINARY, ROOT, SECRET_OPTIONS, Server, wait_until, waste_item_sql

PASSWORD = "correct horse battery staple"
ROLES = ("viewer", "member", "admin", "owner")

# api.md: viewer < member < admin < owner; admin is denied billing:* explicitly.
MIN_ROLE = {
    "scans:read": "viewer", "waste_items:read": "viewer", "reports:read": "viewer",
    "members:read": "viewer",
    "scans:create": "member", "waste_items:approve": "member", "aws_accounts:read": "member",
    "aws_accounts:write": "admin", "waste_items:cleanup": "admin", "members:manage": "admin",
    "audit:read": "admin", "keys:rotate": "admin", "security:read": "admin",
    "security:manage": "admin",
    "billing:read": "owner", "billing:manage": "owner",
}

# Calls that would end the caller's own session or account: checked for authentication
# and permission refusals only, never sent with a token that is allowed through.
DESTRUCTIVE_SELF = {
    ("DELETE", "/api/v1/me"), ("DELETE", "/api/v1/me/sessions"),
    ("POST", "/api/v1/auth/logout"),
}


def allowed(role, perm):
    if perm.startswith("billing:") and role == "admin":
        return False
    return ROLES.index(role) >= ROLES.index(MIN_ROLE[perm])


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def sign_hs256(secret, header, claims):
    head = b64url(json.dumps(header, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


def routes():
    out = subprocess.run([str(BINARY), "routes"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


# Bodies that pass validation, so a refusal about the object itself (404) is what shows.
BODIES = {
    ("PATCH", "/api/v1/org/members/{user_id}"): {"role": "member"},
}


def call(srv, method, path, tok=None, pattern=None):
    headers = bearer(tok) if tok else {}
    body = None
    if method in ("POST", "PUT", "PATCH"):
        headers["Content-Type"] = "application/json"
        body = json.dumps(BODIES.get((method, pattern), {})).encode()
    return srv.https(method, path, headers=headers, body=body)


@pytest.fixture(scope="module")
def world(workdir, tls_files, pg, fake_aws):
    fake_aws.reset()
    srv = Server(workdir, tls_files, pg, name="matrix",
                 options={**fake_aws.options, "workers": 2, "aws_verify_on_create": 0,
                          "max_body_bytes": 65536})
    srv.start()
    wait_until(lambda: all(srv.get("/ready").status == 200 for _ in range(12)), 15,
               what="every worker ready")

    def post(path, body, tok=None):
        h = {"Content-Type": "application/json", **(bearer(tok) if tok else {})}
        return srv.https("POST", path, headers=h, body=json.dumps(body).encode())

    def new_user(org_name):
        email = f"m{uuid.uuid4().hex[:12]}@example.com"
        r = post("/api/v1/auth/signup", {"email": email, "password": PASSWORD,
                                          "org_name": org_name})
        assert r.status == 201, r
        return email, r.json()

    def login(email):
        r = post("/api/v1/auth/login", {"email": email, "password": PASSWORD})
        assert r.status == 200, r
        return r.json()["access_token"]

    def claims(tok):
        return json.loads(b64url_decode(tok.split(".")[1]))

    # Organization A: one user per role. Organization B: an owner and its objects.
    owner_email, _ = new_user("Matrix A")
    a_tok = {"owner": login(owner_email)}
    org_a = claims(a_tok["owner"])["org"]
    for role in ("viewer", "member", "admin"):
        email, body = new_user(f"Matrix {role}")
        uid = body["user"]["id"] if "user" in body else claims(login(email))["sub"]
        pg.psql(f"DELETE FROM memberships WHERE user_id = '{uid}'; "
                f"INSERT INTO memberships (org_id, user_id, role) "
                f"VALUES ('{org_a}', '{uid}', '{role}')", db=pg.dbname)
        a_tok[role] = login(email)
        assert claims(a_tok[role])["role"] == role

    b_email, _ = new_user("Matrix B")
    b_tok = login(b_email)
    b_claims = claims(b_tok)
    acct = f"{uuid.uuid4().int % 10**12:012d}"
    r = post("/api/v1/aws-accounts",
             {"account_id": acct, "account_name": "B prod",
              "role_arn": f"arn:aws:iam::{acct}:role/CloudSweep",
              "external_id": f"ext-{uuid.uuid4().hex}", "regions": ["us-east-1"]}, b_tok)
    assert r.status == 201, r
    b_account = r.json()["id"]
    r = post("/api/v1/scans", {"aws_account_ids": [b_account]}, b_tok)
    assert r.status == 202, r
    b_scan = r.json()["id"]
    b_item = pg.psql(waste_item_sql(b_claims["org"], b_scan, b_account, "us-east-1",
                                    "ebs_unattached", "vol-0matrix"), db=pg.dbname).split()[0]
    other = {"aws-accounts": b_account, "scans": b_scan, "waste-items": b_item,
             "members": b_claims["sub"], "sessions": b_claims["sid"]}

    # Bad tokens, all for A's owner: expired, revoked, wrongly signed.
    secret = open(SECRET_OPTIONS["jwt_secret_file"], "rb").read().strip()
    now = int(time.time())
    good = claims(a_tok["owner"])
    fresh = sign_hs256(secret, {"alg": "HS256", "typ": "JWT"},
                       {**good, "iat": now, "exp": now + 600})
    # The forging key is the daemon's: a fresh re-signed copy must be accepted.
    assert srv.get("/api/v1/me", headers=bearer(fresh)).status == 200
    expired = sign_hs256(secret, {"alg": "HS256", "typ": "JWT"},
                         {**good, "iat": now - 7200, "exp": now - 3600})
    head, body, sig = a_tok["owner"].split(".")
    wrong_sig = f"{head}.{body}.{b64url(hashlib.sha256(b'not the key').digest())}"
    revoked = login(owner_email)
    r = srv.https("POST", "/api/v1/auth/logout", headers=bearer(revoked))
    assert r.status in (200, 204), r
    wait_until(lambda: srv.get("/api/v1/me", headers=bearer(revoked)).status == 401, 5,
               what="the revocation on every worker")
    bad = {"no token": None, "expired": expired, "revoked": revoked, "wrong signature": wrong_sig}

    yield {"srv": srv, "tok": a_tok, "bad": bad, "other": other}
    problems = srv.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def concrete(pattern, ids=None):
    """The pattern with its parameters filled: another org's object where we have one."""
    parts = []
    segs = pattern.split("/")
    for i, seg in enumerate(segs):
        if seg.startswith("{"):
            kind = segs[i - 1] if i > 0 else ""
            if seg == "{ip}":
                parts.append("203.0.113.9")
            elif ids is not None and kind in ids:
                parts.append(ids[kind])
            else:
                parts.append(str(uuid.uuid4()))
        else:
            parts.append(seg)
    return "/".join(parts)


def api_routes():
    return [r for r in routes() if r["pattern"].startswith("/api/")]


def test_every_api_route_names_a_known_permission_or_is_public_or_self():
    rs = api_routes()
    assert len(rs) >= 30, rs
    for r in rs:
        assert r["public"] or r["self"] or r["perm"] in MIN_ROLE, r


def test_bad_tokens_are_401_everywhere(world):
    srv = world["srv"]
    failures = []
    for r in api_routes():
        if r["public"]:
            continue
        path = concrete(r["pattern"])
        for name, tok in world["bad"].items():
            got = call(srv, r["method"], path, tok).status
            if got != 401:
                failures.append(f"{r['method']} {r['pattern']} with {name}: {got}, want 401")
    assert not failures, "\n".join(failures)


def test_roles_in_own_and_other_org(world):
    srv = world["srv"]
    failures = []
    for r in api_routes():
        if r["public"] or (r["method"], r["pattern"]) in DESTRUCTIVE_SELF:
            continue
        has_object = "{" in r["pattern"]
        for role in ROLES:
            tok = world["tok"][role]
            ok = r["self"] or allowed(role, r["perm"])
            for where in ("own", "other") if has_object else ("own",):
                path = concrete(r["pattern"], world["other"] if where == "other" else None)
                got = call(srv, r["method"], path, tok, r["pattern"]).status
                want = None
                if not ok:
                    want = 403
                elif where == "other":
                    want = 404
                if want is not None and got != want:
                    failures.append(f"{r['method']} {path} as {role} ({where} org): "
                                    f"{got}, want {want}")
                elif want is None and (got in (401, 403) or got >= 500):
                    failures.append(f"{r['method']} {path} as {role}: {got}, "
                                    "want it let through")
    assert not failures, "\n".join(failures)


def test_every_route_is_in_the_openapi_document():
    text = (ROOT / "openapi.yaml").read_text()
    documented, path, seen = set(), None, set()
    for line in text.splitlines():
        m = re.match(r"^  (/\S*):\s*$", line)
        if m:
            path = m.group(1)
            # A repeated key is invalid YAML; parsers keep only the last one.
            assert path not in seen, f"openapi.yaml lists {path} twice"
            seen.add(path)
            continue
        m = re.match(r"^    (get|post|put|patch|delete):", line)
        if m and path:
            documented.add((m.group(1).upper(), path))
        if line.startswith("components:"):
            break
    missing = [f"{r['method']} {r['pattern']}" for r in routes()
               if (r["method"], r["pattern"]) not in documented]
    assert not missing, "routes missing from openapi.yaml:\n" + "\n".join(missing)
