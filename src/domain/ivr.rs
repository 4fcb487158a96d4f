//! The path a caller took through the IVR: one grammar (and its limits) for
//! configuration, SIP headers, PBX events and records.

use std::fmt;

use serde::Serialize;

/// Most IVR selections kept.
pub const MAX_IVR_SELECTIONS: usize = 32;
/// Longest IVR selection (keys pressed for one menu).
pub const MAX_SELECTION_LEN: usize = 8;

/// The path a caller took through the IVR: one grammar for configuration,
/// SIP headers, PBX events and records — comma-separated selections, each 1
/// to 8 DTMF keys (`0-9`, `*`, `#`, `A-D`), at most 32 of them. `"21"` is
/// one selection, not `"2"` then `"1"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct IvrPath(Vec<String>);

/// A DTMF key: `0-9`, `*`, `#`, `A-D`.
pub fn is_dtmf_key(b: u8) -> bool {
    b.is_ascii_digit() || matches!(b, b'*' | b'#' | b'A'..=b'D')
}

fn is_selection(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_SELECTION_LEN && s.bytes().all(is_dtmf_key)
}

impl IvrPath {
    /// Caller input (`X-IVR-Path: 2, 1,x`): selections that are not DTMF keys
    /// are dropped, and only the first 32 are kept.
    pub fn lenient(text: &str) -> IvrPath {
        IvrPath::from_selections(text.split(','))
    }

    /// Selections from anywhere, checked one by one as [`IvrPath::lenient`] does.
    pub fn from_selections<S: AsRef<str>>(selections: impl IntoIterator<Item = S>) -> IvrPath {
        IvrPath(
            selections
                .into_iter()
                .filter_map(|s| {
                    let s = s.as_ref().trim();
                    is_selection(s).then(|| s.to_string())
                })
                .take(MAX_IVR_SELECTIONS)
                .collect(),
        )
    }

    /// Configuration (`[[ivr]] path = "2,1"`) and `X-Event: ivr`: every
    /// selection must be valid, and there may be at most 32 (checked without
    /// collecting, so 100,000 commas cost nothing).
    pub fn strict(text: &str) -> Option<IvrPath> {
        let sels = || text.split(',').map(str::trim).take(MAX_IVR_SELECTIONS + 1);
        let ok = sels().count() <= MAX_IVR_SELECTIONS && sels().all(is_selection);
        ok.then(|| IvrPath(sels().map(str::to_string).collect()))
    }

    /// One more key pressed (dropped when the path is full or it is not a key).
    pub fn push_key(&mut self, key: char) {
        if self.0.len() < MAX_IVR_SELECTIONS && key.is_ascii() && is_dtmf_key(key as u8) {
            self.0.push(key.to_string());
        }
    }

    pub fn selections(&self) -> &[String] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `prefix` is where this path starts.
    pub fn starts_with(&self, prefix: &IvrPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

/// `2,1`: the form kept in records and shown in summaries.
impl fmt::Display for IvrPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ivr_grammar() {
        assert_eq!(IvrPath::lenient("2, 1,x").selections(), ["2", "1"]);
        assert_eq!(IvrPath::lenient(&"1,".repeat(500)).len(), MAX_IVR_SELECTIONS);
        assert_eq!(IvrPath::lenient("123456789,A").selections(), ["A"]);
        assert_eq!(IvrPath::strict("2, 1").map(|p| p.to_string()).as_deref(), Some("2,1"));
        for bad in ["", "2;1", "2,,1", "2,x", "123456789"] {
            assert_eq!(IvrPath::strict(bad), None, "{bad:?}");
        }
        let mut p = IvrPath::strict("2").unwrap();
        p.push_key('1');
        p.push_key('é');
        assert_eq!(p.to_string(), "2,1");
        assert!(p.starts_with(&IvrPath::strict("2").unwrap()) && !p.starts_with(&IvrPath::strict("21").unwrap()));
    }
}
