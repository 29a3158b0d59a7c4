#!/usr/bin/env python3
"""Server CPU per durable seal against CPU per unseal, fresh connections, c=32, for one or
more builds side by side (issue 27 §1). Each server is pinned to CPU 0 and `bench` to CPU 1;
the builds and modes alternate, REPS times (default 5).

    scripts/bench_seal_cost.py before=/path/to/old/binary this=target/release/talos-kms-server

With --postgres, each build stores into a database of its own on a throwaway PostgreSQL
cluster (pinned to CPU 0 with the servers), and PostgreSQL's CPU per call is shown too.
"""
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_suite as suite  # noqa: E402


def main():
    postgres = "--postgres" in sys.argv
    builds = dict(arg.split("=", 1) for arg in sys.argv[1:] if arg != "--postgres")
    if not builds:
        sys.exit(__doc__)
    reps = int(os.environ.get("REPS", "5"))
    work = tempfile.mkdtemp(prefix="seal-cost-")
    cert = suite.make_cert(work, "server", ["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
    ca = os.path.join(work, "ca.pem")
    pg = suite.Postgres(work) if postgres else None
    if pg:
        pg.pin({0})
    servers = {name: suite.Server(work, cert, pg.database(name) if pg else os.path.join(work, f"{name}.db"),
                                  binary=path, cpus="0")
               for name, path in builds.items()}

    def measured(server, *args):
        pg_before = pg.cpu_s() if pg else 0
        record = suite.bench(server, ca, *args, cpus="1")
        if pg:
            record["pg_cpu_us_per_call"] = (pg.cpu_s() - pg_before) * 1e6 / max(1, record["calls_ok"])
        return record

    try:
        runs = {name: {"seal": [], "unseal": []} for name in builds}
        for _ in range(reps):
            for name, server in servers.items():
                for mode in ("seal", "unseal"):
                    extra = ["--nodes", 1000] if mode == "unseal" else []
                    runs[name][mode].append(measured(server, "--mode", mode, "--concurrency", 32,
                                                     "--duration", 4, *extra))
        lone = {name: [suite.bench(server, ca, "--mode", "seal", "--concurrency", 1, "--duration", 3,
                                   cpus="1")["latency"]["p50_us"] for _ in range(2)]
                for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
        if pg:
            pg.stop()
    pg_columns = " PostgreSQL's CPU per seal | PostgreSQL's CPU per unseal |" if pg else ""
    print(f"| build | CPU per seal | CPU per unseal | seal / unseal CPU (runs) | seals / unseals per s (runs) "
          f"| p50 of one sealer |{pg_columns}")
    print("|---|---|---|---|---|---|" + ("---|---|" if pg else ""))
    for name in builds:
        seal, unseal = runs[name]["seal"], runs[name]["unseal"]
        cpu = [s["server_cpu_us_per_call"] / u["server_cpu_us_per_call"] for s, u in zip(seal, unseal)]
        rate = [s["calls_per_s"] / u["calls_per_s"] for s, u in zip(seal, unseal)]
        print(f"| {name} | {statistics.median(s['server_cpu_us_per_call'] for s in seal):.0f} µs "
              f"| {statistics.median(u['server_cpu_us_per_call'] for u in unseal):.0f} µs "
              f"| **{statistics.median(cpu):.3f}x** ({', '.join(f'{r:.2f}' for r in cpu)}) "
              f"| **{statistics.median(rate):.3f}** ({', '.join(f'{r:.2f}' for r in rate)}) "
              f"| {statistics.median(lone[name]) / 1000:.2f} ms |"
              + (f" {statistics.median(s['pg_cpu_us_per_call'] for s in seal):.0f} µs "
                 f"| {statistics.median(u['pg_cpu_us_per_call'] for u in unseal):.0f} µs |" if pg else ""))


if __name__ == "__main__":
    main()
