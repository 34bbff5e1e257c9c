//! A read-only look at a queue directory in the Go SDK's format, for
//! `retryq migrate`: which entries are item files, and each item as its file
//! holds it, with the backend's naming and record rules. Unlike
//! [`super::FileRetryQueue::open`] it changes nothing in the directory (no
//! lock, no quarantine, no temp-file cleanup, no lease release), so a
//! directory another program still owns can be read as it is.

use std::io;
use std::path::{Path, PathBuf};

use super::record::{decode, parse_file_name, TMP_SUFFIX};
use super::OWN_ENTRIES;
use crate::item::QueueItem;

/// The entries of a queue directory, sorted by name.
#[derive(Debug)]
pub struct QueueDirScan {
    dir: PathBuf,
    items: Vec<String>,
    skipped: Vec<(String, &'static str)>,
}

impl QueueDirScan {
    /// Lists `dir`. Item files are named by [`Self::item_files`]; entries
    /// that are neither items nor retryq's own (a folder, a foreign file, a
    /// `.json` whose name does not parse) by [`Self::skipped`]. Temp files
    /// of item writes are writes that never committed: neither.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let mut items = Vec::new();
        let mut skipped = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                skipped.push((
                    entry.file_name().to_string_lossy().into_owned(),
                    "a name that is not UTF-8",
                ));
                continue;
            };
            let is_item_tmp = name
                .strip_suffix(TMP_SUFFIX)
                .and_then(parse_file_name)
                .is_some();
            if OWN_ENTRIES.contains(&name.as_str()) || is_item_tmp {
                continue;
            }
            if parse_file_name(&name).is_none() {
                skipped.push((name, "not a queue record (a foreign file or folder)"));
            } else if entry.file_type()?.is_dir() {
                skipped.push((name, "a directory where an item file should be"));
            } else {
                items.push(name);
            }
        }
        items.sort();
        skipped.sort();
        Ok(QueueDirScan {
            dir: dir.to_path_buf(),
            items,
            skipped,
        })
    }

    /// The item files. names, sorted.
    pub fn item_files(&self) -> &[String] {
        &self.items
    }

    /// Entries that are not items, with why.
    pub fn skipped(&self) -> &[(String, &'static str)] {
        &self.skipped
    }

    /// Reads and checks the item file `name`, as the backend does at open
    /// (a processing item is returned as the file says). `Err` says why it
    /// is not a loadable item: unreadable, torn, corrupt, or naming
    /// another ID.
    pub fn read(&self, name: &str) -> Result<QueueItem, String> {
        let id = parse_file_name(name).ok_or_else(|| "not an item file name".to_owned())?;
        let bytes = super::fs::read_regular(&self.dir.join(name))
            .map_err(|e| format!("cannot be read: {e}"))?;
        decode(&bytes, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::item::NewItem;
    use chrono::Utc;

    #[test]
    fn classifies_entries_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let item = NewItem::from_json(br#"{"a":1}"#)
            .unwrap()
            .into_item(Utc::now(), 10)
            .unwrap();
        let name = super::super::record::file_name(&item);
        std::fs::write(
            dir.join(&name),
            super::super::record::encode(&item).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{name}.tmp")), b"half").unwrap();
        std::fs::write(dir.join("1_torn.json"), b"{\"id\":").unwrap();
        std::fs::create_dir(dir.join("2_folder.json")).unwrap();
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        std::fs::write(dir.join(super::super::LOCK_FILE), b"1").unwrap();
        let before = std::fs::read_dir(dir).unwrap().count();

        let scan = QueueDirScan::open(dir).unwrap();
        assert_eq!(scan.item_files(), [name.clone(), "1_torn.json".to_owned()]);
        let skipped: Vec<&str> = scan.skipped().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(skipped, ["2_folder.json", "notes.txt"]);
        assert_eq!(scan.read(&name).unwrap(), item);
        assert!(scan.read("1_torn.json").is_err());
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), before);
    }
}
