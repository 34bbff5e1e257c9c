//! The CLI's way to a running daemon: finding it through the store's owner
//! lock, and calling its admin API (blocking, loopback, the bearer token
//! from the same configuration's `[admin]` section).
//!
//! A daemon that owns the store is the only process that may claim from it,
//! and with the files backend the only one that may open it at all, so
//! every CLI command that needs the store asks [`DaemonClient::find`] first
//! and goes through the API when it answers `Some`.

use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::{Method, StatusCode, Url};
use retryq::admin::AdminToken;
use retryq::config::Settings;
use retryq::store::owner::{OwnerInfo, OwnerLock};
use serde_json::Value;

/// How long to wait for a daemon that holds the owner lock to publish its
/// admin address (it loads plugins and opens the store first).
const ADDRESS_WAIT: Duration = Duration::from_secs(15);

/// Longest wait for one API call: an enqueue may wait for a group commit,
/// a cleanup or a purge may touch many items.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The daemon answered with an error status (its JSON error body).
#[derive(Debug, thiserror::Error)]
#[error("the daemon (pid {pid}) refused: {message} (HTTP {status}, {kind})")]
pub struct DaemonApiError {
    /// The daemon's pid.
    pub pid: u32,
    /// The status code the API answered with.
    pub status: u16,
    /// The API's error kind (`disk_full`, `item_not_found`, ...).
    pub kind: String,
    /// The API's message.
    pub message: String,
}

/// A command that acts on a running daemon found none on the store.
#[derive(Debug, thiserror::Error)]
#[error(
    "no daemon is running on this store ({store}): `retryq {command}` acts on a running \
     `retryq run`; start it first"
)]
pub struct NoDaemon {
    /// The store's path.
    pub store: String,
    /// The command that needed it.
    pub command: &'static str,
}

/// A running daemon's admin API.
#[derive(Debug)]
pub struct DaemonClient {
    http: Client,
    base: Url,
    token: Option<String>,
    owner: OwnerInfo,
}

impl DaemonClient {
    /// The daemon that owns the configured store, or `None` when no daemon
    /// holds its owner lock (the CLI then opens the store itself).
    pub fn find(settings: &Settings) -> anyhow::Result<Option<DaemonClient>> {
        let lock = settings.store.owner_lock_path();
        let deadline = Instant::now() + ADDRESS_WAIT;
        let (owner, addr) = loop {
            let Some(owner) = OwnerLock::holder(&lock)
                .with_context(|| format!("cannot read the owner lock {}", lock.display()))?
            else {
                return Ok(None);
            };
            if let Some(addr) = owner.admin_addr.clone() {
                break (owner, addr);
            }
            // Starting up: the address is written once the API listens.
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the store is owned by a daemon ({}) that has not published its admin \
                     address after {}s; is its admin API failing to start?",
                    owner.describe(),
                    ADDRESS_WAIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // `https://host:port` when the daemon serves TLS, else `host:port`.
        let tls = addr.starts_with("https://");
        let url = if tls {
            format!("{addr}/")
        } else {
            format!("http://{addr}/")
        };
        let base = Url::parse(&url).with_context(|| {
            format!(
                "the owner lock {} names an admin address that is not host:port: {addr:?}",
                lock.display()
            )
        })?;
        let token = AdminToken::load_text(
            settings.admin.token_file.as_deref(),
            &settings.admin.token_env,
        )
        .context("cannot read the admin token to reach the running daemon")?;
        // reqwest is built with rustls but no crypto provider of its own
        // (the http plugin and the TLS listener use ring): install ring
        // before building any client, TLS or not, or reqwest panics.
        let _already = rustls::crypto::ring::default_provider().install_default();
        let mut builder = Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(5));
        if tls {
            builder = tls_client(builder, settings)?;
        }
        let http = builder.build().context("cannot build the HTTP client")?;
        Ok(Some(DaemonClient {
            http,
            base,
            token,
            owner,
        }))
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.owner.pid
    }

    /// `path` (segments, each percent-encoded) with `query` pairs.
    pub fn url(&self, segments: &[&str], query: &[(&str, String)]) -> anyhow::Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("the admin address {} has no path", self.base))?
            .extend(segments);
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (name, value) in query {
                pairs.append_pair(name, value);
            }
        }
        Ok(url)
    }

    /// GET `url`: the JSON body.
    pub fn get(&self, url: Url) -> anyhow::Result<Value> {
        self.send(self.http.request(Method::GET, url))
    }

    /// POST `body` (JSON, or nothing) to `url`: the JSON body.
    pub fn post(&self, url: Url, body: Option<Vec<u8>>) -> anyhow::Result<Value> {
        let mut request = self.http.request(Method::POST, url);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        self.send(request)
    }

    /// DELETE `url`: the JSON body, `Null` for a 204.
    pub fn delete(&self, url: Url) -> anyhow::Result<Value> {
        self.send(self.http.request(Method::DELETE, url))
    }

    fn send(&self, mut request: RequestBuilder) -> anyhow::Result<Value> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().with_context(|| {
            format!(
                "cannot reach the daemon that owns the store ({}) at {}",
                self.owner.describe(),
                self.base
            )
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .with_context(|| format!("cannot read the daemon's answer (HTTP {status})"))?;
        if status.is_success() {
            if body.is_empty() || status == StatusCode::NO_CONTENT {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&body).with_context(|| {
                format!(
                    "the daemon answered HTTP {status} with a body that is not JSON: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                )
            });
        }
        let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let kind = parsed["error"].as_str().unwrap_or("unknown").to_owned();
        let mut message = parsed["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        if status == StatusCode::UNAUTHORIZED {
            message.push_str(
                "; the CLI sends the token of its own configuration ([admin] token_file, or \
                 the token_env variable): give it the daemon's",
            );
        }
        Err(DaemonApiError {
            pid: self.owner.pid,
            status: status.as_u16(),
            kind,
            message,
        }
        .into())
    }
}

/// An HTTPS client for a daemon on this machine: it trusts exactly the
/// certificate of `[admin] tls_cert` (the config the daemon runs with), and
/// skips the host name check, because the daemon is reached through
/// loopback while its certificate names the host it is served as. Pinning
/// the one certificate is what keeps that safe.
fn tls_client(
    builder: reqwest::blocking::ClientBuilder,
    settings: &Settings,
) -> anyhow::Result<reqwest::blocking::ClientBuilder> {
    let cert_path = settings.admin.tls_cert.as_deref().context(
        "the running daemon serves its admin API over TLS, but this configuration sets no \
         admin.tls_cert to trust; use the daemon's configuration",
    )?;
    let pem = std::fs::read(cert_path)
        .with_context(|| format!("cannot read admin.tls_cert {}", cert_path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("admin.tls_cert {} is not PEM", cert_path.display()))?;
    Ok(builder
        .tls_certs_only(certs)
        .tls_danger_accept_invalid_hostnames(true))
}
