//! The admin API's control of a daemon in a fleet: as
//! [`RetryWorkerControl`], except that an operator's pause and resume are
//! written to the database first, so that every daemon obeys them
//! ([`super::link`] applies them on the others) and a restart keeps them.

use std::time::Duration;

use super::pause::{FleetPause, SharedPause};
use crate::admin::{ControlError, ControlFuture, RetryWorkerControl, WorkerControl};
use crate::item::{ItemId, NewItem};
use crate::metrics::Metrics;
use crate::store::CleanupReport;

/// [`WorkerControl`] for a daemon on a shared PostgreSQL store.
pub struct FleetControl {
    inner: RetryWorkerControl,
    pause: SharedPause,
    instance: String,
}

impl std::fmt::Debug for FleetControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetControl")
            .field("inner", &self.inner)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl FleetControl {
    /// `inner`, with pauses shared through `pause`; `instance` is recorded
    /// as who paused.
    pub fn new(inner: RetryWorkerControl, pause: SharedPause, instance: String) -> Self {
        FleetControl {
            inner,
            pause,
            instance,
        }
    }

    async fn write_pause(&self, reason: Option<String>) -> Result<(), ControlError> {
        let pause = self.pause.clone();
        let instance = self.instance.clone();
        actix_web::web::block(move || match reason {
            Some(reason) => pause.set(&FleetPause {
                reason,
                since: chrono::Utc::now(),
                by: instance,
            }),
            None => pause.clear(),
        })
        .await
        .map_err(|_| ControlError::Other("the fleet's pause was not written".into()))?
        // Unwritten, the other daemons would not follow: fail rather than
        // pause this one alone.
        .map_err(ControlError::Queue)
    }
}

impl WorkerControl for FleetControl {
    fn process_now(&self) -> ControlFuture<'_, serde_json::Value> {
        self.inner.process_now()
    }

    fn stats(&self) -> ControlFuture<'_, serde_json::Value> {
        self.inner.stats()
    }

    fn trigger_cleanup(&self, ttl: Option<Duration>) -> ControlFuture<'_, CleanupReport> {
        self.inner.trigger_cleanup(ttl)
    }

    fn store_error(&self) -> Option<String> {
        self.inner.store_error()
    }

    fn notify_enqueued(&self) {
        self.inner.notify_enqueued()
    }

    fn enqueue(&self, item: NewItem) -> Result<ControlFuture<'_, ItemId>, Box<NewItem>> {
        self.inner.enqueue(item)
    }

    fn pause(&self, reason: String) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async move {
            if !self.inner.is_running() {
                return Err(ControlError::NotRunning);
            }
            self.write_pause(Some(reason.clone())).await?;
            self.inner.pause(reason).await
        })
    }

    fn resume(&self) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async move {
            if !self.inner.is_running() {
                return Err(ControlError::NotRunning);
            }
            self.write_pause(None).await?;
            self.inner.resume().await
        })
    }

    fn is_running(&self) -> bool {
        self.inner.is_running()
    }

    fn refresh_metrics(&self, metrics: &Metrics) {
        self.inner.refresh_metrics(metrics)
    }
}
