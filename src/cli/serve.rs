//! `serve`: the server itself.

use anyhow::Context;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use talos_kms_server::config::Config;
use talos_kms_server::logging;
use talos_kms_server::policy::Policy;
use talos_kms_server::server::{self, ServerOptions};
use talos_kms_server::store::legacy_json::{self, TakeOver};
use talos_kms_server::store::{SqliteStore, Store};
use talos_kms_server::tls;
use talos_kms_server::tls::inspect::{CertificateFacts, RENEWAL_WARNING};

pub async fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    logging::init(config.kms_log_level, config.root_log_level);

    let identity = tls::load_identity(
        &config.server_cert_file,
        &config.server_key_file,
        config.server_key_password.as_deref(),
    )?;
    if let Ok(leaf) = CertificateFacts::read(&identity.cert[0])
        && leaf.expires_within(RENEWAL_WARNING)
    {
        tracing::warn!(
            subject = %leaf.subject,
            days_left = leaf.days_left(),
            "the server certificate expires soon or has expired; renew it"
        );
    }
    let store = Arc::new(SqliteStore::open(&config.database)?);
    if let Some(legacy) = &config.node_db_file {
        take_over_legacy(store.as_ref(), legacy).await?;
    }
    serve_until_signal(
        ServerOptions {
            bind: config.listen,
            tls: tls::server_config(identity)?,
            store,
            policy: Policy::default(),
        },
        |_| (),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
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

/// Serves until SIGTERM or SIGINT, then drains calls in flight and flushes the store.
/// `on_ready` sees the bound address once the port accepts connections.
pub async fn serve_until_signal(
    options: ServerOptions,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let running = server::start(options)?;
    tracing::info!(address = %running.local_addr(), "serving sidero.kms.KMSService");
    on_ready(running.local_addr());
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: finishing calls in flight");
    running.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}
