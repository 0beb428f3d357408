"""Rate limits and login-address blocks against the real daemon: the shared buckets hold
across workers (the limit is not multiplied by the worker count), refusals are 429 with
Retry-After and an audit row, and a blocked address is let back in by itself."""
import json
import time
import uuid

import pytest

from conftest import wait_until
from test_identity import PASSWORD, login, post, signup


@pytest.fixture(autouse=True)
def fresh_buckets(pg):
    """Every test here starts with full buckets and no blocks (they live in Postgres)."""
    pg.psql("DELETE FROM rate_buckets; DELETE FROM login_failures; DELETE FROM ip_blocks",
            db=pg.dbname)


def ready(server):
    wait_until(lambda: all(server.get("/ready").status == 200 for _ in range(12)), 15,
               what="every worker ready")
    return server


@pytest.mark.parametrize("workers", [1, 3])
def test_anonymous_limit_holds_across_workers(server_factory, pg, workers):
    s = ready(server_factory(options={"workers": workers, "ratelimit_anon_per_min": 5,
                                      "ratelimit_audit_fold_s": 1}))
    t0 = pg.psql("SELECT now()", db=pg.dbname).strip()
    codes = [post(s, "/api/v1/auth/refresh", {"refresh_token": "A" * 43}).status
             for _ in range(12)]
    assert codes.count(401) == 5, codes
    assert codes.count(429) == 7, codes
    r = post(s, "/api/v1/auth/refresh", {"refresh_token": "A" * 43})
    assert r.status == 429 and r.json()["error"]["code"] == "rate_limited"
    assert int(r.header("Retry-After")) >= 1
    assert s.get("/health").status == 200, "operational endpoints are not rate limited"
    # Each worker writes a subject's first refusal at once and folds the others
    # into one event per period: every 429 is accounted for (the exact fold is checked
    # in test_folded_refusals_are_written_when_the_worker_stops).
    refused = ("SELECT coalesce(sum((details->>'refusals')::int), 0), count(*) FROM "
               f"audit_events WHERE event_type = 'access.rate_limited' AND occurred_at >= '{t0}'")
    wait_until(lambda: pg.psql(refused, db=pg.dbname).split("|")[0] == "8", 15,
               what="every refusal accounted for")


def test_folded_refusals_are_written_when_the_worker_stops(server_factory, pg):
    s = ready(server_factory(options={"workers": 1, "ratelimit_anon_per_min": 2,
                                      "ratelimit_audit_fold_s": 3600}))
    t0 = pg.psql("SELECT now()", db=pg.dbname).strip()
    codes = [post(s, "/api/v1/auth/refresh", {"refresh_token": "A" * 43}).status
             for _ in range(6)]
    assert codes.count(429) == 4, codes
    refused = ("SELECT coalesce(sum((details->>'refusals')::int), 0), count(*) FROM "
               f"audit_events WHERE event_type = 'access.rate_limited' AND occurred_at >= '{t0}'")
    assert pg.psql(refused, db=pg.dbname).split("|")[0] == "1", "the first is written at once"
    assert not s.finish()
    total, rows = pg.psql(refused, db=pg.dbname).split("|")
    assert (int(total), int(rows)) == (4, 2), "SIGTERM writes the three folded refusals as one"


def test_user_limit(server_factory):
    s = ready(server_factory(options={"workers": 2, "ratelimit_user_per_min": 4}))
    email, _ = signup(s)
    tok = login(s, email).json()["access_token"]
    codes = [s.get("/api/v1/me", headers={"Authorization": f"Bearer {tok}"}).status
             for _ in range(8)]
    assert codes.count(200) == 4 and codes.count(429) == 4, codes


def test_failed_logins_block_the_address_then_lift(server_factory, pg):
    s = ready(server_factory(options={"workers": 2, "login_block_threshold": 3,
                                      "login_block_duration_s": 5}))
    email, _ = signup(s)
    for _ in range(3):
        assert login(s, email, "wrong password, long enough").status == 401
    refused = []

    def blocked():
        r = login(s, email)  # the right password: refused only because of the address
        if r.status == 429:
            refused.append(r)
        return r.status == 429
    wait_until(blocked, 4, what="address blocked")
    r = refused[0]
    assert r.json()["error"]["code"] == "rate_limited" and int(r.header("Retry-After")) >= 1
    assert pg.psql("SELECT count(*) FROM audit_events WHERE event_type = 'access.ip_blocked'",
                   db=pg.dbname).strip() != "0"
    wait_until(lambda: login(s, email).status == 200, 12, interval=0.5, what="block lifted")
