//! [`HttpPusher`]: delivers one item per HTTP request and maps the answer to
//! a [`PushOutcome`] (see the crate documentation for the mapping).

use std::io::{Read, Write};

use reqwest::header::{HeaderValue, CONTENT_ENCODING, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;
use retryq_plugin::{CallContext, ItemMeta, PushOutcome, Pusher};

use crate::settings::SettingsError;
use crate::transport::{describe_status, error_chain, retry_after, Transport};

/// The HTTP pusher. Cheap to share: one instance serves every worker thread
/// (the client pools connections).
#[derive(Debug, Clone)]
pub struct HttpPusher {
    transport: Transport,
}

impl HttpPusher {
    /// Builds a pusher from the plugin's settings JSON (see the crate
    /// documentation), reading the token and CA file now.
    pub fn from_settings(settings: &serde_json::Value) -> Result<HttpPusher, SettingsError> {
        Ok(HttpPusher {
            transport: Transport::from_settings(settings)?,
        })
    }

    fn build_body(&self, payload: &[u8]) -> Result<Vec<u8>, std::io::Error> {
        if !self.transport.gzip {
            return Ok(payload.to_vec());
        }
        let mut encoder = flate2::write::GzEncoder::new(
            Vec::with_capacity(payload.len() / 4 + 64),
            flate2::Compression::default(),
        );
        encoder.write_all(payload)?;
        encoder.finish()
    }
}

impl Pusher for HttpPusher {
    fn push(&self, item: &ItemMeta, payload: &[u8], ctx: &CallContext) -> PushOutcome {
        let outcome = self.push_inner(item, payload, ctx);
        match &outcome {
            PushOutcome::Delivered => {
                tracing::debug!(item_id = %item.id, "http push delivered");
            }
            other => {
                tracing::debug!(item_id = %item.id, outcome = other.kind(), "http push not delivered");
            }
        }
        outcome
    }
}

impl HttpPusher {
    fn push_inner(&self, item: &ItemMeta, payload: &[u8], ctx: &CallContext) -> PushOutcome {
        let Some(timeout) = self.transport.call_timeout(ctx) else {
            return PushOutcome::retryable("deadline passed before the push started");
        };
        let Ok(idempotency_key) = HeaderValue::from_str(&item.id) else {
            return PushOutcome::permanent(
                "the item id cannot be sent as an Idempotency-Key header value",
            );
        };
        let body = match self.build_body(payload) {
            Ok(body) => body,
            Err(e) => return PushOutcome::retryable(format!("cannot gzip the payload: {e}")),
        };
        let mut request = self
            .transport
            .client
            .request(
                self.transport.method.clone(),
                self.transport.push_url.clone(),
            )
            .timeout(timeout)
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", idempotency_key)
            .header("X-Retryq-Attempt", item.attempts.saturating_add(1));
        // Informational headers: skipped, not fatal, if a value cannot be sent.
        if let Ok(value) = HeaderValue::from_str(&item.item_type) {
            request = request.header("X-Retryq-Type", value);
        }
        if let Ok(value) = HeaderValue::from_str(&item.fingerprint) {
            request = request.header("X-Retryq-Fingerprint", value);
        }
        if self.transport.gzip {
            request = request.header(CONTENT_ENCODING, "gzip");
        }
        let request = self.transport.decorate(request).body(body);

        let response = match request.send() {
            Ok(response) => response,
            Err(e) => return transport_failure(&e, timeout),
        };
        classify(response)
    }
}

/// A request that got no HTTP answer: always worth retrying.
fn transport_failure(error: &reqwest::Error, timeout: std::time::Duration) -> PushOutcome {
    let message = if error.is_timeout() {
        format!("no answer within {timeout:?}: {}", error_chain(error))
    } else if error.is_connect() {
        format!("cannot connect: {}", error_chain(error))
    } else {
        format!("request failed: {}", error_chain(error))
    };
    PushOutcome::retryable(message)
}

/// Maps an HTTP answer to an outcome.
fn classify(response: reqwest::blocking::Response) -> PushOutcome {
    let status = response.status();
    if status.is_success() {
        drain(response);
        return PushOutcome::Delivered;
    }
    if status.is_redirection() {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(no Location)")
            .to_owned();
        return PushOutcome::permanent(format!(
            "upstream answered {status} redirecting to {location}; redirects are not \
             followed: point `base_url`/`push_path` at the final address"
        ));
    }
    if is_retryable_status(status) {
        let retry_after = retry_after(&response);
        return PushOutcome::Retryable {
            message: format!("upstream answered {}", describe_status(response)),
            retry_after,
        };
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return PushOutcome::unauthorized(format!(
            "upstream refused the credentials: {}",
            describe_status(response)
        ));
    }
    if status.is_client_error() {
        return PushOutcome::permanent(format!(
            "upstream refused the item: {}",
            describe_status(response)
        ));
    }
    // 1xx reaching us, or a non-standard code: nothing says the item is bad.
    PushOutcome::retryable(format!(
        "unexpected answer from upstream: {}",
        describe_status(response)
    ))
}

/// The most of a 2xx body read only to keep its connection.
const DRAIN_LIMIT: u64 = 256 * 1024;

/// Reads the rest of a body nobody needs: a connection goes back to the
/// client's pool (keep-alive) only once its answer was read to the end;
/// otherwise every push would open a new one. A body larger than
/// [`DRAIN_LIMIT`] costs its connection instead of the time to read it.
fn drain(response: reqwest::blocking::Response) {
    let _ = std::io::copy(&mut response.take(DRAIN_LIMIT), &mut std::io::sink());
}

fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 425 | 429) || status.is_server_error()
}
