//! TLS to the broker (`mqtts://`): a rustls client with the ring provider that trusts exactly
//! the CA certificates of the site's `ca_file`.
//!
//! No system or built-in roots: a shelter box talks to one HQ whose CA is installed with its
//! config, and an `mqtts://` address without a CA file is a configuration error, never a
//! connection that silently trusts nothing (or everything).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read.
    #[error("ca_file = {:?}: cannot read it: {source}", path.display().to_string())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The CA file holds no PEM certificate.
    #[error(
        "ca_file = {:?}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)",
        path.display().to_string()
    )]
    Empty { path: PathBuf },
    /// A certificate in the CA file is malformed or cannot be a trust anchor.
    #[error("ca_file = {:?}: {reason}", path.display().to_string())]
    Invalid { path: PathBuf, reason: String },
}

/// A client configuration trusting the certificates in `ca_file` (PEM, one or more).
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    trusting(roots_from(ca_file)?).map_err(|reason| TlsError::Invalid {
        path: ca_file.to_owned(),
        reason,
    })
}

/// The CA certificates in `ca_file` (PEM, one or more); at least one.
pub fn roots_from(ca_file: &Path) -> Result<RootCertStore, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        path: ca_file.to_owned(),
        reason,
    };
    let pem = std::fs::read(ca_file).map_err(|source| TlsError::Read {
        path: ca_file.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| invalid(format!("not valid PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| invalid(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Empty {
            path: ca_file.to_owned(),
        });
    }
    Ok(roots)
}

/// A client configuration (rustls with ring, TLS 1.2 and 1.3) trusting exactly `roots`.
pub fn trusting(roots: RootCertStore) -> Result<Arc<ClientConfig>, String> {
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("no usable TLS version: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_empty_or_garbled_ca_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        let err = client_config(&missing).unwrap_err().to_string();
        assert!(
            err.starts_with("ca_file = ") && err.contains("cannot read"),
            "{err}"
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let err = client_config(&empty).unwrap_err().to_string();
        assert!(err.contains("no certificate"), "{err}");

        let garbled = dir.path().join("garbled.pem");
        std::fs::write(
            &garbled,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = client_config(&garbled).unwrap_err().to_string();
        assert!(err.contains("ca_file"), "{err}");
    }

    #[test]
    fn a_generated_ca_is_accepted() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        client_config(&path).unwrap();
    }
}
