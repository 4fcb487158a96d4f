//! Load generator for the dispatch benchmark (deploy/bench).
//!
//! `dispatch` mode: N websocket responders (tokens `token-r<i>`) that ack every
//! dispatch at once and resolve it; calls placed over SIP/UDP at a fixed rate;
//! prints the call → `dispatch` frame latency measured at the client
//! (INVITE sent → dispatch frame read), as percentiles.
//!
//! `idle` mode: connects N responders and holds them, so the daemon's memory
//! per idle responder can be read; prints when all are connected and waits
//! for a line on stdin (or SIGTERM).
//!
//! `fallback` mode: the far end of the other channels (contract §11) for
//! responders without a websocket — an HTTP receiver for their webhooks and a
//! SIP phone (UDP, answers 200) for their MESSAGEs. Places CALLS calls at
//! RATE/s, then reads each incident's `offered` time from the API and prints,
//! per channel, offer → the attempt arriving (the same clock, loopback: the
//! time it takes to leave dispatchd), and INVITE sent → arriving.
//!
//!     cargo run --release --example loadgen -- dispatch SIP_ADDR WS_URL RESPONDERS RATE SECONDS
//!     cargo run --release --example loadgen -- idle WS_URL RESPONDERS
//!     cargo run --release --example loadgen -- fallback SIP_ADDR API_ADDR ADMIN_TOKEN HOOK_PORT PHONE_PORT CALLS RATE
//!     cargo run --release --example loadgen -- probe SIP_ADDR INTERVAL_MS
//!
//! `probe` mode: one call every INTERVAL_MS until stdin closes, each with its
//! own Call-ID; prints `<ms since the epoch the INVITE left> <final status>`
//! per call (0 when none came within 5 s), for the failover gap in deploy/bench.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::UdpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Times = Arc<Mutex<HashMap<String, Instant>>>;

async fn responder(url: String, i: usize, received: Times) -> anyhow::Result<()> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert("Authorization", format!("Bearer token-r{i}").parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    let (mut tx, mut rx) = ws.split();
    while let Some(msg) = rx.next().await {
        let Message::Text(t) = msg? else { continue };
        let v: serde_json::Value = serde_json::from_str(t.as_str())?;
        if v["type"] == "dispatch" {
            let now = Instant::now();
            let incident = v["incident_id"].as_str().unwrap_or_default().to_string();
            received.lock().unwrap().entry(incident.clone()).or_insert(now);
            let ack = serde_json::json!({"type": "ack", "dispatch_id": v["dispatch_id"]});
            let done = serde_json::json!({"type": "status", "incident_id": incident, "status": "resolved"});
            tx.send(Message::text(ack.to_string())).await?;
            tx.send(Message::text(done.to_string())).await?;
        }
    }
    Ok(())
}

/// Call-IDs are `lg-<run>-<n>`: each run its own, or a second run would get
/// the first run's incidents back (the daemon never opens two for one call).
fn invite(local: SocketAddr, run: u32, n: u64) -> String {
    format!(
        "INVITE sip:incident@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-lg-{run}-{n}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:+15550000{n:03}@127.0.0.1>;tag=lg{n}\r\nTo: <sip:incident@127.0.0.1>\r\n\
         Call-ID: lg-{run}-{n}\r\nCSeq: 1 INVITE\r\nX-IVR-Path: 2,1\r\nContent-Length: 0\r\n\r\n"
    )
}

fn header<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn dispatch(sip: SocketAddr, url: String, responders: usize, rate: u64, seconds: u64) -> anyhow::Result<()> {
    let received: Times = Arc::default();
    for i in 0..responders {
        let (url, received) = (url.clone(), received.clone());
        tokio::spawn(async move {
            if let Err(e) = responder(url, i, received).await {
                eprintln!("responder r{i}: {e}");
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let local = sock.local_addr()?;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default(); // Call-ID → INVITE sent
    let incident_of: Arc<Mutex<HashMap<String, String>>> = Arc::default(); // incident → Call-ID
    let reader = {
        let (sock, incident_of) = (sock.clone(), incident_of.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.starts_with("SIP/2.0 100 ") {
                    continue;
                }
                let (Some(call_id), Some(id)) = (header(&text, "Call-ID"), header(&text, "X-Incident-Id")) else {
                    continue;
                };
                incident_of.lock().unwrap().insert(id.to_string(), call_id.to_string());
                let to = header(&text, "To").unwrap_or_default();
                let from_hdr = header(&text, "From").unwrap_or_default();
                let ack = format!(
                    "ACK sip:incident@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-{call_id}\r\n\
                     Max-Forwards: 70\r\nFrom: {from_hdr}\r\nTo: {to}\r\n\
                     Call-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
                );
                let _ = sock.send_to(ack.as_bytes(), from).await;
            }
        })
    };

    let run: u32 = rand::random();
    let total = rate * seconds;
    let start = Instant::now();
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        sent.lock().unwrap().insert(format!("lg-{run}-{n}"), Instant::now());
        sock.send_to(invite(local, run, n).as_bytes(), sip).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    reader.abort();

    let sent = sent.lock().unwrap();
    let incident_of = incident_of.lock().unwrap();
    let received = received.lock().unwrap();
    let mut lat: Vec<f64> = received
        .iter()
        .filter_map(|(inc, at)| {
            let call = incident_of.get(inc)?;
            Some(at.duration_since(*sent.get(call)?).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "rate {rate}/s for {seconds}s, {responders} responders: calls {total}, answered {}, dispatch frames {}, joined {} | call->dispatch ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        incident_of.len(),
        received.len(),
        lat.len(),
        percentile(&lat, 50.0),
        percentile(&lat, 90.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

async fn idle(url: String, responders: usize) -> anyhow::Result<()> {
    let mut held = Vec::with_capacity(responders);
    for i in 0..responders {
        let mut req = url.clone().into_client_request()?;
        req.headers_mut().insert("Authorization", format!("Bearer token-r{i}").parse()?);
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        let (tx, mut rx) = ws.split();
        // Keep reading so pings are answered.
        tokio::spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
        held.push(tx);
    }
    println!("connected {responders}");
    let mut line = String::new();
    let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
    drop(held);
    Ok(())
}

/// One call every `interval` until stdin closes: its send time and final status.
async fn probe(sip: SocketAddr, interval: Duration) -> anyhow::Result<()> {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let local = sock.local_addr()?;
    // Call-ID → when it was sent (ms since the epoch); answered ones are printed by the reader.
    let pending: Arc<Mutex<HashMap<String, f64>>> = Arc::default();
    let reader = {
        let (sock, pending) = (sock.clone(), pending.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let status: u16 = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                if status < 200 {
                    continue;
                }
                let Some(call_id) = header(&text, "Call-ID") else { continue };
                let Some(at) = pending.lock().unwrap().remove(call_id) else { continue };
                println!("{at:.0} {status}");
                let ack = format!(
                    "ACK sip:incident@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-{call_id}\r\n\
                     Max-Forwards: 70\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
                    header(&text, "From").unwrap_or_default(),
                    header(&text, "To").unwrap_or_default()
                );
                let _ = sock.send_to(ack.as_bytes(), from).await;
            }
        })
    };
    let closed = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
    });
    tokio::pin!(closed);
    let run: u32 = rand::random();
    let mut tick = tokio::time::interval(interval);
    for n in 0u64.. {
        tokio::select! {
            _ = &mut closed => break,
            _ = tick.tick() => {}
        }
        pending.lock().unwrap().insert(format!("lg-{run}-{n}"), epoch_ms_f64());
        sock.send_to(invite(local, run, n).as_bytes(), sip).await?;
        // Calls without an answer for 5 s: status 0.
        let stale: Vec<(String, f64)> = {
            let now = epoch_ms_f64();
            let mut p = pending.lock().unwrap();
            let old: Vec<String> = p.iter().filter(|(_, at)| now - **at > 5000.0).map(|(k, _)| k.clone()).collect();
            old.into_iter().filter_map(|k| p.remove(&k).map(|at| (k, at))).collect()
        };
        for (_, at) in stale {
            println!("{at:.0} 0");
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    reader.abort();
    Ok(())
}

/// Milliseconds since the epoch, as the daemon's timeline writes them.
fn epoch_ms_f64() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1000.0
}

/// incident → (channel, arrived: epoch ms, arrived: Instant)
type Arrivals = Arc<Mutex<HashMap<String, (&'static str, f64, Instant)>>>;

/// One webhook POST: read the head and the body, note the incident, answer 200.
async fn hook_conn(mut s: tokio::net::TcpStream, arrivals: Arrivals) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let len: usize = header(&head, "Content-Length").and_then(|v| v.parse().ok()).unwrap_or(0);
        if buf.len() < end + 4 + len {
            continue;
        }
        let (at, now) = (epoch_ms_f64(), Instant::now());
        let body: serde_json::Value = serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap_or_default();
        if let Some(id) = body["incident_id"].as_str() {
            arrivals.lock().unwrap().entry(id.to_string()).or_insert(("webhook", at, now));
        }
        buf.drain(..end + 4 + len);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await?;
    }
}

/// The incident's first `offered` time (epoch ms) from `GET /v1/incidents/{id}`.
async fn offered_ms(api: SocketAddr, token: &str, id: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(api).await.ok()?;
    let req = format!(
        "GET /v1/incidents/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out);
    let body: serde_json::Value = serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()?;
    let at = body["timeline"].as_array()?.iter().find(|e| e["event"] == "offered")?["at"].as_str()?.to_string();
    let t = chrono::DateTime::parse_from_rfc3339(&at).ok()?;
    Some(t.timestamp_millis() as f64)
}

#[allow(clippy::too_many_arguments)]
async fn fallback(
    sip: SocketAddr,
    api: SocketAddr,
    token: String,
    hook_port: u16,
    phone_port: u16,
    calls: u64,
    rate: u64,
) -> anyhow::Result<()> {
    let arrivals: Arrivals = Arc::default();
    let hooks = tokio::net::TcpListener::bind(("127.0.0.1", hook_port)).await?;
    {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = hooks.accept().await {
                tokio::spawn(hook_conn(s, arrivals.clone()));
            }
        });
    }
    let phone = UdpSocket::bind(("127.0.0.1", phone_port)).await?;
    {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = phone.recv_from(&mut buf).await {
                let (at, now) = (epoch_ms_f64(), Instant::now());
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if !text.starts_with("MESSAGE ") {
                    continue;
                }
                if let Some(id) = header(&text, "X-Incident-Id") {
                    arrivals.lock().unwrap().entry(id.to_string()).or_insert(("sip_message", at, now));
                }
                let copy = |h: &str| header(&text, h).map(|v| format!("{h}: {v}\r\n")).unwrap_or_default();
                let ok = format!(
                    "SIP/2.0 200 OK\r\n{}{}{};tag=lgphone\r\n{}{}Content-Length: 0\r\n\r\n",
                    copy("Via"),
                    copy("From"),
                    copy("To").trim_end(),
                    copy("Call-ID"),
                    copy("CSeq")
                );
                let _ = phone.send_to(ok.as_bytes(), from).await;
            }
        });
    }

    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let local = sock.local_addr()?;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let incident_of: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let reader = {
        let (sock, incident_of) = (sock.clone(), incident_of.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, _)) = sock.recv_from(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if let (Some(call_id), Some(id)) = (header(&text, "Call-ID"), header(&text, "X-Incident-Id")) {
                    incident_of.lock().unwrap().insert(id.to_string(), call_id.to_string());
                }
            }
        })
    };
    let run: u32 = rand::random();
    let start = Instant::now();
    for n in 0..calls {
        tokio::time::sleep_until((start + Duration::from_secs_f64(n as f64 / rate as f64)).into()).await;
        sent.lock().unwrap().insert(format!("lg-{run}-{n}"), Instant::now());
        sock.send_to(invite(local, run, n).as_bytes(), sip).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    reader.abort();

    let arrived: Vec<(String, (&'static str, f64, Instant))> =
        arrivals.lock().unwrap().iter().map(|(k, v)| (k.clone(), *v)).collect();
    let mut by_channel: HashMap<&'static str, (Vec<f64>, Vec<f64>)> = HashMap::new();
    for (id, (channel, at_ms, at)) in arrived {
        let Some(offered) = offered_ms(api, &token, &id).await else { continue };
        let e = by_channel.entry(channel).or_default();
        e.0.push(at_ms - offered);
        let call = incident_of.lock().unwrap().get(&id).cloned();
        if let Some(sent_at) = call.and_then(|c| sent.lock().unwrap().get(&c).copied()) {
            e.1.push(at.duration_since(sent_at).as_secs_f64() * 1000.0);
        }
    }
    let answered = incident_of.lock().unwrap().len();
    println!("calls {calls} at {rate}/s, incidents {answered}");
    let mut channels: Vec<_> = by_channel.into_iter().collect();
    channels.sort_by_key(|(c, _)| *c);
    for (channel, (mut offer, mut call)) in channels {
        offer.sort_by(|a, b| a.total_cmp(b));
        call.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{channel:<12} {:>4} attempts | offer -> arriving ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} | INVITE -> arriving ms p50 {:.2} p99 {:.2}",
            offer.len(),
            percentile(&offer, 50.0),
            percentile(&offer, 90.0),
            percentile(&offer, 99.0),
            offer.last().copied().unwrap_or(f64::NAN),
            percentile(&call, 50.0),
            percentile(&call, 99.0),
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["dispatch", sip, url, n, rate, secs] => {
            dispatch(sip.parse()?, url.to_string(), n.parse()?, rate.parse()?, secs.parse()?).await
        }
        ["idle", url, n] => idle(url.to_string(), n.parse()?).await,
        ["fallback", sip, api, token, hook, phone, calls, rate] => {
            fallback(
                sip.parse()?,
                api.parse()?,
                token.to_string(),
                hook.parse()?,
                phone.parse()?,
                calls.parse()?,
                rate.parse()?,
            )
            .await
        }
        ["probe", sip, ms] => probe(sip.parse()?, Duration::from_millis(ms.parse()?)).await,
        _ => anyhow::bail!(
            "usage: loadgen probe SIP_ADDR INTERVAL_MS | loadgen dispatch SIP_ADDR WS_URL RESPONDERS RATE SECONDS | loadgen idle WS_URL RESPONDERS | \
             loadgen fallback SIP_ADDR API_ADDR ADMIN_TOKEN HOOK_PORT PHONE_PORT CALLS RATE"
        ),
    }
}
