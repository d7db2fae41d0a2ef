//! TLS: with `tls.cert` and `tls.key` the server speaks HTTPS (TLS 1.2 and 1.3, rustls
//! clients here), reloads both files on SIGHUP without dropping open connections, and refuses
//! to start on a missing or bad file, naming it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

use crate::support::{eventually, TestServer};

/// A test CA and a way to issue server certificates for localhost from it.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Self {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Courier test CA");
        let cert = params.self_signed(&key).expect("the CA certificate");
        Self { cert, key }
    }

    /// Writes a new server certificate and key for localhost into `dir`; returns the
    /// certificate's DER.
    fn issue(&self, dir: &Path, name: &str) -> Vec<u8> {
        let key = KeyPair::generate().expect("a server key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("a server certificate");
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    /// A client that trusts this CA and speaks only `versions`.
    fn client(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.cert.der().to_vec()))
            .expect("the CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection does a full handshake and so shows the server's current
        // certificate (a resumed session carries the one it began with).
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }
}

fn tls_args(dir: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join("cert.pem").display().to_string(),
        "--tls-key".into(),
        dir.join("key.pem").display().to_string(),
    ]
}

/// A kept-alive TLS connection.
type Kept = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(server: &TestServer, client: &Arc<rustls::ClientConfig>) -> Kept {
    let tcp = TcpStream::connect(server.addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let connection = rustls::ClientConnection::new(client.clone(), name).expect("client");
    rustls::StreamOwned::new(connection, tcp)
}

/// `GET path` on a kept-alive connection; returns the status.
fn get_on(stream: &mut Kept, path: &str) -> u16 {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("the answer's head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("the answer's body");
    head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The certificate a new connection is shown.
fn presented(server: &TestServer, client: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut stream = connect(server, client);
    assert_eq!(get_on(&mut stream, "/healthz"), 200);
    stream.conn.peer_certificates().expect("a certificate")[0].to_vec()
}

#[test]
fn tls_serves_https_over_tls_1_2_and_1_3_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.issue(dir.path(), "first");
    let args = tls_args(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = ca.client(&[&rustls::version::TLS13]);
    let server = TestServer::start_tls(&args, client.clone());
    server.register("planner", json!({}));
    server.publish("planner", json!({"over": "tls"}));
    let messages = server.receive("planner", json!({"wait_ms": 0}));
    assert_eq!(messages[0]["body"], json!({"over": "tls"}));
    let tls12 = ca.client(&[&rustls::version::TLS12]);
    let mut stream = connect(&server, &tls12);
    assert_eq!(get_on(&mut stream, "/healthz"), 200);
    assert_eq!(
        stream.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = crate::support::send(server.addr, "GET", "/healthz", None, None, &[]);
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status != 200));
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let first = ca.issue(dir.path(), "first");
    let args = tls_args(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = ca.client(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let server = TestServer::start_tls(&args, client.clone());
    let mut open = connect(&server, &client);
    assert_eq!(get_on(&mut open, "/healthz"), 200);
    assert_eq!(presented(&server, &client), first);

    // A broken file: the reload fails and the old certificate stays.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    server.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "the failed reload is logged",
        || {
            server
                .logs()
                .contains("previous certificate stays")
                .then_some(())
        },
    );
    assert_eq!(presented(&server, &client), first);

    let second = ca.issue(dir.path(), "second");
    server.signal("HUP");
    eventually(
        Duration::from_secs(10),
        "new handshakes get the new certificate",
        || (presented(&server, &client) == second).then_some(()),
    );
    // The connection opened before both reloads still works.
    assert_eq!(get_on(&mut open, "/healthz"), 200);
}

#[test]
fn missing_or_bad_tls_files_stop_the_start_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let args = tls_args(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = TestServer::unstarted(&args);
    let logs = server.restart_expecting_failure();
    assert!(
        logs.contains("tls.cert") && logs.contains("cert.pem"),
        "{logs}"
    );
    let ca = Ca::new();
    ca.issue(dir.path(), "first");
    // A key that is not the certificate's.
    let other = KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("key.pem"), other.serialize_pem()).unwrap();
    let logs = server.restart_expecting_failure();
    assert!(
        logs.contains("does not belong to the certificate"),
        "{logs}"
    );
}
