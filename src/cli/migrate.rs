//! `retryq migrate --from DIR`: imports a Go SDK retry-queue directory into
//! the configured store; `--from FILE` imports a SQLite store
//! ([`super::migrate_sqlite`]) the same way, e.g. into a fleet's PostgreSQL.
//!
//! The Go directory is only read, never changed ([`QueueDirScan`]): each
//! item file is read and checked as the files backend would at open; a
//! torn, corrupt or unreadable one is reported as quarantined and not
//! imported; foreign entries are reported and ignored. The items are
//! written in batches of [`BATCH`] through
//! [`RetryQueue::import_batch`](retryq::RetryQueue::import_batch), one
//! durable commit per batch (group commit), each with its ID,
//! fingerprint, attempts, status, last error and timestamps as the Go file
//! holds them (an item Go left `processing` is imported `pending`). A
//! reader thread reads and checks the next batch while the current one
//! commits.
//!
//! **Interrupted runs.** A batch is durable once committed and the source
//! is untouched, so Ctrl-C or a kill loses nothing; running the command
//! again imports only what is missing: an item whose ID is already in the
//! store is counted as skipped, never imported twice. (Fingerprint dedupe
//! is off during the import: every item of the source is kept.)
//!
//! **Output.** Progress goes to stderr: a bar on a terminal, a plain line
//! at most once a second otherwise, nothing with `--json`. A summary
//! (imported, skipped, quarantined) ends on stdout.
//!
//! A store owned by a running daemon is refused: the daemon claims from it
//! while the import writes, and a daemon on the files backend holds its
//! directory. Stop the daemon, or migrate into a separate store.

use retryq::item::ItemId;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use retryq::config::{open_store, StoreBackend};
use retryq::store::file::QueueDirScan;
use retryq::store::owner::{owner_lock_path, OwnerLock};
use retryq::{ItemStatus, QueueError, QueueItem, RetryQueue};
use serde::Serialize;

use super::context::Ctx;
use super::migrate_sqlite::SqliteSource;
use super::output::{print_json, println_out};
use super::UsageError;

/// Items per commit: large enough that the commit's fixed cost (an fsync,
/// a checkpoint now and then) is shared by many items (1,024 imported
/// 20,000 Go items in 1.3-1.4 s where 256 took 1.5-1.7 s on the shared
/// development machine), small enough that a batch is a few MiB in memory.
const BATCH: usize = 1024;
/// Batches read ahead of the one committing.
const READ_AHEAD: usize = 2;
/// How often the plain progress line is printed when stderr is not a
/// terminal.
const LINE_EVERY: Duration = Duration::from_secs(1);

/// What `migrate` did.
#[derive(Debug, Default, Serialize)]
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
    /// Items not written because their ID is already in the store (an
    /// earlier run imported them).
    pub skipped: usize,
    /// Item files not imported because they are torn, corrupt or
    /// unreadable.
    pub quarantined: u64,
    /// Those files' names.
    pub quarantined_files: Vec<String>,
    /// Intact items the store refused (invalid or too large), with why.
    pub refused: Vec<RefusedItem>,
    /// Entries of the source that are not queue records, ignored.
    pub foreign_entries: usize,
    /// Wall-clock time of the import, in seconds.
    pub seconds: f64,
}

/// An item the store refused.
#[derive(Debug, Serialize)]
pub struct RefusedItem {
    /// The item's ID as the Go SDK recorded it.
    pub id: String,
    /// The store's refusal (invalid item, too large), as shown to the operator.
    pub reason: String,
}

/// Progress on stderr: a bar on a terminal, a line at most every second
/// otherwise, nothing with `--json`.
enum Progress {
    Bar(ProgressBar),
    Lines {
        total: usize,
        done: usize,
        last: Option<Instant>,
    },
    Silent,
}

impl Progress {
    fn new(total: usize, json: bool) -> Self {
        if json {
            return Progress::Silent;
        }
        if !std::io::stderr().is_terminal() {
            return Progress::Lines {
                total,
                done: 0,
                last: None,
            };
        }
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "migrating [{bar:30}] {human_pos}/{human_len} items, eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("#>.");
        bar.set_style(style);
        Progress::Bar(bar)
    }

    fn advance(&mut self, n: usize) {
        match self {
            Progress::Bar(bar) => bar.inc(n as u64),
            Progress::Lines { total, done, last } => {
                *done += n;
                let due = last.is_none_or(|t| t.elapsed() >= LINE_EVERY);
                if due || *done == *total {
                    eprintln!("migrating: {done}/{total} items");
                    *last = Some(Instant::now());
                }
            }
            Progress::Silent => {}
        }
    }

    /// A warning line, printed above the bar when there is one.
    fn warn(&self, line: &str) {
        match self {
            Progress::Bar(bar) => bar.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        // The summary line that follows says where it ended.
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// One batch as read from the source: each item file's name and item, or
/// why it is not one.
type ReadBatch = Vec<(String, Result<QueueItem, String>)>;

/// Imports the Go SDK queue in `from` into the configured store.
pub fn migrate(ctx: &Ctx, from: &Path) -> anyhow::Result<()> {
    let settings = ctx.settings()?;
    if !from.is_dir() && !from.is_file() {
        bail!(UsageError(format!(
            "--from {}: neither a Go SDK queue directory nor a SQLite store file",
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
    let lock = owner_lock_path(&target_path, settings.store.backend == StoreBackend::Files);
    // A shared PostgreSQL store takes an import beside its running fleet.
    let owned = match settings.store.backend {
        StoreBackend::Postgres => None,
        _ => OwnerLock::holder(&lock).context("cannot check who owns the store")?,
    };
    if let Some(holder) = owned {
        bail!(
            "the store {} is owned by a running retryq daemon ({}): stop the daemon before \
             migrating into its store, or migrate into a separate store (another --config \
             with its own [store] path)",
            target_path.display(),
            holder.describe()
        );
    }

    let source = if from.is_file() {
        Source::Sqlite(Box::new(SqliteSource::open(from)?))
    } else {
        Source::Go(
            QueueDirScan::open(from)
                .with_context(|| format!("cannot read the Go SDK queue {}", from.display()))?,
        )
    };
    let mut options = settings.store_options();
    options.dedupe = false;
    let target = open_store(&settings.store, options).with_context(|| {
        format!(
            "cannot open the {} store at {}",
            settings.store.backend.as_str(),
            settings.store.location()
        )
    })?;
    let mut report = MigrateReport {
        source: from.to_path_buf(),
        target: PathBuf::from(settings.store.location()),
        ..MigrateReport::default()
    };
    let total = match &source {
        Source::Go(scan) => scan.item_files().len(),
        Source::Sqlite(sqlite) => sqlite.total(),
    };
    let mut progress = Progress::new(total, ctx.json);
    if let Source::Go(scan) = &source {
        report.foreign_entries = scan.skipped().len();
        for (name, why) in scan.skipped() {
            progress.warn(&format!("ignored: {name} ({why})"));
        }
    }
    let started = Instant::now();
    let imported = match source {
        Source::Go(scan) => import_all(&scan, target.as_ref(), &mut report, &mut progress),
        Source::Sqlite(mut sqlite) => {
            import_sqlite(&mut sqlite, target.as_ref(), &mut report, &mut progress)
        }
    };
    report.seconds = started.elapsed().as_secs_f64();
    progress.finish();
    let closed = target.close();
    if let Err(e) = imported {
        eprintln!("{}", summary(&report));
        return Err(e);
    }
    closed.context("cannot close the store")?;

    if ctx.json {
        print_json(&report)
    } else {
        println_out(&summary(&report))
    }
}

/// Reads the source on a second thread, [`BATCH`] items at a time, and
/// commits each batch in turn.
fn import_all(
    scan: &QueueDirScan,
    target: &dyn RetryQueue,
    report: &mut MigrateReport,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::sync_channel::<ReadBatch>(READ_AHEAD);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for names in scan.item_files().chunks(BATCH) {
                let batch = names.iter().map(|n| (n.clone(), scan.read(n))).collect();
                // The importer stopped (an error): nothing more to read.
                if tx.send(batch).is_err() {
                    break;
                }
            }
        });
        // `rx` moves into the loop: leaving it early drops the receiver,
        // which ends the reader.
        for batch in rx {
            let n = batch.len();
            import_batch(batch, target, report, progress)?;
            progress.advance(n);
        }
        Ok(())
    })
}

/// Where `migrate` reads from.
enum Source {
    Go(QueueDirScan),
    Sqlite(Box<SqliteSource>),
}

/// Reads a SQLite store a batch at a time and commits each in turn.
fn import_sqlite(
    source: &mut SqliteSource,
    target: &dyn RetryQueue,
    report: &mut MigrateReport,
    progress: &mut Progress,
) -> anyhow::Result<()> {
    while let Some(batch) = source.next_batch(BATCH)? {
        let n = batch.len();
        import_batch(batch, target, report, progress)?;
        progress.advance(n);
    }
    Ok(())
}

/// Commits one batch and counts what became of each item.
fn import_batch(
    batch: ReadBatch,
    target: &dyn RetryQueue,
    report: &mut MigrateReport,
    progress: &Progress,
) -> anyhow::Result<()> {
    let mut items = Vec::with_capacity(batch.len());
    for (name, read) in batch {
        match read {
            Ok(item) => items.push(item),
            Err(reason) => {
                progress.warn(&format!("quarantined: {name} ({reason}); not imported"));
                report.quarantined += 1;
                report.quarantined_files.push(name);
            }
        }
    }
    report.found += items.len();
    let kinds: Vec<(ItemId, ItemStatus)> =
        items.iter().map(|i| (i.id.clone(), i.status())).collect();
    let results = target.import_batch(items).with_context(|| {
        format!(
            "cannot import a batch ({} imported before it; run the command again to go on)",
            report.imported
        )
    })?;
    for ((id, status), result) in kinds.into_iter().zip(results) {
        match result {
            Ok(()) => {
                report.imported += 1;
                if status == ItemStatus::Failed {
                    report.imported_failed += 1;
                }
            }
            Err(QueueError::DuplicateItem { .. }) => report.skipped += 1,
            Err(e @ (QueueError::InvalidItem { .. } | QueueError::TooLarge { .. })) => {
                progress.warn(&format!("refused: item {id} ({e}); not imported"));
                report.refused.push(RefusedItem {
                    id: id.to_string(),
                    reason: e.to_string(),
                });
            }
            // A full store or disk, a storage fault: the rest would fail too.
            Err(e) => {
                return Err(anyhow::Error::from(e).context(format!(
                    "cannot import item {id} ({} imported before it; raise the store's limits \
                     or free space, then run the command again to go on)",
                    report.imported
                )))
            }
        }
    }
    Ok(())
}

fn summary(report: &MigrateReport) -> String {
    let rate = if report.seconds > 0.0 {
        format!(
            ", {:.0} items/s",
            (report.imported + report.skipped) as f64 / report.seconds
        )
    } else {
        String::new()
    };
    let mut text = format!(
        "imported {} of {} item(s) from {} into {} ({} dead letter(s)); {} skipped (already in the store); {} quarantined",
        report.imported,
        report.found,
        report.source.display(),
        report.target.display(),
        report.imported_failed,
        report.skipped,
        report.quarantined,
    );
    if !report.quarantined_files.is_empty() {
        text.push_str(&format!(" ({})", report.quarantined_files.join(", ")));
    }
    if !report.refused.is_empty() {
        text.push_str(&format!("; {} refused", report.refused.len()));
    }
    if report.foreign_entries > 0 {
        text.push_str(&format!(
            "; {} foreign entr{} ignored",
            report.foreign_entries,
            if report.foreign_entries == 1 {
                "y"
            } else {
                "ies"
            }
        ));
    }
    text.push_str(&format!(" in {:.2} s{rate}", report.seconds));
    text
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
