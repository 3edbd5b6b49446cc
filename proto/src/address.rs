//! Mailboxes, paths and domains (RFC 5321 §4.1.2, §4.5.3.1; RFC 6531 for UTF-8).
//!
//! Parse, don't validate: a [`Mailbox`] exists only if it is syntactically valid and within
//! the length limits (local part 64 octets, domain 255, path 256 including the angle
//! brackets). The original spelling is kept for delivery; [`Domain::folded`] gives the form
//! for comparison (ASCII case-folded; U-labels lower-cased as Unicode).
//!
//! Accepted beyond the strict grammar, because real clients send them and the RFC asks
//! receivers to cope: a source route (`<@relay,@relay2:user@host>`) is parsed and dropped
//! (RFC 5321 §4.1.1.3, appendix C); `<Postmaster>` without a domain is a forward path.
//! UTF-8 in local parts and domains is parsed always; whether it is *allowed* depends on the
//! transaction's SMTPUTF8 parameter, which the server session checks ([`Mailbox::is_ascii`]).
//!
//! DIAGNOSTICS: every failure is an [`AddressError`]; nothing here panics on any input.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// RFC 5321 §4.5.3.1.1.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 §4.5.3.1.2.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 §4.5.3.1.3, including the angle brackets.
pub const MAX_PATH: usize = 256;

/// Why an address did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddressError {
    /// The path is not enclosed in `<` and `>`.
    MissingBrackets,
    /// The local part is not a dot-string or quoted string.
    BadLocalPart,
    /// The domain is not a domain name or address literal.
    BadDomain,
    /// No `@domain` where one is required.
    MissingDomain,
    /// The local part is longer than 64 octets.
    LocalPartTooLong,
    /// The domain is longer than 255 octets.
    DomainTooLong,
    /// The path is longer than 256 octets.
    PathTooLong,
    /// A source route that does not parse.
    BadSourceRoute,
    /// Octets that are not UTF-8.
    NotUtf8,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MissingBrackets => "address must be enclosed in <>",
            Self::BadLocalPart => "bad local part",
            Self::BadDomain => "bad domain",
            Self::MissingDomain => "missing domain",
            Self::LocalPartTooLong => "local part longer than 64 octets",
            Self::DomainTooLong => "domain longer than 255 octets",
            Self::PathTooLong => "path longer than 256 octets",
            Self::BadSourceRoute => "bad source route",
            Self::NotUtf8 => "address is not valid UTF-8",
        })
    }
}

impl std::error::Error for AddressError {}

/// An address literal (RFC 5321 §4.1.3).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AddressLiteral {
    /// `[192.0.2.1]`
    V4(Ipv4Addr),
    /// `[IPv6:2001:db8::1]`
    V6(Ipv6Addr),
    /// `[tag:content]`, a standardized tag this crate does not interpret.
    General {
        /// The tag before the colon.
        tag: String,
        /// The content after it.
        content: String,
    },
}

/// The domain part of a mailbox.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A domain name, in its original spelling.
    Name(String),
    /// An address literal.
    Literal(AddressLiteral),
}

impl Domain {
    /// Parses a domain name or an address literal (in brackets). Used by HELO/EHLO/LHLO
    /// and by mailboxes.
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if s.starts_with('[') {
            return parse_literal(s).map(Self::Literal);
        }
        check_domain_name(s)?;
        Ok(Self::Name(s.to_owned()))
    }

    /// A borrowed view, which carries the comparisons and formatting.
    pub fn as_ref(&self) -> DomainRef<'_> {
        match self {
            Self::Name(n) => DomainRef::Name(n),
            Self::Literal(l) => DomainRef::Literal(l),
        }
    }

    /// The form for comparisons and map lookups: ASCII lower case; U-labels lower-cased as
    /// Unicode; literals in their canonical text form.
    pub fn folded(&self) -> String {
        self.as_ref().folded()
    }

    /// True when the two name the same domain, ignoring case.
    pub fn eq_folded(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Name(a), Self::Name(b)) if a.is_ascii() && b.is_ascii() => {
                a.eq_ignore_ascii_case(b)
            }
            _ => self.folded() == other.folded(),
        }
    }

    /// True when the domain has no octet above 127.
    pub fn is_ascii(&self) -> bool {
        self.as_ref().is_ascii()
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_ref().fmt(f)
    }
}

/// A domain name's length and syntax.
fn check_domain_name(s: &str) -> Result<(), AddressError> {
    if s.len() > MAX_DOMAIN {
        return Err(AddressError::DomainTooLong);
    }
    if s.is_empty() || !valid_domain_name(s) {
        return Err(AddressError::BadDomain);
    }
    Ok(())
}

/// `sub-domain *("." sub-domain)`; an all-ASCII name is checked in one pass over its octets.
fn valid_domain_name(s: &str) -> bool {
    if !s.is_ascii() {
        return s.split('.').all(valid_label);
    }
    let bytes = s.as_bytes();
    let label_ok = |label: &[u8]| {
        (1..=63).contains(&label.len()) && label[0] != b'-' && label[label.len() - 1] != b'-'
    };
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'.' {
            if !label_ok(&bytes[start..i]) {
                return false;
            }
            start = i + 1;
        } else if CLASS[usize::from(b)] & LDH == 0 {
            return false;
        }
    }
    label_ok(&bytes[start..])
}

/// Octet classes for the ASCII fast paths.
const LDH: u8 = 1;
const ATEXT: u8 = 2;

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            t[b] = LDH | ATEXT;
        }
        b += 1;
    }
    t[b'-' as usize] = LDH | ATEXT;
    let specials = b"!#$%&'*+/=?^_`{|}~";
    let mut k = 0;
    while k < specials.len() {
        t[specials[k] as usize] |= ATEXT;
        k += 1;
    }
    t
};

/// A label: `Let-dig [Ldh-str]` (RFC 5321 §4.1.2), or a U-label (RFC 6531 §3.3) which we
/// accept as any run of letters, digits, hyphens and non-ASCII characters not starting or
/// ending with a hyphen.
fn valid_label(label: &str) -> bool {
    if label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-') {
        return false;
    }
    label.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || c == '-'
            || (!c.is_ascii() && !c.is_control() && !c.is_whitespace())
    })
}

fn parse_literal(s: &str) -> Result<AddressLiteral, AddressError> {
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or(AddressError::BadDomain)?;
    if let Some(v6) = strip_prefix_ignore_case(inner, "IPv6:") {
        return v6
            .parse()
            .map(AddressLiteral::V6)
            .map_err(|_| AddressError::BadDomain);
    }
    if let Ok(v4) = inner.parse::<Ipv4Addr>() {
        return Ok(AddressLiteral::V4(v4));
    }
    // General-address-literal = Standardized-tag ":" 1*dcontent (RFC 5321 §4.1.3).
    let (tag, content) = inner.split_once(':').ok_or(AddressError::BadDomain)?;
    let tag_ok = !tag.is_empty()
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !tag.ends_with('-');
    let content_ok = !content.is_empty()
        && content
            .bytes()
            .all(|b| (33..=90).contains(&b) || (94..=126).contains(&b));
    if !tag_ok || !content_ok {
        return Err(AddressError::BadDomain);
    }
    Ok(AddressLiteral::General {
        tag: tag.to_owned(),
        content: content.to_owned(),
    })
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `local-part@domain`, kept as sent in one allocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// `local@domain` as sent (a quoted local part keeps its quotes and escapes).
    text: String,
    /// Where the `@` between local part and domain is.
    at: usize,
    /// The parsed address literal, when the domain is one.
    literal: Option<Box<AddressLiteral>>,
}

/// A view of a mailbox's domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainRef<'a> {
    /// A domain name as sent.
    Name(&'a str),
    /// An address literal.
    Literal(&'a AddressLiteral),
}

impl DomainRef<'_> {
    /// The form for comparisons and map lookups (see [`Domain::folded`]).
    pub fn folded(&self) -> String {
        match self {
            Self::Name(n) if n.is_ascii() => n.to_ascii_lowercase(),
            Self::Name(n) => n.to_lowercase(),
            Self::Literal(_) => self.to_string(),
        }
    }

    /// True when the domain has no octet above 127.
    pub fn is_ascii(&self) -> bool {
        match self {
            Self::Name(n) => n.is_ascii(),
            Self::Literal(AddressLiteral::General { tag, content }) => {
                tag.is_ascii() && content.is_ascii()
            }
            Self::Literal(_) => true,
        }
    }

    /// An owned [`Domain`].
    pub fn to_domain(&self) -> Domain {
        match self {
            Self::Name(n) => Domain::Name((*n).to_owned()),
            Self::Literal(l) => Domain::Literal((*l).clone()),
        }
    }
}

impl fmt::Display for DomainRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Literal(AddressLiteral::V4(a)) => write!(f, "[{a}]"),
            Self::Literal(AddressLiteral::V6(a)) => write!(f, "[IPv6:{a}]"),
            Self::Literal(AddressLiteral::General { tag, content }) => {
                write!(f, "[{tag}:{content}]")
            }
        }
    }
}

impl Mailbox {
    /// Parses `local@domain` (no angle brackets).
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        let at = local_part_end(s)?;
        let domain = s[at..]
            .strip_prefix('@')
            .ok_or(AddressError::MissingDomain)?;
        if at > MAX_LOCAL_PART {
            return Err(AddressError::LocalPartTooLong);
        }
        let literal = if domain.starts_with('[') {
            Some(Box::new(parse_literal(domain)?))
        } else {
            check_domain_name(domain)?;
            None
        };
        Ok(Self {
            text: s.to_owned(),
            at,
            literal,
        })
    }

    /// The local part as sent, quotes included.
    pub fn local_part(&self) -> &str {
        &self.text[..self.at]
    }

    /// The local part with quoting removed (`"john doe"` → `john doe`).
    pub fn local_part_unquoted(&self) -> String {
        let local = self.local_part();
        match local.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            None => local.to_owned(),
            Some(inner) => {
                let mut out = String::with_capacity(inner.len());
                let mut chars = inner.chars();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => out.extend(chars.next()),
                        c => out.push(c),
                    }
                }
                out
            }
        }
    }

    /// The domain as sent.
    pub fn domain(&self) -> DomainRef<'_> {
        match &self.literal {
            Some(l) => DomainRef::Literal(l),
            None => DomainRef::Name(&self.text[self.at + 1..]),
        }
    }

    /// True when neither part has an octet above 127 (no SMTPUTF8 needed).
    pub fn is_ascii(&self) -> bool {
        self.text.is_ascii()
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// RFC 5321 atext, plus UTF-8 under RFC 6531.
fn is_atext(c: char) -> bool {
    match u8::try_from(c) {
        Ok(b) if b.is_ascii() => is_ascii_atext(b),
        _ => !c.is_control() && !c.is_whitespace(),
    }
}

/// RFC 5322 atext for one ASCII octet.
fn is_ascii_atext(b: u8) -> bool {
    CLASS[usize::from(b)] & ATEXT != 0
}

/// A dot-string: atoms of atext separated by single dots, in one pass.
fn is_dot_string(local: &str) -> bool {
    // `previous_dot` starts true so a leading dot (or an empty string) fails.
    let mut previous_dot = true;
    let ok = if local.is_ascii() {
        local.bytes().all(|b| {
            let ok = if b == b'.' {
                !previous_dot
            } else {
                is_ascii_atext(b)
            };
            previous_dot = b == b'.';
            ok
        })
    } else {
        local.chars().all(|c| {
            let ok = if c == '.' { !previous_dot } else { is_atext(c) };
            previous_dot = c == '.';
            ok
        })
    };
    ok && !previous_dot
}

/// Finds the end of the local part at the start of `s` (a dot-string or a quoted string),
/// returning the index of the `@` or end that follows it.
fn local_part_end(s: &str) -> Result<usize, AddressError> {
    if let Some(inner) = s.strip_prefix('"') {
        let mut escaped = false;
        for (i, c) in inner.char_indices() {
            match c {
                _ if escaped => {
                    // quoted-pairSMTP = %d92 %d32-126
                    if !(' '..='~').contains(&c) {
                        return Err(AddressError::BadLocalPart);
                    }
                    escaped = false;
                }
                '\\' => escaped = true,
                '"' => return Ok(i + 2),
                // qtextSMTP = %d32-33 / %d35-91 / %d93-126 / UTF8-non-ascii
                c if (' '..='~').contains(&c) || (!c.is_ascii() && !c.is_control()) => {}
                _ => return Err(AddressError::BadLocalPart),
            }
        }
        return Err(AddressError::BadLocalPart);
    }
    let end = memchr::memchr(b'@', s.as_bytes()).unwrap_or(s.len());
    let local = &s[..end];
    if !is_dot_string(local) {
        return Err(AddressError::BadLocalPart);
    }
    Ok(end)
}

/// The reverse path of MAIL FROM: a mailbox, or the null path `<>` of bounces.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>`: no bounce may be sent for this message (RFC 5321 §4.5.5).
    Null,
    /// A sender mailbox.
    Mailbox(Mailbox),
}

impl ReversePath {
    /// Parses `<>` or `<mailbox>` (a source route is tolerated and dropped).
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if s == "<>" {
            return Ok(Self::Null);
        }
        parse_path(s).map(Self::Mailbox)
    }

    /// The mailbox, unless null.
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            Self::Null => None,
            Self::Mailbox(m) => Some(m),
        }
    }
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => f.write_str("<>"),
            Self::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// The forward path of RCPT TO.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ForwardPath {
    /// `<Postmaster>` with no domain: the local postmaster (RFC 5321 §4.5.1).
    Postmaster,
    /// A recipient mailbox.
    Mailbox(Mailbox),
}

impl ForwardPath {
    /// Parses `<mailbox>` or `<Postmaster>` (any case).
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if s.eq_ignore_ascii_case("<postmaster>") {
            return Ok(Self::Postmaster);
        }
        parse_path(s).map(Self::Mailbox)
    }

    /// The mailbox, unless the domainless postmaster.
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            Self::Postmaster => None,
            Self::Mailbox(m) => Some(m),
        }
    }
}

impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Postmaster => f.write_str("<Postmaster>"),
            Self::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// `"<" [ A-d-l ":" ] Mailbox ">"`.
fn parse_path(s: &str) -> Result<Mailbox, AddressError> {
    if s.len() > MAX_PATH {
        return Err(AddressError::PathTooLong);
    }
    let inner = s
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .ok_or(AddressError::MissingBrackets)?;
    let mailbox = match inner.strip_prefix('@') {
        None => inner,
        Some(_) => {
            // A-d-l = At-domain *( "," At-domain ); the colon ends it. Domains in the route
            // hold no colon (an IPv6 literal would, and is not allowed in a route).
            let (route, mailbox) = inner.split_once(':').ok_or(AddressError::BadSourceRoute)?;
            for hop in route.split(',') {
                let hop = hop.strip_prefix('@').ok_or(AddressError::BadSourceRoute)?;
                Domain::parse(hop).map_err(|_| AddressError::BadSourceRoute)?;
            }
            mailbox
        }
    };
    Mailbox::parse(mailbox)
}

#[cfg(test)]
mod tests;
