"""The KMS key provider (src/vault/kms.c) against the fake AWS's KMS: the unit program
tests/unit/test_kms (built beside cloudsweepd) rotates into an empty key directory,
loads the ring, seals, rotates again, reloads ("restart") and opens the old blob, and
sees renamed blobs, unknown keys and an unreachable KMS refused. Here we run it against
the fake and check what reached KMS: GenerateDataKey with KeySpec AES_256 and an
EncryptionContext naming the version, Decrypt with the same context, all signed with
CloudSweep's own key.

The daemon itself does not serve with vault_provider = kms yet: the worker's ring loader
(src/vault/ring.c) and the rotation (src/vault/rewrap.c) must call kms_ring_load and
kms_rotate first; until then `-n` refuses the option, which is checked too."""
import os
import pathlib
import subprocess

import pytest

from conftest import FAKE_AWS_SERVICE_ACCOUNT, BINARY

KEY_ID = "6f1b1c2e-0000-4000-8000-00000000c5c5"
REGION = "eu-west-1"


def unit_program():
    prog = pathlib.Path(BINARY).resolve().parent / "tests" / "unit" / "test_kms"
    if not prog.exists():
        pytest.skip(f"{prog} not built (make check builds it)")
    return prog


def test_kms_round_trip(fake_aws):
    prog = unit_program()
    fake_aws.reset({"accounts": {FAKE_AWS_SERVICE_ACCOUNT: {"regions": {REGION: {
        "kms_keys": [{"KeyId": KEY_ID, "Aliases": ["alias/cloudsweep"]}]}}}}})
    env = {**os.environ, "CS_TEST_KMS_URL": fake_aws.url,
           "CS_TEST_KMS_CA": str(fake_aws.options["aws_ca_file"]),
           "CS_TEST_KMS_CREDENTIALS": str(fake_aws.options["aws_credentials_file"]),
           "CS_TEST_KMS_KEY_ID": "alias/cloudsweep", "CS_TEST_KMS_REGION": REGION}
    r = subprocess.run([str(prog)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "not ok" not in r.stdout, r.stdout + r.stderr
    assert "# CS_TEST_KMS_URL unset" not in r.stdout

    calls = fake_aws.calls(service="kms")["calls"]
    gen = [c for c in calls if c["action"] == "GenerateDataKey" and c["status"] == 200]
    dec = [c for c in calls if c["action"] == "Decrypt"]
    assert [c["params"]["EncryptionContext"] for c in gen] == \
        [{"cloudsweep-kek-version": "1"}, {"cloudsweep-kek-version": "2"}]
    assert all(c["params"]["KeySpec"] == "AES_256" for c in gen)
    assert all(c["access_key"] == "AKIACLOUDSWEEPTEST01" and c["signature_verified"]
               for c in calls)
    ok_dec = [c for c in dec if c["status"] == 200]
    # load after rotation 1 (v1), after rotation 2 (v1, v2), the renamed blob (v1, v2, v3).
    assert [c["params"]["EncryptionContext"]["cloudsweep-kek-version"] for c in ok_dec] \
        == ["1", "1", "2", "1", "2"]
    refused = [c for c in dec if c["status"] != 200]
    assert refused and refused[0]["error_code"] == "InvalidCiphertextException"
    assert {c["params"]["KeyId"] for c in dec} >= {"alias/cloudsweep"}
    # No plaintext key in what the program printed.
    assert "Plaintext" not in r.stdout + r.stderr


def test_daemon_checks_kms_options(workdir, tls_files):
    binary = str(BINARY)
    conf = workdir / "kms-check.conf"
    cert, key = tls_files
    conf.write_text(f"tls_cert_file = {cert}\ntls_key_file = {key}\n"
                    "vault_provider = kms\nvault_kms_region = eu-west-1\n")
    r = subprocess.run([binary, "-n", "-c", str(conf)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0
    assert "vault_kms_key_id: required" in r.stdout + r.stderr, r
    conf.write_text(conf.read_text() + "vault_kms_key_id = alias/cloudsweep\n"
                    f"vault_key_dir = {workdir}\n")
    r = subprocess.run([binary, "-n", "-c", str(conf)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r
