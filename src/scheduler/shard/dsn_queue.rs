//! Queueing the DSNs a message owes (built by [`dsn`]) into the spool, off the shard's
//! task: the final report before a message is finished or while others are still open
//! (queued before the recipients are marked reported, so a crash repeats a DSN, never
//! loses one), and the delay warning.

use std::sync::Arc;

use metrics::counter;

use crate::scheduler::Ctx;
use crate::scheduler::double_bounce::DoubleBounceError;
use crate::scheduler::dsn::{self, DsnKind};
use crate::scheduler::metrics as m;
use crate::spool::{QueueId, RecipientState, SpoolError};

use super::Event;

/// Why a DSN could not be queued, or a message not finished: the message stays queued and
/// is finished (or reported) again at its next attempt.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DsnQueueError {
    /// Reading the message or writing the DSN or the ledger failed.
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    /// The DSN could not be built.
    #[error("building the DSN: {0}")]
    Render(#[from] std::io::Error),
    /// A bounce of a bounce went nowhere (it is kept on hold).
    #[error("{0}")]
    DoubleBounce(#[from] DoubleBounceError),
    /// The blocking task that builds the DSN did not finish (the runtime is shutting down).
    #[error("the DSN task stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Queues the DSN the message owes, then removes it from the spool.
/// Reports what is owed, then removes the message from the spool.
pub(super) async fn finish(
    ctx: &Arc<Ctx>,
    qid: QueueId,
    reported: bool,
) -> Result<(), DsnQueueError> {
    if !reported {
        report(ctx, qid).await?;
    }
    ctx.spool.finish(qid).await?;
    Ok(())
}

/// Queues the DSN owed for the final recipients not yet reported (failures and, with
/// NOTIFY=SUCCESS, deliveries), then marks them reported in the ledger: the DSN is queued
/// before the mark, so a crash between the two repeats it, never loses it.
pub(super) async fn report(ctx: &Arc<Ctx>, qid: QueueId) -> Result<(), DsnQueueError> {
    let c = Arc::clone(ctx);
    let (dsn, covered) =
        tokio::task::spawn_blocking(move || queue_dsn(&c, qid, DsnKind::Final)).await??;
    if let Some(dsn_qid) = dsn {
        ctx.send(ctx.home_shard(dsn_qid), Event::Submit(dsn_qid));
    }
    if !covered.is_empty() {
        ctx.spool.mark_reported(qid, &covered).await?;
    }
    Ok(())
}

pub(super) async fn queue_dsn_async(
    ctx: &Arc<Ctx>,
    qid: QueueId,
    kind: DsnKind,
) -> Result<(), DsnQueueError> {
    let c = Arc::clone(ctx);
    let (dsn, _) = tokio::task::spawn_blocking(move || queue_dsn(&c, qid, kind)).await??;
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
) -> Result<(Option<QueueId>, Vec<usize>), DsnQueueError> {
    let envelope = ctx.spool.read_envelope(qid)?;
    let summary = ctx.spool.message(qid)?;
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
        let copy = crate::scheduler::double_bounce::handle(ctx, qid, &envelope, &failed)?;
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
            dsn::render(&report, &mut std::io::empty(), 0)?
        }
    };
    let env = dsn::envelope(&envelope, rendered.eight_bit, now);
    let mut w = ctx.spool.begin(env)?;
    w.write(&rendered.content)?;
    let dsn_qid = w.queue_id();
    w.commit().wait()?;
    let word = match kind {
        DsnKind::Delay => "delay",
        DsnKind::Final if rcpts.iter().any(|r| r.action == dsn::Action::Failed) => "failure",
        DsnKind::Final => "success",
    };
    counter!(m::DSNS, "kind" => word).increment(1);
    tracing::info!(queue_id = %qid, dsn = %dsn_qid, kind = word, recipients = rcpts.len(), "DSN queued to the sender");
    Ok((Some(dsn_qid), covered))
}
