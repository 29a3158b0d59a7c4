//! Generates the gRPC stubs for `sidero.kms.KMSService` without `protoc`: the service is
//! described here in Rust and its two messages are hand-written prost structs in
//! `src/proto.rs`, so a fresh machine needs nothing but cargo to build. Also records the
//! commit and the day of the build for `--version`, so that nothing asks git at run time.

use std::process::Command;

fn main() {
    let method = |name: &str, route: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type("crate::proto::Request")
            .output_type("crate::proto::Response")
            .codec_path("crate::proto::SmallMessageCodec")
            .build()
    };
    let service = tonic_build::manual::Service::builder()
        .name("KMSService")
        .package("sidero.kms")
        .method(method("seal", "Seal"))
        .method(method("unseal", "Unseal"))
        .build();
    tonic_build::manual::Builder::new()
        .build_transport(false)
        .compile(&[service]);
    version_facts();
}

/// The commit (`unknown` outside a git checkout, e.g. a source tarball) and the build's
/// day (`SOURCE_DATE_EPOCH` for reproducible builds, else today).
fn version_facts() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|text| text.trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|changes| !changes.is_empty());
    println!(
        "cargo:rustc-env=TALOS_KMS_COMMIT={commit}{}",
        if dirty { "-modified" } else { "" }
    );
    // Rebuilt when HEAD moves (a commit, a checkout), not at every build.
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--git-path", "index"]),
    ]
    .into_iter()
    .flatten()
    {
        println!("cargo:rerun-if-changed={path}");
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git(&["rev-parse", "--git-path", &reference])
    {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|text| text.parse::<i64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
    println!(
        "cargo:rustc-env=TALOS_KMS_BUILD_DATE={}",
        civil_date(seconds)
    );
}

/// `yyyy-mm-dd` of a Unix time, UTC (Howard Hinnant's days-to-civil algorithm).
fn civil_date(seconds: i64) -> String {
    let z = seconds.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
