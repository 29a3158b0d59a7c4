//! `check`: validates everything `serve` would use, without serving or changing anything.

use std::path::Path;
use std::process::ExitCode;
use talos_kms_server::config::Config;
use talos_kms_server::store::legacy_json;
use talos_kms_server::store::{SqliteStore, Store};
use talos_kms_server::tls;
use talos_kms_server::tls::inspect::{CertificateFacts, RENEWAL_WARNING};

pub async fn run(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let mut ok = true;
    println!("config       {}: valid", config.path.display());
    println!("listen       {}", config.listen);

    match tls::load_identity(
        &config.server_cert_file,
        &config.server_key_file,
        config.server_key_password.as_deref(),
    ) {
        Ok(identity) => {
            println!(
                "key          {}: matches the certificate",
                config.server_key_file.display()
            );
            for (index, der) in identity.cert.iter().enumerate() {
                let role = if index == 0 {
                    "certificate "
                } else {
                    "  chain     "
                };
                match CertificateFacts::read(der) {
                    Ok(facts) => {
                        let days = facts.days_left();
                        let state = if days < 0 {
                            ok = false;
                            "EXPIRED"
                        } else if facts.expires_within(RENEWAL_WARNING) {
                            "renew soon"
                        } else {
                            "valid"
                        };
                        println!(
                            "{role} {} (issued by {}): {state}, {days} days left",
                            facts.subject, facts.issuer
                        );
                    }
                    Err(problem) => {
                        ok = false;
                        println!("{role} #{index}: {problem}");
                    }
                }
            }
            if let Err(e) = tls::server_config(identity) {
                ok = false;
                println!("tls          cannot build the TLS configuration: {e}");
            }
        }
        Err(e) => {
            ok = false;
            println!("certificate  {e}");
        }
    }

    let store = if config.database.exists() {
        match SqliteStore::open_existing(&config.database) {
            Ok(store) => {
                println!(
                    "database     {}: {} records",
                    config.database.display(),
                    store.count().await?
                );
                Some(store)
            }
            Err(e) => {
                ok = false;
                println!("database     {e}");
                None
            }
        }
    } else {
        println!(
            "database     {}: does not exist yet; the server creates it at start",
            config.database.display()
        );
        None
    };

    if let Some(legacy) = &config.node_db_file {
        match legacy_json::read(legacy) {
            Ok(None) => println!(
                "nodeDbFile   {}: absent, nothing to take over",
                legacy.display()
            ),
            Ok(Some(file)) => {
                let mut missing = file.records.len();
                if let Some(store) = &store {
                    missing = 0;
                    for record in &file.records {
                        if store.find_by_nonce(&record.nonce).await?.is_none() {
                            missing += 1;
                        }
                    }
                }
                println!(
                    "nodeDbFile   {}: {} legacy records, {missing} not yet in the database",
                    legacy.display(),
                    file.records.len()
                );
            }
            Err(e) => {
                ok = false;
                println!("nodeDbFile   {e}");
            }
        }
    }

    if ok {
        println!("ok");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("problems found: see above");
        Ok(ExitCode::FAILURE)
    }
}
