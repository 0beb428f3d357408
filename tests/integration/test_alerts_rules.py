"""An alert rule from a rules file, in a module of its own: the evaluator's high-water marks
are shared by every server on the database, so no server with other rules may run beside it
(test_alerts.py's module server is stopped by the time this runs)."""
import subprocess
import json
import uuid

from test_alerts import alerts, logged, q, ready
from conftest import wait_until


def test_outside_hours_rule_from_a_rules_file(server_factory, pg, workdir):
    rules = workdir / "rules-outside.json"
    rules.write_text(json.dumps({"rules": [
        {"name": "creds_at_night", "severity": "medium", "kind": "outside_hours",
         "types": ["credential.read"], "group_by": "actor", "hours": "00:00-00:01",
         "weekdays": [], "tz_offset": "+00:00"}]}))
    s = ready(server_factory(options={"alert_rules_file": rules, "alert_interval_s": 1}))
    actor = str(uuid.uuid4())
    # No endpoint reads credentials yet: append the event as the vault will.
    q(pg, f"SELECT audit_append('{uuid.uuid4()}', '{actor}', '127.0.0.1', NULL, NULL, "
          f"'credential.read', 'aws_account', 'acct', 'read', 'success', "
          f"'{{\"purpose\":\"scan\"}}')")
    wait_until(lambda: alerts(pg, "creds_at_night", actor), 20, what="outside-hours alert")
    wait_until(lambda: logged(s, "creds_at_night", actor), 10, what="its log line")


def test_check_mode_refuses_a_bad_rules_file(workdir, tls_files):
    from conftest import BINARY
    cert, key = tls_files
    rules = workdir / "bad-rules.json"
    rules.write_text('[{"name": "x", "bogus": 1}]')
    conf = workdir / "bad-rules.conf"
    conf.write_text(f"tls_cert_file = {cert}\ntls_key_file = {key}\n"
                    f"alert_rules_file = {rules}\n")
    r = subprocess.run([str(BINARY), "-n", "-c", str(conf)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "alert_rules_file" in r.stderr, r
