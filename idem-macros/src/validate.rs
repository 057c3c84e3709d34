//! Checks that need more than one argument, or the arguments and the
//! handler's signature together. Every error is collected (with
//! `syn::Error::combine`), each at the token it is about.

use proc_macro2::{Span, TokenStream};

use crate::parse::{AckMode, Args, Choice, Store};
use crate::signature::Signature;

/// Collects errors instead of stopping at the first.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }
    pub(crate) fn at(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.push(syn::Error::new(span, msg));
    }
    /// An error underlining all of `tokens` (first to last token), not only
    /// the first: stable proc macros cannot join spans themselves.
    pub(crate) fn spanned(&mut self, tokens: impl quote::ToTokens, msg: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, msg));
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }
    pub(crate) fn into_compile_errors(self) -> TokenStream {
        self.0.map(|e| e.to_compile_error()).unwrap_or_default()
    }
}

/// The closest name to `unknown` among `known`, if it is close enough to be
/// a typo: an edit distance of at most a third of its length (at least 1),
/// or half of it when they share a 4-letter prefix (`retry` → `retries`).
pub(crate) fn closest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    let len = unknown.chars().count();
    known
        .iter()
        .map(|k| (distance(unknown, k), *k))
        .filter(|(d, k)| {
            let prefix = unknown
                .chars()
                .zip(k.chars())
                .take_while(|(a, b)| a == b)
                .count();
            *d <= (len / 3).max(1) || (prefix >= 4 && *d <= len / 2 + 1)
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The store as written: `"postgres"`, `my::Store`.
pub(crate) fn store_text(store: &Store) -> String {
    match store {
        Store::Builtin(b) => b.spelling().to_owned(),
        Store::Custom(p) => quote::ToTokens::to_token_stream(p)
            .to_string()
            .replace(' ', ""),
    }
}

/// A batch handler (`Vec<T>` / `Batch<T>`): it runs a fetched batch in one
/// call, so its ack mode is `batch`, and it takes neither an `Ack` (one
/// token cannot settle many messages) nor a `&Delivery` (`Batch<T>` carries
/// each message's).
fn validate_batch(
    args: &Args,
    sig: &Signature,
    batch: &crate::signature::BatchParam,
    errors: &mut Errors,
) {
    let written = quote::ToTokens::to_token_stream(&batch.written)
        .to_string()
        .replace(' ', "");
    if let Some(ack) = args.ack
        && ack.value != AckMode::Batch
    {
        errors.at(
            ack.span,
            format!(
                "a batch handler (`{written}`) runs a fetched batch in one call and commits it once: \
                 its ack mode is \"batch\" (the default for batch handlers); remove `ack = \"{}\"` \
                 or take one message (`order: T`) per call",
                ack.value.spelling()
            ),
        );
    }
    if let Some(ack) = &sig.ack {
        errors.spanned(
            &ack.tokens,
            format!(
                "a batch handler (`{written}`) takes no `Ack`: idem acks the batch's messages after \
                 its commit; return `Err(idem::BatchError::at(index, e))` to fail one message"
            ),
        );
    }
    if let Some(delivery) = &sig.delivery {
        errors.spanned(
            &delivery.tokens,
            format!(
                "a batch handler takes no `&Delivery`: take the batch as `idem::Batch<T>` instead of \
                 `{written}`, whose `iter()` gives each message with its delivery"
            ),
        );
    }
}

/// Checks that need both the arguments and the signature. `attr` is the
/// argument list, underlined by errors about an argument that is missing.
pub(crate) fn validate(args: &Args, sig: &Signature, attr: &TokenStream, errors: &mut Errors) {
    let mut missing = |msg: &str| {
        if attr.is_empty() {
            errors.at(Span::call_site(), msg);
        } else {
            errors.spanned(attr, msg);
        }
    };
    if !args.given("topic") {
        missing(
            "missing `topic = \"…\"`: the topic, stream, queue or subject this handler consumes",
        );
    }
    if let (Some(_), Some(with)) = (&args.key, &args.with) {
        errors.spanned(with, "give either `key = …` or `with = …`, not both");
    }
    if let Some(store) = &args.store
        && !args.given("key")
        && !args.given("with")
    {
        errors.at(
            store.span,
            format!(
                "store `{}` deduplicates by key, but there is no `key = …`: what identifies a message? \
                 e.g. key = \"order_id\", key = (\"tenant\", \"id\"), key = header(\"Idempotency-Key\"), \
                 key = message_id, or with = my_extractor",
                store_text(&store.value)
            ),
        );
    }
    if let Some(batch) = &sig.batch {
        validate_batch(args, sig, batch, errors);
        return;
    }
    let ack = args.ack.map(|a| a.value).unwrap_or(AckMode::Auto);
    match (ack.is_manual(), &sig.ack) {
        (true, None) => {
            let span = args.ack.map(|a| a.span).unwrap_or_else(Span::call_site);
            errors.at(
                span,
                format!(
                    "ack = \"{}\" needs an `ack: idem::Ack` parameter: the handler calls `ack.ack()` when the message is done",
                    ack.spelling()
                ),
            );
        }
        (false, Some(loc)) if !(args.ack.is_none() && args.given("ack")) => errors.spanned(
            &loc.tokens,
            format!(
                "an `Ack` parameter needs `ack = \"manual\"` or `ack = \"manual_immediate\"`; with {}ack = \"{}\" idem acks by itself",
                if args.ack.is_none() { "the default " } else { "" },
                ack.spelling()
            ),
        ),
        _ => {}
    }
    if let Some(tx) = &sig.tx
        && !args.given("store")
    {
        errors.spanned(
            &tx.tokens,
            "this handler takes a transaction but has no `store`: a `tx` parameter needs a store \
             whose dedup record commits in the handler's transaction, e.g. store = \"postgres\"",
        );
    }
    if let Some(on_missing_key) = args.on_missing_key
        && !args.key.as_ref().is_some_and(|k| k.value.has_field())
        && !(args.key.is_none() && args.given("key"))
    {
        let key = match (&args.key, &args.with) {
            (Some(k), _) => format!("key = {}", k.value.describe()),
            (None, Some(_)) => "a `with` extractor".into(),
            (None, None) => "key = message_id (the default)".into(),
        };
        errors.at(
            on_missing_key.span,
            format!(
                "`on_missing_key` applies to payload-field keys only (`key = \"field\"`), not to {key}; remove it"
            ),
        );
    }
}
