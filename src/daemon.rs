//! The daemon behind `retryq run`: takes the store's owner lock, opens the
//! configured store as that owner, loads the transport plugins, starts the
//! `RetryWorker` and the admin API in one actix System, and on SIGTERM or
//! SIGINT stops gracefully (the API stops accepting, pushes in flight finish
//! or have their leases released, the store is closed, the lock is let go)
//! before returning.
//!
//! Ownership (see [`crate::store::owner`]): the lock is taken before the
//! store is opened, so a second daemon on the same store fails to start
//! naming the pid that holds it; every lease an earlier instance left (a
//! `kill -9`) goes back to pending at once; the admin API's address is
//! written into the lock so the CLI can reach this daemon.

use std::sync::Arc;
use std::time::Duration;

use crate::admin::{self, record_worker_metrics, AdminState, RetryWorkerControl, WorkerControl};
use crate::config::{Settings, StoreBackend};
use crate::fleet::Fleet;
use crate::item::ItemId;
use crate::metrics::Metrics;
use crate::plugin::{describe_plugin, PluginError};
use crate::plugin_process::{checker_for, pusher_for};
use crate::store::owner::{OwnerInfo, OwnerLock};
use crate::store::{RetryQueue, StoreOptions};
use crate::worker::{RetryWorker, WorkerError};

/// How long a graceful stop waits for pushes in flight.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a starting daemon waits for the owner lock, and (files backend)
/// for a CLI command that holds the queue directory to let go of it.
pub const OWNER_LOCK_WAIT: Duration = Duration::from_secs(3);

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::error::QueueError),
    /// Another daemon owns the store (or the lock file cannot be used).
    #[error("cannot take ownership of the store: {0}")]
    Owner(#[source] crate::error::QueueError),
    /// A plugin could not be loaded.
    #[error("[{section}] {source}")]
    Plugin {
        /// `pusher` or `checker`.
        section: &'static str,
        /// What went wrong.
        source: PluginError,
    },
    /// The worker refused its configuration or failed to start.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The admin API could not start.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// The poison-item guard could not run.
    #[error(transparent)]
    Poison(#[from] crate::poison::PoisonError),
    /// Signal handling failed.
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run_until_signal(settings: Settings) -> Result<(), DaemonError> {
    let mut last_ref = None;
    let result = actix_rt::System::new().block_on(run(settings, &mut last_ref));
    // The store's last reference goes here, off the runtime: a PostgreSQL
    // store closes its connections with blocking calls, which panic on it.
    drop(last_ref);
    result
}

async fn run(
    settings: Settings,
    last_ref: &mut Option<Arc<dyn RetryQueue>>,
) -> Result<(), DaemonError> {
    let mut owner = take_ownership(&settings)?;
    let (queue, stale, fleet) = open_as_owner(&settings, owner.info())?;
    *last_ref = Some(queue.clone());
    let result = serve(&settings, queue.clone(), &mut owner, stale, fleet).await;
    if result.is_err() {
        // Stopped early: leave nothing open behind the lock. A close error
        // would only hide the error that stopped us.
        let _ = queue.close();
    }
    // Only now, with the store closed, may another daemon take over.
    drop(owner);
    result
}

/// Takes the store's owner lock, creating the directory it lives in the way
/// the stores create theirs (owner-only).
fn take_ownership(settings: &Settings) -> Result<OwnerLock, DaemonError> {
    let path = settings.store.owner_lock_path();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir).map_err(|e| {
            DaemonError::Owner(crate::error::QueueError::storage(
                "owner lock",
                std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())),
            ))
        })?;
    }
    let lock = OwnerLock::acquire(&path, OwnerInfo::this_process(), OWNER_LOCK_WAIT)
        .map_err(DaemonError::Owner)?;
    tracing::info!(
        lock = %path.display(),
        instance = %lock.info().instance_id,
        "took ownership of the store"
    );
    Ok(lock)
}

#[cfg(unix)]
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// The store opened, what earlier instances left in flight, and the fleet
/// when the store is a shared PostgreSQL one.
type Opened = (Arc<dyn RetryQueue>, Vec<ItemId>, Option<Fleet>);

/// Opens the store with `owner`'s instance ID on every claim, then returns
/// the leases of earlier instances to pending: holding the lock proves none
/// of them is alive, so waiting for their leases to expire helps nobody.
/// Also returns what those instances had in flight, for the poison-item
/// guard ([`crate::poison`]).
fn open_as_owner(settings: &Settings, owner: &OwnerInfo) -> Result<Opened, DaemonError> {
    let options = StoreOptions {
        instance_id: owner.instance_id.clone(),
        ..settings.store_options()
    };
    if settings.store.backend == StoreBackend::Postgres {
        // What other live daemons hold is theirs, not stale: the fleet
        // releases only the leases of daemons that are gone.
        let fleet = Fleet::open(settings.store.postgres.as_ref(), options)?;
        return Ok((fleet.queue(), Vec::new(), Some(fleet)));
    }
    let queue = open_waiting_for_cli(settings, options)?;
    let stale = match crate::poison::stale_in_flight(queue.as_ref(), &owner.instance_id) {
        Ok(stale) => stale,
        Err(e) => {
            let _ = queue.close();
            return Err(e.into());
        }
    };
    match queue.release_leases_except(&owner.instance_id) {
        Ok(0) => {}
        Ok(released) => tracing::info!(
            released,
            "released the leases of earlier instances: their items are pending again"
        ),
        Err(e) => {
            let _ = queue.close();
            return Err(e.into());
        }
    }
    Ok((queue, stale, None))
}

/// Opens the store. The files backend refuses a second opener while a CLI
/// command that started before we took the owner lock still holds the queue
/// directory; such a command is short, so retry for a moment.
fn open_waiting_for_cli(
    settings: &Settings,
    options: StoreOptions,
) -> Result<Arc<dyn RetryQueue>, DaemonError> {
    let deadline = std::time::Instant::now() + OWNER_LOCK_WAIT;
    loop {
        match crate::config::open_store(&settings.store, options.clone()) {
            Ok(queue) => return Ok(queue),
            Err(e)
                if settings.store.backend == StoreBackend::Files
                    && e.to_string().contains("is in use")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn serve(
    settings: &Settings,
    queue: Arc<dyn RetryQueue>,
    owner: &mut OwnerLock,
    stale: Vec<ItemId>,
    fleet: Option<Fleet>,
) -> Result<(), DaemonError> {
    let search_path = &settings.plugins.search_path;
    // In the daemon or in a plugin-host child, as [pusher] isolation says.
    let pusher = pusher_for(&settings.pusher, search_path, settings.worker.concurrency).map_err(
        |source| DaemonError::Plugin {
            section: "pusher",
            source,
        },
    )?;
    // Before the worker claims anything: what died in flight is judged
    // one item at a time, so a poison item cannot kill us at every start.
    crate::poison::recover(
        queue.as_ref(),
        &pusher,
        &settings.worker_config(),
        &crate::poison::marker_path(&settings.store.owner_lock_path()),
        stale,
    )?;
    let mut worker = RetryWorker::new(settings.worker_config(), queue.clone(), pusher)?;
    if settings.checker.is_configured() {
        let checker =
            checker_for(&settings.checker, search_path).map_err(|source| DaemonError::Plugin {
                section: "checker",
                source,
            })?;
        worker = worker.with_checker(checker);
    }
    let worker = Arc::new(worker);
    let metrics = Arc::new(Metrics::new());
    record_worker_metrics(&worker, metrics.clone());
    let admin_config = settings.admin.clone().with_token()?;
    let admin_tls = admin_config.tls_cert.is_some();
    let fleet_pause = match &fleet {
        Some(fleet) => fleet.apply_pause(&worker)?,
        None => None,
    };
    worker.start().await?;
    let fleet_link = fleet.as_ref().map(|f| f.link(worker.clone(), fleet_pause));
    let console = Arc::new(console_state(settings));
    console.feed.attach(&worker);
    let control: Arc<dyn WorkerControl> = match &fleet {
        Some(fleet) => fleet.control(worker.clone()),
        None => Arc::new(RetryWorkerControl::new(worker.clone())),
    };
    let state = AdminState::new(queue.clone(), control, metrics).with_console(console.clone());
    let server = match admin::bind(admin_config, state) {
        Ok(server) => server,
        Err(e) => {
            worker.stop(STOP_TIMEOUT).await?;
            return Err(e.into());
        }
    };
    // Tell the CLI where to reach us. The address a client can dial: an
    // unspecified listen address (0.0.0.0) is reached through loopback.
    let mut reachable = server.local_addr();
    if reachable.ip().is_unspecified() {
        reachable.set_ip(match reachable {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    // With TLS the scheme goes too, so the CLI speaks HTTPS to us.
    let published = if admin_tls {
        format!("https://{reachable}")
    } else {
        reachable.to_string()
    };
    if let Err(e) = owner.set_admin_addr(published) {
        // Delivery works without it; only the CLI cannot find us.
        tracing::warn!(error = %e, "cannot record the admin address in the owner lock; the CLI will not reach this daemon");
    }
    tracing::info!(
        admin = %server.local_addr(),
        store = %settings.store.location(),
        pusher = %settings.pusher.describe(),
        "retryq running"
    );
    let handle = server.handle();
    let serving = actix_rt::spawn(server.run());

    let mut terminate =
        actix_rt::signal::unix::signal(actix_rt::signal::unix::SignalKind::terminate())
            .map_err(DaemonError::Signal)?;
    tokio::select! {
        _ = actix_rt::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
    }
    // Open event streams would hold the graceful stop for its whole timeout.
    console.feed.close();
    handle.stop(true).await;
    let _ = serving.await;
    if let Some(link) = fleet_link {
        link.stop();
    }
    worker.stop(STOP_TIMEOUT).await?;
    queue.close()?;
    tracing::info!("retryq stopped; nothing in flight was lost");
    Ok(())
}

/// The console's state: its live feed, the store's limits and what the
/// loaded plugins say about themselves (already loaded: this only reads).
fn console_state(settings: &Settings) -> admin::console::ConsoleState {
    let search_path = &settings.plugins.search_path;
    let mut plugins = Vec::new();
    let sections = [
        ("pusher", &settings.pusher, true),
        (
            "checker",
            &settings.checker,
            settings.checker.is_configured(),
        ),
    ];
    for (role, spec, configured) in sections {
        if !configured {
            continue;
        }
        match describe_plugin(role, spec, search_path) {
            Ok(info) => plugins.push(info),
            Err(e) => {
                tracing::warn!(section = role, error = %e, "cannot describe the loaded plugin")
            }
        }
    }
    admin::console::ConsoleState::new(crate::clock::system_clock()).with_info(
        admin::console::DaemonInfo {
            max_bytes: settings.store.options.max_bytes,
            max_items: settings.store.options.max_items,
            plugins,
            ..Default::default()
        },
    )
}
