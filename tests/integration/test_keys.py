"""Key-encryption-key rotation end to end: POST /api/v1/admin/keys/rotate and
`cloudsweepd keys rotate|list|retire` while the API keeps creating and reading accounts,
the background re-wrap job moving every stored data key to the newest version, every
worker reloading on NOTIFY, and retirement refused until nothing uses a version.

The module runs in a database of its own (created and migrated here) with a key directory
of its own, so its rotations and retirements cannot touch other modules' secrets. Stored
blobs are opened here in Python from the key files (format in include/cloudsweep/vault.h)
to prove that every credential still decrypts to what was stored."""
import base64
import json
import struct
import subprocess
import threading
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conftest import BINARY, SQL_DIR, Server, wait_until

PASSWORD = "correct horse battery staple"


# ------------------------------------------------------------------ the vault, in Python


def _binding(org, record, field):
    out = b""
    for part in (org, record, field):
        b = part.encode()
        out += struct.pack(">I", len(b)) + b
    return out


def vault_open(keydir, org, record, field, blob):
    """The plaintext of a version-1 blob, using the key files in keydir."""
    prefix, version, body = blob.split(":", 2)
    assert prefix == "v1"
    kek = base64.b64decode((keydir / f"kek-{version}").read_bytes().strip())
    raw = base64.b64decode(body)
    wrap_nonce, wrapped, wrap_tag = raw[:12], raw[12:44], raw[44:60]
    data_nonce, data_tag, ct = raw[60:72], raw[72:88], raw[88:]
    b = _binding(org, record, field)
    dk = AESGCM(kek).decrypt(wrap_nonce, wrapped + wrap_tag,
                             b"cloudsweep-vault-v1-kek" + struct.pack(">I", int(version)) + b)
    return AESGCM(dk).decrypt(data_nonce, ct + data_tag, b"cloudsweep-vault-v1-data" + b)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def keydb(pg, workdir, tls_files):
    """A database of this module's own, migrated."""
    name = f"cs_keys_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {name}")
    conninfo = f"host={pg.sockdir} port={pg.port} dbname={name} user={pg.user}"
    conf = workdir / f"{name}.conf"
    conf.write_text(f"db_conninfo = {conninfo}\nsql_dir = {SQL_DIR}\n")
    r = subprocess.run([str(BINARY), "migrate", "-c", str(conf)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    yield name, conninfo


@pytest.fixture(scope="module")
def keydir(workdir):
    d = workdir / f"vault-keys-{uuid.uuid4().hex[:6]}"
    d.mkdir(mode=0o700)
    f = d / "kek-1"
    f.write_bytes(base64.b64encode(__import__("os").urandom(32)) + b"\n")
    f.chmod(0o600)
    return d


@pytest.fixture(scope="module")
def srv(workdir, tls_files, pg, keydb, keydir):
    s = Server(workdir, tls_files, pg, name="keys",
               options={"workers": 2, "db_conninfo": keydb[1], "vault_key_dir": keydir,
                        "rewrap_interval_s": 1, "rewrap_batch": 4, "db_pool_size": 3})
    s.start()
    wait_until(lambda: all(s.get("/ready").status == 200 for _ in range(8)), 15,
               what="every worker ready")
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def sql(pg, keydb, q):
    return pg.psql(q, db=keydb[0])


def call(srv, method, path, tok, body=None):
    h = {"Authorization": f"Bearer {tok}"}
    data = None
    if body is not None:
        h["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    return srv.https(method, path, headers=h, body=data)


def signup(srv):
    email = f"k{uuid.uuid4().hex[:12]}@example.com"
    r = srv.https("POST", "/api/v1/auth/signup", headers={"Content-Type": "application/json"},
                  body=json.dumps({"email": email, "password": PASSWORD,
                                   "org_name": "Keys"}).encode())
    assert r.status == 201, r
    body = r.json()
    r = srv.https("POST", "/api/v1/auth/login", headers={"Content-Type": "application/json"},
                  body=json.dumps({"email": email, "password": PASSWORD}).encode())
    assert r.status == 200, r
    return body["org"]["id"], body["user"]["id"], r.json()["access_token"]


@pytest.fixture(scope="module")
def owner(srv):
    return signup(srv)


def new_account(srv, tok):
    account = f"{uuid.uuid4().int % 10**12:012d}"
    ext = f"ext-{uuid.uuid4().hex}"
    r = call(srv, "POST", "/api/v1/aws-accounts", tok,
             {"account_id": account, "account_name": "Load",
              "role_arn": f"arn:aws:iam::{account}:role/Audit", "external_id": ext,
              "regions": ["us-east-1"]})
    return r, ext


def keys_cli(srv, *args):
    return subprocess.run([str(BINARY), "-c", str(srv.conf), "keys", *args],
                          capture_output=True, text=True, timeout=60)


def versions(srv, tok):
    r = call(srv, "GET", "/api/v1/admin/keys", tok)
    assert r.status == 200, r
    return r.json()


def check_all_open(pg, keydb, keydir, expected, want_version=None):
    rows = sql(pg, keydb, "SELECT id, org_id, external_id_enc FROM aws_accounts "
                          "WHERE deleted_at IS NULL").split()
    stored = {}
    for line in rows:
        rid, org, blob = line.split("|")
        stored[rid] = (org, blob)
    missing = set(expected) - set(stored)
    assert not missing, f"{len(missing)} created accounts are gone"
    for rid, ext in expected.items():
        org, blob = stored[rid]
        if want_version is not None:
            assert blob.startswith(f"v1:{want_version}:"), blob[:10]
        assert vault_open(keydir, org, rid, "external_id", blob) == ext.encode()


# ------------------------------------------------------------------ tests


def test_rotation_under_load(srv, pg, keydb, keydir, owner):
    org, user, tok = owner
    expected, errors = {}, []
    for _ in range(12):
        r, ext = new_account(srv, tok)
        assert r.status == 201, r
        expected[r.json()["id"]] = ext
    assert versions(srv, tok)["current_version"] == 1

    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                r, ext = new_account(srv, tok)
                if r.status != 201:
                    errors.append(r)
                    continue
                expected[r.json()["id"]] = ext
                g = call(srv, "GET", f"/api/v1/aws-accounts/{r.json()['id']}", tok)
                if g.status != 200:
                    errors.append(g)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

    t = threading.Thread(target=load)
    t.start()
    try:
        for want in (2, 3):
            r = call(srv, "POST", "/api/v1/admin/keys/rotate", tok)
            assert r.status == 201, r
            assert r.json()["version"] == want and r.json()["previous_version"] == want - 1
            # Every worker seals with the new version soon (NOTIFY cs_vault).
            wait_until(lambda: all(new_account(srv, tok)[0].json()["key_version"] == want
                                   for _ in range(4)), 15, what=f"new writes on version {want}")
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors[:3]
    assert (keydir / "kek-3").exists()

    def drained():
        v = versions(srv, tok)
        return v["blobs_to_rewrap"] == 0 and v["current_version"] == 3 and v
    v = wait_until(drained, 60, what="every blob re-wrapped to version 3")
    assert [x["version"] for x in v["versions"]][:1] == [3]
    assert all(x["blobs"] == 0 for x in v["versions"] if x["version"] != 3)
    check_all_open(pg, keydb, keydir, expected, want_version=3)
    events = sql(pg, keydb, "SELECT details::text FROM audit_events WHERE event_type = "
                            "'key.rotated' ORDER BY occurred_at").split("\n")
    assert [json.loads(e)["new_version"] for e in events if e] == [2, 3]


def test_roles_cannot_rotate(srv, pg, keydb, owner):
    org, _, _ = owner
    for role in ("viewer", "member"):
        _, user, tok = signup(srv)
        sql(pg, keydb, f"UPDATE memberships SET org_id = '{org}', role = '{role}' "
                       f"WHERE user_id = '{user}'")
        r = srv.https("POST", "/api/v1/auth/login", headers={"Content-Type": "application/json"},
                      body=json.dumps({"email": sql(pg, keydb, "SELECT email FROM users WHERE "
                                                    f"id = '{user}'").strip(),
                                       "password": PASSWORD}).encode())
        tok = r.json()["access_token"]
        assert call(srv, "POST", "/api/v1/admin/keys/rotate", tok).status == 403
        assert call(srv, "GET", "/api/v1/admin/keys", tok).status == 403


def test_cli_list_retire_rotate(srv, pg, keydb, keydir, owner):
    org, user, tok = owner
    r = keys_cli(srv, "list")
    assert r.returncode == 0, r.stderr
    lines = [line.split("\t") for line in r.stdout.splitlines()]
    assert lines[0][:2] == ["3", "current"] and {x[0] for x in lines} == {"1", "2", "3"}

    # The current version and unknown arguments are refused; 1 and 2 are unused now.
    assert keys_cli(srv, "retire", "3").returncode == 1
    assert keys_cli(srv, "retire", "x").returncode == 2
    assert keys_cli(srv, "bogus").returncode == 2
    r = keys_cli(srv, "retire", "1")
    assert r.returncode == 0, r.stderr
    assert (keydir / "kek-1.retired").exists() and not (keydir / "kek-1").exists()

    r = keys_cli(srv, "rotate")
    assert r.returncode == 0, r.stderr
    assert (keydir / "kek-4").exists()
    wait_until(lambda: all(new_account(srv, tok)[0].json()["key_version"] == 4
                           for _ in range(4)), 15, what="workers reloaded after the CLI rotate")
    # Version 3 is in use until the job has re-wrapped it: retire refuses, then succeeds.
    r = keys_cli(srv, "retire", "3")
    if r.returncode != 0:
        assert "still protects" in r.stderr
    wait_until(lambda: versions(srv, tok)["blobs_to_rewrap"] == 0, 60,
               what="re-wrap to version 4")
    if (keydir / "kek-3").exists():
        assert keys_cli(srv, "retire", "3").returncode == 0
    assert keys_cli(srv, "retire", "2").returncode == 0

    rows = sql(pg, keydb, "SELECT event_type || '|' || actor || '|' || org_id FROM audit_events "
                          "WHERE event_type IN ('key.rotated', 'key.retired') AND actor = "
                          "'system' ORDER BY occurred_at").split()
    kinds = [x.split("|")[0] for x in rows]
    assert "key.rotated" in kinds and kinds.count("key.retired") >= 2
    assert all(x.endswith("00000000-0000-0000-0000-000000000000") for x in rows)
    # After the workers dropped the retired keys every account still opens.
    accounts = call(srv, "GET", "/api/v1/aws-accounts?limit=500", tok).json()["items"]
    assert accounts and all(a["key_version"] == 4 for a in accounts)
    logs = srv.log.read_text(errors="replace")
    assert "rewrap_failed" not in logs and "creds_open_failed" not in logs
