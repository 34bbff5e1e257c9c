//! Isolation benchmark: the per-push cost of `isolation = "process"` (a
//! `retryq plugin-host` child over framed pipes) against `in_process` (the
//! library loaded in the daemon, behind the deadline guard the daemon uses),
//! with the same C plugin (tests/c_plugin/echo.c, compiled here with `cc`,
//! delivering at once, so what is measured is the transport overhead), in
//! one run.
//!
//! For 1, 4 and 64 KiB payloads, from 1 and 4 threads pushing at once, it
//! prints the mean time per push of each mode (median of 7 alternating
//! rounds), the difference (the target is at most 50 µs more per push) and
//! the ratio. Run with `cargo bench --bench isolation`;
//! `RETRYQ_ISOLATION_PUSHES` changes the pushes per round (default 5,000).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use retryq::config::PluginSettings;
use retryq::plugin::load_pusher;
use retryq::plugin_process::{PluginTarget, ProcessOptions, ProcessPusher};
use retryq::plugin_sdk::{CallContext, ItemMeta, PushOutcome, Pusher};

const ROUNDS: usize = 7;

fn compile_echo(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = dir.join("libecho.so");
    let ok = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&out)
        .arg("-I")
        .arg(root.join("plugins/sdk/include"))
        .arg(root.join("tests/c_plugin/echo.c"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "cc failed");
    out
}

/// Mean time per push of `pushes` pushes spread over `threads` threads.
fn per_push(
    pusher: &Arc<dyn Pusher>,
    payload: &Arc<Vec<u8>>,
    pushes: usize,
    threads: usize,
) -> f64 {
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (pusher, payload) = (pusher.clone(), payload.clone());
            std::thread::spawn(move || {
                let meta = ItemMeta {
                    id: format!("bench-{t}"),
                    item_type: "findings".into(),
                    fingerprint: "fp".into(),
                    max_attempts: 10,
                    created_at: "2026-01-01T00:00:00Z".into(),
                    ..ItemMeta::default()
                };
                for _ in 0..pushes / threads {
                    let ctx = CallContext::with_timeout(Duration::from_secs(30));
                    let outcome = pusher.push(&meta, &payload, &ctx);
                    assert_eq!(outcome, PushOutcome::Delivered);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("push thread");
    }
    started.elapsed().as_secs_f64() * 1e6 / (pushes / threads * threads) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let pushes: usize = std::env::var("RETRYQ_ISOLATION_PUSHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = compile_echo(dir.path());
    let spec = PluginSettings {
        path: Some(lib.clone()),
        ..PluginSettings::default()
    };
    let in_process: Arc<dyn Pusher> = load_pusher(&spec, &[]).expect("load in process");
    let isolated: Arc<dyn Pusher> = Arc::new(
        ProcessPusher::start(
            PluginTarget {
                label: "echo".into(),
                path: lib,
                sha256: None,
                settings: serde_json::json!({}),
            },
            ProcessOptions {
                concurrency: 4,
                ..ProcessOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_retryq")))
            },
        )
        .expect("start the plugin host"),
    );
    println!("isolation bench: {pushes} pushes per round, median of {ROUNDS} alternating rounds");
    println!(
        "{:>9} {:>7} {:>14} {:>14} {:>12} {:>7}",
        "payload", "threads", "in_process µs", "process µs", "extra µs", "ratio"
    );
    for size in [1024usize, 4 * 1024, 64 * 1024] {
        // JSON-ish bytes without "fail"/"reject", which echo reacts to.
        let payload = Arc::new(vec![b'x'; size]);
        for threads in [1usize, 4] {
            // Warm both paths (threads, pages, the child's pool).
            per_push(&in_process, &payload, pushes / 10, threads);
            per_push(&isolated, &payload, pushes / 10, threads);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                a.push(per_push(&in_process, &payload, pushes, threads));
                b.push(per_push(&isolated, &payload, pushes, threads));
            }
            let (a, b) = (median(a), median(b));
            println!(
                "{:>8}K {:>7} {:>14.2} {:>14.2} {:>12.2} {:>6.2}x",
                size / 1024,
                threads,
                a,
                b,
                b - a,
                b / a
            );
        }
    }
}
