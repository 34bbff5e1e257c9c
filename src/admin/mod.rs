//! The admin and ingest HTTP API (actix-web) that `retryq run` serves.
//!
//! # Endpoints
//!
//! | method and path | what | statuses |
//! |---|---|---|
//! | `POST /v1/items` | enqueue the body (a JSON document) | 201, 400, 401, 409, 413, 507 |
//! | `GET /v1/items` | list items (no payloads) | 200, 400, 401 |
//! | `DELETE /v1/items?status=S` | purge every item in status `S`; answers `{"purged": n, "status": S}` | 200, 400, 401 |
//! | `POST /v1/items/retry-failed` | bring every dead letter back, due now; answers `{"revived": n, "ids": [...]}` | 200, 400, 401 |
//! | `GET /v1/items/{id}` | one item; `?payload=true` adds the report | 200, 400, 401, 404 |
//! | `DELETE /v1/items/{id}` | remove an item | 204, 400, 401, 404 |
//! | `POST /v1/items/{id}/retry` | bring a dead letter back, due now | 200, 400, 401, 404, 409 |
//! | `POST /v1/process-now` | run a delivery round now | 200, 401, 503 |
//! | `POST /v1/pause` | stop delivering (optional body `{"reason": "..."}`) | 200, 400, 401, 503 |
//! | `POST /v1/resume` | deliver again (also ends a 401 pause and an open circuit) | 200, 401, 503 |
//! | `POST /v1/cleanup` | expire old items (`?ttl=7d` optional) | 200, 400, 401, 503 |
//! | `GET /v1/stats` | queue statistics (the seed's names) and `worker` (with `paused`, `pause_reason`, `paused_since`) | 200, 401 |
//! | `GET /v1/events` | live events as server-sent events (format in [`events`]) | 200, 401 |
//! | `GET /v1/stats/history` | delivered, failed, dead-lettered and enqueued per minute over the last hour ([`history`]) | 200, 401 |
//! | `GET /v1/info` | version, `max_bytes`, `max_items`, loaded plugins with their sha256 ([`console`]) | 200, 401 |
//! | `GET /v1/openapi.json` | this API described in OpenAPI 3.1, generated from the handlers ([`openapi`]); no token | 200 |
//! | `GET /ui` | the operator console: embedded HTML, script and style, no token (its API calls carry it) | 200 |
//! | `GET /healthz` | liveness: always 200 while serving, no token | 200 |
//! | `GET /readyz` | readiness: store open and worker running, no token | 200, 503 |
//! | `GET /metrics` | Prometheus text format 0.0.4 (token unless disabled) | 200, 401 |
//!
//! `GET /v1/items` takes `status`, `type`, `ready`, `limit` (default 100,
//! capped at [`AdminConfig::max_list_limit`]), `offset`, `order_by`
//! (`created_at`, `next_retry`, `attempts`) and `desc`; an unknown parameter
//! or a bad value is a 400 naming it.
//!
//! Every error is a JSON body `{"error": "<kind>", "message": "..."}` (a 409
//! duplicate adds `existing_id`); see [`ApiError`].
//!
//! # Ingest parameters
//!
//! `POST /v1/items` takes the payload as the body and everything else as
//! query parameters or `X-Retryq-*` headers: `type`, `fingerprint`, `id`,
//! `agent_id`, `scanner_name`, `target_path`, `max_attempts`, and attributes
//! as `attr.KEY=VALUE` query parameters or `X-Retryq-Attr-KEY` headers (a
//! header name is case-insensitive, so a header attribute's key is taken in
//! lower case). Header names use `-` for `_` (`X-Retryq-Agent-Id`). An
//! unknown parameter, a repeated one, or a query parameter and a header that
//! disagree is a 400 naming it.
//!
//! # Security
//!
//! The server listens on loopback by default. When a bearer token is
//! configured ([`AdminToken`], from a file or an environment variable, read
//! once at startup) every endpoint but `/healthz` and `/readyz` requires
//! `Authorization: Bearer <token>`, compared in constant time; `/metrics`
//! requires it too unless [`AdminConfig::metrics_require_token`] is false.
//! [`bind`] refuses a non-loopback address without a token. With
//! [`AdminConfig::tls`] (`[admin] tls_cert` and `tls_key`) the listener
//! serves HTTPS through rustls; use it whenever it is not on loopback, or
//! the token crosses the network in clear. Request bodies
//! are limited to [`AdminConfig::body_limit`] bytes. Neither payloads nor
//! tokens are ever logged.
//!
//! Cross-site requests: every state-changing endpoint requires the bearer
//! header, which a cross-site form or link cannot send, and the API sets no
//! cookie, so another site has no ambient credential to ride on. The
//! console keeps the token in the tab's `sessionStorage` and sends it only in
//! that header (never in a URL, which is why `/v1/events` is read with
//! `fetch()` rather than `EventSource`).
//!
//! # Wiring
//!
//! The API needs the store ([`RetryQueue`]), the running worker (through the
//! object-safe [`WorkerControl`], so this module does not depend on the
//! worker's types) and the [`Metrics`] registry, gathered in [`AdminState`].
//! Store calls run on actix's blocking pool (`web::block`) so they never
//! block an HTTP worker thread.

mod auth;
pub mod bulk;
pub mod console;
mod error;
pub mod events;
mod handlers;
pub mod history;
pub mod openapi;
pub mod schema;
mod tls;
mod ui;
mod worker_control;

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};

use crate::clock::{system_clock, SharedClock};
use crate::error::QueueError;
use crate::item::{ItemId, NewItem};
use crate::metrics::Metrics;
use crate::store::{CleanupReport, RetryQueue};

pub use auth::{AdminToken, DEFAULT_TOKEN_ENV};
pub use error::ApiError;
pub use tls::TlsFiles;
pub use worker_control::{record_worker_metrics, RetryWorkerControl};

/// Default listen address: loopback only.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT);
/// Default port of the admin API.
pub const DEFAULT_PORT: u16 = 7878;
/// Default request body limit: 10 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 10 * 1024 * 1024;
/// Default page size of `GET /v1/items`.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Default cap on `limit` for `GET /v1/items`.
pub const DEFAULT_MAX_LIST_LIMIT: usize = 1000;

/// A future returned by [`WorkerControl`] methods. Not required to be
/// `Send`: actix-web runs each request on one thread.
pub type ControlFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ControlError>> + 'a>>;

/// Why the worker could not do what the API asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The worker is stopped or was never started (HTTP 503).
    #[error("the worker is not running")]
    NotRunning,
    /// The store refused or failed (mapped like any store error).
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Anything else (HTTP 500).
    #[error("worker error: {0}")]
    Other(String),
}

/// What the API needs from the running worker, object-safe so the API does
/// not depend on the worker's types. The daemon implements it for
/// `RetryWorker`; tests use a fake.
pub trait WorkerControl: Send + Sync {
    /// Runs a delivery round now (the seed's `ProcessNow`) and returns its
    /// summary as JSON (the worker's own result type, serialized).
    fn process_now(&self) -> ControlFuture<'_, serde_json::Value>;

    /// The worker's statistics as JSON (the seed's `WorkerStats`, serialized);
    /// shown under `worker` in `GET /v1/stats`.
    fn stats(&self) -> ControlFuture<'_, serde_json::Value>;

    /// Runs a cleanup now with `ttl`, or the configured TTL when `None`.
    /// The implementation records expired items in [`Metrics`], as it does
    /// for periodic cleanups.
    fn trigger_cleanup(&self, ttl: Option<Duration>) -> ControlFuture<'_, CleanupReport>;

    /// While the store refuses writes (a full disk): the last error. The
    /// daemon is not ready then. The default: healthy.
    fn store_error(&self) -> Option<String> {
        None
    }

    /// Tells the worker that items became due now (an item was enqueued or
    /// revived through the API), so it need not wait for its next timer.
    /// Must not block.
    fn notify_enqueued(&self);

    /// Stores an item received by `POST /v1/items` through the worker and
    /// returns its ID, or hands the item back (`Err`) when this worker
    /// does not store items: the API then stores it in the queue itself
    /// and calls [`WorkerControl::notify_enqueued`]. The default hands it
    /// back. The daemon's worker takes it, so concurrent requests share
    /// its group commit and, while it runs, its outbox path.
    fn enqueue(&self, item: NewItem) -> Result<ControlFuture<'_, ItemId>, Box<NewItem>> {
        Err(Box::new(item))
    }

    /// Stops delivery until [`WorkerControl::resume`], recording `reason`,
    /// and answers the worker's pause state as JSON (`paused`,
    /// `pause_reason`, `paused_since`). The default: not running.
    fn pause(&self, _reason: String) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async { Err(ControlError::NotRunning) })
    }

    /// Resumes delivery after a pause of any kind and answers the pause
    /// state as JSON, like [`WorkerControl::pause`]. The default: not
    /// running.
    fn resume(&self) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async { Err(ControlError::NotRunning) })
    }

    /// True while the worker is running (for `/readyz`).
    fn is_running(&self) -> bool;

    /// Copies worker-held state into `metrics` just before a scrape (the
    /// circuit state, totals only the worker knows). Default: nothing.
    fn refresh_metrics(&self, _metrics: &Metrics) {}
}

/// A [`WorkerControl`] for serving the API without a worker: reads and
/// store changes work, worker calls answer 503 and `/readyz` is not ready.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoWorker;

impl WorkerControl for NoWorker {
    fn process_now(&self) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async { Err(ControlError::NotRunning) })
    }
    fn stats(&self) -> ControlFuture<'_, serde_json::Value> {
        Box::pin(async { Err(ControlError::NotRunning) })
    }
    fn trigger_cleanup(&self, _ttl: Option<Duration>) -> ControlFuture<'_, CleanupReport> {
        Box::pin(async { Err(ControlError::NotRunning) })
    }
    fn notify_enqueued(&self) {}
    fn is_running(&self) -> bool {
        false
    }
}

/// What the handlers share: the store, the worker and the metrics.
#[derive(Clone)]
pub struct AdminState {
    /// The store the API reads and changes (internally synchronized).
    pub queue: Arc<dyn RetryQueue>,
    /// The running worker.
    pub worker: Arc<dyn WorkerControl>,
    /// The metrics registry rendered by `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Where "now" comes from (age of the oldest item).
    pub clock: SharedClock,
    /// The console's live feed, history and daemon facts.
    pub console: Arc<console::ConsoleState>,
}

impl AdminState {
    /// State over `queue`, `worker` and `metrics`, with the system clock.
    pub fn new(
        queue: Arc<dyn RetryQueue>,
        worker: Arc<dyn WorkerControl>,
        metrics: Arc<Metrics>,
    ) -> Self {
        AdminState {
            queue,
            worker,
            metrics,
            console: Arc::new(console::ConsoleState::new(system_clock())),
            clock: system_clock(),
        }
    }

    /// Replaces the console's state (the daemon's feed, with its plugins).
    pub fn with_console(mut self, console: Arc<console::ConsoleState>) -> Self {
        self.console = console;
        self
    }

    /// Replaces the clock.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("worker_running", &self.worker.is_running())
            .finish_non_exhaustive()
    }
}

/// How the API is served. Its serde form is the `[admin]` config section;
/// the token itself is never in it: [`AdminConfig::with_token`] reads it
/// from `token_file`, else from the `token_env` variable.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on (loopback by default).
    pub listen: SocketAddr,
    /// The bearer token; `None` leaves the API open (loopback only).
    #[serde(skip)]
    pub token: Option<AdminToken>,
    /// File holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the bearer token when there is no file.
    pub token_env: String,
    /// Whether `/metrics` requires the token (default true).
    pub metrics_require_token: bool,
    /// Largest request body accepted, in bytes (default 10 MiB).
    #[serde(rename = "max_body")]
    pub body_limit: usize,
    /// Cap on `limit` for `GET /v1/items` (default 1000).
    pub max_list_limit: usize,
    /// HTTP worker threads (default 2: the API is light next to delivery).
    pub workers: usize,
    /// How long a graceful stop waits for requests in flight.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// PEM certificate chain: with `tls_key`, the API serves HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: DEFAULT_LISTEN,
            token: None,
            token_file: None,
            token_env: DEFAULT_TOKEN_ENV.to_owned(),
            metrics_require_token: true,
            body_limit: DEFAULT_BODY_LIMIT,
            max_list_limit: DEFAULT_MAX_LIST_LIMIT,
            workers: 2,
            shutdown_timeout: Duration::from_secs(10),
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Why the API could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A non-loopback listen address without a token.
    #[error(
        "refusing to listen on {addr}: the admin API would be reachable from other hosts \
         without authentication; configure an admin token (token file or the \
         {DEFAULT_TOKEN_ENV} environment variable) or listen on a loopback address"
    )]
    InsecureListen {
        /// The address refused.
        addr: SocketAddr,
    },
    /// The token file could not be read.
    #[error("cannot read the admin token file {}: {source}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The token is empty or not acceptable.
    #[error("invalid admin token from {origin}: {reason}")]
    InvalidToken {
        /// Where the token came from (a file path or an environment variable).
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid admin setting {key} = {value}: {reason}")]
    InvalidSetting {
        /// The setting's name.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server failed while running.
    #[error("admin server failed: {0}")]
    Server(#[source] io::Error),
    /// A TLS certificate or key file is missing, unreadable or unusable.
    #[error("admin TLS: {}: {reason}", path.display())]
    Tls {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Settings the handlers read (kept in app data).
#[derive(Debug, Clone)]
pub(crate) struct ApiSettings {
    pub(crate) token: Option<AdminToken>,
    pub(crate) metrics_require_token: bool,
    pub(crate) body_limit: usize,
    pub(crate) max_list_limit: usize,
}

impl AdminConfig {
    /// This config with its token read (from `token_file`, else the
    /// `token_env` variable) once, here, and checked.
    pub fn with_token(mut self) -> Result<Self, AdminError> {
        self.token = AdminToken::load(self.token_file.as_deref(), &self.token_env)?;
        self.validate()?;
        self.check_listen()?;
        Ok(self)
    }

    /// [`AdminConfig::with_token`] on a copy of `settings`.
    pub fn from_settings(settings: &AdminConfig) -> Result<Self, AdminError> {
        settings.clone().with_token()
    }

    /// The certificate and key to serve HTTPS with; `None` for plain HTTP.
    pub fn tls(&self) -> Result<Option<TlsFiles>, AdminError> {
        TlsFiles::from_settings(self.tls_cert.as_deref(), self.tls_key.as_deref())
    }

    /// Checks the settings, naming the first bad field. `retryq config
    /// check` and [`bind`] both call it.
    pub fn validate(&self) -> Result<(), AdminError> {
        let bad =
            |key, value: String, reason| Err(AdminError::InvalidSetting { key, value, reason });
        if self.body_limit == 0 {
            return bad(
                "body_limit",
                self.body_limit.to_string(),
                "must be at least 1 byte",
            );
        }
        if self.max_list_limit == 0 {
            return bad(
                "max_list_limit",
                self.max_list_limit.to_string(),
                "must be at least 1",
            );
        }
        if self.workers == 0 {
            return bad("workers", self.workers.to_string(), "must be at least 1");
        }
        if self.token_env.trim().is_empty() {
            return bad("token_env", String::new(), "must not be empty");
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), None) => bad(
                "tls_cert",
                cert.display().to_string(),
                "tls_key is not set: give both or neither",
            ),
            (None, Some(key)) => bad(
                "tls_key",
                key.display().to_string(),
                "tls_cert is not set: give both or neither",
            ),
            _ => Ok(()),
        }
    }

    /// The loopback-or-token rule, on the token as read.
    fn check_listen(&self) -> Result<(), AdminError> {
        if self.token.is_none() && !self.listen.ip().is_loopback() {
            return Err(AdminError::InsecureListen { addr: self.listen });
        }
        Ok(())
    }

    fn settings(&self) -> ApiSettings {
        ApiSettings {
            token: self.token.clone(),
            metrics_require_token: self.metrics_require_token,
            body_limit: self.body_limit,
            max_list_limit: self.max_list_limit,
        }
    }
}

/// The API's routes and shared data, for `App::configure`. [`bind`] uses
/// it; tests use it with `actix_web::test::init_service`.
pub fn routes(
    config: &AdminConfig,
    state: &AdminState,
) -> impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static {
    let settings = web::Data::new(config.settings());
    let state = web::Data::new(state.clone());
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(settings.clone())
            .app_data(state.clone())
            .app_data(web::Data::new(handlers::AllowedMethods(
                openapi::allowed_methods,
            )))
            .configure(console::register)
            .service(web::resource("/v1/openapi.json").route(web::get().to(openapi::get_openapi)))
            .configure(handlers::register);
    }
}

/// A bound, not yet running admin server.
pub struct AdminServer {
    server: actix_web::dev::Server,
    addrs: Vec<SocketAddr>,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl AdminServer {
    /// The address actually bound (the real port when the config said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs.first().copied().unwrap_or(DEFAULT_LISTEN)
    }

    /// A handle to stop the server (`handle.stop(true).await` is graceful).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped through [`AdminServer::handle`].
    pub async fn run(self) -> Result<(), AdminError> {
        self.server.await.map_err(AdminError::Server)
    }
}

/// Validates `config` and binds the API to `config.listen`.
///
/// Must be called inside an actix system (the daemon's `actix_rt` runtime).
/// The server installs no signal handlers: the daemon stops it through
/// [`AdminServer::handle`].
pub fn bind(config: AdminConfig, state: AdminState) -> Result<AdminServer, AdminError> {
    config.validate()?;
    config.check_listen()?;
    let routes = routes(&config, &state);
    let server = HttpServer::new(move || App::new().configure(routes.clone()))
        .workers(config.workers)
        .disable_signals()
        .shutdown_timeout(config.shutdown_timeout.as_secs());
    let bind_error = |source| AdminError::Bind {
        addr: config.listen,
        source,
    };
    let tls = config.tls()?;
    let server = match &tls {
        Some(files) => server
            .bind_rustls_0_23(config.listen, files.server_config()?)
            .map_err(bind_error)?,
        None => server.bind(config.listen).map_err(bind_error)?,
    };
    let addrs = server.addrs();
    let server = server.run();
    tracing::info!(
        addr = %addrs.first().copied().unwrap_or(config.listen),
        token_required = config.token.is_some(),
        tls = tls.is_some(),
        metrics_require_token = config.metrics_require_token,
        "admin API listening"
    );
    Ok(AdminServer { server, addrs })
}

/// Binds and serves the API until the server is stopped (see [`bind`] for
/// a handle to stop it).
pub async fn serve(config: AdminConfig, state: AdminState) -> Result<(), AdminError> {
    bind(config, state)?.run().await
}
