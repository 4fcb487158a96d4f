//! The webhook channel (contract §11): a JSON POST of the offer (or the
//! reminder) to the responder's `webhook`, signed with `fallback.webhook_secret`
//! (HMAC-SHA256 of the body, hex, in `X-Dispatchd-Signature`). Only a 2xx
//! counts as delivered; a failure or timeout is tried again up to
//! `fallback.webhook_retries` times, then the chain goes on. ntfy, an SMS
//! gateway or a pager bridge can take it (see the README).

use std::time::Duration;

use hmac::{KeyInit, Mac};
use http_body_util::Full;
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::client;
use crate::config::FallbackSettings;
use crate::domain::dispatch::{Attempt, Outcome, Purpose};
use crate::domain::timeline::timestamp_ms;

pub struct Webhook {
    secret: String,
    timeout: Duration,
    retries: u32,
}

/// The signature of a body: HMAC-SHA256 with the secret, hex.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The JSON the webhook receives: the `dispatch` frame's fields (or a
/// reminder's), with `text` ready to show or send as an SMS.
pub fn body_of(a: &Attempt, text: &str) -> Vec<u8> {
    let o = &a.offer;
    let kind = match a.purpose {
        Purpose::Offer => "dispatch",
        Purpose::Reminder => "reminder",
    };
    json!({
        "type": kind,
        "dispatch_id": o.dispatch_id,
        "incident_id": o.incident_id,
        "responder_id": o.responder,
        "attempt": o.attempt,
        "severity": o.severity,
        "category": o.category,
        "summary": o.summary,
        "instructions": o.instructions,
        "caller": crate::domain::ids::mask(&o.caller),
        "queue": o.queue,
        "opened_at": timestamp_ms(o.opened_ms),
        "ack_by": if o.ack_by_ms > 0 { timestamp_ms(o.ack_by_ms) } else { String::new() },
        "major": o.major,
        "text": text,
    })
    .to_string()
    .into_bytes()
}

impl Webhook {
    pub fn new(f: &FallbackSettings) -> Webhook {
        Webhook {
            secret: f.webhook_secret.expose().to_string(),
            timeout: f.webhook_timeout,
            retries: f.webhook_retries,
        }
    }

    pub async fn post(&self, url: &str, a: &Attempt, text: &str) -> Outcome {
        let body = body_of(a, text);
        let sig = signature(&self.secret, &body);
        let mut last = Outcome::Failed("not_sent".into());
        for attempt in 0..=self.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
            }
            last = match tokio::time::timeout(self.timeout, post_once(url, &body, &sig)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => return Outcome::Delivered,
                Ok(Ok(status)) if (400..500).contains(&status) && status != 408 && status != 429 => {
                    // The receiver refuses it: another try would be refused too.
                    return Outcome::Failed(status.to_string());
                }
                Ok(Ok(status)) => Outcome::Failed(status.to_string()),
                Ok(Err(why)) => Outcome::Failed(why.into()),
                Err(_) => Outcome::Failed("timeout".into()),
            };
        }
        last
    }
}

/// One POST; the response's status, or why there is none: `bad_url`,
/// `unreachable` (no connection), `bad_answer` (connected, but no HTTP
/// answer came back: closed, garbage, headers too large).
async fn post_once(url: &str, body: &[u8], sig: &str) -> Result<u16, &'static str> {
    let uri: hyper::Uri = url.parse().map_err(|_| "bad_url")?;
    let tls = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("bad_url")?.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let stream = client::connect(&host, port, tls).await.map_err(|e| {
        tracing::debug!(error = %e, "webhook receiver unreachable");
        "unreachable"
    })?;
    let bad = |e: hyper::Error| {
        tracing::debug!(error = %e, "webhook receiver gave no HTTP answer");
        "bad_answer"
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(bad)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or(host);
    let req = Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header("host", authority)
        .header("content-type", "application/json")
        .header("user-agent", concat!("dispatchd/", env!("CARGO_PKG_VERSION")))
        .header("x-dispatchd-signature", sig)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|_| "bad_url")?;
    // Only the status counts; the body is never read (a receiver could send
    // any amount): dropping the response closes the connection.
    let resp = sender.send_request(req).await.map_err(bad)?;
    Ok(resp.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let sig = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
