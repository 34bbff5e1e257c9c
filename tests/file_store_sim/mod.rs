//! A simulated disk for the file backend's fault tests ([`SimDisk`]): it
//! keeps POSIX durability rules and can fail the Nth operation (EIO,
//! ENOSPC) or "lose power" at it; and the helpers those tests share.

#![allow(dead_code)]

use retryq::item::ItemId;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{TimeZone, Utc};
use retryq::clock::ManualClock;
use retryq::store::file::{LockGuard, StoreFs};
use retryq::store::{FileRetryQueue, StoreOptions};
use retryq::{NewItem, Payload, QueueResult};

pub const EIO: i32 = 5;
pub const ENOSPC: i32 = 28;

/// What happens at the injection point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// That one operation fails with this errno; later ones succeed.
    Error(i32),
    /// Power loss: that operation and every later one fail and change nothing.
    Crash,
    /// This many operations in a row fail with EIO (so the undo of a failed
    /// commit can fail too).
    ErrorRun(u64),
}

#[derive(Debug, Default)]
struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What survives a crash (set by `sync_file`).
    synced: Vec<u8>,
}

/// A simulated disk with POSIX durability rules: file contents survive a
/// crash only once synced, directory entries (creations, renames, unlinks)
/// only once their directory is synced. Directories themselves are durable
/// at creation (the backend creates them once, at open).
#[derive(Debug, Default)]
struct DiskState {
    dirs: BTreeSet<PathBuf>,
    /// Directory entries as seen now.
    entries: BTreeMap<PathBuf, u64>,
    /// Directory entries as they would be found after a crash.
    durable_entries: BTreeMap<PathBuf, u64>,
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    locks: HashSet<PathBuf>,
    /// Operations performed so far (the injection clock).
    ops: u64,
    fault_at: Option<(u64, Fault)>,
    crashed: bool,
    /// Disk full: every `write_file` fails with ENOSPC.
    full: bool,
    /// `sync_file` and `sync_dir` calls so far.
    file_syncs: u64,
    dir_syncs: u64,
}

#[derive(Debug, Clone, Default)]
pub struct SimDisk(Arc<Mutex<DiskState>>);

#[derive(Debug)]
struct SimLock(Arc<Mutex<DiskState>>, PathBuf);

impl LockGuard for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.0.lock().unwrap().locks.remove(&self.1);
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl SimDisk {
    fn state(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.0.lock().unwrap()
    }

    pub fn ops(&self) -> u64 {
        self.state().ops
    }

    /// (file syncs, directory syncs) so far.
    pub fn syncs(&self) -> (u64, u64) {
        let s = self.state();
        (s.file_syncs, s.dir_syncs)
    }

    pub fn inject(&self, at: u64, fault: Fault) {
        self.state().fault_at = Some((at, fault));
    }

    pub fn set_full(&self, full: bool) {
        self.state().full = full;
    }

    /// Counts one operation and decides whether it fails.
    fn begin(&self) -> Result<std::sync::MutexGuard<'_, DiskState>, io::Error> {
        let mut s = self.state();
        if s.crashed {
            return Err(errno(EIO));
        }
        let n = s.ops;
        s.ops += 1;
        match s.fault_at {
            Some((at, Fault::Error(code))) if at == n => Err(errno(code)),
            Some((at, Fault::Crash)) if at == n => {
                s.crashed = true;
                Err(errno(EIO))
            }
            Some((at, Fault::ErrorRun(len))) if (at..at + len).contains(&n) => Err(errno(EIO)),
            _ => Ok(s),
        }
    }

    /// The disk as found after power comes back: only durable entries, each
    /// file with its synced contents, plus a torn half of whatever was
    /// written but not synced (the worst a real disk may leave).
    pub fn reboot(&self) -> SimDisk {
        let s = self.state();
        let mut next = DiskState {
            dirs: s.dirs.clone(),
            next_inode: s.next_inode,
            ..DiskState::default()
        };
        for (path, ino) in &s.durable_entries {
            let inode = &s.inodes[ino];
            let data = if inode.synced == inode.data {
                inode.synced.clone()
            } else {
                let mut torn = inode.synced.clone();
                torn.extend_from_slice(&inode.data[..inode.data.len() / 2]);
                torn
            };
            next.inodes.insert(
                *ino,
                Inode {
                    data: data.clone(),
                    synced: data,
                },
            );
            next.entries.insert(path.clone(), *ino);
            next.durable_entries.insert(path.clone(), *ino);
        }
        SimDisk(Arc::new(Mutex::new(next)))
    }

    pub fn file_names(&self, dir: &Path) -> Vec<String> {
        let s = self.state();
        s.entries
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }
}

impl StoreFs for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.begin()?;
        for ancestor in dir.ancestors() {
            s.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut s = self.begin()?;
        if s.full {
            return Err(errno(ENOSPC));
        }
        if !s.dirs.contains(path.parent().unwrap()) {
            return Err(io::ErrorKind::NotFound.into());
        }
        if let Some(ino) = s.entries.get(path).copied() {
            s.inodes.get_mut(&ino).unwrap().data = data.to_vec();
        } else {
            let ino = s.next_inode;
            s.next_inode += 1;
            s.inodes.insert(
                ino,
                Inode {
                    data: data.to_vec(),
                    synced: Vec::new(),
                },
            );
            s.entries.insert(path.to_path_buf(), ino);
        }
        Ok(())
    }

    fn sync_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.begin()?;
        s.file_syncs += 1;
        let ino = *s.entries.get(path).ok_or(io::ErrorKind::NotFound)?;
        let inode = s.inodes.get_mut(&ino).unwrap();
        inode.synced = inode.data.clone();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.begin()?;
        let ino = s.entries.remove(from).ok_or(io::ErrorKind::NotFound)?;
        s.entries.insert(to.to_path_buf(), ino);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.begin()?;
        s.entries.remove(path).ok_or(io::ErrorKind::NotFound)?;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.begin()?;
        s.dir_syncs += 1;
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        s.durable_entries.retain(|p, _| !in_dir(p));
        let now: Vec<(PathBuf, u64)> = s
            .entries
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        s.durable_entries.extend(now);
        Ok(())
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.begin()?;
        if !s.dirs.contains(dir) {
            return Err(io::ErrorKind::NotFound.into());
        }
        let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        let files = s.entries.keys().filter(|p| p.parent() == Some(dir));
        let subdirs = s.dirs.iter().filter(|p| p.parent() == Some(dir));
        Ok(files.chain(subdirs).map(|p| name(p)).collect())
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let s = self.begin()?;
        let ino = s.entries.get(path).ok_or(io::ErrorKind::NotFound)?;
        Ok(s.inodes[ino].data.clone())
    }

    fn try_lock(&self, path: &Path, _owner: &str) -> io::Result<Option<Box<dyn LockGuard>>> {
        let mut s = self.begin()?;
        if !s.locks.insert(path.to_path_buf()) {
            return Ok(None);
        }
        Ok(Some(Box::new(SimLock(self.0.clone(), path.to_path_buf()))))
    }
}

pub const DIR: &str = "/sim/queue";

pub fn clock() -> ManualClock {
    ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap())
}

pub fn open(disk: &SimDisk, clock: &ManualClock) -> QueueResult<FileRetryQueue> {
    let options = StoreOptions {
        clock: Arc::new(clock.clone()),
        ..StoreOptions::default()
    };
    FileRetryQueue::open_with_fs(DIR, options, Arc::new(disk.clone()))
}

pub fn item(id: &str) -> NewItem {
    let payload = Payload::from_json_str(&format!(
        "{{\"report\":\"{id}\",\"pad\":\"{}\"}}",
        "x".repeat(64)
    ))
    .unwrap();
    NewItem::new(payload).with_id(ItemId::parse(id).unwrap())
}

pub fn options(clock: &ManualClock) -> StoreOptions {
    StoreOptions {
        clock: Arc::new(clock.clone()),
        ..StoreOptions::default()
    }
}
