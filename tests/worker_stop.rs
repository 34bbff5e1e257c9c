//! `stop()` really ends a worker started from a plain tokio program: the
//! dedicated actor thread exits (it is joined, not detached), so a host that
//! stops its worker is left with no thread running on its behalf.
//!
//! Alone in its own test binary: it counts this process's threads by name,
//! which other tests' workers would disturb.

#![cfg(target_os = "linux")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use retryq::plugin_sdk::{CallContext, ItemMeta, PushOutcome, Pusher};
use retryq::store::{RetryQueue, SqliteRetryQueue, StoreOptions};
use retryq::worker::{RetryWorker, RetryWorkerConfig};
use retryq::{NewItem, Payload};

#[derive(Default)]
struct CountingPusher {
    pushes: AtomicUsize,
}

impl Pusher for CountingPusher {
    fn push(&self, _item: &ItemMeta, _payload: &[u8], _ctx: &CallContext) -> PushOutcome {
        self.pushes.fetch_add(1, Ordering::SeqCst);
        PushOutcome::Delivered
    }
}

/// Threads of this process whose name is `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("list /proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_actor_thread_and_a_restart_works() {
    let dir = tempfile::tempdir().unwrap();
    let queue: Arc<dyn RetryQueue> = Arc::new(
        SqliteRetryQueue::open(dir.path().join("queue.db"), StoreOptions::default()).unwrap(),
    );
    let pusher = Arc::new(CountingPusher::default());
    for round in 1..=2 {
        let worker =
            RetryWorker::new(RetryWorkerConfig::default(), queue.clone(), pusher.clone()).unwrap();
        worker.start().await.unwrap();
        // The actor thread, and the pusher pool's threads that inherit
        // its name.
        assert!(threads_named("retryq-actors") >= 1, "round {round}");
        let payload = Payload::from_json_str(&format!("{{\"round\":{round}}}")).unwrap();
        worker.enqueue(NewItem::new(payload)).await.unwrap();
        let mut waited = 0;
        while pusher.pushes.load(Ordering::SeqCst) < round && waited < 1_000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        assert_eq!(pusher.pushes.load(Ordering::SeqCst), round);
        worker.stop(Duration::from_secs(5)).await.unwrap();
        assert!(!worker.is_running());
        // The pusher pool's threads end a moment after the System does;
        // wait for them, boundedly. A thread still there after that is a
        // leak: a supervised actor restarted in a loop at stop (it happened
        // to the janitor), or a thread stop() detached.
        let mut waited = 0;
        while threads_named("retryq-actors") > 0 && waited < 1_000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        assert_eq!(
            threads_named("retryq-actors"),
            0,
            "round {round}: a worker thread outlived stop()"
        );
    }
    assert_eq!(queue.size().unwrap(), 0);
}
