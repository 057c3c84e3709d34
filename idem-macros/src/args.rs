//! The attribute's arguments, parsed into one typed struct. Parsing reads
//! `name = value` pairs as expressions first and then checks each value, so
//! every mistake of one attribute is reported together, each at its token.

use proc_macro2::{Span, TokenStream};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Lit, LitStr, Token};

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
    pub(crate) fn into_compile_errors(self) -> TokenStream {
        self.0.map(|e| e.to_compile_error()).unwrap_or_default()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

/// `store = …`
pub(crate) enum Store {
    Sqlite,
    Postgres,
    Redis,
    Memory,
    Custom(syn::Path),
}

impl Store {
    pub(crate) fn name(&self) -> String {
        match self {
            Store::Sqlite => "sqlite".into(),
            Store::Postgres => "postgres".into(),
            Store::Redis => "redis".into(),
            Store::Memory => "memory".into(),
            Store::Custom(p) => quote::ToTokens::to_token_stream(p)
                .to_string()
                .replace(' ', ""),
        }
    }
    /// `Some(true)` / `Some(false)` when known at compile time.
    pub(crate) fn transactional(&self) -> Option<bool> {
        match self {
            Store::Sqlite | Store::Postgres => Some(true),
            Store::Redis | Store::Memory => Some(false),
            Store::Custom(_) => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckMode {
    Before,
    Auto,
    Manual,
    ManualImmediate,
    Batch,
}

impl AckMode {
    pub(crate) fn is_manual(self) -> bool {
        matches!(self, AckMode::Manual | AckMode::ManualImmediate)
    }
    pub(crate) fn ident(self) -> &'static str {
        match self {
            AckMode::Before => "Before",
            AckMode::Auto => "Auto",
            AckMode::Manual => "Manual",
            AckMode::ManualImmediate => "ManualImmediate",
            AckMode::Batch => "Batch",
        }
    }
    /// The attribute spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AckMode::Before => "before",
            AckMode::Auto => "auto",
            AckMode::Manual => "manual",
            AckMode::ManualImmediate => "manual_immediate",
            AckMode::Batch => "batch",
        }
    }
}

/// One way of getting a key.
pub(crate) enum KeySpec {
    /// `"order_id"`, `"customer.id"`: the field path, split, with the literal's span.
    Field {
        path: Vec<syn::Member>,
        text: String,
        span: Span,
    },
    /// `header("Idempotency-Key")`
    Header(LitStr),
    /// `message_id`
    MessageId,
    /// `("tenant_id", "order_id")`
    Composite(Vec<KeySpec>),
}

impl KeySpec {
    pub(crate) fn describe(&self) -> String {
        match self {
            KeySpec::Field { text, .. } => text.clone(),
            KeySpec::Header(h) => format!("header({:?})", h.value()),
            KeySpec::MessageId => "message_id".into(),
            KeySpec::Composite(parts) => {
                format!(
                    "({})",
                    parts
                        .iter()
                        .map(KeySpec::describe)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        }
    }
    pub(crate) fn has_field(&self) -> bool {
        match self {
            KeySpec::Field { .. } => true,
            KeySpec::Composite(p) => p.iter().any(KeySpec::has_field),
            _ => false,
        }
    }
}

/// A duration argument: milliseconds, with its token's span.
#[derive(Clone, Copy)]
pub(crate) struct Millis(pub(crate) u64);

/// Everything the attribute said. `None` = not given.
#[derive(Default)]
pub(crate) struct Args {
    pub(crate) topic: Option<LitStr>,
    pub(crate) key: Option<(KeySpec, Span)>,
    pub(crate) with: Option<syn::Path>,
    pub(crate) store: Option<(Store, Span)>,
    pub(crate) ack: Option<(AckMode, Span)>,
    pub(crate) ttl: Option<Millis>,
    pub(crate) lease: Option<Millis>,
    pub(crate) retries: Option<u32>,
    pub(crate) backoff: Option<(Millis, Millis)>,
    pub(crate) dead_letter: Option<LitStr>,
    pub(crate) ordered: Option<bool>,
    pub(crate) name: Option<LitStr>,
    pub(crate) fingerprint: Option<Vec<(Vec<syn::Member>, Span)>>,
    pub(crate) on_missing_key: Option<(bool, Span)>,
    pub(crate) on_in_progress: Option<bool>,
    pub(crate) max_key_len: Option<u64>,
    pub(crate) krate: Option<syn::Path>,
}

const ARGUMENTS: &str = "topic, key, with, store, ack, ttl, lease, retries, backoff, dead_letter, ordered, name, fingerprint, on_missing_key, on_in_progress, max_key_len, crate";

/// `name = value`, with `crate` accepted as a name.
struct RawArg {
    name: syn::Ident,
    value: Expr,
}

impl Parse for RawArg {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let name = if input.peek(Token![crate]) {
            let kw: Token![crate] = input.parse()?;
            syn::Ident::new("crate", kw.span)
        } else {
            input.call(syn::ext::IdentExt::parse_any)?
        };
        input.parse::<Token![=]>().map_err(|e| {
            syn::Error::new(
                e.span(),
                format!("expected `=` after `{name}`: arguments are written `{name} = value`"),
            )
        })?;
        let value: Expr = input.parse()?;
        Ok(RawArg { name, value })
    }
}

/// The expression inside the invisible group that `macro_rules!` puts
/// around a `$x:literal` or `$x:expr` it passes on to an attribute.
fn ungroup(v: &Expr) -> &Expr {
    match v {
        Expr::Group(g) => ungroup(&g.expr),
        other => other,
    }
}

fn lit_str(v: &Expr, errors: &mut Errors, what: &str) -> Option<LitStr> {
    match ungroup(v) {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Some(s.clone()),
        other => {
            errors.at(
                other.span(),
                format!("`{what}` takes a string literal, e.g. {what} = \"…\""),
            );
            None
        }
    }
}

/// One of the string `options`. `or` ends the error's list of valid values.
fn one_of<T: Copy>(
    v: &Expr,
    errors: &mut Errors,
    what: &str,
    options: &[(&str, T)],
    or: &str,
) -> Option<T> {
    let s = lit_str(v, errors, what)?;
    let value = s.value();
    match options.iter().find(|(n, _)| *n == value) {
        Some((_, t)) => Some(*t),
        None => {
            let valid = options
                .iter()
                .map(|(n, _)| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            let hint = closest(&value, &names)
                .map(|k| format!("did you mean \"{k}\"? "))
                .unwrap_or_default();
            errors.at(
                s.span(),
                format!("unknown {what} {value:?}; {hint}expected one of: {valid}{or}"),
            );
            None
        }
    }
}

/// Parses a duration such as "500ms", "30s", "7d"; the error says what is wrong.
fn parse_duration(text: &str) -> Result<Millis, String> {
    use humantime::DurationError as E;
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.as_millis() > 0 => Ok(Millis(d.as_millis().min(u128::from(u64::MAX)) as u64)),
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

fn duration(s: &LitStr, errors: &mut Errors, what: &str) -> Option<Millis> {
    // "forever", "never", "none": a ttl that means no expiry.
    let forever = if what == "ttl" && !s.value().chars().any(|c| c.is_ascii_digit()) {
        " (leave `ttl` out to keep records forever)"
    } else {
        ""
    };
    parse_duration(&s.value())
        .map_err(|e| {
            errors.at(
                s.span(),
                format!("invalid `{what}`: {e}, e.g. {what} = \"30s\" or \"7d\"{forever}"),
            )
        })
        .ok()
}

/// The closest name to `unknown` among `known`, if it is close enough to be
/// a typo: an edit distance of at most a third of its length (at least 1),
/// or half of it when they share a 4-letter prefix (`retry` → `retries`).
fn closest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
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

fn field_path(s: &LitStr, errors: &mut Errors, what: &str) -> Option<Vec<syn::Member>> {
    let text = s.value();
    let mut out = Vec::new();
    for seg in text.split('.') {
        let member = if let Ok(i) = seg.parse::<u32>() {
            syn::Member::Unnamed(syn::Index {
                index: i,
                span: s.span(),
            })
        } else if !seg.is_empty()
            && seg
                .chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
            && seg.chars().all(|c| c.is_alphanumeric() || c == '_')
        {
            syn::Member::Named(syn::Ident::new(seg, s.span()))
        } else {
            errors.at(
                s.span(),
                format!("`{text}` is not a field path; {what} names a payload field like \"order_id\" or \"customer.id\""),
            );
            return None;
        };
        out.push(member);
    }
    Some(out)
}

fn key_spec(v: &Expr, errors: &mut Errors, nested: bool) -> Option<KeySpec> {
    const FORMS: &str = "\"field\", \"nested.field\", (\"a\", \"b\"), header(\"Name\"), message_id";
    match ungroup(v) {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => {
            let path = field_path(s, errors, "key")?;
            Some(KeySpec::Field {
                path,
                text: s.value(),
                span: s.span(),
            })
        }
        Expr::Path(p) if p.path.is_ident("message_id") => Some(KeySpec::MessageId),
        Expr::Call(c) if matches!(&*c.func, Expr::Path(p) if p.path.is_ident("header")) => {
            match (c.args.len(), c.args.first()) {
                (
                    1,
                    Some(Expr::Lit(ExprLit {
                        lit: Lit::Str(s), ..
                    })),
                ) if !s.value().is_empty() => Some(KeySpec::Header(s.clone())),
                _ => {
                    errors.at(
                        c.span(),
                        "`header(…)` takes one non-empty string: header(\"Idempotency-Key\")",
                    );
                    None
                }
            }
        }
        Expr::Tuple(t) if !nested => {
            if t.elems.len() < 2 || t.elems.len() > 6 {
                errors.at(t.span(), "a composite key has 2 to 6 parts");
                return None;
            }
            let parts: Vec<_> = t.elems.iter().map(|e| key_spec(e, errors, true)).collect();
            parts
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .map(KeySpec::Composite)
        }
        Expr::Paren(p) => key_spec(&p.expr, errors, nested),
        other => {
            errors.at(
                other.span(),
                format!(
                    "unsupported key; expected one of: {FORMS}, or use `with = path::to::extractor`"
                ),
            );
            None
        }
    }
}

impl Args {
    /// Parses and checks the attribute's tokens. Syntax errors stop parsing;
    /// value errors are collected into `errors`.
    pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> Args {
        let mut args = Args::default();
        let parser = Punctuated::<RawArg, Token![,]>::parse_terminated;
        let raw = match syn::parse::Parser::parse2(parser, tokens) {
            Ok(raw) => raw,
            Err(e) => {
                errors.push(e);
                return args;
            }
        };
        let mut seen: Vec<String> = Vec::new();
        for RawArg { name, value } in raw {
            let n = name.to_string();
            if seen.contains(&n) {
                errors.at(name.span(), format!("`{n}` is given twice; keep one"));
                continue;
            }
            seen.push(n.clone());
            let v = ungroup(&value);
            match n.as_str() {
                "topic" => {
                    args.topic = lit_str(v, errors, "topic").filter(|s| {
                        let ok = !s.value().trim().is_empty();
                        if !ok {
                            errors.at(s.span(), "`topic` must not be empty");
                        }
                        ok
                    })
                }
                "key" => args.key = key_spec(v, errors, false).map(|k| (k, v.span())),
                "with" => match v {
                    Expr::Path(p) => args.with = Some(p.path.clone()),
                    other => errors.at(other.span(), "`with` takes a path to a key extractor: with = my_extractor"),
                },
                "store" => {
                    let store = match v {
                        Expr::Path(p) => Some(Store::Custom(p.path.clone())),
                        _ => one_of(
                            v,
                            errors,
                            "store",
                            &[("sqlite", 0), ("postgres", 1), ("redis", 2), ("memory", 3)],
                            ", or the path of a custom store type (store = MyStore)",
                        )
                        .map(|i| [Store::Sqlite, Store::Postgres, Store::Redis, Store::Memory].into_iter().nth(i).unwrap_or(Store::Memory)),
                    };
                    args.store = store.map(|s| (s, v.span()));
                }
                "ack" => {
                    args.ack = one_of(
                        v,
                        errors,
                        "ack mode",
                        &[
                            ("before", AckMode::Before),
                            ("auto", AckMode::Auto),
                            ("manual", AckMode::Manual),
                            ("manual_immediate", AckMode::ManualImmediate),
                            ("batch", AckMode::Batch),
                        ],
                        "",
                    )
                    .map(|a| (a, v.span()))
                }
                "ttl" => args.ttl = lit_str(v, errors, "ttl").and_then(|s| duration(&s, errors, "ttl")),
                "lease" => args.lease = lit_str(v, errors, "lease").and_then(|s| duration(&s, errors, "lease")),
                "backoff" => {
                    if let Some(s) = lit_str(v, errors, "backoff") {
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
                        match range {
                            Ok(r) => args.backoff = Some(r),
                            Err(e) => errors.at(
                                s.span(),
                                format!(
                                    "invalid `backoff`: {e}; write the first and the largest retry delay, e.g. backoff = \"100ms..30s\""
                                ),
                            ),
                        }
                    }
                }
                "retries" | "max_key_len" => match v {
                    Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => match i.base10_parse::<u32>() {
                        Ok(x) if n == "retries" => args.retries = Some(x),
                        Ok(x) if x > 0 => args.max_key_len = Some(u64::from(x)),
                        _ => errors.at(i.span(), format!("`{n}` takes a positive integer")),
                    },
                    other => errors.at(other.span(), format!("`{n}` takes an integer, e.g. {n} = 5")),
                },
                "dead_letter" => args.dead_letter = lit_str(v, errors, "dead_letter"),
                "ordered" => match v {
                    Expr::Lit(ExprLit { lit: Lit::Bool(b), .. }) => args.ordered = Some(b.value),
                    other => errors.at(other.span(), "`ordered` takes `true` or `false`"),
                },
                "name" => {
                    args.name = lit_str(v, errors, "name").filter(|s| {
                        let ok = !s.value().trim().is_empty();
                        if !ok {
                            errors.at(s.span(), "`name` must not be empty");
                        }
                        ok
                    })
                }
                "fingerprint" => match v {
                    Expr::Array(a) if !a.elems.is_empty() => {
                        let mut fields = Vec::new();
                        for e in &a.elems {
                            if let Some(s) = lit_str(e, errors, "fingerprint")
                                && let Some(p) = field_path(&s, errors, "fingerprint")
                            {
                                fields.push((p, s.span()));
                            }
                        }
                        args.fingerprint = Some(fields);
                    }
                    other => errors.at(other.span(), "`fingerprint` takes a non-empty list of fields: [\"amount\", \"currency\"]"),
                },
                "on_missing_key" => {
                    args.on_missing_key = one_of(v, errors, "on_missing_key", &[("dead_letter", true), ("reject", false)], "")
                        .map(|b| (b, v.span()))
                }
                "on_in_progress" => {
                    args.on_in_progress = one_of(v, errors, "on_in_progress", &[("retry", false), ("wait", true)], "")
                }
                "crate" => {
                    if let Some(s) = lit_str(v, errors, "crate") {
                        match s.parse::<syn::Path>() {
                            Ok(p) => args.krate = Some(p),
                            Err(_) => errors.at(s.span(), "`crate` takes a path, e.g. crate = \"my_idem\""),
                        }
                    }
                }
                _ => {
                    let hint = closest(&n, &ARGUMENTS.split(", ").collect::<Vec<_>>())
                        .map(|k| format!("did you mean `{k}`? "))
                        .unwrap_or_default();
                    errors.at(
                        name.span(),
                        format!("unknown argument `{n}`; {hint}the arguments are: {ARGUMENTS}"),
                    )
                }
            }
        }
        args
    }
}
