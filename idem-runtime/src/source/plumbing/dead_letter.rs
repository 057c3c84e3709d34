//! The dead letter every broker writes: the original payload and headers,
//! idem's fields in place of any the original had, published and confirmed
//! before the original is settled.

use std::borrow::Cow;
use std::future::Future;

use crate::delivery::Delivery;
use crate::source::dead_letter_headers as dlh;
use crate::source::{DeadLetter, SourceError};

/// One header of a dead letter: a name and its bytes.
pub(crate) type Header<'a> = (&'a str, Cow<'a, [u8]>);

/// A broker's half of writing a dead letter (the other half, which headers it
/// carries, is [`write_dead_letter`]'s).
pub(crate) trait DeadLetterSink: Send + Sync {
    /// Whether a header of the original is the broker's own (a delivery
    /// count, a protocol header) and is not copied onto the dead letter.
    fn reserved(&self, name: &str) -> bool {
        let _ = name;
        false
    }

    /// Publishes the dead letter (`d`'s payload with `headers`), waits until
    /// the broker confirmed it, then settles `d` so it is not delivered
    /// again; in one step where the broker has one. On failure `d` stays
    /// unsettled: it comes back and is dead-lettered again.
    fn publish_and_settle(
        &self,
        d: &Delivery,
        headers: Vec<Header<'_>>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// Moves `d` to `sink`'s dead letters: its headers (but idem's own and the
/// broker's reserved ones), then reason, attempts, handler and original id.
pub(crate) async fn write_dead_letter<S: DeadLetterSink>(
    sink: &S,
    d: &Delivery,
    letter: &DeadLetter,
) -> Result<(), SourceError> {
    let mut headers: Vec<Header<'_>> = d
        .headers
        .iter()
        .filter(|(k, _)| !is_dead_letter_field(k) && !sink.reserved(k))
        .map(|(k, v)| (k, Cow::Borrowed(v)))
        .collect();
    headers.extend(
        dead_letter_fields(d, letter)
            .into_iter()
            .map(|(k, v)| (k, Cow::Owned(v.into_bytes()))),
    );
    sink.publish_and_settle(d, headers).await
}

/// The fields idem writes on a dead letter, whatever the broker: reason,
/// attempts, handler and the original message id.
fn dead_letter_fields(d: &Delivery, letter: &DeadLetter) -> [(&'static str, String); 4] {
    [
        (dlh::REASON, letter.reason.clone()),
        (dlh::ATTEMPTS, letter.attempts.to_string()),
        (dlh::HANDLER, letter.handler.clone()),
        (dlh::ORIGINAL_ID, d.id.to_string()),
    ]
}

/// Whether a header of the original message is one idem writes itself on a
/// dead letter (it is replaced, not duplicated).
fn is_dead_letter_field(name: &str) -> bool {
    [dlh::REASON, dlh::ATTEMPTS, dlh::HANDLER, dlh::ORIGINAL_ID]
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what it was asked to publish.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, Vec<u8>)>>);

    impl DeadLetterSink for Recorder {
        fn reserved(&self, name: &str) -> bool {
            name == "x-delivery-count"
        }
        async fn publish_and_settle(
            &self,
            _: &Delivery,
            headers: Vec<Header<'_>>,
        ) -> Result<(), SourceError> {
            let mut out = self.0.lock().unwrap();
            out.extend(
                headers
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.into_owned())),
            );
            Ok(())
        }
    }

    #[tokio::test]
    async fn dead_letters_keep_headers_but_idems_own_and_the_brokers_reserved_ones() {
        let mut d = Delivery::new("m-1", "orders", &b"{}"[..]);
        d.headers.insert("x-trace", "t1");
        d.headers.insert("x-delivery-count", "3");
        d.headers
            .insert("IDEM-DEAD-LETTER-REASON", "an older reason");
        let letter = DeadLetter {
            reason: "undecodable payload".into(),
            attempts: 4,
            handler: "orders".into(),
        };
        let sink = Recorder::default();
        write_dead_letter(&sink, &d, &letter).await.unwrap();
        let got = sink.0.into_inner().unwrap();
        let text: Vec<(&str, &str)> = got
            .iter()
            .map(|(k, v)| (k.as_str(), std::str::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(
            text,
            [
                ("x-trace", "t1"),
                (dlh::REASON, "undecodable payload"),
                (dlh::ATTEMPTS, "4"),
                (dlh::HANDLER, "orders"),
                (dlh::ORIGINAL_ID, "m-1"),
            ]
        );
    }
}
