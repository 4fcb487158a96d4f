//! The README's Kamailio guide, under test: Debian's `kamailio` with
//! `deploy/kamailio/kamailio.cfg` in front of the real dispatchd, sipp as the
//! caller and as the queue PBX's agent.
//!
//! - Decline mode: dispatchd answers 603 with the incident id; Kamailio's
//!   failure route copies it into the INVITE it sends the queue, whose agent
//!   (sipp) refuses the call without it; the caller talks to the agent.
//! - Shadow mode: Kamailio rings dispatchd beside the agent; dispatchd's 180
//!   carries the id; when the agent answers, Kamailio cancels dispatchd's
//!   branch with `Reason: SIP;cause=200` and the incident says
//!   `answered_elsewhere`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kamailio/kamailio.cfg");

struct Proc(Child, &'static str);

impl Drop for Proc {
    /// SIGTERM first: Kamailio's main process then stops the worker processes
    /// it forked (SIGKILL would leave them running after the test); SIGKILL if
    /// it is still there after 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits for the process to exit; its status and output.
    fn finish(mut self, wait: Duration) -> (Option<i32>, String) {
        let end = Instant::now() + wait;
        let code = loop {
            if let Ok(Some(st)) = self.0.try_wait() {
                break st.code();
            }
            if Instant::now() > end {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        if let Some(mut o) = self.0.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut o, &mut out);
        }
        (code, format!("{} {out}", self.1))
    }
}

fn kamailio(port: u16, dispatchd: u16, agent: u16, shadow: bool, dir: &Path) -> Proc {
    let mut c = Command::new("kamailio");
    c.args(["-f", CONFIG, "-DD", "-E", "-m", "32", "-M", "8"])
        .arg("-Y")
        .arg(dir)
        .args(["-A", &format!("LISTEN=udp:127.0.0.1:{port}")])
        .args(["-A", &format!("DISPATCHD=\"sip:incident@127.0.0.1:{dispatchd}\"")])
        .args(["-A", &format!("QUEUE_PBX=\"sip:127.0.0.1:{agent}\"")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if shadow {
        c.args(["-A", "SHADOW_MODE"]);
    }
    let p = Proc(c.spawn().expect("kamailio must be installed (run ./deploy/test)"), "kamailio");
    // Ready once its port answers an OPTIONS (it refuses them: 405).
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    probe.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let me = probe.local_addr().unwrap().port();
    wait_until("kamailio", Duration::from_secs(10), || {
        let opt = caller_request("OPTIONS", me, "kam-probe", "<sip:x@127.0.0.1>", "");
        let _ = probe.send_to(opt.as_bytes(), ("127.0.0.1", port));
        let mut buf = [0u8; 2048];
        probe.recv(&mut buf).is_ok()
    });
    p
}

fn sipp(scenario_file: &str, args: &[&str], dir: &Path) -> Proc {
    let child = Command::new("sipp")
        .args(["-sf"])
        .arg(scenario(scenario_file))
        .args(["-i", "127.0.0.1", "-m", "1", "-nostdin", "-timeout", "20s", "-trace_err"])
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sipp must be installed (run ./deploy/test)");
    Proc(child, "sipp")
}

/// Runs one call through Kamailio in `mode`; returns the incident it made
/// (and the Redis and daemon, still running).
fn call_through_kamailio(mode: &'static str) -> (Redis, Daemon, serde_json::Value) {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options { mode, ..Options::default() });
    let dir = tempfile::tempdir().unwrap();
    let shadow = mode == "shadow";
    let agent_port = free_port();
    let agent_scenario = if shadow { "kamailio_shadow_agent_uas.xml" } else { "kamailio_agent_uas.xml" };
    let agent = sipp(agent_scenario, &["-p", &agent_port.to_string()], dir.path());
    let kam_port = free_port();
    let _kam = kamailio(kam_port, d.sip_port, agent_port, shadow, dir.path());
    let caller = sipp("kamailio_caller_uac.xml", &["-s", "incident", &format!("127.0.0.1:{kam_port}")], dir.path());
    let (code, out) = caller.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "the caller's call failed: {out}\n{}", d.log());
    let (code, out) = agent.finish(Duration::from_secs(10));
    assert_eq!(code, Some(0), "the agent's side failed (no X-Incident-Id / X-Call-Ref?): {out}");
    let all = d.incidents("");
    assert_eq!(all.len(), 1, "{all:#?}");
    let id = all[0]["id"].as_str().unwrap().to_string();
    let inc = d.incident(&id);
    (redis, d, inc)
}

#[test]
fn decline_mode_through_kamailio_gives_the_queue_the_incident_id() {
    let (_redis, _d, inc) = call_through_kamailio("decline");
    assert_eq!((inc["category"].as_str(), inc["severity"].as_str()), (Some("outage"), Some("critical")));
    assert_eq!(inc["queue"], "support");
    assert_eq!(inc["caller"], "+442071230777");
}

#[test]
fn shadow_mode_through_kamailio_is_answered_elsewhere() {
    let (_redis, d, inc) = call_through_kamailio("shadow");
    let id = inc["id"].as_str().unwrap().to_string();
    // The CANCEL with Reason: SIP;cause=200 is recorded once it arrives.
    wait_until("answered_elsewhere", Duration::from_secs(10), || {
        events(&d.incident(&id)).iter().any(|e| e == "answered_elsewhere")
    });
    assert!(!events(&d.incident(&id)).iter().any(|e| e == "abandoned"));
}
