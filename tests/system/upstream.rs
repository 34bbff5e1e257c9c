//! The scripted upstream: a hand-rolled HTTP/1.1 server on 127.0.0.1:0 that
//! stands in for OpenCTEM. Tests switch its behaviour at run time (accept,
//! fail, fail the first N, 401, 429 with Retry-After, delay, hang) and read
//! back every request it saw, to count deliveries, duplicates and probes.
//!
//! One thread per connection and `Connection: close` on every answer: the
//! daemon's pool reconnects each time, which keeps the parser trivial and
//! means a killed daemon never leaves a half-read keep-alive stream behind.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the upstream answers pushes.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// 200 to everything.
    Accept,
    /// This status to everything (503, 500...).
    Fail(u16),
    /// This status after a delay: a slow, overloaded upstream, which keeps
    /// pushes in flight while the circuit opens.
    FailSlowly(u16, Duration),
    /// 503 to the next N requests, then 200.
    FailFirst(u32),
    /// 401 to everything, as an upstream with revoked credentials.
    Unauthorized,
    /// 429 with `Retry-After: secs`.
    TooMany { retry_after_secs: u32 },
    /// 200 after this delay, so pushes stay in flight for a while.
    Delay(Duration),
    /// Never answers while the mode lasts (the request's timeout fires).
    Hang,
}

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct Request {
    /// When it arrived.
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// The `Idempotency-Key` header: the item ID.
    pub key: Option<String>,
    pub body: Vec<u8>,
    /// The status the upstream decided to answer (0 for a hang).
    pub status: u16,
}

impl Request {
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

struct Shared {
    mode: Mutex<Mode>,
    requests: Mutex<Vec<Request>>,
    stop: AtomicBool,
}

/// The running server; dropping it stops accepting.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Upstream {
    pub fn start(mode: Mode) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the test upstream");
        let addr = listener.local_addr().expect("upstream address");
        let shared = Arc::new(Shared {
            mode: Mutex::new(mode),
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let conn_shared = accept_shared.clone();
                std::thread::spawn(move || {
                    // A daemon killed mid-request is expected: ignore I/O errors.
                    let _ = serve(stream, &conn_shared);
                });
            }
        });
        Upstream { addr, shared }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Accepted answers per item ID (Idempotency-Key).
    pub fn accepted_per_key(&self) -> BTreeMap<String, usize> {
        let mut map = BTreeMap::new();
        for r in self.requests().iter().filter(|r| r.accepted()) {
            if let Some(key) = &r.key {
                *map.entry(key.clone()).or_insert(0) += 1;
            }
        }
        map
    }

    /// Accepted answers beyond the first, over all items.
    pub fn duplicates(&self) -> usize {
        self.accepted_per_key()
            .values()
            .map(|n| n.saturating_sub(1))
            .sum()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut key = None;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            break;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("idempotency-key") {
                key = Some(value.to_owned());
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;

    // Decide the answer and record the request under one lock, so the
    // order of the log is the order of the decisions.
    let mode = {
        let mut mode = shared.mode.lock().unwrap();
        let current = mode.clone();
        if let Mode::FailFirst(n) = &mut *mode {
            if *n == 0 {
                *mode = Mode::Accept;
            } else {
                *n -= 1;
            }
        }
        current
    };
    let (status, extra, delay) = match mode {
        Mode::Accept | Mode::FailFirst(0) => (200, String::new(), None),
        Mode::Fail(status) => (status, String::new(), None),
        Mode::FailSlowly(status, d) => (status, String::new(), Some(d)),
        Mode::FailFirst(_) => (503, String::new(), None),
        Mode::Unauthorized => (401, String::new(), None),
        Mode::TooMany { retry_after_secs } => {
            (429, format!("Retry-After: {retry_after_secs}\r\n"), None)
        }
        Mode::Delay(d) => (200, String::new(), Some(d)),
        Mode::Hang => (0, String::new(), None),
    };
    shared.requests.lock().unwrap().push(Request {
        at: Instant::now(),
        method,
        path,
        key,
        body,
        status,
    });
    if status == 0 {
        // Hold the connection without answering while the mode stays Hang.
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until
            && *shared.mode.lock().unwrap() == Mode::Hang
            && !shared.stop.load(Ordering::SeqCst)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        return Ok(());
    }
    if let Some(d) = delay {
        std::thread::sleep(d);
    }
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let body = format!("{{\"status\":{status}}}");
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
