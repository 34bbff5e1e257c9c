//! Store ownership: which running daemon may claim from a store.
//!
//! A `retryq run` daemon takes an exclusive owner lock on its store before
//! it delivers anything: an `flock` on a lock file beside the store (see
//! [`owner_lock_path`]), holding an [`OwnerInfo`] as JSON. The kernel drops
//! the lock when the process dies, however it dies, so a lock is never
//! stale and needs no timeout.
//!
//! What the lock decides:
//! - **One owner.** A second daemon on the same store fails to start with
//!   [`QueueError::StoreInUse`], naming the pid that holds it.
//! - **Leases.** Every claim records the owner's fresh instance ID
//!   ([`new_instance_id`]). A new owner knows that no earlier instance is
//!   alive, so it returns every lease they held to pending at once
//!   ([`crate::store::RetryQueue::release_leases_except`]) instead of
//!   waiting for the leases to expire. Expiry stays the safety net.
//! - **The CLI.** The admin commands never take the owner lock and never
//!   claim. When [`OwnerLock::holder`] says a daemon owns the store, they
//!   go through that daemon's admin API, whose address the daemon wrote
//!   into the lock file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{QueueError, QueueResult};

/// What the owner writes into its lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerInfo {
    /// PID of the owning process, for messages: the lock, not the PID, proves it alive.
    pub pid: u32,
    /// The owner's instance ID, recorded on each of its claims.
    pub instance_id: String,
    /// Where the owner serves its admin API (`host:port`, or
    /// `https://host:port` when it serves TLS), once it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<String>,
    /// When the owner took the lock.
    pub since: DateTime<Utc>,
}

impl OwnerInfo {
    /// This process, as a new owner with a fresh instance ID.
    pub fn this_process() -> Self {
        OwnerInfo {
            pid: std::process::id(),
            instance_id: new_instance_id(),
            admin_addr: None,
            since: Utc::now(),
        }
    }

    /// "pid N (instance ID)", for messages.
    pub fn describe(&self) -> String {
        format!("pid {} (instance {})", self.pid, self.instance_id)
    }
}

/// A fresh instance ID: a UUIDv7, so instances sort by start time.
pub fn new_instance_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The owner lock file of a store: `<database>.owner.lock` beside a SQLite
/// database, `.retryq.owner.lock` inside a queue directory.
pub fn owner_lock_path(store_path: &Path, store_is_directory: bool) -> PathBuf {
    if store_is_directory {
        store_path.join(OWNER_LOCK_FILE)
    } else {
        let mut name = store_path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".owner.lock");
        store_path.with_file_name(name)
    }
}

/// Name of the owner lock file inside a queue directory.
pub const OWNER_LOCK_FILE: &str = ".retryq.owner.lock";

/// An owner lock held by this process; dropping it releases the lock.
#[derive(Debug)]
pub struct OwnerLock {
    file: File,
    path: PathBuf,
    info: OwnerInfo,
}

impl OwnerLock {
    /// Takes the owner lock at `path` for `info`, waiting up to `wait` for
    /// a holder to let go (a CLI command that briefly held the files
    /// backend's lock, say). Fails with [`QueueError::StoreInUse`] naming
    /// the holder when it is still held after that.
    pub fn acquire(path: &Path, info: OwnerInfo, wait: Duration) -> QueueResult<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| QueueError::storage("owner lock", with_path(path, e)))?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    if std::time::Instant::now() >= deadline {
                        let holder = read_info(&mut file)
                            .map(|i| i.describe())
                            .unwrap_or_else(|| "another process".to_owned());
                        return Err(QueueError::StoreInUse {
                            path: path.display().to_string(),
                            holder,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(QueueError::storage("owner lock", with_path(path, e)))
                }
            }
        }
        let mut lock = OwnerLock {
            file,
            path: path.to_path_buf(),
            info,
        };
        lock.write_info()?;
        Ok(lock)
    }

    /// Who holds the lock at `path`, if anyone does: `None` when the file
    /// is missing or nobody holds it. Takes nothing: a free lock is left
    /// free.
    pub fn holder(path: &Path) -> QueueResult<Option<OwnerInfo>> {
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(QueueError::storage("owner lock", with_path(path, e))),
        };
        // A shared lock succeeds only when no owner holds the exclusive one.
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                Ok(None)
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                Ok(Some(read_info(&mut file).unwrap_or(OwnerInfo {
                    pid: 0,
                    instance_id: String::new(),
                    admin_addr: None,
                    since: Utc::now(),
                })))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                Err(QueueError::storage("owner lock", with_path(path, e)))
            }
        }
    }

    /// The owner's details, as written to the lock file.
    pub fn info(&self) -> &OwnerInfo {
        &self.info
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records where the owner serves its admin API, for the CLI.
    pub fn set_admin_addr(&mut self, addr: String) -> QueueResult<()> {
        self.info.admin_addr = Some(addr);
        self.write_info()
    }

    fn write_info(&mut self) -> QueueResult<()> {
        let json =
            serde_json::to_vec(&self.info).map_err(|e| QueueError::storage("owner lock", e))?;
        let path = self.path.clone();
        let io = |e| QueueError::storage("owner lock", with_path(&path, e));
        self.file.set_len(0).map_err(io)?;
        self.file.seek(SeekFrom::Start(0)).map_err(io)?;
        self.file.write_all(&json).map_err(io)?;
        self.file.flush().map_err(io)
    }
}

fn read_info(file: &mut File) -> Option<OwnerInfo> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

fn with_path(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = owner_lock_path(&dir.path().join("queue.db"), false);
        assert!(path.ends_with("queue.db.owner.lock"));
        let first = OwnerLock::acquire(&path, OwnerInfo::this_process(), Duration::ZERO).unwrap();
        let err = OwnerLock::acquire(&path, OwnerInfo::this_process(), Duration::from_millis(120))
            .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.kind(), "store_in_use", "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains(&first.info().instance_id), "{text}");
    }

    #[test]
    fn holder_reports_the_owner_and_its_admin_address_then_nothing_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = owner_lock_path(dir.path(), true);
        assert_eq!(OwnerLock::holder(&path).unwrap(), None, "no file yet");
        let mut lock =
            OwnerLock::acquire(&path, OwnerInfo::this_process(), Duration::ZERO).unwrap();
        lock.set_admin_addr("127.0.0.1:7878".into()).unwrap();
        let seen = OwnerLock::holder(&path).unwrap().expect("held");
        assert_eq!(seen.admin_addr.as_deref(), Some("127.0.0.1:7878"));
        assert_eq!(seen.instance_id, lock.info().instance_id);
        drop(lock);
        assert_eq!(OwnerLock::holder(&path).unwrap(), None, "released on drop");
        // Free again: a new owner takes it with a new instance ID.
        let again = OwnerLock::acquire(&path, OwnerInfo::this_process(), Duration::ZERO).unwrap();
        assert_ne!(again.info().instance_id, seen.instance_id);
    }
}
