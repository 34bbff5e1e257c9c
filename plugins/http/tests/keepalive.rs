//! HTTP keep-alive: one pusher reuses its connections across pushes, so the
//! number of TCP connections a sink sees follows how many pushes ran at once,
//! not how many pushes there were.
//!
//! The bound is two connections per pushing thread, not one. The pool takes a
//! connection back on a task of its own after the answer was read, so a thread
//! that pushes again at once can find no idle connection; hyper then starts a
//! connect, and if the old connection comes back first it still finishes that
//! connect and pools it. Each thread can thus hold one connection in use and
//! one on its way back. Without keep-alive a sink sees one connection per push,
//! far above either bound.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use retryq_http::HttpPusher;
use retryq_plugin::{CallContext, ItemMeta, PushOutcome, Pusher};

/// A keep-alive HTTP/1.1 sink answering every request 200 with `reply`,
/// counting the TCP connections it accepted.
struct CountingSink {
    port: u16,
    accepted: Arc<AtomicU64>,
}

impl CountingSink {
    fn start(reply: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let reply = Arc::new(reply);
        // Detached: lives until the test process exits.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let reply = reply.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &reply);
                });
            }
        });
        CountingSink { port, accepted }
    }

    fn pusher(&self) -> HttpPusher {
        HttpPusher::from_settings(&serde_json::json!({
            "base_url": format!("http://127.0.0.1:{}", self.port)
        }))
        .unwrap()
    }

    fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve(stream: TcpStream, reply: &[u8]) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    stream.set_nodelay(true)?;
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let header = line.trim_end().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if let Some(v) = header.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        // One write per answer: split writes meet delayed ACKs.
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            reply.len()
        )
        .into_bytes();
        answer.extend_from_slice(reply);
        writer.write_all(&answer)?;
    }
}

fn item(n: usize) -> ItemMeta {
    ItemMeta {
        id: format!("item-{n}"),
        item_type: "findings".into(),
        fingerprint: format!("fp-{n}"),
        max_attempts: 10,
        ..ItemMeta::default()
    }
}

/// `threads` threads share one pusher and push `per_thread` items each.
fn push_many(pusher: &HttpPusher, threads: usize, per_thread: usize) {
    let payload = vec![b'x'; 4096];
    std::thread::scope(|scope| {
        for t in 0..threads {
            let payload = &payload;
            scope.spawn(move || {
                for i in 0..per_thread {
                    let ctx = CallContext::with_timeout(Duration::from_secs(10));
                    let outcome = pusher.push(&item(t * per_thread + i), payload, &ctx);
                    assert_eq!(outcome, PushOutcome::Delivered);
                }
            });
        }
    });
}

/// Pushes `threads × per_thread` items and checks the sink saw at least one
/// and at most two connections per thread (see the module doc).
fn assert_connections_follow_concurrency(reply: Vec<u8>, threads: usize, per_thread: usize) {
    let sink = CountingSink::start(reply);
    let pusher = sink.pusher();
    push_many(&pusher, threads, per_thread);
    let connections = sink.connections();
    let bound = 2 * threads as u64;
    assert!(
        (1..=bound).contains(&connections),
        "{connections} connections for {} pushes from {threads} thread(s); keep-alive allows at most {bound}",
        threads * per_thread
    );
}

#[test]
fn pushes_in_turn_reuse_their_connection() {
    assert_connections_follow_concurrency(br#"{"status":"accepted"}"#.to_vec(), 1, 100);
}

#[test]
fn concurrent_pushes_open_connections_per_thread_not_per_push() {
    assert_connections_follow_concurrency(br#"{"status":"accepted"}"#.to_vec(), 4, 50);
}

#[test]
fn a_large_success_body_does_not_cost_the_connection() {
    // The body of a 2xx is not needed, but a connection whose answer was
    // not read to the end cannot carry the next request.
    assert_connections_follow_concurrency(vec![b' '; 64 * 1024], 1, 20);
}
