//! What every command shares: the output mode and how to load the
//! configuration and open the store. Its own module so that commands in
//! other files (`migrate`) use it without importing the dispatcher.

use std::sync::Arc;

use anyhow::Context as _;
use retryq::config::{LoadOptions, Settings, StoreBackend};
use retryq::{RetryQueue, SqliteRetryQueue};

/// What every command shares: output mode and how to load the configuration.
pub(crate) struct Ctx {
    pub(crate) json: bool,
    pub(crate) load: LoadOptions,
}

impl Ctx {
    pub(crate) fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings::load(&self.load)?)
    }

    /// Opens the store for a CLI command: a SQLite database as an admin
    /// client (no write at open, so the command never races a daemon that
    /// is starting); the files backend as usual.
    pub(crate) fn open_store(&self, settings: &Settings) -> anyhow::Result<Arc<dyn RetryQueue>> {
        let opened: Result<Arc<dyn RetryQueue>, retryq::QueueError> = match settings.store.backend {
            StoreBackend::Sqlite => SqliteRetryQueue::open_as_client(
                settings.store.effective_path(),
                settings.store_options(),
            )
            .and_then(|q| {
                let marker =
                    retryq::seal::marker::marker_path(&settings.store.effective_path(), false);
                retryq::seal::wrap_store_marked(
                    Arc::new(q),
                    &settings.store.encryption,
                    Some(&marker),
                )
            }),
            StoreBackend::Files | StoreBackend::Postgres => settings.open_store(),
        };
        opened.with_context(|| {
            format!(
                "cannot open the {} store at {}",
                settings.store.backend.as_str(),
                settings.store.location()
            )
        })
    }

    /// Opens the store as [`Self::open_store`] does but unsealed: what the
    /// backend holds, envelopes and all (`retryq keys`).
    pub(crate) fn open_raw_store(
        &self,
        settings: &Settings,
    ) -> anyhow::Result<Arc<dyn RetryQueue>> {
        let path = settings.store.effective_path();
        let opened: Result<Arc<dyn RetryQueue>, retryq::QueueError> = match settings.store.backend {
            StoreBackend::Sqlite => {
                SqliteRetryQueue::open_as_client(&path, settings.store_options())
                    .map(|q| Arc::new(q) as Arc<dyn RetryQueue>)
            }
            StoreBackend::Files => retryq::FileRetryQueue::open(&path, settings.store_options())
                .map(|q| Arc::new(q) as Arc<dyn RetryQueue>),
            StoreBackend::Postgres => retryq::fleet::open_postgres(
                settings.store.postgres.as_ref(),
                settings.store_options(),
            ),
        };
        opened.with_context(|| {
            format!(
                "cannot open the {} store at {}",
                settings.store.backend.as_str(),
                path.display()
            )
        })
    }
}
