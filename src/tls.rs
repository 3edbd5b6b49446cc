//! TLS for STARTTLS, through rustls only (ring provider; TLS 1.2 and 1.3).
//!
//! Certificates and keys are PEM files read with `rustls::pki_types::pem::PemObject`.
//! Loading happens at start and at reload; a listener whose certificate does not load
//! refuses to start (check-config reports it with the key path).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// `tls:` of a listener.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Refuse mail transactions before STARTTLS (530 5.7.0).
    #[serde(default)]
    pub required: bool,
}

/// Why a certificate or key did not load.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is unreadable or holds no certificate.
    #[error("certificate {path}: {reason}")]
    Certificate {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The key file is unreadable or holds no private key.
    #[error("private key {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the pair (for example a key that does not match).
    #[error("certificate and key: {0}")]
    Config(#[from] rustls::Error),
}

/// A rustls server configuration from the listener's `tls:` settings.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| TlsError::Key {
        path: tls.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Certificate {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// A one-line description of a session's TLS for `Received:` and logs.
pub fn describe(conn: &rustls::ServerConnection) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(other) => format!("0x{:04x}", u16::from(other)),
        None => "unknown".to_owned(),
    };
    // The IANA name (`TLS13_AES_256_GCM_SHA384`), or the number of one rustls cannot name.
    let suite = conn.negotiated_cipher_suite().map_or_else(
        || "unknown".to_owned(),
        |s| {
            let suite = s.suite();
            suite
                .as_str()
                .map_or_else(|| format!("0x{:04x}", u16::from(suite)), str::to_owned)
        },
    );
    format!("version={version} cipher={suite}")
}
