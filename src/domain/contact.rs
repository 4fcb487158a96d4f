//! How a responder is reached besides its websocket (contract §11): where a
//! SIP MESSAGE to its `sip_uri` goes.

/// The transport a SIP URI asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// Where a MESSAGE to a SIP URI is sent: the URI's host and port (5060, or
/// 5061 for `sips:`/TLS) over the transport its `;transport=` parameter names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipTarget {
    pub host: String,
    pub port: u16,
    pub transport: Transport,
}

impl SipTarget {
    /// `host:port`, with an IPv6 host in brackets.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses `sip:user@host[:port][;params]` (or `sips:`); None when it is not one.
pub fn sip_target(uri: &str) -> Option<SipTarget> {
    let uri = uri.trim();
    let (secure, rest) =
        if let Some(r) = strip_scheme(uri, "sips:") { (true, r) } else { (false, strip_scheme(uri, "sip:")?) };
    let (main, params) = rest.split_once(';').unwrap_or((rest, ""));
    let hostport = main.rsplit_once('@').map_or(main, |(_, h)| h);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        (h, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':')) {
        return None;
    }
    let transport = params
        .split(';')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("transport"))
        .map(|(_, v)| v.trim().to_ascii_lowercase());
    let transport = match (transport.as_deref(), secure) {
        (_, true) | (Some("tls"), _) => Transport::Tls,
        (Some("tcp"), _) => Transport::Tcp,
        (None | Some("udp"), _) => Transport::Udp,
        _ => return None,
    };
    let default = if transport == Transport::Tls { 5061 } else { 5060 };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0)?,
        None => default,
    };
    Some(SipTarget { host: host.to_string(), port, transport })
}

fn strip_scheme<'a>(uri: &'a str, scheme: &str) -> Option<&'a str> {
    uri.get(..scheme.len()).filter(|s| s.eq_ignore_ascii_case(scheme)).map(|_| &uri[scheme.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = sip_target("sip:1001@10.0.0.30").unwrap();
        assert_eq!((t.address(), t.transport), ("10.0.0.30:5060".into(), Transport::Udp));
        let t = sip_target("sip:1001@pbx.example.net:5070;transport=TCP").unwrap();
        assert_eq!((t.address(), t.transport), ("pbx.example.net:5070".into(), Transport::Tcp));
        let t = sip_target("sips:crew@[2001:db8::1]").unwrap();
        assert_eq!((t.address(), t.transport), ("[2001:db8::1]:5061".into(), Transport::Tls));
        for bad in [
            "",
            "tel:+441234",
            "sip:",
            "sip:a@",
            "sip:a@h:0",
            "sip:a@h:99999",
            "sip:a@h;transport=sctp",
            "sip:a@h o",
            "sipé:a@h",
            "sip:a@é",
        ] {
            assert_eq!(sip_target(bad), None, "{bad}");
        }
    }
}
