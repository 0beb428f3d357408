"""Sign-in with GitHub and the GitHub webhook receiver, end to end: the real daemon, the
real Postgres and tests/fakes/fake_github.py on loopback over HTTPS. The test plays the
browser: it follows every 302 itself (daemon -> fake GitHub -> daemon) and carries the
cookies by hand."""
import hashlib
import hmac
import http.client
import json
import subprocess
import uuid
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from conftest import ROOT, Server, tls_context, wait_until

FAKE = ROOT / "tests" / "fakes" / "fake_github.py"
CLIENT_ID = "Iv1.cloudsweeptest"
CLIENT_SECRET = "s3cr3t-client-secret"
HOOK_SECRET = "webhook-secret-for-tests"
PASSWORD = "correct horse battery staple"


# ------------------------------------------------------------------ fixtures


class FakeGitHub:
    def __init__(self, cert, key):
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", str(FAKE), "--port", "0", "--cert", cert, "--key", key,
             "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fake_github did not start: " + self.proc.stderr.read())
        self.port = json.loads(line)["port"]
        self.url = f"https://127.0.0.1:{self.port}"

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                           context=tls_context())
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def control(self, what, body=None):
        status, _, raw = self.request("POST", f"/__fake/{what}", body or {})
        assert status == 200, raw
        return json.loads(raw)

    def user(self, login=None, email=None, **kw):
        login = login or f"gh-{uuid.uuid4().hex[:10]}"
        email = email or f"{login}@users.example.com"
        return self.control("users", {"login": login, "email": email, **kw})

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def fake(tls_files):
    f = FakeGitHub(*tls_files)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def srv(workdir, tls_files, pg, fake):
    secrets_dir = workdir / "github-secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    (secrets_dir / "client_secret").write_text(CLIENT_SECRET + "\n")
    (secrets_dir / "webhook_secret").write_text(HOOK_SECRET + "\n")
    for p in secrets_dir.iterdir():
        p.chmod(0o600)
    s = Server(workdir, tls_files, pg, name="github", options={
        "github_client_id": CLIENT_ID,
        "github_client_secret_file": secrets_dir / "client_secret",
        "github_web_url": fake.url,
        "github_api_url": fake.url + "/",
        "github_app_url": "/app",
        "github_webhook_secret_file": secrets_dir / "webhook_secret",
        "github_ca_file": tls_files[0],
    })
    s.write_conf(github_redirect_url=f"https://127.0.0.1:{s.port}/api/v1/auth/github/callback")
    s.start()
    wait_until(lambda: s.get("/ready").status == 200, 15, what="the server ready")
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def fresh_fake(fake):
    fake.control("faults", {})
    fake.control("authorize", {"login": None, "error": None})


# ------------------------------------------------------------------ the browser


def set_cookies(resp):
    """name -> (value, attributes) of every Set-Cookie in resp."""
    out = {}
    for c in resp.header_all("Set-Cookie"):
        first, *attrs = [x.strip() for x in c.split(";")]
        name, _, value = first.partition("=")
        out[name] = (value, attrs)
    return out


def start_login(srv, headers=None, link=False):
    """GET /auth/github/login: (authorize URL, query dict, cs_oauth value)."""
    r = srv.get("/api/v1/auth/github/login" + ("?link=1" if link else ""), headers=headers)
    assert r.status == 302, r
    loc = r.header("Location")
    cookie = set_cookies(r)["cs_oauth"][0]
    return loc, {k: v[0] for k, v in parse_qs(urlsplit(loc).query).items()}, cookie


def visit_github(fake, authorize_url):
    """The browser at GitHub: returns the callback path (+query) GitHub redirects to."""
    u = urlsplit(authorize_url)
    status, headers, _ = fake.request("GET", f"{u.path}?{u.query}")
    assert status == 302, (status, headers)
    cb = urlsplit(headers["Location"])
    return f"{cb.path}?{cb.query}"


def callback(srv, path, cookie):
    # Longer than the daemon's 10 s deadline on GitHub calls (the timeout case waits it out).
    return srv.get(path, headers={"Cookie": f"cs_oauth={cookie}"} if cookie else None,
                   timeout=30)


def github_signin(srv, fake, login, headers=None, link=False):
    """The whole dance for the GitHub user login; returns the daemon's final answer."""
    fake.control("authorize", {"login": login})
    url, _, cookie = start_login(srv, headers=headers, link=link)
    return callback(srv, visit_github(fake, url), cookie)


def access_from(resp):
    return set_cookies(resp)["cs_access"][0]


def bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


def psql(pg, sql):
    return pg.psql(sql, db=pg.dbname).strip()


def audit_reasons(pg, event_type):
    out = psql(pg, f"SELECT details->>'reason' FROM audit_events WHERE event_type = "
                   f"'{event_type}' ORDER BY occurred_at")
    return out.splitlines()


def signup_and_login(srv, email):
    h = {"Content-Type": "application/json"}
    r = srv.https("POST", "/api/v1/auth/signup", headers=h, body=json.dumps(
        {"email": email, "password": PASSWORD, "org_name": "Pw Org"}).encode())
    assert r.status == 201, r
    r = srv.https("POST", "/api/v1/auth/login", headers=h, body=json.dumps(
        {"email": email, "password": PASSWORD}).encode())
    assert r.status == 200, r
    return r.json()["access_token"]


# ------------------------------------------------------------------ sign-in


def test_login_redirects_to_github_with_state_and_pkce(srv, fake, pg):
    r = srv.get("/api/v1/auth/github/login")
    assert r.status == 302, r
    u = urlsplit(r.header("Location"))
    assert f"{u.scheme}://{u.netloc}{u.path}" == fake.url + "/login/oauth/authorize"
    q = {k: v[0] for k, v in parse_qs(u.query).items()}
    assert q["client_id"] == CLIENT_ID
    assert q["redirect_uri"] == f"https://127.0.0.1:{srv.port}/api/v1/auth/github/callback"
    assert q["scope"] == "read:user user:email"
    assert len(q["state"]) >= 43 and q["code_challenge_method"] == "S256"
    assert len(q["code_challenge"]) == 43
    value, attrs = set_cookies(r)["cs_oauth"]
    assert len(value) >= 43
    assert {"HttpOnly", "Secure", "SameSite=Lax", "Path=/api/v1/auth/github"} <= set(attrs)
    # Stored hashed only: neither the state nor the cookie value is in the table.
    rows = psql(pg, "SELECT encode(state_hash, 'hex') || encode(binding_hash, 'hex') "
                    "FROM github_oauth_states")
    assert q["state"] not in rows and value not in rows
    assert hashlib.sha256(q["state"].encode()).hexdigest() in rows


def test_new_github_user_gets_an_account_then_reuses_it(srv, fake, pg):
    gh = fake.user(name="Mona Lisa")
    r = github_signin(srv, fake, gh["login"])
    assert r.status == 302, r
    assert r.header("Location") == "/app"
    cookies = set_cookies(r)
    assert "HttpOnly" in cookies["cs_access"][1] and "cs_csrf" in cookies
    assert cookies["cs_oauth"][0] == ""  # the binding cookie is spent
    me = srv.get("/api/v1/me", headers=bearer(access_from(r)))
    assert me.status == 200, me
    me = me.json()
    assert me["email"] == gh["emails"][0]["email"] and me["role"] == "owner"
    assert me["github_login"] == gh["login"] and me["name"] == "Mona Lisa"
    row = psql(pg, f"SELECT user_id || '|' || login FROM github_identities "
                   f"WHERE github_id = {gh['id']}")
    assert row == f"{me['id']}|{gh['login']}"
    assert psql(pg, f"SELECT password_hash IS NULL FROM users WHERE id = '{me['id']}'") == "t"
    events = psql(pg, f"SELECT event_type || ':' || coalesce(details->>'method', '') "
                      f"FROM audit_events WHERE actor = '{me['id']}' ORDER BY seq").splitlines()
    assert events[:2] == ["auth.signup:github", "auth.login.succeeded:github"]
    # No password: password login is impossible.
    r = srv.https("POST", "/api/v1/auth/login", headers={"Content-Type": "application/json"},
                  body=json.dumps({"email": me["email"], "password": PASSWORD}).encode())
    assert r.status == 401

    # The second sign-in lands in the same account (linked by id, not by email).
    r2 = github_signin(srv, fake, gh["login"])
    assert r2.status == 302 and r2.header("Location") == "/app", r2
    me2 = srv.get("/api/v1/me", headers=bearer(access_from(r2))).json()
    assert me2["id"] == me["id"]
    assert psql(pg, f"SELECT count(*) FROM users WHERE email = '{me['email']}'") == "1"
    assert psql(pg, f"SELECT count(*) FROM sessions WHERE user_id = '{me['id']}' "
                    f"AND method = 'github'") == "2"


def test_existing_email_is_not_taken_over(srv, fake, pg):
    email = f"taken-{uuid.uuid4().hex[:8]}@example.com"
    signup_and_login(srv, email)
    gh = fake.user(email=email.upper())
    r = github_signin(srv, fake, gh["login"])
    assert r.status == 302, r
    assert r.header("Location") == "/app?github_error=account_exists"
    assert "cs_access" not in set_cookies(r)
    assert psql(pg, f"SELECT count(*) FROM github_identities WHERE github_id = {gh['id']}") == "0"
    assert "account_exists" in audit_reasons(pg, "auth.login.failed")


def test_link_from_a_session(srv, fake, pg):
    email = f"linker-{uuid.uuid4().hex[:8]}@example.com"
    tok = signup_and_login(srv, email)
    me = srv.get("/api/v1/me", headers=bearer(tok)).json()
    gh = fake.user()  # a different email on GitHub: linking does not care
    # Linking needs a session.
    assert srv.get("/api/v1/auth/github/login?link=1").status == 401
    r = github_signin(srv, fake, gh["login"], headers=bearer(tok), link=True)
    assert r.status == 302 and r.header("Location") == "/app?github_linked=1", r
    assert "cs_access" not in set_cookies(r)
    assert psql(pg, f"SELECT user_id FROM github_identities WHERE github_id = {gh['id']}") \
        == me["id"]
    assert psql(pg, f"SELECT count(*) FROM audit_events WHERE event_type = 'user.updated' "
                    f"AND actor = '{me['id']}'") == "1"
    # From now on GitHub sign-in opens that account.
    r = github_signin(srv, fake, gh["login"])
    assert r.status == 302 and r.header("Location") == "/app", r
    assert srv.get("/api/v1/me", headers=bearer(access_from(r))).json()["id"] == me["id"]
    # The same GitHub account cannot be linked to a second user.
    tok2 = signup_and_login(srv, f"other-{uuid.uuid4().hex[:8]}@example.com")
    r = github_signin(srv, fake, gh["login"], headers=bearer(tok2), link=True)
    assert r.header("Location") == "/app?github_error=github_account_in_use", r


def _replayed(srv, fake, pg):
    gh = fake.user()
    fake.control("authorize", {"login": gh["login"]})
    url, _, cookie = start_login(srv)
    path = visit_github(fake, url)
    assert callback(srv, path, cookie).status == 302
    return path, cookie


def _forged(srv, fake, pg):
    _, _, cookie = start_login(srv)
    return "/api/v1/auth/github/callback?" + urlencode(
        {"code": "x" * 20, "state": "A" * 43}), cookie


def _expired(srv, fake, pg):
    gh = fake.user()
    fake.control("authorize", {"login": gh["login"]})
    url, q, cookie = start_login(srv)
    path = visit_github(fake, url)
    digest = hashlib.sha256(q["state"].encode()).hexdigest()
    psql(pg, f"UPDATE github_oauth_states SET expires_at = now() - interval '1 second' "
             f"WHERE state_hash = decode('{digest}', 'hex')")
    return path, cookie


def _no_cookie(srv, fake, pg):
    gh = fake.user()
    fake.control("authorize", {"login": gh["login"]})
    url, _, _ = start_login(srv)
    return visit_github(fake, url), None


def _other_browser(srv, fake, pg):
    gh = fake.user()
    fake.control("authorize", {"login": gh["login"]})
    url, _, _ = start_login(srv)
    _, _, other_cookie = start_login(srv)  # a cookie bound to another state
    return visit_github(fake, url), other_cookie


@pytest.mark.parametrize("case", [_replayed, _forged, _expired, _no_cookie, _other_browser],
                         ids=["replayed", "forged", "expired", "missing_cookie",
                              "cookie_of_another_login"])
def test_bad_state_is_refused(srv, fake, pg, case):
    path, cookie = case(srv, fake, pg)
    r = callback(srv, path, cookie)
    assert r.status == 400, r
    assert r.json()["error"]["code"] == "invalid_state"
    assert "cs_access" not in set_cookies(r)


@pytest.mark.parametrize("faults,authorize_error,emails,status,code,reason", [
    ({"token_error": "bad_verification_code"}, None, None, 400, "github_bad_code",
     "github_bad_verification_code"),
    ({"token_error": "incorrect_client_credentials"}, None, None, 502, "github_error",
     "github_client_credentials"),
    ({"token_error": "status:500"}, None, None, 502, "github_error", "github_token_error"),
    ({"user_status": 401}, None, None, 502, "github_error", "github_token_refused"),
    ({"emails_status": 500}, None, None, 502, "github_error", "github_emails_unreadable"),
    ({}, "access_denied", None, 403, "github_denied", "github_access_denied"),
    ({}, None, [{"email": "x@example.com", "primary": True, "verified": False}], 400,
     "github_email_unverified", "github_email_unverified"),
    ({"token_delay_ms": {"value": 11000, "count": 1}}, None, None, 502, "github_unavailable",
     "github_timeout"),
], ids=["bad_code", "client_credentials", "token_500", "user_401", "emails_500",
        "access_denied", "unverified_email", "timeout"])
def test_github_errors_are_clear(srv, fake, pg, faults, authorize_error, emails, status, code,
                                 reason):
    gh = fake.user(emails=emails) if emails else fake.user()
    fake.control("authorize", {"login": gh["login"], "error": authorize_error})
    fake.control("faults", faults)
    url, _, cookie = start_login(srv)
    r = callback(srv, visit_github(fake, url), cookie)
    assert r.status == status, r
    assert r.json()["error"]["code"] == code
    assert "cs_access" not in set_cookies(r)
    wait_until(lambda: reason in audit_reasons(pg, "auth.login.failed"), 5,
               what=f"auth.login.failed with reason {reason}")


def test_pkce_verifier_is_checked_by_the_fake(fake):
    """The fake refuses a code redeemed without the right verifier, like GitHub."""
    gh = fake.user()
    fake.control("authorize", {"login": gh["login"]})
    status, headers, _ = fake.request("GET", "/login/oauth/authorize?" + urlencode({
        "client_id": CLIENT_ID, "redirect_uri": "https://127.0.0.1/cb", "state": "s",
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256"}))
    code = parse_qs(urlsplit(headers["Location"]).query)["code"][0]
    form = urlencode({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "code": code,
                      "code_verifier": "wrong" * 10})
    conn = http.client.HTTPSConnection("127.0.0.1", fake.port, timeout=10, context=tls_context())
    conn.request("POST", "/login/oauth/access_token", body=form, headers={
        "Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"})
    doc = json.loads(conn.getresponse().read())
    conn.close()
    assert doc["error"] == "bad_verification_code"


def test_sign_in_off_without_client_id(server_factory):
    s = server_factory()
    wait_until(lambda: s.get("/ready").status == 200, 15, what="the server ready")
    for path in ("/api/v1/auth/github/login", "/api/v1/auth/github/callback?code=a&state=b"):
        r = s.get(path)
        assert r.status == 404 and r.json()["error"]["code"] == "not_found", r


# ------------------------------------------------------------------ webhooks


def hook(srv, event, payload, delivery=None, secret=HOOK_SECRET, signature=None):
    body = json.dumps(payload).encode()
    sig = signature or "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return srv.https("POST", "/api/v1/webhooks/github", body=body, headers={
        "Content-Type": "application/json", "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()), "X-Hub-Signature-256": sig})


def test_webhook_signature_and_replay(srv, pg):
    delivery = str(uuid.uuid4())
    r = hook(srv, "ping", {"zen": "Keep it logically awesome."}, delivery=delivery)
    assert r.status == 202 and r.json()["status"] == "accepted", r
    r = hook(srv, "ping", {"zen": "Keep it logically awesome."}, delivery=delivery)
    assert r.status == 202 and r.json()["status"] == "duplicate", r
    assert psql(pg, f"SELECT count(*) FROM github_deliveries WHERE delivery_id = '{delivery}'") \
        == "1"
    bad = str(uuid.uuid4())
    for kw in ({"secret": "not-the-secret"}, {"signature": "sha256=" + "0" * 64},
               {"signature": "sha1=abc"}):
        r = hook(srv, "ping", {"zen": "x"}, delivery=bad, **kw)
        assert r.status == 401 and r.json()["error"]["code"] == "bad_signature", r
    # A signature over other bytes than those sent fails too (raw body, not re-serialized).
    body = b'{"zen": "x"}'
    sig = "sha256=" + hmac.new(HOOK_SECRET.encode(), b'{"zen":"x"}', hashlib.sha256).hexdigest()
    r = srv.https("POST", "/api/v1/webhooks/github", body=body, headers={
        "Content-Type": "application/json", "X-GitHub-Event": "ping",
        "X-GitHub-Delivery": bad, "X-Hub-Signature-256": sig})
    assert r.status == 401
    assert psql(pg, f"SELECT count(*) FROM github_deliveries WHERE delivery_id = '{bad}'") == "0"
    wait_until(lambda: psql(pg, "SELECT count(*) FROM audit_events WHERE event_type = "
                                f"'webhook.github.rejected' AND details->>'delivery_id' = '{bad}'")
               == "4", 5, what="webhook.github.rejected audit rows")


def test_revoked_authorization_revokes_the_users_tokens(srv, fake, pg):
    gh = fake.user()
    tokens = [access_from(github_signin(srv, fake, gh["login"])) for _ in range(2)]
    for t in tokens:
        assert srv.get("/api/v1/me", headers=bearer(t)).status == 200
    r = hook(srv, "github_app_authorization",
             {"action": "revoked", "sender": {"login": gh["login"], "id": gh["id"]}})
    assert r.status == 202 and r.json()["status"] == "accepted", r
    for t in tokens:
        wait_until(lambda: srv.get("/api/v1/me", headers=bearer(t)).status == 401, 5,
                   what="the revoked token refused")
    row = psql(pg, "SELECT details->>'reason' || ':' || (details->>'families') FROM audit_events "
                   "WHERE event_type = 'auth.sessions.revoked' ORDER BY seq DESC LIMIT 1")
    assert row == "github_app_revoked:2"
    # The user can sign in again afterwards (a fresh session).
    r = github_signin(srv, fake, gh["login"])
    assert srv.get("/api/v1/me", headers=bearer(access_from(r))).status == 200


def test_no_secret_in_logs_or_audit(srv, fake, pg):
    """Runs last: nothing the sign-ins handled (client secret, webhook secret, GitHub access
    tokens, codes, states) reached the daemon's log or the audit trail."""
    github_signin(srv, fake, fake.user()["login"])
    text = srv.log.read_text(errors="replace") + srv.stderr.read_text(errors="replace")
    audit = psql(pg, "SELECT string_agg(details::text, ' ') FROM audit_events")
    for blob in (text, audit):
        assert CLIENT_SECRET not in blob and HOOK_SECRET not in blob
        assert "gho_" not in blob
    assert "code_verifier" not in text
