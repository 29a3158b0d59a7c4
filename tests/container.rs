//! The container image, run as a real container with podman: read-only, as uid 65532, the
//! config, certificate and key mounted read-only and the database on a named volume, the port
//! published on 127.0.0.1 only. The `client` command talks to it from the host.
//!
//! The image is TALOS_KMS_IMAGE (scripts/test builds it from the release binary with
//! scripts/container), else one this test builds the same way from the binary under test.
//! Skips loudly only where podman or buildah cannot run at all.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// podman 4.3's default runtime, crun, refuses the hybrid cgroup layout of some hosts; runc
/// with cgroupfs runs everywhere podman does.
const PODMAN: [&str; 4] = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"];
const SERVER_UID: u32 = 65532;

fn skip(why: &str) {
    eprintln!("######## SKIPPED: {why} ########");
}

fn podman(args: &[&str]) -> Output {
    run_limited(
        Command::new("podman").args(PODMAN).args(args),
        Duration::from_secs(120),
    )
}

fn podman_ok(args: &[&str]) -> String {
    let output = podman(args);
    assert!(
        output.status.success(),
        "podman {args:?} failed ({}):\n{}{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout).trim().to_string()
}

/// Why podman or buildah cannot run here, if they cannot.
fn cannot_run() -> Option<String> {
    // buildah only builds the image, when TALOS_KMS_IMAGE names none.
    let building = std::env::var_os("TALOS_KMS_IMAGE").is_none();
    for tool in ["podman", "buildah"]
        .into_iter()
        .take(if building { 2 } else { 1 })
    {
        match Command::new(tool).arg("--version").output() {
            Ok(output) if output.status.success() => {}
            _ => {
                return Some(format!(
                    "{tool} is not installed (scripts/test installs it)"
                ));
            }
        }
    }
    let info = run_limited(
        Command::new("podman").args(PODMAN).arg("info"),
        Duration::from_secs(60),
    );
    (!info.status.success()).then(|| format!("`podman info` fails: {}", text(&info.stderr)))
}

/// A unique name for this run's containers and volumes.
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("talos-kms-test-{what}-{}-{nanos}", std::process::id())
}

/// The image under test, and whether this test built it (and so removes it).
fn image() -> (String, bool) {
    if let Ok(image) = std::env::var("TALOS_KMS_IMAGE") {
        return (image, false);
    }
    let image = format!("localhost/{}:test", unique("image"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/container");
    let output = run_limited(
        Command::new(script)
            .arg(BINARY)
            .env("TALOS_KMS_IMAGE", &image),
        Duration::from_secs(300),
    );
    assert!(
        output.status.success(),
        "scripts/container failed:\n{}",
        text(&output.stderr)
    );
    assert_eq!(text(&output.stdout).trim(), image);
    (image, true)
}

/// Removes what a test made in podman's storage, whatever the test's outcome.
#[derive(Default)]
struct Cleanup {
    containers: Vec<String>,
    volumes: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for container in &self.containers {
            podman(&["rm", "--force", "--time", "0", container]);
        }
        for volume in &self.volumes {
            podman(&["volume", "rm", "--force", volume]);
        }
        for image in &self.images {
            podman(&["rmi", "--force", image]);
        }
    }
}

/// Open-file and process limits at or below this process's hard limits: podman asks for
/// more than some hosts allow a container otherwise.
fn ulimits() -> [String; 4] {
    use rustix::process::{Resource, getrlimit};
    let limit = |resource| {
        getrlimit(resource)
            .maximum
            .map_or(4096, |hard| hard.min(4096))
    };
    let (files, processes) = (limit(Resource::Nofile), limit(Resource::Nproc));
    [
        "--ulimit".into(),
        format!("nofile={files}:{files}"),
        "--ulimit".into(),
        format!("nproc={processes}:{processes}"),
    ]
}

/// The config, certificate and key as an operator mounts them: readable by the server's
/// user only (world-readable where this test cannot give them to that user).
fn write_mounted_files(dir: &Path) -> Pki {
    let pki = write_pki(dir);
    write_private(
        &dir.join("config.yaml"),
        "database: /var/lib/talos-kms-server/talos-kms-server.db\n\
         serverCertFile: /etc/talos-kms-server/server.crt\n\
         serverKeyFile: /etc/talos-kms-server/server.key\n\
         port: 50051\n\
         bindAddress: \"0.0.0.0\"\n\
         metricsAddress: \"0.0.0.0:9650\"\n",
    );
    for file in [&dir.join("config.yaml"), &pki.cert, &pki.key] {
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(file, Some(SERVER_UID), Some(SERVER_UID)).unwrap();
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    pki
}

/// The ports a container publishes on loopback.
struct Published {
    kms: u16,
    metrics: u16,
}

/// `podman run -d` of the image as the README runs it, its ports published on 127.0.0.1.
fn start(image: &str, name: &str, volume: &str, dir: &Path) -> Published {
    let mount = |file: &str| {
        format!(
            "{}:/etc/talos-kms-server/{file}:ro",
            dir.join(file).display()
        )
    };
    let mut args: Vec<String> = [
        "run",
        "--detach",
        "--name",
        name,
        "--read-only",
        "--user",
        "65532:65532",
        "--publish",
        "127.0.0.1::50051",
        "--publish",
        "127.0.0.1::9650",
        "--volume",
        &format!("{volume}:/var/lib/talos-kms-server"),
    ]
    .map(String::from)
    .into();
    args.extend(ulimits());
    for file in ["config.yaml", "server.crt", "server.key"] {
        args.extend(["--volume".to_string(), mount(file)]);
    }
    args.push(image.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman_ok(&args);
    wait_serving(name);
    let port = |inside: &str| {
        let published = podman_ok(&["port", name, inside]);
        published
            .strip_prefix("127.0.0.1:")
            .and_then(|port| port.trim().parse().ok())
            .unwrap_or_else(|| panic!("{inside} is not published on 127.0.0.1 only: {published:?}"))
    };
    Published {
        kms: port("50051/tcp"),
        metrics: port("9650/tcp"),
    }
}

/// Waits (at most 30 s) for the server's "serving" line in the container's log.
fn wait_serving(name: &str) {
    let started = Instant::now();
    loop {
        let logs = podman(&["logs", name]);
        let log = format!("{}{}", text(&logs.stdout), text(&logs.stderr));
        if log.contains("serving sidero.kms.KMSService") {
            return;
        }
        let state = podman_ok(&["inspect", "--format", "{{.State.Status}}", name]);
        assert!(
            state == "running" && started.elapsed() < Duration::from_secs(30),
            "the container does not serve ({state}):\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn client(port: u16, ca: &Path, action: &[&str]) -> String {
    let endpoint = format!("https://127.0.0.1:{port}");
    let ca = ca.display().to_string();
    let mut args = vec!["client", "--endpoint", &endpoint, "--ca", &ca];
    args.extend(action);
    let output = run_binary(&args);
    assert!(
        output.status.success(),
        "client {action:?}: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout).trim().to_string()
}

/// SIGTERM to the server (the container's first process); its exit code and how long it took.
fn terminate(name: &str) -> (i32, Duration) {
    let asked = Instant::now();
    podman_ok(&["kill", "--signal", "TERM", name]);
    let code = podman_ok(&["wait", name]);
    let took = asked.elapsed();
    (
        code.parse()
            .unwrap_or_else(|_| panic!("podman wait: {code:?}")),
        took,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_serves_read_only_as_65532_stops_on_sigterm_and_keeps_records_on_its_volume() {
    if let Some(why) = cannot_run() {
        return skip(&why);
    }
    let mut cleanup = Cleanup::default();
    let (image, built) = image();
    if built {
        cleanup.images.push(image.clone());
    }
    // What the release image (packaging/Containerfile) says, this one says too.
    let config = podman_ok(&[
        "image",
        "inspect",
        "--format",
        "USER {{.Config.User}}\nENTRYPOINT {{json .Config.Entrypoint}}\nCMD {{json .Config.Cmd}}\n\
         VOLUME {{json .Config.Volumes}}\nEXPOSE {{json .Config.ExposedPorts}}\n\
         {{index .Config.Labels \"org.opencontainers.image.version\"}}",
        &image,
    ]);
    let containerfile = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/Containerfile"),
    )
    .unwrap();
    let release: Vec<&str> = containerfile
        .lines()
        .filter(|line| {
            ["USER ", "ENTRYPOINT ", "CMD "]
                .iter()
                .any(|k| line.starts_with(k))
        })
        .collect();
    assert_eq!(
        release,
        [
            "USER 65532:65532",
            "ENTRYPOINT [\"/usr/bin/talos-kms-server\"]",
            "CMD [\"--config\", \"/etc/talos-kms-server/config.yaml\"]"
        ]
    );
    let lines: Vec<String> = config
        .lines()
        .map(|line| line.replace("\",\"", "\", \""))
        .collect();
    assert_eq!(lines[..3], release, "{config}");
    assert!(containerfile.contains("\nVOLUME [\"/var/lib/talos-kms-server\"]\n"));
    assert_eq!(lines[3], "VOLUME {\"/var/lib/talos-kms-server\":{}}");
    assert!(containerfile.contains("\nEXPOSE 50051\n"));
    assert_eq!(lines[4], "EXPOSE {\"50051/tcp\":{}}");
    assert_eq!(lines[5], env!("CARGO_PKG_VERSION"), "the OCI version label");

    let dir = tempfile::tempdir().unwrap();
    let pki = write_mounted_files(dir.path());
    let volume = unique("state");
    podman_ok(&["volume", "create", &volume]);
    cleanup.volumes.push(volume.clone());
    let first = unique("first");
    cleanup.containers.push(first.clone());
    let published = tokio::task::block_in_place(|| start(&image, &first, &volume, dir.path()));
    let port = published.kms;

    assert_eq!(
        wait_for_health(port, &pki.ca, 1, Duration::from_secs(10)).await,
        1,
        "health answers SERVING"
    );
    // As the kubelet's gRPC probe asks it: plain HTTP/2 on the metrics port.
    let probe = plain_grpc(
        &format!("127.0.0.1:{}", published.metrics),
        "/grpc.health.v1.Health/Check",
        &[],
    )
    .await;
    let body = http_body_util::BodyExt::collect(probe.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(
        health_status(&body),
        1,
        "the probe's health answers SERVING"
    );
    let roundtrip = tokio::task::block_in_place(|| client(port, &pki.ca, &["roundtrip"]));
    assert!(roundtrip.starts_with("ok:"), "{roundtrip}");
    let passphrase = "c2VhbGVkIGluIGEgY29udGFpbmVyLCBrZXB0IG9uIGl0cyB2b2x1bWU=";
    let sealed = tokio::task::block_in_place(|| {
        client(
            port,
            &pki.ca,
            &[
                "seal",
                "--node-uuid",
                NODE,
                "--passphrase",
                passphrase,
                "--output",
                "raw",
            ],
        )
    });

    let (code, took) = tokio::task::block_in_place(|| terminate(&first));
    eprintln!("SIGTERM: exit {code} after {took:?}");
    assert_eq!(code, 0, "SIGTERM stops the server cleanly");
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");

    // A new container on the same volume: the root file system is read-only, so the records
    // can only have been kept on the volume.
    let second = unique("second");
    cleanup.containers.push(second.clone());
    let port = tokio::task::block_in_place(|| start(&image, &second, &volume, dir.path())).kms;
    let unsealed = tokio::task::block_in_place(|| {
        client(
            port,
            &pki.ca,
            &["unseal", "--node-uuid", NODE, "--sealed", &sealed],
        )
    });
    assert_eq!(unsealed, passphrase, "the record survived the restart");
    let (code, _) = tokio::task::block_in_place(|| terminate(&second));
    assert_eq!(code, 0);
}
