//! `retryq-http`: the reference retryq transport, an HTTP [`Pusher`] and
//! [`FingerprintChecker`], OpenCTEM-compatible by default.
//!
//! * [`HttpPusher`] sends each item's payload (compact JSON) to
//!   `{base_url}{push_path}` (default `POST {base_url}/api/v1/agent/ingest`).
//! * [`HttpChecker`] POSTs `{"fingerprints": [...]}` to
//!   `{base_url}{check_path}` (default `/api/v1/agent/ingest/check`) and reads
//!   `{"existing": [...], "missing": [...]}`.
//!
//! Both are built from the same settings object with
//! [`HttpPusher::from_settings`] / [`HttpChecker::from_settings`].
//!
//! # Settings reference
//!
//! Settings are a JSON object (the plugin's `settings` table in the retryq
//! config). Unknown keys are refused, and every error names the bad key.
//!
//! | key               | type              | default                         | meaning |
//! |-------------------|-------------------|---------------------------------|---------|
//! | `base_url`        | string (required) | —                               | `http://` or `https://` URL of the upstream, optionally with a path prefix; no query or fragment |
//! | `push_path`       | string            | `"/api/v1/agent/ingest"`        | path appended to `base_url` for pushes; must start with `/` |
//! | `check_path`      | string            | `"/api/v1/agent/ingest/check"`  | path appended to `base_url` for fingerprint checks; must start with `/` |
//! | `method`          | `"POST"`/`"PUT"`  | `"POST"`                        | HTTP method of pushes (checks always POST) |
//! | `headers`         | map string→string | `{}`                            | extra headers on every request; `Authorization`, `Proxy-Authorization`, `Idempotency-Key`, `Content-Type`, `Content-Encoding`, `Content-Length` and `Host` are refused |
//! | `gzip`            | bool              | `false`                         | gzip push bodies and send `Content-Encoding: gzip` |
//! | `connect_timeout` | duration          | `"10s"`                         | TCP + TLS connect timeout |
//! | `timeout`         | duration          | `"30s"`                         | whole-request timeout; each call uses `min(timeout, time left before the host's deadline)` |
//! | `ca_file`         | path              | none                            | PEM file of extra root certificates (added to the platform's roots) |
//! | `token_env`       | string            | none                            | name of an environment variable holding a bearer token |
//! | `token_file`      | path              | none                            | file holding a bearer token (trailing whitespace trimmed) |
//! | `user_agent`      | string            | `"retryq-http/<version>"`       | `User-Agent` header |
//!
//! Durations are human-readable (`"500ms"`, `"10s"`, `"2m"`).
//!
//! ## Authentication
//!
//! A bearer token (`Authorization: Bearer <token>`) is read **once, at
//! construction**, from `token_env` or `token_file` (not both). It can never
//! be written in the settings themselves (a `token` key is refused with a
//! pointer to these two keys), it is marked sensitive in the HTTP stack, and
//! it is never logged: the `Debug` output of every type here redacts it.
//!
//! # What a push sends
//!
//! * the payload bytes as the body, `Content-Type: application/json`
//!   (gzip-compressed with `Content-Encoding: gzip` when `gzip = true`);
//! * `Idempotency-Key: <item id>`, so the upstream can drop the duplicates
//!   that at-least-once delivery can produce;
//! * `X-Retryq-Type: <item type>`, `X-Retryq-Fingerprint: <fingerprint>` and
//!   `X-Retryq-Attempt: <attempt number, starting at 1>`;
//! * the configured `headers`, the bearer token and `User-Agent`.
//!
//! Item attributes are not sent (they may be large or sensitive); they are
//! part of the payload if the producer wants the upstream to see them.
//!
//! # Outcome mapping
//!
//! | answer                                 | outcome |
//! |----------------------------------------|---------|
//! | 2xx                                    | `Delivered` |
//! | 408, 425, 429, 5xx                     | `Retryable`, with `Retry-After` (delta-seconds or HTTP date) as `retry_after` |
//! | 401, 403                               | `Unauthorized` |
//! | other 4xx                              | `Permanent`, with the status and the first 200 bytes of the body |
//! | 3xx                                    | `Permanent`: redirects are never followed (fix `base_url`) |
//! | connection error, timeout, deadline    | `Retryable` |
//!
//! The checker maps 401/403 to [`CheckError::Unauthorized`] and every other
//! failure (transport error, non-2xx status, malformed JSON) to
//! [`CheckError::Unavailable`]. A fingerprint the upstream does not list as
//! existing is reported missing, so it is uploaded rather than skipped.
//!
//! # TLS
//!
//! rustls with the `ring` crypto provider, verified against the platform's
//! roots plus `ca_file`. If the process has no default rustls provider yet,
//! constructing a client installs `ring` as the default.
//!
//! # Threads
//!
//! The client is reqwest's blocking client. Constructing and dropping a
//! pusher or checker is safe on any thread, including an async runtime's;
//! `push` and `check` block and must run on blocking threads (as the
//! [`Pusher`] contract says). One instance serves all threads.

#![deny(missing_docs)]
// `deny` rather than `forbid`: the SDK's export macro expands to the ABI's
// `unsafe` glue in this crate and must be able to `#[allow]` it there.
#![deny(unsafe_code)]

mod checker;
mod pusher;
mod settings;
mod transport;

pub use checker::HttpChecker;
pub use pusher::HttpPusher;
pub use settings::{HttpSettings, PushMethod, SettingsError};

pub use retryq_plugin::{
    CallContext, CheckError, CheckResult, FingerprintChecker, ItemMeta, PushOutcome, Pusher,
};

// ---------------------------------------------------------------------------
// The dynamic-plugin entry point (retryq plugin ABI v1).
retryq_plugin::export_plugin! {
    name: "http",
    pusher: |settings: &serde_json::Value| {
        crate::HttpPusher::from_settings(settings).map_err(|e| e.to_string())
    },
    checker: |settings: &serde_json::Value| {
        crate::HttpChecker::from_settings(settings).map_err(|e| e.to_string())
    },
}
// ---------------------------------------------------------------------------
