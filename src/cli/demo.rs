//! `demo`: the first command of the README. Serves on loopback with a throwaway CA,
//! certificate and database, and prints the Talos machine-config patch to use.

use super::serve::{OnHangup, serve_until_signal};
use anyhow::Context;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use talos_kms_server::audit::AuditLog;
use talos_kms_server::logging::{self, LogLevel};
use talos_kms_server::server::{self, ServerOptions};
use talos_kms_server::store::SqliteStore;
use talos_kms_server::talos::patch::{self, PatchOptions, PatchVolume};
use talos_kms_server::tls::{self, throwaway};

#[derive(clap::Args)]
pub struct Args {
    /// Address to serve on. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Names (DNS or IP) for the throwaway certificate, e.g. the address nodes use. The
    /// first is the host of the printed endpoint.
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    logging::init(LogLevel::Info, LogLevel::Warn);
    // tempfile creates directories with the umask's mode; the key inside must stay private.
    let dir = tempfile::Builder::new()
        .prefix("talos-kms-demo-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .context("cannot create a temporary directory")?;
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let listen_ip = args.listen.ip();
    if !listen_ip.is_unspecified() && !names.contains(&listen_ip.to_string()) {
        names.push(listen_ip.to_string());
    }
    // Nodes use the name; the command to try it runs here and uses the address.
    let host = endpoint_host(args.names.first().map(String::as_str), listen_ip);
    let local_host = endpoint_host(None, listen_ip);
    names.extend(args.names);
    let pki = throwaway::generate(&names)?;
    let (ca_file, cert_file, key_file) = (
        dir.path().join("ca.pem"),
        dir.path().join("server.crt"),
        dir.path().join("server.key"),
    );
    std::fs::write(&ca_file, &pki.ca_pem)?;
    std::fs::write(&cert_file, &pki.chain_pem)?;
    write_private(&key_file, pki.key_pem.as_bytes())
        .with_context(|| format!("cannot write {}", key_file.display()))?;
    let identity = tls::load_identity(&cert_file, &key_file, None)?;
    let port = server::bind(args.listen, server::Purpose::Kms)?;
    let store = Arc::new(SqliteStore::open(&dir.path().join("demo.db"))?);
    let audit =
        Arc::new(AuditLog::open(&dir.path().join("audit.jsonl"), None)?.checkpointed(None)?);
    let options = ServerOptions {
        tls: tls::server_config(identity)?,
        store,
        audit,
        metrics: Default::default(),
        metrics_port: None,
        rules: Default::default(),
        limits: Default::default(),
        take_over: Default::default(),
    };
    let dir_path = dir.path().to_path_buf();
    // The full path, so that the printed command works from `cargo run` too.
    let program = std::env::current_exe().unwrap_or_else(|_| "talos-kms-server".into());
    serve_until_signal(port, options, OnHangup::Stop, |addr| {
        let endpoint = format!("https://{host}:{}", addr.port());
        let local_endpoint = format!("https://{local_host}:{}", addr.port());
        let patch = match talos_patch(&endpoint, &pki.ca_pem) {
            Ok(patch) => patch,
            Err(error) => format!("# cannot write the Talos patch: {error}\n"),
        };
        let _ = std::fs::write(dir_path.join("talos-patch.yaml"), &patch);
        println!(
            "# talos-kms-server demo: serving {endpoint}\n\
             # Throwaway CA, certificate and database in {dir}; all deleted when this stops (Ctrl-C).\n\
             #\n\
             # Try it as a Talos node would:\n\
             #   {program} client --endpoint {local_endpoint} --ca {ca} roundtrip\n\
             #\n\
             # Talos machine-config patch (also in {dir}/talos-patch.yaml), as\n\
             # `talos-kms-server talos patch` writes it for a server of your own:\n\
             {patch}",
            dir = dir_path.display(),
            ca = dir_path.join("ca.pem").display(),
            program = program.display(),
        );
    })
    .await?;
    drop(dir);
    Ok(ExitCode::SUCCESS)
}

/// The host to reach the demo at: `name`, else the listen address if it is one address,
/// else loopback. IPv6 literals get brackets.
fn endpoint_host(name: Option<&str>, listen_ip: IpAddr) -> String {
    let host = match name {
        Some(name) => name.to_string(),
        None if listen_ip.is_unspecified() => "127.0.0.1".to_string(),
        None => listen_ip.to_string(),
    };
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    }
}

/// Writes a file only its owner can read, from its creation on.
fn write_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content)
}

/// The patch `talos patch` would print for this server: EPHEMERAL with the KMS key, the
/// throwaway CA in a TrustedRootsConfig.
fn talos_patch(endpoint: &str, ca_pem: &str) -> anyhow::Result<String> {
    let options = PatchOptions {
        endpoint: endpoint.parse().map_err(anyhow::Error::msg)?,
        volumes: vec![PatchVolume::Ephemeral],
        slot: 0,
        fallback: None,
        fallback_slot: 1,
        private_ca: Some(ca_pem.to_string()),
        loopback_hint: "rerun the demo with `--listen ADDR --name HOST`: ADDR an address of \
                        this machine that the nodes reach, HOST the name or address they use \
                        for it"
            .into(),
    };
    patch::build(&options)
        .and_then(|patch| patch.yaml())
        .map_err(anyhow::Error::msg)
}
