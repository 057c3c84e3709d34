//! The attribute's arguments, parsed into one typed [`Args`].
//!
//! Each argument name is a `syn::custom_keyword!`, read with `lookahead1()`,
//! so a wrong name is answered with every valid one. Each value is parsed
//! into its own type (an enum per policy, a [`KeySpec`], durations in
//! milliseconds), keeping the span of what the user wrote. A wrong value is
//! recorded and parsing goes on after the next `,`: every mistake of one
//! attribute is reported together, each at its token.
//!
//! Values may arrive inside the invisible groups that `macro_rules!` puts
//! around a `$x:literal` or `$x:expr` it passes on: syn's token parsers look
//! through them, and [`ungrouped`] unwraps them where an expression is read.

use proc_macro2::{Delimiter, Span, TokenStream};
use syn::parse::discouraged::AnyDelimiter;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Expr, LitBool, LitInt, LitStr, Token, token};

use crate::validate::{Errors, closest};

/// One keyword per argument.
pub(crate) mod kw {
    syn::custom_keyword!(topic);
    syn::custom_keyword!(key);
    syn::custom_keyword!(with);
    syn::custom_keyword!(store);
    syn::custom_keyword!(codec);
    syn::custom_keyword!(ack);
    syn::custom_keyword!(ttl);
    syn::custom_keyword!(lease);
    syn::custom_keyword!(retries);
    syn::custom_keyword!(backoff);
    syn::custom_keyword!(dead_letter);
    syn::custom_keyword!(ordered);
    syn::custom_keyword!(name);
    syn::custom_keyword!(fingerprint);
    syn::custom_keyword!(on_missing_key);
    syn::custom_keyword!(on_in_progress);
    syn::custom_keyword!(max_key_len);
    // Key forms.
    syn::custom_keyword!(header);
    syn::custom_keyword!(message_id);
}

/// Every argument name, for "did you mean" (the `lookahead1` error lists them).
const ARGUMENTS: &[&str] = &[
    "topic",
    "key",
    "with",
    "store",
    "codec",
    "ack",
    "ttl",
    "lease",
    "retries",
    "backoff",
    "dead_letter",
    "ordered",
    "name",
    "fingerprint",
    "on_missing_key",
    "on_in_progress",
    "max_key_len",
    "crate",
];

/// A value and the span of what the user wrote for it.
#[derive(Clone, Copy)]
pub(crate) struct Spanned<T> {
    pub(crate) value: T,
    pub(crate) span: Span,
}

/// A closed set of string values (`ack = "manual"`, …).
pub(crate) trait Choice: Copy + Sized + 'static {
    /// The argument, as written in errors.
    const WHAT: &'static str;
    /// Every value with its spelling, in the order errors list them.
    const VALUES: &'static [(&'static str, Self)];
    /// What else is accepted, appended to the list of values.
    const OR: &'static str = "";

    fn spelling(self) -> &'static str
    where
        Self: PartialEq,
    {
        Self::VALUES
            .iter()
            .find(|(_, v)| *v == self)
            .map(|(s, _)| *s)
            .unwrap_or("")
    }
}

/// `store = …`: a built-in store by name, or the path of a store type.
pub(crate) enum Store {
    Builtin(BuiltinStore),
    Custom(syn::Path),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BuiltinStore {
    Sqlite,
    Postgres,
    Mysql,
    Redis,
    Memory,
}

impl Choice for BuiltinStore {
    const WHAT: &'static str = "store";
    const VALUES: &'static [(&'static str, Self)] = &[
        ("sqlite", BuiltinStore::Sqlite),
        ("postgres", BuiltinStore::Postgres),
        ("mysql", BuiltinStore::Mysql),
        ("redis", BuiltinStore::Redis),
        ("memory", BuiltinStore::Memory),
    ];
    const OR: &'static str = ", or the path of a store type (store = my::MyStore)";
}

impl BuiltinStore {
    /// The type's name in `__private::stores`.
    pub(crate) fn ident(self) -> &'static str {
        match self {
            BuiltinStore::Sqlite => "Sqlite",
            BuiltinStore::Postgres => "Postgres",
            BuiltinStore::Mysql => "Mysql",
            BuiltinStore::Redis => "Redis",
            BuiltinStore::Memory => "Memory",
        }
    }
}

/// `codec = …`: a built-in codec by name, or the path of a codec type.
pub(crate) enum Codec {
    Builtin(BuiltinCodec),
    Custom(syn::Path),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BuiltinCodec {
    Json,
    MsgPack,
    Protobuf,
}

impl Choice for BuiltinCodec {
    const WHAT: &'static str = "codec";
    const VALUES: &'static [(&'static str, Self)] = &[
        ("json", BuiltinCodec::Json),
        ("msgpack", BuiltinCodec::MsgPack),
        ("protobuf", BuiltinCodec::Protobuf),
    ];
    const OR: &'static str = ", or the path of a codec type (codec = my::MyCodec)";
}

impl BuiltinCodec {
    /// The type's name in `idem::codec`.
    pub(crate) fn ident(self) -> &'static str {
        match self {
            BuiltinCodec::Json => "Json",
            BuiltinCodec::MsgPack => "MsgPack",
            BuiltinCodec::Protobuf => "Protobuf",
        }
    }
}

/// `ack = …`
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckMode {
    Before,
    Auto,
    Manual,
    ManualImmediate,
    Batch,
}

impl Choice for AckMode {
    const WHAT: &'static str = "ack mode";
    const VALUES: &'static [(&'static str, Self)] = &[
        ("before", AckMode::Before),
        ("auto", AckMode::Auto),
        ("manual", AckMode::Manual),
        ("manual_immediate", AckMode::ManualImmediate),
        ("batch", AckMode::Batch),
    ];
}

impl AckMode {
    pub(crate) fn is_manual(self) -> bool {
        matches!(self, AckMode::Manual | AckMode::ManualImmediate)
    }
    /// The variant of `idem::AckMode`.
    pub(crate) fn ident(self) -> &'static str {
        match self {
            AckMode::Before => "Before",
            AckMode::Auto => "Auto",
            AckMode::Manual => "Manual",
            AckMode::ManualImmediate => "ManualImmediate",
            AckMode::Batch => "Batch",
        }
    }
}

/// `on_missing_key = …`
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnMissingKey {
    DeadLetter,
    Reject,
}

impl Choice for OnMissingKey {
    const WHAT: &'static str = "on_missing_key";
    const VALUES: &'static [(&'static str, Self)] = &[
        ("dead_letter", OnMissingKey::DeadLetter),
        ("reject", OnMissingKey::Reject),
    ];
}

impl OnMissingKey {
    /// The variant of `idem::OnMissingKey`.
    pub(crate) fn ident(self) -> &'static str {
        match self {
            OnMissingKey::DeadLetter => "DeadLetter",
            OnMissingKey::Reject => "Reject",
        }
    }
}

/// `on_in_progress = …`
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnInProgress {
    Retry,
    Wait,
}

impl Choice for OnInProgress {
    const WHAT: &'static str = "on_in_progress";
    const VALUES: &'static [(&'static str, Self)] =
        &[("retry", OnInProgress::Retry), ("wait", OnInProgress::Wait)];
}

impl OnInProgress {
    /// The variant of `idem::OnInProgress`.
    pub(crate) fn ident(self) -> &'static str {
        match self {
            OnInProgress::Retry => "Retry",
            OnInProgress::Wait => "Wait",
        }
    }
}

/// A payload field named by a string literal: `"order_id"`, `"customer.id"`.
pub(crate) struct FieldPath {
    /// The segments: names or tuple indices.
    pub(crate) members: Vec<FieldSegment>,
    /// The literal.
    pub(crate) lit: LitStr,
}

pub(crate) enum FieldSegment {
    Named(String),
    Index(u32),
}

impl FieldPath {
    pub(crate) fn text(&self) -> String {
        self.lit.value()
    }
}

/// One way of getting a key.
pub(crate) enum KeySpec {
    /// `"order_id"`, `"customer.id"`
    Field(FieldPath),
    /// `header("Idempotency-Key")`
    Header(LitStr),
    /// `message_id`
    MessageId,
    /// `("tenant_id", "order_id")`
    Composite(Vec<KeySpec>),
}

impl KeySpec {
    /// The key as written, for the handler's metadata and errors.
    pub(crate) fn describe(&self) -> String {
        match self {
            KeySpec::Field(f) => f.text(),
            KeySpec::Header(h) => format!("header({:?})", h.value()),
            KeySpec::MessageId => "message_id".into(),
            KeySpec::Composite(parts) => format!(
                "({})",
                parts
                    .iter()
                    .map(KeySpec::describe)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    pub(crate) fn has_field(&self) -> bool {
        match self {
            KeySpec::Field(_) => true,
            KeySpec::Composite(p) => p.iter().any(KeySpec::has_field),
            _ => false,
        }
    }
}

/// A duration in milliseconds.
#[derive(Clone, Copy)]
pub(crate) struct Millis(pub(crate) u64);

/// Everything the attribute said; `None`: not given.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) topic: Option<LitStr>,
    pub(crate) key: Option<Spanned<KeySpec>>,
    /// `with = <expr>`: any expression that yields a key extractor.
    pub(crate) with: Option<Expr>,
    pub(crate) store: Option<Spanned<Store>>,
    pub(crate) codec: Option<Spanned<Codec>>,
    pub(crate) ack: Option<Spanned<AckMode>>,
    pub(crate) ttl: Option<Millis>,
    pub(crate) lease: Option<Millis>,
    pub(crate) retries: Option<u32>,
    pub(crate) backoff: Option<(Millis, Millis)>,
    pub(crate) dead_letter: Option<LitStr>,
    pub(crate) ordered: Option<bool>,
    pub(crate) name: Option<LitStr>,
    pub(crate) fingerprint: Option<Vec<FieldPath>>,
    pub(crate) on_missing_key: Option<Spanned<OnMissingKey>>,
    pub(crate) on_in_progress: Option<OnInProgress>,
    pub(crate) max_key_len: Option<u32>,
    pub(crate) krate: Option<syn::Path>,
    /// Every argument named, whether or not its value was right.
    pub(crate) given: Vec<(&'static str, Span)>,
}

impl Args {
    /// Whether the argument was written (right or wrong).
    pub(crate) fn given(&self, name: &str) -> bool {
        self.given.iter().any(|(n, _)| *n == name)
    }

    /// Parses the attribute's tokens. Every mistake goes to `errors`; what
    /// was understood is returned (for the fallback expansion).
    pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> Args {
        let mut args = Args::default();
        let parser = |input: ParseStream<'_>| {
            args.parse_all(input, errors);
            Ok(())
        };
        // `parse_all` consumes every token and reports into `errors`.
        let _ = parser.parse2(tokens);
        args
    }

    fn parse_all(&mut self, input: ParseStream<'_>, errors: &mut Errors) {
        while !input.is_empty() {
            if let Err(e) = self.parse_one(input) {
                errors.push(e);
                skip_to_comma(input);
            }
            if input.is_empty() {
                break;
            }
            if let Err(e) = input.parse::<Token![,]>() {
                errors.push(syn::Error::new(e.span(), "expected `,` between arguments"));
                skip_to_comma(input);
                let _ = input.parse::<Token![,]>();
            }
        }
    }

    /// `name = value`
    fn parse_one(&mut self, input: ParseStream<'_>) -> syn::Result<()> {
        let (name, span) = argument_name(input)?;
        input.parse::<Token![=]>().map_err(|e| {
            syn::Error::new(
                e.span(),
                format!("expected `=` after `{name}`: arguments are written `{name} = value`"),
            )
        })?;
        if self.given(name) {
            // The value is skipped; the first one counts.
            skip_to_comma(input);
            return Err(syn::Error::new(
                span,
                format!("`{name}` is given twice; keep one"),
            ));
        }
        self.given.push((name, span));
        match name {
            "topic" => self.topic = Some(non_empty(input, "topic")?),
            "key" => {
                let span = input.span();
                let key = key_spec(input, false)?;
                self.key = Some(Spanned { value: key, span });
            }
            "with" => self.with = Some(input.parse::<Expr>()?),
            "store" => {
                self.store = Some(if input.peek(LitStr) {
                    let (value, span) = choice::<BuiltinStore>(input)?;
                    Spanned {
                        value: Store::Builtin(value),
                        span,
                    }
                } else if input.peek(syn::Ident) || input.peek(Token![::]) {
                    let span = input.span();
                    let path = ungrouped(input, syn::Path::parse_mod_style)?;
                    Spanned {
                        value: Store::Custom(path),
                        span,
                    }
                } else {
                    return Err(input.error(expected_values::<BuiltinStore>("a store")));
                })
            }
            "codec" => {
                self.codec = Some(if input.peek(LitStr) {
                    let (value, span) = choice::<BuiltinCodec>(input)?;
                    Spanned {
                        value: Codec::Builtin(value),
                        span,
                    }
                } else if input.peek(syn::Ident) || input.peek(Token![::]) {
                    let span = input.span();
                    let path = ungrouped(input, syn::Path::parse_mod_style)?;
                    Spanned {
                        value: Codec::Custom(path),
                        span,
                    }
                } else {
                    return Err(input.error(expected_values::<BuiltinCodec>("a codec")));
                })
            }
            "ack" => {
                let (value, span) = choice::<AckMode>(input)?;
                self.ack = Some(Spanned { value, span });
            }
            "ttl" => self.ttl = Some(duration(input, "ttl")?),
            "lease" => self.lease = Some(duration(input, "lease")?),
            "retries" => self.retries = Some(integer(input, "retries", 0)?),
            "backoff" => self.backoff = Some(backoff(input)?),
            "dead_letter" => self.dead_letter = Some(non_empty(input, "dead_letter")?),
            "ordered" => {
                let b: LitBool = input
                    .parse()
                    .map_err(|e| syn::Error::new(e.span(), "`ordered` takes `true` or `false`"))?;
                self.ordered = Some(b.value);
            }
            "name" => self.name = Some(non_empty(input, "name")?),
            "fingerprint" => self.fingerprint = Some(fingerprint(input)?),
            "on_missing_key" => {
                let (value, span) = choice::<OnMissingKey>(input)?;
                self.on_missing_key = Some(Spanned { value, span });
            }
            "on_in_progress" => self.on_in_progress = Some(choice::<OnInProgress>(input)?.0),
            "max_key_len" => self.max_key_len = Some(integer(input, "max_key_len", 1)?),
            "crate" => {
                let s = lit_str(input, "crate")?;
                self.krate = Some(s.parse::<syn::Path>().map_err(|_| {
                    syn::Error::new(s.span(), "`crate` takes a path, e.g. crate = \"my_idem\"")
                })?);
            }
            _ => unreachable!("argument_name returns the names above"),
        }
        Ok(())
    }
}

/// The argument's name, via `lookahead1`: a wrong name gets the list of
/// valid ones, with the closest first when it looks like a typo.
fn argument_name(input: ParseStream<'_>) -> syn::Result<(&'static str, Span)> {
    macro_rules! names {
        ($la:ident: $($kw:ident),*) => {
            $(
                if $la.peek(kw::$kw) {
                    let k: kw::$kw = input.parse()?;
                    return Ok((stringify!($kw), k.span));
                }
            )*
        };
    }
    let la = input.lookahead1();
    names!(la: topic, key, with, store, codec, ack, ttl, lease, retries, backoff,
        dead_letter, ordered, name, fingerprint, on_missing_key, on_in_progress, max_key_len);
    if la.peek(Token![crate]) {
        let k: Token![crate] = input.parse()?;
        return Ok(("crate", k.span));
    }
    let expected = la.error();
    let fork = input.fork();
    match fork.call(<syn::Ident as syn::ext::IdentExt>::parse_any) {
        Ok(unknown) => {
            let name = unknown.to_string();
            let hint = closest(&name, ARGUMENTS)
                .map(|k| format!("did you mean `{k}`? "))
                .unwrap_or_default();
            Err(syn::Error::new(
                unknown.span(),
                format!("unknown argument `{name}`; {hint}{expected}"),
            ))
        }
        Err(_) => Err(expected),
    }
}

/// Skips tokens up to (not including) the next `,` at this level.
fn skip_to_comma(input: ParseStream<'_>) {
    let _ = input.step(|cursor| {
        let mut rest = *cursor;
        while let Some((tt, next)) = rest.token_tree() {
            if let proc_macro2::TokenTree::Punct(p) = &tt
                && p.as_char() == ','
            {
                break;
            }
            rest = next;
        }
        Ok(((), rest))
    });
}

/// Runs `f` inside the invisible groups `macro_rules!` may wrap a value in.
fn ungrouped<T>(
    input: ParseStream<'_>,
    f: impl Fn(ParseStream<'_>) -> syn::Result<T> + Copy,
) -> syn::Result<T> {
    if input.cursor().group(Delimiter::None).is_some() {
        let (_, _, content) = input.parse_any_delimiter()?;
        let value = ungrouped(&content, f)?;
        if !content.is_empty() {
            return Err(content.error("unexpected token"));
        }
        Ok(value)
    } else {
        f(input)
    }
}

fn lit_str(input: ParseStream<'_>, what: &str) -> syn::Result<LitStr> {
    input.parse::<LitStr>().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("`{what}` takes a string literal, e.g. {what} = \"…\""),
        )
    })
}

fn non_empty(input: ParseStream<'_>, what: &str) -> syn::Result<LitStr> {
    let s = lit_str(input, what)?;
    if s.value().trim().is_empty() {
        return Err(syn::Error::new(
            s.span(),
            format!("`{what}` must not be empty"),
        ));
    }
    Ok(s)
}

fn expected_values<T: Choice>(article: &str) -> String {
    let valid = T::VALUES
        .iter()
        .map(|(n, _)| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!("expected {article}: one of {valid}{}", T::OR)
}

/// One of `T`'s string values.
fn choice<T: Choice>(input: ParseStream<'_>) -> syn::Result<(T, Span)> {
    let s = input
        .parse::<LitStr>()
        .map_err(|e| syn::Error::new(e.span(), expected_values::<T>("a string")))?;
    let value = s.value();
    if let Some((_, t)) = T::VALUES.iter().find(|(n, _)| *n == value) {
        return Ok((*t, s.span()));
    }
    let valid = T::VALUES
        .iter()
        .map(|(n, _)| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let names: Vec<&str> = T::VALUES.iter().map(|(n, _)| *n).collect();
    let hint = closest(&value, &names)
        .map(|k| format!("did you mean \"{k}\"? "))
        .unwrap_or_default();
    Err(syn::Error::new(
        s.span(),
        format!(
            "unknown {} {value:?}; {hint}expected one of: {valid}{}",
            T::WHAT,
            T::OR
        ),
    ))
}

fn integer(input: ParseStream<'_>, what: &str, min: u32) -> syn::Result<u32> {
    if input.peek(Token![-]) {
        let minus: Token![-] = input.parse()?;
        let rest: TokenStream = match input.parse::<LitInt>() {
            Ok(i) => quote::quote!(#i),
            Err(_) => TokenStream::new(),
        };
        return Err(syn::Error::new_spanned(
            quote::quote!(#minus #rest),
            format!(
                "`{what}` takes a whole number from {min} to {}, not a negative one",
                u32::MAX
            ),
        ));
    }
    let i: LitInt = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("`{what}` takes an integer, e.g. {what} = 5"),
        )
    })?;
    match i.base10_parse::<u32>() {
        Ok(x) if x >= min => Ok(x),
        _ if min > 0 => Err(syn::Error::new(
            i.span(),
            format!("`{what}` takes a positive integer"),
        )),
        _ => Err(syn::Error::new(
            i.span(),
            format!("`{what}` takes a whole number from 0 to {}", u32::MAX),
        )),
    }
}

/// Parses a duration such as "500ms", "30s", "7d"; the error says what is wrong.
fn parse_duration(text: &str) -> Result<Millis, String> {
    use humantime::DurationError as E;
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.as_millis() > 0 => Ok(Millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
        Ok(_) => Err(format!("{text:?} is zero; it must be longer")),
        Err(E::UnknownUnit { unit, .. }) => Err(format!(
            "{text:?} has an unknown unit {unit:?}; units are ms, s, m, h, d (also sec, min, hours, days, weeks)"
        )),
        Err(E::Empty) => Err("the duration is empty".into()),
        Err(E::NumberOverflow) => Err(format!("{text:?} is too long a duration")),
        Err(_) => Err(format!(
            "{text:?} is not a duration: write a number and a unit"
        )),
    }
}

fn duration(input: ParseStream<'_>, what: &str) -> syn::Result<Millis> {
    let s = lit_str(input, what)?;
    // "forever", "never", "none": a ttl that means no expiry.
    let forever = if what == "ttl" && !s.value().chars().any(|c| c.is_ascii_digit()) {
        " (leave `ttl` out to keep records forever)"
    } else {
        ""
    };
    parse_duration(&s.value()).map_err(|e| {
        syn::Error::new(
            s.span(),
            format!("invalid `{what}`: {e}, e.g. {what} = \"30s\" or \"7d\"{forever}"),
        )
    })
}

fn backoff(input: ParseStream<'_>) -> syn::Result<(Millis, Millis)> {
    let s = lit_str(input, "backoff")?;
    let text = s.value();
    let range = match text.split_once("..") {
        None => Err(format!("{text:?} is not a range")),
        Some((a, b)) => match (parse_duration(a), parse_duration(b)) {
            (Ok(lo), Ok(hi)) if lo.0 > hi.0 => Err(format!(
                "the first delay ({}) is longer than the largest ({})",
                a.trim(),
                b.trim()
            )),
            (Ok(lo), Ok(hi)) => Ok((lo, hi)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
    };
    range.map_err(|e| {
        syn::Error::new(
            s.span(),
            format!(
                "invalid `backoff`: {e}; write the first and the largest retry delay, e.g. backoff = \"100ms..30s\""
            ),
        )
    })
}

/// A bare field name, as the string literal it stands for (same span).
fn ident_as_lit(input: ParseStream<'_>) -> syn::Result<LitStr> {
    let ident: syn::Ident = input.parse()?;
    Ok(LitStr::new(&ident.to_string(), ident.span()))
}

/// `"customer.id"` → its segments.
fn field_path(s: LitStr, what: &str) -> syn::Result<FieldPath> {
    let text = s.value();
    let mut members = Vec::new();
    for seg in text.split('.') {
        if let Ok(i) = seg.parse::<u32>() {
            members.push(FieldSegment::Index(i));
        } else if seg
            .chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
            && seg.chars().all(|c| c.is_alphanumeric() || c == '_')
            && syn::parse_str::<syn::Ident>(seg).is_ok()
        {
            members.push(FieldSegment::Named(seg.to_owned()));
        } else {
            return Err(syn::Error::new(
                s.span(),
                format!(
                    "`{text}` is not a field path; {what} names a payload field like \"order_id\" or \"customer.id\""
                ),
            ));
        }
    }
    Ok(FieldPath { members, lit: s })
}

const KEY_FORMS: &str =
    "\"field\" (or field), \"nested.field\", (\"a\", \"b\"), header(\"Name\"), message_id";

fn key_spec(input: ParseStream<'_>, nested: bool) -> syn::Result<KeySpec> {
    if input.peek(LitStr) {
        return Ok(KeySpec::Field(field_path(input.parse()?, "key")?));
    }
    if input.peek(kw::message_id) {
        input.parse::<kw::message_id>()?;
        return Ok(KeySpec::MessageId);
    }
    // A bare field name, `key = order_id`: what rustc's "a field with a
    // similar name exists" suggestion writes for a misspelt `key = "orderid"`.
    if input.peek(syn::Ident) && !input.peek(kw::header) && !input.peek2(token::Paren) {
        return Ok(KeySpec::Field(field_path(ident_as_lit(input)?, "key")?));
    }
    if input.peek(kw::header) {
        let h: kw::header = input.parse()?;
        let bad = || {
            syn::Error::new(
                h.span,
                "`header(…)` takes one non-empty string: header(\"Idempotency-Key\")",
            )
        };
        if !input.peek(token::Paren) {
            return Err(bad());
        }
        let content;
        syn::parenthesized!(content in input);
        let name: LitStr = content.parse().map_err(|_| bad())?;
        if !content.is_empty() || name.value().is_empty() {
            return Err(bad());
        }
        return Ok(KeySpec::Header(name));
    }
    if input.peek(token::Paren) {
        let content;
        let paren = syn::parenthesized!(content in input);
        let span = paren.span.join();
        if nested {
            return Err(syn::Error::new(
                span,
                "a composite key's parts are fields, headers or message_id, not another tuple",
            ));
        }
        // Every part is parsed, so that every bad one is reported.
        let mut parts = Vec::new();
        let mut failed: Option<syn::Error> = None;
        let mut trailing = false;
        while !content.is_empty() {
            match key_spec(&content, true) {
                Ok(p) => parts.push(p),
                Err(e) => {
                    match &mut failed {
                        None => failed = Some(e),
                        Some(all) => all.combine(e),
                    }
                    skip_to_comma(&content);
                }
            }
            trailing = false;
            if content.is_empty() {
                break;
            }
            content.parse::<Token![,]>()?;
            trailing = true;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if parts.len() == 1 && !trailing {
            // `("order_id")`: parentheses around one key.
            return Ok(parts.remove(0));
        }
        if !(2..=6).contains(&parts.len()) {
            return Err(syn::Error::new(span, "a composite key has 2 to 6 parts"));
        }
        return Ok(KeySpec::Composite(parts));
    }
    Err(input.error(format!(
        "unsupported key; expected one of: {KEY_FORMS}, or use `with = <key extractor>`"
    )))
}

fn fingerprint(input: ParseStream<'_>) -> syn::Result<Vec<FieldPath>> {
    let bad = |span: Span| {
        syn::Error::new(
            span,
            "`fingerprint` takes a non-empty list of fields: [\"amount\", \"currency\"]",
        )
    };
    if !input.peek(token::Bracket) {
        return Err(bad(input.span()));
    }
    let content;
    let bracket = syn::bracketed!(content in input);
    let field = |input: ParseStream<'_>| {
        if input.peek(syn::Ident) {
            ident_as_lit(input)
        } else {
            input.parse::<LitStr>()
        }
    };
    let lits =
        Punctuated::<LitStr, Token![,]>::parse_terminated_with(&content, field).map_err(|e| {
            syn::Error::new(
                e.span(),
                "`fingerprint` lists fields as strings: [\"amount\", \"currency\"]",
            )
        })?;
    if lits.is_empty() {
        return Err(bad(bracket.span.join()));
    }
    let mut fields = Vec::new();
    let mut failed: Option<syn::Error> = None;
    for lit in lits {
        match field_path(lit, "fingerprint") {
            Ok(f) => fields.push(f),
            Err(e) => match &mut failed {
                None => failed = Some(e),
                Some(all) => all.combine(e),
            },
        }
    }
    match failed {
        None => Ok(fields),
        Some(e) => Err(e),
    }
}
