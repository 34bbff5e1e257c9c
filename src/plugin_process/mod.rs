//! Process isolation for transport plugins (`isolation = "process"`): the
//! supervisor that implements [`Pusher`] and [`FingerprintChecker`] by
//! talking to a child process (`retryq plugin-host`, see [`child`]) that
//! loads the library, so a plugin that segfaults, aborts, exits, hangs or
//! eats memory takes down only that child.
//!
//! Contract, as the worker sees it:
//! - calls are framed messages ([`protocol`]) with request IDs, so up to
//!   `concurrency` calls are in flight in one child at once;
//! - a child that dies fails only the calls in flight. When one call was in
//!   flight it is the culprit: its item gets a retryable failure whose text
//!   names the plugin, the signal or exit code and the call ("plugin echo:
//!   plugin host crashed with SIGSEGV in push"). When several were, none is
//!   charged yet: each is replayed alone on the restarted child, so only an
//!   item that crashes it alone is charged;
//! - a call with no answer by its deadline (plus a short grace) kills the
//!   child; the call fails as retryable, the other calls are replayed;
//! - a dead child is restarted on the next call after a backoff (100 ms,
//!   doubling to 30 s) that a call waits out when its deadline allows; five
//!   deaths within a minute is a crash loop: no restart for a minute, each
//!   call fails at once (the worker's circuit opens), logged as an error;
//! - what the plugin logs in the child reaches this process's tracing with
//!   target `retryq::plugin`, the plugin's name and its level.
//!
//! One file a concern, each using only those listed after it: `clients`
//! (the [`Pusher`] and [`FingerprintChecker`] the worker holds), `spawn`
//! (starting a child and creating the instance), `reader` (the thread
//! reading a child's answers), `supervisor` (restarts, crash loops, calls
//! and their deadlines, health), `conn` (a running child, the replies and
//! how a child ended); [`protocol`] is the wire format and [`child`] the
//! other end.

pub mod check;
pub mod child;
mod clients;
mod conn;
pub mod protocol;
mod reader;
mod spawn;
mod supervisor;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use retryq_plugin::host::PluginError;
use retryq_plugin::{FingerprintChecker, Pusher};
use serde::Serialize;

use crate::plugin::{Isolation, PluginSettings};

pub use clients::{ProcessChecker, ProcessPusher};
pub use conn::signal_name;
pub use supervisor::health_snapshot;

/// How the supervisor runs and restarts its child.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// The `retryq` binary (it serves `plugin-host`).
    pub program: PathBuf,
    /// Calls the child serves at once (the worker's `concurrency`).
    pub concurrency: usize,
    /// Address-space cap of the child, in bytes.
    pub memory_limit: Option<u64>,
    /// How long the child may take to load the library and create the
    /// instance.
    pub start_timeout: Duration,
    /// First restart delay after a death; doubles per death in a row.
    pub restart_backoff: Duration,
    /// Cap of the doubling restart delay.
    pub max_restart_backoff: Duration,
    /// Deaths within [`crash_loop_window`](Self::crash_loop_window) that
    /// make a crash loop.
    pub crash_loop_deaths: usize,
    /// How far back deaths count towards `crash_loop_deaths`.
    pub crash_loop_window: Duration,
    /// No restart for this long once in a crash loop.
    pub crash_loop_hold: Duration,
    /// Extra wait past a call's deadline before the child counts as hung (a
    /// plugin that honours the deadline answers right at it).
    pub hang_grace: Duration,
}

impl ProcessOptions {
    /// Defaults, with `program` as the plugin host.
    pub fn new(program: PathBuf) -> Self {
        ProcessOptions {
            program,
            concurrency: 4,
            memory_limit: None,
            start_timeout: Duration::from_secs(10),
            restart_backoff: Duration::from_millis(100),
            max_restart_backoff: Duration::from_secs(30),
            crash_loop_deaths: 5,
            crash_loop_window: Duration::from_secs(60),
            crash_loop_hold: Duration::from_secs(60),
            hang_grace: Duration::from_millis(250),
        }
    }

    /// Defaults, with this very executable as the plugin host (the daemon).
    pub fn this_executable() -> Result<Self, PluginError> {
        std::env::current_exe()
            .map(Self::new)
            .map_err(|e| PluginError::Io {
                plugin: "(plugin host)".into(),
                path: "the running executable".into(),
                reason: e.to_string(),
            })
    }
}

/// Which library the child loads, and the instance's settings.
#[derive(Debug, Clone)]
pub struct PluginTarget {
    /// The plugin as configured (a name or a path), for messages.
    pub label: String,
    /// The shared library the child loads, resolved from the label.
    pub path: PathBuf,
    /// Pinned SHA-256, checked by the child before loading.
    pub sha256: Option<String>,
    /// The instance's settings.
    pub settings: serde_json::Value,
}

/// What the supervisor has seen of its child (for stats and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PluginHealth {
    /// The plugin's name.
    pub plugin: String,
    /// Children started, the first included; `starts - 1` is the restarts.
    pub starts: u64,
    /// Children that died (crashed, exited, killed for hanging).
    pub deaths: u64,
    /// How the last one died, e.g. "crashed with SIGSEGV in push".
    pub last_death: Option<String>,
    /// In a crash loop: restarts are held back.
    pub crash_loop: bool,
    /// A child is running now.
    pub running: bool,
}

/// The library file a section names, found as the in-process loader finds
/// it but not loaded here: only the child loads it (and checks its
/// permissions and pinned hash).
fn target_of(spec: &PluginSettings, search_path: &[PathBuf]) -> Result<PluginTarget, PluginError> {
    let (label, path) = match (&spec.name, &spec.path) {
        (_, Some(path)) => (path.display().to_string(), path.clone()),
        (Some(name), None) => (
            name.clone(),
            retryq_plugin::host::resolve(name, &crate::plugin::effective_search_path(search_path))?,
        ),
        (None, None) => {
            return Err(PluginError::NotFound {
                plugin: "(none)".into(),
                looked_in: Vec::new(),
            })
        }
    };
    Ok(PluginTarget {
        label,
        path,
        sha256: spec.sha256.clone(),
        settings: serde_json::Value::Object(spec.settings.clone()),
    })
}

fn options_for(spec: &PluginSettings, concurrency: usize) -> Result<ProcessOptions, PluginError> {
    Ok(ProcessOptions {
        concurrency,
        memory_limit: spec.memory_limit,
        ..ProcessOptions::this_executable()?
    })
}

/// The pusher a `[pusher]` section names, in the daemon or in a child as
/// its `isolation` says; `concurrency` is the worker's.
pub fn pusher_for(
    spec: &PluginSettings,
    search_path: &[PathBuf],
    concurrency: usize,
) -> Result<Arc<dyn Pusher>, PluginError> {
    match spec.isolation {
        Isolation::InProcess => crate::plugin::load_pusher(spec, search_path),
        Isolation::Process => Ok(Arc::new(ProcessPusher::start(
            target_of(spec, search_path)?,
            options_for(spec, concurrency)?,
        )?)),
    }
}

/// The checker a `[checker]` section names, in the daemon or in a child.
pub fn checker_for(
    spec: &PluginSettings,
    search_path: &[PathBuf],
) -> Result<Arc<dyn FingerprintChecker>, PluginError> {
    match spec.isolation {
        Isolation::InProcess => crate::plugin::load_checker(spec, search_path),
        Isolation::Process => Ok(Arc::new(ProcessChecker::start(
            target_of(spec, search_path)?,
            options_for(spec, 1)?,
        )?)),
    }
}
