//! The admin API's bearer token: loading it once at startup, and checking a
//! request's `Authorization` header in constant time.

use std::future::{ready, Ready};
use std::path::Path;

use actix_web::{dev::Payload, http::header, web, FromRequest, HttpRequest};
use sha2::{Digest, Sha256};

use super::{AdminError, ApiError, ApiSettings};

/// The environment variable read for the token when no token file is set.
pub const DEFAULT_TOKEN_ENV: &str = "RETRYQ_ADMIN_TOKEN";

/// Shortest token accepted, so a placeholder like "x" is not mistaken for a
/// secret.
const MIN_TOKEN_LEN: usize = 16;

/// A bearer token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    /// A token from its text; `origin` names where it came from, for errors.
    /// Surrounding whitespace (a trailing newline in a file) is ignored.
    pub fn new(text: &str, origin: &str) -> Result<Self, AdminError> {
        let text = text.trim();
        let invalid = |reason: String| AdminError::InvalidToken {
            origin: origin.to_owned(),
            reason,
        };
        if text.is_empty() {
            return Err(invalid("it is empty".to_owned()));
        }
        if text.len() < MIN_TOKEN_LEN {
            return Err(invalid(format!(
                "it is {} characters long, at least {MIN_TOKEN_LEN} are required",
                text.len()
            )));
        }
        if let Some(bad) = text.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(invalid(format!(
                "it contains {bad:?}; only visible ASCII characters are allowed"
            )));
        }
        Ok(AdminToken {
            digest: Sha256::digest(text.as_bytes()).into(),
        })
    }

    /// Reads the token from a file (its whole content, trimmed).
    pub fn from_file(path: &Path) -> Result<Self, AdminError> {
        let text = std::fs::read_to_string(path).map_err(|source| AdminError::TokenFile {
            path: path.to_owned(),
            source,
        })?;
        warn_if_readable_by_others(path);
        Self::new(&text, &path.display().to_string())
    }

    /// Reads the token from environment variable `var`; `None` when it is
    /// unset.
    pub fn from_env(var: &str) -> Result<Option<Self>, AdminError> {
        match std::env::var(var) {
            Ok(text) => Self::new(&text, &format!("environment variable {var}")).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(AdminError::InvalidToken {
                origin: format!("environment variable {var}"),
                reason: "it is not valid UTF-8".to_owned(),
            }),
        }
    }

    /// The token as configured: from `file` when given, else from the
    /// environment variable `env_var` when set, else none.
    pub fn load(file: Option<&Path>, env_var: &str) -> Result<Option<Self>, AdminError> {
        match file {
            Some(path) => Self::from_file(path).map(Some),
            None => Self::from_env(env_var),
        }
    }

    /// The token's text as [`AdminToken::load`] finds it (file, else
    /// environment variable), validated the same way, for a client of the
    /// API: the CLI sends it to a running daemon configured alike.
    pub fn load_text(file: Option<&Path>, env_var: &str) -> Result<Option<String>, AdminError> {
        let (text, origin) = match file {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| AdminError::TokenFile {
                    path: path.to_owned(),
                    source,
                })?,
                path.display().to_string(),
            ),
            None => match std::env::var(env_var) {
                Ok(text) => (text, format!("environment variable {env_var}")),
                Err(std::env::VarError::NotPresent) => return Ok(None),
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(AdminError::InvalidToken {
                        origin: format!("environment variable {env_var}"),
                        reason: "it is not valid UTF-8".to_owned(),
                    })
                }
            },
        };
        Self::new(&text, &origin)?;
        Ok(Some(text.trim().to_owned()))
    }

    /// True when `candidate` is the token. Both sides are hashed first, so
    /// the comparison takes the same time whatever the candidate's length
    /// and content.
    pub fn matches(&self, candidate: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        let difference = self
            .digest
            .iter()
            .zip(digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        difference == 0
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the admin token file is readable by other users; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// Checks the request's bearer token against the configured one; `Ok` when
/// no token is configured.
pub(crate) fn check(req: &HttpRequest) -> Result<(), ApiError> {
    let Some(settings) = req.app_data::<web::Data<ApiSettings>>() else {
        return Err(ApiError::internal("admin API settings are missing"));
    };
    let Some(token) = settings.token.as_ref() else {
        return Ok(());
    };
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized("missing bearer token"));
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be \"Bearer <token>\"")
        })?;
    if token.matches(presented) {
        Ok(())
    } else {
        tracing::warn!(
            path = req.path(),
            peer = ?req.peer_addr(),
            "admin API request with a wrong bearer token refused"
        );
        Err(ApiError::unauthorized("wrong bearer token"))
    }
}

/// Extractor that passes only requests carrying the configured token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Authorized;

impl FromRequest for Authorized {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        ready(check(req).map(|()| Authorized))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matches_exactly() {
        let token = AdminToken::new("  s3cret-token-0123456789\n", "test").unwrap();
        assert!(token.matches("s3cret-token-0123456789"));
        assert!(!token.matches("s3cret-token-012345678"));
        assert!(!token.matches("s3cret-token-01234567890"));
        assert!(!token.matches(""));
        assert_eq!(format!("{token:?}"), "AdminToken(<redacted>)");
    }

    #[test]
    fn bad_tokens_are_refused_with_their_origin() {
        for (text, needle) in [
            ("", "empty"),
            ("short", "at least 16"),
            ("has a space in the middle", "visible ASCII"),
        ] {
            let err = AdminToken::new(text, "file /x").unwrap_err().to_string();
            assert!(err.contains("file /x") && err.contains(needle), "{err}");
        }
    }

    #[test]
    fn token_file_is_read_and_missing_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "file-token-abcdefghij\n").unwrap();
        let token = AdminToken::load(Some(&path), "RETRYQ_TEST_UNSET_VAR")
            .unwrap()
            .unwrap();
        assert!(token.matches("file-token-abcdefghij"));
        let missing = dir.path().join("nope");
        let err = AdminToken::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        assert!(AdminToken::load(None, "RETRYQ_TEST_SURELY_UNSET_VAR")
            .unwrap()
            .is_none());
        // The client side reads the same text, trimmed, and refuses the same.
        assert_eq!(
            AdminToken::load_text(Some(&path), "RETRYQ_TEST_UNSET_VAR").unwrap(),
            Some("file-token-abcdefghij".to_owned())
        );
        assert!(AdminToken::load_text(Some(&missing), "RETRYQ_TEST_UNSET_VAR").is_err());
        std::fs::write(&path, "short\n").unwrap();
        assert!(AdminToken::load_text(Some(&path), "RETRYQ_TEST_UNSET_VAR").is_err());
    }
}
