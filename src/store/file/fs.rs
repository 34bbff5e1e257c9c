//! The file system seen by [`super::FileRetryQueue`]: every byte the backend
//! reads or writes goes through [`StoreFs`], so tests can replace the disk
//! with a simulated one that fails the Nth operation or "loses power".
//!
//! The trait is deliberately small and path based: each method is one
//! system-call-sized step of the write protocol, so a fault can be injected
//! between any two of them.

use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Most threads [`OsFs::sync_files`] uses for one batch.
const MAX_SYNC_THREADS: usize = 16;

/// `e` with the path it concerns in its message (kind kept).
pub(crate) fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// The contents of `path` if it is a regular file (or a link to one).
/// Anything else fails at once: opening a FIFO named like an item file
/// would block the open until a writer came.
pub(crate) fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let meta = fs::metadata(path)?;
    if meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "is a directory",
        ));
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    fs::read(path)
}

/// A held directory lock; the lock is released when the guard is dropped.
pub trait LockGuard: Send + Sync + Debug {}

impl LockGuard for File {}

/// The operations the file backend performs on its directory.
///
/// Semantics follow POSIX: `write_file` and `rename` change what later reads
/// see immediately, but only `sync_file` makes a file's *contents* durable
/// and only `sync_dir` makes a directory's *entries* (creations, renames,
/// removals) durable. An implementation used for crash tests must lose, at
/// a simulated crash, exactly what was not made durable that way.
pub trait StoreFs: Send + Sync + Debug {
    /// Creates `dir` and its parents (mode 0700 for the ones created),
    /// durably: each new directory's parent is synced.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates or truncates `path` (mode 0600) and writes `data` to it,
    /// without syncing.
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Makes the contents of `path` durable (fsync).
    fn sync_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the contents of all `paths` durable. The default syncs them one
    /// after the other; an implementation may overlap them (the file
    /// system then folds them into fewer journal commits). Fails if any
    /// sync fails.
    fn sync_files(&self, paths: &[PathBuf]) -> io::Result<()> {
        paths
            .iter()
            .try_for_each(|p| self.sync_file(p).map_err(|e| with_path(p, e)))
    }
    /// Atomically renames `from` to `to`, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of directory `dir` durable (fsync of the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The names of the entries of `dir` (files and directories), in no
    /// particular order. Names that are not UTF-8 are skipped.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// The whole contents of `path`.
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Takes an exclusive, non-blocking lock on `path` (created 0600 if
    /// absent) and records `owner` in it. `Ok(None)` when another holder has
    /// it; the holder's record can then be read with `read_file`.
    fn try_lock(&self, path: &Path, owner: &str) -> io::Result<Option<Box<dyn LockGuard>>>;
}

/// The real file system (`std::fs`), with the fsyncs the protocol asks for.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsFs;

impl StoreFs for OsFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        // The directories this call creates, outermost first.
        let mut created: Vec<&Path> = dir
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .collect();
        created.reverse();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        for new_dir in created {
            // The umask may have masked the mode; the queue is private.
            fs::set_permissions(new_dir, fs::Permissions::from_mode(0o700))?;
            // A new directory's own entry is durable only once its parent
            // is synced.
            match new_dir.parent() {
                Some(parent) if parent.as_os_str().is_empty() => self.sync_dir(Path::new("."))?,
                Some(parent) => self.sync_dir(parent)?,
                None => {}
            }
        }
        Ok(())
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(data)
    }

    fn sync_file(&self, path: &Path) -> io::Result<()> {
        // fsync through any descriptor flushes the inode's data.
        File::open(path)?.sync_all()
    }

    fn sync_files(&self, paths: &[PathBuf]) -> io::Result<()> {
        // fsyncs issued together are merged by the journal into a few
        // commits; one after the other, each waits for its own. The work is
        // waiting, not CPU, so a few threads suffice even on small machines.
        if paths.len() < 2 {
            return paths
                .iter()
                .try_for_each(|p| self.sync_file(p).map_err(|e| with_path(p, e)));
        }
        let threads = paths.len().min(MAX_SYNC_THREADS);
        let chunk = paths.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = paths
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .try_for_each(|p| self.sync_file(p).map_err(|e| with_path(p, e)))
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a sync thread panicked")))
            })
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        read_regular(path)
    }

    fn try_lock(&self, path: &Path, owner: &str) -> io::Result<Option<Box<dyn LockGuard>>> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Ok(None),
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        file.set_len(0)?;
        file.write_all(owner.as_bytes())?;
        Ok(Some(Box::new(file)))
    }
}
