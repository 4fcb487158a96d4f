//! Where the Redis primary is (contract §12).
//!
//! With a plain `redis.url` there is one server: one connection manager,
//! which reconnects by itself. With `redis.sentinels` the primary is found
//! through Sentinel (the redis crate's, which asks the Sentinels for the
//! master of `redis.master_name` and checks with `ROLE` that it is one), and
//! found again when something says it may have moved:
//!
//! - a command failed in a way a failover explains (the connection broke or
//!   was refused, it timed out, `READONLY`, `LOADING`, `MASTERDOWN`): the
//!   store calls [`Primary::saw`];
//! - a Sentinel announced `+switch-master` for our name.
//!
//! One task ([`Primary::watch`]) does the finding, once however many
//! requests failed, with jittered backoff while no primary can be found.
//! While none is known every request fails at once as unavailable (SIP 503,
//! `/readyz` 503) rather than waiting. A new primary gets fresh connections
//! (the shared one, the one for durable writes, and the pub/sub listener
//! reconnects when it sees the epoch change); the failover counter counts it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::telemetry::metric;

/// The primary in use: its address and the connections to it.
pub struct Node {
    /// Counts the primaries found since start (0 = the first).
    pub epoch: u64,
    pub addr: String,
    pub client: redis::Client,
    /// Shared by every request.
    pub conn: ConnectionManager,
    /// Writes that are followed by `WAIT` (a `WAIT` blocks its connection).
    pub durable: ConnectionManager,
}

enum How {
    Fixed,
    Sentinel { addrs: Vec<String>, name: String, node_info: SentinelNodeConnectionInfo },
}

pub struct Primary {
    how: How,
    config: ConnectionManagerConfig,
    timeout: Duration,
    node: RwLock<Option<Arc<Node>>>,
    suspect: Notify,
    epoch: watch::Sender<u64>,
}

/// Whether an error is one a failover explains (ask the Sentinels again).
pub fn failover_sign(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.code(), Some("READONLY" | "LOADING" | "MASTERDOWN"))
}

impl Primary {
    /// `url` gives the server (without Sentinels) or only the credentials and
    /// database (with them).
    pub fn new(url: &str, sentinels: &[String], name: &str, timeout: Duration) -> redis::RedisResult<Primary> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let (epoch, _) = watch::channel(0);
        if sentinels.is_empty() {
            let node = Node {
                epoch: 0,
                addr: client.get_connection_info().addr().to_string(),
                conn: ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?,
                durable: ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?,
                client,
            };
            return Ok(Primary {
                how: How::Fixed,
                config,
                timeout,
                node: RwLock::new(Some(Arc::new(node))),
                suspect: Notify::new(),
                epoch,
            });
        }
        let node_info = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(client.get_connection_info().redis_settings().clone());
        Ok(Primary {
            how: How::Sentinel {
                addrs: sentinels.iter().map(|a| format!("redis://{a}")).collect(),
                name: name.to_string(),
                node_info,
            },
            config,
            timeout,
            node: RwLock::new(None),
            suspect: Notify::new(),
            epoch,
        })
    }

    /// The primary in use; `None` while none is known.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.node.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tells when another primary is in use (the epoch).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// A command failed with `e`: when a failover explains it, look for the
    /// primary again (once, however many say so).
    pub fn saw(&self, e: &redis::RedisError) {
        if matches!(self.how, How::Sentinel { .. }) && failover_sign(e) {
            self.suspect.notify_one();
        }
    }

    fn set(&self, node: Option<Arc<Node>>) {
        *self.node.write().unwrap_or_else(|p| p.into_inner()) = node;
    }

    /// Asks the Sentinels for the primary (which is checked with `ROLE`).
    async fn ask(&self) -> redis::RedisResult<redis::Client> {
        let How::Sentinel { addrs, name, node_info } = &self.how else {
            return Err(redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Sentinels configured")));
        };
        // A fresh Sentinel each time: no cached connection to a Sentinel that went away.
        let mut sentinel = Sentinel::build(addrs.clone())?;
        let lookup = sentinel.async_master_for(name, Some(node_info));
        match tokio::time::timeout(self.timeout * 2, lookup).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))),
        }
    }

    /// Whether the node in use still says it is the primary.
    async fn still_primary(&self, node: &Node) -> bool {
        let mut c = node.conn.clone();
        let role = tokio::time::timeout(self.timeout, redis::cmd("ROLE").query_async::<redis::Value>(&mut c)).await;
        matches!(role, Ok(Ok(redis::Value::Array(ref v))) if matches!(v.first(), Some(redis::Value::BulkString(b)) if b == b"master"))
    }

    /// One look: keeps the node in use when it is still the primary, else
    /// takes the one the Sentinels name. `Err` when none can be found.
    async fn find(&self) -> redis::RedisResult<()> {
        let current = self.node();
        let client = match self.ask().await {
            Ok(c) => c,
            Err(e) => {
                // The Sentinels cannot say (all away?): keep a primary that still is one.
                if let Some(n) = &current
                    && self.still_primary(n).await
                {
                    return Ok(());
                }
                self.set(None);
                return Err(e);
            }
        };
        let addr = client.get_connection_info().addr().to_string();
        if current.as_ref().is_some_and(|n| n.addr == addr) {
            return Ok(());
        }
        let epoch = current.as_ref().map_or(*self.epoch.borrow(), |n| n.epoch) + 1;
        let node = Node {
            epoch,
            addr: addr.clone(),
            conn: ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone())?,
            durable: ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone())?,
            client,
        };
        self.set(Some(Arc::new(node)));
        self.epoch.send_replace(epoch);
        if epoch > 1 {
            metrics::counter!(metric::REDIS_FAILOVERS).increment(1);
            tracing::warn!(primary = %addr, "Redis primary found at a new address (failover)");
        } else {
            tracing::info!(primary = %addr, "Redis primary found through Sentinel");
        }
        Ok(())
    }

    /// Finds the primary once (a one-shot command); nothing to do without Sentinels.
    pub async fn find_once(&self) -> redis::RedisResult<()> {
        match self.how {
            How::Fixed => Ok(()),
            How::Sentinel { .. } => self.find().await,
        }
    }

    /// Finds the primary and finds it again whenever something says it may
    /// have moved, until `stop`. Nothing to do without Sentinels.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let How::Sentinel { addrs, name, .. } = &self.how else { return };
        tokio::spawn(switch_notices(self.clone(), addrs.clone(), name.clone(), stop.clone()));
        let backoff = Backoff::jittered(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            match self.find().await {
                Ok(()) => {
                    backoff.reset();
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = self.suspect.notified() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no Redis primary known; asking the Sentinels again");
                    if backoff.wait(&stop).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Listens to the Sentinels' `+switch-master` (`<name> <old ip> <old port>
/// <new ip> <new port>`) and says so for ours; reconnects to another Sentinel
/// when the one listened to goes away.
async fn switch_notices(primary: Arc<Primary>, addrs: Vec<String>, name: String, stop: CancellationToken) {
    let backoff = Backoff::jittered(Duration::from_millis(200), Duration::from_secs(5));
    let mut next = 0usize;
    loop {
        let addr = &addrs[next % addrs.len()];
        next += 1;
        let listened = async {
            let client = redis::Client::open(addr.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            let mut stream = pubsub.on_message();
            while let Some(msg) = stream.next().await {
                let payload: String = msg.get_payload().unwrap_or_default();
                if payload.split_whitespace().next() == Some(name.as_str()) {
                    primary.suspect.notify_one();
                }
            }
            Ok::<(), redis::RedisError>(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = listened => if let Err(e) = r {
                tracing::debug!(error = %e, sentinel = %addr, "Sentinel notices lost");
            },
        }
        if backoff.wait(&stop).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_signs() {
        let io = |k| redis::RedisError::from(std::io::Error::from(k));
        assert!(failover_sign(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(failover_sign(&io(std::io::ErrorKind::ConnectionReset)));
        let parse = redis::RedisError::from((redis::ErrorKind::Parse, "bad"));
        assert!(!failover_sign(&parse));
    }
}
