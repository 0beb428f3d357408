#!/usr/bin/python3
"""A fake GitHub for CloudSweep's sign-in tests.

One HTTPS server on loopback plays both github.com (the OAuth authorize page and the
token endpoint) and api.github.com (/user, /user/emails), answering with GitHub's real
status codes and JSON error shapes. It is as strict as GitHub where the daemon could get
it wrong: the client id and secret are checked, an authorization code is bound to its
client, redirect_uri and PKCE challenge, works once and dies after ten minutes, and API
calls need a live bearer token with the right scope.

There is no login page: the "browser's GitHub session" is set through the control API
(`POST /__fake/authorize`), and the authorize endpoint redirects straight back to the
redirect_uri with a code (or with an error, to play a user who clicks "Cancel").
Users are seeded with `POST /__fake/users`; faults are injected with
`POST /__fake/faults`. See README.md beside this file.

Runs under Debian's /usr/bin/python3 with the standard library only.
"""

import argparse
import base64
import hashlib
import json
import secrets
import signal
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit

CODE_TTL_S = 600
DOCS = "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors"
AUTHZ_DOCS = "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-authorization-request-errors"

TOKEN_ERRORS = {
    "incorrect_client_credentials": ("The client_id and/or client_secret passed are incorrect.",
                                     f"{DOCS}/#incorrect-client-credentials"),
    "redirect_uri_mismatch": ("The redirect_uri MUST match the registered callback URL for "
                              "this application.", f"{AUTHZ_DOCS}/#redirect-uri-mismatch2"),
    "bad_verification_code": ("The code passed is incorrect or expired.",
                              f"{DOCS}/#bad-verification-code"),
    "unverified_user_email": ("The user must have a verified primary email.",
                              f"{DOCS}/#unverified-user-email"),
}


class State:
    """Everything the fake knows, behind one lock."""

    def __init__(self, client_id, client_secret, redirect_uri):
        self.lock = threading.Lock()
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri  # the registered callback, or None: any
        self.reset()

    def reset(self):
        self.users = {}       # login -> user dict (id, login, name, emails)
        self.session = None   # login of the browser's GitHub session
        self.authorize_error = None  # e.g. "access_denied"
        self.codes = {}       # code -> grant
        self.tokens = {}      # token -> {"login", "scope"}
        self.faults = {}
        self.calls = []
        self.next_id = 1000


def b64url_sha256(s):
    return base64.urlsafe_b64encode(hashlib.sha256(s.encode()).digest()).rstrip(b"=").decode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "GitHub.com"
    sys_version = ""

    def log_message(self, fmt, *args):  # quiet unless --verbose
        if self.server.verbose:
            sys.stderr.write("fake_github: " + fmt % args + "\n")

    # ---- plumbing

    def _send(self, status, body=b"", ctype="application/json; charset=utf-8", headers=()):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        head = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}",
                f"Content-Length: {len(body)}"]
        if body:
            head.append(f"Content-Type: {ctype}")
        head += [f"{k}: {v}" for k, v in headers]
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.wfile.flush()

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _record(self, path, status, **extra):
        st = self.server.state
        with st.lock:
            st.calls.append(dict(time=time.time(), method=self.command, path=path,
                                 status=status, **extra))

    def _fault(self, name):
        st = self.server.state
        with st.lock:
            f = st.faults.get(name)
            if f is None:
                return None
            if isinstance(f, dict) and f.get("count") is not None:
                f["count"] -= 1
                if f["count"] <= 0:
                    del st.faults[name]
            return f

    def _maybe_delay(self, endpoint):
        f = self._fault(f"{endpoint}_delay_ms")
        if f:
            time.sleep((f["value"] if isinstance(f, dict) else f) / 1000)

    # ---- dispatch

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self):
        url = urlsplit(self.path)
        path = url.path
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        routes = {
            ("GET", "/login/oauth/authorize"): self.authorize,
            ("POST", "/login/oauth/access_token"): self.access_token,
            ("GET", "/user"): self.user,
            ("GET", "/user/emails"): self.user_emails,
        }
        if path.startswith("/__fake/"):
            return self.control(path[len("/__fake/"):], query)
        h = routes.get((self.command, path))
        if h is None:
            self._send(404, {"message": "Not Found",
                             "documentation_url": "https://docs.github.com/rest"})
            self._record(path, 404)
            return
        h(query)

    # ---- github.com

    def authorize(self, q):
        st = self.server.state
        redirect = q.get("redirect_uri") or st.redirect_uri
        if q.get("client_id") != st.client_id or not redirect:
            self._send(404, "<html>Not Found</html>", "text/html")
            self._record("/login/oauth/authorize", 404, error="unknown_client")
            return
        sep = "&" if "?" in redirect else "?"
        if st.redirect_uri is not None and not redirect.startswith(st.redirect_uri):
            params = {"error": "redirect_uri_mismatch",
                      "error_description": TOKEN_ERRORS["redirect_uri_mismatch"][0],
                      "error_uri": TOKEN_ERRORS["redirect_uri_mismatch"][1]}
            if "state" in q:
                params["state"] = q["state"]
            self._send(302, headers=[("Location", redirect + sep + urlencode(params))])
            self._record("/login/oauth/authorize", 302, error="redirect_uri_mismatch")
            return
        with st.lock:
            err, login = st.authorize_error, st.session
        if err is None and (login is None or login not in st.users):
            err = "access_denied"
        if err is not None:
            params = {"error": err,
                      "error_description": "The user has denied your application access.",
                      "error_uri": f"{AUTHZ_DOCS}/#access-denied"}
        else:
            code = secrets.token_hex(10)
            with st.lock:
                st.codes[code] = dict(login=login, client_id=q["client_id"],
                                      redirect_uri=q.get("redirect_uri"),
                                      scope=q.get("scope", ""),
                                      challenge=q.get("code_challenge"),
                                      method=q.get("code_challenge_method", "plain"),
                                      expires=time.time() + CODE_TTL_S, used=False)
            params = {"code": code}
        if "state" in q:
            params["state"] = q["state"]
        self._send(302, headers=[("Location", redirect + sep + urlencode(params))])
        self._record("/login/oauth/authorize", 302, error=err, scope=q.get("scope"),
                     challenge_method=q.get("code_challenge_method"))

    def _token_answer(self, doc):
        if "application/json" in (self.headers.get("Accept") or ""):
            self._send(200, doc)
        else:
            self._send(200, urlencode(doc), "application/x-www-form-urlencoded; charset=utf-8")

    def _token_error(self, name, description=None):
        desc, uri = TOKEN_ERRORS[name]
        self._token_answer({"error": name, "error_description": description or desc,
                            "error_uri": uri})
        self._record("/login/oauth/access_token", 200, error=name)

    def access_token(self, q):
        st = self.server.state
        self._maybe_delay("token")
        raw = self._body()
        ctype = self.headers.get("Content-Type") or ""
        if "json" in ctype:
            try:
                form = {k: str(v) for k, v in json.loads(raw or b"{}").items()}
            except ValueError:
                form = {}
        else:
            form = dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))
        form = {**q, **form}
        forced = self._fault("token_error")
        if forced:
            name = forced["value"] if isinstance(forced, dict) else forced
            if name.startswith("status:"):
                status = int(name.split(":")[1])
                self._send(status, {"message": "Server Error"})
                self._record("/login/oauth/access_token", status, error=name)
                return
            return self._token_error(name)
        if form.get("client_id") != st.client_id or form.get("client_secret") != st.client_secret:
            return self._token_error("incorrect_client_credentials")
        with st.lock:
            grant = st.codes.get(form.get("code", ""))
            usable = (grant is not None and not grant["used"] and grant["expires"] > time.time()
                      and grant["client_id"] == form["client_id"])
            if grant is not None:
                grant["used"] = True  # a code is spent by any attempt, like GitHub does
        if not usable:
            return self._token_error("bad_verification_code")
        if grant["redirect_uri"] and form.get("redirect_uri") not in (None, grant["redirect_uri"]):
            return self._token_error("redirect_uri_mismatch")
        if grant["challenge"]:
            verifier = form.get("code_verifier") or ""
            if grant["method"] == "S256":
                ok = len(verifier) >= 43 and b64url_sha256(verifier) == grant["challenge"]
            else:
                ok = verifier == grant["challenge"]
            if not ok:
                return self._token_error(
                    "bad_verification_code",
                    "The code_verifier does not match the code_challenge supplied in the "
                    "authorization request for PKCE.")
        token = "gho_" + secrets.token_urlsafe(27)[:36]
        scope = ",".join(sorted(set(grant["scope"].replace(",", " ").split())))
        with st.lock:
            st.tokens[token] = {"login": grant["login"], "scope": scope}
        self._token_answer({"access_token": token, "token_type": "bearer", "scope": scope})
        self._record("/login/oauth/access_token", 200, pkce=bool(grant["challenge"]))

    # ---- api.github.com

    def _api_user(self, path):
        """The token's user, or None after answering 401 like GitHub."""
        st = self.server.state
        authz = self.headers.get("Authorization") or ""
        scheme, _, tok = authz.partition(" ")
        if not authz:
            self._send(401, {"message": "Requires authentication",
                             "documentation_url": "https://docs.github.com/rest",
                             "status": "401"})
            self._record(path, 401, error="no_token")
            return None, None
        with st.lock:
            grant = st.tokens.get(tok.strip()) if scheme.lower() in ("bearer", "token") else None
            user = st.users.get(grant["login"]) if grant else None
        if user is None:
            self._send(401, {"message": "Bad credentials",
                             "documentation_url": "https://docs.github.com/rest",
                             "status": "401"})
            self._record(path, 401, error="bad_credentials")
            return None, None
        return user, grant

    def _api_fault(self, path, name):
        f = self._fault(name)
        if not f:
            return False
        status = f["value"] if isinstance(f, dict) else f
        if status == 401:
            body = {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest",
                    "status": "401"}
        else:
            body = {"message": "Server Error"}
        self._send(status, body)
        self._record(path, status, error="injected")
        return True

    def user(self, q):
        self._maybe_delay("user")
        if self._api_fault("/user", "user_status"):
            return
        user, _ = self._api_user("/user")
        if user is None:
            return
        doc = {"login": user["login"], "id": user["id"], "node_id": f"U_{user['id']}",
               "avatar_url": f"https://avatars.githubusercontent.com/u/{user['id']}?v=4",
               "html_url": f"https://github.com/{user['login']}", "type": "User",
               "site_admin": False, "name": user.get("name"), "email": user.get("public_email"),
               "created_at": "2020-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z"}
        self._send(200, doc, headers=[("X-OAuth-Scopes", _["scope"].replace(",", ", "))])
        self._record("/user", 200)

    def user_emails(self, q):
        self._maybe_delay("emails")
        if self._api_fault("/user/emails", "emails_status"):
            return
        user, grant = self._api_user("/user/emails")
        if user is None:
            return
        if "user:email" not in grant["scope"].split(",") and "user" not in grant["scope"].split(","):
            self._send(404, {"message": "Not Found",
                             "documentation_url": "https://docs.github.com/rest/users/emails"})
            self._record("/user/emails", 404, error="scope")
            return
        self._send(200, user["emails"])
        self._record("/user/emails", 200)

    # ---- control API

    def control(self, what, q):
        st = self.server.state
        raw = self._body()
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            return self._send(400, {"error": "body is not JSON"})
        if what == "reset" and self.command == "POST":
            with st.lock:
                st.reset()
            return self._send(200, {"ok": True})
        if what == "users" and self.command == "POST":
            # {"login", "name"?, "id"?, "emails": [{"email","primary","verified"}] or "email"}
            with st.lock:
                uid = doc.get("id") or st.next_id
                st.next_id = max(st.next_id, uid) + 1
                emails = doc.get("emails")
                if emails is None and doc.get("email"):
                    emails = [{"email": doc["email"], "primary": True, "verified": True,
                               "visibility": "private"}]
                user = {"login": doc["login"], "id": uid, "name": doc.get("name"),
                        "emails": emails or []}
                st.users[doc["login"]] = user
            return self._send(200, user)
        if what == "authorize" and self.command == "POST":
            # {"login": who is signed in at GitHub, "error": "access_denied" or null}
            with st.lock:
                if "login" in doc:
                    st.session = doc["login"]
                st.authorize_error = doc.get("error")
            return self._send(200, {"ok": True})
        if what == "faults" and self.command == "POST":
            # {"token_error": "bad_verification_code" | "status:500",
            #  "user_status": 401, "emails_status": 500, "token_delay_ms": 5000, ...}
            # each value may be {"value": V, "count": N} to apply N times only.
            with st.lock:
                st.faults = dict(doc)
            return self._send(200, {"ok": True})
        if what == "revoke-tokens" and self.command == "POST":
            with st.lock:
                login = doc.get("login")
                st.tokens = {t: g for t, g in st.tokens.items()
                             if login is not None and g["login"] != login}
            return self._send(200, {"ok": True})
        if what == "calls":
            with st.lock:
                if self.command == "DELETE":
                    st.calls = []
                    return self._send(200, {"ok": True})
                return self._send(200, list(st.calls))
        if what == "state" and self.command == "GET":
            with st.lock:
                return self._send(200, {"users": st.users, "session": st.session,
                                        "codes": len(st.codes), "tokens": len(st.tokens),
                                        "faults": st.faults})
        return self._send(404, {"error": f"unknown control endpoint {what}"})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cert", required=True, help="PEM certificate for the HTTPS listener")
    ap.add_argument("--key", required=True, help="PEM private key of the certificate")
    ap.add_argument("--client-id", default="Iv1.cloudsweeptest")
    ap.add_argument("--client-secret", default="s3cr3t-client-secret")
    ap.add_argument("--redirect-uri", default=None,
                    help="the registered callback URL (redirect_uri must start with it)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    srv = Server((args.host, args.port), Handler)
    srv.state = State(args.client_id, args.client_secret, args.redirect_uri)
    srv.verbose = args.verbose
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["http/1.1"])
    # The handshake happens in the handler thread (on first read), not in accept().
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)

    def stop(*_):
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(json.dumps({"port": srv.server_address[1]}), flush=True)
    srv.serve_forever()
    srv.server_close()


if __name__ == "__main__":
    main()
