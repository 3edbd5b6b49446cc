//! Benchmarks of the wire protocol: `cargo bench -p postern-proto --bench proto`.

fn main() {
    divan::main();
}

/// Deterministic, realistic message text: 72-octet lines of words, CR LF terminated, with
/// about one line in 16 starting with "." so that stuffing and unstuffing happen.
fn message_text(size: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "mail",
        "gateway",
        "postern",
        "delivery",
        "message",
        "Received:",
        "from",
        "by",
        "with",
        "ESMTPS",
        "id",
        "for",
        "<user@example.org>;",
        "a",
        "of",
        "and",
        "to",
        "in",
        "is",
        "it",
        "that",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut text = Vec::with_capacity(size + 80);
    while text.len() < size {
        let mut line = String::new();
        if next() % 16 == 0 {
            line.push('.');
        }
        while line.len() < 72 {
            let word = WORDS[(next() % WORDS.len() as u64) as usize];
            line.push_str(word);
            line.push(' ');
        }
        line.truncate(72);
        text.extend_from_slice(line.as_bytes());
        text.extend_from_slice(b"\r\n");
    }
    text
}

mod data {
    use divan::counter::BytesCount;
    use divan::{Bencher, black_box};
    use postern_proto::data::{BareLineEndings, DataDecoder, DataEncoder};

    const SIZES: &[usize] = &[4 << 10, 64 << 10, 1 << 20];

    /// Dot-unstuffing a whole message arriving in one buffer, terminator included.
    #[divan::bench(args = SIZES)]
    fn decode(bencher: Bencher, size: usize) {
        let text = super::message_text(size);
        let mut wire = Vec::new();
        let mut encoder = DataEncoder::new();
        encoder.encode(&text, &mut wire);
        encoder.finish(&mut wire);
        let mut out = Vec::with_capacity(wire.len());
        bencher
            .counter(BytesCount::of_slice(&wire))
            .bench_local(|| {
                out.clear();
                let mut decoder = DataDecoder::new(BareLineEndings::Normalize);
                let d = decoder.decode(black_box(&wire), &mut out);
                assert!(d.finished);
            });
    }

    /// Dot-stuffing a whole message from one buffer, terminator included.
    #[divan::bench(args = SIZES)]
    fn encode(bencher: Bencher, size: usize) {
        let text = super::message_text(size);
        let mut out = Vec::with_capacity(text.len() + text.len() / 32 + 8);
        bencher
            .counter(BytesCount::of_slice(&text))
            .bench_local(|| {
                out.clear();
                let mut encoder = DataEncoder::new();
                encoder.encode(black_box(&text), &mut out);
                encoder.finish(&mut out);
            });
    }
}

mod command {
    use divan::counter::ItemsCount;
    use divan::{Bencher, black_box};
    use postern_proto::Command;
    use postern_proto::line::{Frame, LineFramer, Status};

    /// A pipelined transaction as a busy client sends it: one MAIL, several RCPTs, DATA.
    fn transaction() -> Vec<u8> {
        let mut wire =
            b"MAIL FROM:<newsletter@lists.example.net> SIZE=40960 BODY=8BITMIME\r\n".to_vec();
        for i in 0..8 {
            wire.extend_from_slice(format!("RCPT TO:<user{i}@example.org>\r\n").as_bytes());
        }
        wire.extend_from_slice(b"RCPT TO:<alice+news@example.org> NOTIFY=FAILURE ORCPT=rfc822;alice@example.org\r\nDATA\r\nRSET\r\nNOOP\r\n");
        wire
    }

    /// Framing and parsing every line of the transaction.
    #[divan::bench]
    fn frame_and_parse(bencher: Bencher) {
        let wire = transaction();
        let lines = wire.iter().filter(|&&b| b == b'\n').count();
        bencher.counter(ItemsCount::new(lines)).bench_local(|| {
            let mut framer = LineFramer::new(512);
            let mut rest = black_box(&wire[..]);
            let mut n = 0;
            while let (used, Status::Complete(Frame::Line(line))) = framer.frame(rest) {
                n += usize::from(Command::parse(line).is_ok());
                rest = &rest[used..];
            }
            assert_eq!(n, lines);
        });
    }

    /// Parsing one RCPT TO line, the commonest command.
    #[divan::bench]
    fn parse_rcpt(bencher: Bencher) {
        bencher
            .counter(ItemsCount::new(1usize))
            .bench_local(|| Command::parse(black_box(b"RCPT TO:<user7@example.org>")));
    }
}
