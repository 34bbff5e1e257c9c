//! [`HttpChecker`]: asks the upstream which fingerprints it already has.

use std::collections::HashSet;

use reqwest::header::CONTENT_TYPE;
use reqwest::StatusCode;
use retryq_plugin::{CallContext, CheckError, CheckResult, FingerprintChecker};
use serde::Serialize;

use crate::settings::SettingsError;
use crate::transport::{describe_status, error_chain, Transport};

/// Largest check response read, so a misbehaving upstream cannot exhaust
/// memory.
const MAX_CHECK_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// The HTTP fingerprint checker (always `POST`, never gzipped).
#[derive(Debug, Clone)]
pub struct HttpChecker {
    transport: Transport,
}

#[derive(Serialize)]
struct CheckRequest<'a> {
    fingerprints: &'a [String],
}

impl HttpChecker {
    /// Builds a checker from the plugin's settings JSON (the same settings
    /// as [`crate::HttpPusher::from_settings`]).
    pub fn from_settings(settings: &serde_json::Value) -> Result<HttpChecker, SettingsError> {
        Ok(HttpChecker {
            transport: Transport::from_settings(settings)?,
        })
    }
}

impl FingerprintChecker for HttpChecker {
    fn check(&self, fingerprints: &[String], ctx: &CallContext) -> Result<CheckResult, CheckError> {
        if fingerprints.is_empty() {
            return Ok(CheckResult::default());
        }
        let timeout = self.transport.call_timeout(ctx).ok_or_else(|| {
            CheckError::Unavailable("deadline passed before the check started".to_owned())
        })?;
        let body = serde_json::to_vec(&CheckRequest { fingerprints })
            .map_err(|e| CheckError::Unavailable(format!("cannot encode the check: {e}")))?;
        let request = self
            .transport
            .client
            .post(self.transport.check_url.clone())
            .timeout(timeout)
            .header(CONTENT_TYPE, "application/json");
        let response = self
            .transport
            .decorate(request)
            .body(body)
            .send()
            .map_err(|e| {
                CheckError::Unavailable(if e.is_timeout() {
                    format!("no answer within {timeout:?}: {}", error_chain(&e))
                } else {
                    format!("request failed: {}", error_chain(&e))
                })
            })?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(CheckError::Unauthorized(format!(
                "upstream refused the credentials: {}",
                describe_status(response)
            )));
        }
        if !status.is_success() {
            return Err(CheckError::Unavailable(format!(
                "upstream answered {}",
                describe_status(response)
            )));
        }
        let mut raw = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(response, MAX_CHECK_RESPONSE_BYTES),
            &mut raw,
        )
        .map_err(|e| CheckError::Unavailable(format!("cannot read the check response: {e}")))?;
        let answer: CheckResult = serde_json::from_slice(&raw).map_err(|e| {
            CheckError::Unavailable(format!(
                "malformed check response (expected {{\"existing\": [...], \"missing\": [...]}}): {e}"
            ))
        })?;
        let result = normalize(fingerprints, &answer);
        tracing::debug!(
            asked = fingerprints.len(),
            existing = result.existing.len(),
            "http fingerprint check answered"
        );
        Ok(result)
    }
}

/// Only fingerprints that were asked about and that the upstream says it
/// has count as existing; every other asked fingerprint is missing, so an
/// incomplete answer leads to an upload, never to a skipped item.
fn normalize(asked: &[String], answer: &CheckResult) -> CheckResult {
    let existing: HashSet<&str> = answer.existing.iter().map(String::as_str).collect();
    let mut result = CheckResult::default();
    let mut seen = HashSet::new();
    for fingerprint in asked {
        if !seen.insert(fingerprint.as_str()) {
            continue;
        }
        if existing.contains(fingerprint.as_str()) {
            result.existing.push(fingerprint.clone());
        } else {
            result.missing.push(fingerprint.clone());
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn unlisted_and_unknown_fingerprints_are_handled_safely() {
        let answer = CheckResult {
            existing: strings(&["a", "zzz"]),
            missing: strings(&[]),
        };
        let result = normalize(&strings(&["a", "b", "a"]), &answer);
        assert_eq!(result.existing, strings(&["a"]));
        assert_eq!(result.missing, strings(&["b"]));
    }
}
