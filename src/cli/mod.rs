//! The `retryq` command line: argument definitions (clap derive) and the
//! dispatch to each command. This is the binary edge: errors are `anyhow`
//! here, and [`exit_code`] maps them to the documented exit codes.
//!
//! Exit codes:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | any other failure |
//! | 2 | usage or configuration error (also a report over `admin.max_body`, or not JSON) |
//! | 3 | the disk is full (the store said so, or the daemon answered 507 `disk_full`) |
//! | 4 | the command needs a running daemon (`pause`, `resume`) and none owns the store |
//!
//! Errors are one line on stderr; results go to stdout (as JSON with
//! `--json`). While a `retryq run` daemon owns the store, the store commands
//! go through its admin API (see [`commands`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use retryq::item::ItemId;

mod commands;
mod context;
mod daemon_client;
mod keys;
pub mod logging;
mod migrate;
mod migrate_sqlite;
mod output;
mod plugin_check;

pub use commands::run_command;

/// A mistake in how the command was called (exit code 2), found after clap
/// parsed the arguments.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code: the disk is full.
pub const EXIT_DISK_FULL: i32 = 3;
/// Exit code: the command needs a running daemon and none owns the store.
pub const EXIT_NO_DAEMON: i32 = 4;

/// The exit code for an error (see the module doc): a full disk anywhere
/// in the chain wins, then a missing daemon, then usage and configuration
/// errors; 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    let disk_full = err.chain().any(|e| {
        matches!(
            e.downcast_ref::<retryq::QueueError>(),
            Some(retryq::QueueError::DiskFull { .. })
        ) || e
            .downcast_ref::<daemon_client::DaemonApiError>()
            .is_some_and(|api| api.kind == "disk_full")
    });
    if disk_full {
        return EXIT_DISK_FULL;
    }
    if err
        .chain()
        .any(|e| e.downcast_ref::<daemon_client::NoDaemon>().is_some())
    {
        return EXIT_NO_DAEMON;
    }
    let usage = err.chain().any(|e| {
        e.downcast_ref::<UsageError>().is_some()
            || e.downcast_ref::<retryq::config::ConfigError>().is_some()
    });
    if usage {
        2
    } else {
        1
    }
}

/// The error and its causes on one line, skipping a cause whose text the
/// message before it already contains (errors that print their source).
pub fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// retryq: a durable store-and-forward retry queue.
///
/// Configuration layers, later wins: built-in defaults, CONFIG_DIR/default.toml
/// (./config/default.toml unless --config-dir), each --config FILE in order,
/// then RETRYQ__SECTION__KEY environment variables.
#[derive(Debug, Parser)]
#[command(name = "retryq", version, propagate_version = true)]
pub struct Cli {
    /// A configuration file layered over the defaults (repeatable; later wins).
    #[arg(long = "config", short = 'c', global = true, value_name = "FILE")]
    pub config: Vec<PathBuf>,

    /// Directory holding default.toml [default: ./config, optional there].
    #[arg(long, global = true, value_name = "DIR", env = "RETRYQ_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,

    /// Print results as JSON (for scripts).
    #[arg(long, global = true)]
    pub json: bool,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: deliver queued items and serve the admin API until
    /// SIGTERM or SIGINT.
    Run,
    /// Queue a JSON report (from FILE, or stdin with `-` or no FILE); prints its ID.
    Enqueue(EnqueueArgs),
    /// List items (no payloads).
    List(ListArgs),
    /// Show one item.
    Show {
        /// Item ID (exact).
        #[arg(value_parser = parse_item_id)]
        id: ItemId,
        /// Include the payload (the report).
        #[arg(long)]
        payload: bool,
    },
    /// Queue statistics.
    Stats,
    /// Delete one item.
    Delete {
        /// Item ID (exact).
        #[arg(value_parser = parse_item_id)]
        id: ItemId,
    },
    /// Bring dead letters back to pending, due now (attempts reset).
    Retry(RetryArgs),
    /// Delete every item in a status.
    Purge {
        /// The status to purge.
        #[arg(long, value_enum)]
        status: StatusArg,
    },
    /// Stop delivery on the running daemon until `resume` (needs `retryq run`).
    Pause {
        /// Why, shown by `stats` [default: "paused by an operator"].
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume delivery on the running daemon (also after a 401 pause or an
    /// open circuit).
    Resume,
    /// Check the SQLite store and salvage it if it is damaged (a stopped
    /// store only: refused while `retryq run` owns it).
    Repair,
    /// Remove items older than the TTL and expired dead letters.
    Cleanup {
        /// TTL to apply [default: worker.ttl from the configuration].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// The retry schedule and total backoff time the configuration gives.
    Schedule {
        /// Attempts to plan for [default: worker.max_attempts].
        #[arg(long)]
        max_attempts: Option<u32>,
    },
    /// Plugin tools.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Import a Go SDK retry-queue directory, or a SQLite store, into the
    /// configured store (e.g. a fleet's PostgreSQL).
    Migrate {
        /// The Go SDK queue directory or SQLite database file (left
        /// untouched: it is only read).
        #[arg(long, value_name = "DIR|FILE")]
        from: PathBuf,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Keys that seal payloads at rest ([store.encryption]).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Internal: serve one plugin library to a daemon over stdin/stdout
    /// (`isolation = "process"`; see retryq::plugin_process).
    #[command(hide = true)]
    PluginHost {
        /// The library file.
        #[arg(long)]
        path: PathBuf,
        /// The plugin as configured, for messages.
        #[arg(long)]
        label: String,
        /// Pinned SHA-256 of the library.
        #[arg(long)]
        sha256: Option<String>,
        /// Calls served at once.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Address-space cap in bytes.
        #[arg(long)]
        memory_limit: Option<u64>,
    },
}

/// `retryq plugins ...`.
#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// Load a plugin, run the SDK's conformance checks and print its metadata.
    Check {
        /// A plugin name (looked up on plugins.search_path) or a library path.
        plugin: String,
        /// Settings (JSON) handed to the plugin [default: the [pusher] settings
        /// when it is the configured pusher, else {}].
        #[arg(long, value_name = "JSON")]
        settings: Option<String>,
    },
}

/// `retryq config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the layered configuration (exit 0, or 2 with the error).
    Check,
    /// Print the effective configuration, secrets redacted (TOML, or JSON with --json).
    Show,
}

/// `retryq enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// JSON file to queue; `-` or nothing reads stdin.
    #[arg(value_name = "FILE|-")]
    pub file: Option<PathBuf>,
    /// Report type (findings, assets, heartbeat or any name).
    #[arg(long = "type", default_value = "findings")]
    pub item_type: String,
    /// Fingerprint [default: SHA-256 of the compact payload].
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// Item ID [default: a new UUIDv7].
    #[arg(long, value_parser = parse_item_id)]
    pub id: Option<ItemId>,
    /// Producing agent.
    #[arg(long, default_value = "")]
    pub agent_id: String,
    /// Producing scanner.
    #[arg(long, default_value = "")]
    pub scanner_name: String,
    /// What was scanned.
    #[arg(long, default_value = "")]
    pub target_path: String,
    /// Attempts allowed [default: worker.max_attempts].
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// An attribute for the transport (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
    pub attrs: Vec<(String, String)>,
}

/// `retryq list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only items in this status.
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// Only items of this type.
    #[arg(long = "type")]
    pub item_type: Option<String>,
    /// Only pending items due now.
    #[arg(long)]
    pub ready: bool,
    /// Most items shown.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Items skipped first.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Sort field.
    #[arg(long, value_enum, default_value_t = OrderArg::CreatedAt)]
    pub order_by: OrderArg,
    /// Sort descending.
    #[arg(long)]
    pub desc: bool,
}

/// `retryq retry`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RetryArgs {
    /// The dead letter to bring back.
    #[arg(value_parser = parse_item_id)]
    pub id: Option<ItemId>,
    /// Bring back every dead letter.
    #[arg(long)]
    pub failed: bool,
}

/// An item status on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    /// Waiting or due.
    Pending,
    /// Claimed for delivery.
    Processing,
    /// Dead letters.
    Failed,
}

impl From<StatusArg> for retryq::ItemStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Pending => retryq::ItemStatus::Pending,
            StatusArg::Processing => retryq::ItemStatus::Processing,
            StatusArg::Failed => retryq::ItemStatus::Failed,
        }
    }
}

/// A `list` sort field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum OrderArg {
    /// Creation time.
    CreatedAt,
    /// Next due time.
    NextRetry,
    /// Attempts made.
    Attempts,
}

impl From<OrderArg> for retryq::store::OrderBy {
    fn from(o: OrderArg) -> Self {
        match o {
            OrderArg::CreatedAt => retryq::store::OrderBy::CreatedAt,
            OrderArg::NextRetry => retryq::store::OrderBy::NextRetry,
            OrderArg::Attempts => retryq::store::OrderBy::Attempts,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (expected a duration such as \"30s\", \"5m\" or \"7d\")"))
}

fn parse_attr(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// An item ID from the command line, checked as it is parsed: a bad one is
/// a usage error before anything is opened.
fn parse_item_id(text: &str) -> Result<ItemId, retryq::QueueError> {
    ItemId::parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_full() -> retryq::QueueError {
        retryq::QueueError::DiskFull {
            op: "enqueue",
            source: "No space left on device".into(),
        }
    }

    #[test]
    fn exit_codes_name_the_kind_of_failure_wherever_it_sits_in_the_chain() {
        let direct = anyhow::Error::from(disk_full()).context("cannot enqueue");
        assert_eq!(exit_code(&direct), EXIT_DISK_FULL);
        let through_daemon = anyhow::Error::from(daemon_client::DaemonApiError {
            pid: 7,
            status: 507,
            kind: "disk_full".to_owned(),
            message: "the disk is full".to_owned(),
        });
        assert_eq!(exit_code(&through_daemon), EXIT_DISK_FULL);
        // A full queue is no full disk.
        let queue_full = anyhow::Error::from(daemon_client::DaemonApiError {
            pid: 7,
            status: 507,
            kind: "queue_full".to_owned(),
            message: "the queue is full".to_owned(),
        });
        assert_eq!(exit_code(&queue_full), 1);
        let no_daemon = anyhow::Error::from(daemon_client::NoDaemon {
            store: "q.db".to_owned(),
            command: "pause",
        });
        assert_eq!(exit_code(&no_daemon), EXIT_NO_DAEMON);
        let usage = anyhow::Error::from(UsageError("bad".to_owned())).context("enqueue");
        assert_eq!(exit_code(&usage), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("anything else")), 1);
    }
}
