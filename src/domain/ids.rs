//! Identifiers: incident ids as people read them aloud, and the forms of a
//! caller's number allowed outside the record (contract §7).

use hmac::{KeyInit, Mac};

/// Crockford base32: no I, L, O, U, so an id read aloud is hard to mishear.
pub const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Crockford's check symbols (value mod 37).
pub const CHECK: &[u8; 37] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ*~$=U";

/// `INC-` + the sequence number in Crockford base32 (at least 4 symbols) + a check symbol.
/// The sequence comes from one Redis counter, so ids are unique across daemons.
/// The same function is implemented in `store/scripts/intake.lua`; `tests/store_rules.rs` pins both.
pub fn incident_id(seq: u64) -> String {
    let mut digits = Vec::new();
    let mut n = seq;
    loop {
        digits.push(CROCKFORD[(n % 32) as usize]);
        n /= 32;
        if n == 0 {
            break;
        }
    }
    while digits.len() < 4 {
        digits.push(b'0');
    }
    digits.reverse();
    let mut s = String::from("INC-");
    s.extend(digits.iter().map(|&b| b as char));
    s.push(CHECK[(seq % 37) as usize] as char);
    s
}

/// Normalises an id typed or heard by a person: case-insensitive, `O`→`0`,
/// `I`/`L`→`1`, dashes and spaces ignored; checks the check symbol.
/// Returns the canonical id, or None when it cannot be one.
pub fn normalize_id(input: &str) -> Option<String> {
    let mut s: String =
        input.chars().filter(|c| !c.is_whitespace() && *c != '-').map(|c| c.to_ascii_uppercase()).collect();
    if let Some(rest) = s.strip_prefix("INC") {
        s = rest.to_string();
    }
    // Ids are ASCII: anything else (an accented letter, a zero-width space
    // pasted with the id) is not one, and is never split inside a character.
    if !s.is_ascii() || s.len() < 5 || s.len() > 14 {
        return None;
    }
    let (body, check) = s.split_at(s.len() - 1);
    let mut seq: u64 = 0;
    for c in body.chars() {
        let c = match c {
            'O' => '0',
            'I' | 'L' => '1',
            c => c,
        };
        let v = CROCKFORD.iter().position(|&b| b as char == c)? as u64;
        seq = seq.checked_mul(32)?.checked_add(v)?;
    }
    let id = incident_id(seq);
    id.ends_with(check).then_some(id)
}

// ---- caller data (contract §7) ---------------------------------------------

/// `HMAC-SHA256(caller_key, number)`, hex, first 16 characters: the only form
/// of a caller number allowed in logs and metrics.
pub fn pseudonym(caller_key: &str, number: &str) -> String {
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(caller_key.as_bytes()) else {
        return String::new();
    };
    mac.update(number.as_bytes());
    let out = mac.finalize().into_bytes();
    let mut h = hex::encode(out);
    h.truncate(16);
    h
}

/// The form responders see: every character but the last three replaced by `•`.
pub fn mask(number: &str) -> String {
    let n = number.chars().count();
    number.chars().enumerate().map(|(i, c)| if i + 3 < n { '•' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_round_trip() {
        assert_eq!(incident_id(1), "INC-00011");
        for seq in [0u64, 1, 31, 32, 1023, 1_048_575, 1_048_576, 987_654_321] {
            let id = incident_id(seq);
            assert_eq!(normalize_id(&id).as_deref(), Some(id.as_str()));
            assert_eq!(normalize_id(&id.to_lowercase()).as_deref(), Some(id.as_str()));
        }
        assert_eq!(incident_id(1_048_575).len(), "INC-ZZZZ".len() + 1);
    }

    #[test]
    fn misheard_ids_normalise_or_fail_the_check() {
        let id = incident_id(40); // INC-0018 + check
        let spoken = id.replace('0', "o").replace('1', "l");
        assert_eq!(normalize_id(&spoken).as_deref(), Some(id.as_str()));
        // A wrong symbol breaks the check symbol.
        let mut wrong = id.clone().into_bytes();
        wrong[6] = b'9';
        assert_eq!(normalize_id(std::str::from_utf8(&wrong).unwrap()), None);
        assert_eq!(normalize_id("INC-"), None);
        for hostile in ["0000é", "INC-0001\u{200b}", "é", "INC-ÉÉÉÉÉ", "\u{1F6A8}\u{1F6A8}", "00000\u{0301}"] {
            assert_eq!(normalize_id(hostile), None, "{hostile:?}");
        }
        assert_eq!(normalize_id("../../etc/passwd"), None);
    }

    #[test]
    fn caller_is_masked_and_pseudonymised() {
        assert_eq!(mask("+442071234890"), "••••••••••890");
        assert_eq!(mask("12"), "12");
        let p = pseudonym("k", "+442071234890");
        assert_eq!(p.len(), 16);
        assert_ne!(p, pseudonym("other", "+442071234890"));
        assert!(!p.contains("890"));
    }
}
