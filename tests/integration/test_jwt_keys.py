"""Access tokens signed with a key pair: RS256 and ES256 work end to end, and the
algorithm-confusion forgeries (an HS256 token keyed with the public key, alg none) are
refused."""

import base64
import hashlib
import hmac
import json
import subprocess
import uuid

import pytest

from conftest import Server, wait_until

PASSWORD = "correct horse battery staple"


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def keypair(d, alg):
    priv, pub = d / f"{alg}.key", d / f"{alg}.pub"
    if alg == "RS256":
        gen = ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    else:
        gen = ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    subprocess.run(gen + ["-out", str(priv)], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(priv), "-pubout", "-out", str(pub)],
                   check=True, capture_output=True)
    priv.chmod(0o600)
    return priv, pub


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_key_pair_tokens(workdir, tls_files, pg, alg):
    d = workdir / f"jwt-{alg}"
    d.mkdir()
    priv, pub = keypair(d, alg)
    srv = Server(workdir, tls_files, pg, name=f"jwt-{alg}",
                 options={"jwt_alg": alg, "jwt_private_key_file": priv,
                          "jwt_public_key_file": pub})
    srv.start()
    try:
        wait_until(lambda: srv.get("/ready").status == 200, 15, what="ready")
        email = f"k{uuid.uuid4().hex[:10]}@example.com"
        h = {"Content-Type": "application/json"}
        r = srv.https("POST", "/api/v1/auth/signup", headers=h, body=json.dumps(
            {"email": email, "password": PASSWORD, "org_name": "Keys"}).encode())
        assert r.status == 201, r
        r = srv.https("POST", "/api/v1/auth/login", headers=h, body=json.dumps(
            {"email": email, "password": PASSWORD}).encode())
        assert r.status == 200, r
        tokens = r.json()
        tok = tokens["access_token"]
        head, body, sig = tok.split(".")
        assert json.loads(b64url_decode(head))["alg"] == alg
        assert srv.get("/api/v1/me", headers={"Authorization": f"Bearer {tok}"}).status == 200
        # Refresh works with a key pair too (its successor key comes from the private key).
        r = srv.https("POST", "/api/v1/auth/refresh", headers=h, body=json.dumps(
            {"refresh_token": tokens["refresh_token"]}).encode())
        assert r.status == 200, r

        def refused(t):
            return srv.get("/api/v1/me", headers={"Authorization": f"Bearer {t}"}).status == 401

        # HS256 keyed with the public key: the classic confusion.
        claims = json.loads(b64url_decode(body))
        for key in (pub.read_bytes(), pub.read_bytes().strip()):
            h2 = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
            b2 = b64url(json.dumps(claims).encode())
            mac = hmac.new(key, f"{h2}.{b2}".encode(), hashlib.sha256).digest()
            assert refused(f"{h2}.{b2}.{b64url(mac)}")
        # alg none, and the other key-pair algorithm's header on this signature.
        other = "ES256" if alg == "RS256" else "RS256"
        for hdr in ({"alg": "none", "typ": "JWT"}, {"alg": other, "typ": "JWT"}):
            assert refused(f"{b64url(json.dumps(hdr).encode())}.{body}.{sig}")
            assert refused(f"{b64url(json.dumps(hdr).encode())}.{body}.")
        # A flipped signature byte.
        raw = bytearray(b64url_decode(sig))
        raw[len(raw) // 2] ^= 1
        assert refused(f"{head}.{body}.{b64url(bytes(raw))}")
    finally:
        problems = srv.finish()
        assert not problems, problems
