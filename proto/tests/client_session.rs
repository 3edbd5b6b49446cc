//! The client state machine's session outside a transaction: greetings and their refusal,
//! LHLO/EHLO/HELO, STARTTLS, AUTH, RSET and NOOP, misuse as a typed error, and replies
//! nobody asked for.

#![allow(clippy::unwrap_used, reason = "test helpers: a panic is a failed test")]

mod dialogue;

use dialogue::*;
use postern_proto::client::{ClientError, Protocol};
use postern_proto::params::MailParams;

#[test]
fn starttls_discards_injected_bytes_and_forgets_capabilities() {
    let mut s = Session::after(
        Protocol::Smtp,
        "
        S: 220 relay.example.org ESMTP
        E: Greeted 220
        C: EHLO gw.example.org
        S: 250-relay.example.org
        S: 250-PIPELINING
        S: 250-STARTTLS
        S: 250 8BITMIME
        E: Ready
        ",
    );
    s.conn.start_tls().unwrap();
    s.run("C: STARTTLS");
    // A man in the middle appends a reply to the 220, hoping it is read after the handshake.
    let injected = b"250-relay.example.org\r\n250 AUTH PLAIN\r\n";
    let mut input = b"220 2.0.0 Ready to start TLS\r\n".to_vec();
    input.extend_from_slice(injected);
    s.conn.handle_input(&input);
    s.run(&format!("E: TlsGoAhead discarded={}", injected.len()));
    assert_eq!(s.conn.capabilities().map(|c| c.starttls), Some(true));
    s.conn.handle_input(b"250 more plaintext\r\n");
    assert_eq!(
        s.conn.start_transaction(
            envelope(&["a@b"]).0,
            MailParams::default(),
            envelope(&["a@b"]).2
        ),
        Err(ClientError::NotReady)
    );
    s.conn.tls_established().unwrap();
    assert!(s.conn.capabilities().is_none());
    s.run(
        "
        C: EHLO gw.example.org
        S: 250-relay.example.org
        S: 250 PIPELINING
        E: Ready
        ",
    );
    let caps = s.conn.capabilities().unwrap();
    assert!(caps.pipelining && !caps.starttls && caps.auth.is_empty());
    assert_eq!(s.conn.start_tls(), Err(ClientError::StartTlsNotOffered));
}

#[test]
fn starttls_refused_keeps_plaintext_session() {
    let mut s = Session::after(
        Protocol::Smtp,
        "S: 220 mx\nE: Greeted 220\nC: EHLO gw.example.org\nS: 250-mx\nS: 250 STARTTLS\nE: Ready",
    );
    s.conn.start_tls().unwrap();
    s.run("C: STARTTLS\nS: 454 4.7.0 TLS not available\nE: TlsRefused 454 4.7.0");
    assert_eq!(s.conn.tls_established(), Err(ClientError::OutOfSequence));
    assert!(s.conn.is_idle());
}

#[test]
fn cyrus_tcp_auth_required_then_auth_plain() {
    let mut s = Session::after(
        Protocol::Lmtp,
        "
        S: 220 localhost Cyrus LMTP 3.6.1-Debian-3.6.1-4+deb12u5 server ready
        E: Greeted 220
        C: LHLO gw.example.org
        S: 250-localhost
        S: 250-8BITMIME
        S: 250-ENHANCEDSTATUSCODES
        S: 250-PIPELINING
        S: 250-SIZE
        S: 250-AUTH PLAIN LOGIN
        S: 250-IGNOREQUOTA
        S: 250 Ok SESSIONID=<cyrus-test-1>
        E: Ready
        ",
    );
    s.start(&["alice@example.org"]);
    // MAIL refused: the RCPT's 503 is reported but the recipient fails for MAIL's reason.
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: DATA
        S: 430 Authentication required
        E: Mail 430
        S: 503 5.5.1 Need MAIL command
        E: Rcpt 0: 503 5.5.1
        S: 503 5.5.1 No recipients
        E: DataRefused 503 5.5.1
        E: NotAttempted 0 (430)
        E: TransactionDone
        ",
    );
    s.conn.auth_plain("", "alice", "alice").unwrap();
    s.run("C: AUTH PLAIN AGFsaWNlAGFsaWNl\nS: 501 5.5.4 undefined error!\nE: AuthFailed 501 5.5.4");
    s.conn.auth_plain("", "test", "test").unwrap();
    s.run("C: AUTH PLAIN AHRlc3QAdGVzdA==\nS: 235 Authenticated!\nE: Authenticated");
    s.start(&["alice@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: DATA
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        S: 354 go ahead
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run(
        "S: 250 2.1.5 Success SESSIONID=<cyrus-test-2>\nE: Result 0: 250 2.1.5\nE: TransactionDone",
    );
}

#[test]
fn auth_challenge_is_cancelled() {
    let mut s = Session::after(
        Protocol::Smtp,
        "S: 220 mx\nE: Greeted 220\nC: EHLO gw.example.org\nS: 250-mx\nS: 250 AUTH PLAIN\nE: Ready",
    );
    s.conn.auth_plain("", "u", "p").unwrap();
    s.run("C: AUTH PLAIN AHUAcA==\nS: 334 \nC: *\nS: 501 5.7.0 cancelled\nE: AuthFailed 501 5.7.0");
    assert!(s.conn.is_idle());
}

#[test]
fn ehlo_5xx_falls_back_to_helo() {
    let mut s = Session::new(Protocol::Smtp);
    s.run(
        "
        S: 220 old.example.org SMTP
        E: Greeted 220
        C: EHLO gw.example.org
        S: 500 5.5.1 Unknown command
        C: HELO gw.example.org
        S: 250 old.example.org
        E: Ready
        ",
    );
    assert_eq!(s.conn.capabilities(), Some(&Default::default()));
    // Without PIPELINING, one command at a time.
    s.start(&["alice@example.org"]);
    s.run("C: MAIL FROM:<sender@example.org>");
}

#[test]
fn hello_refusals() {
    // Dovecot's LMTP answers EHLO and HELO with 500: in LMTP only LHLO is tried.
    let mut s = Session::new(Protocol::Smtp);
    s.run(
        "
        S: 220 localhost Dovecot (Debian) ready.
        E: Greeted 220
        C: EHLO gw.example.org
        S: 500 5.5.1 Unknown command
        C: HELO gw.example.org
        S: 500 5.5.1 Unknown command
        E: HelloRefused 500 5.5.1
        ",
    );
    assert_eq!(s.conn.noop(), Err(ClientError::NotReady));
    s.conn.quit().unwrap();
    s.run("C: QUIT\nS: 221 2.0.0 Bye\nE: Closed");

    let mut s = Session::new(Protocol::Lmtp);
    s.run(
        "
        S: 220 x
        E: Greeted 220
        C: LHLO gw.example.org
        S: 500 5.5.1 no
        E: HelloRefused 500 5.5.1
        ",
    );
    let mut s = Session::new(Protocol::Smtp);
    s.run(
        "
        S: 220 x
        E: Greeted 220
        C: EHLO gw.example.org
        S: 421 4.3.2 busy
        E: HelloRefused 421 4.3.2
        ",
    );
}

#[test]
fn greeting_refused() {
    let mut s = Session::new(Protocol::Lmtp);
    assert_eq!(s.conn.noop(), Err(ClientError::NotReady));
    s.run("S: 554 5.3.2 Too many connections\nE: Refused 554 5.3.2");
    assert_eq!(s.conn.noop(), Err(ClientError::NotReady));
    s.conn.quit().unwrap();
    assert_eq!(s.conn.quit(), Err(ClientError::NotReady));
    s.run("C: QUIT\nS: 221 bye\nE: Closed");
    assert_eq!(s.conn.quit(), Err(ClientError::Closed));
}

#[test]
fn rset_and_noop() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.conn.rset().unwrap();
    assert_eq!(s.conn.noop(), Err(ClientError::NotReady));
    s.run("C: RSET\nS: 250 2.0.0 OK\nE: Rset 250 2.0.0");
    s.conn.noop().unwrap();
    s.run("C: NOOP\nS: 250 2.0.0 OK\nE: Noop 250 2.0.0");
}

#[test]
fn misuse_is_a_typed_error() {
    let mut s = Session::new(Protocol::Lmtp);
    let (from, params, rcpts) = envelope(&["alice@example.org"]);
    let start = |s: &mut Session| {
        s.conn
            .start_transaction(from.clone(), params.clone(), rcpts.clone())
    };
    assert_eq!(start(&mut s), Err(ClientError::NotReady));
    assert_eq!(s.conn.data_sent(), Err(ClientError::NoTransaction));
    assert_eq!(s.conn.tls_established(), Err(ClientError::OutOfSequence));
    s.run(CYRUS_HELLO);
    assert_eq!(
        s.conn
            .start_transaction(from.clone(), params.clone(), vec![]),
        Err(ClientError::NoRecipients)
    );
    assert_eq!(
        s.conn
            .start_transaction_bdat(from.clone(), params.clone(), rcpts.clone()),
        Err(ClientError::ChunkingNotOffered)
    );
    assert_eq!(s.conn.start_tls(), Err(ClientError::StartTlsNotOffered));
    assert_eq!(
        s.conn.auth_plain("", "u", "p"),
        Err(ClientError::AuthNotOffered)
    );
    assert_eq!(s.conn.bdat_chunk(1, true), Err(ClientError::NoTransaction));
    start(&mut s).unwrap();
    assert_eq!(start(&mut s), Err(ClientError::TransactionOpen));
    assert_eq!(s.conn.quit(), Err(ClientError::TransactionOpen));
    assert_eq!(s.conn.data_sent(), Err(ClientError::OutOfSequence));
    assert_eq!(s.conn.bdat_chunk(1, true), Err(ClientError::OutOfSequence));
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: DATA
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        S: 354 go ahead
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    assert_eq!(s.conn.data_sent(), Err(ClientError::OutOfSequence));
    s.conn.connection_lost();
    s.run("E: Unconfirmed 0\nE: Closed");
    assert_eq!(s.conn.data_sent(), Err(ClientError::Closed));
    assert_eq!(s.conn.noop(), Err(ClientError::Closed));
    s.conn.connection_lost();
    s.conn.handle_input(b"250 ok\r\n");
    assert!(s.events().is_empty());
}

#[test]
fn unsolicited_reply_closes_the_connection() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.run("S: 421 4.3.2 Shutting down\nE: Unexpected 421 4.3.2\nE: Closed");
    // A reply to a command not yet written counts as unsolicited too.
    let mut s = Session::new(Protocol::Lmtp);
    s.conn.handle_input(b"220 ready\r\n250 too early\r\n");
    s.run("E: Greeted 220\nE: Unexpected 250\nE: Closed");
}
