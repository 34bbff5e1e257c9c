//! The typed errors of the queue stores and the domain model.
//!
//! Every store operation returns [`QueueError`]; callers match on the kind
//! (the seed's `ErrQueueFull`, `ErrItemNotFound`, ... in Rust form) and the
//! message names what was wrong.

use std::error::Error as StdError;
use std::fmt;

/// A boxed error source kept inside [`QueueError::Storage`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A `StoreOptions` field no store can work with, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid store option {field}: {reason}")]
pub struct InvalidStoreOption {
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// What went wrong in a queue operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The queue is at its item or byte limit and the overflow policy refuses
    /// new items.
    #[error("queue is full: {reason}")]
    QueueFull {
        /// Which limit was hit, with the numbers.
        reason: String,
    },

    /// The queue was closed; no operation is accepted any more.
    #[error("queue is closed")]
    QueueClosed,

    /// No item has this exact ID.
    #[error("item not found: {id}")]
    ItemNotFound {
        /// The ID that was looked up.
        id: String,
    },

    /// The item exists, but its state does not allow the change asked
    /// for (reviving an item that is not a dead letter, releasing one
    /// nobody claimed...).
    #[error("item {id} is {status}, {rule}")]
    WrongState {
        /// The item the change was asked of.
        id: String,
        /// Its status at the time (`"pending"`, `"processing"`, `"failed"`).
        status: &'static str,
        /// Which states the change starts from, for a person.
        rule: &'static str,
    },

    /// An item with the same ID or the same fingerprint is already pending or
    /// being delivered.
    #[error("duplicate item: already queued as {existing_id}")]
    DuplicateItem {
        /// The ID of the item already in the queue.
        existing_id: String,
    },

    /// The item (or the request) is not acceptable as given.
    #[error("invalid item: {reason}")]
    InvalidItem {
        /// What is wrong with it.
        reason: String,
    },

    /// One item is larger than the queue's whole byte limit.
    #[error("item too large: {size} bytes, the limit is {limit} bytes")]
    TooLarge {
        /// The item's size in bytes.
        size: u64,
        /// The limit it exceeds.
        limit: u64,
    },

    /// A stored record failed its integrity check.
    #[error("corrupt record {what}: {detail}")]
    Corrupt {
        /// Which record (an ID or a file name).
        what: String,
        /// What the check found.
        detail: String,
    },

    /// The disk (or the file system's quota) has no room for the write.
    /// Nothing was stored; the same call succeeds once space returns.
    #[error("disk is full during {op}: {source}")]
    DiskFull {
        /// The store operation refused (e.g. "enqueue"), for the message.
        op: &'static str,
        /// The I/O or database error that caused it.
        #[source]
        source: BoxError,
    },

    /// The store is owned by another running process (a `retryq run`
    /// daemon holds its owner lock).
    #[error("store {path} is in use by {holder}")]
    StoreInUse {
        /// Path of the owner lock file.
        path: String,
        /// Who holds it, e.g. "pid 4242 (retryq run, instance 0193...)".
        holder: String,
    },

    /// A part of this process failed, not the medium: an actor is gone, a
    /// channel closed, a blocking task panicked. Retrying may help once the
    /// part is restarted; the store itself is not known to be at fault.
    #[error("internal failure in {what}: {detail}")]
    Internal {
        /// The part or the call that failed, e.g. "store actor mailbox".
        what: &'static str,
        /// The underlying error's text (a `MailboxError`, a `JoinError`).
        detail: String,
    },

    /// A store was opened with options no store can work with (see
    /// `StoreOptions::validate`, which `retryq config check` runs too).
    #[error(transparent)]
    InvalidOptions(#[from] InvalidStoreOption),

    /// The storage medium failed (I/O error, database error...). Never
    /// used for failures inside this process: those are `Internal`.
    #[error("storage error during {op}: {source}")]
    Storage {
        /// The operation that failed, e.g. "enqueue" or "open".
        op: &'static str,
        /// The I/O or database error that caused it.
        #[source]
        source: BoxError,
    },
}

impl QueueError {
    /// Wraps a lower-level error for operation `op`: [`QueueError::DiskFull`]
    /// when it says the disk has no room (`ENOSPC`, `EDQUOT`, SQLite's
    /// `SQLITE_FULL`), [`QueueError::Storage`] otherwise.
    pub fn storage(op: &'static str, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        if is_disk_full(source.as_ref()) {
            QueueError::DiskFull { op, source }
        } else {
            QueueError::Storage { op, source }
        }
    }

    /// True for the failures of the medium itself ([`QueueError::Storage`]
    /// and [`QueueError::DiskFull`]), as opposed to a refusal of one item.
    pub fn is_storage(&self) -> bool {
        matches!(
            self,
            QueueError::Storage { .. } | QueueError::DiskFull { .. }
        )
    }

    /// Shorthand for [`QueueError::InvalidItem`].
    pub fn invalid(reason: impl Into<String>) -> Self {
        QueueError::InvalidItem {
            reason: reason.into(),
        }
    }

    /// Shorthand for [`QueueError::Internal`].
    pub fn internal(what: &'static str, detail: impl fmt::Display) -> Self {
        QueueError::Internal {
            what,
            detail: detail.to_string(),
        }
    }

    /// Shorthand for [`QueueError::ItemNotFound`].
    pub fn not_found(id: &str) -> Self {
        QueueError::ItemNotFound { id: id.to_owned() }
    }

    /// A short stable name for the error kind, for logs, metrics and JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            QueueError::QueueFull { .. } => "queue_full",
            QueueError::QueueClosed => "queue_closed",
            QueueError::ItemNotFound { .. } => "item_not_found",
            QueueError::WrongState { .. } => "wrong_state",
            QueueError::DuplicateItem { .. } => "duplicate_item",
            QueueError::InvalidItem { .. } => "invalid_item",
            QueueError::TooLarge { .. } => "too_large",
            QueueError::Corrupt { .. } => "corrupt",
            QueueError::DiskFull { .. } => "disk_full",
            QueueError::StoreInUse { .. } => "store_in_use",
            QueueError::InvalidOptions(_) => "invalid_options",
            QueueError::Storage { .. } => "storage",
            QueueError::Internal { .. } => "internal",
        }
    }
}

/// True when `error`, or an error in its source chain, says the disk has
/// no room for the write.
pub fn is_disk_full(error: &(dyn StdError + 'static)) -> bool {
    let mut next: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io_is_disk_full(io) {
                return true;
            }
        }
        if let Some(rusqlite::Error::SqliteFailure(code, _)) = e.downcast_ref::<rusqlite::Error>() {
            if code.code == rusqlite::ErrorCode::DiskFull {
                return true;
            }
        }
        if let Some(QueueError::DiskFull { .. }) = e.downcast_ref::<QueueError>() {
            return true;
        }
        next = e.source();
    }
    false
}

fn io_is_disk_full(error: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    error.kind() == std::io::ErrorKind::StorageFull
        || error.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(error.raw_os_error(), Some(ENOSPC | EDQUOT))
}

/// Result alias for queue operations.
pub type QueueResult<T> = Result<T, QueueError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_apart_from_other_medium_failures() {
        let enospc = std::io::Error::from_raw_os_error(28);
        let full = QueueError::storage("enqueue", enospc);
        assert_eq!(full.kind(), "disk_full");
        assert!(full.is_storage());
        let eio = QueueError::storage("enqueue", std::io::Error::from_raw_os_error(5));
        assert_eq!(eio.kind(), "storage");
        assert!(eio.is_storage());
        // Wrapped once more, the full disk is still found in the chain.
        let wrapped = QueueError::storage("group commit", full);
        assert_eq!(wrapped.kind(), "disk_full");
    }

    #[test]
    fn internal_failures_are_not_failures_of_the_medium() {
        let gone = QueueError::internal("store actor mailbox", "mailbox closed");
        assert_eq!(gone.kind(), "internal");
        assert!(!gone.is_storage());
        assert_eq!(
            gone.to_string(),
            "internal failure in store actor mailbox: mailbox closed"
        );
    }

    #[test]
    fn a_wrong_state_names_the_item_and_its_status() {
        let err = QueueError::WrongState {
            id: "a1".into(),
            status: "pending",
            rule: "only a failed item (a dead letter) can be revived",
        };
        assert_eq!(err.kind(), "wrong_state");
        assert!(!err.is_storage());
        assert_eq!(
            err.to_string(),
            "item a1 is pending, only a failed item (a dead letter) can be revived"
        );
    }
}
