//! TLS for the admin listener: loads `[admin] tls_cert` and `tls_key`
//! (PEM) into a rustls server configuration, with the `ring` provider that
//! the http plugin uses as well (no second crypto library).
//!
//! Loaded once, when the server binds: a certificate renewed on disk takes
//! effect at the next start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::AdminError;

/// The certificate chain and key files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

fn tls_error(path: &Path, reason: impl std::fmt::Display) -> AdminError {
    AdminError::Tls {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

impl TlsFiles {
    /// Both files or none: one without the other is an error naming it.
    pub fn from_settings(
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<TlsFiles>, AdminError> {
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.to_owned(),
                key: key.to_owned(),
            })),
            (Some(cert), None) => Err(tls_error(
                cert,
                "admin.tls_cert is set but admin.tls_key is not",
            )),
            (None, Some(key)) => Err(tls_error(
                key,
                "admin.tls_key is set but admin.tls_cert is not",
            )),
        }
    }

    /// Reads both files into a rustls server configuration (HTTP/1.1).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, AdminError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| tls_error(&self.cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| tls_error(&self.cert, e))?;
        if certs.is_empty() {
            return Err(tls_error(&self.cert, "no PEM certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| tls_error(&self.key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(&self.cert, e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            // A key that does not match the certificate is named by the key.
            .map_err(|e| tls_error(&self.key, e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_files_or_neither_and_errors_name_the_file() {
        let cert = Path::new("/nonexistent/cert.pem");
        let key = Path::new("/nonexistent/key.pem");
        assert_eq!(TlsFiles::from_settings(None, None).expect("none"), None);
        let err = TlsFiles::from_settings(Some(cert), None).expect_err("cert alone");
        assert!(err.to_string().contains("tls_key is not"), "{err}");
        let err = TlsFiles::from_settings(None, Some(key)).expect_err("key alone");
        assert!(err.to_string().contains("tls_cert is not"), "{err}");
        let files = TlsFiles::from_settings(Some(cert), Some(key))
            .expect("both")
            .expect("some");
        let err = files.server_config().expect_err("missing files");
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");

        // A file that holds no certificate is refused by name too.
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let files = TlsFiles {
            cert: empty.clone(),
            key: empty,
        };
        let err = files.server_config().expect_err("no certificate");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
