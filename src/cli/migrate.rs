//! `retryq migrate --from DIR`: imports a Go SDK retry-queue directory into
//! the configured store.
//!
//! The Go directory is never changed: its regular files are copied to a
//! private temporary directory and the copy is opened with the files backend,
//! which indexes what survives (an item left `processing` returns to
//! pending), quarantines torn or foreign records and drops temp files. Each
//! surviving item is then written to the target store with its ID,
//! fingerprint, attempts, status, last error and timestamps: the target is
//! opened with a manual clock set to the item's `created_at` for the enqueue
//! and to its `updated_at` for the `update` that restores its delivery state.
//! Deduplication by fingerprint is off during the import (every surviving
//! item is kept); an ID already in the target is skipped, so a second run
//! imports nothing twice.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use chrono::Utc;
use retryq::clock::ManualClock;
use retryq::config::{open_store, StoreBackend, StoreSettings};
use retryq::store::{ListFilter, StoreOptions};
use retryq::{ItemStatus, NewItem, QueueError, QueueItem};
use serde::Serialize;

use super::commands::Ctx;
use super::output::{print_json, println_out};
use super::UsageError;

/// What `migrate` did.
#[derive(Debug, Serialize)]
pub struct MigrateReport {
    /// The Go SDK directory read.
    pub source: PathBuf,
    /// The store written.
    pub target: PathBuf,
    /// Items found intact in the source.
    pub found: usize,
    /// Items written to the target.
    pub imported: usize,
    /// Of those, items imported as dead letters.
    pub imported_failed: usize,
    /// Items skipped, with why (already in the target).
    pub skipped: Vec<SkippedItem>,
    /// Records the files backend quarantined (torn, corrupt, foreign JSON).
    pub quarantined: u64,
    /// The quarantined files' names.
    pub quarantined_files: Vec<String>,
}

/// An item not imported.
#[derive(Debug, Serialize)]
pub struct SkippedItem {
    /// Its ID.
    pub id: String,
    /// Why.
    pub reason: String,
}

/// A private copy of the source directory, removed when dropped.
struct TempCopy {
    path: PathBuf,
}

impl TempCopy {
    fn of(source: &Path) -> anyhow::Result<TempCopy> {
        let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let path =
            std::env::temp_dir().join(format!("retryq-migrate-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create the working copy {}", path.display()))?;
        let copy = TempCopy { path };
        restrict(&copy.path, 0o700)?;
        let entries = std::fs::read_dir(source)
            .with_context(|| format!("cannot read {}", source.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", source.display()))?;
            let file_type = entry
                .file_type()
                .with_context(|| format!("cannot read {}", entry.path().display()))?;
            // Only the item files live at the top level; sub-directories are
            // the Go SDK's own leftovers and are not items.
            if !file_type.is_file() {
                continue;
            }
            let to = copy.path.join(entry.file_name());
            std::fs::copy(entry.path(), &to).with_context(|| {
                format!("cannot copy {} to the working copy", entry.path().display())
            })?;
            // The source may be read-only; the copy must be writable by its owner.
            restrict(&to, 0o600)?;
        }
        Ok(copy)
    }

    fn json_files(&self) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path).context("cannot read the working copy")? {
            let entry = entry.context("cannot read the working copy")?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

impl Drop for TempCopy {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the migration working copy");
        }
    }
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions on {}", path.display()))
}

#[cfg(not(unix))]
fn restrict(_path: &Path, _mode: u32) -> anyhow::Result<()> {
    Ok(())
}

/// Progress on stderr: a bar on a terminal, a few lines otherwise.
struct Progress {
    total: usize,
    tty: bool,
    last_decile: usize,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
            last_decile: usize::MAX,
        }
    }

    fn update(&mut self, done: usize) {
        let total = self.total.max(1);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 30;
            let filled = done * width / total;
            let _ = write!(
                err,
                "\rmigrating [{}{}] {done}/{}",
                "#".repeat(filled),
                ".".repeat(width - filled),
                self.total
            );
            if done == self.total {
                let _ = writeln!(err);
            }
        } else {
            let decile = done * 10 / total;
            if decile != self.last_decile || done == self.total {
                self.last_decile = decile;
                let _ = writeln!(err, "migrating: {done}/{} items", self.total);
            }
        }
    }
}

/// Imports the Go SDK queue in `from` into the configured store.
pub fn migrate(ctx: &Ctx, from: &Path) -> anyhow::Result<()> {
    let settings = ctx.settings()?;
    if !from.is_dir() {
        bail!(UsageError(format!(
            "--from {}: not a directory",
            from.display()
        )));
    }
    let target_path = settings.store.effective_path();
    if same_path(from, &target_path) {
        bail!(UsageError(format!(
            "--from {} is the configured store itself",
            from.display()
        )));
    }

    // 1. Read the source through the files backend, on a private copy.
    let copy = TempCopy::of(from)?;
    let before = copy.json_files()?;
    let source_settings = StoreSettings {
        backend: StoreBackend::Files,
        path: Some(copy.path.clone()),
        ..StoreSettings::default()
    };
    let source_options = StoreOptions {
        max_items: usize::MAX,
        max_bytes: u64::MAX,
        dedupe: false,
        ..StoreOptions::default()
    };
    let source = open_store(&source_settings, source_options)
        .with_context(|| format!("cannot open {} as a Go SDK queue", from.display()))?;
    let read = source.list(&ListFilter::default()).and_then(|items| {
        let stats = source.stats()?;
        Ok((items, stats.quarantined))
    });
    source.close().context("cannot close the source copy")?;
    let (items, quarantined) =
        read.with_context(|| format!("cannot read the items of {}", from.display()))?;
    let kept: std::collections::BTreeSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
    let quarantined_files: Vec<String> = before
        .into_iter()
        .filter(|name| {
            let id = name
                .trim_end_matches(".json")
                .split_once('_')
                .map(|(_, id)| id)
                .unwrap_or("");
            !kept.contains(id)
        })
        .collect();
    for name in &quarantined_files {
        eprintln!("quarantined: {name} (unreadable or failed its integrity check; not imported)");
    }

    // 2. Write each item to the target with its state and timestamps.
    let clock = ManualClock::new(Utc::now());
    let mut options = settings.store_options();
    options.dedupe = false;
    options.clock = Arc::new(clock.clone());
    let target = open_store(&settings.store, options).with_context(|| {
        format!(
            "cannot open the {} store at {}",
            settings.store.backend.as_str(),
            target_path.display()
        )
    })?;
    let mut report = MigrateReport {
        source: from.to_path_buf(),
        target: target_path.clone(),
        found: items.len(),
        imported: 0,
        imported_failed: 0,
        skipped: Vec::new(),
        quarantined,
        quarantined_files,
    };
    let mut progress = Progress::new(items.len());
    let result = (|| -> anyhow::Result<()> {
        for (n, item) in items.iter().enumerate() {
            match import_one(target.as_ref(), &clock, item) {
                Ok(()) => {
                    report.imported += 1;
                    if item.status == ItemStatus::Failed {
                        report.imported_failed += 1;
                    }
                }
                Err(QueueError::DuplicateItem { existing_id }) => {
                    report.skipped.push(SkippedItem {
                        id: item.id.clone(),
                        reason: format!("already in the store as {existing_id}"),
                    });
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e).context(format!(
                        "cannot import item {} ({} of {} imported so far)",
                        item.id, report.imported, report.found
                    )))
                }
            }
            progress.update(n + 1);
        }
        Ok(())
    })();
    let closed = target.close();
    result?;
    closed.context("cannot close the store")?;

    if ctx.json {
        print_json(&report)
    } else {
        println_out(&format!(
            "imported {} of {} item(s) from {} into {} ({} dead letter(s)); {} skipped; {} quarantined{}",
            report.imported,
            report.found,
            from.display(),
            target_path.display(),
            report.imported_failed,
            report.skipped.len(),
            report.quarantined,
            if report.quarantined_files.is_empty() {
                String::new()
            } else {
                format!(" ({})", report.quarantined_files.join(", "))
            }
        ))
    }
}

/// Writes one item: enqueue at its creation time, then restore its delivery
/// state at its last update time.
fn import_one(
    target: &dyn retryq::RetryQueue,
    clock: &ManualClock,
    item: &QueueItem,
) -> Result<(), QueueError> {
    clock.set(item.created_at);
    let mut new = NewItem::new(item.report.clone()).with_type(item.item_type.clone());
    new.id = Some(item.id.clone());
    new.fingerprint = Some(item.fingerprint.clone());
    new.max_attempts = Some(item.max_attempts.max(1));
    new.agent_id = item.agent_id.clone();
    new.scanner_name = item.scanner_name.clone();
    new.target_path = item.target_path.clone();
    new.next_retry = Some(item.next_retry);
    new.attributes = item.attributes.clone();
    target.enqueue(new)?;
    let untouched = item.status == ItemStatus::Pending
        && item.attempts == 0
        && item.last_error.is_empty()
        && item.last_attempt.is_none();
    if !untouched {
        clock.set(item.updated_at.max(item.created_at));
        let mut state = item.clone();
        // Never import a claim: nobody holds it any more.
        if state.status == ItemStatus::Processing {
            state.status = ItemStatus::Pending;
        }
        state.lease_until = None;
        target.update(&state)?;
    }
    Ok(())
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
