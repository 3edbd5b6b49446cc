//! The `pipe` store with real commands: `/bin/sh` scripts written to a temporary directory
//! (the test uses a shell to write the commands; the agent itself never runs one). Every
//! command is bounded: time limits of a few seconds at most, sleeps that end on their own.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use postern::config::{ByteSize, Span};
use postern::delivery::pipe::LineEndings;
use postern::delivery::{
    MessageBody, OutboundEnvelope, Outcome, PipeStore, PipeStoreConfig, Recipient, Report, Scope,
};
use postern::proto::address::{ForwardPath, Mailbox, ReversePath};
use postern::proto::params::RcptParams;
use tokio::io::{AsyncRead, ReadBuf};

const BODY: &[u8] = b"Subject: pipe\r\n\r\nline one\r\n.line two\r\n";

fn rcpt(index: usize, address: &str) -> Recipient {
    Recipient {
        index,
        path: ForwardPath::Mailbox(Mailbox::parse(address).unwrap()),
        params: RcptParams::default(),
    }
}

fn envelope() -> OutboundEnvelope {
    let from = ReversePath::Mailbox(Mailbox::parse("sender@example.net").unwrap());
    OutboundEnvelope::new(from, BODY.len() as u64)
}

/// A script in `dir`, run as `/bin/sh <script> args…` (no exec of a freshly written file:
/// that races with fork in other test threads, ETXTBSY).
fn script(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn store(argv: &[&str], adjust: impl FnOnce(&mut PipeStoreConfig)) -> PipeStore {
    let mut c = PipeStoreConfig::new("pipe", argv);
    c.timeout = Span(Duration::from_secs(10));
    adjust(&mut c);
    PipeStore::from_config(&c).unwrap()
}

async fn deliver<B: MessageBody + ?Sized>(
    store: &PipeStore,
    to: &[Recipient],
    body: &B,
) -> (Report, Vec<usize>) {
    let mut order = Vec::new();
    let report = store
        .deliver(&envelope(), to, body, &mut |i, _: &Outcome| order.push(i))
        .await;
    (report, order)
}

fn show(o: &Outcome) -> String {
    let kind = match o {
        Outcome::Delivered(_) => "delivered",
        Outcome::Deferred(_) => "deferred",
        Outcome::Bounced(_) => "bounced",
        Outcome::InDoubt => "in-doubt",
        Outcome::NotAttempted(_) => "not-attempted",
    };
    match o.reply().and_then(|r| r.enhanced().map(|e| (r.code(), e))) {
        Some((code, e)) => format!("{kind} {code} {e}"),
        None => kind.to_owned(),
    }
}

#[tokio::test]
async fn delivers_with_expanded_arguments_and_lf_endings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap().to_owned();
    let sh = script(
        dir.path(),
        "save.sh",
        "out=$1; shift\n\
         printf '%s\\n' \"$@\" > \"$out/args.$3\"\n\
         cat > \"$out/msg.$3\"\n",
    );
    let store = store(
        &[
            "/bin/sh",
            &sh,
            &out,
            "${sender}",
            "${recipient}",
            "${user}",
            "at=${domain}",
            "$literal",
        ],
        |_| {},
    );
    let to = [
        rcpt(3, "alice+news@example.org"),
        rcpt(7, "\"bob smith\"@example.org"),
    ];
    let (report, order) = deliver(&store, &to, BODY).await;
    assert_eq!(order, [3, 7]);
    assert!(report.trouble.is_none(), "{report:?}");
    for i in [3, 7] {
        assert_eq!(show(report.outcome(i).unwrap()), "delivered 250 2.0.0");
    }
    let args = std::fs::read_to_string(dir.path().join("args.alice")).unwrap();
    assert_eq!(
        args,
        "sender@example.net\nalice+news@example.org\nalice\nat=example.org\n$literal\n"
    );
    // A space in a quoted local part stays inside one argument: no shell, no splitting.
    let args = std::fs::read_to_string(dir.path().join("args.bob smith")).unwrap();
    assert!(args.starts_with("sender@example.net\n\"bob smith\"@example.org\nbob smith\n"));
    let msg = std::fs::read(dir.path().join("msg.alice")).unwrap();
    assert_eq!(msg, b"Subject: pipe\n\nline one\n.line two\n");

    // line_endings: crlf passes the message as spooled.
    let store = store_crlf(&sh, &out);
    deliver(&store, &[rcpt(0, "carol@example.org")], BODY).await;
    assert_eq!(std::fs::read(dir.path().join("msg.carol")).unwrap(), BODY);
}

fn store_crlf(sh: &str, out: &str) -> PipeStore {
    store(
        &["/bin/sh", sh, out, "${sender}", "${recipient}", "${user}"],
        |c| c.line_endings = LineEndings::Crlf,
    )
}

#[tokio::test]
async fn exit_statuses_and_output_in_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let sh = script(
        dir.path(),
        "exit.sh",
        "cat > /dev/null\n\
         case $1 in\n\
           dsn) echo '5.2.2 Mailbox full, sorry' ;;\n\
           quiet) ;;\n\
           *) echo \"status $1\"; echo 'second line' >&2 ;;\n\
         esac\n\
         [ \"$1\" = dsn ] && exit 1\n\
         [ \"$1\" = quiet ] && exit 69\n\
         exit $1\n",
    );
    let store = store(&["/bin/sh", &sh, "${user}"], |_| {});
    let cases = [
        ("0", "delivered 250 2.0.0"),
        ("75", "deferred 451 4.3.0"),
        ("71", "deferred 451 4.3.0"),
        ("67", "bounced 550 5.1.1"),
        ("68", "bounced 550 5.1.2"),
        ("73", "bounced 554 5.2.0"),
        ("77", "bounced 550 5.7.0"),
        ("78", "bounced 554 5.3.5"),
        ("1", "bounced 554 5.3.0"),
        ("dsn", "bounced 552 5.2.2"),
        ("quiet", "bounced 554 5.3.0"),
    ];
    let to: Vec<Recipient> = cases
        .iter()
        .enumerate()
        .map(|(i, (user, _))| rcpt(i, &format!("{user}@example.org")))
        .collect();
    let (report, _) = deliver(&store, &to, BODY).await;
    for (i, (user, want)) in cases.iter().enumerate() {
        assert_eq!(&show(report.outcome(i).unwrap()), want, "{user}");
    }
    let text = |i: usize| report.outcome(i).unwrap().reply().unwrap().text();
    assert_eq!(
        text(1),
        "temporary failure (exit status 75). Command output: status 75"
    );
    assert_eq!(
        text(3),
        "user unknown (exit status 67). Command output: status 67"
    );
    assert!(
        text(8).starts_with("Command died with status 1: \""),
        "{}",
        text(8)
    );
    assert_eq!(text(9), "Mailbox full, sorry");
    assert_eq!(text(10), "service unavailable (exit status 69)");
    assert!(report.trouble.is_none());
}

#[tokio::test]
async fn time_limit_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let sh = script(
        dir.path(),
        "hang.sh",
        "sleep 20 &\n\
         echo $$ $! > \"$1\"\n\
         echo 'working on it'\n\
         wait\n",
    );
    let store = store(&["/bin/sh", &sh, pids.to_str().unwrap()], |c| {
        c.timeout = Span(Duration::from_millis(700));
    });
    let started = Instant::now();
    let (report, _) = deliver(&store, &[rcpt(0, "a@example.org")], BODY).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let o = report.outcome(0).unwrap();
    assert_eq!(show(o), "deferred 451 4.3.0");
    let text = o.reply().unwrap().text();
    assert!(
        text.contains("time limit") && text.ends_with("Command output: working on it"),
        "{text}"
    );
    assert_eq!(report.scope(), Scope::Message);
    let line = std::fs::read_to_string(&pids).unwrap();
    let sleeper: u32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(gone(sleeper), "the background sleep survived the kill");
}

/// The process has ended (gone, or a zombie waiting for init).
fn gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().map(|r| r.trim().chars().next()))
            .flatten();
        if matches!(state, None | Some('Z' | 'X')) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn output_beyond_the_limit_is_drained_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB on stdout and on stderr: more than any pipe buffer, so a reader that stopped
    // reading would hang the command until the time limit.
    let sh = script(
        dir.path(),
        "loud.sh",
        "echo 'first words'\n\
         head -c 8388608 /dev/zero >&2 &\n\
         head -c 8388608 /dev/zero\n\
         wait\n\
         exit 74\n",
    );
    let store = store(&["/bin/sh", &sh], |c| c.max_output = ByteSize(1024));
    let started = Instant::now();
    let (report, _) = deliver(&store, &[rcpt(0, "a@example.org")], BODY).await;
    assert!(started.elapsed() < Duration::from_secs(8));
    let o = report.outcome(0).unwrap();
    assert_eq!(show(o), "bounced 554 5.3.0");
    assert_eq!(
        o.reply().unwrap().text(),
        "input/output error (exit status 74). Command output: first words"
    );
}

#[tokio::test]
async fn a_command_that_ignores_its_input_and_exits_zero_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let sh = script(dir.path(), "ignore.sh", "exit 0\n");
    let store = store(&["/bin/sh", &sh], |_| {});
    let big = vec![b'x'; 4 << 20];
    let (report, _) = deliver(&store, &[rcpt(0, "a@example.org")], &big[..]).await;
    assert_eq!(show(report.outcome(0).unwrap()), "delivered 250 2.0.0");
}

#[tokio::test]
async fn offspring_holding_the_output_open_do_not_delay_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let sh = script(
        dir.path(),
        "daemon.sh",
        "cat > /dev/null\nsleep 8 &\necho $! > \"$1\"\nexit 0\n",
    );
    let store = store(&["/bin/sh", &sh, pids.to_str().unwrap()], |_| {});
    let started = Instant::now();
    let (report, _) = deliver(&store, &[rcpt(0, "a@example.org")], BODY).await;
    let took = started.elapsed();
    assert_eq!(show(report.outcome(0).unwrap()), "delivered 250 2.0.0");
    assert!(took < Duration::from_secs(4), "{took:?}");
    // Tidy up the sleeper.
    if let Ok(pid) = std::fs::read_to_string(&pids) {
        let _ = std::process::Command::new("kill").arg(pid.trim()).status();
    }
}

/// A body that yields `good` octets, then fails.
struct Failing {
    good: Vec<u8>,
}

struct FailingReader<'a> {
    rest: &'a [u8],
}

impl AsyncRead for FailingReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.rest.is_empty() {
            return Poll::Ready(Err(io::Error::other("checksum mismatch")));
        }
        let n = self.rest.len().min(buf.remaining());
        buf.put_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Poll::Ready(Ok(()))
    }
}

impl MessageBody for Failing {
    type Reader<'a> = tokio::io::BufReader<FailingReader<'a>>;

    async fn open(&self) -> io::Result<Self::Reader<'_>> {
        Ok(tokio::io::BufReader::new(FailingReader {
            rest: &self.good,
        }))
    }
}

#[tokio::test]
async fn a_body_that_fails_to_read_kills_the_command_before_its_input_ends() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("delivered");
    // Would "deliver" (write the marker) as soon as its input ends.
    let sh = script(
        dir.path(),
        "deliver.sh",
        "cat > /dev/null && echo yes > \"$1\"\n",
    );
    let store = store(&["/bin/sh", &sh, marker.to_str().unwrap()], |_| {});
    let body = Failing {
        good: b"Subject: half\r\n\r\n".repeat(1000),
    };
    let (report, _) = deliver(&store, &[rcpt(0, "a@example.org")], &body).await;
    let o = report.outcome(0).unwrap();
    assert_eq!(show(o), "deferred 451 4.3.0");
    assert!(o.reply().unwrap().text().contains("checksum mismatch"));
    assert_eq!(report.scope(), Scope::Message);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !marker.exists(),
        "the command saw a truncated message as complete"
    );
}

#[tokio::test]
async fn a_missing_command_is_the_stores_trouble() {
    let store = store(&["/nonexistent/postern-lda", "${recipient}"], |_| {});
    let to = [rcpt(0, "a@example.org"), rcpt(1, "b@example.org")];
    let (report, order) = deliver(&store, &to, BODY).await;
    assert_eq!(order, [0, 1]);
    assert_eq!(report.scope(), Scope::Store);
    for i in 0..2 {
        let o = report.outcome(i).unwrap();
        assert!(
            matches!(o, Outcome::NotAttempted(Some(r)) if r.text().contains("Cannot run")),
            "{o:?}"
        );
    }
}

#[tokio::test]
async fn one_run_for_all_recipients_when_not_per_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs");
    let sh = script(
        dir.path(),
        "batch.sh",
        "log=$1; shift\ncat > /dev/null\necho \"$*\" >> \"$log\"\n",
    );
    let store = store(
        &[
            "/bin/sh",
            &sh,
            log.to_str().unwrap(),
            "-f",
            "${sender}",
            "--",
            "${user}",
        ],
        |c| c.per_recipient = false,
    );
    let to = [
        rcpt(0, "a@example.org"),
        rcpt(1, "\"-rf\"@example.org"),
        rcpt(2, "c@example.org"),
    ];
    let (report, order) = deliver(&store, &to, BODY).await;
    // The recipient whose ${user} would be an option is refused first, alone.
    assert_eq!(order, [1, 0, 2]);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "-f sender@example.net -- a c\n"
    );
    assert_eq!(show(report.outcome(1).unwrap()), "bounced 550 5.1.3");
    assert_eq!(show(report.outcome(0).unwrap()), "delivered 250 2.0.0");
    assert_eq!(show(report.outcome(2).unwrap()), "delivered 250 2.0.0");
}

#[tokio::test]
async fn an_address_that_would_be_an_option_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let sh = script(dir.path(), "lda.sh", "cat > /dev/null\ntouch \"$1\"\n");
    let store = store(&["/bin/sh", &sh, ran.to_str().unwrap(), "${user}"], |_| {});
    let (report, _) = deliver(&store, &[rcpt(0, "\"-oQ/tmp\"@example.org")], BODY).await;
    assert_eq!(show(report.outcome(0).unwrap()), "bounced 550 5.1.3");
    assert!(!ran.exists());
}

#[test]
fn config_defaults() {
    let c = PipeStoreConfig::new("p", &["/bin/true"]);
    assert_eq!(c.timeout.0, Duration::from_secs(600));
    assert_eq!(c.max_output.0, 64 << 10);
    assert!(c.per_recipient && c.user.is_none());
    assert_eq!(c.line_endings, LineEndings::Lf);
}
