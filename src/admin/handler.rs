//! What the daemon does for each admin request: reads through the spool, changes through
//! the scheduler ([`crate::scheduler::Scheduler::hold`] and friends).
//!
//! Promises: an action answers only after every change it reports is durable in the spool;
//! `dry_run` changes nothing; an empty selector selects nothing (the client must say
//! `--all`); every change is logged (target `postern::admin`) with the queue id.

use std::io::Read;
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::SystemTime;

use super::protocol::{
    Action, EnvelopeDetails, MessageView, Request, Response, Selector, ShapeBy, Touched,
};
use super::view;
use crate::routing::Router;
use crate::scheduler::Scheduler;
use crate::spool::id::BadQueueId;
use crate::spool::{MessageSummary, QueueId, Spool, SpoolError};

/// Why a request could not be answered; its Display is the error line `postern queue`
/// prints.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// The blocking read of the spool did not finish (it panicked or was cancelled).
    #[error("reading the spool: {0}")]
    Reading(#[from] tokio::task::JoinError),
    /// A queue id that does not parse.
    #[error(transparent)]
    BadId(#[from] BadQueueId),
    /// The spool refused.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// An action with an empty selector.
    #[error(
        "{0}: nothing selected; give queue ids, a filter (--store, --state, --sender, \
         --recipient, --older-than) or --all"
    )]
    NothingSelected(&'static str),
}

/// The most header bytes `show` returns.
const MAX_HEADERS: usize = 1 << 20;

/// What the admin server works on.
#[derive(Debug)]
pub struct Backend {
    /// The spool.
    pub spool: Spool,
    /// The scheduler (`None` when `delivery.enabled` is off).
    pub scheduler: Option<Scheduler>,
    /// The routing map in force (the one the scheduler routes with; swapped on reload).
    pub router: Arc<ArcSwap<Router>>,
}

impl Backend {
    fn router(&self) -> Arc<Router> {
        self.router.load_full()
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request) -> Response {
        let result = match req {
            Request::List { selector } => self
                .select(&selector)
                .await
                .map(|messages| Response::Messages { messages }),
            Request::Show { id, body } => self.show(&id, body).await,
            Request::Shape { by } => self.shape(by).await,
            Request::Act {
                action,
                selector,
                dry_run,
            } => self.act(action, &selector, dry_run).await,
        };
        result.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
        })
    }

    /// The views of these messages under the map in force.
    fn view_all(&self, summaries: &[MessageSummary]) -> Vec<MessageView> {
        let router = self.router();
        summaries
            .iter()
            .map(|m| view::view(m, &router, None))
            .collect()
    }

    async fn views(&self) -> Result<Vec<MessageView>, RequestError> {
        let spool = self.spool.clone();
        let summaries = tokio::task::spawn_blocking(move || spool.snapshot()).await?;
        Ok(self.view_all(&summaries))
    }

    /// The messages with these ids (unknown or malformed ids are left out): no full scan.
    async fn views_of(&self, ids: &[String]) -> Result<Vec<MessageView>, RequestError> {
        let mut qids: Vec<QueueId> = Vec::new();
        for q in ids.iter().filter_map(|id| id.parse::<QueueId>().ok()) {
            if !qids.contains(&q) {
                qids.push(q);
            }
        }
        let spool = self.spool.clone();
        let summaries = tokio::task::spawn_blocking(move || {
            qids.into_iter()
                .filter_map(|q| spool.message(q).ok())
                .collect::<Vec<_>>()
        })
        .await?;
        Ok(self.view_all(&summaries))
    }

    async fn select(&self, selector: &Selector) -> Result<Vec<MessageView>, RequestError> {
        let now = SystemTime::now();
        let mut v = if selector.ids.is_empty() {
            self.views().await?
        } else {
            self.views_of(&selector.ids).await?
        };
        v.retain(|m| view::selected(selector, m, now));
        Ok(v)
    }

    async fn shape(&self, by: ShapeBy) -> Result<Response, RequestError> {
        let v = self.views().await?;
        Ok(Response::Shape {
            table: view::shape(&v, by, SystemTime::now()),
        })
    }

    async fn show(&self, id: &str, with_body: bool) -> Result<Response, RequestError> {
        let qid: QueueId = id.parse()?;
        let spool = self.spool.clone();
        let read =
            tokio::task::spawn_blocking(move || read_message(&spool, qid, with_body)).await?;
        let (summary, envelope, headers, body) = read?;
        let next = match &self.scheduler {
            Some(s) => s.next_attempt(qid).await,
            None => None,
        };
        Ok(Response::Show {
            message: view::view(&summary, &self.router(), next),
            envelope,
            headers,
            body,
        })
    }

    async fn act(
        &self,
        action: Action,
        selector: &Selector,
        dry_run: bool,
    ) -> Result<Response, RequestError> {
        if selector.is_empty() {
            return Err(RequestError::NothingSelected(action.name()));
        }
        let selected = self.select(selector).await?;
        let mut out = Vec::new();
        for id in &selector.ids {
            if !selected.iter().any(|m| m.queue_id.eq_ignore_ascii_case(id)) {
                out.push(Touched {
                    queue_id: id.clone(),
                    skipped: Some("not in the queue (or not matching the filters)".into()),
                });
            }
        }
        for m in &selected {
            let mut skipped = self.ineligible(action, m);
            if skipped.is_none() && !dry_run {
                if let Err(e) = self.apply(action, &m.queue_id).await {
                    skipped = Some(format!("failed: {e}"));
                }
            }
            out.push(Touched {
                queue_id: m.queue_id.clone(),
                skipped,
            });
        }
        Ok(Response::Acted {
            action,
            dry_run,
            messages: out,
        })
    }

    /// Why `action` does not apply to `m`, if it does not.
    fn ineligible(&self, action: Action, m: &MessageView) -> Option<String> {
        let held = m.queue_name == "hold" || m.queue_name == "quarantine";
        let reason = match action {
            Action::Hold if m.queue_name == "quarantine" => "quarantined",
            Action::Hold if held => "already on hold",
            Action::Release if !held => "not on hold or quarantined",
            Action::Flush | Action::Requeue if held => "on hold (release it instead)",
            Action::Flush | Action::Requeue if self.scheduler.is_none() => {
                "delivery is disabled (delivery.enabled: false)"
            }
            _ => return None,
        };
        Some(reason.into())
    }

    async fn apply(&self, action: Action, id: &str) -> Result<(), SpoolError> {
        let qid: QueueId = id
            .parse()
            .map_err(|_| SpoolError::Invalid("bad queue id"))?;
        match (action, &self.scheduler) {
            (Action::Hold, Some(s)) => s.hold(qid).await?,
            (Action::Hold, None) => self.spool.hold(qid).await?,
            (Action::Release, Some(s)) => s.release(qid).await?,
            (Action::Release, None) => self.spool.release(qid).await?,
            (Action::Delete, Some(s)) => s.delete(qid).await?,
            (Action::Delete, None) => self.spool.delete(qid).await?,
            (Action::Flush | Action::Requeue, Some(s)) => s.flush(qid),
            (Action::Flush | Action::Requeue, None) => {}
        }
        tracing::info!(target: "postern::admin", queue_id = %qid, action = action.name(), "operator action");
        Ok(())
    }
}

type Read4 = (
    crate::spool::MessageSummary,
    EnvelopeDetails,
    String,
    Option<String>,
);

/// The message's summary, envelope details, header section, and (if asked) the rest.
fn read_message(spool: &Spool, qid: QueueId, with_body: bool) -> Result<Read4, SpoolError> {
    let summary = spool.message(qid)?;
    let env = spool.read_envelope(qid)?;
    let details = EnvelopeDetails {
        client: env.client.clone(),
        mail_params: env.params.to_string().trim().to_owned(),
        rcpt_params: env
            .recipients
            .iter()
            .map(|r| r.params.to_string().trim().to_owned())
            .collect(),
    };
    let mut reader = spool.open_body(qid)?;
    let mut all = Vec::new();
    if with_body {
        reader.read_to_end(&mut all)?;
    } else {
        let mut buf = [0u8; 8192];
        while all.len() < MAX_HEADERS && find_end_of_headers(&all).is_none() {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
    }
    let split = find_end_of_headers(&all).unwrap_or(all.len().min(MAX_HEADERS));
    let headers = String::from_utf8_lossy(&all[..split]).into_owned();
    let body = with_body.then(|| String::from_utf8_lossy(&all[split..]).into_owned());
    Ok((summary, details, headers, body))
}

/// The end of the header section: just after the blank line (`\r\n\r\n` or `\n\n`).
fn find_end_of_headers(b: &[u8]) -> Option<usize> {
    if b.starts_with(b"\r\n") {
        return Some(2);
    }
    b.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| b.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

#[cfg(test)]
mod tests {
    use super::find_end_of_headers;

    #[test]
    fn headers_end_at_the_blank_line() {
        assert_eq!(find_end_of_headers(b"A: b\r\n\r\nbody"), Some(8));
        assert_eq!(find_end_of_headers(b"\r\nbody"), Some(2));
        assert_eq!(find_end_of_headers(b"A: b\r\n"), None);
    }
}
