//! How `postern queue` prints: postqueue-like listings, the message view of `show`, the
//! qshape table, and the outcome of an action. Pure: strings in, strings out.

use std::fmt::Write as _;

use crate::admin::protocol::{Action, EnvelopeDetails, MessageView, ShapeTable, Touched};

pub use crate::date::utc;

fn mark(queue: &str) -> char {
    match queue {
        "active" => '*',
        "hold" => '!',
        "quarantine" => '#',
        _ => ' ',
    }
}

fn sender(s: &str) -> &str {
    if s.is_empty() { "<>" } else { s }
}

/// Like `postqueue -p`: a header, each message (queue id with `*` active, `!` held or `#` quarantined, size,
/// arrival, sender), each recipient with its state, store and last reply, then a total.
pub fn list(messages: &[MessageView]) -> String {
    if messages.is_empty() {
        return "Mail queue is empty\n".into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "-Queue ID-       --Size-- ----Arrival Time (UTC)---- -Sender/Recipient-------"
    );
    let mut bytes = 0u64;
    for m in messages {
        bytes += m.message_size;
        let _ = writeln!(
            out,
            "{}{} {:>8} {:<27} {}",
            m.queue_id,
            mark(&m.queue_name),
            m.message_size,
            utc(m.arrival_time),
            sender(&m.sender)
        );
        for r in &m.recipients {
            let store = r.store.as_deref().unwrap_or("(no route)");
            let _ = writeln!(out, "{:>54}{}  [{} via {}]", "", r.address, r.state, store);
            if let Some(reply) = &r.last_reply {
                let _ = writeln!(out, "{:>56}({reply})", "");
            }
        }
        out.push('\n');
    }
    let kib = bytes.div_ceil(1024);
    let n = messages.len();
    let _ = writeln!(
        out,
        "-- {kib} Kbytes in {n} Request{}.",
        if n == 1 { "" } else { "s" }
    );
    out
}

/// `postern queue show`: the envelope, each recipient's ledger entry, then the headers
/// (and body).
pub fn show(m: &MessageView, env: &EnvelopeDetails, headers: &str, body: Option<&str>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "queue id:     {}", m.queue_id);
    let _ = writeln!(out, "queue:        {}", m.queue_name);
    let _ = writeln!(out, "arrival:      {} UTC", utc(m.arrival_time));
    let _ = writeln!(out, "size:         {} bytes", m.message_size);
    let _ = writeln!(out, "sender:       {}", sender(&m.sender));
    if !env.client.is_empty() {
        let _ = writeln!(out, "client:       {}", env.client);
    }
    if !env.mail_params.is_empty() {
        let _ = writeln!(out, "mail params:  {}", env.mail_params);
    }
    if let Some(t) = m.next_attempt {
        let _ = writeln!(out, "next attempt: {} UTC", utc(t));
    }
    let _ = writeln!(out, "recipients:");
    for (i, r) in m.recipients.iter().enumerate() {
        let _ = write!(
            out,
            "  {}  {}  store={}",
            r.address,
            r.state,
            r.store.as_deref().unwrap_or("(no route)")
        );
        if let Some(t) = r.next_attempt {
            let _ = write!(out, "  next={} UTC", utc(t));
        }
        out.push('\n');
        if let Some(p) = env.rcpt_params.get(i).filter(|p| !p.is_empty()) {
            let _ = writeln!(out, "    params: {p}");
        }
        if let Some(reply) = &r.last_reply {
            let _ = writeln!(out, "    last reply: {reply}");
        }
    }
    let _ = writeln!(out, "headers:");
    out.push_str(&headers.replace("\r\n", "\n"));
    if let Some(body) = body {
        out.push_str(&body.replace("\r\n", "\n"));
    }
    out
}

/// The qshape table: `T` (total) then one column per age bucket, in minutes.
pub fn shape(t: &ShapeTable) -> String {
    let name_w = t
        .rows
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let widths: Vec<usize> = std::iter::once("T")
        .chain(t.labels.iter().map(String::as_str))
        .enumerate()
        .map(|(i, label)| {
            let cells = t.rows.iter().map(|r| {
                if i == 0 {
                    r.total.to_string().len()
                } else {
                    r.buckets.get(i - 1).map_or(1, |n| n.to_string().len())
                }
            });
            cells.max().unwrap_or(1).max(label.len())
        })
        .collect();
    let mut out = format!("{:>name_w$}", "");
    let _ = write!(out, " {:>w$}", "T", w = widths[0]);
    for (label, w) in t.labels.iter().zip(&widths[1..]) {
        let _ = write!(out, " {label:>w$}");
    }
    out.push('\n');
    for r in &t.rows {
        let _ = write!(out, "{:>name_w$} {:>w$}", r.name, r.total, w = widths[0]);
        for (n, w) in r.buckets.iter().zip(&widths[1..]) {
            let _ = write!(out, " {n:>w$}");
        }
        out.push('\n');
    }
    out
}

fn past(a: Action) -> &'static str {
    match a {
        Action::Flush => "flushed",
        Action::Hold => "held",
        Action::Release => "released",
        Action::Delete => "deleted",
        Action::Requeue => "requeued",
    }
}

/// One line per message (`would hold ID` in a dry run), then a summary.
pub fn acted(action: Action, dry_run: bool, messages: &[Touched]) -> String {
    let mut out = String::new();
    let mut done = 0usize;
    for t in messages {
        match &t.skipped {
            None if dry_run => {
                done += 1;
                let _ = writeln!(out, "would {} {}", action.name(), t.queue_id);
            }
            None => {
                done += 1;
                let _ = writeln!(out, "{} {}", past(action), t.queue_id);
            }
            Some(why) => {
                let _ = writeln!(out, "skipped {}: {why}", t.queue_id);
            }
        }
    }
    let skipped = messages.len() - done;
    let verb = if dry_run {
        format!("would be {}", past(action))
    } else {
        past(action).to_owned()
    };
    let _ = writeln!(
        out,
        "-- {done} message{} {verb}, {skipped} skipped{}",
        if done == 1 { "" } else { "s" },
        if dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::protocol::{RecipientView, ShapeBy, ShapeRow};

    #[test]
    fn list_marks_held_messages_and_shows_the_last_reply() {
        let m = MessageView {
            queue_name: "hold".into(),
            queue_id: "0ABCDEFGHJK0007".into(),
            arrival_time: 0,
            message_size: 2048,
            sender: String::new(),
            next_attempt: None,
            recipients: vec![RecipientView {
                address: "bob@example.org".into(),
                state: "deferred".into(),
                store: Some("s1".into()),
                last_reply: Some("451 4.3.0 busy".into()),
                next_attempt: None,
            }],
        };
        let text = list(&[m]);
        assert!(
            text.contains("0ABCDEFGHJK0007!     2048 1970-01-01 00:00:00"),
            "{text}"
        );
        assert!(text.contains("<>"), "{text}");
        assert!(
            text.contains("bob@example.org  [deferred via s1]"),
            "{text}"
        );
        assert!(text.contains("(451 4.3.0 busy)"), "{text}");
        assert!(text.contains("-- 2 Kbytes in 1 Request."), "{text}");
        assert_eq!(list(&[]), "Mail queue is empty\n");
    }

    #[test]
    fn shape_aligns_columns() {
        let t = ShapeTable {
            by: ShapeBy::Store,
            labels: crate::admin::view::column_labels(),
            rows: vec![ShapeRow {
                name: "TOTAL".into(),
                total: 12,
                buckets: vec![12, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            }],
        };
        let text = shape(&t);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "       T  5 10 20 40 80 160 320 640 1280 1280+");
        assert_eq!(lines[1], "TOTAL 12 12  0  0  0  0   0   0   0    0     0");
    }
}
