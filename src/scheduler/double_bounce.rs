//! Undeliverable mail from `<>`: the double bounce (Postfix's 2bounce).
//!
//! A message from `<>` (a DSN, ours or another MTA's) owes no DSN, so a recipient of it that
//! bounces (no route, or the store refused it permanently) would be dropped. Instead,
//! [`handle`] queues one copy of the message, unchanged, from `<>` to the `double_bounce`
//! address (default `postmaster@` + hostname), marked as a double bounce in its envelope's
//! client field. If that copy bounces too, it is not sent anywhere: it is put on hold (the
//! operator's queue) and logged, and it stays there until an operator acts. Never a loop:
//! a double bounce is never bounced again.
//!
//! Promises: the copy is committed (durable) before the original's bounced recipients are
//! marked reported, so a crash between the two sends the copy twice, never zero times.

use std::io::Read;

use super::Ctx;
use crate::spool::{Envelope, EnvelopeRecipient, QueueId, RecipientState, SpoolError};

/// The envelope client field of a double bounce (also how one is recognised).
pub(crate) const CLIENT: &str = "postern double-bounce";

/// Why a message from `<>` is kept rather than removed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DoubleBounceError {
    /// The double bounce itself failed: it stays in the hold queue for the operator.
    #[error("double bounce undeliverable: kept in the hold queue")]
    Undeliverable,
    /// The copy could not be written (or the original held).
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The original's body could not be read.
    #[error("reading the body: {0}")]
    Body(#[from] std::io::Error),
}

/// What to do with a message from `<>` whose recipients `failed` (indices, bounced and not
/// yet reported): `Ok(Some(id))` a copy was queued to the double-bounce address;
/// `Ok(None)` nothing to do; `Err` the message is kept (on hold) and must not be removed.
pub(crate) fn handle(
    ctx: &Ctx,
    qid: QueueId,
    envelope: &Envelope,
    failed: &[(usize, &RecipientState)],
) -> Result<Option<QueueId>, DoubleBounceError> {
    let Some((index, state)) = failed
        .iter()
        .find(|(_, s)| matches!(s, RecipientState::Bounced { .. }))
    else {
        return Ok(None);
    };
    let reply = state.reply().unwrap_or_default();
    let address = envelope
        .recipients
        .get(*index)
        .map_or("", |r| r.address.as_str());
    let is_double = envelope.client == CLIENT || address.eq_ignore_ascii_case(&ctx.double_bounce);
    if is_double {
        ctx.spool.hold(qid).wait()?;
        tracing::error!(queue_id = %qid, to = %address, reply = %reply, "double bounce undeliverable; kept in the hold queue");
        return Err(DoubleBounceError::Undeliverable);
    }
    let copy = Envelope {
        sender: String::new(),
        params: envelope.params.clone(),
        recipients: vec![EnvelopeRecipient {
            address: ctx.double_bounce.clone(),
            params: postern_proto::RcptParams::default(),
        }],
        received_at: ctx.clock.now(),
        client: CLIENT.into(),
    };
    let mut body = ctx.spool.open_body(qid)?;
    let mut w = ctx.spool.begin(copy)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        w.write(&buf[..n])?;
    }
    let copy_qid = w.queue_id();
    w.commit().wait()?;
    tracing::warn!(queue_id = %qid, double_bounce = %copy_qid, to = %ctx.double_bounce, failed = %address, reply = %reply, "mail from <> undeliverable; a copy goes to the double-bounce address");
    Ok(Some(copy_qid))
}
