//! TLS for every listener (contract §9), with rustls (no OpenSSL).
//!
//! One certificate and key (`[tls] cert`, `key`, PEM) serve SIP over TLS,
//! the responders' wss/https and, when asked, the ops plane. [`Tls`] holds the
//! server configuration in force; SIGHUP reads the files again
//! ([`Tls::reload`]): new handshakes use the new certificate, connections
//! already open keep theirs.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Longest a TLS handshake may take.
pub const HANDSHAKE_WITHIN: Duration = Duration::from_secs(5);

/// A `[tls]` file that cannot be used: the key it comes from, and why.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn bad(key: &'static str, message: impl Into<String>) -> TlsError {
    TlsError { key, message: message.into() }
}

/// Reads a PEM certificate chain and private key into a server configuration.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("tls.cert", format!("cannot read {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("tls.cert", format!("{} is not a PEM certificate chain: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(bad("tls.cert", format!("{} holds no certificate", cert.display())));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad("tls.key", format!("{} is not a PEM private key (PKCS#8, RSA or EC): {e}", key.display())))?;
    // The one crypto provider built in (ring), TLS 1.2 and 1.3.
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| bad("tls.key", format!("does not go with the certificate: {e}")))?;
    Ok(Arc::new(config))
}

/// The TLS configuration in force, shared by every TLS listener.
pub struct Tls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    config: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<Tls>, TlsError> {
        let config = server_config(cert, key)?;
        Ok(Arc::new(Tls { cert: cert.to_path_buf(), key: key.to_path_buf(), config: RwLock::new(config) }))
    }

    /// Reads the certificate and key again (SIGHUP); on an error the old ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert, &self.key)?;
        match self.config.write() {
            Ok(mut c) => *c = config,
            Err(p) => *p.into_inner() = config,
        }
        Ok(())
    }

    /// The acceptor for a new handshake, with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = match self.config.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        TlsAcceptor::from(config)
    }

    /// A server handshake on `stream`, within [`HANDSHAKE_WITHIN`].
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(&self, stream: S) -> Option<TlsStream<S>> {
        tokio::time::timeout(HANDSHAKE_WITHIN, self.acceptor().accept(stream)).await.ok()?.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_mismatched_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        assert_eq!(server_config(&cert, &key).unwrap_err().key, "tls.cert");
        std::fs::write(&cert, "not a certificate").unwrap();
        assert_eq!(server_config(&cert, &key).unwrap_err().key, "tls.cert");
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&cert, a.cert.pem()).unwrap();
        assert_eq!(server_config(&cert, &key).unwrap_err().key, "tls.key");
        std::fs::write(&key, b.signing_key.serialize_pem()).unwrap();
        assert_eq!(server_config(&cert, &key).unwrap_err().key, "tls.key", "another certificate's key");
        std::fs::write(&key, a.signing_key.serialize_pem()).unwrap();
        let tls = Tls::new(&cert, &key).expect("a matching pair");
        std::fs::write(&cert, "garbage").unwrap();
        assert!(tls.reload().is_err(), "a broken file on reload is refused (the old one stays)");
    }
}
