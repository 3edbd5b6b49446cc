//! What the queue tools show: [`MessageView`]s built from the spool's summaries and the
//! current routing map, the selectors' matching rules, and the qshape table.
//!
//! Pure (no I/O): the server and the offline `postern queue list` both call it, so the
//! daemon and the read-only path show the same thing.
//!
//! Patterns (`--sender`, `--recipient`): case-insensitive; with `*` (any run) or `?` (one
//! character) the whole address must match the glob, without them a substring is enough
//! (`example.org` matches every address at that domain).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postern_proto::ForwardPath;

use super::protocol::{MessageView, RecipientView, Selector, ShapeBy, ShapeRow, ShapeTable};
use crate::routing::{RcptDecision, Router};
use crate::spool::{MessageSummary, QueueState, RecipientState};

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The queue's name as the tools print it.
pub fn queue_name(q: QueueState) -> &'static str {
    match q {
        QueueState::Active => "active",
        QueueState::Deferred => "deferred",
        QueueState::Hold => "hold",
        QueueState::Quarantine => "quarantine",
        QueueState::Finished => "finished",
    }
}

/// The store `address` routes to now (as the scheduler routes at each attempt).
pub fn route(router: &Router, address: &str) -> Option<String> {
    let text = if address.eq_ignore_ascii_case("postmaster") {
        "<Postmaster>".to_owned()
    } else {
        format!("<{address}>")
    };
    let path = ForwardPath::parse(&text).ok()?;
    match router.resolve(&path, true) {
        RcptDecision::Local { store } | RcptDecision::Relay { store } => Some(store),
        // Refused (or undecidable): no store.
        _ => None,
    }
}

/// A message as the tools show it; `next_attempt` is the scheduler's, when it knows it.
pub fn view(m: &MessageSummary, router: &Router, next_attempt: Option<SystemTime>) -> MessageView {
    let recipients = m
        .recipients
        .iter()
        .map(|r| RecipientView {
            address: r.address.clone(),
            state: r.state.name().to_owned(),
            store: route(router, &r.address),
            last_reply: r.state.reply().map(str::to_owned),
            next_attempt: match &r.state {
                RecipientState::Deferred { until, .. } => Some(unix(*until)),
                _ => None,
            },
        })
        .collect();
    MessageView {
        queue_name: queue_name(m.queue).to_owned(),
        queue_id: m.qid.to_string(),
        arrival_time: unix(m.arrival),
        message_size: m.size,
        sender: m.sender.clone(),
        next_attempt: next_attempt.or(m.next_attempt).map(unix),
        recipients,
    }
}

/// Does `text` match the operator's `pattern` (see the module header)?
pub fn matches_pattern(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    if !p.iter().any(|c| matches!(c, '*' | '?')) {
        let p: String = p.into_iter().collect();
        let t: String = t.into_iter().collect();
        return t.contains(&p);
    }
    glob(&p, &t)
}

/// Iterative glob with backtracking over the last `*` (linear in practice, no recursion).
fn glob(p: &[char], t: &[char]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Does the message match every criterion of `sel`? (`all` and an empty selector match
/// everything here; callers refuse an empty selector for actions.)
pub fn selected(sel: &Selector, v: &MessageView, now: SystemTime) -> bool {
    if !sel.ids.is_empty()
        && !sel
            .ids
            .iter()
            .any(|id| id.eq_ignore_ascii_case(&v.queue_id))
    {
        return false;
    }
    if let Some(q) = &sel.queue {
        if !q.eq_ignore_ascii_case(&v.queue_name) {
            return false;
        }
    }
    if let Some(store) = &sel.store {
        let open = v.recipients.iter().filter(|r| is_open(&r.state));
        if !open.clone().any(|r| r.store.as_deref() == Some(store)) {
            return false;
        }
    }
    if let Some(p) = &sel.sender {
        if !matches_pattern(p, &v.sender) {
            return false;
        }
    }
    if let Some(p) = &sel.recipient {
        if !v.recipients.iter().any(|r| matches_pattern(p, &r.address)) {
            return false;
        }
    }
    if let Some(secs) = sel.older_than_secs {
        let age = unix(now).saturating_sub(v.arrival_time);
        if age < secs {
            return false;
        }
    }
    true
}

/// Not yet delivered or bounced.
pub fn is_open(state: &str) -> bool {
    !matches!(state, "delivered" | "bounced")
}

fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map_or_else(|| "(local)".to_owned(), |(_, d)| d.to_lowercase())
}

/// qshape's column heads: each bucket's upper edge in minutes, then `LAST+`
/// (`5 10 20 … 1280 1280+`; the buckets are [`crate::shape`]'s).
pub fn column_labels() -> Vec<String> {
    let edges = crate::shape::EDGES_MINUTES;
    let last = edges.last().copied().unwrap_or_default();
    edges
        .iter()
        .map(ToString::to_string)
        .chain(std::iter::once(format!("{last}+")))
        .collect()
}

/// The qshape table of `messages` at `now`: open recipients by row and age bucket.
pub fn shape(messages: &[MessageView], by: ShapeBy, now: SystemTime) -> ShapeTable {
    let n = crate::shape::LABELS.len();
    let mut rows: HashMap<String, Vec<u64>> = HashMap::new();
    let mut total = vec![0u64; n];
    let now = unix(now);
    for m in messages {
        let age = Duration::from_secs(now.saturating_sub(m.arrival_time));
        let b = crate::shape::bucket(age);
        for r in m.recipients.iter().filter(|r| is_open(&r.state)) {
            let name = match by {
                ShapeBy::Store => r.store.clone().unwrap_or_else(|| "(no route)".into()),
                ShapeBy::Domain => domain_of(&r.address),
            };
            rows.entry(name).or_insert_with(|| vec![0; n])[b] += 1;
            total[b] += 1;
        }
    }
    let mut rows: Vec<ShapeRow> = rows
        .into_iter()
        .map(|(name, buckets)| ShapeRow {
            name,
            total: buckets.iter().sum(),
            buckets,
        })
        .collect();
    rows.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.name.cmp(&b.name)));
    rows.insert(
        0,
        ShapeRow {
            name: "TOTAL".into(),
            total: total.iter().sum(),
            buckets: total,
        },
    );
    ShapeTable {
        by,
        labels: column_labels(),
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_substrings_or_globs() {
        assert!(matches_pattern("example.org", "Bob@Example.ORG"));
        assert!(!matches_pattern("example.net", "bob@example.org"));
        assert!(matches_pattern("*@example.org", "bob@example.org"));
        assert!(!matches_pattern("*@example.org", "bob@example.org.evil"));
        assert!(matches_pattern("b?b@*", "bob@x"));
        assert!(matches_pattern("*", ""));
        assert!(!matches_pattern("a*b*c", "abx"));
        assert!(matches_pattern("a*b*c", "aXbYbZc"));
    }

    fn msg(
        id: &str,
        queue: &str,
        arrival: u64,
        rcpts: &[(&str, &str, Option<&str>)],
    ) -> MessageView {
        MessageView {
            queue_name: queue.into(),
            queue_id: id.into(),
            arrival_time: arrival,
            message_size: 10,
            sender: "s@example.net".into(),
            next_attempt: None,
            recipients: rcpts
                .iter()
                .map(|(a, st, store)| RecipientView {
                    address: (*a).into(),
                    state: (*st).into(),
                    store: store.map(str::to_owned),
                    last_reply: None,
                    next_attempt: None,
                })
                .collect(),
        }
    }

    #[test]
    fn selectors_combine_with_and_and_store_looks_at_open_recipients() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let m = msg(
            "ID1",
            "deferred",
            10_000 - 7200,
            &[
                ("a@x.org", "delivered", Some("s1")),
                ("b@y.org", "deferred", Some("s2")),
            ],
        );
        let sel = |f: &dyn Fn(&mut Selector)| {
            let mut s = Selector::default();
            f(&mut s);
            selected(&s, &m, now)
        };
        assert!(sel(&|s| s.store = Some("s2".into())));
        assert!(
            !sel(&|s| s.store = Some("s1".into())),
            "s1's recipient is done"
        );
        assert!(sel(&|s| s.older_than_secs = Some(3600)));
        assert!(!sel(&|s| s.older_than_secs = Some(3 * 3600)));
        assert!(sel(&|s| s.queue = Some("deferred".into())));
        assert!(!sel(&|s| s.queue = Some("hold".into())));
        assert!(sel(&|s| s.ids = vec!["id1".into()]));
        assert!(!sel(&|s| {
            s.ids = vec!["ID1".into()];
            s.sender = Some("nobody".into());
        }));
        assert!(sel(&|s| s.recipient = Some("@y.org".into())));
    }

    #[test]
    fn shape_counts_open_recipients_by_age() {
        let now = UNIX_EPOCH + Duration::from_secs(100_000);
        let msgs = vec![
            msg(
                "A",
                "deferred",
                100_000 - 60,
                &[("a@x.org", "deferred", Some("s1"))],
            ),
            msg(
                "B",
                "deferred",
                100_000 - 30 * 60,
                &[
                    ("b@x.org", "deferred", Some("s1")),
                    ("c@y.org", "pending", Some("s2")),
                ],
            ),
            msg(
                "C",
                "active",
                100_000,
                &[("d@y.org", "delivered", Some("s2"))],
            ),
        ];
        let t = shape(&msgs, ShapeBy::Store, now);
        assert_eq!(t.rows[0].name, "TOTAL");
        assert_eq!(t.rows[0].total, 3);
        assert_eq!(t.rows[1].name, "s1");
        assert_eq!(t.rows[1].buckets[0], 1);
        assert_eq!(t.rows[1].buckets[3], 1, "30 minutes is in the 40 column");
        assert_eq!(t.rows[2].name, "s2");
        assert_eq!(t.rows[2].total, 1);
        let t = shape(&msgs, ShapeBy::Domain, now);
        assert_eq!(t.rows[1].name, "x.org");
        assert_eq!(t.rows[1].total, 2);
    }
}
