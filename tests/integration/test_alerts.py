"""Security alerts, access events, per-organization rate tiers, admin endpoints and retention,
end to end against the real daemon and Postgres. Each default alert rule is driven by the
real action that causes it (failed logins, refresh-token reuse, a login from a new loopback
address, exports, permission denials); the alert's log line and its signed webhook POST (to a
loopback receiver run by the test) are checked. Retention runs with a zero-day horizon and
the audit chain must still verify afterwards."""
import hashlib
import hmac
import http.client
import http.server
import json
import threading
import time
import uuid

import pytest

from conftest import Server, tls_context, wait_until

PASSWORD = "correct horse battery staple"
WEBHOOK_SECRET = "alert-webhook-secret-0123456789"


class Receiver:
    """A loopback HTTP server that records webhook POSTs; the first one is answered 500."""

    def __init__(self):
        self.posts = []
        self.lock = threading.Lock()
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with rec.lock:
                    rec.posts.append((dict(self.headers), body))
                    first = len(rec.posts) == 1
                self.send_response(500 if first else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self):
        with self.lock:
            return list(self.posts)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def request(server, method, path, body=None, headers=None, source="127.0.0.1"):
    """One request on a fresh connection from the given loopback source address."""
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10,
                                       context=tls_context(), source_address=(source, 0))
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                     headers=h)
        r = conn.getresponse()
        data = r.read()
        return r.status, dict(r.getheaders()), (json.loads(data) if data else None)
    finally:
        conn.close()


def signup(server, org="Acme"):
    email = f"a{uuid.uuid4().hex[:12]}@example.com"
    st, _, body = request(server, "POST", "/api/v1/auth/signup",
                          {"email": email, "password": PASSWORD, "org_name": org})
    assert st == 201, body
    return email, body


def login(server, email, password=PASSWORD, source="127.0.0.1"):
    return request(server, "POST", "/api/v1/auth/login",
                   {"email": email, "password": password}, source=source)


def ready(server):
    wait_until(lambda: server.get("/ready").status == 200, 15, what="ready")
    return server


def bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


def q(pg, sql):
    return [line for line in pg.psql(sql, db=pg.dbname).splitlines() if line.strip()]


def alerts(pg, rule, subject=None):
    where = f"rule = '{rule}'" + (f" AND subject = '{subject}'" if subject else "")
    return [json.loads(x) for x in q(pg, f"SELECT row_to_json(a) FROM security_alerts a "
                                         f"WHERE {where}")]


def logged(server, rule, subject):
    return any(isinstance(line, dict) and line.get("event") == "security_alert"
               and line.get("rule") == rule and line.get("subject") == subject
               for line in server.log_lines())


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def srv(workdir, tls_files, pg, receiver):
    secret = workdir / "alert_webhook_secret"
    secret.write_text(WEBHOOK_SECRET + "\n")
    secret.chmod(0o600)
    s = Server(workdir, tls_files, pg, name="alerts",
               options={"workers": 2, "alert_interval_s": 1, "refresh_grace_s": 0,
                        "alert_webhook_url": f"http://127.0.0.1:{receiver.port}/hook",
                        "alert_webhook_secret_file": secret})
    s.start()
    wait_until(lambda: all(s.get("/ready").status == 200 for _ in range(8)), 15,
               what="every worker ready")
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_failed_logins_raise_per_ip_and_per_account_alerts(srv, pg):
    email, _ = signup(srv)
    for _ in range(10):
        st, _, _ = login(srv, email, password="wrong password!", source="127.0.0.5")
        assert st == 401
    wait_until(lambda: alerts(pg, "failed_logins_per_ip", "127.0.0.5"), 20,
               what="per-IP alert")
    a = alerts(pg, "failed_logins_per_ip", "127.0.0.5")
    assert len(a) == 1 and a[0]["severity"] == "high" and a[0]["count"] >= 10
    hmacs = q(pg, "SELECT DISTINCT details->>'email' FROM audit_events WHERE event_type = "
                  "'auth.login.failed' AND actor_ip = '127.0.0.5'")
    assert len(hmacs) == 1 and hmacs[0].startswith("hmac-sha256:")
    wait_until(lambda: alerts(pg, "failed_logins_per_account", hmacs[0]), 20,
               what="per-account alert")
    wait_until(lambda: logged(srv, "failed_logins_per_ip", "127.0.0.5"), 10,
               what="security_alert log line")
    # The alert names the HMAC, never the address in clear.
    assert email not in json.dumps(alerts(pg, "failed_logins_per_account"))


def test_refresh_reuse_raises_a_critical_alert(srv, pg):
    email, body = signup(srv)
    st, _, tok = login(srv, email)
    assert st == 200
    st, _, _ = request(srv, "POST", "/api/v1/auth/refresh",
                       {"refresh_token": tok["refresh_token"]})
    assert st == 200
    st, _, _ = request(srv, "POST", "/api/v1/auth/refresh",
                       {"refresh_token": tok["refresh_token"]})
    assert st == 401
    uid = body["user"]["id"]
    wait_until(lambda: alerts(pg, "refresh_token_reuse", uid), 20, what="reuse alert")
    assert alerts(pg, "refresh_token_reuse", uid)[0]["severity"] == "critical"


def test_login_from_a_new_address(srv, pg):
    email, body = signup(srv)
    uid = body["user"]["id"]
    assert login(srv, email)[0] == 200
    assert login(srv, email)[0] == 200
    time.sleep(1.5)  # let an evaluation pass: known addresses raise nothing
    assert not alerts(pg, "login_from_new_ip", uid)
    assert login(srv, email, source="127.0.0.2")[0] == 200
    wait_until(lambda: alerts(pg, "login_from_new_ip", uid), 20, what="new-IP alert")
    a = alerts(pg, "login_from_new_ip", uid)[0]
    assert a["severity"] == "low" and a["details"]["ip"] == "127.0.0.2"
    assert a["org_id"] == body["org"]["id"]


def test_mass_export(srv, pg):
    email, body = signup(srv)
    tok = login(srv, email)[2]["access_token"]
    for _ in range(3):
        st, _, _ = request(srv, "GET", "/api/v1/me/export", headers=bearer(tok))
        assert st == 200
    wait_until(lambda: alerts(pg, "mass_export", body["user"]["id"]), 20,
               what="mass export alert")


def make_viewer(srv, pg, org_id):
    email, v = signup(srv, org="ViewerHome")
    q(pg, f"DELETE FROM memberships WHERE user_id = '{v['user']['id']}'; "
          f"INSERT INTO memberships (org_id, user_id, role) VALUES "
          f"('{org_id}', '{v['user']['id']}', 'viewer')")
    return v["user"]["id"], login(srv, email)[2]["access_token"]


def test_permission_denied_events_and_burst(srv, pg):
    _, owner = signup(srv)
    vid, vtok = make_viewer(srv, pg, owner["org"]["id"])
    for i in range(20):
        st, _, body = request(srv, "GET", "/api/v1/audit", headers=bearer(vtok))
        assert st == 403 and body["error"]["code"] == "forbidden"
        # The refusal is answered once its event is committed (back-pressure on floods).
        assert len(q(pg, f"SELECT 1 FROM audit_events WHERE event_type = "
                         f"'access.permission_denied' AND actor = '{vid}'")) == i + 1
    row = json.loads(q(pg, f"SELECT row_to_json(a) FROM audit_events a WHERE event_type = "
                           f"'access.permission_denied' AND actor = '{vid}' LIMIT 1")[0])
    assert row["org_id"] == owner["org"]["id"] and row["result"] == "denied"
    assert row["details"] == {"permission": "audit:read", "method": "GET",
                              "path": "/api/v1/audit", "role": "viewer"}
    wait_until(lambda: alerts(pg, "permission_denied_burst", vid), 20, what="burst alert")


def test_csrf_failure_is_audited(srv, pg):
    email, body = signup(srv)
    st, headers, _ = login(srv, email)
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=10, context=tls_context())
    conn.request("POST", "/api/v1/auth/login", body=json.dumps(
        {"email": email, "password": PASSWORD}), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    cookies = {c.split("=", 1)[0]: c.split("=", 1)[1].split(";")[0]
               for k, c in r.getheaders() if k.lower() == "set-cookie"}
    conn.close()
    st, _, err = request(srv, "POST", "/api/v1/auth/logout",
                         headers={"Cookie": f"cs_access={cookies['cs_access']}; "
                                            f"cs_csrf={cookies['cs_csrf']}"})
    assert st == 403 and err["error"]["code"] == "csrf_failed"
    uid = body["user"]["id"]
    wait_until(lambda: q(pg, f"SELECT details::text FROM audit_events WHERE event_type = "
                             f"'access.csrf_failed' AND actor = '{uid}'"), 10,
               what="csrf_failed event")
    d = json.loads(q(pg, f"SELECT details::text FROM audit_events WHERE event_type = "
                         f"'access.csrf_failed' AND actor = '{uid}'")[0])
    assert d == {"method": "POST", "path": "/api/v1/auth/logout"}


def test_webhook_posts_are_signed_and_retried(srv, pg, receiver):
    # One alert of its own (a refresh reuse), so the test stands alone: its first POST is
    # answered 500, the retry 200.
    email, _ = signup(srv)
    tok = login(srv, email)[2]
    for _ in range(2):
        request(srv, "POST", "/api/v1/auth/refresh", {"refresh_token": tok["refresh_token"]})
    wait_until(lambda: len(receiver.bodies()) >= 2, 30, what="webhook POSTs")
    for headers, body in receiver.bodies():
        h = {k.lower(): v for k, v in headers.items()}
        ts = h["x-cloudsweep-timestamp"]
        want = hmac.new(WEBHOOK_SECRET.encode(), ts.encode() + b"." + body,
                        hashlib.sha256).hexdigest()
        assert h["x-cloudsweep-signature"] == "sha256=" + want
        assert abs(int(ts) - time.time()) < 300
        doc = json.loads(body)
        assert {"id", "rule", "severity", "subject", "count", "org_id"} <= set(doc)
    # The first POST was answered 500: its alert is retried and then marked delivered.
    first = json.loads(receiver.bodies()[0][1])["id"]
    wait_until(lambda: q(pg, f"SELECT 1 FROM security_alerts WHERE id = '{first}' AND "
                             f"delivered_at IS NOT NULL"), 30, what="retried delivery")
    assert int(q(pg, f"SELECT attempts FROM security_alerts WHERE id = '{first}'")[0]) >= 2


def test_admin_blocks_and_alerts(srv, pg):
    email, owner = signup(srv)
    otok = login(srv, email)[2]["access_token"]
    _, vtok = make_viewer(srv, pg, owner["org"]["id"])
    q(pg, "INSERT INTO ip_blocks (ip, expires_at, reason, failures) VALUES "
          "('198.51.100.7', now() + interval '1 hour', 'too_many_failed_logins', 5)")

    st, _, body = request(srv, "GET", "/api/v1/admin/ip-blocks", headers=bearer(otok))
    assert st == 200 and any(b["ip"] == "198.51.100.7" for b in body["items"])
    for method, path in (("GET", "/api/v1/admin/ip-blocks"),
                         ("DELETE", "/api/v1/admin/ip-blocks/198.51.100.7"),
                         ("GET", "/api/v1/admin/alerts")):
        st, _, err = request(srv, method, path, headers=bearer(vtok))
        assert st == 403 and err["error"]["code"] == "forbidden", (method, path)
    st, _, err = request(srv, "DELETE", "/api/v1/admin/ip-blocks/not-an-ip",
                         headers=bearer(otok))
    assert st == 400 and err["error"]["code"] == "invalid_request"
    st, _, body = request(srv, "DELETE", "/api/v1/admin/ip-blocks/198.51.100.7",
                          headers=bearer(otok))
    assert st == 200 and body == {"ip": "198.51.100.7", "lifted": 1}
    st, _, _ = request(srv, "DELETE", "/api/v1/admin/ip-blocks/198.51.100.7",
                       headers=bearer(otok))
    assert st == 404
    st, _, body = request(srv, "GET", "/api/v1/admin/ip-blocks", headers=bearer(otok))
    assert not any(b["ip"] == "198.51.100.7" for b in body["items"])
    ev = q(pg, f"SELECT resource_id || ' ' || actor FROM audit_events WHERE event_type = "
               f"'access.ip_unblocked' AND org_id = '{owner['org']['id']}'")
    assert ev == [f"198.51.100.7 {owner['user']['id']}"]

    # Alerts: the org's own and cross-organization ones (nil org); paging by cursor.
    for org, subj in ((owner["org"]["id"], "own"),
                      ("00000000-0000-0000-0000-000000000000", "198.51.100.8")):
        q(pg, f"INSERT INTO security_alerts (org_id, rule, severity, subject, window_start, "
              f"first_seen, last_seen) VALUES ('{org}', 'listing', 'low', '{subj}', now(), "
              f"now(), now())")
    st, _, page = request(srv, "GET", "/api/v1/admin/alerts?limit=1", headers=bearer(otok))
    assert st == 200 and len(page["items"]) == 1 and page["next_cursor"]
    seen = [page["items"][0]["id"]]
    st, _, page2 = request(srv, "GET", f"/api/v1/admin/alerts?limit=1&cursor="
                                       f"{page['next_cursor']}", headers=bearer(otok))
    assert st == 200 and page2["items"] and page2["items"][0]["id"] not in seen
    st, _, err = request(srv, "GET", "/api/v1/admin/alerts?cursor=bogus", headers=bearer(otok))
    assert st == 400 and err["error"]["code"] == "invalid_request"
    # Another organization's alert stays invisible.
    _, other = signup(srv)
    hidden = q(pg, f"INSERT INTO security_alerts (org_id, rule, severity, subject, window_start,"
                   f" first_seen, last_seen) VALUES ('{other['org']['id']}', 'x', 'low', 's', "
                   f"now(), now(), now()) RETURNING id")[0]
    st, _, page = request(srv, "GET", "/api/v1/admin/alerts?limit=500", headers=bearer(otok))
    assert st == 200 and hidden not in [a["id"] for a in page["items"]]
    assert all(a["org_id"] in (owner["org"]["id"], "00000000-0000-0000-0000-000000000000")
               for a in page["items"])


def test_rate_limited_event_and_org_tier(server_factory, pg):
    s = ready(server_factory(options={"ratelimit_user_per_min": 5, "org_limits_refresh_s": 1}))
    ea, a = signup(s, org="BigTier")
    eb, b = signup(s, org="SmallTier")
    q(pg, f"UPDATE orgs SET rate_limit_per_min = 1000 WHERE id = '{a['org']['id']}'")
    ta = login(s, ea)[2]["access_token"]
    tb = login(s, eb)[2]["access_token"]
    # Any authenticated request makes the worker read the tiers; give it a moment.
    request(s, "GET", "/api/v1/me", headers=bearer(tb))
    time.sleep(1.5)
    request(s, "GET", "/api/v1/me", headers=bearer(tb))
    time.sleep(0.5)
    codes_a = [request(s, "GET", "/api/v1/me", headers=bearer(ta))[0] for _ in range(25)]
    assert codes_a == [200] * 25
    codes_b = []
    for _ in range(10):
        st, h, body = request(s, "GET", "/api/v1/me", headers=bearer(tb))
        codes_b.append(st)
        if st == 429:
            assert body["error"]["code"] == "rate_limited" and int(h["Retry-After"]) >= 1
    assert 429 in codes_b
    uid = b["user"]["id"]
    wait_until(lambda: q(pg, f"SELECT details::text FROM audit_events WHERE event_type = "
                             f"'access.rate_limited' AND actor = '{uid}'"), 10,
               what="rate_limited event")
    d = json.loads(q(pg, f"SELECT details::text FROM audit_events WHERE event_type = "
                         f"'access.rate_limited' AND actor = '{uid}' LIMIT 1")[0])
    assert d["bucket"] == "user" and d["path"] == "/api/v1/me" and d["retry_after"] >= 1


def test_retention_prunes_and_verify_stays_ok(server_factory, pg):
    s = ready(server_factory(options={"audit_retention_days": 0, "alert_retention_days": 0,
                                      "retention_interval_s": 1, "alert_interval_s": 60}))
    email, body = signup(s)
    org = body["org"]["id"]
    for _ in range(3):
        assert login(s, email)[0] == 200
    cut = q(pg, "SELECT clock_timestamp()")[0]
    wait_until(lambda: q(pg, f"SELECT 1 FROM audit_checkpoints WHERE org_id = '{org}' AND "
                             f"kind = 'retention'"), 20, what="retention anchor")
    wait_until(lambda: not q(pg, f"SELECT 1 FROM audit_events WHERE org_id = '{org}' AND "
                                 f"occurred_at < '{cut}'"), 20, what="old events pruned")
    wait_until(lambda: not q(pg, f"SELECT 1 FROM security_alerts WHERE created_at < '{cut}'"),
               20, what="old alerts deleted")
    tok = login(s, email)[2]["access_token"]
    st, _, v = request(s, "GET", "/api/v1/audit/verify", headers=bearer(tok))
    assert st == 200 and v["ok"] is True, v
