//! Notices between daemons sharing one Redis, over pub/sub: "run the matcher"
//! (another daemon made an offer that may be for one of ours) and "tell your
//! responder its offer was taken back". Best effort by design: nothing
//! depends on a notice arriving (every daemon resyncs on its own).

use futures_util::StreamExt;

use super::Store;
use super::keys::Family;
use crate::domain::dispatch::{Release, Reminder};

const WAKE: &str = "wake";
const CANCEL: &str = "cancel";
const REMIND: &str = "remind";

/// A notice from another daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Daemon `0` made offers: resync.
    Wake(String),
    /// A responder connected here must be told this offer was taken back.
    Cancel(Release),
    /// A responder connected here must be reminded of its incident.
    Remind(Reminder),
}

/// The one wire form of a cancel notice: `responder \t dispatch id \t reason`.
fn encode_cancel(r: &Release) -> String {
    format!("{}\t{}\t{}", r.responder, r.dispatch_id, r.reason)
}

fn decode_cancel(payload: &str) -> Option<Release> {
    let mut parts = payload.splitn(3, '\t');
    let (responder, dispatch_id, reason) = (parts.next()?, parts.next()?, parts.next()?);
    Some(Release {
        responder: responder.to_string(),
        dispatch_id: dispatch_id.to_string(),
        daemon: String::new(),
        reason: reason.to_string(),
    })
}

impl Store {
    fn channel(&self, name: &str) -> String {
        self.of(Family::Channel, name)
    }

    async fn publish(&self, channel: &str, payload: &str) {
        let Ok(mut c) = self.conn() else { return };
        let _: std::result::Result<i64, _> =
            redis::cmd("PUBLISH").arg(self.channel(channel)).arg(payload).query_async(&mut c).await;
    }

    /// Tells the other daemons that `daemon` made offers.
    pub async fn publish_wake(&self, daemon: &str) {
        self.publish(WAKE, daemon).await;
    }

    /// Asks the daemon of `r.responder` to send it a `reminder`.
    pub async fn publish_reminder(&self, r: &Reminder) {
        let payload = serde_json::json!({"incident_id": r.incident_id, "responder": r.responder, "due": r.due, "since_ms": r.since_ms});
        self.publish(REMIND, &payload.to_string()).await;
    }

    /// Asks the daemon of `r.responder` to send it a `cancel`.
    pub async fn publish_cancel(&self, r: &Release) {
        self.publish(CANCEL, &encode_cancel(r)).await;
    }

    /// Listens for notices on a connection of its own to the primary,
    /// calling `on` for each, until the connection drops or another primary
    /// is in use (`Err`: listen again) or `stop` resolves (`Ok`).
    pub async fn listen(
        &self,
        stop: impl std::future::Future<Output = ()>,
        mut on: impl FnMut(Notice),
    ) -> super::Result<()> {
        let node = self.primary.node().ok_or(super::StoreError::NoPrimary)?;
        let mut changes = self.primary.changes();
        changes.mark_unchanged();
        let mut pubsub = node.client.get_async_pubsub().await?;
        let (wake_ch, cancel_ch, remind_ch) = (self.channel(WAKE), self.channel(CANCEL), self.channel(REMIND));
        pubsub.subscribe(&[&wake_ch, &cancel_ch, &remind_ch]).await?;
        let mut stream = pubsub.on_message();
        tokio::pin!(stop);
        loop {
            let msg = tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = changes.changed() => return Err(super::StoreError::NoPrimary),
                m = stream.next() => match m { Some(m) => m, None => return Ok(()) },
            };
            let payload: String = msg.get_payload().unwrap_or_default();
            if msg.get_channel_name() == cancel_ch {
                if let Some(r) = decode_cancel(&payload) {
                    on(Notice::Cancel(r));
                }
            } else if msg.get_channel_name() == remind_ch {
                if let Ok(r) = serde_json::from_str::<Reminder>(&payload) {
                    on(Notice::Remind(r));
                }
            } else {
                on(Notice::Wake(payload));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_notices_round_trip() {
        let r = Release {
            responder: "r-a".into(),
            dispatch_id: "INC-0001X.2".into(),
            daemon: String::new(),
            reason: "ack_timeout".into(),
        };
        assert_eq!(decode_cancel(&encode_cancel(&r)), Some(r));
        assert_eq!(decode_cancel("only\ttwo"), None);
    }
}
