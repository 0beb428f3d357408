#!/usr/bin/python3
"""Hold N idle keep-alive TLS 1.3 connections to a running cloudsweepd and
report the workers' resident memory per connection.

usage: contrib/bench/idle.py PORT [N]   (the master pid is read from pgrep)
"""
import os
import selectors
import socket
import ssl
import subprocess
import sys
import time


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def worker_pids(port):
    out = subprocess.run(["pgrep", "-f", "cloudsweepd"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    return [p for p in pids if open(f"/proc/{p}/stat").read().split()[3] in map(str, pids)]


def main():
    port = int(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1024, n + 1024))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    pids = worker_pids(port)
    before = rss_kib(pids)
    conns = []
    req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        t = ctx.wrap_socket(s)
        t.sendall(req)
        t.recv(4096)
        conns.append(t)
    time.sleep(3)  # past the server's 2 s idle trim
    after = rss_kib(pids)
    print(f"{n} idle TLS connections: workers RSS {before} KiB -> {after} KiB, "
          f"{(after - before) / n:.1f} KiB per connection")
    for t in conns:
        t.close()


if __name__ == "__main__":
    main()
