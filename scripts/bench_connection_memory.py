#!/usr/bin/env python3
"""The server's resident memory per open connection, at the two stages a reboot storm holds
connections in (BENCHMARKS.md, "The storm with a client that keeps up"): accepted and waiting
for a ClientHello, and with TLS done and HTTP/2 started. Holds N connections of each kind
(default 800) on a server on loopback and prints its VmRSS before, during and after.

    scripts/bench_connection_memory.py [BINARY] [N]
"""
import os
import socket
import ssl
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_suite as suite  # noqa: E402


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else suite.BIN
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 800
    work = tempfile.mkdtemp(prefix="connection-memory-")
    cert = suite.make_cert(work, "server", ["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
    # Long enough that no held connection is closed as idle while it is measured.
    server = suite.Server(work, cert, os.path.join(work, "kms.db"), binary=binary, cpus="0",
                          policy=suite.UNLIMITED + "idleTimeout: 120s\n")

    def rss_mib():
        return server.rss_kib() / 1024

    def held(connect, stage):
        """Holds `count` connections made by `connect`; prints what each added to RSS."""
        before = rss_mib()
        connections = [connect() for _ in range(count)]
        time.sleep(1)
        during = rss_mib()
        print(f"{count} {stage}: {during:.1f} MiB ({(during - before) * 1024 / count:.1f} KiB each)")
        for connection in connections:
            connection.close()
        time.sleep(1)

    def plain():
        return socket.create_connection(("127.0.0.1", server.port))

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])

    try:
        print(f"idle: {rss_mib():.1f} MiB")
        held(plain, "accepted, no ClientHello")
        # Measured from what the first set left behind, which the allocator keeps.
        held(lambda: context.wrap_socket(plain()), "with TLS done and HTTP/2 started")
        print(f"after: {rss_mib():.1f} MiB, peak {server.rss_kib('VmHWM') / 1024:.1f} MiB")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
