//! Every key name of one deployment, once: the Rust side builds keys with
//! these, and the scripts get the same names in their generated prelude
//! (`K.queue`, `K.inc(id)`, …), so a key is spelled in one place.
//!
//! Every key starts with the deployment's hash tag, `{<redis.prefix>}:`: the
//! keys of one deployment all hash to one Redis Cluster slot, so each script
//! operation (which touches several of them) is valid on a cluster node too.

/// Keys of which a deployment has one: `{<prefix>}:<suffix>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// The incident counter (ids are unique across daemons).
    Seq,
    /// Every incident by opening time (zset, ms).
    Incidents,
    /// Waiting incidents, severity first then oldest (zset, see `queue_score`).
    Queue,
    /// Offered incidents by acknowledgement deadline (zset, ms).
    Deadlines,
    /// Responders free for an offer (zset: tier, then last dispatch ms).
    Idle,
    /// Responder ids of the roster in force (set).
    Roster,
    /// Resolved or cancelled incidents by closing time (zset, ms).
    Closed,
    /// Closing time up to which the retention sweep has set expiries.
    ClosedCursor,
    /// Incidents whose responder is to be reached on its next channel (zset, ms).
    Fallback,
    /// Acknowledged incidents by when a reminder is due (zset, ms).
    Progress,
}

impl Key {
    pub const ALL: [Key; 10] = [
        Key::Seq,
        Key::Incidents,
        Key::Queue,
        Key::Deadlines,
        Key::Idle,
        Key::Roster,
        Key::Closed,
        Key::ClosedCursor,
        Key::Fallback,
        Key::Progress,
    ];

    /// (name in the scripts, suffix after the prefix)
    pub fn names(self) -> (&'static str, &'static str) {
        match self {
            Key::Seq => ("seq", "seq"),
            Key::Incidents => ("incidents", "incidents"),
            Key::Queue => ("queue", "queue"),
            Key::Deadlines => ("deadlines", "deadlines"),
            Key::Idle => ("idle", "idle"),
            Key::Roster => ("roster", "roster"),
            Key::Closed => ("closed", "closed"),
            Key::ClosedCursor => ("closed_cursor", "closed:cursor"),
            Key::Fallback => ("fallback", "fallback"),
            Key::Progress => ("progress", "progress"),
        }
    }
}

/// Keys of which there is one per something: `{<prefix>}:<family>:<id><suffix>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// The record (hash).
    Inc,
    /// Its timeline (list of JSON, append-only).
    Timeline,
    /// Responders offered it in the current round (set).
    Tried,
    /// A major incident's members (set).
    Members,
    /// A responder's presence and dispatch state (hash).
    Resp,
    /// Call key (X-Call-Ref, Linkedid, Call-ID) → incident id.
    Call,
    /// What intake knows of a call (hash).
    CallState,
    /// Call keys whose call state holds one caller (by pseudonym), for erasure.
    CallerCalls,
    /// An event already applied (by its dedup key).
    Dedup,
    /// A caller's open incident for the repeat rule (by pseudonym).
    Repeat,
    /// A caller's open incident of each category for the repeat rule (hash, by pseudonym).
    RepeatOf,
    /// Incidents of the same caller and another category (set).
    Related,
    /// Recent incidents of a category (surge rule).
    Surge,
    /// The open major incident of a category.
    Major,
    /// Recent abandons of a queue (abandon-storm rule).
    Abandons,
    /// The open abandon-storm incident of a queue.
    Storm,
    /// A caller's incidents (by pseudonym), for erasure.
    Caller,
    /// A caller's incidents not closed yet (by pseudonym).
    CallerOpen,
    /// Timeline entries beyond the cap, counted by event (hash).
    Omitted,
    /// A pub/sub channel between daemons.
    Channel,
    /// The daemon holding a PBX feed (string, with a lease's expiry).
    Feed,
}

impl Family {
    pub const ALL: [Family; 21] = [
        Family::Inc,
        Family::Timeline,
        Family::Tried,
        Family::Members,
        Family::Resp,
        Family::Call,
        Family::CallState,
        Family::CallerCalls,
        Family::Dedup,
        Family::Repeat,
        Family::RepeatOf,
        Family::Related,
        Family::Surge,
        Family::Major,
        Family::Abandons,
        Family::Storm,
        Family::Caller,
        Family::CallerOpen,
        Family::Omitted,
        Family::Channel,
        Family::Feed,
    ];

    /// (name in the scripts, family, suffix after the id)
    pub fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Family::Inc => ("inc", "inc", ""),
            Family::Timeline => ("tl", "inc", ":tl"),
            Family::Tried => ("tried", "inc", ":tried"),
            Family::Members => ("members", "inc", ":members"),
            Family::Resp => ("resp", "resp", ""),
            Family::Call => ("call", "call", ""),
            Family::CallState => ("acall", "acall", ""),
            Family::CallerCalls => ("callercalls", "callercalls", ""),
            Family::Dedup => ("dedup", "dedup", ""),
            Family::Repeat => ("repeats", "repeat", ""),
            Family::RepeatOf => ("repeat_of", "repeatc", ""),
            Family::Related => ("related", "inc", ":related"),
            Family::Surge => ("surge", "surge", ""),
            Family::Major => ("major", "major", ""),
            Family::Abandons => ("abandons", "abandons", ""),
            Family::Storm => ("storm", "storm", ""),
            Family::Caller => ("caller", "caller", ""),
            Family::CallerOpen => ("caller_open", "calleropen", ""),
            Family::Omitted => ("omitted", "inc", ":omitted"),
            Family::Channel => ("ch", "ch", ""),
            Family::Feed => ("feed", "feed", ""),
        }
    }
}

/// Builds the keys of one deployment.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `{<redis.prefix>}`: the hash tag every key starts with.
    prefix: String,
    /// `<redis.prefix>` as configured (the layout before the hash tag used it bare).
    bare: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: format!("{{{prefix}}}"), bare: prefix.to_string() }
    }

    /// What every key starts with (before its `:`): `{<redis.prefix>}`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The configured prefix without its braces.
    pub fn bare(&self) -> &str {
        &self.bare
    }

    pub fn key(&self, k: Key) -> String {
        format!("{}:{}", self.prefix, k.names().1)
    }

    pub fn of(&self, f: Family, id: &str) -> String {
        let (_, family, suffix) = f.names();
        format!("{}:{family}:{id}{suffix}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_carries_the_hash_tag() {
        let k = Keys::new("dispatchd");
        assert_eq!(k.key(Key::Queue), "{dispatchd}:queue");
        assert_eq!(k.of(Family::Timeline, "INC-00001"), "{dispatchd}:inc:INC-00001:tl");
        for key in Key::ALL {
            assert!(k.key(key).starts_with("{dispatchd}:"));
        }
        for f in Family::ALL {
            assert!(k.of(f, "x").starts_with("{dispatchd}:"));
        }
    }
}
