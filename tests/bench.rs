//! `bench` works and its numbers are sane. (Speed targets live in BENCHMARKS.md, measured
//! with release builds; tests do not time anything.)

mod common;

use common::*;
use serde_json::Value;

fn bench(server: &ServerProcess, ca: &std::path::Path, args: &[&str]) -> Value {
    let endpoint = format!("https://127.0.0.1:{}", server.addr.port());
    let pid = server.child.id().to_string();
    let mut all = vec![
        "bench",
        "--endpoint",
        &endpoint,
        "--ca",
        ca.to_str().unwrap(),
        "--server-pid",
        &pid,
        "--output",
        "json",
    ];
    all.extend_from_slice(args);
    let output = run_binary(&all);
    assert!(
        output.status.success(),
        "bench {args:?}: {}",
        text(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&output.stdout)))
}

fn assert_sane(report: &Value, calls: u64) {
    assert_eq!(report["calls_ok"], calls, "{report}");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let latency = &report["latency"];
    let (p50, p99, max) = (
        latency["p50_us"].as_u64().unwrap(),
        latency["p99_us"].as_u64().unwrap(),
        latency["max_us"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{report}");
    assert!(report["calls_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        report["server_cpu_us_per_call"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["client_cpu_us_per_call"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

#[test]
fn bench_measures_every_mode_and_checks_every_answer() {
    let running = Running::start("");
    let server = &running.server;
    let pki = &running.pki;

    let ca = pki.ca.clone();
    for (args, calls) in [
        (
            vec![
                "--mode",
                "unseal",
                "--requests",
                "40",
                "--nodes",
                "10",
                "--concurrency",
                "4",
            ],
            40,
        ),
        (
            vec![
                "--mode",
                "seal",
                "--requests",
                "400",
                "--connection",
                "shared",
                "--concurrency",
                "8",
            ],
            400,
        ),
        (
            vec!["--mode", "mixed", "--requests", "60", "--nodes", "5"],
            60,
        ),
        (vec!["--mode", "handshake", "--requests", "100"], 100),
    ] {
        let report = bench(server, &ca, &args);
        assert_sane(&report, calls);
    }

    // Open loop: every scheduled call either ran or is counted as not started.
    let report = bench(
        server,
        &ca,
        &[
            "--mode",
            "unseal",
            "--rate",
            "100",
            "--requests",
            "30",
            "--nodes",
            "5",
            "--concurrency",
            "2",
        ],
    );
    let started = report["calls_ok"].as_u64().unwrap();
    assert_eq!(
        started + report["not_started"].as_u64().unwrap(),
        30,
        "{report}"
    );
    assert_eq!(report["mismatches"], 0);

    drop(running);
}

#[test]
fn a_small_storm_unseals_every_volume_each_node_from_its_own_address() {
    let running = Running::start("metricsAddress: 127.0.0.1:0\n");
    let timeline = running.dir.path().join("timeline.csv");
    let metrics = running.server.metrics_address();
    let storm = bench(
        &running.server,
        &running.pki.ca,
        &[
            "--mode",
            "storm",
            "--nodes",
            "20",
            "--volumes",
            "2",
            "--retry-after",
            "0.2",
            "--metrics",
            &metrics,
            "--timeline",
            timeline.to_str().unwrap(),
        ],
    );
    assert_eq!(storm["volumes_unsealed"], 40, "{storm}");
    assert_eq!(storm["volumes_left_locked"], 0, "{storm}");
    assert_eq!(storm["mismatches"], 0, "{storm}");
    assert_eq!(storm["sources"], "127.1.0.0/16", "{storm}");
    assert_eq!(storm["retry_after_s"], 0.2, "{storm}");
    let calls = storm["calls"].as_u64().unwrap();
    assert_eq!(calls, 40 + storm["retries"].as_u64().unwrap(), "{storm}");
    assert!(storm["server_cpu_s"].as_f64().unwrap() > 0.0, "{storm}");
    let rss = storm["server_peak_rss_mib"].as_f64().unwrap();
    assert!((1.0..1024.0).contains(&rss), "{storm}");
    // What the server allocated is part of its resident memory, never all of it: the
    // executable's pages are the rest.
    let allocated = storm["server_peak_anonymous_mib"].as_f64().unwrap();
    assert!(allocated > 0.0 && allocated < rss, "{storm}");
    assert!(
        storm["connection_busy_s"]["answered"].as_f64().unwrap() > 0.0,
        "{storm}"
    );
    let share = storm["failed_cpu_share"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&share), "{storm}");

    // The timeline ends with every volume open.
    let csv = std::fs::read_to_string(&timeline).unwrap();
    assert!(csv.starts_with("seconds,unsealed\n"), "{csv}");
    let last = csv.lines().last().unwrap();
    assert!(last.ends_with(",40"), "{csv}");

    // Each node called from an address of its own, as the audit trail saw them.
    let trail =
        std::fs::read_to_string(running.dir.path().join("talos-kms-server-audit.jsonl")).unwrap();
    let peers: std::collections::BTreeSet<String> = trail
        .lines()
        .filter(|line| line.contains(r#""action":"unseal""#))
        .filter_map(|line| {
            let value: Value = serde_json::from_str(line).ok()?;
            Some(value["peer"].as_str()?.to_string())
        })
        .collect();
    let expected: std::collections::BTreeSet<String> =
        (1..=20).map(|n| format!("127.1.0.{n}")).collect();
    assert_eq!(peers, expected);
}

#[test]
fn fill_makes_records_a_server_can_count_and_a_legacy_file_that_imports() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("kms.db");
    let output = run_binary(&[
        "fill",
        "--database",
        database.to_str().unwrap(),
        "--records",
        "2000",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let db = rusqlite::Connection::open(&database).unwrap();
    let count: i64 = db
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 2000);

    let legacy = dir.path().join("legacy.json");
    let output = run_binary(&[
        "fill",
        "--legacy-json",
        legacy.to_str().unwrap(),
        "--records",
        "500",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let output = run_binary(&[
        "import-json",
        legacy.to_str().unwrap(),
        "--database",
        database.to_str().unwrap(),
    ]);
    assert!(
        text(&output.stdout).contains("imported 500 records, skipped 0"),
        "{}",
        text(&output.stdout)
    );
}

fn count_records(database: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open(database).unwrap();
    db.query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn bench_that_makes_no_call_fails_with_the_first_error() {
    // A port nothing listens on: bind one, then close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("https://127.0.0.1:{port}");
    for (mode, format) in [
        ("handshake", "table"),
        ("seal", "json"),
        ("unseal", "table"),
    ] {
        let output = run_binary(&[
            "bench",
            "--endpoint",
            &endpoint,
            "--output",
            format,
            "--mode",
            mode,
            "--requests",
            "3",
            "--nodes",
            "2",
        ]);
        assert!(!output.status.success(), "{mode}: {}", text(&output.stdout));
        let said = format!("{}{}", text(&output.stdout), text(&output.stderr));
        assert!(
            said.contains(&format!("cannot connect to {endpoint}"))
                && said.contains("connection refused"),
            "{mode}: {said}"
        );
    }
}

#[test]
fn unseal_bench_on_volumes_made_by_fill_adds_no_record() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::new("");
    let dir = &setup.dir;
    let pki = &setup.pki;
    let config = &setup.config;
    let database = dir.path().join("kms.db");
    let volumes = dir.path().join("volumes.jsonl");
    let output = run_binary(&[
        "fill",
        "--database",
        database.to_str().unwrap(),
        "--records",
        "30",
        "--ip",
        "127.0.0.1",
        "--volumes",
        volumes.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let mode = std::fs::metadata(&volumes).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the volumes file holds passphrases");
    assert_eq!(count_records(&database), 30);

    let server = ServerProcess::start(config).unwrap();
    let from = ["--volumes-from", volumes.to_str().unwrap()];
    let report = bench(
        &server,
        &pki.ca,
        &[&["--mode", "unseal", "--requests", "60"][..], &from].concat(),
    );
    assert_sane(&report, 60);
    let storm = bench(
        &server,
        &pki.ca,
        &[&["--mode", "storm"][..], &from].concat(),
    );
    assert_eq!(storm["nodes"], 30, "{storm}");
    assert_eq!(storm["volumes_unsealed"], 30, "{storm}");
    assert_eq!(storm["mismatches"], 0, "{storm}");
    assert_eq!(count_records(&database), 30, "no record added");

    // Seal modes refuse the file rather than add records anyway.
    let endpoint = format!("https://127.0.0.1:{}", server.addr.port());
    let output = run_binary(
        &[
            &[
                "bench",
                "--endpoint",
                &endpoint,
                "--ca",
                pki.ca.to_str().unwrap(),
            ][..],
            &["--mode", "mixed"],
            &from,
        ]
        .concat(),
    );
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("--volumes-from is for --mode unseal or storm"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(count_records(&database), 30);
    drop(server);
}
