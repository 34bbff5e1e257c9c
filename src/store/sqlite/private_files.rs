//! The database's files are the owner's only: the folder is created if
//! missing and the database file is made mode 0600, at open and when a
//! salvage writes a fresh one.

use std::path::Path;

use crate::error::{QueueError, QueueResult};

#[cfg(unix)]
pub(super) fn create_private_dir(dir: &Path) -> QueueResult<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| QueueError::storage("open", format!("creating {}: {e}", dir.display())))
}

#[cfg(not(unix))]
pub(super) fn create_private_dir(dir: &Path) -> QueueResult<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| QueueError::storage("open", format!("creating {}: {e}", dir.display())))
}

#[cfg(unix)]
pub(super) fn set_private_file(path: &Path) -> QueueResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| QueueError::storage("open", format!("chmod {}: {e}", path.display())))
}

#[cfg(not(unix))]
pub(super) fn set_private_file(_path: &Path) -> QueueResult<()> {
    Ok(())
}
