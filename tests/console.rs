//! The responder console (contract §10): served from the binary on the
//! responders' port beside the websocket, with correct content types and a
//! strict Content-Security-Policy; and the browser tests (tests/browser/,
//! Debian's chromium through playwright-core) against the real binary.

mod common;

use std::process::Command;

use common::*;

/// GET on the responders' port: (status, headers, body).
fn get(port: u16, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn the_console_is_served_with_its_types_and_a_strict_policy() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options { extra: roster(&[("r-a", 1, &["*"])]), ..Options::default() });
    let (status, head, body) = get(d.ws_port, "/");
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("content-type: text/html; charset=utf-8"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'; script-src 'self'"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(
        body.contains("<html") && !body.contains("<script>") && !body.contains(" style="),
        "no inline script or style"
    );
    for (path, ctype) in [
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
        ("/sw.js", "text/javascript"),
        ("/manifest.webmanifest", "application/manifest+json"),
        ("/icon.svg", "image/svg+xml"),
    ] {
        let (status, head, _) = get(d.ws_port, path);
        assert_eq!(status, 200, "{path}: {head}");
        assert!(head.contains(&format!("content-type: {ctype}")), "{path}: {head}");
    }
    for path in ["/nope", "/../Cargo.toml", "/%2e%2e/Cargo.toml", "/index.html/", "/v1/responders/ws/extra"] {
        assert_eq!(get(d.ws_port, path).0, 404, "{path}");
    }
    // The websocket still answers beside it.
    let mut r = Responder::connect(&d, "r-a");
    assert_eq!(r.request(serde_json::json!({"type": "availability", "status": "busy"}), "x")["type"], "ok");
}

/// The browser tests: `node --test tests/browser/` with playwright-core
/// driving Debian's chromium against the real binary (installed by
/// ./deploy/test: chromium, Node.js and the npm packages of tests/browser).
#[test]
fn the_console_in_a_real_browser() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    if !std::path::Path::new(dir).join("node_modules/playwright-core").exists() {
        let ok = Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(dir).status();
        assert!(ok.is_ok_and(|s| s.success()), "npm ci in tests/browser failed (run ./deploy/test)");
    }
    let out = Command::new("node")
        .args(["--test", "--test-reporter=spec", "console.test.mjs"])
        .current_dir(dir)
        .env("DISPATCHD_BIN", bin())
        .output()
        .expect("node must be installed (run ./deploy/test)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "browser tests failed:\n{text}");
    assert!(text.contains("fail 0"), "{text}");
}
