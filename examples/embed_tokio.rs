//! Embedding retryq in a plain tokio program: `start` notices there is no
//! actix System and runs the actors on a dedicated thread.
//!
//! Run: `cargo run --example embed_tokio`

use std::sync::Arc;
use std::time::Duration;

use retryq::plugin_sdk::{CallContext, ItemMeta, PushOutcome, Pusher};
use retryq::worker::{RetryWorker, RetryWorkerConfig};
use retryq::{NewItem, SqliteRetryQueue, StoreOptions};

/// An in-process transport: here it just prints what it delivers.
struct PrintTransport;

impl Pusher for PrintTransport {
    fn push(&self, item: &ItemMeta, payload: &[u8], _ctx: &CallContext) -> PushOutcome {
        println!("delivering {} ({} bytes)", item.id, payload.len());
        PushOutcome::Delivered
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let queue = Arc::new(SqliteRetryQueue::open(
        dir.path().join("queue.db"),
        StoreOptions::default(),
    )?);
    let worker = RetryWorker::new(
        RetryWorkerConfig::default(),
        queue,
        Arc::new(PrintTransport),
    )?;
    worker.start().await?;
    for n in 0..3 {
        let id = worker
            .enqueue(NewItem::from_json(
                format!("{{\"report\":{n}}}").as_bytes(),
            )?)
            .await?;
        println!("enqueued {id} (durable)");
    }
    // Wait (bounded) for the first attempts, which follow each enqueue.
    for _ in 0..100 {
        if worker.queue_stats().await?.total_items == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("stats: {:?}", worker.stats());
    worker.stop(Duration::from_secs(5)).await?;
    Ok(())
}
