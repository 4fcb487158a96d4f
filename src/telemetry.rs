//! Logging and metrics: the tracing subscriber, the Prometheus recorder, and
//! every metric name in one place.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, LogSettings};

/// Metric names (contract §6). Labels never carry a caller number.
pub mod metric {
    pub const SIP_REQUESTS: &str = "dispatchd_sip_requests_total";
    pub const SIP_RESPONSES: &str = "dispatchd_sip_responses_total";
    /// Extension: messages dropped unanswered, by reason.
    pub const SIP_DROPPED: &str = "dispatchd_sip_dropped_total";
    /// Extension: TCP connections open now.
    pub const SIP_TCP_CONNECTIONS: &str = "dispatchd_sip_tcp_connections";
    /// Extension (contract §11): attempts on a responder's other channels, by channel.
    pub const CONTACT_ATTEMPTS: &str = "dispatchd_contact_attempts_total";
    /// Extension: what became of them, by channel and outcome.
    pub const CONTACT_OUTCOMES: &str = "dispatchd_contact_outcomes_total";
    /// Extension: reminders of acknowledged incidents without progress, by what is due.
    pub const REMINDERS: &str = "dispatchd_reminders_total";
    /// Extension: incidents released for want of progress and offered again.
    pub const RELEASES: &str = "dispatchd_releases_total";
    /// Extension: server transactions remembered (INVITE and others).
    pub const SIP_TRANSACTIONS: &str = "dispatchd_sip_transactions";
    pub const INCIDENTS_OPENED: &str = "dispatchd_incidents_opened_total";
    pub const QUEUE_DEPTH: &str = "dispatchd_queue_depth";
    pub const DISPATCH_OFFERS: &str = "dispatchd_dispatch_offers_total";
    pub const CALL_TO_OFFER: &str = "dispatchd_call_to_offer_seconds";
    pub const OFFER_TO_ACK: &str = "dispatchd_offer_to_ack_seconds";
    pub const ESCALATIONS: &str = "dispatchd_escalations_total";
    pub const RESPONDERS_CONNECTED: &str = "dispatchd_responders_connected";
    pub const REDIS_ERRORS: &str = "dispatchd_redis_errors_total";
    /// Extension: INVITE received → incident durably in Redis.
    pub const INTAKE_SECONDS: &str = "dispatchd_intake_seconds";
    /// Extension (issue 14): incidents opened per script call (concurrent calls share one).
    pub const INTAKE_BATCH: &str = "dispatchd_intake_batch_calls";
    /// Extension: 1 while Redis answers.
    pub const REDIS_UP: &str = "dispatchd_redis_up";
    /// Contract §12: a new Redis primary found after a failover.
    pub const REDIS_FAILOVERS: &str = "dispatchd_redis_failovers_total";
    /// Durable writes refused for want of replica acknowledgements (`WAIT`).
    pub const REDIS_WAIT_SHORT: &str = "dispatchd_redis_wait_short_total";
    /// Extension (issue 5): call events applied, by source and event.
    pub const CALL_EVENTS: &str = "dispatchd_call_events_total";
    /// Extension: correlation rules that fired, by rule.
    pub const CORRELATIONS: &str = "dispatchd_correlations_total";
    /// Extension: 1 while logged in to the PBX feed, by source (ami, esl).
    pub const ACD_CONNECTED: &str = "dispatchd_acd_connected";
    /// Extension: PBX feed messages that could not be used, by source and reason.
    pub const ACD_ERRORS: &str = "dispatchd_acd_errors_total";
    /// Extension: connections refused or ended before signing in, on the
    /// responders' and the ops listeners, by listener and reason.
    pub const CONNECTIONS_REFUSED: &str = "dispatchd_connections_refused_total";
}

/// Installs the tracing subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init_logging(log: &LogSettings) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&log.level));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match log.format {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(true).with_span_list(false))
            .try_init(),
        LogFormat::Pretty => registry.with(fmt::layer()).try_init(),
    };
    // Already installed (tests run several daemons' code in one process): keep the first.
    let _ = result;
}

/// Installs the Prometheus recorder and describes the metrics.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let buckets =
        [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .set_buckets_for_metric(Matcher::Full(metric::INTAKE_BATCH.into()), &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])?
        .install_recorder()?;
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(metric::SIP_REQUESTS, "SIP requests received, by method");
    describe_counter!(metric::SIP_RESPONSES, "SIP responses sent, by status");
    describe_counter!(metric::SIP_DROPPED, "SIP messages dropped without an answer, by reason");
    describe_gauge!(metric::SIP_TCP_CONNECTIONS, "SIP TCP connections open");
    describe_counter!(metric::INCIDENTS_OPENED, "Incidents opened, by severity and category");
    describe_gauge!(metric::QUEUE_DEPTH, "Incidents waiting in the queue, by severity");
    describe_counter!(metric::REDIS_ERRORS, "Redis commands that failed");
    describe_gauge!(metric::REDIS_UP, "1 while Redis answers");
    describe_counter!(metric::REDIS_FAILOVERS, "Redis primaries found at a new address after a failover");
    describe_counter!(
        metric::REDIS_WAIT_SHORT,
        "writes answered unavailable because fewer replicas than redis.min_replicas_ack acknowledged them in time"
    );
    describe_histogram!(metric::INTAKE_SECONDS, Unit::Seconds, "INVITE received to incident durably stored");
    describe_histogram!(
        metric::INTAKE_BATCH,
        "incidents opened (or found) per script call: concurrent calls share one"
    );
    describe_counter!(
        metric::DISPATCH_OFFERS,
        "Dispatch offers, by outcome (offered, acknowledged, declined, ack_timeout, exhausted)"
    );
    describe_histogram!(
        metric::CALL_TO_OFFER,
        Unit::Seconds,
        "INVITE received to dispatch handed to the responder's connection"
    );
    describe_histogram!(metric::OFFER_TO_ACK, Unit::Seconds, "Offer to acknowledgement");
    describe_counter!(metric::ESCALATIONS, "Offers moved to a higher tier, by severity");
    describe_gauge!(metric::RESPONDERS_CONNECTED, "Responders connected to this daemon");
    describe_counter!(metric::CALL_EVENTS, "Call events applied (SIP MESSAGE, AMI, ESL), by source and event");
    describe_counter!(
        metric::CORRELATIONS,
        "Correlation rules that fired (repeat_call, severity_raised, callback, abandon_storm, surge)"
    );
    describe_gauge!(metric::ACD_CONNECTED, "1 while logged in to the PBX event feed, by source");
    describe_counter!(metric::ACD_ERRORS, "PBX feed problems (login, disconnect, framing), by source and reason");

    // Present from the start (contract §6: these metrics exist), so dashboards
    // and alerts see zeros rather than nothing.
    use crate::domain::incident::Severity;
    metrics::counter!(metric::REDIS_ERRORS).absolute(0);
    metrics::counter!(metric::REDIS_FAILOVERS).absolute(0);
    metrics::counter!(metric::REDIS_WAIT_SHORT).absolute(0);
    metrics::gauge!(metric::RESPONDERS_CONNECTED).set(0.0);
    metrics::gauge!(metric::SIP_TCP_CONNECTIONS).set(0.0);
    for m in ["INVITE", "ACK", "CANCEL", "BYE", "INFO", "OPTIONS"] {
        metrics::counter!(metric::SIP_REQUESTS, "method" => m).absolute(0);
    }
    for s in ["100", "180", "200", "400", "481", "487", "503", "603"] {
        metrics::counter!(metric::SIP_RESPONSES, "status" => s).absolute(0);
    }
    for o in ["offered", "acknowledged", "declined", "ack_timeout", "exhausted"] {
        metrics::counter!(metric::DISPATCH_OFFERS, "outcome" => o).absolute(0);
    }
    for s in Severity::ALL {
        metrics::counter!(metric::ESCALATIONS, "severity" => s.as_str()).absolute(0);
        metrics::gauge!(metric::QUEUE_DEPTH, "severity" => s.as_str()).set(0.0);
    }
    metrics::counter!(metric::RELEASES).absolute(0);
    for due in ["en_route", "on_scene"] {
        metrics::counter!(metric::REMINDERS, "due" => due).absolute(0);
    }
    for c in ["pbx_call", "sip_message", "webhook"] {
        metrics::counter!(metric::CONTACT_ATTEMPTS, "channel" => c).absolute(0);
    }
    for (l, r) in [("responders", "preauth_limit"), ("http", "limit")] {
        metrics::counter!(metric::CONNECTIONS_REFUSED, "listener" => l, "reason" => r).absolute(0);
    }
    for r in ["repeat_call", "severity_raised", "related", "callback", "abandon_storm", "surge"] {
        metrics::counter!(metric::CORRELATIONS, "rule" => r).absolute(0);
    }
    for h in [metric::CALL_TO_OFFER, metric::OFFER_TO_ACK, metric::INTAKE_SECONDS, metric::INTAKE_BATCH] {
        // A histogram appears in the text format once it has a handle.
        let _ = metrics::histogram!(h);
    }
    Ok(handle)
}
