//! Queueing the DSNs a message owes (built by [`dsn`]) into the spool, off the shard's
//! task: the final report before a message is finished or while others are still open
//! (queued before the recipients are marked reported, so a crash repeats a DSN, never
//! loses one), and the delay warning.

use std::sync::Arc;

use metrics::counter;

use crate::scheduler::Ctx;
use crate::scheduler::dsn::{self, DsnKind};
use crate::scheduler::metrics as m;
use crate::spool::{QueueId, RecipientState};

use super::Event;

/// Queues the DSN the message owes, then removes it from the spool.
/// Reports what is owed, then removes the message from the spool.
pub(super) async fn finish(ctx: &Arc<Ctx>, qid: QueueId, reported: bool) -> Result<(), String> {
    if !reported {
        report(ctx, qid).await?;
    }
    ctx.spool.finish(qid).await.map_err(|e| e.to_string())?;
    Ok(())
}

/// Queues the DSN owed for the final recipients not yet reported (failures and, with
/// NOTIFY=SUCCESS, deliveries), then marks them reported in the ledger: the DSN is queued
/// before the mark, so a crash between the two repeats it, never loses it.
pub(super) async fn report(ctx: &Arc<Ctx>, qid: QueueId) -> Result<(), String> {
    let c = Arc::clone(ctx);
    let (dsn, covered) = tokio::task::spawn_blocking(move || queue_dsn(&c, qid, DsnKind::Final))
        .await
        .map_err(|e| e.to_string())??;
    if let Some(dsn_qid) = dsn {
        ctx.send(ctx.home_shard(dsn_qid), Event::Submit(dsn_qid));
    }
    if !covered.is_empty() {
        ctx.spool
            .mark_reported(qid, &covered)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

pub(super) async fn queue_dsn_async(
    ctx: &Arc<Ctx>,
    qid: QueueId,
    kind: DsnKind,
) -> Result<(), String> {
    let c = Arc::clone(ctx);
    let (dsn, _) = tokio::task::spawn_blocking(move || queue_dsn(&c, qid, kind))
        .await
        .map_err(|e| e.to_string())??;
    if let Some(dsn_qid) = dsn {
        ctx.send(ctx.home_shard(dsn_qid), Event::Submit(dsn_qid));
    }
    Ok(())
}

/// Builds and durably queues the DSN of `kind` for `qid`, if one is owed (blocking).
/// Returns its queue id and, for [`DsnKind::Final`], the final recipients it covers (those
/// not reported before; owed a DSN or not).
fn queue_dsn(
    ctx: &Ctx,
    qid: QueueId,
    kind: DsnKind,
) -> Result<(Option<QueueId>, Vec<usize>), String> {
    let envelope = ctx.spool.read_envelope(qid).map_err(|e| e.to_string())?;
    let summary = ctx.spool.message(qid).map_err(|e| e.to_string())?;
    let mut covered = Vec::new();
    let states: Vec<RecipientState> = summary
        .recipients
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            if kind == DsnKind::Final && r.state.is_final() && !r.reported {
                covered.push(i);
            }
            if r.reported {
                RecipientState::Pending // reported before: not again
            } else {
                r.state
            }
        })
        .collect();
    if kind == DsnKind::Final && envelope.sender.is_empty() {
        let failed: Vec<(usize, &RecipientState)> = covered
            .iter()
            .filter_map(|&i| states.get(i).map(|s| (i, s)))
            .collect();
        let copy = crate::scheduler::double_bounce::handle(ctx, qid, &envelope, &failed)
            .map_err(|e| e.to_string())?;
        return Ok((copy, covered));
    }
    let rcpts = dsn::owed(&envelope, &states, kind);
    if rcpts.is_empty() {
        return Ok((None, covered));
    }
    let now = ctx.clock.now();
    let report = dsn::DsnReport {
        hostname: &ctx.hostname,
        qid,
        envelope: &envelope,
        recipients: &rcpts,
        now,
        maximal_lifetime: ctx.policy().maximal_lifetime,
    };
    let rendered = match ctx.spool.open_body(qid) {
        Ok(mut body) => dsn::render(&report, &mut body, summary.size),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    };
    // An unreadable body still gets its recipients reported, without the content.
    let rendered = match rendered {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(queue_id = %qid, error = %e, "original message unreadable; DSN without it");
            dsn::render(&report, &mut std::io::empty(), 0).map_err(|e| e.to_string())?
        }
    };
    let env = dsn::envelope(&envelope, rendered.eight_bit, now);
    let mut w = ctx.spool.begin(env).map_err(|e| e.to_string())?;
    w.write(&rendered.content).map_err(|e| e.to_string())?;
    let dsn_qid = w.queue_id();
    w.commit().wait().map_err(|e| e.to_string())?;
    let word = match kind {
        DsnKind::Delay => "delay",
        DsnKind::Final if rcpts.iter().any(|r| r.action == dsn::Action::Failed) => "failure",
        DsnKind::Final => "success",
    };
    counter!(m::DSNS, "kind" => word).increment(1);
    tracing::info!(queue_id = %qid, dsn = %dsn_qid, kind = word, recipients = rcpts.len(), "DSN queued to the sender");
    Ok((Some(dsn_qid), covered))
}
