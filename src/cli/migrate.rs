//! `retryq migrate --from DIR`: import a Go SDK retry-queue directory.

use std::path::Path;

use super::commands::Ctx;

/// Imports the Go SDK queue in `from` into the configured store.
pub fn migrate(_ctx: &Ctx, from: &Path) -> anyhow::Result<()> {
    anyhow::bail!(
        "cannot migrate {}: the files backend is not built into this binary yet",
        from.display()
    )
}
