//! `[store] backend = "postgres"` settings: [`PostgresOptions`], its one
//! `validate()`, and what turns it into a connection config (password
//! from a file or the environment, TLS through rustls honouring `sslmode`).
//!
//! Secrets never come from the config file: a `url` holding a password is
//! refused, and no error built here quotes the url or the password.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postgres::config::{Host, SslMode as PgSslMode};
use serde::{Deserialize, Serialize};

/// Longest schema name PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_IDENTIFIER_LEN: usize = 63;

/// How the connection uses TLS; libpq's `sslmode` names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, plain otherwise; no certificate check.
    Prefer,
    /// TLS always; the certificate is not checked (libpq's meaning).
    Require,
    /// TLS with the certificate chain checked against the trusted roots.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Settings of a [`super::PostgresRetryQueue`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresOptions {
    /// `postgres://user@host:port/dbname` (or libpq's `key=value` form),
    /// without a password.
    pub url: String,
    /// A file whose content (trailing newline removed) is the password.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// The schema holding retryq's tables; created when missing.
    pub schema: String,
    /// Connections kept for queue operations (the listener has its own).
    pub pool_size: u32,
    /// TLS mode; the url's `sslmode` (or libpq's default, `prefer`) when unset.
    pub sslmode: Option<SslMode>,
    /// PEM file of the roots trusted by `verify-ca` / `verify-full`; the
    /// system's roots when unset.
    pub sslrootcert: Option<PathBuf>,
    /// How long a connection attempt, or a wait for a free pooled
    /// connection, may take before the call fails.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            url: String::new(),
            password_file: None,
            password_env: None,
            schema: "retryq".to_owned(),
            pool_size: 8,
            sslmode: None,
            sslrootcert: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A setting that cannot work, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("postgres `{field}`: {reason}")]
pub struct PostgresOptionsError {
    /// The field of [`PostgresOptions`] at fault.
    pub field: &'static str,
    /// What is wrong with it (never the secret itself).
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> PostgresOptionsError {
    PostgresOptionsError {
        field,
        reason: reason.into(),
    }
}

/// Checks a schema name: a plain SQL identifier (letters, digits and `_`,
/// not starting with a digit, at most 63 bytes, not `pg_`-prefixed). It is
/// quoted wherever it is used anyway; the rule keeps it unambiguous.
pub fn validate_schema_name(schema: &str) -> Result<(), PostgresOptionsError> {
    let field = "schema";
    if schema.is_empty() {
        return Err(bad(field, "is empty"));
    }
    if schema.len() > MAX_IDENTIFIER_LEN {
        return Err(bad(
            field,
            format!(
                "{schema:?} is {} bytes long, the limit is {MAX_IDENTIFIER_LEN}",
                schema.len()
            ),
        ));
    }
    let first = schema.chars().next().unwrap_or('0');
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err(bad(
            field,
            format!("{schema:?} is not a valid identifier: it must start with a letter or '_'"),
        ));
    }
    if let Some(c) = schema
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Err(bad(
            field,
            format!(
                "{schema:?} is not a valid identifier: {c:?} is not allowed (letters, digits and '_')"
            ),
        ));
    }
    if schema.to_ascii_lowercase().starts_with("pg_") {
        return Err(bad(
            field,
            format!("{schema:?} is reserved: names starting with pg_ belong to PostgreSQL"),
        ));
    }
    Ok(())
}

/// `"name"`: an identifier quoted for SQL (validated names hold no quote,
/// doubling covers any other caller).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PostgresOptions {
    /// Checks every field; the first fault found, naming its field.
    pub fn validate(&self) -> Result<(), PostgresOptionsError> {
        self.parse_url()?;
        validate_schema_name(&self.schema)?;
        if self.pool_size == 0 || self.pool_size > 1000 {
            return Err(bad(
                "pool_size",
                format!("{} is out of range (1 to 1000)", self.pool_size),
            ));
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(bad(
                "password_env",
                "set password_file or password_env, not both",
            ));
        }
        if let Some(var) = &self.password_env {
            if var.is_empty() {
                return Err(bad("password_env", "is empty (name a variable)"));
            }
        }
        if self.connect_timeout.is_zero() {
            return Err(bad("connect_timeout", "must be longer than zero"));
        }
        if self.sslrootcert.is_some()
            && !matches!(
                self.effective_sslmode()?,
                SslMode::VerifyCa | SslMode::VerifyFull
            )
        {
            return Err(bad(
                "sslrootcert",
                "is used only with sslmode verify-ca or verify-full",
            ));
        }
        Ok(())
    }

    /// The url parsed, refused when it holds a password or names no host.
    fn parse_url(&self) -> Result<postgres::Config, PostgresOptionsError> {
        let field = "url";
        if self.url.trim().is_empty() {
            return Err(bad(
                field,
                "is empty (e.g. postgres://retryq@db.example:5432/retryq)",
            ));
        }
        // The parser's message may quote the input; say only what failed.
        let config: postgres::Config = self.url.parse().map_err(|_| {
            bad(
                field,
                "is not a valid PostgreSQL connection url (postgres://user@host:port/dbname)",
            )
        })?;
        if config.get_password().is_some() {
            return Err(bad(
                field,
                "holds a password; give it with password_file or password_env, never in the config",
            ));
        }
        if config.get_hosts().is_empty() {
            return Err(bad(field, "names no host"));
        }
        if config.get_user().is_none() {
            return Err(bad(field, "names no user (postgres://USER@host/dbname)"));
        }
        Ok(config)
    }

    /// The TLS mode in force: the option, else the url's.
    pub fn effective_sslmode(&self) -> Result<SslMode, PostgresOptionsError> {
        if let Some(mode) = self.sslmode {
            return Ok(mode);
        }
        let config = self.parse_url()?;
        Ok(match config.get_ssl_mode() {
            PgSslMode::Disable => SslMode::Disable,
            PgSslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        })
    }

    /// Where the server is, for messages: `host:port[, host:port...]`.
    pub fn endpoint(&self) -> String {
        match self.parse_url() {
            Ok(config) => endpoint_of(&config),
            Err(_) => "an unparsable url".to_owned(),
        }
    }

    /// The password from `password_file` or `password_env`, if either is set.
    fn password(&self) -> Result<Option<String>, PostgresOptionsError> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                bad(
                    "password_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let password = text.trim_end_matches(['\n', '\r']).to_owned();
            if password.is_empty() {
                return Err(bad("password_file", format!("{} is empty", path.display())));
            }
            return Ok(Some(password));
        }
        if let Some(var) = &self.password_env {
            return match std::env::var(var) {
                Ok(password) if !password.is_empty() => Ok(Some(password)),
                Ok(_) => Err(bad("password_env", format!("${var} is empty"))),
                Err(_) => Err(bad("password_env", format!("${var} is not set"))),
            };
        }
        Ok(None)
    }

    /// A validated connection config with the password and TLS settings
    /// applied, and the TLS connector to use with it.
    pub(crate) fn connect_config(
        &self,
    ) -> Result<(postgres::Config, tokio_postgres_rustls::MakeRustlsConnect), PostgresOptionsError>
    {
        self.validate()?;
        let mut config = self.parse_url()?;
        if let Some(password) = self.password()? {
            config.password(password);
        }
        let mode = self.effective_sslmode()?;
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
        config.connect_timeout(self.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("retryq");
        }
        let tls = tls_connector(mode, self.sslrootcert.as_deref())?;
        Ok((config, tls))
    }
}

/// `host:port` of every host the config names.
pub(crate) fn endpoint_of(config: &postgres::Config) -> String {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rustls connector for `mode` (unused by the driver under `disable`).
fn tls_connector(
    mode: SslMode,
    rootcert: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PostgresOptionsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("sslmode", format!("TLS setup failed: {e}")))?;
    let config = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(tls::AcceptAnyCert(provider)))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(tls::roots(rootcert)?);
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .build()
            .map_err(|e| bad("sslrootcert", format!("no usable root certificate: {e}")))?;
            let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> =
                if mode == SslMode::VerifyCa {
                    Arc::new(tls::ChainOnly(webpki))
                } else {
                    webpki
                };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The certificate checks behind `require` and `verify-ca`, which rustls
/// leaves to the caller: libpq's modes are weaker than the web's default.
mod tls {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
    use rustls_pki_types::pem::PemObject;

    use super::{bad, PostgresOptionsError};

    /// The trusted roots: the PEM file given, else the system's.
    pub(super) fn roots(
        rootcert: Option<&std::path::Path>,
    ) -> Result<RootCertStore, PostgresOptionsError> {
        let mut store = RootCertStore::empty();
        match rootcert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                    bad(
                        "sslrootcert",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                for cert in certs {
                    let cert = cert.map_err(|e| {
                        bad("sslrootcert", format!("{} is not PEM: {e}", path.display()))
                    })?;
                    store
                        .add(cert)
                        .map_err(|e| bad("sslrootcert", format!("{}: {e}", path.display())))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(bad(
                        "sslrootcert",
                        "unset, and the system has no root certificate to trust",
                    ));
                }
            }
        }
        Ok(store)
    }

    /// `sslmode=require`/`prefer`: encrypt, and check only the handshake's
    /// signatures, as libpq does without a root certificate.
    #[derive(Debug)]
    pub(super) struct AcceptAnyCert(pub(super) Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyCert {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `sslmode=verify-ca`: the chain must reach a trusted root; the name
    /// on the certificate is not checked.
    #[derive(Debug)]
    pub(super) struct ChainOnly(pub(super) Arc<WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self
                .0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
