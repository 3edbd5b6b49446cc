//! The client state machine under arbitrary cuts of its input: a scripted delivery agent fed
//! in any chunking must give the same events and output, and any reply soup must neither
//! panic nor break the in-doubt promise (proptest); the fuzz entry point replays a session.

#![allow(clippy::unwrap_used, reason = "test helpers: a panic is a failed test")]

mod dialogue;

use dialogue::*;
use postern_proto::client::{ClientConnection, ClientEvent, Protocol, fuzz};
use proptest::prelude::*;

#[test]
fn a_whole_session_in_one_chunk_is_unsolicited() {
    // Replies can only answer commands already written: a reply read in the same input as
    // the reply that released its command came too early.
    let (events, _) = scripted(Protocol::Lmtp, &[&CYRUS_ROUNDS.concat()]);
    assert_eq!(events, ["Greeted 220", "Unexpected 250", "Closed"]);
}

/// A whole session driven by a scripted delivery agent, fed in the given chunks.
fn scripted(protocol: Protocol, chunks: &[&[u8]]) -> (Vec<String>, Vec<u8>) {
    let mut conn = ClientConnection::new(protocol, "gw.example.org".to_owned());
    let (mut events, mut out, mut started) = (Vec::new(), Vec::new(), false);
    for chunk in chunks {
        conn.handle_input(chunk);
        while let Some(e) = conn.poll_event() {
            match e {
                ClientEvent::Ready(_) if !started => {
                    started = true;
                    let (from, params, rcpts) = envelope(&[
                        "alice@example.org",
                        "nosuchuser@example.org",
                        "bob@example.org",
                    ]);
                    conn.start_transaction(from, params, rcpts).unwrap();
                }
                ClientEvent::DataGoAhead => conn.data_sent().unwrap(),
                _ => {}
            }
            events.push(render(&e));
        }
        conn.poll_transmit(&mut out);
    }
    (events, out)
}

/// What Cyrus sends, one round per client flush: greeting; LHLO reply; the replies to the
/// pipelined MAIL, RCPTs and DATA; the replies after the dot. A round can only follow the
/// client's previous write, so chunks never span two rounds.
const CYRUS_ROUNDS: &[&[u8]] = &[
    b"220 localhost Cyrus LMTP 3.6.1-Debian-3.6.1-4+deb12u5 server ready\r\n",
    b"250-localhost\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250-SIZE\r\n\
250-AUTH EXTERNAL\r\n250-IGNOREQUOTA\r\n250 Ok SESSIONID=<cyrus-1>\r\n",
    b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n\
550-Mailbox unknown.  Either there is no mailbox associated with this\r\n\
550-name or you do not have authorization to see it.\r\n550 5.1.1 User unknown\r\n\
250 2.1.5 ok\r\n354 go ahead\r\n",
    b"250 2.1.5 Success SESSIONID=<cyrus-2>\r\n451 4.2.0 Mailbox busy\r\n",
];

/// Splits each round at the given cut points (taken modulo the round's length).
fn cut_rounds<'a>(rounds: &[&'a [u8]], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    for round in rounds {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % round.len()).collect();
        at.push(0);
        at.push(round.len());
        at.sort_unstable();
        at.dedup();
        chunks.extend(at.windows(2).map(|w| &round[w[0]..w[1]]));
    }
    chunks
}

proptest! {
    #[test]
    fn any_chunking_gives_the_same_events(cuts in proptest::collection::vec(any::<usize>(), 0..12))
    {
        let lines: Vec<&[u8]> =
            CYRUS_ROUNDS.iter().flat_map(|r| r.split_inclusive(|&b| b == b'\n')).collect();
        let (want_events, want_out) = scripted(Protocol::Lmtp, &lines);
        prop_assert_eq!(want_events.len(), 10);
        let (events, out) = scripted(Protocol::Lmtp, &cut_rounds(CYRUS_ROUNDS, &cuts));
        prop_assert_eq!(events, want_events);
        prop_assert_eq!(out, want_out);
    }

    #[test]
    fn fuzz_entry_survives_random_bytes(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        fuzz::client_replies(&input);
    }

    #[test]
    fn fuzz_entry_survives_reply_soup(
        seed in any::<u8>(),
        picks in proptest::collection::vec(0..REPLY_SOUP.len(), 0..30),
    ) {
        let mut input = vec![seed];
        for i in picks {
            input.extend_from_slice(REPLY_SOUP[i].as_bytes());
        }
        fuzz::client_replies(&input);
    }
}

/// Real reply lines (and a few bad ones) for the fuzz entry point to choke on.
const REPLY_SOUP: &[&str] = &[
    "220 localhost Dovecot (Debian) ready.\r\n",
    "250-localhost\r\n",
    "250-CHUNKING\r\n",
    "250-STARTTLS\r\n",
    "250-AUTH PLAIN\r\n",
    "250 PIPELINING\r\n",
    "250 2.1.0 OK\r\n",
    "250 2.1.5 OK\r\n",
    "550-Mailbox unknown.\r\n",
    "550 5.1.1 User unknown\r\n",
    "354 OK\r\n",
    "250 2.0.0 <alice@example.org> Saved\r\n",
    "451 4.3.0 Temporary failure\r\n",
    "552 5.2.2 Quota exceeded\r\n",
    "503 5.5.0 No valid recipients\r\n",
    "430 Authentication required\r\n",
    "235 Authenticated!\r\n",
    "334 \r\n",
    "220 2.0.0 Ready to start TLS\r\n",
    "421 4.3.2 Shutting down\r\n",
    "garbage\r\n",
    "250",
];

#[test]
fn fuzz_entry_replays_a_full_session() {
    // Reaches the end of a transaction without tripping its own assertions.
    let mut input = vec![0u8];
    input.extend(CYRUS_ROUNDS.concat());
    input.extend_from_slice(b"250 2.1.5 Success\r\n");
    fuzz::client_replies(&input);
}
