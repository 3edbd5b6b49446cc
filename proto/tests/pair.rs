//! Both state machines together: postern's client talking to postern's server in memory,
//! with the octets between them cut at arbitrary places. What the client reports per
//! recipient must be what the server's application decided, and the message the server
//! stores must be the message the client sent.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use postern_proto::client::{ClientConnection, ClientEvent, Protocol as ClientProtocol};
use postern_proto::data::DataEncoder;
use postern_proto::replies;
use postern_proto::server::{Protocol, ServerConfig, ServerEvent, ServerSession};
use postern_proto::{
    EnhancedCode, ForwardPath, MailParams, Mailbox, RcptParams, Reply, ReplyCode, ReversePath,
};
use proptest::prelude::*;

/// Per-recipient results as the client saw them: (index, code) or (index, 0) for in doubt.
type Results = Vec<(usize, u16)>;

/// Runs one LMTP transaction; `cut` decides how octets are split on the way.
fn run(
    rcpts: &[&str],
    body: &[u8],
    cut: &dyn Fn(usize) -> usize,
    lose_after: Option<usize>,
) -> (Results, Vec<Vec<u8>>) {
    let mut server = ServerSession::new(ServerConfig::new(Protocol::Lmtp, "store.test"));
    let mut client = ClientConnection::new(ClientProtocol::Lmtp, "gw.test".into());
    let paths: Vec<(ForwardPath, RcptParams)> = rcpts
        .iter()
        .map(|r| {
            (
                ForwardPath::Mailbox(Mailbox::parse(r).unwrap()),
                RcptParams::default(),
            )
        })
        .collect();
    let mut to_server = Vec::new();
    let mut to_client = Vec::new();
    let mut results = Vec::new();
    let mut stored = Vec::new();
    let mut current = Vec::new();
    let mut accepted: Vec<String> = Vec::new();
    let mut started = false;
    let mut done = false;
    let mut server_replies_after_dot = 0usize;
    let mut in_data_end = false;
    for _round in 0..10_000 {
        // Client side.
        while let Some(ev) = client.poll_event() {
            match ev {
                ClientEvent::Ready(_) if !started => {
                    started = true;
                    client
                        .start_transaction(ReversePath::Null, MailParams::default(), paths.clone())
                        .unwrap();
                }
                ClientEvent::DataGoAhead => {
                    let mut enc = DataEncoder::new();
                    enc.encode(body, &mut to_server);
                    enc.finish(&mut to_server);
                    client.data_sent().unwrap();
                }
                ClientEvent::RcptReply { index, reply } if !reply.is_positive() => {
                    results.push((index, reply.code().get()))
                }
                ClientEvent::RecipientResult { index, reply } => {
                    results.push((index, reply.code().get()))
                }
                ClientEvent::Unconfirmed { index } => results.push((index, 0)),
                ClientEvent::TransactionDone | ClientEvent::Closed => done = true,
                _ => {}
            }
        }
        client.poll_transmit(&mut to_server);
        if done {
            break;
        }
        // Octets to the server, cut.
        let n = cut(to_server.len()).min(to_server.len());
        let chunk: Vec<u8> = to_server.drain(..n).collect();
        server.handle_input(&chunk);
        while let Some(ev) = server.poll_event() {
            match ev {
                ServerEvent::Reply(r) => {
                    if in_data_end {
                        server_replies_after_dot += 1;
                    }
                    r.encode(&mut to_client);
                }
                ServerEvent::Mail { .. } => server.accept().unwrap(),
                ServerEvent::Rcpt { to, .. } => {
                    let last_rcpt = to.mailbox().unwrap().local_part().to_owned();
                    if last_rcpt.starts_with("unknown") {
                        server.respond(replies::unknown_user()).unwrap();
                    } else {
                        accepted.push(last_rcpt);
                        server.accept().unwrap();
                    }
                }
                ServerEvent::DataStart => server.accept().unwrap(),
                ServerEvent::Data(b) => current.extend_from_slice(&b),
                ServerEvent::DataEnd => {
                    stored.push(std::mem::take(&mut current));
                    in_data_end = true;
                    for rcpt in &accepted {
                        let reply = if rcpt.starts_with("full") {
                            Reply::new(
                                ReplyCode::new(552).unwrap(),
                                Some(EnhancedCode::new(5, 2, 2)),
                                "full",
                            )
                        } else if rcpt.starts_with("later") {
                            Reply::new(
                                ReplyCode::new(451).unwrap(),
                                Some(EnhancedCode::new(4, 2, 0)),
                                "later",
                            )
                        } else {
                            replies::queued("S1")
                        };
                        server.respond(reply).unwrap();
                    }
                }
                _ => {}
            }
        }
        // Octets to the client, cut; or the connection dies after `lose_after` final replies.
        if let Some(k) = lose_after {
            if in_data_end && server_replies_after_dot >= k {
                // Deliver only the first k post-dot replies, then drop the connection.
                let text = String::from_utf8(std::mem::take(&mut to_client)).unwrap();
                let mut kept = String::new();
                let mut seen_after = 0;
                let total_lines = text.lines().count();
                for (i, line) in text.lines().enumerate() {
                    let is_final = i >= total_lines - server_replies_after_dot;
                    if is_final {
                        if seen_after == k {
                            break;
                        }
                        seen_after += 1;
                    }
                    kept.push_str(line);
                    kept.push_str("\r\n");
                }
                client.handle_input(kept.as_bytes());
                client.connection_lost();
                continue;
            }
        }
        let n = cut(to_client.len()).min(to_client.len());
        let chunk: Vec<u8> = to_client.drain(..n).collect();
        client.handle_input(&chunk);
    }
    assert!(done, "the transaction did not finish");
    results.sort_unstable();
    (results, stored)
}

#[test]
fn mixed_outcomes_round_trip() {
    let body = b"Subject: pair\r\n\r\n.leading dot\r\n..two\r\nend".to_vec();
    let (results, stored) = run(
        &["a@x", "unknown@x", "full@x", "later@x", "b@x"],
        &body,
        &|n| n,
        None,
    );
    assert_eq!(
        results,
        vec![(0, 250), (1, 550), (2, 552), (3, 451), (4, 250)]
    );
    assert_eq!(
        stored,
        vec![b"Subject: pair\r\n\r\n.leading dot\r\n..two\r\nend\r\n".to_vec()]
    );
}

#[test]
fn lost_connection_after_the_dot_leaves_the_rest_in_doubt() {
    let (results, _) = run(&["a@x", "b@x", "c@x"], b"x\r\n", &|n| n, Some(1));
    assert_eq!(
        results,
        vec![(0, 250), (1, 0), (2, 0)],
        "one confirmed, two in doubt"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn any_cutting_gives_the_same_outcome(sizes in proptest::collection::vec(1usize..40, 1..8), body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let i = std::cell::Cell::new(0usize);
        let cut = |_n: usize| {
            let k = sizes[i.get() % sizes.len()];
            i.set(i.get() + 1);
            k
        };
        let (results, stored) = run(&["a@x", "unknown@x", "full@x", "b@x"], &body, &cut, None);
        prop_assert_eq!(results, vec![(0, 250), (1, 550), (2, 552), (3, 250)]);
        // What the server stored is the body with canonical line endings and a final CRLF.
        let mut want = Vec::new();
        let mut i = 0;
        while i < body.len() {
            match body[i] {
                b'\r' if body.get(i + 1) == Some(&b'\n') => { want.extend_from_slice(b"\r\n"); i += 1; }
                b'\r' | b'\n' => want.extend_from_slice(b"\r\n"),
                b => want.push(b),
            }
            i += 1;
        }
        if !want.is_empty() && !want.ends_with(b"\r\n") {
            want.extend_from_slice(b"\r\n");
        }
        prop_assert_eq!(stored, vec![want]);
    }
}

#[test]
fn a_private_keyword_the_server_offers_reaches_the_clients_capabilities() {
    let mut config = ServerConfig::new(Protocol::Lmtp, "store.test");
    config.private_keywords = vec!["XPOSTERN-TURNS".to_owned()];
    let mut server = ServerSession::new(config);
    let mut client = ClientConnection::new(ClientProtocol::Lmtp, "gw.test".into());
    let mut caps = None;
    for _ in 0..10 {
        let mut to_client = Vec::new();
        while let Some(ev) = server.poll_event() {
            if let ServerEvent::Reply(r) = ev {
                r.encode(&mut to_client);
            }
        }
        client.handle_input(&to_client);
        while let Some(ev) = client.poll_event() {
            if let ClientEvent::Ready(c) = ev {
                caps = Some(c);
            }
        }
        let mut to_server = Vec::new();
        client.poll_transmit(&mut to_server);
        server.handle_input(&to_server);
    }
    let caps = caps.expect("the LHLO was answered");
    assert!(
        caps.pipelining && caps.chunking,
        "the standard ones are still there"
    );
    assert!(caps.offers("xpostern-turns"));
    assert!(!caps.offers("XPOSTERN"));
    let plain = ServerConfig::new(Protocol::Lmtp, "store.test");
    assert!(plain.private_keywords.is_empty(), "none unless asked");
}
