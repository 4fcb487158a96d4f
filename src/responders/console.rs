//! The responder console (contract §10): the files of `console/` (HTML, CSS,
//! ES modules, the service worker, the web app manifest), embedded in the
//! binary and served on `responders.listen` beside the websocket, over https
//! when the listener speaks TLS.
//!
//! Every answer carries a strict Content-Security-Policy (scripts, styles and
//! connections to this origin only, no inline code), `nosniff`, no referrer
//! and no framing. The console speaks contract §4 over `/v1/responders/ws`
//! with the `hello` frame; the token stays in the browser.

use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

#[derive(RustEmbed)]
#[folder = "console/"]
struct Files;

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; manifest-src 'self'; worker-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// A console connection that sends no complete request head for this long is closed.
const IDLE: Duration = Duration::from_secs(15);

fn content_type(name: &str) -> Option<&'static str> {
    Some(match name.rsplit_once('.')?.1 {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        _ => return None,
    })
}

/// One file of the console, or 404.
async fn file(uri: Uri) -> Response {
    let path = uri.path();
    let name = if path == "/" { "index.html" } else { path.trim_start_matches('/') };
    let found = Files::get(name).zip(content_type(name));
    let mut resp = match found {
        Some((f, ctype)) => {
            let mut r = f.data.into_owned().into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
            r
        }
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Small files: always check, so a new binary's console is used at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

pub fn router() -> Router {
    Router::new().fallback(file)
}

/// Serves the console on one connection (HTTP/1.1) until it closes, idles or shutdown.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: S, shutdown: CancellationToken) {
    crate::api::server::connection(io, router(), IDLE, 16 * 1024, shutdown).await
}

/// The files the console is made of (for tests and `check-config`-like checks).
pub fn names() -> Vec<String> {
    Files::iter().map(|n| n.into_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_has_a_content_type_and_the_page_is_there() {
        let names = names();
        assert!(names.iter().any(|n| n == "index.html"), "{names:?}");
        for n in &names {
            assert!(content_type(n).is_some(), "{n} would be served without a content type");
        }
    }

    /// The service worker keeps a copy of every file, for a reload without signal.
    #[test]
    fn the_service_worker_lists_every_file() {
        let sw = Files::get("sw.js").expect("sw.js");
        let sw = String::from_utf8_lossy(&sw.data).into_owned();
        for n in names().iter().filter(|n| *n != "sw.js") {
            assert!(sw.contains(&format!("'/{n}'")), "sw.js does not cache /{n}");
        }
    }
}
