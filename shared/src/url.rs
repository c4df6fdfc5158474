//! Where a broker is: the one grammar for `mqtt://` and `mqtts://` addresses, read by the
//! agent (`broker = …`), the HQ broker's external mode (`external.broker`) and the tools.
//!
//! `mqtt://HOST[:PORT]` (port 1883; also `tcp://…` or a bare `HOST[:PORT]`) or
//! `mqtts://HOST[:PORT]` (port 8883; also `ssl://…`, `tls://…`); an IPv6 host in brackets
//! (`mqtt://[::1]:1884`); one trailing `/` is allowed. No user, path or query: credentials
//! are configured apart, where they can be kept out of logs.

use std::fmt;

/// Port of an `mqtt://` address without one.
pub const MQTT_PORT: u16 = 1883;
/// Port of an `mqtts://` address without one.
pub const MQTTS_PORT: u16 = 8883;

/// A broker's network address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: MQTT over TLS.
    pub tls: bool,
}

/// Why text is not a broker address; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?}: {why}")]
pub struct UrlError {
    pub text: String,
    pub why: &'static str,
}

impl BrokerUrl {
    /// Parses an address in the grammar of the module docs.
    pub fn parse(text: &str) -> Result<BrokerUrl, UrlError> {
        let error = |why| UrlError {
            text: text.to_owned(),
            why,
        };
        let (rest, tls) = match text.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (rest, false),
            Some(("mqtts" | "ssl" | "tls", rest)) => (rest, true),
            Some(_) => return Err(error("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")),
            None => (text, false),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        // "[::1]:1883" for IPv6, else "host:port" or "host".
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| error("unclosed '[' in an IPv6 address"))?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| error("expected :PORT after the IPv6 address"))?,
                    ),
                ),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(error("no host"));
        }
        if host.contains(['/', '@', '?', '[', ']'])
            || (!rest.starts_with('[') && host.contains(':'))
        {
            return Err(error(
                "expected mqtt://HOST[:PORT], with no user, path or query",
            ));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| error("the port must be 1–65535"))?,
            None if tls => MQTTS_PORT,
            None => MQTT_PORT,
        };
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<BrokerUrl, UrlError> {
        BrokerUrl::parse(text)
    }
}

impl fmt::Display for BrokerUrl {
    /// The address as it parses back: `mqtt://host:port`, IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(host: &str, port: u16, tls: bool) -> BrokerUrl {
        BrokerUrl {
            host: host.into(),
            port,
            tls,
        }
    }

    #[test]
    fn every_spelling_in_use_parses_and_prints_back() {
        let ok = [
            ("mqtt://hq:1884", url("hq", 1884, false)),
            ("mqtt://hq", url("hq", 1883, false)),
            ("mqtt://localhost", url("localhost", 1883, false)),
            ("tcp://10.0.0.1:1884", url("10.0.0.1", 1884, false)),
            ("hq.example:2000", url("hq.example", 2000, false)),
            ("hq.example", url("hq.example", 1883, false)),
            ("mqtt://[::1]:1885/", url("::1", 1885, false)),
            ("mqtt://[::1]", url("::1", 1883, false)),
            ("mqtts://hq:8884", url("hq", 8884, true)),
            ("mqtts://hq/", url("hq", 8883, true)),
            ("mqtts://[::1]", url("::1", 8883, true)),
            ("ssl://[::1]:9883", url("::1", 9883, true)),
            ("tls://hq:8883", url("hq", 8883, true)),
        ];
        for (text, expected) in ok {
            let parsed = BrokerUrl::parse(text);
            assert_eq!(parsed, Ok(expected.clone()), "{text}");
            assert_eq!(
                BrokerUrl::parse(&expected.to_string()),
                Ok(expected),
                "{text}"
            );
        }
    }

    #[test]
    fn what_is_not_an_address_is_refused_with_why() {
        for bad in [
            "mqtts://",
            "mqtt://",
            "mqtt://hq:port",
            "mqtt://hq:0",
            "mqtt://hq:70000",
            "mqtt://u:p@hq",
            "mqtt://hq/path",
            "mqtt://hq?x=1",
            "http://hq",
            "mqtt://[::1",
            "mqtt://[::1]x",
            "mqtt://::1",
            "",
        ] {
            let error = BrokerUrl::parse(bad).expect_err(bad);
            assert_eq!(error.text, bad);
            assert!(!error.why.is_empty());
        }
    }
}
