//! One recipient verification against a store: a slot in the store's window, a pooled
//! connection, `MAIL FROM:<>` / `RCPT TO` / `RSET`, the connection back to the pool.
//!
//! Promises: bounded by the store's `verify_timeout` as a whole (the wait for a window slot
//! and for a connection included); a connection left mid-conversation is never reused (the
//! pool's recycle check drops it). The slot counts against the store's window like a
//! transaction; a refused connection or a busy reply tells the window so, a plain answer
//! frees the slot without a latency sample (a verification is not a transaction).

use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use postern_proto::ForwardPath;
use tokio::time::Instant;

use super::cache::Verdict;
use crate::delivery::StorePool;
use crate::metrics as m;
use crate::scheduler::gate::{Gate, Signal};
use crate::scheduler::window::is_busy;

/// Whose turn a verification waits for at a full window: all verifications are one client
/// (they take turns with the proxied transactions of each upstream client).
const VERIFIER: &str = "recipient verification";

/// Asks the store behind `pool` about `rcpt`, within `limit`.
pub(crate) async fn ask(
    store: &str,
    pool: &StorePool,
    gate: &Arc<Gate>,
    rcpt: &ForwardPath,
    limit: Duration,
) -> Verdict {
    let deadline = Instant::now() + limit;
    let verdict = match tokio::time::timeout_at(deadline, query(pool, gate, rcpt, deadline)).await {
        Ok(v) => v,
        Err(_) => Verdict::Unavailable(format!("no answer within {}s", limit.as_secs_f64())),
    };
    let result = match &verdict {
        Verdict::Valid => "valid",
        Verdict::Invalid(_) => "invalid",
        Verdict::Unavailable(_) => "tempfail",
    };
    counter!(m::VERIFICATIONS, "store" => store.to_owned(), "result" => result).increment(1);
    verdict
}

async fn query(
    pool: &StorePool,
    gate: &Arc<Gate>,
    rcpt: &ForwardPath,
    deadline: Instant,
) -> Verdict {
    let Some(permit) = gate
        .acquire(deadline.saturating_duration_since(Instant::now()), VERIFIER)
        .await
    else {
        return Verdict::Unavailable("no slot in the store's window".into());
    };
    let mut conn = match pool.get().await {
        Ok(conn) => conn,
        Err(t) => {
            permit.finish_with(Signal::Failure, None);
            return Verdict::Unavailable(t.to_string());
        }
    };
    let limit = deadline.saturating_duration_since(Instant::now());
    let answer = conn.verify(rcpt, limit).await;
    pool.release(conn);
    match answer {
        Ok(reply) if reply.is_positive() => {
            drop(permit);
            Verdict::Valid
        }
        Ok(reply) if reply.is_permanent() => {
            drop(permit);
            Verdict::Invalid(reply)
        }
        Ok(reply) => {
            if is_busy(&reply) {
                permit.finish_with(Signal::Failure, None);
            }
            Verdict::Unavailable(reply.to_string())
        }
        Err(t) => {
            permit.finish_with(Signal::Failure, None);
            Verdict::Unavailable(t.to_string())
        }
    }
}

/// `postern route ADDRESS --verify`: asks store `store` of `stores` directly (a fresh
/// connection, no pool, no window: the gateway need not run) about `rcpt`; one line for
/// the operator: `valid (250 2.1.5 Ok)`, `invalid (550 5.1.1 …)`, `tempfail (…)`.
pub async fn ask_directly(
    stores: &[crate::delivery::StoreConfig],
    hostname: &str,
    store: &str,
    rcpt: &ForwardPath,
) -> String {
    use crate::delivery::{RemoteStore, StoreConfig};
    let built = stores.iter().find_map(|s| match s {
        StoreConfig::Lmtp(l) if l.name == store => {
            Some(RemoteStore::from_config(l, hostname).map(|s| (s, l.verify_timeout.0)))
        }
        StoreConfig::Smtp(l) if l.name == store => {
            Some(RemoteStore::from_smtp_config(l, hostname).map(|s| (s, l.verify_timeout.0)))
        }
        _ => None,
    });
    let (lmtp, limit) = match built {
        None => return format!("not asked: store {store} is not an LMTP or SMTP store"),
        Some(Err(e)) => return format!("not asked: {e}"),
        Some(Ok(s)) => s,
    };
    let lmtp = Arc::new(lmtp);
    let asked = tokio::time::timeout(limit, async {
        let mut conn = lmtp.connect().await?;
        let answer = conn.verify(rcpt, limit).await;
        conn.quit().await;
        answer
    })
    .await;
    match asked {
        Err(_) => format!("tempfail (no answer within {}s)", limit.as_secs_f64()),
        Ok(Err(t)) => format!("tempfail ({t})"),
        Ok(Ok(reply)) if reply.is_positive() => format!("valid ({reply})"),
        Ok(Ok(reply)) if reply.is_permanent() => format!("invalid ({reply})"),
        Ok(Ok(reply)) => format!("tempfail ({reply})"),
    }
}
