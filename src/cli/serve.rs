//! `serve`: the server itself.

use anyhow::Context;
use sd_notify::NotifyState;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use talos_kms_server::audit::{self, AuditLog};
use talos_kms_server::config::Config;
use talos_kms_server::custody::{self, BeforeServing, Custodian, KeySourceConfig, Unsealing};
use talos_kms_server::logging;
use talos_kms_server::metrics::Metrics;
use talos_kms_server::server::{self, Port, Purpose, ServerOptions};
use talos_kms_server::store::legacy_json::{self, TakeOver};
use talos_kms_server::store::{self, Database, SqliteStore, Store};
use talos_kms_server::tls;
use talos_kms_server::tls::inspect::{CertificateFacts, RENEWAL_WARNING, Validity};
use talos_kms_server::tls::reload::{self, IdentityFiles, Reload, ReloadingIdentity};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

pub async fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    logging::init(config.kms_log_level, config.root_log_level);
    if let Err(error) = talos_kms_server::hardening::forbid_core_dumps() {
        tracing::warn!(%error, "cannot disable core dumps; a crash could write secrets to disk");
    }

    let files = IdentityFiles {
        cert: config.server_cert_file.clone(),
        key: config.server_key_file.clone(),
        password: config.server_key_password.clone(),
    };
    let pair = tls::load_identity(&files.cert, &files.key, files.password.as_deref())?;
    let metrics = Arc::new(Metrics::new());
    if let Ok(leaf) = CertificateFacts::read(&pair.cert[0]) {
        log_certificate_validity(&leaf);
        metrics.certificate(leaf.not_after);
    }
    let identity = Arc::new(ReloadingIdentity::new(files, pair));
    // Bound before the database is touched: a start that fails leaves nothing behind.
    let port = server::bind(config.listen, Purpose::Kms)?;
    let metrics_port = config
        .metrics_address
        .map(|address| server::bind(address, Purpose::Metrics))
        .transpose()?;
    let threshold = match config.key_source {
        Some(KeySourceConfig::Shamir { threshold, shares }) => Some((threshold, shares)),
        _ => None,
    };
    // Removed again when the server stops.
    let admin_socket = threshold
        .map(|_| custody::admin_socket::bind(&config.admin_socket))
        .transpose()?;
    let opened = store::open(&config.database).await?;
    let below = Arc::clone(&opened.store);
    let guarded = custody::guard(
        opened.store,
        config.key_source.as_ref(),
        Arc::clone(&metrics),
    )
    .await?;
    let store = guarded.store;
    if let Some(custodian) = &guarded.custodian {
        announce_custody(custodian, config.key_source.as_ref(), &config.admin_socket);
        custodian.spawn_rewrap();
    }
    let sealed = guarded.custodian.filter(|custodian| custodian.is_sealed());
    let taking_over = config
        .node_db_file
        .as_deref()
        .filter(|legacy| legacy.exists());
    if let (true, Some(legacy)) = (opened.created, taking_over) {
        tracing::info!(
            database = %config.database,
            legacy = %legacy.display(),
            "created a new database to take over the legacy records into"
        );
    } else if opened.created {
        let database = match &config.database {
            Database::Sqlite(path) => std::path::absolute(path)
                .unwrap_or_else(|_| path.clone())
                .display()
                .to_string(),
            other => other.to_string(),
        };
        tracing::warn!(
            %database,
            "created a new, empty database; if this server had records before, stop it and \
             restore the database from a backup before nodes seal new keys"
        );
    }
    let audit_key = match &config.audit_key_file {
        Some(path) => Some(audit::checkpoint_key(
            &*audit::chain::read_key_file(path).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    let audit = Arc::new(
        AuditLog::open(&config.audit_log, Some(config.audit_rotation))?.checkpointed(audit_key)?,
    );
    if let (Some(legacy), None) = (&config.node_db_file, &sealed) {
        take_over_legacy(store.as_ref(), legacy).await?;
    }
    let _unsealing = match (admin_socket, sealed, threshold) {
        (Some(socket), Some(custodian), Some(threshold)) => {
            // Taken over once the shares came, before a node is answered.
            let before_serving = config.node_db_file.clone().map(take_over_when_unsealed);
            let unsealing = Unsealing::new(custodian, below, threshold, before_serving);
            Some(socket.serve(Arc::new(unsealing), Arc::clone(&audit)))
        }
        _ => None,
    };
    let options = ServerOptions {
        tls: tls::server_config_with(identity.clone())?,
        store,
        audit,
        metrics,
        metrics_port,
        rules: config.policy.clone(),
        limits: config.limits.clone(),
        take_over: Arc::clone(&config.take_over),
    };
    serve_until_signal(port, options, OnHangup::Reload(identity), |_| ()).await?;
    if let Some(path) = config.database.sqlite_path() {
        report_journal_left(path);
    }
    Ok(ExitCode::SUCCESS)
}

fn announce_custody(custodian: &Custodian, source: Option<&KeySourceConfig>, socket: &Path) {
    let source = source.map(KeySourceConfig::describe).unwrap_or_default();
    if custodian.is_sealed() {
        let socket = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
        tracing::warn!(key_source = %source, admin_socket = %socket.display(),
            "sealed: every seal and unseal is answered UNAVAILABLE (nodes retry) until \
             operators give their key shares with `talos-kms-server unseal-server`");
    } else {
        tracing::info!(key_source = %source, data_keys = ?custodian.versions(),
            "records are wrapped and policy state authenticated under the key source");
    }
}

/// After a clean stop the database file alone holds every record, unless another program
/// still had it open: then the operator must know that a copy of the file alone is not enough.
fn report_journal_left(database: &Path) {
    let left = SqliteStore::journal_files(database);
    if left.is_empty() {
        return;
    }
    let files: Vec<String> = left.iter().map(|f| f.display().to_string()).collect();
    tracing::error!(
        database = %database.display(),
        journal = %files.join(", "),
        "stopped, but the database journal is still beside the database (another command \
         had it open): recent records may be only in the journal, so copy the database \
         together with these files, or use `db backup`, never the database file alone"
    );
}

/// How long reading the certificate files may take before the reload is given up: a local
/// file is read in microseconds; a hung network file system never answers.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What asked for a reload.
enum Trigger {
    FilesChanged,
    /// SIGHUP: read even when the files look unchanged, and tell systemd.
    Hangup,
}

/// Reloads one at a time, away from the loop that handles signals: the files are read on a
/// blocking thread with a deadline, so that no file (a FIFO, a hung mount) keeps SIGTERM
/// from stopping the server or a later SIGHUP from working.
fn spawn_reloader(
    identity: Arc<ReloadingIdentity>,
    metrics: Arc<Metrics>,
    status: String,
) -> mpsc::Sender<Trigger> {
    let (sender, mut triggers) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Some(trigger) = triggers.recv().await {
            let always = matches!(trigger, Trigger::Hangup);
            if always {
                let mut reloading = vec![NotifyState::Reloading];
                reloading.extend(NotifyState::monotonic_usec_now().ok());
                systemd(&reloading);
            }
            let reading = Arc::clone(&identity);
            let reload = tokio::time::timeout(
                RELOAD_TIMEOUT,
                tokio::task::spawn_blocking(move || reading.reload(always)),
            )
            .await
            .unwrap_or_else(|_| {
                Ok(Reload::Refused(format!(
                    "reading the certificate files took more than {} s (a hung file system?)",
                    RELOAD_TIMEOUT.as_secs()
                )))
            })
            .unwrap_or_else(|e| Reload::Refused(format!("the reload failed: {e}")));
            let name = if always { "SIGHUP" } else { "files changed" };
            report_reload(reload, name, &metrics);
            if always {
                systemd(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
        }
    });
    sender
}

/// Logs what a reload did, once, and counts it.
fn report_reload(reload: Reload, trigger: &str, metrics: &Metrics) {
    match reload {
        Reload::Unchanged => {
            tracing::info!(
                trigger,
                "certificate files unchanged; still serving the same pair"
            )
        }
        Reload::Reloaded(leaf) => {
            metrics.reloaded();
            metrics.certificate(leaf.not_after);
            tracing::info!(
                trigger,
                subject = %leaf.subject,
                not_after = %leaf.not_after_text(),
                "new certificate in use for new connections"
            );
        }
        Reload::Refused(problem) => {
            metrics.reload_failed();
            tracing::error!(
                trigger,
                %problem,
                "the new certificate and key cannot be used; the previous pair keeps serving"
            );
        }
    }
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

fn take_over_when_unsealed(legacy: std::path::PathBuf) -> BeforeServing {
    Box::new(move |store| {
        let legacy = legacy.clone();
        Box::pin(async move {
            take_over_legacy(store.as_ref(), &legacy)
                .await
                .map_err(|e| format!("the key is right, but {e:#}"))
        })
    })
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

/// What SIGHUP does: the server reloads its certificate (as it does when the files
/// change); the demo, a foreground toy, stops and cleans up as on Ctrl-C.
pub enum OnHangup {
    Reload(Arc<ReloadingIdentity>),
    Stop,
}

/// Serves until SIGTERM or SIGINT, then drains calls in flight and flushes the store.
/// SIGUSR1 and SIGUSR2, which would kill the process by default, are logged and ignored.
/// Under systemd (`Type=notify-reload`) it reports READY, RELOADING, STOPPING and watchdog
/// pings. `on_ready` sees the bound address once the port accepts connections.
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
    let metrics = Arc::clone(&options.metrics);
    // Kept alive while serving: dropping the watcher stops it.
    let (_watcher, mut changes) = match &on_hangup {
        OnHangup::Reload(identity) => match reload::watch(identity) {
            Ok((watcher, changes)) => (Some(watcher), Some(changes)),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "cannot watch the certificate files; SIGHUP still reloads them"
                );
                (None, None)
            }
        },
        OnHangup::Stop => (None, None),
    };
    let running = port.serve(options)?;
    let address = running.local_addr();
    tracing::info!(%address, "serving sidero.kms.KMSService");
    on_ready(address);
    let status = format!("serving on {address}");
    let reloads = match &on_hangup {
        OnHangup::Reload(identity) => Some(spawn_reloader(
            Arc::clone(identity),
            Arc::clone(&metrics),
            status.clone(),
        )),
        OnHangup::Stop => None,
    };
    systemd(&[NotifyState::Ready, NotifyState::Status(&status)]);
    let watchdog = sd_notify::watchdog_enabled().map(|interval| tokio::spawn(watchdog(interval)));
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            Some(()) = async { changes.as_mut()?.recv().await } => {
                if let Some(reloads) = &reloads {
                    // A full queue holds a reload that will read these files anyway.
                    let _ = reloads.try_send(Trigger::FilesChanged);
                }
            }
            _ = hangup.recv() => match &reloads {
                None => break,
                Some(reloads) => {
                    let _ = reloads.try_send(Trigger::Hangup);
                }
            },
            _ = user1.recv() => tracing::info!("SIGUSR1 ignored; still serving"),
            _ = user2.recv() => tracing::info!("SIGUSR2 ignored; still serving"),
        }
    }
    tracing::info!("stopping: finishing calls in flight");
    systemd(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    running.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Tells systemd, when it started us with a notify socket; nothing otherwise.
fn systemd(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// Pings systemd's watchdog at half its interval, as sd_watchdog_enabled(3) advises: a
/// server whose runtime stalls stops pinging and is restarted.
async fn watchdog(interval: std::time::Duration) {
    let mut ticks = tokio::time::interval(interval / 2);
    loop {
        ticks.tick().await;
        systemd(&[NotifyState::Watchdog]);
    }
}
