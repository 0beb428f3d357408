"""Organization members, the caller's sessions and password change, end to end: adding an
existing user or inviting an unknown address, role changes and removals with their limits for
every role (viewer and member refused, admin below owner, the last owner kept), other
organizations' users answered 404, removed or demoted members' sessions ended, sessions
ended by their user within a second, and a password change that ends every other session."""
import json
import uuid

import pytest

from conftest import Server, wait_until

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a brand new passphrase 42"


def post(srv, path, body, headers=None, method="POST"):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return srv.https(method, path, headers=h, body=json.dumps(body).encode())


def bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


def signup(srv, org="Acme"):
    email = f"m{uuid.uuid4().hex[:12]}@example.com"
    r = post(srv, "/api/v1/auth/signup", {"email": email, "password": PASSWORD, "org_name": org})
    assert r.status == 201, r
    return email, r.json()


def login(srv, email, password=PASSWORD):
    r = post(srv, "/api/v1/auth/login", {"email": email, "password": password})
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
    s = Server(workdir, tls_files, pg, name="members", options={"workers": 2})
    s.start()
    wait_until(lambda: all(s.get("/ready").status == 200 for _ in range(12)), 15,
               what="every worker ready")
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class Org:
    """An organization with its owner logged in; join() adds people through the API."""

    def __init__(self, srv, pg, name="Org"):
        self.srv, self.pg = srv, pg
        self.owner_email, body = signup(srv, org=name)
        self.id = body["org"]["id"]
        self.owner_id = body["user"]["id"]
        self.owner_tok = login(srv, self.owner_email)["access_token"]

    def join(self, role):
        """A new user who belongs to this organization only, with role: (id, email, token)."""
        email, body = signup(self.srv, org="Home")
        uid = body["user"]["id"]
        r = post(self.srv, "/api/v1/org/members", {"email": email, "role": role},
                 bearer(self.owner_tok))
        assert r.status == 201 and r.json()["status"] == "added", r
        # Leave the sign-up organization so that login lands in this one.
        sql(self.pg, f"DELETE FROM memberships WHERE user_id = '{uid}' AND org_id <> '{self.id}'")
        return uid, email, login(self.srv, email)["access_token"]


def role_of(pg, org, uid):
    return sql(pg, f"SELECT role FROM memberships WHERE org_id = '{org}' AND user_id = '{uid}'")


def test_add_existing_user_and_invite_unknown_address(srv, pg):
    org = Org(srv, pg, "Adders")
    email, body = signup(srv, org="Elsewhere")
    uid = body["user"]["id"]
    r = post(srv, "/api/v1/org/members", {"email": email.upper(), "role": "member"},
             bearer(org.owner_tok))
    assert r.status == 201, r
    assert r.json()["status"] == "added" and r.json()["user_id"] == uid
    assert r.json()["role"] == "member" and "invite_token" not in r.json()
    listed = srv.get("/api/v1/org/members", headers=bearer(org.owner_tok)).json()["items"]
    assert {i["user_id"]: i["role"] for i in listed}[uid] == "member"
    again = post(srv, "/api/v1/org/members", {"email": email, "role": "admin"},
                 bearer(org.owner_tok))
    assert again.status == 409 and again.json()["error"]["code"] == "conflict"

    stranger = f"new-{uuid.uuid4().hex[:8]}@example.com"
    r = post(srv, "/api/v1/org/members", {"email": stranger, "role": "viewer"},
             bearer(org.owner_tok))
    assert r.status == 201, r
    inv = r.json()
    assert inv["status"] == "invited" and inv["email"] == stranger and inv["role"] == "viewer"
    assert len(inv["invite_token"]) >= 43 and inv["expires_at"].endswith("Z")
    row = sql(pg, f"SELECT token_hash, role, expires_at > now() + interval '6 days' "
                  f"FROM org_invitations WHERE id = '{inv['invitation_id']}'")
    assert inv["invite_token"] not in row and row.endswith("|viewer|t")
    # Inviting again replaces the open invitation (one per address and organization).
    r2 = post(srv, "/api/v1/org/members", {"email": stranger, "role": "member"},
              bearer(org.owner_tok))
    assert r2.status == 201 and r2.json()["invite_token"] != inv["invite_token"]
    assert sql(pg, f"SELECT count(*) FROM org_invitations WHERE org_id = '{org.id}'") == "1"

    added = audit_rows(pg, f"org_id = '{org.id}' AND event_type = 'org.member.added'")
    invited = audit_rows(pg, f"org_id = '{org.id}' AND event_type = 'org.member.invited'")
    assert [a["resource_id"] for a in added] == [uid]
    assert len(invited) == 2
    dump = json.dumps(added + invited)
    assert email not in dump and stranger not in dump and inv["invite_token"] not in dump
    assert all(a["details"]["email"].startswith("hmac-sha256:") for a in added + invited)
    assert inv["invite_token"] not in srv.log.read_text()


def test_signup_with_an_invitation_joins_the_inviting_org(srv, pg):
    org = Org(srv, pg, "Inviters")
    stranger = f"inv-{uuid.uuid4().hex[:8]}@example.com"
    r = post(srv, "/api/v1/org/members", {"email": stranger, "role": "member"},
             bearer(org.owner_tok))
    assert r.status == 201, r
    token = r.json()["invite_token"]
    wrong = post(srv, "/api/v1/auth/signup", {"email": f"x{stranger}", "password": PASSWORD,
                                               "invite_token": token})
    assert wrong.status == 400 and wrong.json()["error"]["code"] == "invalid_invite", wrong
    r = post(srv, "/api/v1/auth/signup", {"email": stranger, "password": PASSWORD,
                                           "invite_token": token})
    assert r.status == 201, r
    assert r.json()["org"]["id"] == org.id and r.json()["role"] == "member"
    tok = login(srv, stranger)["access_token"]
    me = srv.get("/api/v1/me", headers=bearer(tok)).json()
    assert me["org"]["id"] == org.id and me["role"] == "member"
    # Spent: the same token does not make a second account.
    again = post(srv, "/api/v1/auth/signup", {"email": f"y{stranger}", "password": PASSWORD,
                                               "invite_token": token})
    assert again.status == 400 and again.json()["error"]["code"] == "invalid_invite"
    assert sql(pg, f"SELECT accepted_at IS NOT NULL FROM org_invitations "
                   f"WHERE token_hash = encode(sha256('{token}'::bytea), 'hex')") == "t"


def test_invitations_are_listed_and_withdrawn(srv, pg):
    org = Org(srv, pg, "Withdrawers")
    stranger = f"wd-{uuid.uuid4().hex[:8]}@example.com"
    r = post(srv, "/api/v1/org/members", {"email": stranger, "role": "admin"},
             bearer(org.owner_tok))
    assert r.status == 201, r
    inv = r.json()
    r = srv.get("/api/v1/org/invitations", headers=bearer(org.owner_tok))
    assert r.status == 200, r
    items = r.json()["items"]
    assert [(i["id"], i["email"], i["role"], i["expired"]) for i in items] == \
        [(inv["invitation_id"], stranger, "admin", False)]
    assert inv["invite_token"] not in r.body.decode()
    # Another organization sees none of it and cannot withdraw it.
    other = Org(srv, pg, "Outsiders")
    assert srv.get("/api/v1/org/invitations", headers=bearer(other.owner_tok)).json()["items"] == []
    r = post(srv, f"/api/v1/org/invitations/{inv['invitation_id']}", None,
             bearer(other.owner_tok), method="DELETE")
    assert r.status == 404, r
    r = post(srv, f"/api/v1/org/invitations/{inv['invitation_id']}", None,
             bearer(org.owner_tok), method="DELETE")
    assert r.status == 204, r
    assert srv.get("/api/v1/org/invitations", headers=bearer(org.owner_tok)).json()["items"] == []
    r = post(srv, f"/api/v1/org/invitations/{inv['invitation_id']}", None,
             bearer(org.owner_tok), method="DELETE")
    assert r.status == 404, r
    # The withdrawn token no longer joins the organization.
    r = post(srv, "/api/v1/auth/signup", {"email": stranger, "password": PASSWORD,
                                           "invite_token": inv["invite_token"]})
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_invite", r
    rows = audit_rows(pg, f"org_id = '{org.id}' AND "
                          f"event_type = 'org.member.invitation_revoked'")
    assert [(a["resource_id"], a["details"]["role"]) for a in rows] == \
        [(inv["invitation_id"], "admin")]
    assert rows[0]["details"]["email"].startswith("hmac-sha256:")
    assert stranger not in json.dumps(rows)


@pytest.mark.parametrize("body,field", [
    ({"email": "x@example.com"}, "role"),
    ({"email": "x@example.com", "role": "superuser"}, "role"),
    ({"email": "x@example.com", "role": 3}, "role"),
    ({"role": "member"}, "email"),
    ({"email": "not an address", "role": "member"}, "email"),
])
def test_add_validation(srv, pg, body, field):
    org = Org(srv, pg, "Validation")
    r = post(srv, "/api/v1/org/members", body, bearer(org.owner_tok))
    assert r.status == 400, r
    assert r.json()["error"]["code"] == "invalid_request" and field in r.json()["error"]["message"]


@pytest.mark.parametrize("role", ["viewer", "member"])
def test_viewers_and_members_cannot_manage_members(srv, pg, role):
    org = Org(srv, pg, "Readers")
    _, _, tok = org.join(role)
    peer, _, _ = org.join("viewer")
    h = bearer(tok)
    r = post(srv, "/api/v1/org/members", {"email": "z@example.com", "role": "viewer"}, h)
    assert r.status == 403 and r.json()["error"]["code"] == "forbidden"
    r = post(srv, f"/api/v1/org/members/{peer}", {"role": "admin"}, h, method="PATCH")
    assert r.status == 403
    r = srv.https("DELETE", f"/api/v1/org/members/{peer}", headers=h)
    assert r.status == 403
    assert role_of(pg, org.id, peer) == "viewer"


# (what the admin tries, target's role, new role or None for removal, expected status)
ADMIN_CASES = [
    ("promote viewer to admin", "viewer", "admin", 200),
    ("demote admin to member", "admin", "member", 200),
    ("grant owner", "viewer", "owner", 403),
    ("demote the owner", "owner", "admin", 403),
    ("remove the owner", "owner", None, 403),
    ("remove a member", "member", None, 204),
]


@pytest.mark.parametrize("what,target_role,new_role,status", ADMIN_CASES,
                         ids=[c[0] for c in ADMIN_CASES])
def test_admin_limits(srv, pg, what, target_role, new_role, status):
    org = Org(srv, pg, "Admins")
    _, _, admin_tok = org.join("admin")
    if target_role == "owner":
        target = org.owner_id
    else:
        target, _, _ = org.join(target_role)
    h = bearer(admin_tok)
    if new_role is None:
        r = srv.https("DELETE", f"/api/v1/org/members/{target}", headers=h)
    else:
        r = post(srv, f"/api/v1/org/members/{target}", {"role": new_role}, h, method="PATCH")
    assert r.status == status, r
    expected = (new_role or "") if status < 300 else target_role
    assert role_of(pg, org.id, target) == expected
    if status == 200:
        assert r.json() == {"user_id": target, "role": new_role}


def test_admin_cannot_add_an_owner_but_an_owner_can(srv, pg):
    org = Org(srv, pg, "Owners")
    _, _, admin_tok = org.join("admin")
    email, _ = signup(srv, org="Home")
    r = post(srv, "/api/v1/org/members", {"email": email, "role": "owner"}, bearer(admin_tok))
    assert r.status == 403, r
    r = post(srv, "/api/v1/org/members", {"email": email, "role": "owner"},
             bearer(org.owner_tok))
    assert r.status == 201 and r.json()["role"] == "owner", r


def test_the_last_owner_stays(srv, pg):
    org = Org(srv, pg, "LastOwner")
    h = bearer(org.owner_tok)
    r = post(srv, f"/api/v1/org/members/{org.owner_id}", {"role": "admin"}, h, method="PATCH")
    assert r.status == 409 and r.json()["error"]["code"] == "conflict", r
    r = srv.https("DELETE", f"/api/v1/org/members/{org.owner_id}", headers=h)
    assert r.status == 409
    # With a second owner, an owner may step down (and then loses owner powers at once).
    second, _, second_tok = org.join("owner")
    r = post(srv, f"/api/v1/org/members/{org.owner_id}", {"role": "admin"}, h, method="PATCH")
    assert r.status == 200, r
    r = post(srv, f"/api/v1/org/members/{second}", {"role": "admin"}, bearer(second_tok),
             method="PATCH")
    assert r.status == 409  # second is now the last owner
    changed = audit_rows(pg, f"org_id = '{org.id}' AND event_type = 'org.member.role_changed'")
    assert changed[-1]["details"]["old_role"] == "owner"
    assert changed[-1]["details"]["new_role"] == "admin"


def test_users_of_another_org_are_not_found(srv, pg):
    org = Org(srv, pg, "Mine")
    other = Org(srv, pg, "Theirs")
    victim, _, _ = other.join("member")
    h = bearer(org.owner_tok)
    for r in (post(srv, f"/api/v1/org/members/{victim}", {"role": "viewer"}, h, method="PATCH"),
              srv.https("DELETE", f"/api/v1/org/members/{victim}", headers=h),
              srv.https("DELETE", f"/api/v1/org/members/{other.owner_id}", headers=h),
              srv.https("DELETE", "/api/v1/org/members/not-a-uuid", headers=h),
              srv.https("DELETE", f"/api/v1/org/members/{uuid.uuid4()}", headers=h)):
        assert r.status == 404 and r.json()["error"]["code"] == "not_found", r
    assert role_of(pg, other.id, victim) == "member"


@pytest.mark.parametrize("action", ["remove", "demote"])
def test_removed_or_demoted_member_loses_access_at_once(srv, pg, action):
    org = Org(srv, pg, "Revoke")
    uid, email, tok = org.join("admin")
    assert srv.get("/api/v1/audit", headers=bearer(tok)).status == 200
    h = bearer(org.owner_tok)
    if action == "remove":
        r = srv.https("DELETE", f"/api/v1/org/members/{uid}", headers=h)
        assert r.status == 204, r
    else:
        r = post(srv, f"/api/v1/org/members/{uid}", {"role": "viewer"}, h, method="PATCH")
        assert r.status == 200, r
    wait_until(lambda: all(srv.get("/api/v1/me", headers=bearer(tok)).status == 401
                           for _ in range(6)), 2, what="the old token refused on every worker")
    if action == "demote":
        # A fresh login carries the new role.
        fresh = login(srv, email)["access_token"]
        assert srv.get("/api/v1/audit", headers=bearer(fresh)).status == 403
    else:
        assert role_of(pg, org.id, uid) == ""
        ev = audit_rows(pg, f"org_id = '{org.id}' AND event_type = 'org.member.removed'")
        assert ev[-1]["resource_id"] == uid and ev[-1]["details"]["role"] == "admin"
        assert ev[-1]["details"]["sessions_revoked"] == 1


def sessions(srv, tok):
    r = srv.get("/api/v1/me/sessions", headers=bearer(tok))
    assert r.status == 200, r
    return r.json()["items"]


def test_end_one_session(srv, pg):
    email, _ = signup(srv)
    a = login(srv, email)["access_token"]
    b = login(srv, email)["access_token"]
    items = sessions(srv, a)
    other = [s["id"] for s in items if not s["current"]]
    assert len(other) == 1
    r = srv.https("DELETE", f"/api/v1/me/sessions/{other[0]}", headers=bearer(a))
    assert r.status == 204, r
    wait_until(lambda: all(srv.get("/api/v1/me", headers=bearer(b)).status == 401
                           for _ in range(6)), 1.5, what="the ended session refused everywhere")
    assert srv.get("/api/v1/me", headers=bearer(a)).status == 200
    # Twice, unknown, or someone else's: 404.
    stranger_email, _ = signup(srv)
    theirs = sessions(srv, login(srv, stranger_email)["access_token"])[0]["id"]
    for sid in (other[0], str(uuid.uuid4()), theirs, "junk"):
        r = srv.https("DELETE", f"/api/v1/me/sessions/{sid}", headers=bearer(a))
        assert r.status == 404, (sid, r)
    ev = audit_rows(pg, "event_type = 'auth.sessions.revoked' AND details->>'session_id' = "
                        f"'{other[0]}'")
    assert len(ev) == 1 and ev[0]["details"]["families"] == 1


def test_end_all_other_sessions_then_all(srv):
    email, _ = signup(srv)
    toks = [login(srv, email) for _ in range(3)]
    cur = toks[0]["access_token"]
    r = srv.https("DELETE", "/api/v1/me/sessions", headers=bearer(cur))
    assert r.status == 200 and r.json() == {"revoked": 2, "current_revoked": False}, r
    for t in toks[1:]:
        wait_until(lambda t=t: srv.get("/api/v1/me", headers=bearer(t["access_token"])).status
                   == 401, 1.5, what="other sessions refused")
        r = post(srv, "/api/v1/auth/refresh", {"refresh_token": t["refresh_token"]})
        assert r.status == 401
    assert srv.get("/api/v1/me", headers=bearer(cur)).status == 200
    r = srv.https("DELETE", "/api/v1/me/sessions?all=maybe", headers=bearer(cur))
    assert r.status == 400 and "all" in r.json()["error"]["message"]
    r = srv.https("DELETE", "/api/v1/me/sessions?all=1", headers=bearer(cur))
    assert r.status == 200 and r.json() == {"revoked": 1, "current_revoked": True}, r
    assert any(c.startswith("cs_access=;") for c in r.header_all("Set-Cookie"))
    wait_until(lambda: srv.get("/api/v1/me", headers=bearer(cur)).status == 401, 1.5,
               what="current session refused")


def test_password_change(srv, pg):
    email, body = signup(srv)
    uid = body["user"]["id"]
    cur = login(srv, email)
    other = login(srv, email)
    h = bearer(cur["access_token"])
    r = post(srv, "/api/v1/me/password",
             {"current_password": "not the password at all", "new_password": NEW_PASSWORD}, h)
    assert r.status == 403 and r.json()["error"]["code"] == "invalid_credentials", r
    for bad, field in (({"current_password": PASSWORD, "new_password": "short"},
                        "new_password"),
                       ({"current_password": PASSWORD, "new_password": email}, "new_password"),
                       ({"new_password": NEW_PASSWORD}, "current_password"),
                       ({"current_password": PASSWORD}, "new_password")):
        r = post(srv, "/api/v1/me/password", bad, h)
        assert r.status == 400 and field in r.json()["error"]["message"], (bad, r)
    r = post(srv, "/api/v1/me/password",
             {"current_password": PASSWORD, "new_password": NEW_PASSWORD}, h)
    assert r.status == 200 and r.json() == {"sessions_revoked": 1}, r
    wait_until(lambda: srv.get("/api/v1/me", headers=bearer(other["access_token"])).status
               == 401, 1.5, what="the other session ended")
    assert post(srv, "/api/v1/auth/refresh",
                {"refresh_token": other["refresh_token"]}).status == 401
    # The current session goes on, refresh included.
    assert srv.get("/api/v1/me", headers=h).status == 200
    assert post(srv, "/api/v1/auth/refresh", {"refresh_token": cur["refresh_token"]}).status == 200
    r = post(srv, "/api/v1/auth/login", {"email": email, "password": PASSWORD})
    assert r.status == 401
    login(srv, email, NEW_PASSWORD)
    ev = audit_rows(pg, f"event_type = 'auth.password.changed' AND actor = '{uid}'")
    assert len(ev) == 1 and ev[0]["details"] == {"sessions_revoked": 1}
    dump = json.dumps(ev) + srv.log.read_text()
    assert NEW_PASSWORD not in dump and PASSWORD not in dump
