//! [`StoreError`]: why a store's settings did not load (at start or at reload). A leaf:
//! every kind of store (LMTP, SMTP relay, pipe) and the TLS client setup report through it.

use std::io;
use std::path::PathBuf;

/// Why a store's settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configuration is inconsistent.
    #[error("store {store}: {reason}")]
    Invalid {
        /// The store.
        store: String,
        /// What is wrong.
        reason: String,
    },
    /// The password file could not be read.
    #[error("store {store}: password file {path}: {error}")]
    PasswordFile {
        /// The store.
        store: String,
        /// The file.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The CA file could not be read or holds no certificate.
    #[error("store {store}: CA file {path}: {reason}")]
    CaFile {
        /// The store.
        store: String,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the client configuration.
    #[error("store {store}: TLS: {error}")]
    Tls {
        /// The store.
        store: String,
        /// The error.
        error: rustls::Error,
    },
}
