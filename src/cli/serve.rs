//! `serve`: the server itself.

use anyhow::Context;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use talos_kms_server::audit::AuditLog;
use talos_kms_server::config::Config;
use talos_kms_server::logging;
use talos_kms_server::metrics::Metrics;
use talos_kms_server::policy::Policy;
use talos_kms_server::server::{self, Port, ServerOptions};
use talos_kms_server::store::legacy_json::{self, TakeOver};
use talos_kms_server::store::{SqliteStore, Store};
use talos_kms_server::tls;
use talos_kms_server::tls::inspect::{CertificateFacts, RENEWAL_WARNING, Validity};
use tokio::signal::unix::{SignalKind, signal};

pub async fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    logging::init(config.kms_log_level, config.root_log_level);

    let identity = tls::load_identity(
        &config.server_cert_file,
        &config.server_key_file,
        config.server_key_password.as_deref(),
    )?;
    if let Ok(leaf) = CertificateFacts::read(&identity.cert[0]) {
        log_certificate_validity(&leaf);
    }
    // Bound before the database is touched: a start that fails leaves nothing behind.
    let port = server::bind(config.listen)?;
    let metrics_port = config.metrics_address.map(server::bind).transpose()?;
    let store = Arc::new(SqliteStore::open(&config.database)?);
    if store.created() {
        tracing::warn!(
            path = %std::path::absolute(&config.database)
                .unwrap_or_else(|_| config.database.clone())
                .display(),
            "created a new, empty database; if this server had records before, stop it and \
             restore the database from a backup before nodes seal new keys"
        );
    }
    let audit = Arc::new(AuditLog::open(
        &config.audit_log,
        Some(config.audit_rotation),
    )?);
    if let Some(legacy) = &config.node_db_file {
        take_over_legacy(store.as_ref(), legacy).await?;
    }
    let options = ServerOptions {
        tls: tls::server_config(identity)?,
        store,
        audit,
        metrics: Arc::new(Metrics::new()),
        metrics_port,
        policy: Policy::default(),
    };
    serve_until_signal(port, options, OnHangup::KeepServing, |_| ()).await?;
    Ok(ExitCode::SUCCESS)
}

/// A certificate outside its validity period is served anyway, with an error in the log:
/// the likeliest cause after a power cut is this host's clock (a board without a real-time
/// clock boots in the past), and refusing to start would stop every node booting even when
/// the nodes' clocks are right.
fn log_certificate_validity(leaf: &CertificateFacts) {
    match leaf.validity() {
        Validity::NotYetValid => tracing::error!(
            subject = %leaf.subject,
            not_before = %leaf.not_before_text(),
            "the server certificate is not valid yet: nodes refuse it until then; if that time \
             has passed, this host's clock is wrong (see `timedatectl`); serving anyway"
        ),
        Validity::Expired => tracing::error!(
            subject = %leaf.subject,
            not_after = %leaf.not_after_text(),
            "the server certificate has expired: nodes refuse it; renew it and restart \
             (if it has not expired, this host's clock is wrong); serving anyway"
        ),
        Validity::Valid if leaf.expires_within(RENEWAL_WARNING) => tracing::warn!(
            subject = %leaf.subject,
            days_left = leaf.days_left(),
            "the server certificate expires soon; renew it"
        ),
        Validity::Valid => {}
    }
}

pub async fn take_over_legacy(store: &dyn Store, legacy: &Path) -> anyhow::Result<()> {
    match legacy_json::take_over(store, legacy).await? {
        TakeOver::NoFile => {}
        TakeOver::Unchanged => {
            tracing::debug!(file = %legacy.display(), "legacy database unchanged since its import")
        }
        TakeOver::Imported(report) => tracing::info!(
            file = %legacy.display(),
            imported = report.imported,
            already_present = report.skipped,
            "took over the legacy database (the file is left as it was)"
        ),
    }
    Ok(())
}

/// What SIGHUP does: the server keeps serving (a reload has nothing to reload yet); the
/// demo, a foreground toy, stops and cleans up as on Ctrl-C.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnHangup {
    KeepServing,
    Stop,
}

/// Serves until SIGTERM or SIGINT, then drains calls in flight and flushes the store.
/// SIGUSR1 and SIGUSR2, which would kill the process by default, are logged and ignored.
/// `on_ready` sees the bound address once the port accepts connections.
pub async fn serve_until_signal(
    port: Port,
    options: ServerOptions,
    on_hangup: OnHangup,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let watch = |kind: SignalKind, name: &str| {
        signal(kind).with_context(|| format!("cannot watch for {name}"))
    };
    let mut terminate = watch(SignalKind::terminate(), "SIGTERM")?;
    let mut interrupt = watch(SignalKind::interrupt(), "SIGINT")?;
    let mut hangup = watch(SignalKind::hangup(), "SIGHUP")?;
    let mut user1 = watch(SignalKind::user_defined1(), "SIGUSR1")?;
    let mut user2 = watch(SignalKind::user_defined2(), "SIGUSR2")?;
    let running = port.serve(options);
    tracing::info!(address = %running.local_addr(), "serving sidero.kms.KMSService");
    on_ready(running.local_addr());
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => match on_hangup {
                OnHangup::Stop => break,
                OnHangup::KeepServing => tracing::info!(
                    "SIGHUP: this version reloads nothing; still serving (a new certificate \
                     takes a restart)"
                ),
            },
            _ = user1.recv() => tracing::info!("SIGUSR1 ignored; still serving"),
            _ = user2.recv() => tracing::info!("SIGUSR2 ignored; still serving"),
        }
    }
    tracing::info!("stopping: finishing calls in flight");
    running.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}
