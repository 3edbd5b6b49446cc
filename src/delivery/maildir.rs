//! The built-in maildir store, like Postfix's virtual(8): `ROOT/<domain>/<user>/Maildir`.
//!
//! Each recipient gets its own copy: the message is written to `tmp/` under a unique name
//! (`<seconds>.M<micros>P<pid>Q<sequence>.<host>`, after the maildir specification), with
//! `Return-Path:` and `Delivered-To:` prepended, fsynced, renamed into `new/`, and `new/` is
//! fsynced — only then is the recipient [`Outcome::Delivered`]. Folders are created on first
//! delivery.
//!
//! The mailbox name is the recipient's local part, lower-cased, without a `+detail`
//! extension, and the domain lower-cased; a name that could escape the root (empty, `.`,
//! `..`, a `/`, a NUL, a leading dot) bounces with `5.1.3` rather than touching the disk.
//! Disk trouble (no space, permissions, I/O errors) defers (`4.3.0`, or `4.3.1` when full):
//! the message stays queued and is retried.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use postern_proto::ForwardPath;
use postern_proto::reply::{EnhancedCode, Reply, ReplyCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::message::{MessageBody, OutboundEnvelope, Recipient, Report};
use super::trouble::Outcome;

/// A maildir store.
#[derive(Debug)]
pub struct MaildirStore {
    name: String,
    root: PathBuf,
    hostname: String,
    sequence: AtomicU64,
}

fn reply(code: u16, e: (u8, u16, u16), text: &str) -> Reply {
    let code = ReplyCode::new(code).unwrap_or(ReplyCode::LOCAL_ERROR);
    Reply::new(code, Some(EnhancedCode::new(e.0, e.1, e.2)), text)
}

impl MaildirStore {
    /// A store named `name` delivering under `root`; `hostname` goes into file names.
    pub fn new(name: &str, root: &Path, hostname: &str) -> Self {
        let hostname = hostname.replace(['/', ':'], "_");
        Self {
            name: name.to_owned(),
            root: root.to_owned(),
            hostname,
            sequence: AtomicU64::new(0),
        }
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `Maildir` directory of a recipient, or why there is none.
    pub fn mailbox_dir(&self, path: &ForwardPath) -> Result<PathBuf, Reply> {
        let (user, domain) = match path {
            ForwardPath::Postmaster => ("postmaster".to_owned(), "localhost".to_owned()),
            ForwardPath::Mailbox(m) => {
                let local = m.local_part_unquoted().to_lowercase();
                let user = local.split('+').next().unwrap_or_default().to_owned();
                (user, m.domain().folded())
            }
        };
        for part in [&user, &domain] {
            let bad = part.is_empty()
                || part.starts_with('.')
                || part.contains(['/', '\0', '\\'])
                || part.len() > 255;
            if bad {
                return Err(reply(
                    550,
                    (5, 1, 3),
                    "Recipient address not usable as a mailbox name",
                ));
            }
        }
        Ok(self.root.join(domain).join(user).join("Maildir"))
    }

    fn unique_name(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            seq,
            self.hostname
        )
    }

    /// Delivers one message to `recipients`; each outcome goes to `on_outcome` as soon as its
    /// copy is durable (or has failed).
    pub async fn deliver<B, F>(
        &self,
        envelope: &OutboundEnvelope,
        recipients: &[Recipient],
        body: &B,
        on_outcome: &mut F,
    ) -> Report
    where
        B: MessageBody + ?Sized,
        F: FnMut(usize, &Outcome),
    {
        let mut report = Report::default();
        for r in recipients {
            let outcome = match self.mailbox_dir(&r.path) {
                Err(refusal) => Outcome::Bounced(refusal),
                Ok(dir) => match self.write_copy(&dir, envelope, &r.path, body).await {
                    Ok(name) => Outcome::Delivered(reply(
                        250,
                        (2, 0, 0),
                        &format!("delivered to maildir as {name}"),
                    )),
                    Err(e) => Outcome::Deferred(disk_trouble(&e)),
                },
            };
            on_outcome(r.index, &outcome);
            report.outcomes.push((r.index, outcome));
        }
        report
    }

    async fn write_copy<B: MessageBody + ?Sized>(
        &self,
        dir: &Path,
        envelope: &OutboundEnvelope,
        to: &ForwardPath,
        body: &B,
    ) -> io::Result<String> {
        for sub in ["tmp", "new", "cur"] {
            tokio::fs::create_dir_all(dir.join(sub)).await?;
        }
        let name = self.unique_name();
        let tmp = dir.join("tmp").join(&name);
        let result = async {
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .await?;
            let rcpt = match to {
                ForwardPath::Postmaster => "postmaster".to_owned(),
                ForwardPath::Mailbox(m) => m.to_string(),
            };
            let head = format!("Return-Path: {}\r\nDelivered-To: {rcpt}\r\n", envelope.from);
            file.write_all(head.as_bytes()).await?;
            let mut reader = body.open().await?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                file.write_all(&buf[..n]).await?;
            }
            file.flush().await?;
            file.sync_all().await?;
            drop(file);
            tokio::fs::rename(&tmp, dir.join("new").join(&name)).await?;
            let new_dir = dir.join("new");
            tokio::task::spawn_blocking(move || std::fs::File::open(new_dir)?.sync_all())
                .await
                .map_err(io::Error::other)??;
            Ok(name)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

fn disk_trouble(e: &io::Error) -> Reply {
    if e.raw_os_error() == Some(28) {
        reply(
            452,
            (4, 3, 1),
            "Mail system full, maildir delivery deferred",
        )
    } else {
        reply(451, (4, 3, 0), &format!("Maildir delivery failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use postern_proto::{Mailbox, RcptParams, ReversePath};

    use super::*;

    fn rcpt(index: usize, addr: &str) -> Recipient {
        let path = if addr == "Postmaster" {
            ForwardPath::Postmaster
        } else {
            ForwardPath::Mailbox(Mailbox::parse(addr).unwrap())
        };
        Recipient {
            index,
            path,
            params: RcptParams::default(),
        }
    }

    #[tokio::test]
    async fn delivers_one_durable_copy_per_recipient() {
        let dir = tempfile::tempdir().unwrap();
        let store = MaildirStore::new("local", dir.path(), "mx.test");
        let env = OutboundEnvelope::new(
            ReversePath::Mailbox(Mailbox::parse("s@example.net").unwrap()),
            20,
        );
        let body: &[u8] = b"Subject: hi\r\n\r\nbody\r\n";
        let mut seen = Vec::new();
        let report = store
            .deliver(
                &env,
                &[
                    rcpt(0, "Alice+news@Example.ORG"),
                    rcpt(3, "bob@example.org"),
                    rcpt(5, "\"../evil\"@example.org"),
                ],
                body,
                &mut |i, o: &Outcome| seen.push((i, o.is_final())),
            )
            .await;
        assert_eq!(seen, vec![(0, true), (3, true), (5, true)]);
        assert!(matches!(report.outcome(5), Some(Outcome::Bounced(r)) if r.code().get() == 550));
        let alice = dir.path().join("example.org/alice/Maildir/new");
        let files: Vec<_> = std::fs::read_dir(&alice)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        let text = std::fs::read_to_string(&files[0]).unwrap();
        assert_eq!(
            text,
            "Return-Path: <s@example.net>\r\nDelivered-To: Alice+news@Example.ORG\r\nSubject: hi\r\n\r\nbody\r\n"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("example.org/alice/Maildir/tmp"))
                .unwrap()
                .count(),
            0,
            "tmp is left empty"
        );
        assert!(
            dir.path()
                .join("example.org/bob/Maildir/new")
                .read_dir()
                .unwrap()
                .next()
                .is_some()
        );
        assert!(
            !dir.path().join("evil").exists()
                && !dir.path().join("..").join("evil@example.org").exists()
        );
    }

    #[tokio::test]
    async fn unwritable_root_defers() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let store = MaildirStore::new("local", &blocker, "mx.test");
        let env = OutboundEnvelope::new(ReversePath::Null, 1);
        let body: &[u8] = b"x\r\n";
        let report = store
            .deliver(
                &env,
                &[rcpt(0, "a@example.org")],
                body,
                &mut |_, _: &Outcome| {},
            )
            .await;
        assert!(
            matches!(report.outcome(0), Some(Outcome::Deferred(r)) if r.code().get() == 451),
            "{report:?}"
        );
    }

    #[test]
    fn mailbox_names() {
        let store = MaildirStore::new("local", Path::new("/r"), "h");
        let dir = |a: &str| store.mailbox_dir(&ForwardPath::Mailbox(Mailbox::parse(a).unwrap()));
        assert_eq!(
            dir("Bob+x@EXAMPLE.org").unwrap(),
            PathBuf::from("/r/example.org/bob/Maildir")
        );
        assert_eq!(
            dir("\"a b\"@example.org").unwrap(),
            PathBuf::from("/r/example.org/a b/Maildir")
        );
        assert!(dir("\"a/b\"@example.org").is_err());
        assert!(dir("\".hidden\"@example.org").is_err());
        assert!(dir("\"..\"@example.org").is_err());
        assert!(dir("+x@example.org").is_err());
        assert_eq!(
            store.mailbox_dir(&ForwardPath::Postmaster).unwrap(),
            PathBuf::from("/r/localhost/postmaster/Maildir")
        );
    }
}
