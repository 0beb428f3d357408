"""Black-box tests of cloudsweepd's core: TLS, the core endpoints, HTTP conventions,
limits and timeouts, keep-alive, the database gate, the process model (drain, worker
restart, reload), config checking and the access log.

The daemon is treated as a black box: only its command line, config file, signals,
network answers and log file are used.
"""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from conftest import (
    BINARY,
    SECURITY_HEADERS,
    free_port,
    request_bytes,
    tls_context,
    wait_until,
)

SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def assert_error_shape(resp, status, code=None):
    """The API's error shape: {"error": {"code", "message"}, "request_id"} with the header id."""
    assert resp.status == status, resp
    ct = resp.header("Content-Type") or ""
    assert ct.startswith("application/json"), resp
    doc = resp.json()
    assert set(doc) >= {"error", "request_id"}, doc
    assert isinstance(doc["error"].get("code"), str), doc
    assert re.fullmatch(r"[a-z][a-z0-9_]*", doc["error"]["code"]), doc
    assert isinstance(doc["error"].get("message"), str) and doc["error"]["message"], doc
    if code is not None:
        assert doc["error"]["code"] == code, doc
    assert doc["request_id"] == resp.header("X-Request-Id"), (doc, resp.headers)
    return doc


def metric_values(text, name):
    """Values of every sample of metric `name` (labels ignored)."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


# ------------------------------------------------------------------ TLS


def test_tls12_only_client_is_refused(shared_server):
    ctx = tls_context(minimum=ssl.TLSVersion.TLSv1_2, maximum=ssl.TLSVersion.TLSv1_2)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        with socket.create_connection(("127.0.0.1", shared_server.port), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname="localhost"):
                pass


def test_tls13_with_alpn_http11(shared_server):
    ctx = tls_context(alpn=["http/1.1"])
    with shared_server.raw(ctx=ctx) as c:
        assert c.tls.version() == "TLSv1.3"
        assert c.tls.selected_alpn_protocol() == "http/1.1"
        c.send(request_bytes("GET", "/health"))
        assert c.read_response().status == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_tls_session_resumption(server_factory, workers):
    srv = server_factory(options={"workers": workers})
    ctx = tls_context()
    # With TLS 1.3 the ticket arrives after the handshake: read one response first.
    with srv.raw(ctx=ctx) as first:
        first.send(request_bytes("GET", "/health"))
        assert first.read_response().status == 200
        session = first.tls.session
        assert session is not None
        assert not first.tls.session_reused
    # With several workers every one of them must accept the ticket (shared ticket keys):
    # a few connections land on different workers.
    for _ in range(6 if workers > 1 else 1):
        with srv.raw(ctx=ctx, session=session) as again:
            again.send(request_bytes("GET", "/health"))
            assert again.read_response().status == 200
            assert again.tls.session_reused, "TLS session was not resumed"


# ------------------------------------------------------------------ core endpoints


def test_health(shared_server):
    r = shared_server.get("/health")
    assert r.status == 200
    assert r.header("Content-Type", "").startswith("application/json")
    assert r.json() == {"status": "ok"}


def test_ready_when_database_is_up(shared_server):
    # Ready once the pool is connected and the revocation mirror loaded (a moment after start).
    wait_until(lambda: shared_server.get("/ready").status == 200, 10, what="ready")
    r = shared_server.get("/ready")
    assert r.status == 200, r
    assert r.header("Content-Type", "").startswith("application/json")


def test_metrics_prometheus_text(shared_server):
    shared_server.get("/health")
    shared_server.get("/no/such/path")
    r = shared_server.get("/metrics")
    assert r.status == 200, r
    assert r.header("Content-Type", "").startswith("text/plain"), r.headers
    text = r.body.decode()
    assert "# TYPE" in text
    for name in (
        "cloudsweep_http_requests_total",
        "cloudsweep_http_request_duration_seconds_bucket",
        "cloudsweep_open_connections",
        "cloudsweep_db_pool_in_use",
        "cloudsweep_db_pool_waiting",
        "cloudsweep_worker_restarts_total",
    ):
        assert re.search(rf"^{name}[{{ ]", text, re.M), f"{name} missing from /metrics:\n{text}"
    health = [
        line for line in text.splitlines()
        if line.startswith("cloudsweep_http_requests_total{")
        and 'route="' in line and 'status="200"' in line and "health" in line
    ]
    assert health and float(health[0].rsplit(" ", 1)[1]) >= 1, text
    assert re.search(r'^cloudsweep_http_requests_total\{[^}]*status="404"', text, re.M), text
    assert re.search(r'^cloudsweep_http_request_duration_seconds_bucket\{[^}]*le="\+Inf"', text, re.M)


# ------------------------------------------------------------------ conventions


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/health", 200),
    ("GET", "/ready", 200),
    ("GET", "/metrics", 200),
    ("GET", "/no/such/path", 404),
    ("POST", "/health", 405),
])
def test_security_headers_and_request_id_on_every_response(shared_server, method, path, status):
    r = shared_server.https(method, path)
    assert r.status == status
    for name, value in SECURITY_HEADERS.items():
        assert r.header(name) == value, f"{name}: {r.header(name)!r}"
    rid = r.header("X-Request-Id")
    assert rid and SANE_ID.match(rid), rid


def test_generated_request_ids_are_unique(shared_server):
    ids = {shared_server.get("/health").header("X-Request-Id") for _ in range(5)}
    assert len(ids) == 5, ids


@pytest.mark.parametrize("sent", ["abc-123", "0f8e4a4e-5b3c-4c7a-9a77-3f6b9d0c1e2a"])
def test_sane_request_id_is_echoed(shared_server, sent):
    r = shared_server.get("/no/such/path", headers={"X-Request-Id": sent})
    assert r.header("X-Request-Id") == sent
    assert r.json()["request_id"] == sent


@pytest.mark.parametrize("sent", [
    "a" * 300,
    "has spaces in it",
    'quo"te',
    "<script>alert(1)</script>",
    "semi;colon,comma",
])
def test_insane_request_id_is_replaced(shared_server, sent):
    r = shared_server.get("/no/such/path", headers={"X-Request-Id": sent})
    rid = r.header("X-Request-Id")
    assert rid and rid != sent, rid
    assert SANE_ID.match(rid), rid
    assert r.json()["request_id"] == rid


def test_unknown_path_is_404(shared_server):
    assert_error_shape(shared_server.get("/no/such/path"), 404, "not_found")


@pytest.mark.parametrize("method,path", [
    ("POST", "/health"),
    ("DELETE", "/ready"),
    ("PUT", "/metrics"),
])
def test_wrong_method_is_405_with_allow(shared_server, method, path):
    r = shared_server.https(method, path)
    assert_error_shape(r, 405, "method_not_allowed")
    allow = [m.strip() for m in (r.header("Allow") or "").split(",")]
    assert "GET" in allow, r.headers


# ------------------------------------------------------------------ limits


def test_url_too_long_is_414(shared_server):
    r = shared_server.get("/" + "a" * 2000)  # max_url_bytes = 1024
    assert_error_shape(r, 414)


def test_url_just_under_the_limit_is_routed(shared_server):
    assert_error_shape(shared_server.get("/" + "a" * 900), 404, "not_found")


@pytest.mark.parametrize("headers", [
    {"X-Big": "b" * 5000},                        # max_header_bytes = 4096
    {f"X-H{i}": "v" for i in range(40)},           # max_headers = 32
], ids=["too-many-bytes", "too-many-fields"])
def test_header_limits_are_431(shared_server, headers):
    with shared_server.raw() as c:
        c.send(request_bytes("GET", "/health", headers))
        r = c.read_response()
    assert_error_shape(r, 431)


def test_body_over_limit_by_content_length_is_413(shared_server):
    with shared_server.raw() as c:
        # Only the head: the answer must come without the server waiting for the body.
        c.send(request_bytes("POST", "/no/such/path", {"Content-Length": "100000",
                                                        "Content-Type": "application/json"}))
        r = c.read_response(timeout=5)
    assert_error_shape(r, 413, "payload_too_large")


def test_body_over_limit_by_chunks_is_413(shared_server):
    with shared_server.raw() as c:
        c.send(request_bytes("POST", "/no/such/path", {"Transfer-Encoding": "chunked",
                                                        "Content-Type": "application/json"}))
        chunk = b"x" * 1500
        r = None
        for _ in range(5):  # 7500 bytes > max_body_bytes = 4096
            try:
                c.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break
            if c.readable(0.2):
                break
        r = c.read_response(timeout=5)
    assert_error_shape(r, 413, "payload_too_large")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_acceptable_body_is_read_then_answered_and_connection_kept(shared_server, chunked):
    body = json.dumps({"k": "v" * 1000}).encode()
    with shared_server.raw() as c:
        if chunked:
            c.send(request_bytes("POST", "/no/such/path", {"Transfer-Encoding": "chunked"})
                   + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        else:
            c.send(request_bytes("POST", "/no/such/path", body=body))
        assert_error_shape(c.read_response(), 404, "not_found")
        # The body was consumed: the next request on the connection parses cleanly.
        c.send(request_bytes("GET", "/health"))
        assert c.read_response().status == 200


def test_expect_100_continue_with_acceptable_length(shared_server):
    body = b'{"hello": "world"}'
    with shared_server.raw() as c:
        c.send(request_bytes("POST", "/no/such/path", {
            "Content-Length": str(len(body)), "Expect": "100-continue"}))
        interim = c.read_response(timeout=5)
        assert interim.status == 100, interim
        assert interim.version == "HTTP/1.1"
        c.send(body)
        assert_error_shape(c.read_response(), 404, "not_found")


def test_expect_100_continue_with_too_large_length_gets_413_without_100(shared_server):
    with shared_server.raw() as c:
        c.send(request_bytes("POST", "/no/such/path", {
            "Content-Length": "100000", "Expect": "100-continue"}))
        r = c.read_response(timeout=5)
    assert r.status != 100, "100 Continue sent for a body that is too large"
    assert_error_shape(r, 413, "payload_too_large")


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Space : y\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Ctl: a\x01b\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
], ids=["garbage", "request-line", "no-colon", "space-in-name", "space-before-colon",
        "control-char",
        "duplicate-content-length", "cl-and-te", "negative-length", "bad-chunk-size"])
def test_malformed_request_is_400_and_closes(shared_server, raw):
    with shared_server.raw() as c:
        c.send(raw)
        r = c.read_response(timeout=5)
        assert_error_shape(r, 400)
        assert c.wait_closed(5), "connection left open after a malformed request"


@pytest.mark.parametrize("raw", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Empty:\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Empty: \r\nX-Other: 1\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Tab:\tv\t\r\n\r\n",
    b"GET /health HTTP/1.1\r\nhost: x\r\naccept: */*\r\n\r\n",
    b"GET /health?probe=1&x= HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
], ids=["empty-value", "empty-value-then-more", "tabs", "lowercase-names", "query-string",
        "zero-length", "empty-chunked-body"])
def test_unusual_but_valid_requests_are_served(shared_server, raw):
    with shared_server.raw() as c:
        c.send(raw)
        r = c.read_response(timeout=5)
        assert r.status == 200, r
        c.send(request_bytes("GET", "/health"))  # and the connection is still in order
        assert c.read_response(timeout=5).status == 200


def test_stalled_head_is_cut_by_header_timeout(shared_server):
    # header_timeout_ms = 1000
    with shared_server.raw() as c:
        t0 = time.monotonic()
        c.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Half: ")
        closed = c.wait_closed(8)
        elapsed = time.monotonic() - t0
        assert closed, "stalled request head still open after 8 s"
        assert 0.5 <= elapsed < 6, elapsed
        if c.buf:
            assert c.buf.startswith(b"HTTP/1.1 408"), c.buf[:200]


def test_slowloris_is_cut_by_total_header_timeout(shared_server):
    # One header byte every 0.3 s never lets a per-byte timer fire; the head as a whole
    # must still be cut after about header_timeout_ms (1000).
    with shared_server.raw() as c:
        t0 = time.monotonic()
        c.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        closed = False
        while time.monotonic() - t0 < 8:
            try:
                c.send(b"X")
            except OSError:
                closed = True
                break
            if c.readable(0.3):
                closed = c.wait_closed(1)
                if closed:
                    break
        elapsed = time.monotonic() - t0
        assert closed, "slowloris connection still open after 8 s"
        assert elapsed < 6, elapsed


def test_handshake_timeout(shared_server):
    # handshake_timeout_ms = 2000: a TCP client that never starts TLS is dropped.
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as s:
        t0 = time.monotonic()
        try:
            data = s.recv(1)
        except (ConnectionResetError, socket.timeout) as e:
            data = e
        assert not isinstance(data, socket.timeout), "no close within 10 s"
        assert time.monotonic() - t0 < 8


@pytest.mark.server_options(idle_timeout_ms=1000)
def test_idle_keepalive_connection_is_closed(server):
    with server.raw() as c:
        c.send(request_bytes("GET", "/health"))
        assert c.read_response().status == 200
        t0 = time.monotonic()
        assert c.wait_closed(8), "idle connection still open after 8 s"
        assert 0.5 <= time.monotonic() - t0 < 6


@pytest.mark.server_options(max_connections_per_ip=4, workers=1)
def test_connections_per_ip_are_limited(server):
    time.sleep(0.2)  # let the server see the start-up health check's connection close
    held = []
    try:
        for _ in range(4):
            c = server.raw()
            c.send(request_bytes("GET", "/health"))
            assert c.read_response().status == 200
            held.append(c)
        # The fifth is refused: the handshake fails, the connection closes, or it is answered
        # with an error status, but it is never served.
        refused = False
        try:
            with server.raw(timeout=5) as extra:
                extra.send(request_bytes("GET", "/health"))
                r = extra.read_response(timeout=5)
                refused = r.status >= 400
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError):
            refused = True
        assert refused, "a fifth connection from one IP was served"
    finally:
        for c in held:
            c.close()

    # The held ones are gone: the same IP is served again.
    def served():
        with server.raw(timeout=3) as c:
            c.send(request_bytes("GET", "/health"))
            return c.read_response(timeout=3).status == 200
    wait_until(served, 5, what="a new connection after the others closed")


# ------------------------------------------------------------------ keep-alive


def test_keepalive_serves_several_requests_on_one_connection(shared_server):
    with shared_server.raw() as c:
        for i in range(5):
            c.send(request_bytes("GET", "/health" if i % 2 == 0 else "/ready",
                                 {"X-Request-Id": f"ka-{i}"}))
            r = c.read_response()
            assert r.status == 200
            assert r.header("X-Request-Id") == f"ka-{i}"
            assert (r.header("Connection") or "").lower() != "close"
        assert not c.eof


def test_pipelined_requests_are_answered_in_order(shared_server):
    reqs = [("/health", 200), ("/no/such/path", 404), ("/ready", 200), ("/health", 200)]
    with shared_server.raw() as c:
        c.send(b"".join(request_bytes("GET", p, {"X-Request-Id": f"pipe-{i}"})
                        for i, (p, _) in enumerate(reqs)))
        for i, (path, status) in enumerate(reqs):
            r = c.read_response()
            assert (r.status, r.header("X-Request-Id")) == (status, f"pipe-{i}"), (path, r)


@pytest.mark.parametrize("raw", [
    request_bytes("GET", "/health", {"Connection": "close"}),
    b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n",
], ids=["connection-close", "http-1.0"])
def test_connection_closes_after_response_when_asked(shared_server, raw):
    with shared_server.raw() as c:
        c.send(raw)
        r = c.read_response()
        assert r.status == 200
        assert (r.header("Connection") or "").lower() == "close"
        assert c.wait_closed(3), "connection still open"


# ------------------------------------------------------------------ database gate


def test_ready_follows_the_database(server, pg_control):
    # The pool connects in the background; a fresh server may take a moment.
    wait_until(lambda: server.get("/ready", timeout=5).status == 200, 10, interval=0.1,
               what="/ready to answer 200 with the DB up")
    pg_control.stop()

    def ready_is_503():
        r = server.get("/ready", timeout=5)
        return r if r.status == 503 else None
    r = wait_until(ready_is_503, 10, interval=0.2, what="/ready to answer 503 with the DB down")
    assert_error_shape(r, 503, "unavailable")
    assert re.fullmatch(r"\d+", r.header("Retry-After") or ""), r.headers
    assert server.get("/health").status == 200, "/health must not depend on the database"

    pg_control.start()
    wait_until(lambda: server.get("/ready", timeout=5).status == 200, 20, interval=0.3,
               what="/ready to return to 200 after the DB came back")


def test_database_over_tcp_with_password_file(server_factory, pg):
    srv = server_factory(options={"db_conninfo": pg.tcp_conninfo,
                                  "db_password_file": pg.password_file})
    wait_until(lambda: srv.get("/ready").status == 200, 10, what="/ready over TCP")


def test_starts_without_database_and_recovers(server_factory, pg_control):
    pg_control.stop()
    srv = server_factory()  # must come up (and answer /health) with the DB down
    r = srv.get("/ready")
    assert_error_shape(r, 503, "unavailable")
    assert r.header("Retry-After")
    pg_control.start()
    wait_until(lambda: srv.get("/ready", timeout=5).status == 200, 20, interval=0.3,
               what="/ready to become 200 once the DB is up")


# ------------------------------------------------------------------ process model


def test_sigterm_drains_in_flight_requests(server_factory):
    srv = server_factory(options={"workers": 1, "shutdown_timeout_ms": 5000,
                                  "body_timeout_ms": 4000})
    # Requests the server is provably in the middle of: the head has been read and the
    # body is still arriving. GET with a body keeps the answer a plain 200 once it is read.
    body = b"0123456789abcdef"
    clients = []
    for i in range(12):
        c = srv.raw()
        path = "/ready" if i % 3 == 0 else "/health"
        c.send(request_bytes("GET", path, {"Content-Length": str(len(body)),
                                           "X-Request-Id": f"drain-{i}"}) + body[:8])
        clients.append(c)
    time.sleep(0.3)
    t0 = time.monotonic()
    srv.kill(signal.SIGTERM)
    time.sleep(0.3)

    # While the drain is on, a new connection is not served.
    try:
        with srv.raw(timeout=2) as late:
            late.send(request_bytes("GET", "/health"))
            late.read_response(timeout=2)
            served = True
    except (OSError, ssl.SSLError, ConnectionError, TimeoutError):
        served = False
    assert not served, "a connection opened after SIGTERM was served"

    results = []
    for i, c in enumerate(clients):
        try:
            c.send(body[8:])
            r = c.read_response(timeout=10)
            results.append((r.status, r.header("X-Request-Id")))
            assert c.wait_closed(3), "connection kept open during the drain"
        except (OSError, ConnectionError, TimeoutError) as e:
            results.append((repr(e), f"drain-{i}"))
        finally:
            c.close()
    assert results == [(200, f"drain-{i}") for i in range(12)], results

    rc = srv.proc.wait(timeout=15)
    assert rc == 0, f"exit status {rc}\n{srv.diagnostics()}"
    assert time.monotonic() - t0 < 5 + 3, "drain took longer than shutdown_timeout_ms"


def test_sigterm_with_idle_keepalive_connections_exits_promptly(server_factory):
    srv = server_factory(options={"workers": 1, "shutdown_timeout_ms": 5000,
                                  "idle_timeout_ms": 60000})
    idle = []
    for _ in range(3):
        c = srv.raw()
        c.send(request_bytes("GET", "/health"))
        assert c.read_response().status == 200
        idle.append(c)
    t0 = time.monotonic()
    srv.kill(signal.SIGTERM)
    rc = srv.proc.wait(timeout=15)
    assert rc == 0
    assert time.monotonic() - t0 < 5 + 2
    for c in idle:
        assert c.wait_closed(2)
        c.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_worker_is_replaced(server_factory, workers):
    srv = server_factory(options={"workers": workers})
    before = wait_until(lambda: len(srv.workers()) == workers and srv.workers(), 10,
                        what=f"{workers} worker processes")
    time.sleep(0.5)  # past start-up: this is about a worker dying in service
    victim = before[0]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        now = srv.workers()
        return len(now) == workers and victim not in now and now
    after = wait_until(replaced, 10, what="a replacement worker")
    assert set(after) - set(before), after
    wait_until(lambda: srv.get("/health", timeout=3).status == 200, 10, what="/health again")
    for _ in range(10):
        assert srv.get("/health", timeout=5).status == 200

    def restarts():
        vals = metric_values(srv.get("/metrics").body.decode(),
                             "cloudsweep_worker_restarts_total")
        return vals and vals[0] >= 1
    wait_until(restarts, 5, what="cloudsweep_worker_restarts_total >= 1")
    # Every worker reports the same instance-wide number.
    for _ in range(6):
        assert restarts(), "some worker reports cloudsweep_worker_restarts_total < 1"


def test_sighup_reloads_log_level(server_factory):
    srv = server_factory(options={"log_level": "info"})
    srv.get("/health")
    assert not [x for x in srv.log_lines() if isinstance(x, dict) and x.get("level") == "debug"]
    srv.write_conf(log_level="debug")
    srv.kill(signal.SIGHUP)

    def debug_lines():
        srv.get("/health")
        return [x for x in srv.log_lines() if isinstance(x, dict) and x.get("level") == "debug"]
    wait_until(debug_lines, 10, interval=0.2, what="debug log lines after SIGHUP")
    assert srv.proc.poll() is None


def test_debug_flag_enables_debug_logging(server_factory):
    srv = server_factory(options={"log_level": "warn"}, args=["-d"])
    srv.get("/health")
    wait_until(lambda: [x for x in srv.log_lines()
                        if isinstance(x, dict) and x.get("level") == "debug"], 5,
               what="debug log lines with -d")


def test_pid_file_holds_the_master_pid(server):
    assert int(server.pid_file.read_text().strip()) == server.pid


# ------------------------------------------------------------------ command line and config


def run_cli(args, env=None, timeout=30):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([str(BINARY)] + args, capture_output=True, text=True,
                          timeout=timeout, env=e)


def test_version():
    r = run_cli(["version"])
    assert r.returncode == 0, r
    assert re.search(r"\d+\.\d+\.\d+", r.stdout + r.stderr), r


def test_check_config_good(server_factory):
    srv = server_factory(start=False)
    r = run_cli(["-n", "-c", str(srv.conf)])
    assert r.returncode == 0, (r.stdout, r.stderr)


@pytest.mark.parametrize("key,value", [
    ("bogus_key", "1"),
    ("port", "abc"),
    ("port", "70000"),
    ("max_body_bytes", "12x"),
    ("workers", "-1"),
    ("log_level", "loud"),
    ("tls_cert_file", "/nonexistent/cert.pem"),
    ("tls_key_file", "/nonexistent/key.pem"),
])
def test_check_config_bad_value_names_the_key(server_factory, key, value):
    srv = server_factory(start=False)
    srv.write_conf(**{key: value})
    r = run_cli(["-n", "-c", str(srv.conf)])
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert key in (r.stdout + r.stderr), (r.stdout, r.stderr)


def test_check_config_bad_environment_value_names_the_key(server_factory):
    srv = server_factory(start=False)
    r = run_cli(["-n", "-c", str(srv.conf)], env={"CLOUDSWEEP_MAX_HEADERS": "many"})
    assert r.returncode != 0
    assert "max_headers" in (r.stdout + r.stderr).lower(), (r.stdout, r.stderr)


def test_check_config_missing_required_tls_file(server_factory):
    srv = server_factory(start=False)
    del srv.options["tls_key_file"]
    srv.write_conf()
    r = run_cli(["-n", "-c", str(srv.conf)])
    assert r.returncode != 0
    assert "tls_key_file" in r.stdout + r.stderr


@pytest.mark.parametrize("where", ["file", "env", "cli"])
def test_port_precedence_cli_over_env_over_file(server_factory, where):
    file_port, env_port, cli_port = free_port(), free_port(), free_port()
    env = {"CLOUDSWEEP_PORT": str(env_port)} if where in ("env", "cli") else {}
    args = ["--port", str(cli_port)] if where == "cli" else []
    srv = server_factory(options={"port": file_port}, env=env, args=args, start=False)
    srv.port = {"file": file_port, "env": env_port, "cli": cli_port}[where]
    srv.start()
    assert srv.get("/health").status == 200


# ------------------------------------------------------------------ access log


def test_access_log_one_json_line_per_request_without_secrets(server):
    secret_token = "tok-SECRET-9f8e7d6c5b4a"
    secret_cookie = "cookie-SECRET-1a2b3c4d"
    r = server.get("/no/such/path", headers={
        "X-Request-Id": "log-test-1",
        "Authorization": f"Bearer {secret_token}",
        "Cookie": f"cs_access={secret_cookie}; cs_csrf=csrf-SECRET-77",
    })
    assert r.status == 404
    server.get("/health", headers={"X-Request-Id": "log-test-2"})

    def access_lines():
        lines = [x for x in server.log_lines()
                 if isinstance(x, dict) and x.get("request_id") in ("log-test-1", "log-test-2")
                 and "status" in x]
        return lines if len(lines) >= 2 else None
    lines = wait_until(access_lines, 5, what="access log lines")
    by_id = {}
    for x in lines:
        by_id.setdefault(x["request_id"], []).append(x)
    assert all(len(v) == 1 for v in by_id.values()), by_id
    first = by_id["log-test-1"][0]
    assert first.get("method") == "GET", first
    assert first.get("path") == "/no/such/path", first
    assert first.get("status") == 404, first
    assert any(k.startswith("duration") for k in first), first
    assert by_id["log-test-2"][0].get("status") == 200

    text = server.log.read_text() + server.stderr.read_text()
    for secret in (secret_token, secret_cookie, "csrf-SECRET-77"):
        assert secret not in text, f"{secret} leaked into the log"
    non_json = [x for x in server.log_lines() if not isinstance(x, dict)]
    assert not non_json, f"log lines that are not JSON objects: {non_json[:5]}"


# ------------------------------------------------------------------ concurrency smoke


def test_concurrent_clients(shared_server):
    errors = []

    def client(n):
        try:
            with shared_server.raw() as c:
                for i in range(10):
                    c.send(request_bytes("GET", "/ready" if i % 3 == 0 else "/health"))
                    r = c.read_response()
                    if r.status != 200:
                        errors.append((n, i, r.status))
        except Exception as e:  # noqa: BLE001
            errors.append((n, repr(e)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
