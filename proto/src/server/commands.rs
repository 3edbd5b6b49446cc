//! The server session's command handlers: one parsed command line in, the reply, events
//! and decisions it leads to out.
//!
//! Owns: the greeting (HELO/EHLO/LHLO and the extension list), the sequence rules of MAIL,
//! RCPT, DATA and BDAT (RFC 5321 §4.1.4, RFC 3030), RSET/NOOP/QUIT/VRFY/HELP, STARTTLS
//! (RFC 3207) and AUTH (RFC 4954), and which ESMTP parameters are accepted.
//! Promises: a command that is not allowed now is refused with a reply from
//! [`crate::replies`] and counted as an error; QUIT and STARTTLS discard whatever input is
//! buffered behind them (RFC 3207 §4.2), nothing here reads it.
//! SEE ALSO: [`super`] (the session: input, content, decisions), [`crate::command`] (parsing).

use crate::address::{ForwardPath, ReversePath};
use crate::command::Command;
use crate::params::{Body, Extension, MailParams, RcptParams};
use crate::replies;
use crate::reply::{Reply, ReplyCode};

use super::{
    Content, HelloVerb, Pending, Phase, Protocol, ServerEvent, ServerSession, Transaction,
};

impl ServerSession {
    /// One command line, parsed and carried out (or refused).
    pub(super) fn handle_command(&mut self, line: &[u8]) {
        let command = match Command::parse(line) {
            Ok(c) => c,
            Err(e) => return self.error(e.reply()),
        };
        match command {
            Command::Helo(d) => self.hello(HelloVerb::Helo, d),
            Command::Ehlo(d) => self.hello(HelloVerb::Ehlo, d),
            Command::Lhlo(d) => self.hello(HelloVerb::Lhlo, d),
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to, params } => self.rcpt(to, params),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.reset_transaction(true);
                self.reply(replies::ok());
            }
            Command::Noop => self.reply(replies::ok()),
            Command::Quit => {
                self.reset_transaction(true);
                self.reply(replies::bye());
                self.events.push_back(ServerEvent::Close);
                self.phase = Phase::Closed;
                self.input.clear();
            }
            Command::Vrfy(_) => self.reply(replies::cannot_verify()),
            Command::Help(_) => self.reply(replies::help()),
            Command::StartTls => self.starttls(),
            Command::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response),
        }
    }

    fn hello(&mut self, verb: HelloVerb, domain: String) {
        let allowed = match self.config.protocol {
            Protocol::Smtp => verb != HelloVerb::Lhlo,
            Protocol::Lmtp => verb == HelloVerb::Lhlo,
        };
        if !allowed {
            let name = match verb {
                HelloVerb::Helo => "HELO",
                HelloVerb::Ehlo => "EHLO",
                HelloVerb::Lhlo => "LHLO",
            };
            return self.error(replies::wrong_protocol(name, self.config.protocol.name()));
        }
        self.reset_transaction(true);
        self.hello = Some(verb);
        self.events.push_back(ServerEvent::Hello { verb, domain });
        let reply = match verb {
            HelloVerb::Helo => Reply::new(ReplyCode::OK, None, &self.config.hostname),
            HelloVerb::Ehlo | HelloVerb::Lhlo => {
                Reply::with_lines(ReplyCode::OK, None, self.extensions())
            }
        };
        self.reply(reply);
    }

    /// The EHLO/LHLO reply lines: our name, then one keyword per line.
    fn extensions(&self) -> Vec<String> {
        let c = &self.config;
        let mut lines = vec![c.hostname.clone()];
        let mut add = |on: bool, kw: &str| {
            if on {
                lines.push(kw.to_owned());
            }
        };
        add(c.pipelining, "PIPELINING");
        add(true, &format!("SIZE {}", c.max_message_size));
        add(c.eight_bit_mime, "8BITMIME");
        add(true, "ENHANCEDSTATUSCODES");
        add(c.smtputf8, "SMTPUTF8");
        add(c.dsn, "DSN");
        add(c.chunking, "CHUNKING");
        add(c.chunking, "BINARYMIME");
        add(c.starttls && !self.tls_active, "STARTTLS");
        add(
            self.auth_offered(),
            &format!("AUTH {}", c.auth_mechanisms.join(" ")),
        );
        lines.extend(c.private_keywords.iter().cloned());
        lines
    }

    fn auth_offered(&self) -> bool {
        !self.config.auth_mechanisms.is_empty() && (self.tls_active || !self.config.tls_required)
    }

    fn offered(&self, ext: Extension) -> bool {
        let c = &self.config;
        self.hello != Some(HelloVerb::Helo)
            && match ext {
                Extension::Size => true,
                Extension::EightBitMime => c.eight_bit_mime,
                Extension::BinaryMime => c.chunking,
                Extension::SmtpUtf8 => c.smtputf8,
                Extension::Dsn => c.dsn,
                Extension::RequireTls => false,
                Extension::Auth => self.auth_offered(),
            }
    }

    /// The checks every transaction command shares: greeting and TLS.
    fn transaction_allowed(&mut self) -> bool {
        if self.hello.is_none() {
            let hello = match self.config.protocol {
                Protocol::Smtp => "send HELO/EHLO first",
                Protocol::Lmtp => "send LHLO first",
            };
            self.error(replies::bad_sequence(hello));
            return false;
        }
        if self.config.tls_required && !self.tls_active {
            self.error(replies::tls_required());
            return false;
        }
        true
    }

    fn mail(&mut self, from: ReversePath, params: MailParams) {
        if !self.transaction_allowed() {
            return;
        }
        if self.txn.open {
            return self.error(replies::bad_sequence("nested MAIL command"));
        }
        if let Some(ext) = params.extensions().into_iter().find(|e| !self.offered(*e)) {
            return self.error(replies::unknown_parameter(param_name(ext)));
        }
        let max = self.config.max_message_size;
        if max > 0 && params.size.is_some_and(|s| s > max) {
            return self.reply(replies::message_too_big());
        }
        if from.mailbox().is_some_and(|m| !m.is_ascii()) && !params.smtputf8 {
            return self.reply(replies::utf8_address_needs_smtputf8());
        }
        self.txn = Transaction {
            params: params.clone(),
            ..Transaction::default()
        };
        self.events.push_back(ServerEvent::Mail { from, params });
        self.pending = Some(Pending::Mail);
    }

    fn rcpt(&mut self, to: ForwardPath, params: RcptParams) {
        if !self.transaction_allowed() {
            return;
        }
        if !self.txn.open {
            return self.error(replies::bad_sequence("need MAIL command"));
        }
        if self.content != Content::None {
            return self.error(replies::bad_sequence("RCPT after BDAT"));
        }
        if let Some(ext) = params.extensions().into_iter().find(|e| !self.offered(*e)) {
            return self.error(replies::unknown_parameter(param_name(ext)));
        }
        if to.mailbox().is_some_and(|m| !m.is_ascii()) && !self.txn.params.smtputf8 {
            return self.reply(replies::utf8_address_needs_smtputf8());
        }
        self.txn.attempted += 1;
        if self.txn.accepted >= self.config.max_recipients {
            return self.reply(replies::too_many_recipients());
        }
        self.events.push_back(ServerEvent::Rcpt { to, params });
        self.pending = Some(Pending::Rcpt);
    }

    /// Why content may not start now, if it may not.
    fn content_refusal(&self) -> Option<Reply> {
        if !self.txn.open {
            return Some(replies::bad_sequence("need MAIL command"));
        }
        if self.txn.accepted == 0 {
            return Some(match (self.config.protocol, self.txn.attempted) {
                (Protocol::Smtp, n) if n > 0 => replies::no_valid_recipients(),
                _ => replies::bad_sequence("need RCPT command"),
            });
        }
        None
    }

    fn data(&mut self) {
        if !self.transaction_allowed() {
            return;
        }
        if let Some(refusal) = self.content_refusal() {
            return self.error(refusal);
        }
        if self.content != Content::None {
            return self.error(replies::bad_sequence("DATA after BDAT"));
        }
        if self.txn.params.body == Some(Body::BinaryMime) {
            return self.error(replies::binarymime_needs_bdat());
        }
        self.events.push_back(ServerEvent::DataStart);
        self.pending = Some(Pending::DataStart { bdat: None });
    }

    /// BDAT: the chunk's octets follow the command line whatever the answer, so a refused
    /// chunk is still read (and discarded) before its reply; otherwise its octets would be
    /// taken for commands.
    fn bdat(&mut self, size: u64, last: bool) {
        let refusal = if !self.config.chunking {
            Some(replies::not_implemented("BDAT"))
        } else if self.hello.is_none() {
            Some(replies::bad_sequence("send EHLO first"))
        } else if self.config.tls_required && !self.tls_active {
            Some(replies::tls_required())
        } else if let Some(refusal) = self.content_refusal() {
            Some(refusal)
        } else if self.content == Content::Failed {
            Some(replies::bad_sequence("previous chunk failed, send RSET"))
        } else {
            None
        };
        match (refusal, self.content) {
            (Some(r), _) => self.start_chunk(size, last, Some(r)),
            (None, Content::None) => {
                self.events.push_back(ServerEvent::DataStart);
                self.pending = Some(Pending::DataStart {
                    bdat: Some((size, last)),
                });
            }
            (None, _) => self.start_chunk(size, last, None),
        }
    }

    fn starttls(&mut self) {
        if !self.config.starttls {
            return self.error(replies::not_implemented("STARTTLS"));
        }
        if self.tls_active {
            return self.error(replies::bad_sequence("TLS already active"));
        }
        if self.txn.open {
            return self.error(replies::bad_sequence("mail transaction in progress"));
        }
        self.reset_transaction(true);
        self.reply(replies::tls_go_ahead());
        self.events.push_back(ServerEvent::StartTls);
        self.phase = Phase::AwaitTls;
        // RFC 3207 §4.2 / CVE-2011-0411: anything pipelined after STARTTLS was sent in
        // plaintext and must not be acted on after the handshake.
        self.input.clear();
    }

    fn auth(&mut self, mechanism: String, initial_response: Option<String>) {
        if self.config.auth_mechanisms.is_empty() {
            return self.error(replies::auth_not_enabled());
        }
        if !self.auth_offered() {
            return self.error(replies::tls_required());
        }
        if self.hello.is_none() || self.authenticated || self.txn.open {
            return self.error(replies::bad_sequence("AUTH not allowed now"));
        }
        if !self
            .config
            .auth_mechanisms
            .iter()
            .any(|m| m.eq_ignore_ascii_case(&mechanism))
        {
            return self.error(replies::auth_mechanism_unknown());
        }
        self.events.push_back(ServerEvent::Auth {
            mechanism,
            initial_response,
        });
        self.pending = Some(Pending::Auth);
    }
}

fn param_name(ext: Extension) -> &'static str {
    match ext {
        Extension::Size => "SIZE",
        Extension::EightBitMime | Extension::BinaryMime => "BODY",
        Extension::SmtpUtf8 => "SMTPUTF8",
        Extension::Dsn => "DSN parameter",
        Extension::RequireTls => "REQUIRETLS",
        Extension::Auth => "AUTH",
    }
}
