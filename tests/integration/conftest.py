"""Black-box harness for cloudsweepd: a throwaway PostgreSQL, a throwaway TLS certificate,
the real daemon on a free port, and HTTPS / raw-TLS clients to talk to it.

Environment:
  CS_BINARY   the daemon to test (default: build/cloudsweepd in the work tree)
  CS_SQL_DIR  the migrations (default: sql/ in the work tree)
  CS_PG_BIN   PostgreSQL server binaries (default: /usr/lib/postgresql/15/bin)

Only the standard library and pytest are used.
"""

import http.client
import json
import base64
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("CS_BINARY", ROOT / "build" / "cloudsweepd")).resolve()
SQL_DIR = Path(os.environ.get("CS_SQL_DIR", ROOT / "sql")).resolve()
PG_BIN = Path(os.environ.get("CS_PG_BIN", "/usr/lib/postgresql/15/bin"))
IS_ROOT = os.geteuid() == 0

# What sanitizers print when they find something; any of these in a log fails the test.
SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "WARNING: ThreadSanitizer",
    "UndefinedBehaviorSanitizer",
)

# The options every test server gets unless a test overrides them: small limits and
# timeouts keep the suite fast.
BASE_OPTIONS = {
    "listen_address": "127.0.0.1",
    "workers": 1,
    "db_pool_size": 2,
    "db_query_timeout_ms": 2000,
    "log_level": "info",
    "max_url_bytes": 1024,
    "max_header_bytes": 4096,
    "max_headers": 32,
    "max_body_bytes": 4096,
    "handshake_timeout_ms": 2000,
    "header_timeout_ms": 1000,
    "body_timeout_ms": 2000,
    "idle_timeout_ms": 5000,
    "shutdown_timeout_ms": 5000,
    # Tests send many anonymous requests from one address; test_limits.py sets real limits.
    "ratelimit_anon_per_min": 1000000,
    "ratelimit_user_per_min": 1000000,
    "ratelimit_global_per_min": 10000000,
    "login_block_threshold": 1000,
}

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "Content-Security-Policy": "default-src 'self'",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waste_item_sql(org, scan, acct, region, type_, resource_id, cost=0):
    """SQL inserting one waste item as a scan would, under the unit of its account and
    region (added, already finished, when the scan has none), returning the item's id."""
    return (f"WITH u AS (INSERT INTO scan_units (scan_id, org_id, aws_account_id, region, "
            f"status) VALUES ('{scan}', '{org}', '{acct}', '{region}', 'succeeded') "
            f"ON CONFLICT (scan_id, aws_account_id, region) DO UPDATE SET region = "
            f"EXCLUDED.region RETURNING id) INSERT INTO waste_items (org_id, scan_id, unit_id, "
            f"aws_account_id, region, type, resource_id, estimated_monthly_cost_usd) SELECT "
            f"'{org}', '{scan}', u.id, '{acct}', '{region}', '{type_}', '{resource_id}', {cost} "
            f"FROM u RETURNING id")


def wait_until(pred, timeout, interval=0.1, what="condition"):
    """Poll pred() until it returns a truthy value; returns it or raises AssertionError."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - report the last one on timeout
            last_exc = e
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}"
                + (f" (last error: {last_exc!r})" if last_exc else "")
            )
        time.sleep(interval)


def tls_context(minimum=ssl.TLSVersion.TLSv1_3, maximum=None, alpn=None):
    """An unverified client context (the test certificate is self-signed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def tail(path, n=60):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"<{path} does not exist>"
    return "\n".join(lines[-n:])


# ------------------------------------------------------------------ PostgreSQL


class Postgres:
    """A throwaway cluster in a temporary directory: TCP on 127.0.0.1:<free port> with
    a password (scram) and a Unix socket (trust; the socket directory is private)."""

    user = "cloudsweep"
    dbname = "cloudsweep"

    def __init__(self, base):
        self.base = Path(base)
        self.data = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "postgres.log"
        self.password = secrets.token_hex(16)
        self.password_file = self.base / "db_password"
        self.port = free_port()
        self.running = False

    # Server binaries refuse to run as root: run them as postgres then.
    def _owner_cmd(self, argv):
        if IS_ROOT:
            return ["runuser", "-u", "postgres", "--"] + [str(a) for a in argv]
        return [str(a) for a in argv]

    def _run(self, argv, **kw):
        r = subprocess.run(
            self._owner_cmd(argv), capture_output=True, text=True, timeout=120, **kw
        )
        if r.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, argv))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n"
                f"postgres log:\n{tail(self.logfile)}"
            )
        return r

    def init(self):
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(mode=0o700)
        pwfile = self.base / "initdb_pw"
        pwfile.write_text(self.password + "\n")
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        if IS_ROOT:
            # The whole directory belongs to postgres (root, running the daemon and psql,
            # can still enter it); the socket is then reachable by the owner and root only.
            pg = pwd.getpwnam("postgres")
            self.base.chmod(0o700)
            for p in (self.base, self.sockdir, pwfile):
                os.chown(p, pg.pw_uid, pg.pw_gid)
        self._run(
            [
                PG_BIN / "initdb",
                "-D", self.data,
                "-U", self.user,
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
            ]
        )
        pwfile.unlink()
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                "\n# cloudsweep integration tests\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.sockdir}'\n"
                "unix_socket_permissions = 0700\n"
                "max_connections = 200\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
            )

    def start(self):
        if self.running:
            return
        self._run(
            [PG_BIN / "pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", "60", "start"]
        )
        self.running = True

    def stop(self, mode="fast"):
        if not self.running:
            return
        self._run([PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop"])
        self.running = False

    def psql(self, sql, db="postgres"):
        r = subprocess.run(
            [
                str(PG_BIN / "psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.sockdir), "-p", str(self.port), "-U", self.user,
                "-d", db, "-c", sql,
            ],
            capture_output=True, text=True, timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {r.stderr}")
        return r.stdout

    @property
    def conninfo(self):
        """Over the Unix socket (trust)."""
        return f"host={self.sockdir} port={self.port} dbname={self.dbname} user={self.user}"

    @property
    def tcp_conninfo(self):
        """Over TCP; needs the password (db_password_file)."""
        return f"host=127.0.0.1 port={self.port} dbname={self.dbname} user={self.user}"


# ------------------------------------------------------------------ clients


class Response:
    def __init__(self, status, reason, headers, body, version="HTTP/1.1"):
        self.status = status
        self.reason = reason
        self.headers = headers  # list of (name, value)
        self.body = body
        self.version = version

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.headers!r} {self.body[:300]!r}>"


class RawTLS:
    """A TLS connection where the test writes bytes and parses responses itself: for
    malformed, pipelined, partial and slow requests."""

    def __init__(self, port, timeout=10, ctx=None, host="127.0.0.1", session=None):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls = (ctx or tls_context()).wrap_socket(
            self.sock, server_hostname="localhost", session=session
        )
        self.buf = b""
        self.eof = False

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.tls.sendall(data)

    def _fill(self, timeout=None):
        if timeout is not None:
            self.tls.settimeout(timeout)
        try:
            chunk = self.tls.recv(65536)
        except (ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError):
            chunk = b""
        except ssl.SSLError as e:
            # An abrupt close without close_notify also means EOF here.
            if "EOF" in str(e) or "UNEXPECTED_EOF" in str(e):
                chunk = b""
            else:
                raise
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def read_response(self, timeout=10, head_only=False):
        """Read one response (an interim 1xx included, which has no body)."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete response head within {timeout}s: {self.buf[:200]!r}")
            if not self._fill(left):
                raise ConnectionError(f"connection closed before a response head: {self.buf[:200]!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        version, status, *reason = lines[0].split(" ", 2)
        status = int(status)
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
        resp = Response(status, reason[0] if reason else "", headers, b"", version)
        if 100 <= status < 200 or status in (204, 304) or head_only:
            return resp
        te = (resp.header("Transfer-Encoding") or "").lower()
        cl = resp.header("Content-Length")
        if "chunked" in te:
            resp.body = self._read_chunked(deadline)
        elif cl is not None:
            n = int(cl)
            while len(self.buf) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("response body incomplete")
                if not self._fill(left):
                    raise ConnectionError("connection closed inside a response body")
            resp.body, self.buf = self.buf[:n], self.buf[n:]
        else:
            while self._fill(max(0.01, deadline - time.monotonic())):
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def _read_chunked(self, deadline):
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                if not self._fill(max(0.01, deadline - time.monotonic())):
                    raise ConnectionError("closed inside chunked body")
            line, self.buf = self.buf.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            while len(self.buf) < size + 2:
                if not self._fill(max(0.01, deadline - time.monotonic())):
                    raise ConnectionError("closed inside chunk")
            body += self.buf[:size]
            self.buf = self.buf[size + 2:]
            if size == 0:
                return body

    def wait_closed(self, timeout):
        """True when the server closes the connection within timeout (data read on the way
        is kept in self.buf)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self._fill(left)
            except (socket.timeout, TimeoutError):
                return False
            except OSError:
                return True
        return True

    def readable(self, timeout=0):
        """True when response bytes (or EOF) arrive within timeout. A plain select() is not
        enough: TLS 1.3 session tickets make the socket readable with no application data."""
        if self.buf or self.eof:
            return True
        try:
            self._fill(max(timeout, 0.001))
        except (socket.timeout, TimeoutError, ssl.SSLWantReadError):
            return False
        return True

    def close(self):
        try:
            self.tls.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def request_bytes(method, path, headers=None, body=b"", host="localhost"):
    """Serialize a request by hand (Host and, with a body, Content-Length added)."""
    if isinstance(body, str):
        body = body.encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    hdrs = dict(headers or {})
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in hdrs):
        hdrs["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ------------------------------------------------------------------ the daemon


class Server:
    """One cloudsweepd process with its own config file and log file."""

    def __init__(self, workdir, tls, pg, options=None, args=(), env=None, name="server"):
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.conf = self.dir / "cloudsweepd.conf"
        self.log = self.dir / "cloudsweepd.log"
        self.stderr = self.dir / "stderr.log"
        self.pid_file = self.dir / "cloudsweepd.pid"
        self.args = list(args)
        self.env = dict(env or {})
        self.proc = None
        self.seen_workers = set()
        self.options = dict(BASE_OPTIONS)
        self.options.update(SECRET_OPTIONS)
        self.options.update(
            {
                "port": self.port,
                "tls_cert_file": tls[0],
                "tls_key_file": tls[1],
                "db_conninfo": pg.conninfo,
                "sql_dir": SQL_DIR,
                "log_file": self.log,
                "pid_file": self.pid_file,
            }
        )
        self.options.update(options or {})
        self.options = {k: v for k, v in self.options.items() if v is not None}
        self.write_conf()

    def write_conf(self, **changes):
        self.options.update(changes)
        text = "# written by tests/integration/conftest.py\n" + "".join(
            f"{k} = {v}\n" for k, v in self.options.items()
        )
        self.conf.write_text(text)

    def start(self, wait=True, timeout=15):
        env = dict(os.environ)
        env.update(self.env)
        self._stderr_fh = open(self.stderr, "ab")
        self.proc = subprocess.Popen(
            [str(BINARY), "-c", str(self.conf)] + self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr_fh,
            stderr=self._stderr_fh,
            env=env,
        )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout=15):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"cloudsweepd exited with {self.proc.returncode} before answering /health\n"
                    + self.diagnostics()
                )
            try:
                r = self.get("/health", timeout=2)
                if r.status == 200:
                    self.workers()
                    return
                last = r
            except (OSError, ssl.SSLError, http.client.HTTPException) as e:
                last = e
            time.sleep(0.05)
        raise AssertionError(
            f"cloudsweepd did not answer GET /health with 200 within {timeout}s "
            f"(last: {last!r})\n" + self.diagnostics()
        )

    def wait_ready(self, timeout=15):
        """Until GET /ready answers 200: database connected, revocations mirrored."""
        wait_until(lambda: self.get("/ready", timeout=2).status == 200, timeout,
                   what="GET /ready 200")

    def diagnostics(self):
        return (
            f"--- config {self.conf}:\n{self.conf.read_text()}"
            f"--- log {self.log}:\n{tail(self.log)}\n"
            f"--- stdout/stderr:\n{tail(self.stderr)}"
        )

    @property
    def pid(self):
        return self.proc.pid

    def workers(self):
        """Pids of the master's child processes (the workers)."""
        kids = set()
        for f in Path(f"/proc/{self.pid}/task").glob("*/children"):
            try:
                kids.update(int(x) for x in f.read_text().split())
            except (FileNotFoundError, ValueError):
                pass
        self.seen_workers.update(kids)
        return sorted(kids)

    def _left_behind(self):
        """Workers of this server still alive (after the master is gone): killed and listed."""
        left = []
        for pid in sorted(self.seen_workers):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                stat = Path(f"/proc/{pid}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if str(self.conf).encode() not in cmd or stat.split(") ", 1)[1].startswith("Z"):
                continue  # pid reused by something else, or a zombie
            left.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def kill(self, sig):
        os.kill(self.pid, sig)

    def https(self, method, path, headers=None, body=None, timeout=10, ctx=None):
        """One request on a fresh connection; returns a Response."""
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, timeout=timeout, context=ctx or tls_context()
        )
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            body = r.read()
            return Response(r.status, r.reason, r.getheaders(), body)
        finally:
            conn.close()

    def get(self, path, headers=None, **kw):
        return self.https("GET", path, headers=headers, **kw)

    def raw(self, timeout=10, ctx=None, session=None):
        return RawTLS(self.port, timeout=timeout, ctx=ctx, session=session)

    def log_lines(self):
        """The JSON log lines written so far (lines that are not JSON are returned as str)."""
        out = []
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append(line)
        return out

    def sanitizer_reports(self):
        found = []
        for p in (self.log, self.stderr):
            try:
                text = p.read_text(errors="replace")
            except FileNotFoundError:
                continue
            for m in SANITIZER_MARKERS:
                if m in text:
                    i = text.index(m)
                    found.append(f"{p.name}: {text[max(0, i - 200):i + 3000]}")
        return found

    def stop(self, sig=signal.SIGTERM, timeout=None):
        """Stop the daemon; returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            if timeout is None:
                timeout = int(self.options.get("shutdown_timeout_ms", 10000)) / 1000 + 10
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self._stderr_fh.close()
                raise AssertionError(
                    f"cloudsweepd did not exit within {timeout}s of {sig!r}\n" + self.diagnostics()
                )
        self._stderr_fh.close()
        return self.proc.returncode

    def finish(self):
        """Teardown: SIGTERM, then a clean exit and no sanitizer report are required."""
        problems = []
        if self.proc is None:
            return problems
        already = self.proc.poll()
        if already is None:
            self.workers()
        try:
            rc = self.stop()
        except AssertionError as e:
            problems.append(str(e))
            rc = None
        if rc is not None and rc != 0:
            what = "had already exited" if already is not None else "exited after SIGTERM"
            problems.append(f"cloudsweepd {what} with status {rc}, expected 0")
        # A worker that outlives its master is a bug too; never leave one running.
        left = self._left_behind()
        if left:
            problems.append(f"worker process(es) {left} still running after the master exited")
        problems += [f"sanitizer report:\n{r}" for r in self.sanitizer_reports()]
        if problems:
            problems.append(self.diagnostics())
        return problems


# ------------------------------------------------------------------ fixtures


def pytest_configure(config):
    config.addinivalue_line("markers", "server_options(**opts): options for the server fixture")


@pytest.fixture(scope="session")
def workdir():
    if not BINARY.exists():
        pytest.exit(f"CS_BINARY {BINARY} does not exist; build first", returncode=2)
    d = Path(tempfile.mkdtemp(prefix="cs-it-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def tls_files(workdir):
    """A throwaway ECDSA P-256 certificate for CN=localhost: (cert, key)."""
    d = workdir / "tls"
    d.mkdir()
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True, capture_output=True,
    )
    key.chmod(0o600)
    return str(cert), str(key)


SECRET_OPTIONS = {}


@pytest.fixture(scope="session")
def secret_files(workdir):
    """The daemon's secrets as files, like an operator keeps them: JWT secret, audit HMAC
    key and the Ed25519 key that signs audit checkpoints."""
    d = workdir / "secrets"
    d.mkdir(mode=0o700)
    for name in ("jwt_secret", "audit_hmac_key"):
        f = d / name
        f.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
        f.chmod(0o600)
    sign = d / "audit_signing_key.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(sign)],
                   check=True, capture_output=True)
    sign.chmod(0o600)
    vault = d / "vault"
    vault.mkdir(mode=0o700)
    kek = vault / "kek-1"
    kek.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    kek.chmod(0o600)
    SECRET_OPTIONS.update({
        "vault_key_dir": vault,
        "jwt_secret_file": d / "jwt_secret",
        "audit_hmac_key_file": d / "audit_hmac_key",
        "audit_signing_key_file": sign,
    })
    return dict(SECRET_OPTIONS)


@pytest.fixture(scope="session")
def pg(workdir, tls_files, secret_files):
    """The session's PostgreSQL, migrated. Tests that stop it must use `pg_control`."""
    p = Postgres(workdir / "pg")
    p.init()
    p.start()
    p.psql(f"CREATE DATABASE {p.dbname}")
    conf = workdir / "migrate.conf"
    conf.write_text(
        f"tls_cert_file = {tls_files[0]}\n"
        f"tls_key_file = {tls_files[1]}\n"
        f"db_conninfo = {p.conninfo}\n"
        f"sql_dir = {SQL_DIR}\n"
    )
    r = subprocess.run(
        [str(BINARY), "migrate", "-c", str(conf)], capture_output=True, text=True, timeout=120
    )
    if r.returncode != 0:
        p.stop()
        pytest.exit(
            f"cloudsweepd migrate failed ({r.returncode}):\n{r.stdout}\n{r.stderr}", returncode=3
        )
    # Which event types the suite wrote, kept even when a retention test prunes the trail
    # (test_zz_catalogue.py reads it).
    p.psql("CREATE TABLE test_event_types_seen (event_type text PRIMARY KEY); "
           "CREATE FUNCTION test_note_event_type() RETURNS trigger LANGUAGE plpgsql AS $$ "
           "BEGIN INSERT INTO test_event_types_seen VALUES (NEW.event_type) "
           "ON CONFLICT DO NOTHING; RETURN NULL; END $$; "
           "CREATE TRIGGER test_note_event_type AFTER INSERT ON audit_events "
           "FOR EACH ROW EXECUTE FUNCTION test_note_event_type()", db=p.dbname)
    yield p
    p.stop(mode="immediate")


@pytest.fixture(autouse=True, scope="module")
def fresh_limits(pg):
    """Each test file starts with empty rate buckets and no login blocks: failed logins
    of one file must not block the next one's logins from 127.0.0.1."""
    pg.psql("DELETE FROM rate_buckets; DELETE FROM login_failures; DELETE FROM ip_blocks",
            db=pg.dbname)


@pytest.fixture
def pg_control(pg):
    """The session's PostgreSQL for a test that takes it down: restarted afterwards."""
    yield pg
    if not pg.running:
        pg.start()


@pytest.fixture
def server_factory(workdir, tls_files, pg, request):
    """make(options=None, args=(), env=None, start=True) -> a running Server. Every server
    is stopped with SIGTERM at teardown and must exit 0 with no sanitizer report."""
    servers = []

    def make(options=None, args=(), env=None, start=True, wait=True):
        s = Server(workdir, tls_files, pg, options=options, args=args, env=env,
                   name=re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:60])
        servers.append(s)
        if start:
            s.start(wait=wait)
        return s

    yield make
    problems = []
    for s in servers:
        problems += s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def server(server_factory, request):
    """A running server with BASE_OPTIONS plus @pytest.mark.server_options(...)."""
    m = request.node.get_closest_marker("server_options")
    return server_factory(options=m.kwargs if m else None)


@pytest.fixture(scope="module")
def shared_server(workdir, tls_files, pg):
    """One server for the read-only tests of a module (saves start-up time)."""
    s = Server(workdir, tls_files, pg, name="shared")
    try:
        s.start()
    except BaseException:
        s.finish()
        raise
    yield s
    problems = s.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# ------------------------------------------------------------------ fake AWS

# CloudSweep's own AWS identity in the fake: the key the daemon signs AssumeRole with.
FAKE_AWS_SERVICE_ACCOUNT = "999999999999"
FAKE_AWS_KEY_ID = "AKIACLOUDSWEEPTEST01"
FAKE_AWS_SECRET = "cloudsweep-test-secret-key-0123456789abcd"


class FakeAws:
    """tests/fakes/fake_aws.py on loopback over HTTPS (the test certificate), with its
    control API. `options` are what a server needs to use it as AWS."""

    def __init__(self, workdir, tls):
        self.cert, key = tls
        creds = workdir / "aws_credentials"
        creds.write_text(f"aws_access_key_id = {FAKE_AWS_KEY_ID}\n"
                         f"aws_secret_access_key = {FAKE_AWS_SECRET}\n")
        creds.chmod(0o600)
        self.log = open(workdir / "fake_aws.log", "w")
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", str(ROOT / "tests" / "fakes" / "fake_aws.py"),
             "--http-port", "0", "--https-port", "0", "--cert", self.cert, "--key", key],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        ports = json.loads(self.proc.stdout.readline())
        self.http_port, self.https_port = ports["http_port"], ports["https_port"]
        self.url = f"https://127.0.0.1:{self.https_port}"
        self.options = {"aws_endpoint_url": self.url, "aws_ca_file": self.cert,
                        "aws_credentials_file": creds}

    def control(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, "/__fake/" + path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            r = conn.getresponse()
            payload = r.read()
            if r.status >= 300:
                raise AssertionError(f"fake AWS {method} {path}: {r.status} {payload[:300]!r}")
            return json.loads(payload) if payload else None
        finally:
            conn.close()

    def reset(self, seed=None):
        """Empty state, faults and call log; then seed (CloudSweep's own key included)."""
        seed = json.loads(json.dumps(seed or {}))
        accounts = seed.setdefault("accounts", {})
        own = accounts.setdefault(FAKE_AWS_SERVICE_ACCOUNT, {})
        own.setdefault("access_keys", []).append(
            {"id": FAKE_AWS_KEY_ID, "secret": FAKE_AWS_SECRET, "user": "cloudsweep"})
        return self.control("POST", "reset", seed)

    def faults(self, rules, append=False):
        return self.control("POST", "faults", {"faults": rules, "append": append})

    def calls(self, **filters):
        q = "&".join(f"{k}={v}" for k, v in filters.items())
        return self.control("GET", "calls" + ("?" + q if q else ""))

    def state(self):
        return self.control("GET", "state")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def fake_aws(workdir, tls_files):
    """The session's fake AWS (reset it in your test/module: state is shared)."""
    f = FakeAws(workdir, tls_files)
    f.reset()
    yield f
    f.stop()
