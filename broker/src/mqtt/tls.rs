//! MQTTS: TLS terminated here, in front of a loopback rumqttd listener.
//!
//! rumqttd can terminate TLS itself, but its accept loop completes each handshake before it
//! accepts the next connection, with no time limit, and reads the certificate files again for
//! each: one client that opens a TCP connection and sends nothing holds up every TLS client
//! after it. Here the certificate and key are read and checked once, at start, and each
//! connection's handshake runs in its own task within `mqtt.connect_timeout`. The decrypted
//! stream is then relayed to a rumqttd listener bound to 127.0.0.1, which wraps connections in
//! the same [`super::Guard`] as the other listeners (login, access control, counting). Each
//! relayed connection starts with a PROXY protocol v1 header naming the client's address, so
//! that failed logins are counted per address; that listener refuses connections without one.
//!
//! ```text
//! client ──TLS──▶ tls_listen (tokio-rustls, one task per connection) ──TCP──▶ 127.0.0.1:port
//!                                                                     (rumqttd + Guard)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::metrics::Metrics;

/// Why the TLS identity cannot be used; names the config key and the file.
#[derive(Debug, thiserror::Error)]
#[error("config key {key} ({}): {message}", path.display())]
pub struct TlsFileError {
    pub key: &'static str,
    pub path: PathBuf,
    pub message: String,
}

/// The server's certificate chain and key, read and checked once.
#[derive(Clone)]
pub struct TlsIdentity {
    server: Arc<ServerConfig>,
    /// The certificate the server presents, which the readiness probe pins.
    leaf: CertificateDer<'static>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    /// Reads `cert_file` (PEM chain, leaf first) and `key_file` (PEM private key) and checks
    /// that the key belongs to the certificate.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<TlsIdentity, TlsFileError> {
        let cert_error = |message: String| TlsFileError {
            key: "mqtt.tls_cert_file",
            path: cert_file.to_owned(),
            message,
        };
        let key_error = |message: String| TlsFileError {
            key: "mqtt.tls_key_file",
            path: key_file.to_owned(),
            message,
        };
        let certs = CertificateDer::pem_file_iter(cert_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| cert_error(e.to_string()))?;
        let Some(leaf) = certs.first().cloned() else {
            return Err(cert_error("no PEM CERTIFICATE in the file".into()));
        };
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| key_error(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| cert_error(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| key_error(format!("cannot serve this certificate with this key: {e}")))?;
        Ok(TlsIdentity {
            server: Arc::new(server),
            leaf,
        })
    }

    /// A client configuration that trusts exactly this server's certificate, whatever name it
    /// carries: the readiness probe connects to an address, not to a name.
    pub fn probe_client(&self) -> Result<TlsConnector, rustls::Error> {
        let provider = provider();
        let verifier = PinnedLeaf {
            leaf: self.leaf.clone(),
            algorithms: provider.signature_verification_algorithms,
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// Accepts the one certificate it was given, and checks handshake signatures against it.
#[derive(Debug)]
struct PinnedLeaf {
    leaf: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the MQTTS listener presents another certificate than the configured one".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts TLS connections on `listener` and relays each, decrypted, to `backend`, until the
/// listener fails for good. Never returns while it can accept.
pub async fn relay(
    listener: TcpListener,
    identity: TlsIdentity,
    backend: SocketAddr,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
) -> std::io::Error {
    let acceptor = TlsAcceptor::from(identity.server);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                // Out of file descriptors, for example: wait for connections to close.
                tracing::warn!(error = %e, "MQTTS accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    metrics.tls_handshake_failed();
                    tracing::debug!(%peer, error = %e, "MQTTS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.tls_handshake_failed();
                    tracing::debug!(%peer, "MQTTS handshake timed out");
                    return;
                }
            };
            let mut plain = match TcpStream::connect(backend).await {
                Ok(plain) => plain,
                Err(e) => {
                    tracing::error!(%backend, error = %e, "MQTTS cannot reach its MQTT listener");
                    return;
                }
            };
            let _ = plain.set_nodelay(true);
            // The listener behind learns the client's address from a PROXY protocol header.
            let local = tls.get_ref().0.local_addr().unwrap_or(peer);
            let header = ppp::v1::Addresses::from((peer, local)).to_string();
            if let Err(e) = plain.write_all(header.as_bytes()).await {
                tracing::debug!(%peer, error = %e, "MQTTS relay: backend closed");
                return;
            }
            // Ends when either side closes; errors here are a client going away.
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

/// Errors `accept` returns for one connection that failed before it was handed over.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
}

/// Connects to `addr` over TLS with the probe's pinned configuration.
pub async fn connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    // The name is not checked (the certificate is pinned); SNI carries the address.
    let name = ServerName::IpAddress(addr.ip().into());
    connector.connect(name, tcp).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_unreadable_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let e = TlsIdentity::load(&cert, &key).unwrap_err();
        assert_eq!(e.key, "mqtt.tls_cert_file");
        assert!(e.to_string().contains("cert.pem"), "{e}");

        std::fs::write(&cert, "not a certificate\n").unwrap();
        let e = TlsIdentity::load(&cert, &key).unwrap_err();
        assert_eq!(e.key, "mqtt.tls_cert_file", "{e}");
        assert!(e.message.contains("no PEM CERTIFICATE"), "{e}");
    }
}
