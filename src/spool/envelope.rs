//! The SMTP envelope a Commit record carries: [`Envelope`], [`EnvelopeRecipient`], and
//! their encoding in the record's payload.
//!
//! Owns: the envelope types (re-exported as `record::Envelope`, `spool::Envelope`) and the
//! envelope layout, versioned by its own first byte:
//!
//! ```text
//! version u8 = 1, received_at µs u64, sender str (`""` for `<>`), client str,
//! MAIL parameters (size opt u64, body opt u8, smtputf8 u8, ret opt u8, envid opt str,
//! requiretls u8, auth opt str), recipient count u32, then per recipient: address str,
//! notify opt u8 (bits: 1 never, 2 success, 4 failure, 8 delay), orcpt opt (type str,
//! address str). An `opt` is a tag byte 0/1 followed by the value when 1.
//! ```
//!
//! Promises: every MAIL and RCPT parameter a DSN needs survives the round trip; the
//! recipients keep their RCPT order (the ledger indexes into it).
//! Fails: a bad version, tag or count is a [`FormatError`], never a panic; a recipient
//! count the payload cannot hold is refused before anything is allocated for it.
//! SEE ALSO: `record` (the Commit record around it, golden file `commit.bin`), `wire`.

use std::time::SystemTime;

use postern_proto::params::{Body, Notify, Orcpt, Ret};
use postern_proto::{MailParams, RcptParams};

use super::micros::{from_micros, to_micros};
use super::wire::{FormatError, Reader, put_opt, put_str};

const ENVELOPE_VERSION: u8 = 1;

/// The SMTP envelope of a message, with every parameter a DSN needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The reverse path without brackets; `""` for `<>`.
    pub sender: String,
    /// MAIL FROM parameters (SIZE, BODY, SMTPUTF8, RET, ENVID, REQUIRETLS, AUTH).
    pub params: MailParams,
    /// The accepted recipients, in RCPT order; the ledger indexes into this list.
    pub recipients: Vec<EnvelopeRecipient>,
    /// When DATA ended.
    pub received_at: SystemTime,
    /// The client as logged: HELO name and IP address.
    pub client: String,
}

/// One accepted recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeRecipient {
    /// The forward path without brackets.
    pub address: String,
    /// RCPT TO parameters (NOTIFY, ORCPT).
    pub params: RcptParams,
}

/// Appends `env` to a Commit record's payload.
pub(super) fn encode(o: &mut Vec<u8>, env: &Envelope) {
    o.push(ENVELOPE_VERSION);
    o.extend_from_slice(&to_micros(env.received_at).to_le_bytes());
    put_str(o, &env.sender);
    put_str(o, &env.client);
    let p = &env.params;
    put_opt(o, p.size, |o, v| o.extend_from_slice(&v.to_le_bytes()));
    put_opt(o, p.body, |o, v| {
        o.push(match v {
            Body::SevenBit => 0,
            Body::EightBitMime => 1,
            Body::BinaryMime => 2,
        })
    });
    o.push(u8::from(p.smtputf8));
    put_opt(o, p.ret, |o, v| {
        o.push(match v {
            Ret::Full => 0,
            Ret::Headers => 1,
        })
    });
    put_opt(o, p.envid.as_deref(), put_str);
    o.push(u8::from(p.requiretls));
    put_opt(o, p.auth.as_deref(), put_str);
    o.extend_from_slice(&(env.recipients.len() as u32).to_le_bytes());
    for r in &env.recipients {
        put_str(o, &r.address);
        put_opt(o, r.params.notify, |o, n| {
            o.push(
                u8::from(n.never)
                    | u8::from(n.success) << 1
                    | u8::from(n.failure) << 2
                    | u8::from(n.delay) << 3,
            )
        });
        put_opt(o, r.params.orcpt.as_ref(), |o, x| {
            put_str(o, &x.addr_type);
            put_str(o, &x.address);
        });
    }
}

/// Reads an envelope from a Commit record's payload.
pub(super) fn decode(r: &mut Reader<'_>) -> Result<Envelope, FormatError> {
    if r.u8()? != ENVELOPE_VERSION {
        return Err(FormatError::BadValue("envelope version"));
    }
    let received_at = from_micros(r.u64()?);
    let sender = r.string()?;
    let client = r.string()?;
    let size = r.opt(|r| r.u64())?;
    let body = r.opt(|r| match r.u8()? {
        0 => Ok(Body::SevenBit),
        1 => Ok(Body::EightBitMime),
        2 => Ok(Body::BinaryMime),
        _ => Err(FormatError::BadValue("BODY")),
    })?;
    let smtputf8 = r.bool()?;
    let ret = r.opt(|r| match r.u8()? {
        0 => Ok(Ret::Full),
        1 => Ok(Ret::Headers),
        _ => Err(FormatError::BadValue("RET")),
    })?;
    let envid = r.opt(|r| r.string())?;
    let requiretls = r.bool()?;
    let auth = r.opt(|r| r.string())?;
    let n = r.u32()? as usize;
    // Each recipient takes at least 6 bytes: refuse counts the payload cannot hold.
    if n > r.0.len() / 6 {
        return Err(FormatError::BadValue("recipient count"));
    }
    let mut recipients = Vec::with_capacity(n);
    for _ in 0..n {
        let address = r.string()?;
        let notify = r.opt(|r| {
            let b = r.u8()?;
            if b > 15 {
                return Err(FormatError::BadValue("NOTIFY"));
            }
            Ok(Notify {
                never: b & 1 != 0,
                success: b & 2 != 0,
                failure: b & 4 != 0,
                delay: b & 8 != 0,
            })
        })?;
        let orcpt = r.opt(|r| {
            Ok(Orcpt {
                addr_type: r.string()?,
                address: r.string()?,
            })
        })?;
        recipients.push(EnvelopeRecipient {
            address,
            params: RcptParams { notify, orcpt },
        });
    }
    Ok(Envelope {
        sender,
        params: MailParams {
            size,
            body,
            smtputf8,
            ret,
            envid,
            requiretls,
            auth,
        },
        recipients,
        received_at,
        client,
    })
}
