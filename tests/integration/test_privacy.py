"""Privacy end to end: the export holds the caller's data and nothing of other people,
PATCH /me corrects the name and changes the email only after re-verification, DELETE /me
refuses further logins and ends every session (a sole owner with members must hand over
first), and the purge job hard-deletes the personal data of long-deleted accounts while the
audit trail keeps verifying."""
import json
import uuid

import pytest

from conftest import Server, wait_until

PASSWORD = "correct horse battery staple"


def post(srv, path, body, headers=None, method="POST"):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return srv.https(method, path, headers=h, body=json.dumps(body).encode())


def bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


def signup(srv, org="Acme"):
    email = f"p{uuid.uuid4().hex[:12]}@example.com"
    r = post(srv, "/api/v1/auth/signup", {"email": email, "password": PASSWORD, "org_name": org})
    assert r.status == 201, r
    return email, r.json()


def login(srv, email, password=PASSWORD, ua=None):
    h = {"User-Agent": ua} if ua else None
    r = post(srv, "/api/v1/auth/login", {"email": email, "password": password}, h)
    assert r.status == 200, r
    return r.json()


def sql(pg, q):
    return pg.psql(q, db=pg.dbname).strip()


def audit_rows(pg, where):
    out = pg.psql(f"SELECT row_to_json(a) FROM audit_events a WHERE {where} ORDER BY seq",
                  db=pg.dbname)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def srv(workdir, tls_files, pg):
    s = Server(workdir, tls_files, pg, name="privacy",
               options={"workers": 2, "purge_interval_s": 1})
    s.start()
    wait_until(lambda: all(s.get("/ready").status == 200 for _ in range(12)), 15,
               what="every worker ready")
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def add_member(srv, pg, owner_tok, org_id, role="member", ua=None):
    """A user who belongs to org_id only: (id, email, token)."""
    email, body = signup(srv, org="Home")
    uid = body["user"]["id"]
    r = post(srv, "/api/v1/org/members", {"email": email, "role": role}, bearer(owner_tok))
    assert r.status == 201, r
    sql(pg, f"DELETE FROM memberships WHERE user_id = '{uid}' AND org_id <> '{org_id}'")
    return uid, email, login(srv, email, ua=ua)["access_token"]


def test_export_holds_my_data_and_nothing_of_others(srv, pg):
    email, body = signup(srv, org="Exporters")
    uid, org_id = body["user"]["id"], body["org"]["id"]
    tok = login(srv, email, ua="my-browser/1.0")["access_token"]
    # Another member whose actions concern me: their address and browser must not leak.
    other_id, other_email, other_tok = add_member(srv, pg, tok, org_id, "owner",
                                                  ua="their-browser/9.9")
    r = post(srv, f"/api/v1/org/members/{uid}", {"role": "admin"}, bearer(other_tok),
             method="PATCH")
    assert r.status == 200, r
    tok = login(srv, email, ua="my-browser/1.0")["access_token"]
    r = srv.get("/api/v1/me/export", headers=bearer(tok))
    assert r.status == 200, r
    assert "attachment" in r.header("Content-Disposition")
    doc = r.json()
    assert doc["user"]["id"] == uid and doc["user"]["email"] == email
    assert [(m["org_id"], m["role"]) for m in doc["memberships"]] == [(org_id, "admin")]
    assert len(doc["sessions"]) == 2
    assert all(s["user_agent"] == "my-browser/1.0" for s in doc["sessions"])
    types = [e["event_type"] for e in doc["audit_events"]]
    assert "auth.signup" in types and "auth.login.succeeded" in types
    changed = [e for e in doc["audit_events"] if e["event_type"] == "org.member.role_changed"]
    assert changed and changed[0]["actor"] == "another_user"
    assert changed[0]["actor_ip"] is None and changed[0]["user_agent"] is None
    text = r.body.decode()
    for theirs in (other_email, other_id, "their-browser"):
        assert theirs not in text
    ev = audit_rows(pg, f"event_type = 'user.exported' AND actor = '{uid}'")
    assert len(ev) == 1 and ev[0]["details"]["bytes"] == len(r.body)


@pytest.mark.parametrize("body,field", [
    ({}, "name or email"),
    ({"name": 5}, "name"),
    ({"name": "x" * 256}, "name"),
    ({"name": "tab\there"}, "name"),
    ({"email": "nope"}, "email"),
    ({"email": None}, "email"),
    ({"role": "owner"}, "role"),
    ({"name": "ok", "password": "sneaky one here"}, "password"),
])
def test_patch_validation(srv, body, field):
    email, _ = signup(srv)
    tok = login(srv, email)["access_token"]
    r = post(srv, "/api/v1/me", body, bearer(tok), method="PATCH")
    assert r.status == 400, r
    assert r.json()["error"]["code"] == "invalid_request" and field in r.json()["error"]["message"]


def test_patch_name_and_email_with_reverification(srv, pg):
    email, body = signup(srv)
    uid = body["user"]["id"]
    tok = login(srv, email)["access_token"]
    h = bearer(tok)
    r = post(srv, "/api/v1/me", {"name": "Ada Lovelace"}, h, method="PATCH")
    assert r.status == 200 and r.json()["name"] == "Ada Lovelace", r
    assert "email_verification_token" not in r.json()
    assert srv.get("/api/v1/me", headers=h).json()["name"] == "Ada Lovelace"

    new = f"new-{uuid.uuid4().hex[:10]}@example.com"
    r = post(srv, "/api/v1/me", {"email": new.upper()}, h, method="PATCH")
    assert r.status == 200, r
    j = r.json()
    assert j["email"] == email and j["pending_email"] == new
    token = j["email_verification_token"]
    # Not applied yet: the old address still logs in, the new one does not.
    assert srv.get("/api/v1/me", headers=h).json()["email"] == email
    assert post(srv, "/api/v1/auth/login", {"email": new, "password": PASSWORD}).status == 401
    stored = sql(pg, f"SELECT pending_email_token_hash FROM users WHERE id = '{uid}'")
    assert stored and token not in stored
    r = post(srv, "/api/v1/me/email/verify", {"token": "A" * 43}, h)
    assert r.status == 400 and "token" in r.json()["error"]["message"]
    r = post(srv, "/api/v1/me/email/verify", {"token": token}, h)
    assert r.status == 200 and r.json()["email"] == new, r
    r = post(srv, "/api/v1/me/email/verify", {"token": token}, h)
    assert r.status == 400  # used once
    login(srv, new)
    assert post(srv, "/api/v1/auth/login", {"email": email, "password": PASSWORD}).status == 401
    ev = audit_rows(pg, f"event_type = 'user.updated' AND actor = '{uid}'")
    assert len(ev) == 3
    dump = json.dumps(ev)
    assert new not in dump and email not in dump and token not in dump
    assert token not in srv.log.read_text()
    assert ev[1]["details"]["email"].startswith("hmac-sha256:")


def test_patch_email_taken(srv):
    taken, _ = signup(srv)
    email, _ = signup(srv)
    tok = login(srv, email)["access_token"]
    r = post(srv, "/api/v1/me", {"email": taken}, bearer(tok), method="PATCH")
    assert r.status == 409 and r.json()["error"]["code"] == "conflict", r


def test_delete_me_refuses_login_and_ends_sessions(srv, pg):
    email, body = signup(srv)
    uid = body["user"]["id"]
    first = login(srv, email)
    second = login(srv, email)
    r = srv.https("DELETE", "/api/v1/me", headers=bearer(first["access_token"]))
    assert r.status == 204, r
    assert any(c.startswith("cs_access=;") for c in r.header_all("Set-Cookie"))
    for t in (first, second):
        wait_until(lambda t=t: srv.get("/api/v1/me", headers=bearer(t["access_token"])).status
                   == 401, 1.5, what="sessions of the deleted account refused")
        assert post(srv, "/api/v1/auth/refresh",
                    {"refresh_token": t["refresh_token"]}).status == 401
    r = post(srv, "/api/v1/auth/login", {"email": email, "password": PASSWORD})
    assert r.status == 401 and r.json()["error"] == {"code": "invalid_credentials",
                                                     "message": "wrong email or password"}
    ev = audit_rows(pg, f"event_type = 'user.deleted' AND actor = '{uid}'")
    assert len(ev) == 1 and ev[0]["details"]["sessions_revoked"] == 2
    assert ev[0]["details"]["purge_after"].endswith("Z")
    # The address is free again for a new account.
    r = post(srv, "/api/v1/auth/signup", {"email": email, "password": PASSWORD, "org_name": "B"})
    assert r.status == 201, r


def test_sole_owner_with_members_must_hand_over_first(srv, pg):
    email, body = signup(srv, org="Handover")
    org_id = body["org"]["id"]
    tok = login(srv, email)["access_token"]
    other, _, _ = add_member(srv, pg, tok, org_id, "admin")
    r = srv.https("DELETE", "/api/v1/me", headers=bearer(tok))
    assert r.status == 409 and r.json()["error"]["code"] == "conflict", r
    assert org_id in r.json()["error"]["message"]
    assert srv.get("/api/v1/me", headers=bearer(tok)).status == 200
    r = post(srv, f"/api/v1/org/members/{other}", {"role": "owner"}, bearer(tok), method="PATCH")
    assert r.status == 200, r
    assert srv.https("DELETE", "/api/v1/me", headers=bearer(tok)).status == 204


def test_purge_removes_personal_data_and_the_chain_still_verifies(srv, pg):
    owner_email, body = signup(srv, org="Purge")
    org_id = body["org"]["id"]
    owner_tok = login(srv, owner_email)["access_token"]
    uid, email, tok = add_member(srv, pg, owner_tok, org_id, "member")
    post(srv, "/api/v1/me", {"name": "Soon Gone"}, bearer(tok), method="PATCH")
    assert srv.https("DELETE", "/api/v1/me", headers=bearer(tok)).status == 204
    # Not due yet (29 days): left alone.
    young, _, young_tok = add_member(srv, pg, owner_tok, org_id, "viewer")
    assert srv.https("DELETE", "/api/v1/me", headers=bearer(young_tok)).status == 204
    sql(pg, f"UPDATE users SET deleted_at = now() - interval '29 days' WHERE id = '{young}'")
    gh = int(uuid.uuid4().int % 10**9) + 1
    sql(pg, f"INSERT INTO github_identities (github_id, user_id, login) "
            f"VALUES ({gh}, '{uid}', 'soon-gone'); "
            f"INSERT INTO backup_codes (user_id, code_hash) VALUES ('{uid}', 'x'); "
            f"UPDATE users SET github_id = {gh}, github_login = 'soon-gone' WHERE id = '{uid}'")
    before = len(audit_rows(pg, f"org_id = '{org_id}' AND (actor = '{uid}' "
                                f"OR resource_id = '{uid}')"))
    sql(pg, f"UPDATE users SET deleted_at = now() - interval '31 days' WHERE id = '{uid}'")
    wait_until(lambda: sql(pg, f"SELECT purged_at IS NOT NULL FROM users WHERE id = '{uid}'")
               == "t", 10, what="the purge job")
    row = sql(pg, "SELECT email, name, password_hash IS NULL, github_id IS NULL, "
                  f"mfa_secret IS NULL FROM users WHERE id = '{uid}'")
    assert row == f"purged-{uid}||t|t|t", row
    for table in ("sessions", "backup_codes", "memberships", "github_identities"):
        assert sql(pg, f"SELECT count(*) FROM {table} WHERE user_id = '{uid}'") == "0"
    assert sql(pg, "SELECT purged_at IS NULL, email LIKE '%@example.com' FROM users "
                   f"WHERE id = '{young}'") == "t|t"
    assert email not in sql(pg, "SELECT string_agg(email, ',') FROM users")
    after = audit_rows(pg, f"org_id = '{org_id}' AND (actor = '{uid}' OR resource_id = '{uid}')")
    assert len(after) == before + 1 and after[-1]["event_type"] == "user.purged"
    assert after[-1]["actor"] == "system" and after[-1]["resource_id"] == uid
    r = srv.get("/api/v1/audit/verify", headers=bearer(owner_tok))
    assert r.status == 200 and r.json()["ok"] is True, r
    # Purged once: later runs leave it alone.
    assert len(audit_rows(pg, f"event_type = 'user.purged' AND resource_id = '{uid}'")) == 1
    members = srv.get("/api/v1/org/members", headers=bearer(owner_tok)).json()["items"]
    assert [m["user_id"] for m in members] == [body["user"]["id"]]
    log = srv.log.read_text()
    assert email not in log and "Soon Gone" not in log
