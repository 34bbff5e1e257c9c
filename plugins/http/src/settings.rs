//! Settings of the HTTP transport: parsing, defaults and validation.
//!
//! Owns everything that can be wrong with a configuration, so a bad setting
//! is refused at construction with an error naming the key, never at the
//! first push.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Default path of pushes (OpenCTEM agent ingest).
pub const DEFAULT_PUSH_PATH: &str = "/api/v1/agent/ingest";
/// Default path of fingerprint checks (OpenCTEM agent ingest check).
pub const DEFAULT_CHECK_PATH: &str = "/api/v1/agent/ingest/check";
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default whole-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers the transport sets itself (or that carry secrets) and therefore
/// refuses in the `headers` setting. Lower case.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "idempotency-key",
    "content-type",
    "content-encoding",
    "content-length",
    "host",
];

/// Why the settings were refused. The message always names the key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The settings are not an object of known keys with the right types
    /// (missing `base_url`, unknown key, wrong type...). serde's message
    /// names the key.
    #[error("http plugin settings: {0}")]
    Malformed(String),
    /// A key has a value of the right type that is still wrong.
    #[error("http plugin setting `{key}`: {reason}")]
    Invalid {
        /// The offending key.
        key: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A file named by a setting (`token_file`, `ca_file`) cannot be read.
    #[error("http plugin setting `{key}`: cannot read {path}: {source}")]
    File {
        /// The offending key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// The HTTP client could not be built from otherwise valid settings.
    #[error("http plugin: cannot build the HTTP client: {0}")]
    Client(String),
}

impl SettingsError {
    /// The settings key at fault, when one is known.
    pub fn key(&self) -> Option<&'static str> {
        match self {
            SettingsError::Invalid { key, .. } | SettingsError::File { key, .. } => Some(key),
            SettingsError::Malformed(_) | SettingsError::Client(_) => None,
        }
    }

    pub(crate) fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        SettingsError::Invalid {
            key,
            reason: reason.into(),
        }
    }
}

/// HTTP method of pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum PushMethod {
    /// `POST` (the default).
    #[default]
    #[serde(rename = "POST", alias = "post")]
    Post,
    /// `PUT`.
    #[serde(rename = "PUT", alias = "put")]
    Put,
}

/// The parsed settings (see the crate documentation for the reference).
/// Holds no secret: tokens are read from `token_env` / `token_file` later.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Upstream URL (`http` or `https`), optionally with a path prefix.
    pub base_url: String,
    /// Path of pushes, appended to `base_url`.
    #[serde(default = "default_push_path")]
    pub push_path: String,
    /// Path of fingerprint checks, appended to `base_url`.
    #[serde(default = "default_check_path")]
    pub check_path: String,
    /// Method of pushes.
    #[serde(default)]
    pub method: PushMethod,
    /// Extra headers on every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Gzip push bodies.
    #[serde(default)]
    pub gzip: bool,
    /// Connect timeout.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Whole-request timeout (capped per call by the host's deadline).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// PEM file of extra root certificates.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Environment variable holding the bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// File holding the bearer token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// `User-Agent` header.
    #[serde(default)]
    pub user_agent: Option<String>,
}

fn default_push_path() -> String {
    DEFAULT_PUSH_PATH.to_owned()
}

fn default_check_path() -> String {
    DEFAULT_CHECK_PATH.to_owned()
}

fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

impl HttpSettings {
    /// Parses and validates settings JSON. Files and environment variables
    /// are not read here (the transport reads them at construction).
    pub fn from_value(value: &serde_json::Value) -> Result<Self, SettingsError> {
        let object = value.as_object().ok_or_else(|| {
            SettingsError::Malformed(format!(
                "expected an object with at least `base_url`, got {}",
                json_kind(value)
            ))
        })?;
        // A token written in the config is refused with a pointer to the
        // supported sources rather than a bare "unknown field".
        for secret_key in ["token", "bearer_token", "auth_token", "api_key"] {
            if object.contains_key(secret_key) {
                return Err(SettingsError::Malformed(format!(
                    "`{secret_key}` is not accepted: never put a token in the config; \
                     name an environment variable with `token_env` or a file with `token_file`"
                )));
            }
        }
        let settings: HttpSettings = serde_json::from_value(value.clone())
            .map_err(|e| SettingsError::Malformed(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        self.base_url()?;
        check_path("push_path", &self.push_path)?;
        check_path("check_path", &self.check_path)?;
        for name in self.headers.keys() {
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                let reason = if name.eq_ignore_ascii_case("authorization")
                    || name.eq_ignore_ascii_case("proxy-authorization")
                {
                    format!(
                        "header `{name}` is refused: credentials come only from \
                         `token_env` or `token_file`"
                    )
                } else {
                    format!("header `{name}` is set by the transport and cannot be overridden")
                };
                return Err(SettingsError::invalid("headers", reason));
            }
        }
        if self.timeout.is_zero() {
            return Err(SettingsError::invalid(
                "timeout",
                "must be greater than zero",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(SettingsError::invalid(
                "connect_timeout",
                "must be greater than zero",
            ));
        }
        if self.token_env.is_some() && self.token_file.is_some() {
            return Err(SettingsError::invalid(
                "token_file",
                "set either `token_env` or `token_file`, not both",
            ));
        }
        if matches!(&self.token_env, Some(var) if var.trim().is_empty()) {
            return Err(SettingsError::invalid(
                "token_env",
                "must name an environment variable",
            ));
        }
        Ok(())
    }

    /// `base_url` parsed and checked, without a trailing `/`.
    pub(crate) fn base_url(&self) -> Result<String, SettingsError> {
        let url = reqwest::Url::parse(&self.base_url).map_err(|e| {
            SettingsError::invalid("base_url", format!("`{}` is not a URL: {e}", self.base_url))
        })?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(SettingsError::invalid(
                "base_url",
                format!("scheme must be http or https, got `{}`", url.scheme()),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(SettingsError::invalid("base_url", "has no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(SettingsError::invalid(
                "base_url",
                "must not have a query or fragment",
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(SettingsError::invalid(
                "base_url",
                "must not carry credentials: use `token_env` or `token_file`",
            ));
        }
        Ok(url.as_str().trim_end_matches('/').to_owned())
    }

    /// The full URL of `path` under `base_url`.
    pub(crate) fn endpoint(
        &self,
        key: &'static str,
        path: &str,
    ) -> Result<reqwest::Url, SettingsError> {
        let joined = format!("{}{}", self.base_url()?, path);
        reqwest::Url::parse(&joined)
            .map_err(|e| SettingsError::invalid(key, format!("`{joined}` is not a URL: {e}")))
    }
}

fn check_path(key: &'static str, path: &str) -> Result<(), SettingsError> {
    if !path.starts_with('/') {
        return Err(SettingsError::invalid(
            key,
            format!("`{path}` must start with `/`"),
        ));
    }
    if path.contains(['?', '#']) || path.chars().any(char::is_whitespace) {
        return Err(SettingsError::invalid(
            key,
            format!("`{path}` must be a plain path (no query, fragment or spaces)"),
        ));
    }
    Ok(())
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
