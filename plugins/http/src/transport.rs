//! The HTTP machinery shared by the pusher and the checker: the client, the
//! resolved endpoints, the secret bearer token, per-call timeouts, and the
//! helpers that turn responses into outcomes (Retry-After, body snippets,
//! transport errors).

use std::fmt;
use std::io::Read;
use std::time::{Duration, SystemTime};

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use retryq_plugin::CallContext;

use crate::settings::{HttpSettings, PushMethod, SettingsError};

/// How many bytes of an error body go into an outcome's message.
pub(crate) const BODY_SNIPPET_BYTES: usize = 200;

/// The `Authorization` header value. Its `Debug` never shows the token.
#[derive(Clone)]
pub(crate) struct BearerToken(HeaderValue);

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// A configured HTTP transport: everything a request needs.
#[derive(Clone)]
pub(crate) struct Transport {
    pub(crate) client: Client,
    pub(crate) push_url: reqwest::Url,
    pub(crate) check_url: reqwest::Url,
    pub(crate) method: reqwest::Method,
    pub(crate) gzip: bool,
    timeout: Duration,
    extra_headers: HeaderMap,
    token: Option<BearerToken>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hand-written so the token (and header values, which might be
        // sensitive) never reach a log.
        f.debug_struct("Transport")
            .field("push_url", &self.push_url.as_str())
            .field("check_url", &self.check_url.as_str())
            .field("method", &self.method)
            .field("gzip", &self.gzip)
            .field("timeout", &self.timeout)
            .field(
                "extra_headers",
                &self
                    .extra_headers
                    .keys()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("token", &self.token)
            .finish()
    }
}

impl Transport {
    /// Parses the settings, reads the token and CA file, builds the client.
    pub(crate) fn from_settings(value: &serde_json::Value) -> Result<Self, SettingsError> {
        let settings = HttpSettings::from_value(value)?;
        let push_url = settings.endpoint("push_path", &settings.push_path)?;
        let check_url = settings.endpoint("check_path", &settings.check_path)?;
        let extra_headers = header_map(&settings)?;
        let token = read_token(&settings)?;

        // reqwest is built without a bundled crypto provider; make `ring` the
        // process default unless the host already chose one.
        let _already_installed = rustls::crypto::ring::default_provider().install_default();

        let user_agent = settings
            .user_agent
            .clone()
            .unwrap_or_else(|| format!("retryq-http/{}", env!("CARGO_PKG_VERSION")));
        let mut builder = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .user_agent(user_agent);
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|source| SettingsError::File {
                key: "ca_file",
                path: path.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                SettingsError::invalid(
                    "ca_file",
                    format!("{} is not a PEM certificate bundle: {e}", path.display()),
                )
            })?;
            if certs.is_empty() {
                return Err(SettingsError::invalid(
                    "ca_file",
                    format!("{} holds no PEM certificate", path.display()),
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let client = build_client(builder)?;
        Ok(Transport {
            client,
            push_url,
            check_url,
            method: match settings.method {
                PushMethod::Post => reqwest::Method::POST,
                PushMethod::Put => reqwest::Method::PUT,
            },
            gzip: settings.gzip,
            timeout: settings.timeout,
            extra_headers,
            token,
        })
    }

    /// The timeout of one call: the configured timeout, cut to what is left
    /// of the host's deadline. `None` once the deadline has passed.
    pub(crate) fn call_timeout(&self, ctx: &CallContext) -> Option<Duration> {
        let remaining = ctx.remaining();
        if remaining.is_zero() {
            None
        } else {
            Some(self.timeout.min(remaining))
        }
    }

    /// Adds the configured headers and the bearer token to a request.
    pub(crate) fn decorate(&self, mut request: RequestBuilder) -> RequestBuilder {
        request = request.headers(self.extra_headers.clone());
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, token.0.clone());
        }
        request
    }
}

/// Builds the blocking client on a short-lived plain thread: reqwest panics
/// when a blocking client is built on an async runtime's thread, and hosts
/// may create transports there (the pushes themselves run on blocking
/// threads, as the `Pusher` contract says).
fn build_client(builder: reqwest::blocking::ClientBuilder) -> Result<Client, SettingsError> {
    std::thread::Builder::new()
        .name("retryq-http-client-init".to_owned())
        .spawn(move || builder.build())
        .map_err(|e| SettingsError::Client(format!("cannot start a thread: {e}")))?
        .join()
        .map_err(|_| SettingsError::Client("building the client panicked".to_owned()))?
        .map_err(|e| SettingsError::Client(error_chain(&e)))
}

fn header_map(settings: &HttpSettings) -> Result<HeaderMap, SettingsError> {
    let mut map = HeaderMap::new();
    for (name, value) in &settings.headers {
        let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            SettingsError::invalid("headers", format!("`{name}` is not a valid header name"))
        })?;
        let header_value = HeaderValue::from_str(value).map_err(|_| {
            SettingsError::invalid(
                "headers",
                format!("the value of header `{name}` is not a valid header value"),
            )
        })?;
        map.insert(header_name, header_value);
    }
    Ok(map)
}

fn read_token(settings: &HttpSettings) -> Result<Option<BearerToken>, SettingsError> {
    let (key, raw) = if let Some(var) = &settings.token_env {
        let raw = std::env::var(var).map_err(|e| {
            SettingsError::invalid(
                "token_env",
                format!("environment variable `{var}` cannot be read: {e}"),
            )
        })?;
        ("token_env", raw)
    } else if let Some(path) = &settings.token_file {
        let raw = std::fs::read_to_string(path).map_err(|source| SettingsError::File {
            key: "token_file",
            path: path.clone(),
            source,
        })?;
        ("token_file", raw)
    } else {
        return Ok(None);
    };
    let token = raw.trim_end();
    if token.is_empty() {
        return Err(SettingsError::invalid(key, "the token is empty"));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        // The message must not echo the token.
        SettingsError::invalid(key, "the token contains characters not allowed in a header")
    })?;
    value.set_sensitive(true);
    Ok(Some(BearerToken(value)))
}

/// The response's Retry-After as a delay from now: delta-seconds or an HTTP
/// date (a date in the past means "now"). `None` when absent or unreadable.
pub(crate) fn retry_after(response: &Response) -> Option<Duration> {
    let raw = response.headers().get(RETRY_AFTER)?.to_str().ok()?.trim();
    parse_retry_after(raw, SystemTime::now())
}

/// Parses a Retry-After value relative to `now`.
pub(crate) fn parse_retry_after(raw: &str, now: SystemTime) -> Option<Duration> {
    if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long values saturate instead of failing.
        return Some(Duration::from_secs(raw.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(raw).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The first [`BODY_SNIPPET_BYTES`] of the body as printable text (empty if
/// the body cannot be read).
pub(crate) fn body_snippet(response: Response) -> String {
    let mut buf = Vec::with_capacity(BODY_SNIPPET_BYTES);
    // Read one byte more to know whether the body was cut.
    let limit = (BODY_SNIPPET_BYTES + 1) as u64;
    if response.take(limit).read_to_end(&mut buf).is_err() && buf.is_empty() {
        return String::new();
    }
    let truncated = buf.len() > BODY_SNIPPET_BYTES;
    buf.truncate(BODY_SNIPPET_BYTES);
    let mut text: String = String::from_utf8_lossy(&buf)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed_len = text.trim_end().len();
    text.truncate(trimmed_len);
    if truncated {
        text.push('…');
    }
    text
}

/// `status` plus the body snippet, e.g. `422 Unprocessable Entity: {"error":...}`.
pub(crate) fn describe_status(response: Response) -> String {
    let status = response.status();
    let snippet = body_snippet(response);
    if snippet.is_empty() {
        format!("{status}")
    } else {
        format!("{status}: {snippet}")
    }
}

/// An error with its causes, e.g. `error sending request: connection refused`.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds() {
        let now = SystemTime::now();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_as_http_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date in the past means "retry now".
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_garbage_is_ignored() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn token_debug_is_redacted() {
        let token = BearerToken(HeaderValue::from_static("Bearer s3cr3t"));
        assert!(!format!("{token:?}").contains("s3cr3t"));
    }
}
