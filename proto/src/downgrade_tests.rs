#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

use super::*;

fn convert(input: &[u8]) -> Vec<u8> {
    let mut d = Downgrade::new(true);
    let mut out = Vec::new();
    d.feed(input, &mut out);
    d.finish(&mut out);
    out
}

fn convert_by(input: &[u8], size: usize) -> Vec<u8> {
    let mut d = Downgrade::new(true);
    let mut out = Vec::new();
    for chunk in input.chunks(size) {
        d.feed(chunk, &mut out);
    }
    d.finish(&mut out);
    out
}

fn text(out: &[u8]) -> &str {
    std::str::from_utf8(out).unwrap()
}

#[test]
fn a_7bit_message_is_unchanged() {
    let m = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n.dot\r\n";
    assert_eq!(convert(m), m);
    let no_eol = b"Subject: x\r\n\r\nlast line";
    assert_eq!(convert(no_eol), no_eol);
    let header_only = b"Subject: x\r\n";
    assert_eq!(convert(header_only), header_only);
}

#[test]
fn an_8bit_single_part_becomes_quoted_printable() {
    let m = "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: 8bit\r\nSubject: caf\r\n\r\nd\u{e9}j\u{e0} vu = ok \r\nend\r\n";
    let out = convert(m.as_bytes());
    assert_eq!(
        text(&out),
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: quoted-printable\r\nSubject: caf\r\n\r\n\
         d=C3=A9j=C3=A0 vu =3D ok=20\r\nend\r\n"
    );
}

#[test]
fn a_folded_cte_field_is_replaced_whole() {
    let m = b"Content-Transfer-Encoding:\r\n  8BIT (comment)\r\nX: y\r\n\r\n\xff\r\n";
    let out = convert(m);
    assert_eq!(
        text(&out),
        "Content-Transfer-Encoding: quoted-printable\r\nX: y\r\n\r\n=FF\r\n"
    );
}

#[test]
fn long_lines_get_soft_breaks_and_decode_back() {
    let body: Vec<u8> = (0..500u32)
        .map(|i| [b'a', 0xe9, b' ', b'='][i as usize % 4])
        .collect();
    let mut m = b"Content-Transfer-Encoding: binary\r\n\r\n".to_vec();
    m.extend_from_slice(&body);
    m.extend_from_slice(b"\r\n");
    let out = convert(&m);
    let (head, encoded) = text(&out).split_once("\r\n\r\n").unwrap();
    assert_eq!(head, "Content-Transfer-Encoding: quoted-printable");
    for line in encoded.split("\r\n") {
        assert!(line.len() <= 76, "{line}");
    }
    assert!(encoded.is_ascii());
    let mut want = body.clone();
    want.extend_from_slice(b"\r\n");
    assert_eq!(decode_quoted_printable(encoded.as_bytes()), want);
}

const MULTI: &str = "MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"outer b\"\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
preamble\r\n\
--outer b\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
plain part\r\n\
--outer b\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
gr\u{fc}\u{df}e\r\n\
--outer b\r\n\
Content-Type: message/rfc822\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
Subject: inner\r\n\
Content-Type: multipart/alternative; boundary=in\r\n\
\r\n\
--in\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
\u{e9}t\u{e9}\r\n\
--in--\r\n\
--outer b--\r\n\
epilogue\r\n";

#[test]
fn multipart_parts_are_converted_one_by_one() {
    let out = convert(MULTI.as_bytes());
    let want = "MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"outer b\"\r\n\
Content-Transfer-Encoding: 7bit\r\n\
\r\n\
preamble\r\n\
--outer b\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
plain part\r\n\
--outer b\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
gr=C3=BC=C3=9Fe\r\n\
--outer b\r\n\
Content-Type: message/rfc822\r\n\
Content-Transfer-Encoding: 7bit\r\n\
\r\n\
Subject: inner\r\n\
Content-Type: multipart/alternative; boundary=in\r\n\
\r\n\
--in\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
=C3=A9t=C3=A9\r\n\
--in--\r\n\
--outer b--\r\n\
epilogue\r\n";
    assert_eq!(text(&out), want);
    assert!(out.is_ascii());
    let mut d = Downgrade::new(true);
    let mut sink = Vec::new();
    d.feed(MULTI.as_bytes(), &mut sink);
    assert_eq!(d.converted_parts(), 2);
    assert!(!d.eight_bit_headers());
}

#[test]
fn output_does_not_depend_on_the_cuts() {
    let whole = convert(MULTI.as_bytes());
    for size in [1, 2, 3, 7, 64] {
        assert_eq!(
            convert_by(MULTI.as_bytes(), size),
            whole,
            "chunks of {size}"
        );
    }
}

#[test]
fn a_trailing_space_across_a_cut_is_escaped_only_at_the_line_end() {
    let m = b"Content-Transfer-Encoding: 8bit\r\n\r\na \xe9 b \r\n";
    for size in 1..m.len() {
        assert_eq!(
            text(&convert_by(m, size)),
            "Content-Transfer-Encoding: quoted-printable\r\n\r\na =E9 b=20\r\n"
        );
    }
}

#[test]
fn undeclared_8bit_and_8bit_headers_pass_through_and_are_reported() {
    let m = "Subject: caf\u{e9}\r\n\r\nd\u{e9}j\u{e0}\r\n";
    let mut d = Downgrade::new(true);
    let mut out = Vec::new();
    d.feed(m.as_bytes(), &mut out);
    d.finish(&mut out);
    assert_eq!(out, m.as_bytes());
    assert!(d.eight_bit_headers());

    let mut d = Downgrade::new(false);
    let mut out = Vec::new();
    let declared = b"Content-Transfer-Encoding: 8bit\r\n\r\n\xe9\r\n";
    d.feed(declared, &mut out);
    d.finish(&mut out);
    assert_eq!(out, declared, "inspection only: nothing rewritten");
    assert!(!d.eight_bit_headers());
}

#[test]
fn a_line_longer_than_the_limit_is_encoded_in_pieces() {
    let mut m = b"Content-Transfer-Encoding: 8bit\r\n\r\n".to_vec();
    let mut body = vec![b'x'; MAX_LINE - 1];
    body.push(b'\r');
    body.extend_from_slice(b"\n\xe9 \r\n");
    m.extend_from_slice(&body);
    let out = convert(&m);
    let (_, encoded) = text(&out).split_once("\r\n\r\n").unwrap();
    assert_eq!(decode_quoted_printable(encoded.as_bytes()), body);
    assert_eq!(convert_by(&m, 1000), out);
}

#[test]
fn digest_children_are_messages() {
    let m = b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\n\xe9\r\n--d--\r\n";
    let out = convert(m);
    assert_eq!(
        text(&out),
        "Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9\r\n--d--\r\n"
    );
}

#[test]
fn boundaries_with_padding_and_nested_close_the_inner_levels() {
    // The outer boundary closes an inner multipart that never saw its own closing line.
    let m = b"Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n\
Content-Type: multipart/mixed; boundary=i\r\n\r\n--i \t\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\n\xe9\r\n--o\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\n\xe8\r\n--o--\r\n";
    let out = convert(m);
    assert!(out.is_ascii(), "{}", String::from_utf8_lossy(&out));
    assert!(text(&out).contains("=E9\r\n--o\r\n"));
    assert!(text(&out).ends_with("=E8\r\n--o--\r\n"));
}
