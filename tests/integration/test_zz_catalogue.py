"""Every event type in the audit catalogue (doc/audit-events.md) is written by the action
that causes it somewhere in this suite, and nothing outside the catalogue ever is.

This file runs last (pytest takes files in name order) and looks at the audit trail the
whole suite left in the session's database; run on its own it has nothing to look at and
skips.
"""

import re

import pytest

from conftest import ROOT

# A plaintext that must never appear in the audit trail, whatever the test: the shared
# test password and the prefixes of secrets the suite creates.
NEVER = ("correct horse battery staple", "-----BEGIN", "AKIACLOUDSWEEPTEST01",
         "cloudsweep-test-secret-key")


def catalogue():
    text = (ROOT / "doc" / "audit-events.md").read_text()
    return set(re.findall(r"^\| `([a-z_]+(?:\.[a-z_]+)+)` \|", text, re.M))


def trail_databases(pg):
    """Every database of the session's cluster holding an audit trail (some test files
    run their servers on databases of their own)."""
    names = pg.psql("SELECT datname FROM pg_database WHERE NOT datistemplate").split()
    return [d for d in names
            if pg.psql("SELECT to_regclass('audit_events') IS NOT NULL", db=d).strip() == "t"]


def test_every_catalogued_event_is_written_and_nothing_else(request, pg):
    files = {item.fspath.basename for item in request.session.items}
    if len(files) < 10:
        pytest.skip("needs the whole integration suite to have run first")
    names = catalogue()
    assert len(names) >= 35
    seen = set()
    for db in trail_databases(pg):
        seen |= set(pg.psql("SELECT DISTINCT event_type FROM audit_events", db=db).split())
    # Also what was written and later pruned by the retention tests.
    seen |= set(pg.psql("SELECT event_type FROM test_event_types_seen", db=pg.dbname).split())
    assert not (names - seen), f"catalogued but never written: {sorted(names - seen)}"
    assert not (seen - names), f"written but not catalogued: {sorted(seen - names)}"


def test_no_plaintext_secret_in_the_audit_trail(request, pg):
    files = {item.fspath.basename for item in request.session.items}
    if len(files) < 10:
        pytest.skip("needs the whole integration suite to have run first")
    for db in trail_databases(pg):
        for needle in NEVER:
            n = pg.psql("SELECT count(*) FROM audit_events a WHERE a::text ILIKE "
                        f"'%{needle}%'", db=db).strip()
            assert n == "0", f"{needle!r} appears in {n} audit rows of {db}"
