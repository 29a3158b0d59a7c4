#!/usr/bin/env python3
"""The reboot storm of BENCHMARKS.md ("Reboot storm"), side by side: this build's server and
an older one (--old), alternating, each pinned to CPU 0 with taskset, the client (this
build's `bench --mode storm --cpu 1`) on CPU 1, an ECDSA P-256 certificate, 1,000,000
records made by `fill` in every database.

Usage: scripts/bench_storm.py [--new BIN] [--old BIN] [--runs 3] [--shapes 10000x2,5000x4]
                              [--retry-after 30] [--server-cpu-share 0.4]
                              [--out bench-results/storm]

--server-cpu-share F gives the server only F of its core (a CPU cgroup's quota, in 10 ms
periods; needs root and a cgroup v1 or v2 CPU controller), so that the client, which spends
more CPU per call than the server (it verifies two ECDSA signatures per handshake, the server
makes one), keeps up with it: on a two-core machine a client on one core cannot play 10,000
nodes as fast as a whole server core answers them, and its slowness then shows up as the
server's failures (connections waiting on the client, closed to make room). The bound scales
with it: 1.15 x (calls x CPU per unseal) / F, plus one retry interval.

After each storm, the same server measures its CPU per fresh-connection unseal (c=8), the
unit of the issue's target: every volume unsealed within 1.15 x (calls x that) plus one
retry interval, and of a figure both builds have: the share of the server's CPU beyond what
the needed unseals cost (an older build has no talos_kms_connection_busy_seconds). Writes one JSON line per storm to OUT/storm.jsonl, each storm's timeline to
OUT/<build>-<shape>-<run>.csv, and the plot OUT/storm.svg (scripts/storm_plot.py).
Everything runs on loopback (nodes from 127.1.0.0/16), in a temporary directory removed at
the end.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_suite as suite  # noqa: E402

POLICY = suite.UNLIMITED


def allocated(storm):
    """The anonymous part of the peak, where the build reports it (older ones do not)."""
    peak = storm.get("server_peak_anonymous_mib")
    return "" if peak is None else f" (allocated {peak:.1f} MiB at most)"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, work, cert, database):
        self.port, self.metrics = free_port(), free_port()
        config = os.path.join(work, "storm.yaml")
        with open(config, "w") as f:
            f.write(f"database: {database}\nserverCertFile: {cert[0]}\nserverKeyFile: {cert[1]}\n"
                    f"port: {self.port}\nbindAddress: 127.0.0.1\nkmsLogLevel: WARN\n"
                    f"rootLogLevel: WARNING\nmetricsAddress: 127.0.0.1:{self.metrics}\n{POLICY}")
        self.proc = subprocess.Popen(["taskset", "-c", "0", binary, "--config", config],
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{binary} did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


class CpuShare:
    """A CPU cgroup holding a process to `share` of one core."""

    PERIOD_US = 10_000

    def __init__(self, share, pid):
        name = f"tks-storm-{os.getpid()}"
        quota = int(self.PERIOD_US * share)
        v2 = "/sys/fs/cgroup/cgroup.controllers"
        if os.path.exists(v2) and "cpu" in open(v2).read().split():
            self.path = os.path.join("/sys/fs/cgroup", name)
            os.makedirs(self.path, exist_ok=True)
            self.write("cpu.max", f"{quota} {self.PERIOD_US}")
        else:
            self.path = os.path.join("/sys/fs/cgroup/cpu", name)
            os.makedirs(self.path, exist_ok=True)
            self.write("cpu.cfs_period_us", self.PERIOD_US)
            self.write("cpu.cfs_quota_us", quota)
        self.write("cgroup.procs", pid)

    def write(self, name, value):
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def remove(self):
        """After its process exited."""
        try:
            os.rmdir(self.path)
        except OSError as e:
            print(f"cgroup {self.path} left behind: {e}", file=sys.stderr)


def bench(new, server, ca, *args):
    out = subprocess.run([new, "bench", "--endpoint", f"https://127.0.0.1:{server.port}", "--ca", ca,
                          "--server-pid", str(server.proc.pid), "--cpu", "1", "--output", "json",
                          *map(str, args)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser()
    root = suite.ROOT
    parser.add_argument("--new", default=suite.BIN)
    parser.add_argument("--old")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shapes", default="10000x2,5000x4")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--retry-after", default="30")
    parser.add_argument("--server-cpu-share", type=float, default=None)
    parser.add_argument("--out", default=os.path.join(root, "bench-results", "storm"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    builds = [("new", args.new)] + ([("old", args.old)] if args.old else [])
    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
    work = tempfile.mkdtemp(prefix="storm-")
    results = open(os.path.join(args.out, "storm.jsonl"), "a")
    try:
        cert = suite.make_cert(work, "p256", ["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
        ca = os.path.join(work, "ca.pem")
        base = os.path.join(work, "base.db")
        # The oldest build fills it: a newer one migrates an older schema, not the reverse.
        subprocess.run([args.old or args.new, "fill", "--database", base, "--records", str(args.records)],
                       check=True, capture_output=True)
        for run in range(1, args.runs + 1):
            for nodes, volumes in shapes:
                # Alternate which build goes first, so that drift favours neither.
                order = builds if run % 2 else list(reversed(builds))
                for name, binary in order:
                    database = os.path.join(work, f"{name}.db")
                    shutil.copyfile(base, database)
                    server = Server(binary, work, cert, database)
                    share = args.server_cpu_share and CpuShare(args.server_cpu_share, server.proc.pid)
                    load_before = open("/proc/loadavg").read().split()[0]
                    try:
                        timeline = os.path.join(args.out, f"{name}-{nodes}x{volumes}-{run}.csv")
                        storm = bench(args.new, server, ca, "--mode", "storm", "--nodes", nodes,
                                      "--volumes", volumes, "--retry-after", args.retry_after,
                                      "--metrics", f"127.0.0.1:{server.metrics}",
                                      "--timeline", timeline)
                        unit = bench(args.new, server, ca, "--mode", "unseal", "--requests", 4000,
                                     "--concurrency", 8, "--nodes", 200)
                    finally:
                        server.stop()
                        if share:
                            share.remove()
                        for suffix in ("", "-wal", "-shm"):
                            if os.path.exists(database + suffix):
                                os.remove(database + suffix)
                    calls_needed = nodes * volumes
                    core = args.server_cpu_share or 1.0
                    bound = 1.15 * calls_needed * unit["server_cpu_us_per_call"] / 1e6 / core
                    # Comparable across builds (an older one has no metric of its own): the
                    # server's CPU beyond what the needed unseals cost at normal load.
                    needed_s = calls_needed * unit["server_cpu_us_per_call"] / 1e6
                    # The machine may be shared: how busy it was, and how much of its core
                    # the server had while the storm lasted.
                    storm.update(load_before=float(load_before),
                                 load_after=float(open("/proc/loadavg").read().split()[0]),
                                 server_core_share=storm["server_cpu_s"] / storm["time_to_all_unsealed_s"])
                    storm.update(build=name, run=run, server_cpu_share_given=core, timeline=os.path.basename(timeline),
                                 unseal_cpu_us=unit["server_cpu_us_per_call"],
                                 target_s=bound + float(args.retry_after),
                                 beyond_needed_share=max(0.0, 1 - needed_s / storm["server_cpu_s"]))
                    results.write(json.dumps(storm) + "\n")
                    results.flush()
                    failed = storm.get("failed_cpu_share")
                    print(f"{name} {nodes}x{volumes} run {run}: all unsealed in "
                          f"{storm['time_to_all_unsealed_s']:.1f} s (target {storm['target_s']:.1f} s); "
                          f"{storm['calls']} calls, {storm['timeouts']} past deadline, "
                          f"{storm['retries']} retries, errors {storm['errors']}; server CPU "
                          f"{storm['server_cpu_s']:.1f} s, on failed calls "
                          f"{'-' if failed is None else f'{failed * 100:.1f} %'} (beyond the needed "
                          f"unseals {storm['beyond_needed_share'] * 100:.1f} %); peak RSS "
                          f"{storm['server_peak_rss_mib']:.1f} MiB{allocated(storm)}; "
                          f"mismatches {storm['mismatches']}; "
                          f"unseal {unit['server_cpu_us_per_call']:.0f} µs; client CPU "
                          f"{storm['client_cpu_s']:.1f} s; load {storm['load_before']}→{storm['load_after']}",
                          flush=True)
    finally:
        results.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
