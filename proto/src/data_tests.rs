//! Tests of the DATA codec and BDAT chunks ([`super`]): the terminator and unstuffing
//! tables, every SMTP-smuggling lookalike kept as content, bare line endings counted and
//! normalised, the encoder's table, and proptests of split-invariance (decoder and
//! encoder) and of `decode(encode(x))`.

use super::*;
use proptest::prelude::*;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    out: Vec<u8>,
    consumed: usize,
    finished: bool,
    bare_lf: u64,
    bare_cr: u64,
}

fn decode_chunks(policy: BareLineEndings, chunks: &[&[u8]]) -> Outcome {
    let mut decoder = DataDecoder::new(policy);
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut finished = false;
    for chunk in chunks {
        let d = decoder.decode(chunk, &mut out);
        assert!(d.consumed <= chunk.len());
        consumed += d.consumed;
        if d.finished {
            finished = true;
            break;
        }
        assert_eq!(d.consumed, chunk.len());
    }
    assert_eq!(finished, decoder.is_finished());
    Outcome {
        out,
        consumed,
        finished,
        bare_lf: decoder.bare_lf(),
        bare_cr: decoder.bare_cr(),
    }
}

/// [`decode_chunks`] through [`DataDecoder::decode_lent`]: each chunk's content is either a
/// prefix of the chunk (lent) or what the decoder appended to `out`, never both.
fn decode_chunks_lent(policy: BareLineEndings, chunks: &[&[u8]]) -> (Outcome, usize) {
    let mut decoder = DataDecoder::new(policy);
    let mut content = Vec::new();
    let mut consumed = 0;
    let mut finished = false;
    let mut lent = 0;
    for chunk in chunks {
        let mut out = Vec::new();
        let (d, whole) = decoder.decode_lent(chunk, &mut out);
        if let Some(end) = whole {
            assert!(out.is_empty() && end <= d.consumed);
            content.extend_from_slice(&chunk[..end]);
            lent += 1;
        } else {
            content.extend_from_slice(&out);
        }
        consumed += d.consumed;
        if d.finished {
            finished = true;
            break;
        }
    }
    let outcome = Outcome {
        out: content,
        consumed,
        finished,
        bare_lf: decoder.bare_lf(),
        bare_cr: decoder.bare_cr(),
    };
    (outcome, lent)
}

fn decode(policy: BareLineEndings, input: &[u8]) -> Outcome {
    decode_chunks(policy, &[input])
}

fn encode_chunks(chunks: &[&[u8]]) -> Vec<u8> {
    let mut encoder = DataEncoder::new();
    let mut out = Vec::new();
    for chunk in chunks {
        encoder.encode(chunk, &mut out);
    }
    encoder.finish(&mut out);
    out
}

/// Splits `input` at the given cut points (taken modulo the length, sorted).
fn split<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for cut in cuts {
        chunks.push(&input[start..cut]);
        start = cut;
    }
    chunks.push(&input[start..]);
    chunks
}

use BareLineEndings::{Normalize, Preserve};

#[test]
fn terminator_and_unstuffing() {
    // (input, content, consumed)
    let cases: &[(&[u8], &[u8], usize)] = &[
        (b".\r\n", b"", 3),
        (b".\r\nQUIT\r\n", b"", 3),
        (b"a\r\n.\r\n", b"a\r\n", 6),
        (b"a\r\nb\r\n.\r\n", b"a\r\nb\r\n", 9),
        (b"a\r\n.\r\nMAIL FROM:<>\r\n", b"a\r\n", 6),
        (b"\r\n.\r\n", b"\r\n", 5),
        // Dot-unstuffing: a leading "." followed by anything else is removed.
        (b"..\r\n.\r\n", b".\r\n", 7),
        (b"...\r\n.\r\n", b"..\r\n", 8),
        (b"..x\r\n.\r\n", b".x\r\n", 8),
        (b".x\r\n.\r\n", b"x\r\n", 7),
        (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n", 10),
        (b"a\r\n. \r\n.\r\n", b"a\r\n \r\n", 10),
        // A dot inside a line is content.
        (b"a.\r\n.\r\n", b"a.\r\n", 7),
        (b"a\r\nb.\r\n.\r\n", b"a\r\nb.\r\n", 10),
        // Trailing spaces after the dot: not the terminator; dot removed.
        (b". \r\n.\r\n", b" \r\n", 7),
    ];
    for (input, content, consumed) in cases {
        for policy in [Normalize, Preserve] {
            let got = decode(policy, input);
            assert_eq!(got.out, *content, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(got.consumed, *consumed, "{input:?}");
            assert!(got.finished, "{input:?}");
            assert_eq!((got.bare_lf, got.bare_cr), (0, 0), "{input:?}");
        }
    }
}

#[test]
fn unterminated_data_is_not_finished() {
    for input in [
        &b""[..],
        b".",
        b".\r",
        b"a\r\n.",
        b"a\r\n.\r",
        b"a\r\n",
        b"a",
        b"\r",
    ] {
        let got = decode(Normalize, input);
        assert!(!got.finished, "{input:?}");
        assert_eq!(got.consumed, input.len());
    }
}

/// Every smuggling lookalike is content, and each bare ending in it is counted.
#[test]
fn smuggling_variants_never_end_the_message() {
    /// (lookalike, bare LF, bare CR, content with Normalize, content with Preserve)
    type Case = (&'static [u8], u64, u64, &'static [u8], &'static [u8]);
    let cases: &[Case] = &[
        // LF . LF: no line start after the bare LF, so the "." is content.
        (b"\n.\n", 2, 0, b"\r\n.\r\n", b"\n.\n"),
        // LF . CRLF
        (b"\n.\r\n", 1, 0, b"\r\n.\r\n", b"\n.\r\n"),
        // CRLF . LF: "." at a line start followed by LF: removed, LF bare.
        (b"\r\n.\n", 1, 0, b"\r\n\r\n", b"\r\n\n"),
        // CR . CR
        (b"\r.\r", 0, 2, b"\r\n.\r\n", b"\r.\r"),
        // CRLF . CR: "." removed, CR bare.
        (b"\r\n.\r", 0, 1, b"\r\n\r\n", b"\r\n\r"),
        // CR . CRLF
        (b"\r.\r\n", 0, 1, b"\r\n.\r\n", b"\r.\r\n"),
        // LF . CR
        (b"\n.\r", 1, 1, b"\r\n.\r\n", b"\n.\r"),
        // CR . LF
        (b"\r.\n", 1, 1, b"\r\n.\r\n", b"\r.\n"),
        // Bare CR before a real CRLF . CRLF would end; here the CR LF is split by "."
        (b"\r\r\n.\n", 1, 1, b"\r\n\r\n\r\n", b"\r\r\n\n"),
        // LF LF . LF
        (b"\n\n.\n", 3, 0, b"\r\n\r\n.\r\n", b"\n\n.\n"),
    ];
    for (lookalike, lf, cr, normalized, preserved) in cases {
        // After "x" (mid-line), then one real line and the real terminator.
        let mut input = b"x".to_vec();
        input.extend_from_slice(lookalike);
        input.extend_from_slice(b"MAIL FROM:<evil>\r\n.\r\nQUIT\r\n");
        for (policy, content) in [(Normalize, normalized), (Preserve, preserved)] {
            let got = decode(policy, &input);
            let mut want = b"x".to_vec();
            want.extend_from_slice(content);
            want.extend_from_slice(b"MAIL FROM:<evil>\r\n");
            let name = String::from_utf8_lossy(lookalike);
            assert!(got.finished, "{name:?}");
            assert_eq!(got.out, want, "{policy:?} {name:?}");
            assert_eq!(got.consumed, input.len() - 6, "{name:?}");
            assert_eq!((got.bare_lf, got.bare_cr), (*lf, *cr), "{name:?}");
        }
    }
}

#[test]
fn dot_after_bare_ending_is_content() {
    // ".\r\n" after a bare CR: content, the dot is kept, and it is not an end.
    let got = decode(Preserve, b"a\r.\r\nb\r\n.\r\n");
    assert_eq!(got.out, b"a\r.\r\nb\r\n");
    assert_eq!((got.bare_lf, got.bare_cr, got.finished), (0, 1, true));
    // ".." after a bare LF is not unstuffed.
    let got = decode(Normalize, b"a\n..\r\n.\r\n");
    assert_eq!(got.out, b"a\r\n..\r\n");
    assert_eq!((got.bare_lf, got.bare_cr), (1, 0));
    // A bare ending at the very start.
    let got = decode(Normalize, b"\n.\r\n.\r\n");
    assert_eq!(got.out, b"\r\n.\r\n");
    assert_eq!(got.bare_lf, 1);
    let got = decode(Preserve, b"\r.\r\n.\r\n");
    assert_eq!(got.out, b"\r.\r\n");
    assert_eq!(got.bare_cr, 1);
}

#[test]
fn bare_endings_in_content() {
    let got = decode(Normalize, b"a\nb\rc\r\r\nd\n\r\n.\r\n");
    assert_eq!(got.out, b"a\r\nb\r\nc\r\n\r\nd\r\n\r\n");
    assert_eq!((got.bare_lf, got.bare_cr), (2, 2));
    let got = decode(Preserve, b"a\nb\rc\r\r\nd\n\r\n.\r\n");
    assert_eq!(got.out, b"a\nb\rc\r\r\nd\n\r\n");
    assert_eq!((got.bare_lf, got.bare_cr), (2, 2));
}

#[test]
fn finished_decoder_consumes_nothing_until_reset() {
    let mut decoder = DataDecoder::new(Normalize);
    let mut out = Vec::new();
    let d = decoder.decode(b"\n.\r\n", &mut out);
    assert_eq!((d.consumed, d.finished), (4, false));
    let d = decoder.decode(b"a\r\n.\r\nb", &mut out);
    assert_eq!((d.consumed, d.finished), (6, true));
    let d = decoder.decode(b"c\r\n.\r\n", &mut out);
    assert_eq!((d.consumed, d.finished), (0, true));
    assert_eq!(out, b"\r\n.\r\na\r\n");
    assert_eq!(decoder.bare_lf(), 1);
    decoder.reset();
    assert!(!decoder.is_finished() && !decoder.saw_bare_line_endings());
    out.clear();
    let d = decoder.decode(b".\r\n", &mut out);
    assert_eq!((d.consumed, d.finished, out.len()), (3, true, 0));
}

#[test]
fn content_that_is_a_prefix_of_its_input_is_lent_not_copied() {
    let mut d = DataDecoder::new(Normalize);
    let mut out = Vec::new();
    let (got, whole) = d.decode_lent(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n", &mut out);
    assert_eq!((got.consumed, got.finished, whole), (23, true, Some(20)));
    assert!(out.is_empty());
    // A stuffed dot, a bare LF to normalise, a CR held from the chunk before: copied.
    for (first, input) in [
        (&b""[..], &b"a\r\n..b\r\n"[..]),
        (b"", b"a\nb"),
        (b"a\r", b"\nb\r\n"),
    ] {
        let mut d = DataDecoder::new(Normalize);
        let mut out = Vec::new();
        let _ = d.decode(first, &mut out);
        out.clear();
        let (_, whole) = d.decode_lent(input, &mut out);
        assert_eq!(whole, None, "{input:?}");
        assert!(!out.is_empty());
    }
}

#[test]
fn every_split_position_gives_identical_output() {
    let input: &[u8] = b"..a\r\n.\rb\n.\n\r\n.x\r\r\n..\r\n\r\n.\r\r\n.\r.\r\n.\r\nNEXT\r\n";
    for policy in [Normalize, Preserve] {
        let whole = decode(policy, input);
        assert!(whole.finished);
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let parts = [&input[..i], &input[i..j], &input[j..]];
                assert_eq!(decode_chunks(policy, &parts), whole, "split {i} {j}");
            }
        }
        let bytewise: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(decode_chunks(policy, &bytewise), whole);
    }
}

#[test]
fn encoder_table() {
    let cases: &[(&[u8], &[u8])] = &[
        (b"", b".\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\r\n.b\r\n..\r\n", b"a\r\n..b\r\n...\r\n.\r\n"),
        (b"a.b\r\n", b"a.b\r\n.\r\n"),
        // Bare endings go out as CR LF, and start a line (the "." is stuffed).
        (b"a\n.\n", b"a\r\n..\r\n.\r\n"),
        (b"a\r.\r", b"a\r\n..\r\n.\r\n"),
        (b"a\r\r\n.", b"a\r\n\r\n..\r\n.\r\n"),
        (b"\n", b"\r\n.\r\n"),
        (b"\r", b"\r\n.\r\n"),
        (b"\n\r", b"\r\n\r\n.\r\n"),
    ];
    for (input, wire) in cases {
        assert_eq!(
            encode_chunks(&[input]),
            *wire,
            "{:?}",
            String::from_utf8_lossy(input)
        );
        let bytewise: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(encode_chunks(&bytewise), *wire);
    }
}

#[test]
fn encoder_is_reusable_after_finish() {
    let mut encoder = DataEncoder::new();
    let mut out = Vec::new();
    encoder.encode(b"a\r", &mut out);
    encoder.finish(&mut out);
    encoder.encode(b"\n.b", &mut out);
    encoder.finish(&mut out);
    assert_eq!(out, b"a\r\n.\r\n\r\n..b\r\n.\r\n");
}

#[test]
fn bdat() {
    let mut chunk = BdatReader::new(0);
    assert!(chunk.is_done());
    assert_eq!(chunk.take(b"BDAT"), (&b""[..], true));

    let mut chunk = BdatReader::new(7);
    assert_eq!(chunk.take(b""), (&b""[..], false));
    assert_eq!(chunk.take(b"a\r\n."), (&b"a\r\n."[..], false));
    assert_eq!(chunk.remaining(), 3);
    assert_eq!(chunk.take(b"\r\nxNOOP\r\n"), (&b"\r\nx"[..], true));
    assert_eq!(chunk.take(b"NOOP"), (&b""[..], true));

    let mut chunk = BdatReader::new(u64::MAX);
    assert_eq!(chunk.take(b"abc"), (&b"abc"[..], false));
    assert_eq!(chunk.remaining(), u64::MAX - 3);
}

/// Wire-ish bytes: mostly the octets that matter to the codec.
fn smtpish() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            3 => Just(b'\r'),
            3 => Just(b'\n'),
            3 => Just(b'.'),
            2 => Just(b'a'),
            1 => any::<u8>(),
        ],
        0..300,
    )
}

/// Content made of CR LF terminated lines without bare endings.
fn crlf_lines() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'a'), Just(b' ')], 0..8),
        0..20,
    )
    .prop_map(|lines| {
        let mut out = Vec::new();
        for line in lines {
            out.extend_from_slice(&line);
            out.extend_from_slice(b"\r\n");
        }
        out
    })
}

/// `x` with bare endings as CR LF and a final CR LF if the last line is unterminated.
fn canonical(x: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < x.len() {
        match x[i] {
            b'\r' if x.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

proptest! {
    #[test]
    fn decoder_any_split_same_result(
        input in smtpish(),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
        preserve in any::<bool>(),
    ) {
        let policy = if preserve { Preserve } else { Normalize };
        let whole = decode(policy, &input);
        prop_assert_eq!(&decode_chunks(policy, &split(&input, &cuts)), &whole);
    }

    #[test]
    fn encoder_any_split_same_result(
        input in smtpish(),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        prop_assert_eq!(encode_chunks(&split(&input, &cuts)), encode_chunks(&[&input]));
    }

    #[test]
    fn decoder_lent_any_split_same_result(
        input in smtpish(),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
        preserve in any::<bool>(),
    ) {
        let policy = if preserve { Preserve } else { Normalize };
        let whole = decode(policy, &input);
        prop_assert_eq!(&decode_chunks_lent(policy, &split(&input, &cuts)).0, &whole);
    }

    #[test]
    fn round_trip_crlf_lines(x in crlf_lines(), extra in smtpish()) {
        let mut wire = encode_chunks(&[&x]);
        let message_len = wire.len();
        wire.extend_from_slice(&extra); // pipelined after the message
        for policy in [Normalize, Preserve] {
            let got = decode(policy, &wire);
            prop_assert!(got.finished);
            prop_assert_eq!(got.consumed, message_len);
            prop_assert_eq!(&got.out, &x);
            prop_assert_eq!((got.bare_lf, got.bare_cr), (0, 0));
        }
    }

    #[test]
    fn round_trip_any_bytes(x in smtpish()) {
        let wire = encode_chunks(&[&x]);
        // The decoder never ends early on encoder output.
        let got = decode(Preserve, &wire);
        prop_assert!(got.finished);
        prop_assert_eq!(got.consumed, wire.len());
        prop_assert_eq!(&got.out, &canonical(&x));
        prop_assert_eq!((got.bare_lf, got.bare_cr), (0, 0));
    }

    #[test]
    fn fuzz_entry_point(input in proptest::collection::vec(any::<u8>(), 0..400)) {
        crate::fuzzing::data_stream(&input);
    }
}
