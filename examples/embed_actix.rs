//! Embedding retryq inside a host's running actix System: the worker's
//! actors join the host's System instead of starting their own.
//!
//! Run: `cargo run --example embed_actix`

use std::sync::Arc;
use std::time::Duration;

use retryq::plugin_sdk::{CallContext, ItemMeta, PushOutcome, Pusher};
use retryq::worker::{RetryWorker, RetryWorkerConfig};
use retryq::{NewItem, SqliteRetryQueue, StoreOptions};

/// An upstream that fails the first attempt of every item, to show retries.
struct FlakyTransport;

impl Pusher for FlakyTransport {
    fn push(&self, item: &ItemMeta, _payload: &[u8], _ctx: &CallContext) -> PushOutcome {
        if item.attempts == 0 {
            println!("{}: upstream busy (attempt 1)", item.id);
            PushOutcome::Retryable {
                message: "503 Service Unavailable".into(),
                retry_after: Some(Duration::from_millis(200)),
            }
        } else {
            println!("{}: delivered on attempt {}", item.id, item.attempts + 1);
            PushOutcome::Delivered
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let system = actix::System::new();
    system.block_on(async {
        let dir = tempfile::tempdir()?;
        let queue = Arc::new(SqliteRetryQueue::open(
            dir.path().join("queue.db"),
            StoreOptions::default(),
        )?);
        let config = RetryWorkerConfig {
            backoff: retryq::backoff::BackoffConfig::new(
                retryq::backoff::BackoffStrategy::Constant,
                Duration::from_millis(100),
                Duration::from_secs(1),
            )?,
            ..RetryWorkerConfig::default()
        };
        let worker = RetryWorker::new(config, queue, Arc::new(FlakyTransport))?;
        worker.on_success(|event| println!("on_success: {}", event.item_id));
        worker.start().await?; // inside this System
        worker
            .enqueue(NewItem::from_json(br#"{"finding":"demo"}"#)?)
            .await?;
        for _ in 0..100 {
            if worker.queue_stats().await?.total_items == 0 {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        println!("stats: {:?}", worker.stats());
        worker.stop(Duration::from_secs(5)).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
