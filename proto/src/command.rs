//! Commands: one line in, one typed [`Command`] or a [`CommandError`] that knows its reply.
//!
//! Verbs are case-insensitive (RFC 5321 §2.4). Covered: HELO, EHLO, MAIL, RCPT, DATA, RSET,
//! NOOP, QUIT, VRFY, HELP (RFC 5321 §4.1.1), LHLO (RFC 2033 §4.1), BDAT (RFC 3030 §2),
//! STARTTLS (RFC 3207 §4), AUTH (RFC 4954 §4). EXPN, TURN, ETRN and ATRN are recognised
//! and refused as not implemented (502); anything else is unknown (500).
//!
//! Tolerated beyond the grammar, as Postfix does: a space after `MAIL FROM:`/`RCPT TO:`,
//! and runs of spaces between arguments. Not tolerated: a path without angle brackets.
//!
//! Formatting ([`fmt::Display`]) writes the canonical wire form without CRLF, so the client
//! side writes commands through the same type the server side parses.

use std::fmt;

use nom::bytes::complete::{tag_no_case, take_while1};
use nom::character::complete::{char, digit1, space0, space1};
use nom::combinator::{all_consuming, opt, rest};
use nom::sequence::preceded;
use nom::{IResult, Parser};

use crate::address::{AddressError, Domain, ForwardPath, ReversePath};
use crate::params::{MailParams, ParamError, RcptParams};
use crate::replies;
use crate::reply::Reply;

/// One SMTP or LMTP command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `HELO domain`
    Helo(String),
    /// `EHLO domain-or-literal`
    Ehlo(String),
    /// `LHLO domain` (LMTP only).
    Lhlo(String),
    /// `MAIL FROM:<reverse-path> [params]`
    Mail {
        /// The sender.
        from: ReversePath,
        /// ESMTP parameters.
        params: MailParams,
    },
    /// `RCPT TO:<forward-path> [params]`
    Rcpt {
        /// The recipient.
        to: ForwardPath,
        /// ESMTP parameters.
        params: RcptParams,
    },
    /// `DATA`
    Data,
    /// `BDAT size [LAST]`
    Bdat {
        /// Octets in the chunk that follows the command line.
        size: u64,
        /// Last chunk of the message.
        last: bool,
    },
    /// `RSET`
    Rset,
    /// `NOOP [string]`
    Noop,
    /// `QUIT`
    Quit,
    /// `VRFY string`
    Vrfy(String),
    /// `HELP [string]`
    Help(Option<String>),
    /// `STARTTLS`
    StartTls,
    /// `AUTH mechanism [initial-response]`
    Auth {
        /// The SASL mechanism, upper-cased.
        mechanism: String,
        /// The base64 initial response, or `=` for an empty one.
        initial_response: Option<String>,
    },
}

/// Why a command line was refused. Each knows its reply ([`CommandError::reply`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandError {
    /// Not a verb we know: 500 5.5.1.
    Unrecognized,
    /// A line longer than the limit: 500 5.5.2.
    LineTooLong,
    /// A known verb with bad arguments: 501 5.5.4, with the expected syntax.
    Syntax {
        /// The syntax the verb expects, for the reply text.
        syntax: &'static str,
    },
    /// A bad MAIL FROM address: 501 5.1.7.
    BadSender(AddressError),
    /// A bad RCPT TO address: 501 5.1.3.
    BadRecipient(AddressError),
    /// A parameter we do not know or did not offer: 555 5.5.4.
    UnknownParameter(String),
    /// A known parameter with a bad value, or repeated: 501 5.5.4.
    BadParameter(String),
    /// A command we recognise and do not implement: 502 5.5.1.
    NotImplemented(&'static str),
}

impl CommandError {
    /// The reply to send for this error.
    pub fn reply(&self) -> Reply {
        match self {
            Self::Unrecognized => replies::unrecognized_command(),
            Self::LineTooLong => replies::line_too_long(),
            Self::Syntax { syntax } => replies::syntax(syntax),
            Self::BadSender(e) => replies::bad_sender(e),
            Self::BadRecipient(e) => replies::bad_recipient(e),
            Self::UnknownParameter(p) => replies::unknown_parameter(p),
            Self::BadParameter(p) => replies::bad_parameter(p),
            Self::NotImplemented(verb) => replies::not_implemented(verb),
        }
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reply())
    }
}

impl std::error::Error for CommandError {}

impl From<ParamError> for CommandError {
    fn from(e: ParamError) -> Self {
        match e {
            ParamError::Unknown(k) => Self::UnknownParameter(k),
            other => Self::BadParameter(other.to_string()),
        }
    }
}

const SYNTAX_HELO: &str = "HELO domain";
const SYNTAX_EHLO: &str = "EHLO domain";
const SYNTAX_LHLO: &str = "LHLO domain";
const SYNTAX_MAIL: &str = "MAIL FROM:<address> [parameters]";
const SYNTAX_RCPT: &str = "RCPT TO:<address> [parameters]";
const SYNTAX_BDAT: &str = "BDAT size [LAST]";
const SYNTAX_AUTH: &str = "AUTH mechanism [initial-response]";
const SYNTAX_VRFY: &str = "VRFY address";

type Res<'a, T> = IResult<&'a [u8], T>;

fn verb(i: &[u8]) -> Res<'_, &[u8]> {
    take_while1(|c: u8| c.is_ascii_alphabetic()).parse(i)
}

impl Command {
    /// Parses one command line, without its CRLF.
    pub fn parse(line: &[u8]) -> Result<Self, CommandError> {
        let Ok((args, verb)) = verb(line) else {
            return Err(CommandError::Unrecognized);
        };
        // The verb must end the line or be followed by a space.
        if !args.is_empty() && args[0] != b' ' {
            return Err(CommandError::Unrecognized);
        }
        let args = trim_spaces(args);
        // Upper-case the verb into a small stack buffer: no allocation per command.
        let mut upper = [0u8; 8];
        let Some(slot) = upper.get_mut(..verb.len()) else {
            return Err(CommandError::Unrecognized);
        };
        slot.copy_from_slice(verb);
        slot.make_ascii_uppercase();
        match &*slot {
            b"HELO" => hello(args, SYNTAX_HELO).map(Self::Helo),
            b"EHLO" => hello(args, SYNTAX_EHLO).map(Self::Ehlo),
            b"LHLO" => hello(args, SYNTAX_LHLO).map(Self::Lhlo),
            b"MAIL" => mail(args),
            b"RCPT" => rcpt(args),
            b"DATA" => no_args(args, "DATA", Self::Data),
            b"BDAT" => bdat(args),
            b"RSET" => no_args(args, "RSET", Self::Rset),
            b"NOOP" => Ok(Self::Noop),
            b"QUIT" => no_args(args, "QUIT", Self::Quit),
            b"VRFY" if args.is_empty() => Err(CommandError::Syntax {
                syntax: SYNTAX_VRFY,
            }),
            b"VRFY" => Ok(Self::Vrfy(String::from_utf8_lossy(args).into_owned())),
            b"HELP" => Ok(Self::Help(
                (!args.is_empty()).then(|| String::from_utf8_lossy(args).into_owned()),
            )),
            b"STARTTLS" => no_args(args, "STARTTLS", Self::StartTls),
            b"AUTH" => auth(args),
            b"EXPN" => Err(CommandError::NotImplemented("EXPN")),
            b"TURN" => Err(CommandError::NotImplemented("TURN")),
            b"ETRN" => Err(CommandError::NotImplemented("ETRN")),
            b"ATRN" => Err(CommandError::NotImplemented("ATRN")),
            _ => Err(CommandError::Unrecognized),
        }
    }

    /// The wire form with CRLF appended to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Helo(d) => write!(f, "HELO {d}"),
            Self::Ehlo(d) => write!(f, "EHLO {d}"),
            Self::Lhlo(d) => write!(f, "LHLO {d}"),
            Self::Mail { from, params } => write!(f, "MAIL FROM:{from}{params}"),
            Self::Rcpt { to, params } => write!(f, "RCPT TO:{to}{params}"),
            Self::Data => f.write_str("DATA"),
            Self::Bdat { size, last: true } => write!(f, "BDAT {size} LAST"),
            Self::Bdat { size, last: false } => write!(f, "BDAT {size}"),
            Self::Rset => f.write_str("RSET"),
            Self::Noop => f.write_str("NOOP"),
            Self::Quit => f.write_str("QUIT"),
            Self::Vrfy(s) => write!(f, "VRFY {s}"),
            Self::Help(None) => f.write_str("HELP"),
            Self::Help(Some(s)) => write!(f, "HELP {s}"),
            Self::StartTls => f.write_str("STARTTLS"),
            Self::Auth {
                mechanism,
                initial_response: None,
            } => write!(f, "AUTH {mechanism}"),
            Self::Auth {
                mechanism,
                initial_response: Some(r),
            } => write!(f, "AUTH {mechanism} {r}"),
        }
    }
}

fn trim_spaces(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn no_args(args: &[u8], verb: &'static str, cmd: Command) -> Result<Command, CommandError> {
    if args.is_empty() {
        Ok(cmd)
    } else {
        Err(CommandError::Syntax { syntax: verb })
    }
}

/// HELO/EHLO/LHLO: one domain or address literal. We keep the text as sent (a client's
/// HELO name is informational and logged in Received:), but it must be one word that
/// parses as a domain or literal.
fn hello(args: &[u8], syntax: &'static str) -> Result<String, CommandError> {
    let text = std::str::from_utf8(args).map_err(|_| CommandError::Syntax { syntax })?;
    if text.is_empty() || text.contains([' ', '\t']) || Domain::parse(text).is_err() {
        return Err(CommandError::Syntax { syntax });
    }
    Ok(text.to_owned())
}

/// Splits `<path> params` at the `>` that closes the path, skipping quoted strings.
fn split_path(s: &str) -> Option<(&str, &str)> {
    if !s.starts_with('<') {
        return None;
    }
    // Fast path: no quoted string, so the first `>` closes the path.
    if memchr::memchr(b'"', s.as_bytes()).is_none() {
        let i = memchr::memchr(b'>', s.as_bytes())?;
        return Some((&s[..=i], &s[i + 1..]));
    }
    let mut quoted = false;
    let mut escaped = false;
    // Octets, not chars: the delimiters are ASCII and never occur inside a UTF-8 sequence.
    for (i, &c) in s.as_bytes().iter().enumerate() {
        match c {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some((&s[..=i], &s[i + 1..])),
            _ => {}
        }
    }
    None
}

/// `FROM:` or `TO:` then optional spaces, then the rest.
fn path_args<'a>(args: &'a [u8], keyword: &'static str) -> Option<&'a [u8]> {
    let r: Res<'_, &[u8]> = preceded((tag_no_case(keyword), char(':'), space0), rest).parse(args);
    r.ok().map(|(_, tail)| tail)
}

fn path_and_params(tail: &[u8]) -> Result<(&str, &str), Option<AddressError>> {
    let text = std::str::from_utf8(tail).map_err(|_| Some(AddressError::NotUtf8))?;
    let (path, params) = split_path(text).ok_or(Some(AddressError::MissingBrackets))?;
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(None);
    }
    Ok((path, params))
}

fn mail(args: &[u8]) -> Result<Command, CommandError> {
    let tail = path_args(args, "FROM").ok_or(CommandError::Syntax {
        syntax: SYNTAX_MAIL,
    })?;
    let (path, params) = path_and_params(tail).map_err(|e| match e {
        Some(e) => CommandError::BadSender(e),
        None => CommandError::Syntax {
            syntax: SYNTAX_MAIL,
        },
    })?;
    let from = ReversePath::parse(path).map_err(CommandError::BadSender)?;
    Ok(Command::Mail {
        from,
        params: MailParams::parse(params)?,
    })
}

fn rcpt(args: &[u8]) -> Result<Command, CommandError> {
    let tail = path_args(args, "TO").ok_or(CommandError::Syntax {
        syntax: SYNTAX_RCPT,
    })?;
    let (path, params) = path_and_params(tail).map_err(|e| match e {
        Some(e) => CommandError::BadRecipient(e),
        None => CommandError::Syntax {
            syntax: SYNTAX_RCPT,
        },
    })?;
    let to = ForwardPath::parse(path).map_err(CommandError::BadRecipient)?;
    Ok(Command::Rcpt {
        to,
        params: RcptParams::parse(params)?,
    })
}

fn bdat(args: &[u8]) -> Result<Command, CommandError> {
    let syntax = CommandError::Syntax {
        syntax: SYNTAX_BDAT,
    };
    let parsed: Res<'_, (&[u8], Option<&[u8]>)> =
        all_consuming((digit1, opt(preceded(space1, tag_no_case("LAST"))))).parse(args);
    let (_, (digits, last)) = parsed.map_err(|_| syntax.clone())?;
    if digits.len() > 20 {
        return Err(syntax);
    }
    let size = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or(syntax)?;
    Ok(Command::Bdat {
        size,
        last: last.is_some(),
    })
}

fn auth(args: &[u8]) -> Result<Command, CommandError> {
    let syntax = CommandError::Syntax {
        syntax: SYNTAX_AUTH,
    };
    let mech = take_while1(|c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    let resp =
        take_while1(|c: u8| c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'=');
    let parsed: Res<'_, (&[u8], Option<&[u8]>)> =
        all_consuming((mech, opt(preceded(space1, resp)))).parse(args);
    let (_, (mechanism, response)) = parsed.map_err(|_| syntax.clone())?;
    if mechanism.len() > 20 {
        return Err(syntax);
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(Command::Auth {
        mechanism: text(mechanism).to_ascii_uppercase(),
        initial_response: response.map(text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Mailbox;
    use crate::params::Body;

    fn parse(s: &str) -> Result<Command, CommandError> {
        Command::parse(s.as_bytes())
    }

    #[test]
    fn verbs_case_insensitive() {
        assert_eq!(
            parse("ehlo client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(parse("HeLo x"), Ok(Command::Helo("x".into())));
        assert_eq!(
            parse("LHLO [127.0.0.1]"),
            Ok(Command::Lhlo("[127.0.0.1]".into()))
        );
        assert_eq!(parse("data"), Ok(Command::Data));
        assert_eq!(parse("Rset"), Ok(Command::Rset));
        assert_eq!(parse("NOOP anything at all"), Ok(Command::Noop));
        assert_eq!(parse("quit"), Ok(Command::Quit));
        assert_eq!(parse("starttls"), Ok(Command::StartTls));
        assert_eq!(parse("HELP"), Ok(Command::Help(None)));
        assert_eq!(parse("help mail"), Ok(Command::Help(Some("mail".into()))));
        assert_eq!(parse("VRFY bob"), Ok(Command::Vrfy("bob".into())));
    }

    #[test]
    fn mail_and_rcpt() {
        let Ok(Command::Mail { from, params }) =
            parse("MAIL FROM:<a@example.org> SIZE=100 BODY=8BITMIME")
        else {
            panic!()
        };
        assert_eq!(
            from,
            ReversePath::Mailbox(Mailbox::parse("a@example.org").unwrap())
        );
        assert_eq!(
            (params.size, params.body),
            (Some(100), Some(Body::EightBitMime))
        );
        assert!(matches!(
            parse("mail from:<>"),
            Ok(Command::Mail {
                from: ReversePath::Null,
                ..
            })
        ));
        assert!(
            matches!(parse("MAIL FROM: <a@x>"), Ok(Command::Mail { .. })),
            "space tolerated"
        );
        assert!(matches!(
            parse("MAIL FROM:<\"a> b\"@x> SIZE=1"),
            Ok(Command::Mail { .. })
        ));
        assert!(matches!(
            parse("RCPT TO:<Postmaster>"),
            Ok(Command::Rcpt {
                to: ForwardPath::Postmaster,
                ..
            })
        ));
        let Ok(Command::Rcpt { to, params }) = parse("rcpt to:<b@x> NOTIFY=FAILURE") else {
            panic!()
        };
        assert_eq!(to.to_string(), "<b@x>");
        assert!(params.notify.unwrap().failure);
    }

    #[test]
    fn errors_know_their_replies() {
        let cases: &[(&str, u16, &str)] = &[
            ("FOO", 500, "5.5.1"),
            ("MAILX FROM:<a@x>", 500, "5.5.1"),
            ("", 500, "5.5.1"),
            ("123", 500, "5.5.1"),
            ("MAIL", 501, "5.5.4"),
            ("MAIL TO:<a@x>", 501, "5.5.4"),
            ("MAIL FROM:a@x", 501, "5.1.7"),
            ("MAIL FROM:<a@>", 501, "5.1.7"),
            ("MAIL FROM:<a@x>SIZE=1", 501, "5.5.4"),
            ("MAIL FROM:<a@x> FOO=1", 555, "5.5.4"),
            ("MAIL FROM:<a@x> SIZE=x", 501, "5.5.4"),
            ("RCPT TO:<>", 501, "5.1.3"),
            ("RCPT TO:bob", 501, "5.1.3"),
            ("RCPT FROM:<a@x>", 501, "5.5.4"),
            ("RCPT TO:<a@x> SIZE=1", 555, "5.5.4"),
            ("DATA x", 501, "5.5.4"),
            ("EHLO", 501, "5.5.4"),
            ("EHLO a b", 501, "5.5.4"),
            ("HELO bad_name!", 501, "5.5.4"),
            ("BDAT", 501, "5.5.4"),
            ("BDAT x", 501, "5.5.4"),
            ("BDAT 10 FIRST", 501, "5.5.4"),
            ("BDAT 123456789012345678901", 501, "5.5.4"),
            ("AUTH", 501, "5.5.4"),
            ("VRFY", 501, "5.5.4"),
            ("STARTTLS now", 501, "5.5.4"),
            ("EXPN list", 502, "5.5.1"),
            ("ETRN x", 502, "5.5.1"),
        ];
        for (line, code, enhanced) in cases {
            let err = parse(line).expect_err(line);
            let reply = err.reply();
            assert_eq!(reply.code().get(), *code, "{line}: {reply}");
            assert_eq!(reply.enhanced().unwrap().to_string(), *enhanced, "{line}");
        }
    }

    #[test]
    fn non_utf8_address_is_an_error_not_a_panic() {
        assert!(matches!(
            Command::parse(b"MAIL FROM:<\xff@x>"),
            Err(CommandError::BadSender(AddressError::NotUtf8))
        ));
        assert!(matches!(
            Command::parse(b"EHLO \xff"),
            Err(CommandError::Syntax { .. })
        ));
        assert_eq!(Command::parse(b"\xff\xfe"), Err(CommandError::Unrecognized));
    }

    #[test]
    fn bdat_and_auth() {
        assert_eq!(
            parse("BDAT 1000"),
            Ok(Command::Bdat {
                size: 1000,
                last: false
            })
        );
        assert_eq!(
            parse("bdat 0 last"),
            Ok(Command::Bdat {
                size: 0,
                last: true
            })
        );
        assert_eq!(
            parse("AUTH plain AHRlc3QAdGVzdA=="),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some("AHRlc3QAdGVzdA==".into())
            })
        );
        assert_eq!(
            parse("AUTH LOGIN"),
            Ok(Command::Auth {
                mechanism: "LOGIN".into(),
                initial_response: None
            })
        );
    }

    #[test]
    fn display_round_trips() {
        for line in [
            "HELO x",
            "EHLO client.example",
            "LHLO gw",
            "MAIL FROM:<> BODY=8BITMIME",
            "MAIL FROM:<a@x> SIZE=5 SMTPUTF8",
            "RCPT TO:<b@[192.0.2.1]> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@x",
            "RCPT TO:<Postmaster>",
            "DATA",
            "BDAT 5 LAST",
            "BDAT 5",
            "RSET",
            "NOOP",
            "QUIT",
            "STARTTLS",
            "AUTH PLAIN AHRlc3QAdGVzdA==",
            "VRFY x",
            "HELP",
        ] {
            let cmd = parse(line).unwrap();
            assert_eq!(cmd.to_string(), line);
            let mut wire = Vec::new();
            cmd.encode(&mut wire);
            assert_eq!(
                parse(std::str::from_utf8(&wire[..wire.len() - 2]).unwrap()).unwrap(),
                cmd
            );
        }
    }
}
