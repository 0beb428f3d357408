"""MFA end to end against the real daemon and Postgres: TOTP enrollment and activation,
login with a TOTP code (+-1 step, each step once), backup codes spent exactly once even
when two logins race, the second factor's own lockout, disabling MFA and replacing the
backup codes, and that no secret or code reaches the database in clear, the audit rows or
the log."""
import base64
import hashlib
import hmac
import json
import struct
import threading
import time
import uuid

import pytest

from conftest import Server, wait_until

PASSWORD = "correct horse battery staple"


def post(server, path, body=None, headers=None):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return server.https("POST", path, headers=h,
                        body=json.dumps(body if body is not None else {}).encode())


def bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


def totp(secret_b32, step):
    """RFC 6238: HMAC-SHA1 over the 8-byte big-endian step, dynamic truncation, 6 digits."""
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    mac = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    off = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF) % 1000000
    return f"{code:06d}"


def now_step():
    """The current 30 s step, waiting out the last 3 s of a step so that the server sees the
    same one (a step boundary between test and server would shift the +-1 window)."""
    while time.time() % 30 > 27:
        time.sleep(0.2)
    return int(time.time()) // 30


@pytest.fixture(scope="module")
def srv(workdir, tls_files, pg):
    s = Server(workdir, tls_files, pg, name="mfa", options={"lockout_threshold": 3})
    s.start()
    wait_until(lambda: s.get("/ready").status == 200, 15, what="the worker ready")
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def sql(pg, q):
    return pg.psql(q, db=pg.dbname).strip()


def login(srv, email, **extra):
    body = {"email": email, "password": PASSWORD}
    body.update(extra)
    return post(srv, "/api/v1/auth/login", body)


def enable_mfa(srv, pg, email):
    """Enroll and activate; returns (secret, backup codes, access token, user id)."""
    _, _, tok = new_user_from(srv, email)
    r = post(srv, "/api/v1/auth/mfa/enroll", headers=bearer(tok))
    assert r.status == 200, r
    secret = r.json()["secret"]
    step = now_step()
    r = post(srv, "/api/v1/auth/mfa/activate", {"code": totp(secret, step)},
             headers=bearer(tok))
    assert r.status == 200, r
    codes = r.json()["backup_codes"]
    uid = sql(pg, f"SELECT id FROM users WHERE email = '{email}'")
    return secret, codes, tok, uid


def new_user_from(srv, email):
    r = post(srv, "/api/v1/auth/signup", {"email": email, "password": PASSWORD,
                                          "org_name": "Acme"})
    assert r.status == 201, r
    r = login(srv, email)
    assert r.status == 200, r
    return email, None, r.json()["access_token"]


def fresh_email():
    return f"m{uuid.uuid4().hex[:12]}@example.com"


def test_enroll_activate_and_login(srv, pg):
    email = fresh_email()
    _, _, tok = new_user_from(srv, email)
    r = post(srv, "/api/v1/auth/mfa/enroll", headers=bearer(tok))
    assert r.status == 200, r
    first = r.json()["secret"]
    # Enrolling again replaces the pending secret.
    r = post(srv, "/api/v1/auth/mfa/enroll", headers=bearer(tok))
    assert r.status == 200, r
    secret, uri = r.json()["secret"], r.json()["otpauth_uri"]
    assert secret != first and len(secret) == 32
    assert uri.startswith("otpauth://totp/CloudSweep:") and f"secret={secret}" in uri
    assert "algorithm=SHA1" in uri and "digits=6" in uri and "period=30" in uri
    # Pending: login still needs no code.
    assert login(srv, email).status == 200
    # The stored secret is a vault blob, never the secret itself.
    blob = sql(pg, f"SELECT mfa_secret FROM users WHERE email = '{email}'")
    assert blob.startswith("v1:") and secret not in blob
    assert base64.b32decode(secret) not in base64.b64decode(blob.split(":", 2)[2])
    # A code of the replaced secret does not activate; a wrong one neither.
    step = now_step()
    for code in (totp(first, step), "000000" if totp(secret, step) != "000000" else "111111"):
        r = post(srv, "/api/v1/auth/mfa/activate", {"code": code}, headers=bearer(tok))
        assert r.status == 400 and r.json()["error"]["code"] == "invalid_code", r
    r = post(srv, "/api/v1/auth/mfa/activate", {"code": totp(secret, step)},
             headers=bearer(tok))
    assert r.status == 200, r
    codes = r.json()["backup_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    # Active: enroll and activate are refused.
    assert post(srv, "/api/v1/auth/mfa/enroll", headers=bearer(tok)).status == 409
    r = post(srv, "/api/v1/auth/mfa/activate", {"code": totp(secret, step)},
             headers=bearer(tok))
    assert r.status == 409, r
    # Login now needs the second factor; the password is checked first.
    r = login(srv, email)
    assert r.status == 401 and r.json()["error"]["code"] == "mfa_required", r
    r = post(srv, "/api/v1/auth/login", {"email": email, "password": "wrong password!!",
                                         "totp": totp(secret, step + 1)})
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_credentials", r
    # The activation spent `step`: the same code is a replay.
    r = login(srv, email, totp=totp(secret, step))
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_code", r
    r = login(srv, email, totp=totp(secret, step + 1))  # +1 step is inside the window
    assert r.status == 200, r
    me = srv.get("/api/v1/me", headers=bearer(r.json()["access_token"]))
    assert me.json()["mfa_enabled"] is True
    r = login(srv, email, totp=totp(secret, step + 1))  # replay
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_code", r
    # Stored codes are hashes.
    stored = sql(pg, "SELECT string_agg(code_hash, ',') FROM backup_codes b JOIN users u "
                     f"ON u.id = b.user_id WHERE u.email = '{email}'")
    for c in codes:
        assert c not in stored and c.replace("-", "") not in stored


@pytest.mark.parametrize("offset,ok", [(-1, True), (0, True), (1, True), (-2, False),
                                       (2, False)])
def test_totp_window(srv, pg, offset, ok):
    email = fresh_email()
    secret, _, _, uid = enable_mfa(srv, pg, email)
    # Forget the step activation spent, so that only the window decides.
    sql(pg, f"UPDATE users SET mfa_last_step = 0 WHERE id = '{uid}'")
    step = now_step()
    r = login(srv, email, totp=totp(secret, step + offset))
    assert r.status == (200 if ok else 401), r


def test_backup_code_once_and_race(srv, pg):
    email = fresh_email()
    _, codes, _, uid = enable_mfa(srv, pg, email)
    r = login(srv, email, backup_code=codes[0].upper())  # case and dash do not matter
    assert r.status == 200, r
    r = login(srv, email, backup_code=codes[0])
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_code", r
    # Two logins race to spend the same code: exactly one gets through.
    for code in codes[1:4]:
        results = []
        barrier = threading.Barrier(2)

        def go():
            barrier.wait()
            results.append(login(srv, email, backup_code=code).status)

        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [200, 401], results
    left = sql(pg, f"SELECT count(*) FROM backup_codes WHERE user_id = '{uid}' "
                   "AND used_at IS NULL")
    assert left == "6"
    rows = audit_rows(pg, f"event_type = 'auth.mfa.backup_code_used' AND actor = '{uid}'")
    assert [r["details"]["remaining"] for r in rows] == [9, 8, 7, 6]


def test_totp_race_lets_one_through(srv, pg):
    email = fresh_email()
    secret, _, _, uid = enable_mfa(srv, pg, email)
    sql(pg, f"UPDATE users SET mfa_last_step = 0 WHERE id = '{uid}'")
    code = totp(secret, now_step())
    results = []
    barrier = threading.Barrier(2)

    def go():
        barrier.wait()
        results.append(login(srv, email, totp=code).status)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 401], results


def test_bad_totp_flood_locks_only_mfa(srv, pg):
    email = fresh_email()
    secret, codes, _, uid = enable_mfa(srv, pg, email)
    step = now_step()
    bad = next(c for c in ("123456", "654321", "111111")
               if c not in (totp(secret, s) for s in (step - 1, step, step + 1)))
    for _ in range(3):  # lockout_threshold = 3
        r = login(srv, email, totp=bad)
        assert r.status == 401 and r.json()["error"]["code"] == "invalid_code", r
    # The second factor is locked: even the right code (or a backup code) is refused.
    r = login(srv, email, totp=totp(secret, now_step()))
    assert r.status == 429 and r.json()["error"]["code"] == "mfa_locked", r
    assert int(r.header("Retry-After")) >= 1
    r = login(srv, email, backup_code=codes[0])
    assert r.status == 429, r
    # The password path is untouched: it still verifies and asks for the second factor.
    r = login(srv, email)
    assert r.status == 401 and r.json()["error"]["code"] == "mfa_required", r
    assert sql(pg, f"SELECT pw_failures, pw_locked_until IS NULL FROM users "
                   f"WHERE id = '{uid}'") == "0|t"
    # And a flood of wrong passwords does not touch the second factor's counters.
    before = sql(pg, f"SELECT mfa_failures FROM users WHERE id = '{uid}'")
    for _ in range(2):
        r = post(srv, "/api/v1/auth/login", {"email": email, "password": "not the password!"})
        assert r.json()["error"]["code"] == "invalid_credentials"
    assert sql(pg, f"SELECT mfa_failures FROM users WHERE id = '{uid}'") == before
    # The lock lifts by itself once its time has passed.
    sql(pg, f"UPDATE users SET mfa_locked_until = now() - interval '1 second' "
            f"WHERE id = '{uid}'")
    r = login(srv, email, totp=totp(secret, step + 1))  # activation spent `step`
    assert r.status == 200, r
    assert sql(pg, f"SELECT mfa_failures, pw_failures FROM users WHERE id = '{uid}'") == "0|0"
    rows = audit_rows(pg, f"event_type = 'auth.login.failed' AND actor = '{uid}'")
    reasons = [r["details"]["reason"] for r in rows]
    assert reasons.count("mfa_invalid") == 3 and "mfa_locked" in reasons
    assert "mfa_required" in reasons and reasons.count("bad_password") == 2


def test_disable_and_regenerate(srv, pg):
    email = fresh_email()
    secret, codes, tok, uid = enable_mfa(srv, pg, email)
    step = now_step()
    # Regenerate needs a valid, unspent code (activation spent `step`).
    r = post(srv, "/api/v1/auth/mfa/backup-codes", {"code": totp(secret, step)},
             headers=bearer(tok))
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_code", r
    r = post(srv, "/api/v1/auth/mfa/backup-codes", {}, headers=bearer(tok))
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_request", r
    r = post(srv, "/api/v1/auth/mfa/backup-codes", {"code": totp(secret, step + 1)},
             headers=bearer(tok))
    assert r.status == 200, r
    fresh = r.json()["backup_codes"]
    assert len(fresh) == 10 and not set(fresh) & set(codes)
    assert login(srv, email, backup_code=codes[0]).status == 401  # the old ones are gone
    assert login(srv, email, backup_code=fresh[0]).status == 200
    # Disable: a wrong password is refused, the right one turns MFA off.
    r = post(srv, "/api/v1/auth/mfa/disable", {"password": "not the password!"},
             headers=bearer(tok))
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_password", r
    r = post(srv, "/api/v1/auth/mfa/disable", {"password": PASSWORD, "code": "123456"},
             headers=bearer(tok))
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_request", r
    r = post(srv, "/api/v1/auth/mfa/disable", {"password": PASSWORD}, headers=bearer(tok))
    assert r.status == 204, r
    assert sql(pg, f"SELECT mfa_enabled, mfa_secret IS NULL, (SELECT count(*) FROM "
                   f"backup_codes WHERE user_id = '{uid}') FROM users WHERE id = '{uid}'") \
        == "f|t|0"
    assert login(srv, email).status == 200
    r = post(srv, "/api/v1/auth/mfa/disable", {"password": PASSWORD}, headers=bearer(tok))
    assert r.status == 409, r
    # Enable again and disable with a code this time.
    r = post(srv, "/api/v1/auth/mfa/enroll", headers=bearer(tok))
    secret = r.json()["secret"]
    step = now_step()
    assert post(srv, "/api/v1/auth/mfa/activate", {"code": totp(secret, step)},
                headers=bearer(tok)).status == 200
    r = post(srv, "/api/v1/auth/mfa/disable", {"code": totp(secret, step + 1)},
             headers=bearer(tok))
    assert r.status == 204, r
    rows = audit_rows(pg, f"event_type = 'auth.mfa.disabled' AND actor = '{uid}'")
    assert [r["details"]["method"] for r in rows] == ["password", "totp"]


def test_mfa_routes_need_authentication(srv):
    for path in ("enroll", "activate", "disable", "backup-codes"):
        r = post(srv, f"/api/v1/auth/mfa/{path}", {"code": "123456"})
        assert r.status == 401 and r.json()["error"]["code"] == "unauthenticated", r


@pytest.mark.parametrize("body", [{"code": 123456}, {"code": "1" * 40}, {"code": None}])
def test_activate_validation(srv, body):
    _, _, tok = new_user_from(srv, fresh_email())
    r = post(srv, "/api/v1/auth/mfa/activate", body, headers=bearer(tok))
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_request", r
    assert "code" in r.json()["error"]["message"]


def audit_rows(pg, where):
    out = pg.psql(f"SELECT row_to_json(a) FROM audit_events a WHERE {where} ORDER BY seq",
                  db=pg.dbname)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_no_secret_in_audit_or_log(srv, pg):
    email = fresh_email()
    secret, codes, tok, uid = enable_mfa(srv, pg, email)
    step = now_step()
    assert login(srv, email, totp=totp(secret, step + 1)).status == 200
    assert login(srv, email, backup_code=codes[0]).status == 200
    assert login(srv, email, totp="999999").status in (200, 401)
    rows = audit_rows(pg, f"actor = '{uid}'")
    types = {r["event_type"] for r in rows}
    assert {"auth.mfa.enrolled", "auth.mfa.activated", "auth.mfa.used",
            "auth.mfa.backup_code_used", "auth.login.succeeded"} <= types
    used = [r for r in rows if r["event_type"] == "auth.mfa.used"]
    assert used[-1]["details"]["step"] == 1
    dump = json.dumps(rows)
    log = srv.log.read_text(errors="replace")
    # Six digits can occur inside hashes and timestamps: look for the codes as values.
    for needle in [secret] + codes + [c.replace("-", "") for c in codes] + \
            [f'"{c}"' for c in ("999999", totp(secret, step), totp(secret, step + 1))]:
        assert needle not in dump, needle
        assert needle not in log, needle
