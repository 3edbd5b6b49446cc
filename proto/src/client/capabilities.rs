//! The server's LHLO/EHLO keywords, typed (RFC 5321 §4.1.1.1, RFC 2033 §4.1).
//!
//! Keywords are matched case-insensitively; a keyword postern does not know is kept verbatim in
//! [`Capabilities::other`] (Cyrus sends `IGNOREQUOTA` and ends its reply with
//! `Ok SESSIONID=<…>`, which lands there too). The first line of the reply is the server's
//! name and greeting, never a keyword.

use crate::reply::Reply;

/// What the server advertised in its 250 reply to LHLO or EHLO (empty after HELO).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `PIPELINING` (RFC 2920): MAIL, RCPT and DATA may be written in one flush.
    pub pipelining: bool,
    /// `CHUNKING` (RFC 3030): BDAT may replace DATA.
    pub chunking: bool,
    /// `SIZE` (RFC 1870): `None` if not advertised, `Some(None)` if advertised without a
    /// limit (no value, 0, or a value that is not a number), `Some(Some(n))` for a limit of `n`.
    pub size: Option<Option<u64>>,
    /// `8BITMIME` (RFC 6152).
    pub eight_bit_mime: bool,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `ENHANCEDSTATUSCODES` (RFC 2034).
    pub enhanced_status_codes: bool,
    /// `STARTTLS` (RFC 3207).
    pub starttls: bool,
    /// `DSN` (RFC 3461).
    pub dsn: bool,
    /// `BINARYMIME` (RFC 3030).
    pub binarymime: bool,
    /// `AUTH` mechanisms (RFC 4954), upper-case, in the server's order, without duplicates.
    pub auth: Vec<String>,
    /// Lines with keywords not listed above, verbatim.
    pub other: Vec<String>,
}

impl Capabilities {
    /// Reads the keyword lines of a 250 reply to LHLO or EHLO.
    pub fn from_reply(reply: &Reply) -> Self {
        let mut caps = Self::default();
        for line in reply.lines().iter().skip(1) {
            caps.add_line(line);
        }
        caps
    }

    /// Whether a keyword not listed above (a private `X` one, say) was advertised, in any
    /// case, with or without parameters.
    pub fn offers(&self, keyword: &str) -> bool {
        self.other.iter().any(|line| {
            line.split_ascii_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }

    /// Whether `mechanism` (any case) was advertised with AUTH.
    pub fn supports_auth(&self, mechanism: &str) -> bool {
        self.auth.iter().any(|m| m.eq_ignore_ascii_case(mechanism))
    }

    fn add_line(&mut self, line: &str) {
        let mut words = line.split_ascii_whitespace();
        let Some(keyword) = words.next() else {
            return;
        };
        match keyword.to_ascii_uppercase().as_str() {
            "PIPELINING" => self.pipelining = true,
            "CHUNKING" => self.chunking = true,
            "SIZE" => {
                let limit = words.next().and_then(|v| v.parse::<u64>().ok());
                self.size = Some(limit.filter(|&n| n > 0));
            }
            "8BITMIME" => self.eight_bit_mime = true,
            "SMTPUTF8" => self.smtputf8 = true,
            "ENHANCEDSTATUSCODES" => self.enhanced_status_codes = true,
            "STARTTLS" => self.starttls = true,
            "DSN" => self.dsn = true,
            "BINARYMIME" => self.binarymime = true,
            "AUTH" => self.add_mechanisms(words),
            // Pre-RFC 4954 servers also send `AUTH=LOGIN PLAIN`.
            k if k.starts_with("AUTH=") => {
                self.add_mechanisms(keyword.get(5..).into_iter().chain(words));
            }
            _ => self.other.push(line.to_owned()),
        }
    }

    fn add_mechanisms<'a>(&mut self, mechanisms: impl Iterator<Item = &'a str>) {
        for m in mechanisms {
            if !m.is_empty() && !self.supports_auth(m) {
                self.auth.push(m.to_ascii_uppercase());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::ReplyCode;

    fn caps(lines: &[&str]) -> Capabilities {
        let code = ReplyCode::new(250).unwrap();
        Capabilities::from_reply(&Reply::with_lines(
            code,
            None,
            lines.iter().map(|l| l.to_string()),
        ))
    }

    #[test]
    fn cyrus_lhlo() {
        let c = caps(&[
            "localhost",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "PIPELINING",
            "SIZE",
            "AUTH EXTERNAL",
            "IGNOREQUOTA",
            "Ok SESSIONID=<cyrus-1>",
        ]);
        let want = Capabilities {
            pipelining: true,
            size: Some(None),
            eight_bit_mime: true,
            enhanced_status_codes: true,
            auth: vec!["EXTERNAL".into()],
            other: vec!["IGNOREQUOTA".into(), "Ok SESSIONID=<cyrus-1>".into()],
            ..Capabilities::default()
        };
        assert_eq!(c, want);
    }

    #[test]
    fn dovecot_lhlo() {
        let c = caps(&[
            "localhost",
            "8BITMIME",
            "CHUNKING",
            "ENHANCEDSTATUSCODES",
            "PIPELINING",
        ]);
        assert!(c.pipelining && c.chunking && c.eight_bit_mime && c.enhanced_status_codes);
        assert_eq!(c.size, None);
        assert!(c.auth.is_empty() && c.other.is_empty());
    }

    #[test]
    fn keywords_any_case_and_values() {
        let c = caps(&[
            "mx.example.org Hello",
            "size 35882577",
            "Starttls",
            "dsn",
            "smtputf8",
            "BinaryMime",
            "AUTH plain LOGIN",
            "AUTH=LOGIN CRAM-MD5",
            "X-UNKNOWN 1 2",
        ]);
        assert_eq!(c.size, Some(Some(35_882_577)));
        assert!(c.starttls && c.dsn && c.smtputf8 && c.binarymime);
        assert_eq!(c.auth, ["PLAIN", "LOGIN", "CRAM-MD5"]);
        assert!(c.supports_auth("plain"));
        assert!(!c.supports_auth("EXTERNAL"));
        assert_eq!(c.other, ["X-UNKNOWN 1 2"]);
    }

    #[test]
    fn size_without_limit() {
        for line in ["SIZE", "SIZE 0", "SIZE lots"] {
            assert_eq!(caps(&["mx", line]).size, Some(None), "{line}");
        }
    }

    #[test]
    fn first_line_is_not_a_keyword() {
        assert_eq!(caps(&["PIPELINING"]), Capabilities::default());
    }
}
