//! The client state machine's transactions, driven through dialogues observed on real stores
//! (see `dialogue`): pipelined and not, mixed per-recipient results, BDAT, an SMTP relay's
//! single reply, recipient verification (MAIL, RCPT, RSET and no content), and the corner
//! cases of the in-doubt promise.

#![allow(clippy::unwrap_used, reason = "test helpers: a panic is a failed test")]

mod dialogue;

use dialogue::*;
use postern_proto::address::{ForwardPath, Mailbox, ReversePath};
use postern_proto::client::{ClientError, ClientEvent, Protocol};
use postern_proto::params::{Body, MailParams};

#[test]
fn cyrus_lhlo_capabilities() {
    let s = Session::after(Protocol::Lmtp, CYRUS_HELLO);
    let caps = s.conn.capabilities().unwrap();
    assert!(caps.pipelining && caps.eight_bit_mime && caps.enhanced_status_codes);
    assert!(!caps.chunking && !caps.starttls && !caps.smtputf8);
    assert_eq!(caps.size, Some(None));
    assert_eq!(caps.auth, ["EXTERNAL"]);
    assert!(s.conn.is_idle());
}

#[test]
fn cyrus_pipelined_transaction_with_unknown_user() {
    let mut s = Session::after(Protocol::Lmtp, CYRUS_HELLO);
    s.start(&[
        "alice@example.org",
        "nosuchuser@example.org",
        "bob@example.org",
    ]);
    let events = s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<nosuchuser@example.org>
        C: RCPT TO:<bob@example.org>
        C: DATA
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        S: 550-Mailbox unknown.  Either there is no mailbox associated with this
        S: 550-name or you do not have authorization to see it.
        S: 550 5.1.1 User unknown
        E: Rcpt 1: 550 5.1.1
        S: 250 2.1.5 ok
        E: Rcpt 2: 250 2.1.5
        S: 354 go ahead
        E: DataGoAhead
        ",
    );
    let ClientEvent::RcptReply { reply, .. } = &events[2] else {
        panic!("{events:?}")
    };
    assert_eq!(reply.lines().len(), 3);
    s.conn.data_sent().unwrap();
    // One reply per recipient accepted at RCPT: none for the unknown user.
    s.run(
        "
        S: 250 2.1.5 Success SESSIONID=<cyrus-2>
        E: Result 0: 250 2.1.5
        S: 250 2.1.5 Success SESSIONID=<cyrus-2>
        E: Result 2: 250 2.1.5
        E: TransactionDone
        ",
    );
    assert!(s.conn.is_idle());
    s.conn.quit().unwrap();
    s.run("C: QUIT\nS: 221 2.0.0 bye\nE: Closed");
    assert!(s.conn.is_closed());
}

#[test]
fn dovecot_mixed_results_arrive_one_by_one() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["alice@example.org", "bob@example.org", "carol@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: RCPT TO:<carol@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 250 2.1.5 OK
        E: Rcpt 0: 250 2.1.5
        S: 250 2.1.5 OK
        E: Rcpt 1: 250 2.1.5
        S: 250 2.1.5 OK
        E: Rcpt 2: 250 2.1.5
        S: 354 OK
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run(
        "
        S: 250 2.0.0 <alice@example.org> 0PcfCQPrCGtQGAAAg+zDdQ Saved
        E: Result 0: 250 2.0.0
        S: 451 4.3.0 <bob@example.org> Temporary internal error
        E: Result 1: 451 4.3.0
        S: 552 5.2.2 <carol@example.org> Quota exceeded (mailbox for user is full)
        E: Result 2: 552 5.2.2
        E: TransactionDone
        ",
    );
    // The connection is reusable for the next transaction.
    s.start(&["dave@example.org"]);
    s.run("C: MAIL FROM:<sender@example.org>\nC: RCPT TO:<dave@example.org>\nC: DATA");
}

#[test]
fn all_recipients_refused_data_refused_then_reset() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["nosuchuser@example.org", "other@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<nosuchuser@example.org>
        C: RCPT TO:<other@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 550 5.1.1 <nosuchuser@example.org> User doesn't exist: nosuchuser@example.org
        E: Rcpt 0: 550 5.1.1
        S: 550 5.1.1 <other@example.org> User doesn't exist: other@example.org
        E: Rcpt 1: 550 5.1.1
        S: 503 5.5.0 No valid recipients
        E: DataRefused 503 5.5.0
        C: RSET
        S: 250 2.0.0 OK
        E: TransactionDone
        ",
    );
    assert!(s.conn.is_idle());
}

#[test]
fn data_refused_leaves_accepted_recipients_not_attempted() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["alice@example.org", "bob@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 250 2.1.5 OK
        E: Rcpt 0: 250 2.1.5
        S: 550 5.1.1 unknown
        E: Rcpt 1: 550 5.1.1
        S: 451 4.3.0 try later
        E: DataRefused 451 4.3.0
        E: NotAttempted 0 (451 4.3.0)
        C: RSET
        S: 250 2.0.0 OK
        E: TransactionDone
        ",
    );
}

#[test]
fn lost_after_one_of_three_results_leaves_two_unconfirmed() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["alice@example.org", "bob@example.org", "carol@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: RCPT TO:<carol@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 250 2.1.5 OK
        E: Rcpt 0: 250 2.1.5
        S: 250 2.1.5 OK
        E: Rcpt 1: 250 2.1.5
        S: 250 2.1.5 OK
        E: Rcpt 2: 250 2.1.5
        S: 354 OK
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run("S: 250 2.0.0 <alice@example.org> Saved\nE: Result 0: 250 2.0.0");
    // Half of bob's reply arrived, then the connection dropped: still in doubt.
    s.conn.handle_input(b"250 2.0.0 <bob@exa");
    s.conn.connection_lost();
    s.run("E: Unconfirmed 1\nE: Unconfirmed 2\nE: Closed");
    assert_eq!(
        s.conn
            .start_transaction(envelope(&["a@b"]).0, MailParams::default(), vec![]),
        Err(ClientError::Closed)
    );
}

#[test]
fn lost_before_the_dot_is_not_attempted() {
    // During the body: nothing can have been delivered.
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["alice@example.org", "bob@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 250 2.1.5 OK
        E: Rcpt 0: 250 2.1.5
        S: 550 5.1.1 unknown
        E: Rcpt 1: 550 5.1.1
        S: 354 OK
        E: DataGoAhead
        ",
    );
    s.conn.connection_lost();
    s.run("E: NotAttempted 0\nE: Closed");

    // Before the RCPT replies: every recipient not yet refused.
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["alice@example.org", "bob@example.org", "carol@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: RCPT TO:<carol@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 550 5.1.1 unknown
        E: Rcpt 0: 550 5.1.1
        ",
    );
    s.conn.connection_lost();
    s.run("E: NotAttempted 1\nE: NotAttempted 2\nE: Closed");
}

#[test]
fn non_pipelining_server_gets_one_command_at_a_time() {
    let mut s = Session::after(Protocol::Lmtp, PLAIN_HELLO);
    s.start(&["alice@example.org", "nosuchuser@example.org"]);
    assert_eq!(s.conn.noop(), Err(ClientError::TransactionOpen));
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        C: RCPT TO:<alice@example.org>
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        C: RCPT TO:<nosuchuser@example.org>
        S: 550 5.1.1 User unknown
        E: Rcpt 1: 550 5.1.1
        C: DATA
        S: 354 go ahead
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run("S: 250 2.1.5 Success\nE: Result 0: 250 2.1.5\nE: TransactionDone");
}

#[test]
fn non_pipelining_failures_withdraw_the_rest() {
    // MAIL refused: no RCPT is written, no RSET is needed.
    let mut s = Session::after(Protocol::Lmtp, PLAIN_HELLO);
    s.start(&["alice@example.org", "bob@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        S: 430 Authentication required
        E: Mail 430
        E: NotAttempted 0 (430)
        E: NotAttempted 1 (430)
        E: TransactionDone
        ",
    );
    // Every recipient refused: DATA is not written, the transaction is reset.
    s.start(&["x@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        C: RCPT TO:<x@example.org>
        S: 550 5.1.1 User unknown
        E: Rcpt 0: 550 5.1.1
        C: RSET
        S: 250 2.0.0 ok
        E: TransactionDone
        ",
    );
}

#[test]
fn dovecot_bdat_with_last() {
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    let (from, _, rcpts) = envelope(&["alice@example.org", "bob@example.org"]);
    let params = MailParams {
        size: Some(15),
        body: Some(Body::BinaryMime),
        ..MailParams::default()
    };
    s.conn.start_transaction_bdat(from, params, rcpts).unwrap();
    // Pipelined: the chunks may follow before the RCPT replies.
    s.conn.bdat_chunk(10, false).unwrap();
    s.run(
        "
        C: MAIL FROM:<sender@example.org> SIZE=15 BODY=BINARYMIME
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: BDAT 10
        ",
    );
    s.conn.bdat_chunk(5, true).unwrap();
    assert_eq!(s.conn.bdat_chunk(1, true), Err(ClientError::OutOfSequence));
    s.run(
        "
        C: BDAT 5 LAST
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 250 2.1.5 OK
        E: Rcpt 0: 250 2.1.5
        S: 250 2.1.5 OK
        E: Rcpt 1: 250 2.1.5
        S: 250 2.0.0 Added 10 octets
        E: Bdat 250 2.0.0
        S: 250 2.0.0 <alice@example.org> 0PcfCQPrCGtQGAAAg+zDdQ Saved
        E: Result 0: 250 2.0.0
        S: 552 5.2.2 <bob@example.org> Quota exceeded (mailbox for user is full)
        E: Result 1: 552 5.2.2
        E: TransactionDone
        ",
    );
}

#[test]
fn bdat_without_pipelining_waits_for_each_reply() {
    let mut s = Session::after(Protocol::Lmtp, PLAIN_HELLO);
    let (from, params, rcpts) = envelope(&["alice@example.org"]);
    s.conn.start_transaction_bdat(from, params, rcpts).unwrap();
    assert_eq!(s.conn.bdat_chunk(3, true), Err(ClientError::NotReady));
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        C: RCPT TO:<alice@example.org>
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        ",
    );
    s.conn.bdat_chunk(3, false).unwrap();
    assert_eq!(s.conn.bdat_chunk(3, true), Err(ClientError::NotReady));
    // A refused chunk fails the transaction: no further chunk (RFC 3030 §4).
    s.run(
        "
        C: BDAT 3
        S: 552 5.3.4 Message too big
        E: Bdat 552 5.3.4
        E: NotAttempted 0 (552 5.3.4)
        C: RSET
        ",
    );
    assert_eq!(
        s.conn.bdat_chunk(3, true),
        Err(ClientError::TransactionFailed)
    );
    s.run("S: 250 2.0.0 ok\nE: TransactionDone");
    assert_eq!(s.conn.bdat_chunk(3, true), Err(ClientError::NoTransaction));
}

#[test]
fn smtp_relay_one_reply_after_the_dot() {
    let mut s = Session::after(
        Protocol::Smtp,
        "
        S: 220 relay.example.org ESMTP Postfix
        E: Greeted 220
        C: EHLO gw.example.org
        S: 250-relay.example.org
        S: 250-PIPELINING
        S: 250-SIZE 10240000
        S: 250-ENHANCEDSTATUSCODES
        S: 250-8BITMIME
        S: 250-DSN
        S: 250-SMTPUTF8
        S: 250 CHUNKING
        E: Ready
        ",
    );
    assert_eq!(s.conn.capabilities().unwrap().size, Some(Some(10_240_000)));
    s.start(&["alice@example.net", "bob@example.net", "carol@example.net"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.net>
        C: RCPT TO:<bob@example.net>
        C: RCPT TO:<carol@example.net>
        C: DATA
        S: 250 2.1.0 Ok
        E: Mail 250 2.1.0
        S: 250 2.1.5 Ok
        E: Rcpt 0: 250 2.1.5
        S: 450 4.2.0 <bob@example.net>: Recipient address rejected: Greylisted
        E: Rcpt 1: 450 4.2.0
        S: 250 2.1.5 Ok
        E: Rcpt 2: 250 2.1.5
        S: 354 End data with <CR><LF>.<CR><LF>
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run(
        "
        S: 250 2.0.0 Ok: queued as 4ZxY1b2c3d
        E: Result 0: 250 2.0.0
        E: Result 2: 250 2.0.0
        E: TransactionDone
        ",
    );
}

#[test]
fn malformed_reply_after_the_dot_is_in_doubt() {
    let mut s = Session::after(Protocol::Lmtp, CYRUS_HELLO);
    s.start(&["alice@example.org", "bob@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<alice@example.org>
        C: RCPT TO:<bob@example.org>
        C: DATA
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        S: 250 2.1.5 ok
        E: Rcpt 1: 250 2.1.5
        S: 354 go ahead
        E: DataGoAhead
        ",
    );
    s.conn.data_sent().unwrap();
    s.run(
        "
        S: 250 2.1.5 Success
        E: Result 0: 250 2.1.5
        S: Success!
        E: ProtocolError malformed reply line
        E: Unconfirmed 1
        E: Closed
        ",
    );
}

#[test]
fn dot_after_354_with_no_recipient() {
    // A server that says 354 although every RCPT was refused gets an empty message.
    let mut s = Session::after(Protocol::Lmtp, DOVECOT_HELLO);
    s.start(&["x@example.org"]);
    s.run(
        "
        C: MAIL FROM:<sender@example.org>
        C: RCPT TO:<x@example.org>
        C: DATA
        S: 250 2.1.0 OK
        E: Mail 250 2.1.0
        S: 550 5.1.1 unknown
        E: Rcpt 0: 550 5.1.1
        S: 354 OK
        C: .
        S: 503 5.5.1 No valid recipients
        C: RSET
        S: 250 2.0.0 OK
        E: TransactionDone
        ",
    );
}

#[test]
fn verify_asks_mail_rcpt_rset_and_sends_no_content() {
    let mut s = Session::after(Protocol::Lmtp, CYRUS_HELLO);
    let to = ForwardPath::Mailbox(Mailbox::parse("nosuchuser@example.org").unwrap());
    s.conn.verify(ReversePath::Null, to.clone()).unwrap();
    assert_eq!(s.conn.noop(), Err(ClientError::NotReady));
    s.run(
        "
        C: MAIL FROM:<>
        C: RCPT TO:<nosuchuser@example.org>
        C: RSET
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        S: 550 5.1.1 User unknown
        E: Rcpt 0: 550 5.1.1
        S: 250 2.0.0 ok
        E: Rset 250 2.0.0
        ",
    );
    assert!(s.conn.is_idle());
    // Without PIPELINING: one command at a time, the same three.
    let mut s = Session::after(Protocol::Lmtp, PLAIN_HELLO);
    s.conn.verify(ReversePath::Null, to).unwrap();
    s.run(
        "
        C: MAIL FROM:<>
        S: 250 2.1.0 ok
        E: Mail 250 2.1.0
        C: RCPT TO:<nosuchuser@example.org>
        S: 250 2.1.5 ok
        E: Rcpt 0: 250 2.1.5
        C: RSET
        S: 250 2.0.0 ok
        E: Rset 250 2.0.0
        ",
    );
    assert!(s.conn.is_idle());
}
