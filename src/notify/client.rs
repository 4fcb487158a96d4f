//! Outgoing connections of the channels: TCP, or TLS verified against the
//! Mozilla root certificates (webpki-roots; no OpenSSL, no system store
//! needed). A test or a private CA adds its own roots with `DISPATCHD_EXTRA_CA`
//! (a PEM file).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// TCP connect (and TLS handshake) within this.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(5);

fn config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            if let Some(path) = std::env::var_os("DISPATCHD_EXTRA_CA") {
                match CertificateDer::pem_file_iter(&path) {
                    Ok(certs) => {
                        for c in certs.flatten() {
                            let _ = roots.add(c);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "DISPATCHD_EXTRA_CA not read"),
                }
            }
            Arc::new(ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
        })
        .clone()
}

/// A stream to a peer: plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Connects to `host:port`, with TLS (checking the certificate for `host`) when `tls`.
pub async fn connect(host: &str, port: u16, tls: bool) -> std::io::Result<Box<dyn Stream>> {
    let timeout = |_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
    let tcp = tokio::time::timeout(CONNECT_WITHIN, TcpStream::connect((host, port))).await.map_err(timeout)??;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return Ok(Box::new(tcp));
    }
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a host name"))?;
    let connector = tokio_rustls::TlsConnector::from(config());
    let s = tokio::time::timeout(CONNECT_WITHIN, connector.connect(name, tcp)).await.map_err(timeout)??;
    Ok(Box::new(s))
}
