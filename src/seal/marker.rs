//! The "sealed items may exist" marker: a file beside the store that a
//! sealed queue creates (durably) before it writes its first envelope.
//!
//! Opening a store with encryption off must refuse when sealed items remain,
//! which needs a census of every payload: about a second per 100,000 items.
//! Without the marker no retryq ever sealed into this store, so the census
//! is skipped and the default path (encryption off, never on) opens as fast
//! as before. With it, the census runs, and a census that finds nothing
//! sealed removes it. Stores with no file of their own (memory, a database
//! server) get no marker and always take the census.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{QueueError, QueueResult};

pub use crate::store::file::SEALED_MARKER_FILE;

/// Where the marker of the store at `store_path` lives: inside a queue
/// directory, or beside a database file as `<file>.sealed`.
pub fn marker_path(store_path: &Path, store_is_directory: bool) -> PathBuf {
    if store_is_directory {
        return store_path.join(SEALED_MARKER_FILE);
    }
    let mut name = store_path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".sealed");
    store_path.with_file_name(name)
}

/// Whether the marker is there (an unreadable parent counts as present:
/// the census then decides).
pub fn is_marked(marker: &Path) -> bool {
    !matches!(marker.try_exists(), Ok(false))
}

/// Creates the marker and makes it durable (the file, then its directory),
/// before anything is sealed.
pub fn mark(marker: &Path) -> QueueResult<()> {
    if matches!(marker.try_exists(), Ok(true)) {
        return Ok(());
    }
    let io = |e: std::io::Error| {
        QueueError::storage(
            "marking the store sealed",
            format!("{}: {e}", marker.display()),
        )
    };
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(marker)
        .map_err(io)?;
    file.write_all(b"this store may hold payloads sealed by retryq ([store.encryption])\n")
        .map_err(io)?;
    file.sync_all().map_err(io)?;
    if let Some(dir) = marker.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// Removes the marker once a census found nothing sealed (best effort: a
/// marker left behind only costs the next open a census).
pub fn unmark(marker: &Path) {
    if let Err(e) = std::fs::remove_file(marker) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::debug!(marker = %marker.display(), error = %e, "could not remove the sealed marker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_sits_beside_a_database_and_inside_a_directory() {
        assert_eq!(
            marker_path(Path::new("/var/lib/retryq/queue.db"), false),
            Path::new("/var/lib/retryq/queue.db.sealed")
        );
        assert_eq!(
            marker_path(Path::new("/var/lib/retryq/queue"), true),
            Path::new("/var/lib/retryq/queue/.retryq.sealed")
        );
    }

    #[test]
    fn mark_and_unmark_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let marker = marker_path(&dir.path().join("q.db"), false);
        assert!(!is_marked(&marker));
        mark(&marker).unwrap();
        assert!(is_marked(&marker));
        mark(&marker).unwrap();
        unmark(&marker);
        assert!(!is_marked(&marker));
        unmark(&marker);
    }
}
