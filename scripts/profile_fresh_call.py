#!/usr/bin/env python3
"""Where a fresh-connection unseal's server CPU goes beyond a bare TLS handshake's
(BENCHMARKS.md, "Issue 27 §3"): `perf record` of a server pinned to CPU 0 during 5 s of bare
handshakes and then 5 s of fresh unseals (`bench` at c=8 on CPU 1), every sampled symbol put
in a group (kernel, h2, hyper, tonic and the http types, SQLite, malloc, ...) and each group
given in µs of server CPU per call. perf's own cost inflates every figure alike; compare
groups, not absolute values.

Usage: scripts/profile_fresh_call.py [--binary BIN]   (needs perf: Debian's linux-perf)
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_suite as suite  # noqa: E402

# First match wins; a symbol of none of them is "other".
GROUPS = [
    ("kernel", None),
    ("h2 (HTTP/2 framing, HPACK, streams)", r"h2::"),
    ("hyper", r"hyper::|hyper_util"),
    ("tonic, tower, http types, prost", r"tonic|tower|http::|http_body|prost"),
    ("bytes", r"bytes::"),
    ("SQLite", r"sqlite3|pcache|[bB]tree|[vV]dbe|unixShm"),
    ("malloc and free", r"malloc|free|_int_|unlink_chunk|realloc|calloc|tcache"),
    ("memcpy, memset", r"mem(move|cpy|set|cmp)"),
    ("rustls", r"rustls"),
    ("tokio", r"tokio|mio::|parking_lot"),
    ("crypto (aws-lc)", r"aws_lc|curve25519|nistz256|sha|[kK]eccak|bignum|aes|gcm|ecp_|HMAC|mlk"),
    ("this server", r"talos_kms_server"),
]


def group_of(kind, symbol):
    if kind == "[k]":
        return "kernel"
    for name, pattern in GROUPS[1:]:
        if re.search(pattern, symbol):
            return name
    return "other"


def profile(data):
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym", "-q",
                             "--percent-limit", "0", "--stdio"],
                            capture_output=True, text=True, check=True).stdout
    shares = collections.Counter()
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\[.\])\s+(.*)", line)
        if match:
            shares[group_of(match.group(2), match.group(3))] += float(match.group(1)) / 100
    return shares


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=suite.BIN)
    opts = parser.parse_args()
    if not shutil.which("perf"):
        sys.exit("perf is needed: apt-get install linux-perf")
    work = tempfile.mkdtemp(prefix="kms-profile-")
    try:
        cert = suite.make_cert(work, "server", ["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
        ca = os.path.join(work, "ca.pem")
        server = suite.Server(work, cert, os.path.join(work, "kms.db"), binary=opts.binary, cpus="0")
        # Warms up and seals the volumes the unseals read.
        suite.bench(server, ca, "--mode", "unseal", "--concurrency", 8, "--duration", 1, "--nodes", 1000,
                    cpus="1")
        per_call, shares = {}, {}
        for mode in ("handshake", "unseal"):
            data = os.path.join(work, mode + ".data")
            recording = subprocess.Popen(["perf", "record", "-F", "4999", "-o", data, "-p",
                                          str(server.proc.pid), "--", "sleep", "5"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            nodes = ["--nodes", 1000] if mode == "unseal" else []
            result = suite.bench(server, ca, "--mode", mode, "--concurrency", 8, "--duration", 6, *nodes,
                                 cpus="1")
            recording.wait()
            per_call[mode] = result["server_cpu_us_per_call"]
            shares[mode] = profile(data)
        server.stop()
        print(f"server CPU per call under perf: handshake {per_call['handshake']:.0f} µs, "
              f"fresh unseal {per_call['unseal']:.0f} µs ({per_call['unseal'] / per_call['handshake']:.2f}x)")
        print(f"{'µs per call':40s} {'handshake':>10s} {'unseal':>10s} {'difference':>11s}")
        for name in [name for name, _ in GROUPS] + ["other"]:
            handshake = shares["handshake"][name] * per_call["handshake"]
            unseal = shares["unseal"][name] * per_call["unseal"]
            print(f"{name:40s} {handshake:10.1f} {unseal:10.1f} {unseal - handshake:+11.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
