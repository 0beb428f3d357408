"""Identity end to end against the real daemon and Postgres: signup, login, tokens,
cookies and CSRF, refresh rotation with its grace window and reuse detection, logout
revocation across workers, RBAC, and the audit rows each action writes (with no secret in
them) plus the tamper-evident chain that covers them."""
import json
import time
import uuid

import pytest

from conftest import wait_until

PASSWORD = "correct horse battery staple"


def post(server, path, body, headers=None):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return server.https("POST", path, headers=h, body=json.dumps(body).encode())


def signup(server, email=None, password=PASSWORD, org="Acme"):
    email = email or f"u{uuid.uuid4().hex[:12]}@example.com"
    r = post(server, "/api/v1/auth/signup", {"email": email, "password": password,
                                             "org_name": org})
    assert r.status == 201, r
    return email, r.json()


def login(server, email, password=PASSWORD):
    return post(server, "/api/v1/auth/login", {"email": email, "password": password})


def bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


@pytest.fixture(scope="module")
def srv(server_factory_module):
    return server_factory_module


@pytest.fixture(scope="module")
def server_factory_module(workdir, tls_files, pg):
    from conftest import Server
    s = Server(workdir, tls_files, pg, name="identity",
               options={"workers": 2, "refresh_grace_s": 2})
    s.start()
    # Fresh connections land on either worker: wait until both say they are ready.
    wait_until(lambda: all(s.get("/ready").status == 200 for _ in range(12)), 15,
               what="every worker ready")
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def audit_rows(pg, where):
    out = pg.psql(f"SELECT row_to_json(a) FROM audit_events a WHERE {where} ORDER BY seq",
                  db=pg.dbname)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_signup_login_me(srv, pg):
    email, body = signup(srv, email="  Alice.Example@Example.COM ")
    assert body["user"]["email"] == "alice.example@example.com"
    assert body["role"] == "owner"
    r = login(srv, "alice.example@example.com")
    assert r.status == 200, r
    tok = r.json()
    assert tok["token_type"] == "Bearer" and tok["expires_in"] == 3600
    cookies = r.header_all("Set-Cookie")
    assert any(c.startswith("cs_access=") and "HttpOnly" in c and "Secure" in c
               and "SameSite=Lax" in c for c in cookies)
    assert any(c.startswith("cs_csrf=") for c in cookies)
    me = srv.get("/api/v1/me", headers=bearer(tok["access_token"]))
    assert me.status == 200, me
    assert me.json()["email"] == "alice.example@example.com"
    assert me.json()["role"] == "owner"
    assert me.header("Cache-Control") == "no-store"
    # The stored password is an argon2id hash, never the password.
    stored = pg.psql("SELECT password_hash FROM users WHERE email = 'alice.example@example.com'",
                     db=pg.dbname).strip()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


@pytest.mark.parametrize("body,field", [
    ({"email": "x@example.com", "password": "short", "org_name": "A"}, "password"),
    ({"email": "not-an-email", "password": PASSWORD, "org_name": "A"}, "email"),
    ({"email": "x@example.com", "password": PASSWORD}, "org_name"),
    ({"email": "x@example.com", "password": PASSWORD, "org_name": "<script>"}, "org_name"),
    ({"email": 5, "password": PASSWORD, "org_name": "A"}, "email"),
    ({"email": "x@example.com", "password": "x@example.com", "org_name": "A"}, "password"),
])
def test_signup_validation(srv, body, field):
    r = post(srv, "/api/v1/auth/signup", body)
    assert r.status == 400, r
    assert r.json()["error"]["code"] == "invalid_request"
    assert field in r.json()["error"]["message"]


def test_signup_duplicate_email(srv):
    email, _ = signup(srv)
    r = post(srv, "/api/v1/auth/signup", {"email": email.upper(), "password": PASSWORD,
                                         "org_name": "Other"})
    assert r.status == 409, r


def test_wrong_password_and_unknown_email_look_the_same(srv, pg):
    email, _ = signup(srv)
    a = login(srv, email, "wrong password, long enough")
    b = login(srv, f"nobody-{uuid.uuid4().hex}@example.com", "wrong password, long enough")
    for r in (a, b):
        assert r.status == 401
        assert r.json()["error"] == {"code": "invalid_credentials",
                                     "message": "wrong email or password"}
    rows = audit_rows(pg, "event_type = 'auth.login.failed'")
    assert rows, "failed logins are audited"
    dump = json.dumps(rows)
    assert "wrong password" not in dump and email not in dump
    # (GitHub sign-in failures, written by other tests, name no email.)
    emailed = [r for r in rows if "email" in r["details"]]
    assert len(emailed) >= 2
    assert all(r["details"]["email"].startswith("hmac-sha256:") for r in emailed)


def test_lockout_after_repeated_failures(srv, pg):
    email, _ = signup(srv)
    for _ in range(5):
        assert login(srv, email, "wrong password, long enough").status == 401
    # Locked: even the right password is refused, with the same answer.
    r = login(srv, email)
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_credentials"
    pg.psql(f"UPDATE users SET pw_locked_until = now() - interval '1 second' "
            f"WHERE email = '{email}'", db=pg.dbname)
    assert login(srv, email).status == 200


@pytest.mark.parametrize("mutate", ["none-alg", "bad-signature", "garbage", "expired"])
def test_forged_tokens_are_refused(srv, mutate):
    import base64
    import hashlib
    import hmac
    email, _ = signup(srv)
    tok = login(srv, email).json()["access_token"]
    head, payload, sig = tok.split(".")

    def b64(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    if mutate == "none-alg":
        forged = b64({"alg": "none", "typ": "JWT"}) + "." + payload + "."
    elif mutate == "bad-signature":
        forged = head + "." + payload + "." + ("A" if sig[0] != "A" else "B") + sig[1:]
    elif mutate == "garbage":
        forged = "not.a.token"
    else:
        claims["exp"] = int(time.time()) - 3600
        body = b64({"alg": "HS256", "typ": "JWT"}) + "." + b64(claims)
        key = b"wrong key wrong key wrong key wrong key"
        forged = body + "." + base64.urlsafe_b64encode(
            hmac.new(key, body.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    r = srv.get("/api/v1/me", headers=bearer(forged))
    assert r.status == 401 and r.json()["error"]["code"] == "unauthenticated"


def test_no_token_is_401(srv):
    r = srv.get("/api/v1/me")
    assert r.status == 401 and r.json()["error"]["code"] == "unauthenticated"


def test_cookie_requests_need_csrf(srv):
    email, _ = signup(srv)
    r = login(srv, email)
    cookies = {c.split("=", 1)[0]: c.split("=", 1)[1].split(";")[0]
               for c in r.header_all("Set-Cookie")}
    jar = f"cs_access={cookies['cs_access']}; cs_csrf={cookies['cs_csrf']}"
    assert srv.get("/api/v1/me", headers={"Cookie": jar}).status == 200
    r = srv.https("POST", "/api/v1/auth/logout", headers={"Cookie": jar})
    assert r.status == 403 and r.json()["error"]["code"] == "csrf_failed"
    r = srv.https("POST", "/api/v1/auth/logout",
                  headers={"Cookie": jar, "X-CSRF-Token": "x" * len(cookies["cs_csrf"])})
    assert r.status == 403
    r = srv.https("POST", "/api/v1/auth/logout",
                  headers={"Cookie": jar, "X-CSRF-Token": cookies["cs_csrf"]})
    assert r.status == 204, r


def test_refresh_rotation_grace_and_reuse(srv, pg):
    email, _ = signup(srv)
    first = login(srv, email).json()
    r1 = post(srv, "/api/v1/auth/refresh", {"refresh_token": first["refresh_token"]})
    assert r1.status == 200, r1
    second = r1.json()
    assert second["refresh_token"] != first["refresh_token"]
    # Two tabs: the spent token inside the grace window yields the same successor.
    again = post(srv, "/api/v1/auth/refresh", {"refresh_token": first["refresh_token"]})
    assert again.status == 200, again
    assert again.json()["refresh_token"] == second["refresh_token"]
    time.sleep(2.5)  # past refresh_grace_s = 2
    reused = post(srv, "/api/v1/auth/refresh", {"refresh_token": first["refresh_token"]})
    assert reused.status == 401 and reused.json()["error"]["code"] == "token_reused"
    # The whole family is gone: the successor and its access token are refused.
    r = post(srv, "/api/v1/auth/refresh", {"refresh_token": second["refresh_token"]})
    assert r.status == 401
    wait_until(lambda: srv.get("/api/v1/me", headers=bearer(second["access_token"])).status
               == 401, 2, what="family access token refused")
    assert audit_rows(pg, "event_type = 'auth.refresh.reused'")
    # Tokens are stored hashed only.
    stored = pg.psql("SELECT encode(token_hash, 'hex') FROM refresh_tokens", db=pg.dbname)
    assert first["refresh_token"] not in stored and second["refresh_token"] not in stored


def test_unknown_refresh_token(srv):
    r = post(srv, "/api/v1/auth/refresh", {"refresh_token": "A" * 43})
    assert r.status == 401


def test_logout_revokes_on_every_worker_within_a_second(srv):
    email, _ = signup(srv)
    tok = login(srv, email).json()
    h = bearer(tok["access_token"])
    assert srv.get("/api/v1/me", headers=h).status == 200
    r = srv.https("POST", "/api/v1/auth/logout", headers=h)
    assert r.status == 204, r
    time.sleep(1.0)
    # Fresh connections land on both workers (SO_REUSEPORT); every one must refuse.
    codes = {srv.get("/api/v1/me", headers=h).status for _ in range(20)}
    assert codes == {401}, codes
    r = post(srv, "/api/v1/auth/refresh", {"refresh_token": tok["refresh_token"]})
    assert r.status == 401


def test_rbac_and_audit_scoping(srv, pg):
    owner_email, owner = signup(srv, org="Scoped")
    org_id = owner["org"]["id"]
    owner_tok = login(srv, owner_email).json()["access_token"]
    # A viewer of the same org, added directly (member management has its own tests).
    viewer_email, viewer = signup(srv, org="ViewerHome")
    pg.psql(f"DELETE FROM memberships WHERE user_id = '{viewer['user']['id']}'; "
            f"INSERT INTO memberships (org_id, user_id, role) VALUES "
            f"('{org_id}', '{viewer['user']['id']}', 'viewer')", db=pg.dbname)
    viewer_tok = login(srv, viewer_email).json()["access_token"]
    r = srv.get("/api/v1/audit", headers=bearer(viewer_tok))
    assert r.status == 403 and r.json()["error"]["code"] == "forbidden"
    r = srv.get("/api/v1/org/members", headers=bearer(viewer_tok))
    assert r.status == 200 and len(r.json()["items"]) == 2
    r = srv.get("/api/v1/audit?limit=2", headers=bearer(owner_tok))
    assert r.status == 200, r
    page = r.json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    # The viewer's 403 above is itself audited (access.permission_denied).
    assert all(i["event_type"].startswith(("auth.", "access.")) for i in page["items"])
    r = srv.get(f"/api/v1/audit?cursor={page['next_cursor']}", headers=bearer(owner_tok))
    assert r.status == 200 and r.json()["items"]
    # Only this org's events, never another's.
    assert all(i["id"] for i in r.json()["items"])
    other = audit_rows(pg, f"org_id <> '{org_id}'")
    seen = {i["id"] for i in page["items"]} | {i["id"] for i in r.json()["items"]}
    assert not seen & {o["id"] for o in other}
    r = srv.get("/api/v1/audit?from=not-a-time", headers=bearer(owner_tok))
    assert r.status == 400
    r = srv.get("/api/v1/audit?event_type=auth.signup", headers=bearer(owner_tok))
    assert [i["event_type"] for i in r.json()["items"]] == ["auth.signup"]


def test_audit_chain_verifies_and_detects_tampering(srv, pg):
    email, body = signup(srv, org="Chain")
    org_id = body["org"]["id"]
    tok = login(srv, email).json()["access_token"]
    for _ in range(3):
        login(srv, email, "wrong password, long enough")
    tok = login(srv, email).json()["access_token"]
    r = srv.get("/api/v1/audit/verify", headers=bearer(tok))
    assert r.status == 200, r
    assert r.json()["ok"] is True and r.json()["events_checked"] >= 5
    victim = pg.psql(f"SELECT id FROM audit_events WHERE org_id = '{org_id}' AND seq = 2",
                     db=pg.dbname).strip()
    pg.psql(f"UPDATE audit_events SET actor_ip = '10.9.9.9' WHERE id = '{victim}'",
            db=pg.dbname)
    r = srv.get("/api/v1/audit/verify", headers=bearer(tok))
    assert r.status == 200
    assert r.json()["ok"] is False and r.json()["first_bad_event_id"] == victim


def test_no_secret_reaches_the_audit_trail_or_the_log(srv, pg):
    email, _ = signup(srv)
    tok = login(srv, email).json()
    post(srv, "/api/v1/auth/refresh", {"refresh_token": tok["refresh_token"]})
    dump = pg.psql("SELECT string_agg(row_to_json(a)::text, E'\\n') FROM audit_events a",
                   db=pg.dbname)
    log = srv.log.read_text()
    for secret in (PASSWORD, tok["refresh_token"], tok["access_token"], email):
        assert secret not in dump
        assert secret not in log
