//! The argument templates of a pipe command: `${sender}`, `${recipient}`, `${user}` and
//! `${domain}`, whole or inside a longer argument, expanded per run without re-parsing; a
//! value that would start an argument with `-` is refused (Postfix's `allow_min_user`).

use postern_proto::ForwardPath;
use postern_proto::reply::Reply;

use super::local;
use crate::config::units::Invalid;

/// A macro of the argument templates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Var {
    Sender,
    Recipient,
    User,
    Domain,
}

impl Var {
    pub(super) const ALL: [(&'static str, Self); 4] = [
        ("sender", Self::Sender),
        ("recipient", Self::Recipient),
        ("user", Self::User),
        ("domain", Self::Domain),
    ];

    pub(super) fn of_recipient(self) -> bool {
        self != Self::Sender
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Piece {
    Text(String),
    Var(Var),
}

/// One argument: text and macros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Arg(Vec<Piece>);

impl Arg {
    pub(super) fn parse(s: &str) -> Result<Self, Invalid> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = s;
        while let Some(at) = rest.find('$') {
            text.push_str(&rest[..at]);
            rest = &rest[at..];
            if let Some(inner) = rest.strip_prefix("${") {
                let end = inner
                    .find('}')
                    .ok_or_else(|| Invalid::from(format!("`{s}`: `${{` without a closing `}}`")))?;
                let name = &inner[..end];
                let var = Var::ALL
                    .iter()
                    .find_map(|(n, v)| (*n == name).then_some(*v))
                    .ok_or_else(|| {
                        format!(
                            "`{s}`: unknown macro `${{{name}}}` \
                             (known: ${{sender}}, ${{recipient}}, ${{user}}, ${{domain}})"
                        )
                    })?;
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Var(var));
                rest = &inner[end + 1..];
            } else {
                // `$sender` without braces is a likely mistake; a lone `$` is text.
                let word: String = rest[1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if Var::ALL.iter().any(|(n, _)| *n == word) {
                    return Err(format!("`{s}`: write `${{{word}}}`").into());
                }
                text.push('$');
                rest = &rest[1..];
            }
        }
        text.push_str(rest);
        if !text.is_empty() || pieces.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self(pieces))
    }

    pub(super) fn of_recipient(&self) -> bool {
        self.0
            .iter()
            .any(|p| matches!(p, Piece::Var(v) if v.of_recipient()))
    }

    /// The argument for these values; `Err(var)` when a macro would begin it with `-`.
    pub(super) fn expand(&self, values: &Values<'_>) -> Result<String, Var> {
        let mut out = String::new();
        for (i, piece) in self.0.iter().enumerate() {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => {
                    let value = values.get(*v);
                    if i == 0 && value.starts_with('-') {
                        return Err(*v);
                    }
                    out.push_str(value);
                }
            }
        }
        Ok(out)
    }
}

/// The templates of `argv`; `argv[0]` an absolute path without macros.
pub(super) fn parse_argv(argv: &[String]) -> Result<Vec<Arg>, Invalid> {
    let Some(program) = argv.first() else {
        return Err("argv: the command is missing".into());
    };
    if !program.starts_with('/') {
        return Err(format!("argv: `{program}` must be an absolute path (no PATH search)").into());
    }
    if program.contains('$') {
        return Err(format!("argv: `{program}`: no macros in the command's path").into());
    }
    argv.iter()
        .map(|a| Arg::parse(a).map_err(|e| Invalid::from(format!("argv: {e}"))))
        .collect()
}

/// What the macros stand for, for one recipient (or none).
#[derive(Debug, Default)]
pub(super) struct Values<'a> {
    sender: &'a str,
    recipient: String,
    user: String,
    domain: String,
}

impl<'a> Values<'a> {
    pub(super) fn new(sender: &'a str, to: Option<&ForwardPath>) -> Self {
        let (recipient, user, domain) = match to {
            None => Default::default(),
            Some(ForwardPath::Postmaster) => {
                ("postmaster".into(), "postmaster".into(), String::new())
            }
            Some(ForwardPath::Mailbox(m)) => {
                let local = m.local_part_unquoted();
                let user = local.split('+').next().unwrap_or_default().to_owned();
                (m.to_string(), user, m.domain().to_string())
            }
        };
        Self {
            sender,
            recipient,
            user,
            domain,
        }
    }

    pub(super) fn get(&self, var: Var) -> &str {
        match var {
            Var::Sender => self.sender,
            Var::Recipient => &self.recipient,
            Var::User => &self.user,
            Var::Domain => &self.domain,
        }
    }
}

/// The refusal of an address that would begin an argument with `-`.
pub(super) fn unsafe_value(var: Var) -> Reply {
    if var == Var::Sender {
        local(
            (5, 1, 7),
            "Sender address not usable as a command argument (leading '-')",
        )
    } else {
        local(
            (5, 1, 3),
            "Recipient address not usable as a command argument (leading '-')",
        )
    }
}
