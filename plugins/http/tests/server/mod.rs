//! A tiny scripted HTTP/1.1 server on 127.0.0.1 for the transport tests:
//! answers each request with the next scripted reply (the last one repeats),
//! closes the connection after every answer, and records what it received.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Sleep before answering (to provoke timeouts).
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct ScriptedServer {
    port: u16,
    recorded: Arc<Mutex<Vec<Recorded>>>,
}

impl ScriptedServer {
    /// Starts a server answering with `replies` in order.
    pub fn start(replies: Vec<Reply>) -> Self {
        assert!(!replies.is_empty(), "script at least one reply");
        Self::start_inner(replies, None)
    }

    /// Starts an HTTPS server with the PEM certificate chain and PKCS#8 key.
    pub fn start_tls(replies: Vec<Reply>, cert_chain_pem: &[u8], key_pem: &[u8]) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_chain_pem)
            .collect::<Result<_, _>>()
            .expect("test certificate");
        let key = PrivateKeyDer::from_pem_slice(key_pem).expect("test key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        Self::start_inner(replies, Some(Arc::new(config)))
    }

    fn start_inner(replies: Vec<Reply>, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = listener.local_addr().expect("local addr").port();
        let script = Arc::new(Mutex::new(VecDeque::from(replies)));
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let recorded_by_server = Arc::clone(&recorded);
        // Detached: lives until the test process exits.
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let script = Arc::clone(&script);
                let recorded = Arc::clone(&recorded_by_server);
                let tls = tls.clone();
                thread::spawn(move || {
                    let _ = match tls {
                        None => serve_one(stream, &script, &recorded),
                        Some(config) => match rustls::ServerConnection::new(config) {
                            Ok(connection) => serve_one(
                                rustls::StreamOwned::new(connection, stream),
                                &script,
                                &recorded,
                            ),
                            Err(_) => Ok(()),
                        },
                    };
                });
            }
        });
        ScriptedServer { port, recorded }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }

    pub fn only_request(&self) -> Recorded {
        let requests = self.requests();
        assert_eq!(
            requests.len(),
            1,
            "expected exactly one request: {requests:?}"
        );
        requests.into_iter().next().unwrap()
    }
}

fn serve_one<S: Read + Write>(
    stream: S,
    script: &Mutex<VecDeque<Reply>>,
    recorded: &Mutex<Vec<Recorded>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(()); // connection opened and closed without a request
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();

    let mut headers = Vec::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim().to_owned();
            if name == "content-length" {
                content_length = value.parse().unwrap_or(0);
            }
            headers.push((name, value));
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    recorded.lock().unwrap().push(Recorded {
        method,
        path,
        headers,
        body,
    });

    let reply = {
        let mut script = script.lock().unwrap();
        if script.len() > 1 {
            script.pop_front().unwrap()
        } else {
            script.front().cloned().unwrap()
        }
    };
    thread::sleep(reply.delay);
    let out = reader.get_mut();
    let mut head = format!(
        "HTTP/1.1 {} Scripted\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.write_all(&reply.body)?;
    out.flush()
}

/// A base URL where connecting is refused at once: port P is held by a
/// listener on 127.0.0.1, so no other socket can take it, and the URL dials
/// P on 127.0.0.2, where nothing listens (Linux answers all of 127/8). A
/// port bound and released before the connect instead could be taken by a
/// parallel test's server, or picked as the client's own source port (a
/// TCP self-connect). Keep the listener alive while the URL is used.
pub fn refusing_base_url() -> (Option<std::net::TcpListener>, String) {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    if cfg!(target_os = "linux") {
        (Some(held), format!("http://127.0.0.2:{port}"))
    } else {
        // Elsewhere only 127.0.0.1 may be up: released, with that small race.
        (None, format!("http://127.0.0.1:{port}"))
    }
}
