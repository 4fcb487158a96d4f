//! UDP retransmissions: the same INVITE sent again gets the same answer and
//! never opens a second incident; a re-sent INVITE (new branch, same Call-ID)
//! gets the same incident; a final answer is retransmitted until the ACK.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn retransmitted_invite_gets_same_answer_and_one_incident() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let p = UdpPeer::new(&d);
    let msg = invite(p.port(), "retrans-1", "X-IVR-Path: 9\r\n");
    // Five copies of the same datagram, as a PBX retransmitting on Timer A would.
    for _ in 0..5 {
        p.send(msg.as_bytes());
        std::thread::sleep(Duration::from_millis(20));
    }
    let answers: Vec<String> = p.recv_all(Duration::from_secs(2));
    let finals: Vec<&String> = answers.iter().filter(|a| !a.starts_with("SIP/2.0 100 ")).collect();
    assert!(!finals.is_empty(), "no final answer: {answers:?}");
    let ids: Vec<&str> = finals.iter().filter_map(|a| header_of(a, "X-Incident-Id")).collect();
    assert_eq!(ids.len(), finals.len());
    assert!(ids.iter().all(|i| *i == ids[0]), "different incidents: {ids:?}");
    // Same answer byte for byte (same To-tag).
    assert!(finals.iter().all(|f| *f == finals[0]), "answers differ");
    // Not ACKed: the 603 keeps coming (Timer G) — a retransmission we did not ask for.
    let more = p.recv_all(Duration::from_millis(1600));
    assert!(more.iter().any(|m| m == finals[0]), "603 was not retransmitted before the ACK");
    p.send(ack_for(finals[0], p.port(), "retrans-1").as_bytes());
    std::thread::sleep(Duration::from_millis(300));
    let _ = p.recv_all(Duration::from_millis(200));
    let after_ack = p.recv_all(Duration::from_millis(2500));
    assert!(after_ack.is_empty(), "retransmitted after the ACK: {after_ack:?}");

    let list = d.incidents("?limit=50");
    let mine: Vec<_> = list.iter().filter(|i| i["call_id"] == "retrans-1").collect();
    assert_eq!(mine.len(), 1, "{list:?}");
    assert_eq!(mine[0]["id"], ids[0]);
    assert_eq!(mine[0]["category"], "enquiry");
    let m = d.metrics();
    assert_eq!(metric_value(&m, "dispatchd_incidents_opened_total", ""), 1.0, "{m}");
}

#[test]
fn resent_invite_with_new_branch_returns_the_same_incident() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let p = UdpPeer::new(&d);
    let first = invite(p.port(), "resend-1", "");
    p.send(first.as_bytes());
    let a = p.recv_final(Duration::from_secs(5)).expect("answer");
    p.send(ack_for(&a, p.port(), "resend-1").as_bytes());
    let second = first.replace("branch=z9hG4bK-resend-1", "branch=z9hG4bK-resend-1-again");
    p.send(second.as_bytes());
    let b = p.recv_final(Duration::from_secs(5)).expect("answer");
    assert_eq!(header_of(&a, "X-Incident-Id"), header_of(&b, "X-Incident-Id"));
    // X-Call-Ref correlates legs with different Call-IDs into one incident.
    let c1 = invite(p.port(), "leg-a", "X-Call-Ref: 1700000000.77\r\n");
    p.send(c1.as_bytes());
    let r1 = p.recv_final(Duration::from_secs(5)).expect("answer");
    let c2 = invite(p.port(), "leg-b", "X-Call-Ref: 1700000000.77\r\n");
    p.send(c2.as_bytes());
    let r2 = p.recv_final(Duration::from_secs(5)).expect("answer");
    assert_eq!(header_of(&r1, "X-Incident-Id"), header_of(&r2, "X-Incident-Id"));
    assert_ne!(header_of(&r1, "X-Incident-Id"), header_of(&a, "X-Incident-Id"));
    assert_eq!(d.incidents("?limit=50").len(), 2);
}
