//! The steps one delivery goes through: decode (with the handler's codec,
//! checking the broker's content type), key, and the handler call (error,
//! panic and the `Ack` decision turned into one [`Called`]).

use std::any::Any;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

use crate::ack::{Ack, AckDecision, AckProbe};
use crate::codec::Codec;
use crate::delivery::Delivery;
use crate::fingerprint::Fingerprint;
use crate::handler::{Handler, HandlerFn, HandlerMeta, HandlerResult, OnMissingKey};
use crate::key::Key;
use crate::service::{Attempt, Outcome};
use crate::store::DedupStore;

/// The header a broker's content type arrives in (sources map their own
/// property, e.g. AMQP `content_type`, onto it).
pub(crate) const CONTENT_TYPE: &str = "content-type";

/// One delivery of a unit of work, between the steps.
pub(crate) struct Item<P> {
    /// Its attempt's index in the unit.
    pub(crate) at: usize,
    pub(crate) key: Key,
    pub(crate) fingerprint: Option<Fingerprint>,
    /// Moved into the handler by the call.
    pub(crate) payload: Option<P>,
    pub(crate) stage: Stage,
}

impl<P> Item<P> {
    pub(crate) fn at(mut self, at: usize) -> Self {
        self.at = at;
        self
    }

    /// Its claim, if it holds one.
    pub(crate) fn claimed<'r>(
        &self,
        request: &'r crate::store::ClaimRequest<'r>,
    ) -> Option<crate::store::Claimed<'r>> {
        match self.stage {
            Stage::Claimed { token } | Stage::Called { token, .. } => Some(crate::store::Claimed {
                request,
                token,
                result: None,
            }),
            _ => None,
        }
    }
}

/// Where an item is.
pub(crate) enum Stage {
    /// Decoded and keyed, not claimed yet.
    Ready,
    /// Claimed, handler not run yet.
    Claimed { token: u64 },
    /// The handler ran; its claim is not settled yet.
    Called { token: u64, called: Called },
    /// Its attempt has its outcome.
    Settled,
}

impl Stage {
    pub(crate) fn is_ready(&self) -> bool {
        matches!(self, Stage::Ready)
    }

    /// Whether the item holds a claim of the open unit.
    pub(crate) fn holds_claim(&self) -> bool {
        matches!(self, Stage::Claimed { .. } | Stage::Called { .. })
    }
}

/// How a handler call ended.
pub(crate) enum Called {
    /// It returned `Ok` (and acked, in manual modes): the result to cache.
    Succeeded(Option<String>),
    /// It returned `Err` or panicked.
    Failed(String),
    /// It nacked, or dropped its `Ack` undecided.
    Nacked,
}

impl Called {
    pub(crate) fn is_ok(&self) -> bool {
        matches!(self, Called::Succeeded(_))
    }

    /// The outcome once the unit committed. `Failed` carries no retry
    /// delay yet: the retry policy fills it in.
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            Called::Succeeded(_) => Outcome::Processed,
            Called::Failed(reason) => Outcome::Failed {
                reason: reason.clone(),
                retry_in: None,
            },
            Called::Nacked => Outcome::Nacked,
        }
    }
}

/// Decode and key: an item ready to claim, or the outcome that ends the
/// delivery here (dead letter; a rejected key with `on_missing_key = "reject"`).
pub(crate) fn prepare<H: Handler<M>, M>(
    handler: &H,
    meta: &HandlerMeta,
    d: &Delivery,
) -> Result<Item<H::Payload>, Outcome> {
    if let Some(content_type) = d.header(CONTENT_TYPE)
        && let Ok(content_type) = std::str::from_utf8(content_type)
        && !<H::Codec as Codec<H::Payload>>::accepts(content_type)
    {
        return Err(Outcome::Rejected {
            reason: format!(
                "wrong content type: the message says {content_type:?}, but handler {:?} decodes `{}` with codec {} ({}); set `codec = …` on the handler, or fix the producer's content type",
                meta.name,
                std::any::type_name::<H::Payload>(),
                <H::Codec as Codec<H::Payload>>::NAME,
                <H::Codec as Codec<H::Payload>>::CONTENT_TYPES.join(", "),
            ),
        });
    }
    let payload =
        <H::Codec as Codec<H::Payload>>::decode(&d.payload).map_err(|e| Outcome::Rejected {
            reason: format!(
                "undecodable payload: {e} (codec {} decoding `{}`)",
                <H::Codec as Codec<H::Payload>>::NAME,
                std::any::type_name::<H::Payload>()
            ),
        })?;
    let key = handler
        .key(d, &payload)
        .and_then(|k| k.check_len(meta.max_key_len))
        .map_err(|e| match meta.on_missing_key {
            OnMissingKey::DeadLetter => Outcome::Rejected {
                reason: e.to_string(),
            },
            OnMissingKey::Reject => Outcome::Failed {
                reason: e.to_string(),
                retry_in: None,
            },
        })?;
    tracing::Span::current().record("key", key.as_str());
    let fingerprint = handler.fingerprint(d, &payload);
    Ok(Item {
        at: 0,
        key,
        fingerprint,
        payload: Some(payload),
        stage: Stage::Ready,
    })
}

/// Runs the handler once on `tx`. The attempt's `Ack` (manual modes) is
/// handed to the handler and its decision read back; other modes get a
/// detached one.
pub(crate) async fn call<H: HandlerFn<M>, M>(
    handler: &H,
    meta: &HandlerMeta,
    payload: H::Payload,
    tx: &mut <H::Store as DedupStore<M>>::Tx<'_>,
    attempt: &mut Attempt<'_>,
) -> Called {
    let (ack, probe) = match attempt.take_ack() {
        Some(pair) => pair,
        None if meta.ack.is_manual() => Ack::new(),
        None => (Ack::detached(), AckProbe::automatic()),
    };
    let run = AssertUnwindSafe(handler.call(payload, tx, attempt.delivery(), ack))
        .catch_unwind()
        .await;
    match run {
        Ok(result) => match result.into_result() {
            Ok(output) => match probe.decision() {
                AckDecision::Acked => Called::Succeeded(result_json(&output)),
                AckDecision::Nacked => Called::Nacked,
                AckDecision::Dropped => {
                    tracing::warn!(
                        "handler returned without calling ack.ack() or ack.nack() in `{}` mode: rolled back, the message will be redelivered",
                        meta.ack
                    );
                    Called::Nacked
                }
            },
            Err(e) => Called::Failed(format!("handler error: {e}")),
        },
        Err(panic) => Called::Failed(format!("handler panicked: {}", panic_message(&*panic))),
    }
}

/// The handler's result as cached JSON; `None` for `()`/`null`, without
/// allocating for it (most handlers return `()`).
fn result_json<T: serde::Serialize>(output: &T) -> Option<String> {
    let mut json = Json::default();
    match serde_json::to_writer(&mut json, output) {
        Ok(()) if json.spilled.is_empty() && json.head[..json.len] == *b"null" => None,
        Ok(()) => {
            if json.spilled.is_empty() {
                json.spilled.extend_from_slice(&json.head[..json.len]);
            }
            // serde_json writes UTF-8 only.
            String::from_utf8(json.spilled).ok()
        }
        Err(e) => {
            tracing::warn!(error = %e, "handler result could not be serialized; it is not cached");
            None
        }
    }
}

/// JSON text whose first four bytes stay inline: `null` needs no heap.
#[derive(Default)]
struct Json {
    head: [u8; 4],
    len: usize,
    /// Everything, once it is longer than `head`.
    spilled: Vec<u8>,
}

impl std::io::Write for Json {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.spilled.is_empty() && self.len + bytes.len() <= self.head.len() {
            self.head[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            if self.spilled.is_empty() {
                self.spilled.extend_from_slice(&self.head[..self.len]);
            }
            self.spilled.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

/// The dead-letter reason of a key conflict: the handler, the key, what was
/// compared, and the setting to change when the "conflict" is a retry.
pub(crate) fn conflict_reason(
    meta: &HandlerMeta,
    key: &Key,
    stored: Fingerprint,
    this: Option<Fingerprint>,
) -> String {
    let compared = meta
        .fingerprint
        .unwrap_or("(the key extractor's fingerprint)");
    let this = this.map_or_else(|| "none".to_owned(), |f| format!("{f:016x}"));
    format!(
        "key conflict in handler {:?}: key {key} was already processed with a different payload \
         (compared: fingerprint = {compared}; stored {stored:016x}, this one {this}). \
         If this is another message, its producer reused the key: give it a key of its own. \
         If it is a retry of the same message whose compared fields changed between sends, \
         take those fields out of `fingerprint = …` on the handler (without `fingerprint`, \
         every delivery of a done key is a duplicate)",
        meta.name
    )
}

#[cfg(test)]
mod tests {
    use super::result_json;

    #[test]
    fn results_are_cached_as_json_and_null_is_none() {
        assert_eq!(result_json(&()), None);
        assert_eq!(result_json(&None::<u32>), None);
        assert_eq!(result_json(&7u8).as_deref(), Some("7"));
        assert_eq!(result_json(&"ab").as_deref(), Some("\"ab\""));
        assert_eq!(result_json(&"abc").as_deref(), Some("\"abc\""));
        assert_eq!(
            result_json(&serde_json::json!({"id": "ord-1", "n": [1, 2]})).as_deref(),
            Some(r#"{"id":"ord-1","n":[1,2]}"#)
        );
    }
}
