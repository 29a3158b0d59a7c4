//! Logging with `tracing`, at the levels the legacy config keys name: `kmsLogLevel` for this
//! server's own messages, `rootLogLevel` for everything else.

use std::io::IsTerminal;
use std::str::FromStr;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl FromStr for LogLevel {
    type Err = String;

    /// Accepts the legacy server's names, log4j's and java.util.logging's, in any case.
    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text.to_ascii_uppercase().as_str() {
            "OFF" => LogLevel::Off,
            "ERROR" | "SEVERE" | "FATAL" => LogLevel::Error,
            "WARN" | "WARNING" => LogLevel::Warn,
            "INFO" | "CONFIG" => LogLevel::Info,
            "DEBUG" | "FINE" => LogLevel::Debug,
            "TRACE" | "FINER" | "FINEST" | "ALL" => LogLevel::Trace,
            _ => {
                return Err(format!(
                    "{text:?} is not a log level; use OFF, ERROR, WARN, INFO, DEBUG or TRACE"
                ));
            }
        })
    }
}

impl From<LogLevel> for LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Off => LevelFilter::OFF,
            LogLevel::Error => LevelFilter::ERROR,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Trace => LevelFilter::TRACE,
        }
    }
}

/// Logs to stderr (the journal, under systemd). Safe to call more than once.
pub fn init(kms: LogLevel, root: LogLevel) {
    let filter = Targets::new()
        .with_default(LevelFilter::from(root))
        .with_target(env!("CARGO_CRATE_NAME"), LevelFilter::from(kms));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(filter)
        .try_init();
}
