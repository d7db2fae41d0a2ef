//! TLS (SPEC §7): rustls with the ring provider, TLS 1.2 and 1.3 only. The certificate chain
//! and key are read at start (a missing or bad file stops the start, naming it) and again on
//! SIGHUP: new handshakes use the new pair, open connections keep theirs, and a reload that
//! fails keeps the old pair and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::{ensure, Context};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The certificate and key files (`tls.cert`, `tls.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The server's TLS: the acceptor for connections, and the pair it presents (reloadable).
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    pair: Arc<Pair>,
}

/// The pair handshakes present, replaced whole on reload.
#[derive(Debug)]
struct Pair {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Pair {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

impl Tls {
    /// Reads the files and builds the server's TLS configuration.
    pub fn new(files: TlsFiles) -> anyhow::Result<Self> {
        let pair = Arc::new(Pair {
            current: RwLock::new(load(&files)?),
            files,
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("the TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(pair.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            pair,
        })
    }

    /// Reads the files again; on success the next handshakes present the new pair.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = load(&self.pair.files)?;
        *self
            .pair
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }
}

/// Reads and checks a certificate chain and its key.
fn load(files: &TlsFiles) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = read_chain(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        anyhow::anyhow!(
            "tls.key {}: no PEM private key could be read ({e}); give the key of tls.cert in PEM",
            files.key.display()
        )
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        anyhow::anyhow!(
            "tls.key {}: {e}; use an RSA, ECDSA or Ed25519 key",
            files.key.display()
        )
    })?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|e| {
        anyhow::anyhow!(
            "tls.key {} does not belong to the certificate in tls.cert {} ({e})",
            files.key.display(),
            files.cert.display()
        )
    })?;
    Ok(Arc::new(pair))
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "tls.cert {}: the certificate chain could not be read ({e}); give a PEM file",
                path.display()
            )
        })?;
    ensure!(
        !chain.is_empty(),
        "tls.cert {}: no certificate in it; give a PEM file that begins with the server's certificate",
        path.display()
    );
    Ok(chain)
}
