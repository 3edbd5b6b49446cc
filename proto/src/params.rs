//! Typed ESMTP parameters of MAIL and RCPT.
//!
//! | parameter | command | RFC |
//! |---|---|---|
//! | `SIZE=n` | MAIL | 1870 |
//! | `BODY=7BIT\|8BITMIME\|BINARYMIME` | MAIL | 6152, 3030 |
//! | `SMTPUTF8` | MAIL | 6531 |
//! | `RET=FULL\|HDRS`, `ENVID=xtext` | MAIL | 3461 |
//! | `REQUIRETLS` | MAIL | 8689 |
//! | `AUTH=<>\|xtext` | MAIL | 4954 §5 |
//! | `NOTIFY=NEVER\|SUCCESS,FAILURE,DELAY`, `ORCPT=type;xtext` | RCPT | 3461 |
//!
//! Parsing is independent of what a server offered: [`MailParams::extensions`] and
//! [`RcptParams::extensions`] say which extensions a parameter set needs, so the session
//! can answer 555 for a parameter of an extension it did not advertise. An unknown keyword
//! is [`ParamError::Unknown`] (555 5.5.4), a bad value or a repeated keyword
//! [`ParamError::BadValue`]/[`ParamError::Duplicate`] (501 5.5.4). [`fmt::Display`] writes the
//! wire form back, each parameter preceded by a space, so the client side can relay what the
//! server side received.

use std::fmt;

use nom::bytes::complete::{take_while, take_while1};
use nom::character::complete::char;
use nom::combinator::{all_consuming, opt};
use nom::sequence::preceded;
use nom::{IResult, Parser};

/// RFC 3461 §4.4: ENVID is at most 100 characters.
pub const MAX_ENVID: usize = 100;
/// RFC 3461 §4.2: ORCPT is at most 500 characters.
pub const MAX_ORCPT: usize = 500;

/// Why a parameter list did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParamError {
    /// A keyword this server does not know (reply 555).
    Unknown(String),
    /// A known keyword with a malformed value (reply 501).
    BadValue(&'static str),
    /// The same keyword twice (reply 501).
    Duplicate(&'static str),
    /// Not `keyword[=value]` at all (reply 501).
    Syntax,
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(k) => write!(f, "unsupported parameter {k}"),
            Self::BadValue(k) => write!(f, "bad value for parameter {k}"),
            Self::Duplicate(k) => write!(f, "duplicate parameter {k}"),
            Self::Syntax => f.write_str("malformed parameters"),
        }
    }
}

impl std::error::Error for ParamError {}

/// A service extension a parameter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Extension {
    /// RFC 1870.
    Size,
    /// RFC 6152 (BODY=8BITMIME and BODY=7BIT).
    EightBitMime,
    /// RFC 3030 (BODY=BINARYMIME).
    BinaryMime,
    /// RFC 6531.
    SmtpUtf8,
    /// RFC 3461.
    Dsn,
    /// RFC 8689.
    RequireTls,
    /// RFC 4954.
    Auth,
}

/// BODY= (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Body {
    /// `7BIT`
    SevenBit,
    /// `8BITMIME`
    EightBitMime,
    /// `BINARYMIME`: only with BDAT.
    BinaryMime,
}

/// RET= (RFC 3461 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    /// Return the full message in a DSN.
    Full,
    /// Return only the headers.
    Headers,
}

/// NOTIFY= (RFC 3461 §4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Notify {
    /// `NEVER`: no DSN at all; exclusive of the others.
    pub never: bool,
    /// `SUCCESS`
    pub success: bool,
    /// `FAILURE`
    pub failure: bool,
    /// `DELAY`
    pub delay: bool,
}

/// ORCPT= (RFC 3461 §4.2): the original recipient, decoded from xtext.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Orcpt {
    /// `rfc822` or `utf-8` (RFC 6533), as sent.
    pub addr_type: String,
    /// The address, xtext-decoded.
    pub address: String,
}

/// MAIL FROM parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MailParams {
    /// Declared message size.
    pub size: Option<u64>,
    /// Declared body type.
    pub body: Option<Body>,
    /// The message needs SMTPUTF8 end to end.
    pub smtputf8: bool,
    /// DSN return content.
    pub ret: Option<Ret>,
    /// DSN envelope id, xtext-decoded.
    pub envid: Option<String>,
    /// The message must travel over TLS only.
    pub requiretls: bool,
    /// AUTH= mailbox, xtext-decoded; `Some("<>")` for the unknown submitter.
    pub auth: Option<String>,
}

/// RCPT TO parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RcptParams {
    /// DSN conditions.
    pub notify: Option<Notify>,
    /// Original recipient.
    pub orcpt: Option<Orcpt>,
}

/// Splits a parameter string into `(keyword, value)` pairs with nom:
/// `esmtp-param *(SP esmtp-param)`, `esmtp-keyword ["=" esmtp-value]` (RFC 5321 §4.1.2).
fn split_params(input: &str) -> Result<Vec<(&str, Option<&str>)>, ParamError> {
    fn param(i: &str) -> IResult<&str, (&str, Option<&str>)> {
        let keyword = take_while1(|c: char| c.is_ascii_alphanumeric() || c == '-');
        // esmtp-value = 1*(%d33-60 / %d62-126), plus UTF-8 under RFC 6531.
        let value = take_while1(|c: char| (c > ' ' && c != '=' && c != '\x7f') || !c.is_ascii());
        (keyword, opt(preceded(char('='), value))).parse(i)
    }
    let mut out = Vec::new();
    if input.is_empty() {
        return Ok(out);
    }
    for word in input.split(' ').filter(|w| !w.is_empty()) {
        let (_, p) = all_consuming(param)
            .parse(word)
            .map_err(|_| ParamError::Syntax)?;
        out.push(p);
    }
    Ok(out)
}

impl MailParams {
    /// Parses the parameters after `MAIL FROM:<…>`.
    pub fn parse(input: &str) -> Result<Self, ParamError> {
        let mut p = Self::default();
        let mut seen = Vec::new();
        for (key, value) in split_params(input)? {
            const KEYWORDS: [&str; 7] = [
                "SIZE",
                "BODY",
                "SMTPUTF8",
                "RET",
                "ENVID",
                "REQUIRETLS",
                "AUTH",
            ];
            let Some(name) = KEYWORDS.into_iter().find(|k| k.eq_ignore_ascii_case(key)) else {
                return Err(ParamError::Unknown(key.to_owned()));
            };
            // A repeated flag without a value says the same thing twice (Python's smtplib
            // adds SMTPUTF8 itself when the caller already did); anything else repeated is
            // ambiguous and refused.
            let repeated_flag = value.is_none() && matches!(name, "SMTPUTF8" | "REQUIRETLS");
            if seen.contains(&name) && !repeated_flag {
                return Err(ParamError::Duplicate(name));
            }
            seen.push(name);
            match (name, value) {
                ("SIZE", Some(v)) => p.size = Some(number(v).ok_or(ParamError::BadValue(name))?),
                ("BODY", Some(v)) => {
                    p.body = Some(match v {
                        v if v.eq_ignore_ascii_case("7BIT") => Body::SevenBit,
                        v if v.eq_ignore_ascii_case("8BITMIME") => Body::EightBitMime,
                        v if v.eq_ignore_ascii_case("BINARYMIME") => Body::BinaryMime,
                        _ => return Err(ParamError::BadValue(name)),
                    })
                }
                ("SMTPUTF8", None) => p.smtputf8 = true,
                ("REQUIRETLS", None) => p.requiretls = true,
                ("RET", Some(v)) => {
                    p.ret = Some(match v {
                        v if v.eq_ignore_ascii_case("FULL") => Ret::Full,
                        v if v.eq_ignore_ascii_case("HDRS") => Ret::Headers,
                        _ => return Err(ParamError::BadValue(name)),
                    })
                }
                ("ENVID", Some(v)) => {
                    let id = xtext_decode(v).ok_or(ParamError::BadValue(name))?;
                    if xtext_encoded_len(&id) > MAX_ENVID {
                        return Err(ParamError::BadValue(name));
                    }
                    p.envid = Some(id);
                }
                ("AUTH", Some(v)) => {
                    p.auth = Some(xtext_decode(v).ok_or(ParamError::BadValue(name))?)
                }
                _ => return Err(ParamError::BadValue(name)),
            }
        }
        Ok(p)
    }

    /// The extensions these parameters need the server to have offered.
    pub fn extensions(&self) -> Vec<Extension> {
        let mut out = Vec::new();
        if self.size.is_some() {
            out.push(Extension::Size);
        }
        match self.body {
            Some(Body::BinaryMime) => out.push(Extension::BinaryMime),
            Some(_) => out.push(Extension::EightBitMime),
            None => {}
        }
        if self.smtputf8 {
            out.push(Extension::SmtpUtf8);
        }
        if self.ret.is_some() || self.envid.is_some() {
            out.push(Extension::Dsn);
        }
        if self.requiretls {
            out.push(Extension::RequireTls);
        }
        if self.auth.is_some() {
            out.push(Extension::Auth);
        }
        out
    }
}

impl fmt::Display for MailParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(size) = self.size {
            write!(f, " SIZE={size}")?;
        }
        match self.body {
            Some(Body::SevenBit) => f.write_str(" BODY=7BIT")?,
            Some(Body::EightBitMime) => f.write_str(" BODY=8BITMIME")?,
            Some(Body::BinaryMime) => f.write_str(" BODY=BINARYMIME")?,
            None => {}
        }
        if self.smtputf8 {
            f.write_str(" SMTPUTF8")?;
        }
        match self.ret {
            Some(Ret::Full) => f.write_str(" RET=FULL")?,
            Some(Ret::Headers) => f.write_str(" RET=HDRS")?,
            None => {}
        }
        if let Some(envid) = &self.envid {
            write!(f, " ENVID={}", xtext_encode(envid))?;
        }
        if self.requiretls {
            f.write_str(" REQUIRETLS")?;
        }
        if let Some(auth) = &self.auth {
            write!(f, " AUTH={}", xtext_encode(auth))?;
        }
        Ok(())
    }
}

impl RcptParams {
    /// Parses the parameters after `RCPT TO:<…>`.
    pub fn parse(input: &str) -> Result<Self, ParamError> {
        let mut p = Self::default();
        for (key, value) in split_params(input)? {
            match (key.to_ascii_uppercase().as_str(), value) {
                ("NOTIFY", _) if p.notify.is_some() => return Err(ParamError::Duplicate("NOTIFY")),
                ("ORCPT", _) if p.orcpt.is_some() => return Err(ParamError::Duplicate("ORCPT")),
                ("NOTIFY", Some(v)) => {
                    p.notify = Some(parse_notify(v).ok_or(ParamError::BadValue("NOTIFY"))?)
                }
                ("ORCPT", Some(v)) => {
                    p.orcpt = Some(parse_orcpt(v).ok_or(ParamError::BadValue("ORCPT"))?)
                }
                ("NOTIFY", None) => return Err(ParamError::BadValue("NOTIFY")),
                ("ORCPT", None) => return Err(ParamError::BadValue("ORCPT")),
                _ => return Err(ParamError::Unknown(key.to_owned())),
            }
        }
        Ok(p)
    }

    /// The extensions these parameters need the server to have offered.
    pub fn extensions(&self) -> Vec<Extension> {
        if self.notify.is_some() || self.orcpt.is_some() {
            vec![Extension::Dsn]
        } else {
            Vec::new()
        }
    }
}

impl fmt::Display for RcptParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = self.notify {
            f.write_str(" NOTIFY=")?;
            if n.never {
                f.write_str("NEVER")?;
            } else {
                let words = [
                    (n.success, "SUCCESS"),
                    (n.failure, "FAILURE"),
                    (n.delay, "DELAY"),
                ];
                let list: Vec<&str> = words
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, w)| *w)
                    .collect();
                f.write_str(&list.join(","))?;
            }
        }
        if let Some(o) = &self.orcpt {
            write!(f, " ORCPT={};{}", o.addr_type, xtext_encode(&o.address))?;
        }
        Ok(())
    }
}

fn number(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn parse_notify(v: &str) -> Option<Notify> {
    let mut n = Notify::default();
    for word in v.split(',') {
        let flag = match word.to_ascii_uppercase().as_str() {
            "NEVER" => &mut n.never,
            "SUCCESS" => &mut n.success,
            "FAILURE" => &mut n.failure,
            "DELAY" => &mut n.delay,
            _ => return None,
        };
        if *flag {
            return None;
        }
        *flag = true;
    }
    // NEVER excludes the others (RFC 3461 §4.1).
    if n.never && (n.success || n.failure || n.delay) {
        return None;
    }
    Some(n)
}

fn parse_orcpt(v: &str) -> Option<Orcpt> {
    if v.len() > MAX_ORCPT {
        return None;
    }
    let (addr_type, rest) = v.split_once(';')?;
    let type_ok: IResult<&str, &str> =
        all_consuming(take_while1(|c: char| c.is_ascii_alphanumeric() || c == '-'))
            .parse(addr_type);
    type_ok.ok()?;
    let address = xtext_decode(rest)?;
    if address.is_empty() {
        return None;
    }
    // The limit holds for the form we send on (`+XX` for every non-ASCII octet), which can be
    // longer than raw UTF-8 received: refuse what we could not pass on within it.
    if addr_type.len() + 1 + xtext_encoded_len(&address) > MAX_ORCPT {
        return None;
    }
    Some(Orcpt {
        addr_type: addr_type.to_owned(),
        address,
    })
}

/// Decodes xtext (RFC 3461 §4): `+XX` is the octet with hex value XX; other characters
/// stand for themselves. UTF-8 passes through (RFC 6533's utf-8-addr-xtext is a superset).
pub fn xtext_decode(v: &str) -> Option<String> {
    let mut out = Vec::with_capacity(v.len());
    let mut rest = v.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'+' {
            let hex: IResult<&[u8], &[u8]> =
                take_while(|c: u8| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()).parse(tail);
            let (_, digits) = hex.ok()?;
            let pair = digits.get(..2)?;
            out.push(u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?);
            rest = &tail[2..];
        } else if b == b'=' || b < b'!' || b == 0x7f {
            return None;
        } else {
            out.push(b);
            rest = tail;
        }
    }
    String::from_utf8(out).ok()
}

/// An octet xtext carries as itself (others become `+XX`).
fn xtext_plain(b: u8) -> bool {
    (b'!'..=b'~').contains(&b) && b != b'+' && b != b'='
}

/// The length of [`xtext_encode`]`(v)`.
fn xtext_encoded_len(v: &str) -> usize {
    v.bytes().map(|b| if xtext_plain(b) { 1 } else { 3 }).sum()
}

/// Encodes xtext: `+`, `=`, controls, space and non-ASCII become `+XX`.
pub fn xtext_encode(v: &str) -> String {
    let mut out = String::with_capacity(xtext_encoded_len(v));
    for b in v.bytes() {
        if xtext_plain(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orcpt_limit_holds_for_the_encoded_form() {
        // 200 two-octet characters: 400 octets raw, 1,200 as xtext.
        let long = format!("ORCPT=rfc822;{}@x", "\u{25a}".repeat(200));
        assert_eq!(RcptParams::parse(&long), Err(ParamError::BadValue("ORCPT")));
        let fits = format!("ORCPT=rfc822;{}@x", "\u{25a}".repeat(80));
        let p = RcptParams::parse(&fits).unwrap();
        let printed = p.to_string();
        assert!(printed.len() <= MAX_ORCPT + " ORCPT=".len(), "{printed}");
        assert_eq!(RcptParams::parse(printed.trim_start()), Ok(p));
    }

    #[test]
    fn mail_params_table() {
        let p = MailParams::parse(
            "SIZE=1234 body=8bitmime SMTPUTF8 RET=HDRS ENVID=QQ+2B314 REQUIRETLS AUTH=<>",
        )
        .unwrap();
        assert_eq!(p.size, Some(1234));
        assert_eq!(p.body, Some(Body::EightBitMime));
        assert!(p.smtputf8 && p.requiretls);
        assert_eq!(p.ret, Some(Ret::Headers));
        assert_eq!(p.envid.as_deref(), Some("QQ+314"));
        assert_eq!(p.auth.as_deref(), Some("<>"));
        assert_eq!(MailParams::parse("").unwrap(), MailParams::default());
        assert!(
            MailParams::parse("SMTPUTF8 SMTPUTF8").unwrap().smtputf8,
            "a repeated flag is harmless"
        );
        assert_eq!(
            MailParams::parse("BODY=BINARYMIME").unwrap().body,
            Some(Body::BinaryMime)
        );

        let bad: &[(&str, ParamError)] = &[
            ("FOO=bar", ParamError::Unknown("FOO".into())),
            ("XFORWARD", ParamError::Unknown("XFORWARD".into())),
            ("SIZE=abc", ParamError::BadValue("SIZE")),
            ("SIZE=", ParamError::Syntax),
            ("SIZE", ParamError::BadValue("SIZE")),
            ("SIZE=123456789012345678901", ParamError::BadValue("SIZE")),
            ("BODY=9BIT", ParamError::BadValue("BODY")),
            ("SMTPUTF8=yes", ParamError::BadValue("SMTPUTF8")),
            ("RET=ALL", ParamError::BadValue("RET")),
            ("ENVID=a+zz", ParamError::BadValue("ENVID")),
            ("SIZE=1 SIZE=2", ParamError::Duplicate("SIZE")),
            (
                "SMTPUTF8 BODY=7BIT BODY=7BIT",
                ParamError::Duplicate("BODY"),
            ),
            ("=x", ParamError::Syntax),
            ("SIZE=1=2", ParamError::Syntax),
        ];
        for (input, err) in bad {
            assert_eq!(MailParams::parse(input).as_ref(), Err(err), "{input}");
        }
        let long_envid = format!("ENVID={}", "a".repeat(101));
        assert_eq!(
            MailParams::parse(&long_envid),
            Err(ParamError::BadValue("ENVID"))
        );
    }

    #[test]
    fn rcpt_params_table() {
        let p = RcptParams::parse("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+40example.org").unwrap();
        let n = p.notify.unwrap();
        assert!(n.success && n.failure && !n.delay && !n.never);
        let o = p.orcpt.unwrap();
        assert_eq!(
            (o.addr_type.as_str(), o.address.as_str()),
            ("rfc822", "bob@example.org")
        );
        assert!(
            RcptParams::parse("NOTIFY=NEVER")
                .unwrap()
                .notify
                .unwrap()
                .never
        );
        for bad in [
            "NOTIFY=NEVER,SUCCESS",
            "NOTIFY=SOMETIMES",
            "NOTIFY=DELAY,DELAY",
            "ORCPT=bob",
            "ORCPT=rfc822;",
            "ORCPT=r f;x",
            "NOTIFY",
        ] {
            assert!(
                matches!(
                    RcptParams::parse(bad),
                    Err(ParamError::BadValue(_) | ParamError::Syntax)
                ),
                "{bad}"
            );
        }
        assert_eq!(
            RcptParams::parse("SIZE=1"),
            Err(ParamError::Unknown("SIZE".into()))
        );
        assert_eq!(
            RcptParams::parse("NOTIFY=NEVER NOTIFY=NEVER"),
            Err(ParamError::Duplicate("NOTIFY"))
        );
    }

    #[test]
    fn round_trip_display() {
        let inputs = [
            " SIZE=10 BODY=BINARYMIME SMTPUTF8 RET=FULL ENVID=a+2Bb+3Dc REQUIRETLS AUTH=joe@x",
            " BODY=7BIT",
            "",
        ];
        for input in inputs {
            let p = MailParams::parse(input).unwrap();
            assert_eq!(p.to_string(), input);
        }
        for input in [
            " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a+2Bb@x",
            " NOTIFY=NEVER",
            "",
        ] {
            assert_eq!(RcptParams::parse(input).unwrap().to_string(), input);
        }
    }

    #[test]
    fn xtext() {
        assert_eq!(xtext_decode("a+2Bb").as_deref(), Some("a+b"));
        assert_eq!(xtext_decode("+2b"), None);
        assert_eq!(xtext_decode("+2"), None);
        assert_eq!(xtext_decode("a=b"), None);
        assert_eq!(xtext_decode("+FF"), None, "not UTF-8");
        for s in ["plain", "with space", "a+b=c", "ünïcode", ""] {
            assert_eq!(xtext_decode(&xtext_encode(s)).as_deref(), Some(s));
        }
    }

    #[test]
    fn extensions_needed() {
        let p = MailParams::parse("SIZE=1 BODY=8BITMIME ENVID=x").unwrap();
        assert_eq!(
            p.extensions(),
            vec![Extension::Size, Extension::EightBitMime, Extension::Dsn]
        );
        assert_eq!(
            RcptParams::parse("NOTIFY=NEVER").unwrap().extensions(),
            vec![Extension::Dsn]
        );
    }
}
