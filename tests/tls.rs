//! TLS on every listener (contract §9), with a certificate the test makes
//! (rcgen) and real TLS clients (rustls): an INVITE over SIP-TLS gets its 603
//! with the id, a responder over wss gets `welcome`, the ops plane answers
//! over https; plain TCP to a TLS port gets nothing useful and hurts nothing;
//! SIGHUP puts a new certificate in force for new handshakes while open
//! connections stay.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::Value;

const S5: Duration = Duration::from_secs(5);

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A certificate for 127.0.0.1 and localhost, written as `cert.pem`/`key.pem` in `dir`.
fn make_cert(dir: &Path) -> CertificateDer<'static> {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), c.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), c.signing_key.serialize_pem()).unwrap();
    c.cert.der().clone()
}

fn client_config(trusted: &CertificateDer<'static>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    Arc::new(ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

/// A TLS connection to `port`, trusting `trusted`; the handshake is done.
fn connect(port: u16, trusted: &CertificateDer<'static>) -> Tls {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(S5)).unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = ClientConnection::new(client_config(trusted), name).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("handshake");
    }
    s
}

/// The certificate the server presented.
fn presented(s: &Tls) -> CertificateDer<'static> {
    s.conn.peer_certificates().expect("a certificate")[0].clone().into_owned()
}

fn tls_daemon(redis: &Redis, dir: &Path) -> (Daemon, u16) {
    let sip_tls = free_port();
    let tls = format!("[tls]\ncert = {:?}\nkey = {:?}\n", dir.join("cert.pem"), dir.join("key.pem"));
    let d = Daemon::start(
        redis,
        Options {
            sip: format!("tls = \"127.0.0.1:{sip_tls}\""),
            http: "tls = true".into(),
            extra: roster(&[("r-a", 1, &["*"])]) + &tls,
            ..Options::default()
        },
    );
    (d, sip_tls)
}

/// Sends an INVITE over `s` and reads until its final answer.
fn invite_over(s: &mut Tls, call_id: &str) -> String {
    let port = s.sock.local_addr().unwrap().port();
    let inv = invite(port, call_id, "").replace("SIP/2.0/UDP", "SIP/2.0/TLS");
    s.write_all(inv.as_bytes()).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains("SIP/2.0 603") {
        let n = s.read(&mut buf).expect("an answer over TLS");
        assert!(n > 0, "closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got[got.find("SIP/2.0 603").unwrap()..].to_string()
}

fn https_get(port: u16, path: &str, trusted: &CertificateDer<'static>) -> String {
    let mut s = connect(port, trusted);
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn every_listener_speaks_tls_and_a_reload_rotates_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = make_cert(dir.path());
    let redis = Redis::start();
    let (d, sip_tls) = tls_daemon(&redis, dir.path());

    // SIP over TLS: 603 with the incident id, stored like any other.
    let mut sip = connect(sip_tls, &first);
    let resp = invite_over(&mut sip, "tls-1");
    let id = header_of(&resp, "X-Incident-Id").expect("X-Incident-Id").to_string();
    assert_eq!(d.incident_over_https(&id, &first)["call_id"], "tls-1");

    // A responder over wss: welcome.
    let ws_stream = connect(d.ws_port, &first);
    let url = format!("wss://127.0.0.1:{}/v1/responders/ws", d.ws_port);
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert("Authorization", "Bearer token-r-a".parse().unwrap());
    let (mut ws, _) = tungstenite::client(req, ws_stream).expect("wss upgrade");
    let welcome: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(welcome["type"], "welcome");

    // The ops plane over https.
    let ready = https_get(d.http_port, "/readyz", &first);
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    // Plain TCP to each TLS port: nothing that reads as SIP or HTTP, and the listener is unhurt.
    for port in [sip_tls, d.ws_port, d.http_port] {
        let mut plain = TcpStream::connect(("127.0.0.1", port)).unwrap();
        plain.set_read_timeout(Some(S5)).unwrap();
        let _ = plain.write_all(invite(plain.local_addr().unwrap().port(), "plain", "").as_bytes());
        let mut buf = Vec::new();
        let _ = plain.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(!text.contains("SIP/2.0") && !text.contains("HTTP/1.1"), "port {port}: {text}");
    }
    assert!(invite_over(&mut connect(sip_tls, &first), "tls-2").contains("X-Incident-Id"));

    // A new certificate and SIGHUP: new handshakes get it; open connections stay.
    let second = make_cert(dir.path());
    assert_ne!(first, second);
    d.reload_with(|t| t);
    let fresh = connect(sip_tls, &second);
    assert_eq!(presented(&fresh), second);
    assert!(invite_over(&mut sip, "tls-3").contains("X-Incident-Id"), "the connection opened before the reload");
    ws.send(tungstenite::Message::text(r#"{"type":"availability","status":"busy","id":"b"}"#)).unwrap();
    let reply = loop {
        let v: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
        if v["type"] != "dispatch" {
            break v;
        }
    };
    assert_eq!(reply, serde_json::json!({"type": "ok", "ref": "b"}), "the wss session opened before the reload");
    assert!(https_get(d.http_port, "/livez", &second).starts_with("HTTP/1.1 200"));
}

/// A `[tls]` file that cannot be read or parsed is a config error naming the key.
#[test]
fn unusable_tls_files_exit_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let missing = dir.path().join("nope.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64 at all é\n-----END CERTIFICATE-----\n").unwrap();
    for (c, k, want) in [
        (&missing, &key, "tls.cert"),
        (&garbage, &key, "tls.cert"),
        (&cert, &missing, "tls.key"),
        (&cert, &cert, "tls.key"),
    ] {
        let toml = format!("[tls]\ncert = {c:?}\nkey = {k:?}\n");
        let (code, text) = check_config(&toml);
        assert_eq!(code, 78, "{toml}: {text}");
        assert!(text.contains(want), "{toml}: expected {want} in {text}");
    }
    // sip.tls without [tls]: refused too.
    let (code, text) = check_config("[sip]\ntls = \"127.0.0.1:5061\"\n");
    assert_eq!(code, 78);
    assert!(text.contains("sip.tls"), "{text}");
}

trait OverHttps {
    fn incident_over_https(&self, id: &str, trusted: &CertificateDer<'static>) -> Value;
}

impl OverHttps for Daemon {
    fn incident_over_https(&self, id: &str, trusted: &CertificateDer<'static>) -> Value {
        let mut s = connect(self.http_port, trusted);
        write!(
            s,
            "GET /v1/incidents/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|_| panic!("{text}"))
    }
}
