//! Payloads sealed at rest (`[store.encryption]`): the keyring, the sealed
//! envelope, and [`SealedQueue`], the one place that seals and opens.
//!
//! # Where sealing happens, and why there
//!
//! [`SealedQueue`] is a [`RetryQueue`](crate::store::RetryQueue) that wraps any other: it seals each
//! item's payload and attributes on the way in (`enqueue`, batches,
//! `enqueue_claimed`, `update`, `import_batch`) and opens them on the way out
//! (`get`, `peek`, `dequeue`, `claim`, `list`, ...). Every backend (memory,
//! files, SQLite, and PostgreSQL or any later one) gets sealing without a
//! line of its own: the backends only ever see a sealed payload, in the form
//! they keep ([`crate::item::sealed_form`]: bytes where
//! [`stores_bytes`](crate::store::RetryQueue::stores_bytes), a JSON envelope elsewhere). The daemon, the
//! CLI and `retryq migrate` all open their store through [`wrap_store`], so
//! none of them can forget it.
//!
//! # What stays clear
//!
//! What scheduling, dedupe and limits need: the ID, type, status, times,
//! attempts, lease, fingerprint (computed from the clear payload before
//! sealing, so dedupe works across sealed and clear items) and the last
//! error. Sealed: the report, the attributes, `agent_id`, `scanner_name`
//! and `target_path`.
//!
//! # Failures
//!
//! - An envelope that fails authentication, names another item or cannot
//!   be parsed is damage: the item is moved to the store's quarantine
//!   ([`RetryQueue::quarantine`](crate::store::RetryQueue::quarantine)) with the reason, and every other item
//!   goes on.
//! - An envelope under a key the ring does not hold is not damage: the
//!   item is never touched. Opening the store counts such items and refuses
//!   ([`SealError::MissingKeys`]), naming each key ID and how many items
//!   need it. A running daemon re-reads its key file when it changes (a
//!   rotation from the CLI) or when it meets an unknown key ID.

use std::collections::BTreeMap;
use std::path::PathBuf;

pub mod envelope;
pub mod keyring;
pub mod marker;
mod queue;

pub use envelope::{ClearFields, Kind, OpenError, Sealer};
pub use keyring::{check_key_file, Key, Keyring};
pub use queue::{
    census, refuse_sealed, reseal_batch, wrap_store, wrap_store_marked, Census, KeySource,
    ResealReport, SealedQueue,
};

use crate::error::QueueError;

/// `[store.encryption]`: where the keyring comes from (exactly one of the two).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionSettings {
    /// A key file (see [`keyring`] for its format); mode 0600, owned by the
    /// user running retryq.
    pub key_file: Option<PathBuf>,
    /// An environment variable holding `ID:SECRET[,ID:SECRET...]`.
    pub key_env: Option<String>,
}

impl EncryptionSettings {
    /// True when either source is set: sealing is on.
    pub fn is_enabled(&self) -> bool {
        self.key_file.is_some() || self.key_env.is_some()
    }

    /// True when neither source is set: payloads are stored clear.
    pub fn is_disabled(&self) -> bool {
        !self.is_enabled()
    }

    /// Checks that at most one source is set.
    pub fn validate(&self) -> Result<(), SealError> {
        if self.key_file.is_some() && self.key_env.is_some() {
            return Err(SealError::Config(
                "set one of store.encryption.key_file and store.encryption.key_env, not both"
                    .to_owned(),
            ));
        }
        Ok(())
    }
}

/// What went wrong with sealing, a keyring or a key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The key file is readable by others or owned by someone else.
    #[error("key file {path} {problem}; fix: {fix}")]
    KeyFileUnsafe {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// The command that fixes it.
        fix: String,
    },
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    KeyFileIo {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `keys generate` would overwrite a keyring.
    #[error("key file {0} exists; refusing to overwrite a keyring (use `retryq keys rotate` to add a key)")]
    KeyFileExists(PathBuf),
    /// The keys themselves are unusable.
    #[error("keyring {source_name}: {reason}")]
    BadKeyring {
        /// The file or `$VAR`.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// Items are sealed under keys the ring does not hold.
    #[error(
        "items are sealed under key IDs missing from the keyring {source_name}: {}; add those keys to it, or, for a key that is lost, set its items aside with `retryq keys quarantine --key-id ID` (nothing was changed)",
        keyring::describe_counts(needed)
    )]
    MissingKeys {
        /// Where the keys came from.
        source_name: String,
        /// Each missing key ID and how many items need it.
        needed: BTreeMap<String, usize>,
    },
    /// Encryption is off but sealed items remain.
    #[error(
        "encryption is off ([store.encryption] sets no key_file or key_env) but {total} item(s) in the store are sealed, under key IDs {}; \
         set [store.encryption] back to the keyring that holds them (nothing was changed)",
        keyring::describe_counts(by_key)
    )]
    SealedWhileOff {
        /// Sealed items in all.
        total: usize,
        /// Each key ID and how many items it seals.
        by_key: BTreeMap<String, usize>,
    },
    /// `[store.encryption]` is contradictory.
    #[error("{0}")]
    Config(String),
    /// The OS's random source failed.
    #[error("no randomness from the OS for a key or nonce: {0}")]
    Random(String),
    /// Sealing one item failed.
    #[error("cannot seal: {0}")]
    Seal(String),
}

impl From<SealError> for QueueError {
    fn from(e: SealError) -> Self {
        QueueError::Storage {
            op: "seal",
            source: Box::new(e),
        }
    }
}
