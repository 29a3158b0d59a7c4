#!/usr/bin/env python3
"""Runs every measurement of BENCHMARKS.md against a release build on this machine.

Usage: scripts/bench_suite.py [--quick] [--out bench-results] [--runs N]
                              [--reference KMS_SERVER [--only-reference]]
                              [--baseline OLD_BINARY [--only-baseline]]
                              [--only-refused]
                              [--database {sqlite,postgres,both} [--only-database]]

--baseline measures a build of this server from before a change (e.g. `git worktree add
/tmp/before HEAD~1 && cargo build --release` there) side by side with this one: server CPU per
fresh-connection call, alternating, the way the request path's cost is checked.

--database chooses the store of the suite's servers: sqlite (the default), postgres (a
throwaway PostgreSQL cluster started here, as tests/common/postgres.rs starts one: initdb and
postgres from the machine's PostgreSQL, in the work directory, on loopback, as `nobody` when
run as root, stopped and removed at the end), or both: the suite on SQLite, and the
comparison of the two stores (issue 16) side by side, alternating: durable seals and unseals
at concurrency 32 and fresh unseals at concurrency 8, on fresh connections, two servers of
this build on the same 1,000 volumes, with PostgreSQL's own CPU per call; then the fresh
unseals again with both servers started on one core and the client and PostgreSQL on the
others.
--only-database measures only that comparison (with --database both).

--only-refused measures only what a connection refused by the allow-lists (closed before TLS)
costs the server, against a bare TLS handshake on the same server (also part of a full run).

Writes one JSON line per `bench` run to OUT/results.jsonl (with the experiment's name and
parameters added), a summary of the targets to OUT/summary.md, and the plots (through
scripts/bench_plot.py). Everything runs on loopback; servers and files live in a temporary
directory that is removed at the end.
"""
import argparse
import base64
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "talos-kms-server")


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def make_cert(work, name, keygen):
    """A CA-signed server certificate for 127.0.0.1 with the key `keygen` makes."""
    ca_key, ca = os.path.join(work, "ca.key"), os.path.join(work, "ca.pem")
    if not os.path.exists(ca):
        sh("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ca_key)
        sh("openssl", "req", "-x509", "-new", "-key", ca_key, "-subj", "/CN=bench CA", "-days", "30", "-out", ca)
    key, csr, crt = (os.path.join(work, f"{name}.{ext}") for ext in ("key", "csr", "crt"))
    sh("openssl", *keygen, "-out", key)
    sh("openssl", "req", "-new", "-key", key, "-subj", "/CN=127.0.0.1", "-out", csr)
    ext = os.path.join(work, "ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    sh("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
       "-days", "30", "-extfile", ext, "-out", crt)
    chain = os.path.join(work, f"{name}.chain")
    with open(chain, "w") as f:
        f.write(open(crt).read() + open(ca).read())
    return chain, key


class Listening:
    """A server process on loopback, with the port it listens on."""

    def start(self, argv):
        self.proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited ({self.proc.returncode}) before listening")
            self.port = listening_port(self.proc.pid)
            if self.port:
                return
            time.sleep(0.002)
        raise RuntimeError(f"{argv[0]} did not start listening")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


# A benchmark is one address making thousands of calls a second: far above what the default
# rate limits and quotas let one address do (README, "Policy"). Builds from before the policy
# keys existed get no policy lines (they refuse the unknown keys; see `against_baseline`).
UNLIMITED = ("rateLimitPerAddress: {perSecond: 0}\nrateLimitGlobal: {perSecond: 0}\n"
             "maxNewRecordsPerHour: 0\nmaxConnectionsPerAddress: 4096\n")
# The policy configured but never reached: allow-lists and token buckets evaluated per call.
CONFIGURED = ('sealAllowedNetworks: ["127.0.0.0/8", "::1"]\nunsealAllowedNetworks: ["127.0.0.0/8", "::1"]\n'
              "rateLimitPerAddress: {perSecond: 1000000, burst: 1000000}\n"
              "rateLimitGlobal: {perSecond: 1000000, burst: 1000000}\n"
              "maxNewRecordsPerHour: 100000000\nmaxConnectionsPerAddress: 4096\n")


class Server(Listening):
    """`database` is an SQLite path, or a `Postgres.Database` (a URL and its config lines)."""

    def __init__(self, work, cert, database, log_level="WARN", cpus=None, binary=BIN, policy=UNLIMITED):
        if isinstance(database, Postgres.Database):
            name, store = database.name, f'database: "{database.url}"\n{database.config}'
        else:
            name, store = os.path.basename(database), f"database: {database}\n"
        self.config = os.path.join(work, name + ".yaml")
        with open(self.config, "w") as f:
            f.write(f"{store}serverCertFile: {cert[0]}\nserverKeyFile: {cert[1]}\n"
                    f"port: 0\nbindAddress: 127.0.0.1\nkmsLogLevel: {log_level}\nrootLogLevel: WARNING\n"
                    f"{policy}")
        started = time.monotonic()
        # The "serving" line is logged at INFO; WARN configs print nothing, so probe the port.
        self.start(pinned(cpus) + [binary, "--config", self.config])
        self.startup_s = time.monotonic() - started

    def rss_kib(self, field="VmRSS"):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return None


class ReferenceServer(Listening):
    """The reference server of the makers of Talos (siderolabs/kms-client cmd/kms-server),
    built separately (see BENCHMARKS.md), serving the same certificate with TLS."""

    def __init__(self, binary, work, cert):
        key = os.path.join(work, "reference-master.key")
        with open(key, "wb") as f:
            f.write(os.urandom(32))
        self.start([binary, "--kms-api-endpoint", "127.0.0.1:0", "--key-path", key,
                    "--tls-enable", "--tls-cert-path", cert[0], "--tls-key-path", cert[1]])


class Postgres:
    """A throwaway PostgreSQL cluster, started as tests/common/postgres.rs starts one: `initdb`
    and `postgres` from the machine's PostgreSQL (Debian's `postgresql` package), in a
    directory of `work`, listening on 127.0.0.1 only, role `kms` with password
    authentication (scram-sha-256) over TCP; as `nobody` when run as root (initdb refuses
    root). Every wait is bounded; `stop` shuts it down (fast) and removes nothing else."""

    # The tests' settings; everything else is PostgreSQL's default (fsync and
    # synchronous_commit on: a seal is durable before it is answered).
    SETTINGS = ["listen_addresses=127.0.0.1", "max_connections=100", "shared_buffers=32MB"]
    # What `settings` reports, besides the version.
    SHOWN = ["shared_buffers", "max_connections", "fsync", "synchronous_commit", "wal_sync_method",
             "full_page_writes", "wal_level", "commit_delay", "max_wal_size", "checkpoint_timeout",
             "work_mem", "autovacuum"]

    class Database:
        """A database of the cluster as a server's config names it."""

        def __init__(self, name, url, config):
            self.name, self.url, self.config = name, url, config

    def __init__(self, work):
        self.proc = None
        self.bin = self.find_bin()
        if self.bin is None:
            raise RuntimeError("no initdb and postgres binaries found: install PostgreSQL "
                               "(Debian: apt-get install postgresql)")
        self.owner = None
        self.dir = tempfile.mkdtemp(prefix="pg-", dir=work)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self.owner = (nobody.pw_uid, nobody.pw_gid)
            # `nobody` must reach its directory; nothing in `work` becomes listable.
            os.chmod(work, 0o711)
            os.chown(self.dir, *self.owner)
        self.work = work
        password = secrets.token_hex(16)
        pwfile = os.path.join(self.dir, "pwfile")
        self.write_owned(pwfile, password + "\n")
        # The servers read the password from a file of their own (`passwordFile`).
        self.password_file = os.path.join(work, "pg-password")
        with open(os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(password + "\n")
        self.data = os.path.join(self.dir, "data")
        self.run("initdb", "-D", self.data, "-U", "postgres", "--auth-local=trust",
                 "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", f"--pwfile={pwfile}")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = os.path.join(self.dir, "postgres.log")
        self.write_owned(self.log, "")
        argv = [os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port), "-k", self.dir]
        for setting in self.SETTINGS:
            argv += ["-c", setting]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=log, cwd=self.dir, **self.as_owner())
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}): {self.log_tail()}")
            ready = subprocess.run([os.path.join(self.bin, "pg_isready"), "-h", self.dir, "-p", str(self.port),
                                    "-U", "postgres", "-d", "postgres"], capture_output=True,
                                   cwd=self.dir, **self.as_owner())
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not accept connections within 60 s: {self.log_tail()}")
            time.sleep(0.1)
        self.sql("postgres", f"CREATE ROLE kms LOGIN PASSWORD '{password}'")

    @staticmethod
    def find_bin():
        candidates = []
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
            if out.returncode == 0:
                candidates.append(out.stdout.strip())
        except FileNotFoundError:
            pass
        if os.path.isdir("/usr/lib/postgresql"):
            candidates += [os.path.join("/usr/lib/postgresql", v, "bin")
                           for v in sorted(os.listdir("/usr/lib/postgresql"), key=lambda v: (len(v), v), reverse=True)]
        candidates += os.environ.get("PATH", "").split(os.pathsep)
        for directory in candidates:
            if all(os.path.isfile(os.path.join(directory, p)) for p in ("initdb", "postgres", "pg_isready", "psql")):
                return directory
        return None

    def as_owner(self):
        env = {"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if self.owner is None:
            return {"env": env}
        return {"env": env, "user": self.owner[0], "group": self.owner[1], "extra_groups": []}

    def write_owned(self, path, text):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)
        if self.owner:
            os.chown(path, *self.owner)

    def run(self, program, *args):
        out = subprocess.run([os.path.join(self.bin, program), *args], capture_output=True, text=True,
                             cwd=self.dir, **self.as_owner())
        if out.returncode != 0:
            raise RuntimeError(f"{program} failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def sql(self, database, sql):
        """Runs SQL as the superuser, over the Unix socket."""
        return self.run("psql", "-h", self.dir, "-p", str(self.port), "-U", "postgres", "-d", database,
                        "-v", "ON_ERROR_STOP=1", "-At", "-c", sql)

    def database(self, name):
        """A new database owned by `kms`, for a server whose config is named `name`."""
        db = re.sub(r"[^a-z0-9_]", "_", name.lower())
        self.sql("postgres", f"CREATE DATABASE {db} OWNER kms")
        # sslmode=disable: loopback, as the tests connect; the store pool at its default size.
        return Postgres.Database(name, f"postgres://kms@127.0.0.1:{self.port}/{db}?sslmode=disable",
                                 f"passwordFile: {self.password_file}\n"
                                 f"auditLog: {os.path.join(self.work, name + '-audit.jsonl')}\n")

    def processes(self):
        """(pid, /proc stat fields after the name) of the postmaster and its live children
        (backends, WAL writer, checkpointer...)."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            # fields[0] is the state (field 3 of stat): ppid is field 4.
            if int(entry) == self.proc.pid or int(fields[1]) == self.proc.pid:
                yield int(entry), fields

    def cpu_s(self):
        """CPU seconds (user + system) of the whole cluster so far: the postmaster with its
        exited children, and every live child."""
        total = 0
        for pid, fields in self.processes():
            # utime, stime, cutime, cstime are fields 14-17 of stat.
            total += sum(int(v) for v in fields[11:15 if pid == self.proc.pid else 13])
        return total / os.sysconf("SC_CLK_TCK")

    def pin(self, cpus):
        """Moves the cluster to `cpus` (a set); backends forked later inherit the postmaster's."""
        for pid, _ in self.processes():
            set_affinity(pid, cpus)

    def settings(self):
        version = self.sql("postgres", "SHOW server_version")
        shown = ", ".join(f"`{name}={self.sql('postgres', f'SHOW {name}')}`" for name in self.SHOWN)
        return f"PostgreSQL {version} ({self.bin}); {shown}"

    def log_tail(self):
        try:
            with open(self.log) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # fast shutdown: clients disconnected, no recovery needed
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def listening_port(pid):
    """The TCP port process `pid` listens on, from /proc (no tools needed)."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            m = re.match(r"socket:\[(\d+)\]", target)
            if m:
                inodes.add(m.group(1))
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and parts[9] in inodes:
                        return int(parts[1].split(":")[1], 16)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def set_affinity(pid, cpus):
    """Moves every thread of a running process to `cpus` (a set)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:
            pass


def pinned(cpus):
    """The command prefix that runs a process on the given CPUs only (taskset execs, so the
    process keeps the prefix's PID)."""
    return ["taskset", "-c", cpus] if cpus else []


def bench(server, ca, *args, cpus=None, **extra):
    out = sh(*pinned(cpus), BIN, "bench", "--endpoint", f"https://127.0.0.1:{server.port}", "--ca", ca,
             "--server-pid", str(server.proc.pid), "--output", "json", *map(str, args)).stdout
    record = json.loads(out)
    record.update(extra)
    return record


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short runs, for trying the script")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench-results"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reference", metavar="KMS_SERVER",
                        help="binary of the reference server, for target 2 (measured only when given)")
    parser.add_argument("--only-reference", action="store_true", help="measure target 2 only")
    parser.add_argument("--baseline", metavar="OLD_BINARY",
                        help="a build from before a change, measured side by side with this one")
    parser.add_argument("--only-baseline", action="store_true", help="measure the baseline comparison only")
    parser.add_argument("--only-rewrap", action="store_true",
                        help="measure only wrapping a million records under a new key source while serving")
    parser.add_argument("--only-refused", action="store_true",
                        help="measure only a refused connection against a handshake")
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="sqlite",
                        help="the suite's store: SQLite files, or databases of a throwaway PostgreSQL "
                             "cluster; both: the suite on SQLite and the two stores compared side by side")
    parser.add_argument("--only-database", action="store_true",
                        help="measure only the comparison of PostgreSQL with SQLite (needs --database both)")
    opts = parser.parse_args()
    if opts.only_database and opts.database != "both":
        parser.error("--only-database compares the two stores: give --database both")
    seconds = 1 if opts.quick else 5
    runs = 1 if opts.quick else opts.runs
    million = 20_000 if opts.quick else 1_000_000

    subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    os.makedirs(opts.out, exist_ok=True)
    results_path = os.path.join(opts.out, "results.jsonl")
    results = open(results_path, "w")
    summary = []

    def keep(record):
        results.write(json.dumps(record) + "\n")
        results.flush()
        return record

    # A SIGTERM stops the run through the `finally`s, which stop PostgreSQL and remove its files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix="kms-bench-")
    pg = None
    try:
        if opts.database != "sqlite":
            pg = Postgres(work)

        def db(name):
            """The store of a suite's server: an SQLite file in `work`, or a new PostgreSQL database."""
            if opts.database == "postgres":
                return pg.database(name.removesuffix(".db"))
            return os.path.join(work, name)

        ca = os.path.join(work, "ca.pem")
        certs = {
            "p256": make_cert(work, "p256", ["ecparam", "-name", "prime256v1", "-genkey", "-noout"]),
            "ed25519": make_cert(work, "ed25519", ["genpkey", "-algorithm", "ed25519"]),
            "rsa2048": make_cert(work, "rsa2048", ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        }

        if opts.reference:
            target2(opts.reference, work, certs["p256"], ca, runs, seconds, keep, summary)
        if opts.baseline:
            against_baseline(opts.baseline, work, certs["p256"], ca, runs, seconds, keep, summary)
        if opts.only_rewrap:
            rewrap(work, certs["p256"], ca, million, keep, summary)
        if opts.only_refused:
            refused(work, certs["p256"], ca, runs, seconds, keep, summary, db)
        if opts.database == "both":
            against_sqlite(pg, work, certs["p256"], ca, runs, seconds, keep, summary)
        if (opts.only_reference or opts.only_baseline or opts.only_refused or opts.only_database
                or opts.only_rewrap):
            return finish(opts, results, results_path, summary)

        # Handshake floor per certificate key type and key-exchange group.
        summary.append("## Handshake floor (server CPU per handshake, median)\n")
        summary.append("| certificate | X25519 | X25519MLKEM768 |\n|---|---|---|")
        for name, cert in certs.items():
            server = Server(work, cert, db(f"floor-{name}.db"))
            row = []
            for kx in ("x25519", "x25519mlkem768"):
                cpu = [keep(bench(server, ca, "--mode", "handshake", "--kx", kx, "--concurrency", 8,
                                  "--duration", seconds, experiment="floor", cert=name, run=r))
                       ["server_cpu_us_per_call"] for r in range(runs)]
                row.append(f"{statistics.median(cpu):.0f} µs")
            server.stop()
            summary.append(f"| {name} | {row[0]} | {row[1]} |")

        # Target 1: fresh unseal against the bare handshake, same server, alternating.
        server = Server(work, certs["p256"], db("main.db"))
        ratios = []
        for r in range(runs):
            hs = keep(bench(server, ca, "--mode", "handshake", "--concurrency", 8, "--duration", seconds,
                            experiment="target1", run=r))
            un = keep(bench(server, ca, "--mode", "unseal", "--concurrency", 8, "--duration", seconds,
                            "--nodes", 1000, experiment="target1", run=r))
            ratios.append((un["server_cpu_us_per_call"] / hs["server_cpu_us_per_call"],
                           hs["server_cpu_us_per_call"], un["server_cpu_us_per_call"]))
        ratios.sort()
        mid = ratios[len(ratios) // 2]
        summary.append("\n## Target 1: fresh unseal vs bare handshake (P-256, Go 1.24 groups)\n")
        summary.append(f"median ratio {mid[0]:.2f} (handshake {mid[1]:.0f} µs, unseal {mid[2]:.0f} µs); "
                       f"all runs: {', '.join(f'{r[0]:.2f}' for r in ratios)}")

        # Target 3: seal throughput against unseal throughput, fresh and shared.
        summary.append("\n## Target 3: seal vs unseal throughput, concurrency 32\n")
        summary.append("| connection | seal calls/s | unseal calls/s | ratio |\n|---|---|---|---|")
        for connection in ("fresh", "shared"):
            pairs = []
            for r in range(runs):
                seal = keep(bench(server, ca, "--mode", "seal", "--connection", connection, "--concurrency", 32,
                                  "--duration", seconds, experiment="target3", run=r))
                unseal = keep(bench(server, ca, "--mode", "unseal", "--connection", connection, "--concurrency", 32,
                                    "--duration", seconds, "--nodes", 1000, experiment="target3", run=r))
                pairs.append((seal["calls_per_s"] / unseal["calls_per_s"], seal["calls_per_s"], unseal["calls_per_s"]))
            pairs.sort()
            m = pairs[len(pairs) // 2]
            summary.append(f"| {connection} | {m[1]:.0f} | {m[2]:.0f} | {m[0]:.2f} |")

        # Sweeps for the plots.
        for connection in ("fresh", "shared"):
            for concurrency in (1, 2, 4, 8, 16, 32, 64):
                keep(bench(server, ca, "--mode", "unseal", "--connection", connection, "--concurrency", concurrency,
                           "--duration", max(1, seconds // 2), "--nodes", 1000, experiment="sweep-concurrency"))
        for connection, rates in (("fresh", (100, 200, 400, 800, 1200, 1600, 2000)),
                                  ("shared", (1000, 4000, 8000, 16000, 24000, 32000))):
            for rate in rates:
                keep(bench(server, ca, "--mode", "unseal", "--connection", connection, "--rate", rate,
                           "--concurrency", 256, "--duration", seconds, "--nodes", 1000, experiment="sweep-rate"))
        server.stop()

        # Target 4: flat to a million records.
        summary.append("\n## Target 4: 1,000 vs 1,000,000 records (shared connection, concurrency 32)\n")
        summary.append("| records | startup | RSS idle | unseal p50 | unseal p99 | calls/s |\n|---|---|---|---|---|---|")
        small_db, big_db = os.path.join(work, "small.db"), os.path.join(work, "big.db")
        sh(BIN, "fill", "--database", small_db, "--records", "1000")
        started = time.monotonic()
        sh(BIN, "fill", "--database", big_db, "--records", str(million))
        fill_s = time.monotonic() - started
        by_size = {}
        for label, filled in (("1k", small_db), (f"{million // 1000}k", big_db)):
            if opts.database == "postgres":
                target = pg.database(f"filled-{label}")
                sh(BIN, "db", "migrate", "--from", filled, "--to", target.url, "--to-password-file",
                   pg.password_file)
                filled = target
            server = Server(work, certs["p256"], filled)
            time.sleep(0.5)
            idle = server.rss_kib()
            reps = [keep(bench(server, ca, "--mode", "unseal", "--connection", "shared", "--concurrency", 32,
                               "--duration", seconds, "--nodes", 1000, experiment="target4", records=label, run=r))
                    for r in range(runs)]
            p50 = statistics.median(r["latency"]["p50_us"] for r in reps)
            p99 = statistics.median(r["latency"]["p99_us"] for r in reps)
            rate = statistics.median(r["calls_per_s"] for r in reps)
            by_size[label] = (p50, p99)
            summary.append(f"| {label} | {server.startup_s * 1000:.0f} ms | {idle / 1024:.1f} MiB | "
                           f"{p50 / 1000:.2f} ms | {p99 / 1000:.2f} ms | {rate:.0f} |")
            server.stop()
        (s50, s99), (b50, b99) = by_size.values()
        summary.append(f"\nratios at {million:,} records: p50 {b50 / s50:.2f}, p99 {b99 / s99:.2f}; "
                       f"filling {million:,} records took {fill_s:.1f} s")
        legacy = os.path.join(work, "legacy.json")
        count = 10_000 if opts.quick else 100_000
        sh(BIN, "fill", "--legacy-json", legacy, "--records", str(count))
        started = time.monotonic()
        sh(BIN, "import-json", legacy, "--database", os.path.join(work, "import.db"))
        summary.append(f"importing a {count:,}-record legacy JSON file took {time.monotonic() - started:.1f} s")

        # Target 5: the storm, with the server's peak memory.
        server = Server(work, certs["p256"], db("storm.db"))
        nodes = 200 if opts.quick else 2000
        storm = keep(bench(server, ca, "--mode", "storm", "--nodes", nodes, "--volumes", 2, "--retry-after", 1, experiment="storm"))
        peak = server.rss_kib("VmHWM")
        server.stop()
        summary.append(f"\n## Target 5: storm, {nodes} nodes x 2 volumes\n")
        summary.append(f"all unsealed in {storm['time_to_all_unsealed_s']:.2f} s; {storm['calls']} calls, "
                       f"{storm['timeouts']} timed out, {storm['other_errors']} other errors, "
                       f"{storm['volumes_left_locked']} left locked; p99 {storm['latency']['p99_us'] / 1000:.1f} ms; "
                       f"server peak RSS {peak / 1024:.1f} MiB")
        overload(work, ca, runs, opts.quick, keep, summary, db)
        refused(work, certs["p256"], ca, runs, seconds, keep, summary, db)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    finish(opts, results, results_path, summary)


def overload(work, ca, runs, quick, keep, summary, db):
    """A storm the server cannot absorb within Talos's deadline: a slow server (one core,
    RSA-4096 signatures) against a client with a core of its own. Calls must time out; what
    is measured is how much of the server's work still goes to calls that succeed."""
    if (os.cpu_count() or 1) < 2:
        summary.append("\n## Overload\n\nskipped: needs two CPUs (one for the server, one for the client)")
        return
    cert = make_cert(work, "rsa4096", ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096"])
    nodes = 1000 if quick else 8000
    storms = []
    for r in range(runs):
        server = Server(work, cert, db(f"overload-{r}.db"), cpus="0")
        try:
            floor = keep(bench(server, ca, "--mode", "handshake", "--concurrency", 16, "--duration", 3,
                               cpus="1", experiment="overload-floor", run=r))
            storm = keep(bench(server, ca, "--mode", "storm", "--nodes", nodes, "--volumes", 2, "--retry-after", 1, cpus="1",
                               experiment="overload", run=r))
            storm["needed_s"] = nodes * 2 * floor["server_cpu_us_per_call"] / 1e6
            storm["peak_kib"] = server.rss_kib("VmHWM")
            storms.append(storm)
        finally:
            server.stop()
    storms.sort(key=lambda s: s["time_to_all_unsealed_s"])
    mid = storms[len(storms) // 2]
    took = mid["time_to_all_unsealed_s"]
    summary.append(f"\n## Overload: storm of {nodes} nodes x 2 volumes on one server core (RSA-4096)\n")
    summary.append(f"median run: all unsealed in {took:.1f} s, where the handshakes alone need "
                   f"{mid['needed_s']:.1f} s of the core, so {mid['needed_s'] / took:.0%} of the server's time "
                   f"went to calls that succeeded; {mid['calls']} calls, {mid['timeouts']} timed out, "
                   f"{mid['other_errors']} other errors, {mid['volumes_left_locked']} left locked; "
                   f"server peak RSS {mid['peak_kib'] / 1024:.1f} MiB. All runs: "
                   + ", ".join(f"{s['time_to_all_unsealed_s']:.1f} s ({s['needed_s'] / s['time_to_all_unsealed_s']:.0%})"
                               for s in storms))


def refused(work, cert, ca, runs, seconds, keep, summary, db):
    """What a connection from outside the allow-lists costs the server (accepted, counted and
    closed before any TLS byte), against a bare TLS handshake on the same server, alternating:
    a flood of refused connections must cost far less than one of handshakes."""
    server = Server(work, cert, db("refused.db"),
                    policy=UNLIMITED + "sealAllowedNetworks: [127.0.0.1/32]\nunsealAllowedNetworks: [127.0.0.1/32]\n")
    pairs = []
    try:
        for r in range(runs):
            hs = keep(bench(server, ca, "--mode", "handshake", "--concurrency", 8, "--duration", seconds,
                            experiment="refused", against="handshake", run=r))
            rc = keep(bench(server, ca, "--mode", "connect", "--source-ip", "127.0.0.2", "--concurrency", 8,
                            "--duration", seconds, experiment="refused", against="refused", run=r))
            pairs.append((rc["server_cpu_us_per_call"] / hs["server_cpu_us_per_call"],
                          hs["server_cpu_us_per_call"], rc["server_cpu_us_per_call"], rc["calls_per_s"]))
    finally:
        server.stop()
    pairs.sort()
    mid = pairs[len(pairs) // 2]
    summary.append("\n## A connection refused by the allow-lists vs a TLS handshake (server CPU)\n")
    summary.append(f"median ratio {mid[0]:.3f} (handshake {mid[1]:.0f} µs, refused connection {mid[2]:.1f} µs, "
                   f"{mid[3]:.0f} refused connections/s); target < 0.1: "
                   + ("met" if mid[0] < 0.1 else "not met")
                   + "; all runs: " + ", ".join(f"{p[0]:.3f}" for p in pairs))


def target2(reference_binary, work, cert, ca, runs, seconds, keep, summary):
    """This server against the reference, side by side in one run with one client, alternating."""
    ours = Server(work, cert, os.path.join(work, "target2.db"))
    reference = ReferenceServer(reference_binary, work, cert)
    experiments = [
        ("fresh unseal, c=8: server CPU per call", "server_cpu_us_per_call", 0.5,
         ["--mode", "unseal", "--concurrency", 8, "--nodes", 1000]),
        ("fresh unseal, open loop 400/s: p99", "p99", 0.7,
         ["--mode", "unseal", "--rate", 400, "--concurrency", 256, "--nodes", 1000]),
        ("shared connection unseal, c=32: server CPU per call", "server_cpu_us_per_call", 0.4,
         ["--mode", "unseal", "--connection", "shared", "--concurrency", 32, "--nodes", 1000]),
        ("bare handshake, c=8: server CPU per call", "server_cpu_us_per_call", None,
         ["--mode", "handshake", "--concurrency", 8]),
        # The latency floor: what the TLS handshake alone costs this client on this machine.
        ("bare handshake, open loop 400/s: p99", "p99", None,
         ["--mode", "handshake", "--rate", 400, "--concurrency", 256]),
    ]
    medians = {}
    summary.append("## Target 2: against the reference server (same client, certificate and run)\n")
    summary.append("| measurement | this server | reference | ratio | target |\n|---|---|---|---|---|")
    try:
        for label, field, target, args in experiments:
            figures = {"ours": [], "reference": [], "ratio": []}
            for r in range(runs):
                pair = {}
                for name, server in (("ours", ours), ("reference", reference)):
                    record = keep(bench(server, ca, *args, "--duration", seconds,
                                        experiment="target2", against=name, run=r))
                    pair[name] = record["latency"]["p99_us"] / 1000 if field == "p99" else record[field]
                    figures[name].append(pair[name])
                figures["ratio"].append(pair["ours"] / pair["reference"])
            unit = "ms" if field == "p99" else "µs"
            median = {k: statistics.median(v) for k, v in figures.items()}
            medians[label] = median
            verdict = "" if target is None else (f"≤ {target}x: " + ("met" if median["ratio"] <= target else "not met"))
            summary.append(f"| {label} | {median['ours']:.1f} {unit} | {median['reference']:.1f} {unit} | "
                           f"{median['ratio']:.2f}x | {verdict} |")
    finally:
        ours.stop()
        reference.stop()
    allowed = 0.7 * medians["fresh unseal, open loop 400/s: p99"]["reference"]
    floor = medians["bare handshake, open loop 400/s: p99"]["ours"]
    summary.append(f"\nThe p99 target allows {allowed:.1f} ms; this server's bare handshake alone, with "
                   f"no HTTP/2 and no call, reaches {floor:.1f} ms at the same load: "
                   + ("the target is below the handshake floor of this client and machine."
                      if floor > allowed else "the target is above the handshake floor."))
    summary.append("")


def key_file(work):
    """A `keySource: {file: ...}` line and its key: records wrapped, policy rows tagged."""
    path = os.path.join(work, "root.key")
    if not os.path.exists(path):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    return f"keySource: {{file: {path}}}\n"


def unwrapped(database):
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as db:
        return db.execute("SELECT count(*) FROM records WHERE key_version IS NULL").fetchone()[0]


def rewrap(work, cert, ca, records, keep, summary):
    """Configuring a key source on a database of `records`: how long the background wrapping
    takes while nodes unseal, and their p99 then against before."""
    database, volumes = os.path.join(work, "rewrap.db"), os.path.join(work, "rewrap.volumes")
    sh(BIN, "fill", "--database", database, "--records", str(records), "--ip", "127.0.0.1",
       "--volumes", volumes)
    unseal = ["--mode", "unseal", "--concurrency", 4, "--volumes-from", volumes, "--duration", 5]
    server = Server(work, cert, database)
    idle = [keep(bench(server, ca, *unseal, experiment="rewrap", phase="idle", run=r))
            for r in range(3)]
    server.stop()
    started = time.monotonic()
    server = Server(work, cert, database, policy=UNLIMITED + key_file(work))
    during, took = [], None
    try:
        while took is None and time.monotonic() - started < 600:
            during.append(keep(bench(server, ca, *unseal, experiment="rewrap", phase="wrapping")))
            if unwrapped(database) == 0:
                took = time.monotonic() - started
    finally:
        server.stop()
    p99 = lambda records: statistics.median(r["latency"]["p99_us"] for r in records)
    worst = max(r["latency"]["p99_us"] for r in during)
    summary.append(f"\n## Wrapping {records:,} records while serving\n")
    summary.append(f"wrapped in {took:.1f} s (within the 5 s bench that saw it finish); unseal p99 "
                   f"{p99(idle) / 1000:.2f} ms idle, {p99(during) / 1000:.2f} ms median and "
                   f"{worst / 1000:.2f} ms worst while wrapping ({worst / p99(idle):.2f}x)"
                   if took else "did not finish within 600 s")


def baseline_server(binary, work, cert):
    """The baseline build, without the policy's limits, or without the keys if it predates them."""
    try:
        return Server(work, cert, os.path.join(work, "baseline.db"), binary=binary)
    except RuntimeError:
        return Server(work, cert, os.path.join(work, "baseline-old.db"), binary=binary, policy="")


def against_baseline(binary, work, cert, ca, runs, seconds, keep, summary):
    """This build against an older one: server CPU per call on fresh connections, alternating
    in one run (the machine drifts more between runs than a change costs)."""
    servers = {"this build": Server(work, cert, os.path.join(work, "current.db")),
               "this build, allow-lists and rate limits": Server(
                   work, cert, os.path.join(work, "configured.db"), policy=CONFIGURED),
               "this build, file key source": Server(
                   work, cert, os.path.join(work, "custody.db"), policy=UNLIMITED + key_file(work)),
               "baseline": baseline_server(binary, work, cert)}
    variants = [name for name in servers if name != "baseline"]
    experiments = [
        ("fresh unseal, c=8", ["--mode", "unseal", "--concurrency", 8, "--nodes", 1000]),
        ("fresh seal, c=8", ["--mode", "seal", "--concurrency", 8]),
        ("bare handshake, c=8", ["--mode", "handshake", "--concurrency", 8]),
    ]
    summary.append("## This build against the baseline (server CPU per call, median)\n")
    summary.append("| measurement | server | CPU per call | baseline | ratio | runs' ratios |\n"
                   "|---|---|---|---|---|---|")
    try:
        for label, args in experiments:
            figures = {name: [] for name in servers}
            ratios = {name: [] for name in variants}
            for r in range(runs):
                round_ = {}
                for name, server in servers.items():
                    record = keep(bench(server, ca, *args, "--duration", seconds,
                                        experiment="baseline", against=name, run=r))
                    if record["errors"] or record["mismatches"]:
                        raise RuntimeError(f"{name}: calls failed: {record['errors']} {record.get('first_error')}")
                    round_[name] = record["server_cpu_us_per_call"]
                    figures[name].append(round_[name])
                for name in variants:
                    ratios[name].append(round_[name] / round_["baseline"])
            before = statistics.median(figures["baseline"])
            for name in variants:
                now = statistics.median(figures[name])
                summary.append(f"| {label} | {name} | {now:.0f} µs | {before:.0f} µs | {now / before:.3f}x | "
                               + ", ".join(f"{r:.2f}" for r in ratios[name]) + " |")
    finally:
        for server in servers.values():
            server.stop()
    summary.append("")


def against_sqlite(pg, work, cert, ca, runs, seconds, keep, summary):
    """Issue 16: two servers of this build, one on SQLite and one on the throwaway PostgreSQL
    cluster, measured alternately in one run (which goes first alternates too), on fresh
    connections. Both unseal the same 1,000 volumes (`fill` bound to 127.0.0.1, copied to
    PostgreSQL with `db migrate`, unsealed with --volumes-from), so that no run seals anything
    before its measured phase and PostgreSQL's CPU around a run is the CPU of its calls."""
    source = os.path.join(work, "compare-sqlite.db")
    volumes = os.path.join(work, "compare-volumes.jsonl")
    sh(BIN, "fill", "--database", source, "--records", "1000", "--ip", "127.0.0.1", "--volumes", volumes)
    target = pg.database("compare-postgres")
    sh(BIN, "db", "migrate", "--from", source, "--to", target.url, "--to-password-file", pg.password_file)
    servers = {}

    def start_servers(cpus):
        """Both servers, started on `cpus` (a runtime sizes itself to the cores it is given)."""
        for server in servers.values():
            server.stop()
        listed = ",".join(map(str, sorted(cpus))) if cpus else None
        servers["SQLite"] = Server(work, cert, source, cpus=listed)
        servers["PostgreSQL"] = Server(work, cert, target, cpus=listed)

    try:
        experiments = [
            # (label, bench arguments, measure calls/s, target on calls/s, target on server CPU)
            ("durable seals, c=32", ["--mode", "seal", "--concurrency", 32], (0.8, None), None),
            ("unseals, c=32", ["--mode", "unseal", "--concurrency", 32, "--volumes-from", volumes],
             (0.9, None), None),
            ("unseals, c=8", ["--mode", "unseal", "--concurrency", 8, "--volumes-from", volumes],
             None, (0.9, 1.1)),
        ]
        # The same unseals with the servers started on core 0 alone and the client and
        # PostgreSQL on core 1: PostgreSQL's backends no longer preempt the server (as with a
        # database host of its own), while the server still pays for every round trip.
        everywhere = os.sched_getaffinity(0)
        if len(everywhere) >= 2:
            own, rest = sorted(everywhere)[:1], sorted(everywhere)[1:]
            experiments.append(("unseals, c=8, server on a core of its own",
                                ["--mode", "unseal", "--concurrency", 8, "--volumes-from", volumes],
                                None, (0.9, 1.1), (set(own), set(rest))))
        rows = []
        layout_now = "none"
        for label, args, rate_target, cpu_target, *layout in experiments:
            server_cpus, other_cpus = layout[0] if layout else (None, everywhere)
            if layout_now != server_cpus:
                start_servers(server_cpus)
                layout_now = server_cpus
            pg.pin(other_cpus)
            client_cpus = ",".join(map(str, sorted(other_cpus))) if layout else None
            figures = {name: {"rate": [], "cpu": [], "pg": []} for name in servers}
            ratios = {"rate": [], "cpu": []}
            for r in range(runs):
                order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                round_ = {}
                for name in order:
                    before = pg.cpu_s()
                    record = bench(servers[name], ca, *args, "--duration", seconds, cpus=client_cpus,
                                   experiment="database", against=name, run=r, case=label)
                    pg_cpu = pg.cpu_s() - before
                    if record["errors"] or record["mismatches"]:
                        raise RuntimeError(f"{name}: calls failed: {record['errors']} {record.get('first_error')}")
                    record["postgres_cpu_us_per_call"] = pg_cpu * 1e6 / record["calls_ok"]
                    keep(record)
                    round_[name] = record
                    figures[name]["rate"].append(record["calls_per_s"])
                    figures[name]["cpu"].append(record["server_cpu_us_per_call"])
                    figures[name]["pg"].append(record["postgres_cpu_us_per_call"])
                pg_round, lite_round = round_["PostgreSQL"], round_["SQLite"]
                ratios["rate"].append(pg_round["calls_per_s"] / lite_round["calls_per_s"])
                ratios["cpu"].append(pg_round["server_cpu_us_per_call"] / lite_round["server_cpu_us_per_call"])
            med = {name: {k: statistics.median(v) for k, v in f.items()} for name, f in figures.items()}
            lite, post = med["SQLite"], med["PostgreSQL"]

            def verdict(ratio, bounds):
                low, high = bounds
                if high is None:
                    return f"≥ {low}x: " + ("met" if ratio >= low else "**not met**")
                return f"{low}–{high}x: " + ("met" if low <= ratio <= high else "**not met**")

            if rate_target:
                ratio = statistics.median(ratios["rate"])
                rows.append(f"| {label}: calls/s | {lite['rate']:.0f} | {post['rate']:.0f} | **{ratio:.2f}x** | "
                            f"{verdict(ratio, rate_target)} | " + ", ".join(f"{x:.2f}" for x in ratios["rate"]) + " |")
            ratio = statistics.median(ratios["cpu"])
            rows.append(f"| {label}: server CPU per call | {lite['cpu']:.0f} µs | {post['cpu']:.0f} µs | "
                        + (f"**{ratio:.2f}x**" if cpu_target else f"{ratio:.2f}x") + " | "
                        + (verdict(ratio, cpu_target) if cpu_target else "") + " | "
                        + ", ".join(f"{x:.2f}" for x in ratios["cpu"]) + " |")
            rows.append(f"| {label}: PostgreSQL's CPU per call | ({lite['pg']:.0f} µs idle) | {post['pg']:.0f} µs | | | "
                        + ", ".join(f"{x:.0f}" for x in figures["PostgreSQL"]["pg"]) + " µs |")
            rows.append(f"| {label}: server + PostgreSQL CPU per call | {lite['cpu']:.0f} µs | "
                        f"{post['cpu'] + post['pg']:.0f} µs | {(post['cpu'] + post['pg']) / lite['cpu']:.2f}x | | |")
    finally:
        for server in servers.values():
            server.stop()
        pg.pin(os.sched_getaffinity(0))
    summary.append("## PostgreSQL against SQLite (fresh connections, same run, alternating, medians)\n")
    summary.append(f"{pg.settings()}; the server's store pool at its default size; "
                   "`sslmode=disable` on loopback; server, client and PostgreSQL share the "
                   "machine's cores, but in the last rows, where the server has one to itself.\n")
    summary.append("| measurement | SQLite | PostgreSQL | ratio PG/SQLite | target | runs' ratios |\n"
                   "|---|---|---|---|---|---|")
    summary.extend(rows)
    summary.append("\nPostgreSQL's CPU: user + system time of the postmaster, its children and its exited "
                   "children (/proc) around each run, divided by the run's calls; in the SQLite column, "
                   "what the idle cluster spent meanwhile.\n")


def finish(opts, results, results_path, summary):
    results.close()
    text = "\n".join(summary) + "\n"
    with open(os.path.join(opts.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    if not (opts.only_reference or opts.only_baseline or opts.only_refused or opts.only_database
            or opts.only_rewrap):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_plot.py"), results_path, opts.out],
                       check=True)


if __name__ == "__main__":
    main()
