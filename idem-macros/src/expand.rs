//! The generated code: the user's fn unchanged, a unit type implementing
//! `HandlerFn` (key extraction, fingerprint, the call), its constant
//! `HandlerMeta`, and an `inventory::submit!` of its descriptor. All the
//! behaviour lives in the runtime; this is an adapter.

use proc_macro2::{Delimiter, Group, Span, TokenStream, TokenTree};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ItemFn;

use crate::args::{AckMode, Args, Errors, KeySpec, Store};
use crate::signature::{Param, Signature};

pub(crate) fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let f: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            errors.at(Span::call_site(), "#[idempotent] goes on an `async fn`");
            let e = errors.into_compile_errors();
            return quote! { #item #e };
        }
    };
    let args = Args::parse(attr.clone(), &mut errors);
    let sig = Signature::read(&f, &mut errors);
    check(&args, &sig, &attr, &mut errors);
    if !errors.is_empty() {
        // The user's fn is still emitted, so its callers and tests do not
        // pile "cannot find function" errors on top of the real one.
        let e = errors.into_compile_errors();
        return quote! { #f #e };
    }
    let mut f = f;
    if let Some((store, _)) = &args.store {
        complete_tx_type(&mut f, store, &private_path(&args));
    }
    let generated = generate(&args, &sig, &f);
    quote! { #f #generated }
}

/// `::idem` or the `crate = …` path.
fn krate(args: &Args) -> TokenStream {
    args.krate
        .as_ref()
        .map(|p| quote! { #p })
        .unwrap_or_else(|| quote! { ::idem })
}

fn private_path(args: &Args) -> TokenStream {
    let krate = krate(args);
    quote! { #krate::__private }
}

/// `tx: &mut idem::Tx<'_>` names no database; with a built-in SQL store the
/// macro completes it (`Tx<'_, Postgres>` for `store = "postgres"`), so the
/// handler reads the same whichever SQL store it uses. A `Tx` that already
/// names its database is left alone (a mismatch is then a type error).
fn complete_tx_type(f: &mut ItemFn, store: &Store, private: &TokenStream) {
    let db = match store {
        Store::Sqlite => quote! { Sqlite },
        Store::Postgres => quote! { Postgres },
        _ => return,
    };
    for input in &mut f.sig.inputs {
        let syn::FnArg::Typed(pat) = input else {
            continue;
        };
        let syn::Type::Reference(r) = &mut *pat.ty else {
            continue;
        };
        if r.mutability.is_none() {
            continue;
        }
        let syn::Type::Path(path) = &mut *r.elem else {
            continue;
        };
        let Some(last) = path.path.segments.last_mut() else {
            continue;
        };
        if last.ident != "Tx" {
            continue;
        }
        if let syn::PathArguments::AngleBracketed(args) = &mut last.arguments
            && args.args.len() == 1
            && matches!(args.args[0], syn::GenericArgument::Lifetime(_))
        {
            let span = last.ident.span();
            let ty = respan(quote! { #private::db::#db }, span);
            args.args.push(syn::parse_quote!(#ty));
        }
    }
}

/// Checks that need both the arguments and the signature. `attr` is the
/// argument list, underlined by errors about an argument that is missing.
fn check(args: &Args, sig: &Signature, attr: &TokenStream, errors: &mut Errors) {
    let mut missing = |msg: &str| {
        if attr.is_empty() {
            errors.at(Span::call_site(), msg);
        } else {
            errors.spanned(attr, msg);
        }
    };
    if args.topic.is_none() {
        missing(
            "missing `topic = \"…\"`: the topic, stream, queue or subject this handler consumes",
        );
    }
    if let (Some(_), Some(with)) = (&args.key, &args.with) {
        errors.spanned(with, "give either `key = …` or `with = …`, not both");
    }
    if let Some((store, span)) = &args.store
        && args.key.is_none()
        && args.with.is_none()
    {
        errors.at(
            *span,
            format!(
                "store `{}` deduplicates by key, but there is no `key = …`: what identifies a message? \
                 e.g. key = \"order_id\", key = (\"tenant\", \"id\"), key = header(\"Idempotency-Key\"), \
                 key = message_id, or with = my_extractor",
                store.name()
            ),
        );
    }
    let ack = args.ack.as_ref().map(|(a, _)| *a).unwrap_or(AckMode::Auto);
    match (ack.is_manual(), &sig.ack) {
        (true, None) => {
            let span = args.ack.as_ref().map(|(_, s)| *s).unwrap_or_else(Span::call_site);
            errors.at(
                span,
                format!(
                    "ack = \"{}\" needs an `ack: idem::Ack` parameter: the handler calls `ack.ack()` when the message is done",
                    ack.as_str()
                ),
            );
        }
        (false, Some(loc)) => errors.spanned(
            &loc.tokens,
            format!(
                "an `Ack` parameter needs `ack = \"manual\"` or `ack = \"manual_immediate\"`; with {}ack = \"{}\" idem acks by itself",
                if args.ack.is_none() { "the default " } else { "" },
                ack.as_str()
            ),
        ),
        _ => {}
    }
    if let Some(tx) = &sig.tx {
        match args.store.as_ref().map(|(s, _)| s) {
            None => errors.spanned(
                &tx.tokens,
                "this handler takes a transaction but has no `store`: add store = \"sqlite\" (or \"postgres\"), whose dedup record commits in the handler's transaction",
            ),
            Some(s) if s.transactional() == Some(false) => errors.spanned(
                &tx.tokens,
                format!(
                    "store `{}` has no transaction to give the handler: remove the `tx` parameter, or use store = \"sqlite\" / \"postgres\"",
                    s.name()
                ),
            ),
            _ => {}
        }
    }
    if let Some((_, span)) = args.on_missing_key
        && !args.key.as_ref().is_some_and(|(k, _)| k.has_field())
    {
        let key = match (&args.key, &args.with) {
            (Some((k, _)), _) => format!("key = {}", k.describe()),
            (None, Some(_)) => "a `with` extractor".into(),
            (None, None) => "key = message_id (the default)".into(),
        };
        errors.at(
            span,
            format!(
                "`on_missing_key` applies to payload-field keys only (`key = \"field\"`), not to {key}; remove it"
            ),
        );
    }
}

/// `tokens` with every span set to `span`, so that an error in code built
/// from them points at the user's token instead of the whole attribute.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut t| {
            if let TokenTree::Group(g) = &t {
                let mut g2 = Group::new(g.delimiter(), respan(g.stream(), span));
                g2.set_span(span);
                t = TokenTree::Group(g2);
            }
            t.set_span(span);
            t
        })
        .collect()
}

/// The spans of the first and the last token of `tokens`.
fn first_last(tokens: impl ToTokens) -> (Span, Span) {
    let mut it = tokens.into_token_stream().into_iter();
    let first = it.next().map(|t| t.span()).unwrap_or_else(Span::call_site);
    let last = it.last().map(|t| t.span()).unwrap_or(first);
    (first, last)
}

/// `(__p.a.b)`: the payload field named by a string literal. The field names
/// keep the literal's location (so "no field `x` on type …" points at it)
/// but take the macro's hygiene context: otherwise rustc offers a fix-it
/// that replaces the whole literal with a bare name (`key = order_id`). The
/// parentheses carry the literal's span alone, so that errors about the
/// field's value (not a key part, not serializable) point at the literal.
fn field_access(path: &[syn::Member], span: Span) -> TokenStream {
    let at = Span::call_site().located_at(span);
    let members = path.iter().map(|m| match m {
        syn::Member::Named(id) => syn::Member::Named(syn::Ident::new(&id.to_string(), at)),
        syn::Member::Unnamed(i) => syn::Member::Unnamed(syn::Index {
            index: i.index,
            span: at,
        }),
    });
    let mut group = Group::new(
        Delimiter::Parenthesis,
        quote_spanned! {span=> (*__p) #(.#members)* },
    );
    group.set_span(span);
    TokenTree::Group(group).into()
}

/// A field path as written: `customer.id`.
fn members_text(path: &[syn::Member]) -> String {
    path.iter()
        .map(|m| match m {
            syn::Member::Named(id) => id.to_string(),
            syn::Member::Unnamed(i) => i.index.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn extractor(
    spec: &KeySpec,
    payload: &syn::Type,
    private: &TokenStream,
    optional: bool,
) -> TokenStream {
    match spec {
        KeySpec::Field { path, text, span } => {
            let access = field_access(path, *span);
            // Every token of the call at the key's literal: a field that is
            // not a key part is then reported there and nowhere else.
            let private = &respan(private.clone(), *span);
            let write = if optional {
                quote_spanned! {*span=> #private::OptionalKeyPart::write_optional_key(&#access, __out) }
            } else {
                quote_spanned! {*span=> { #private::KeyPart::write_key(&#access, __out); ::core::result::Result::Ok(()) } }
            };
            quote! {
                #private::Field {
                    name: #text,
                    read: |__p: &#payload, __out: &mut ::std::string::String| -> ::core::result::Result<(), #private::Absent> { #write },
                }
            }
        }
        KeySpec::Header(h) => quote! { #private::Header(#h) },
        KeySpec::MessageId => quote! { #private::MessageId },
        KeySpec::Composite(parts) => {
            let parts = parts
                .iter()
                .map(|p| extractor(p, payload, private, optional));
            quote! { ( #(#parts,)* ) }
        }
    }
}

fn generate(args: &Args, sig: &Signature, f: &ItemFn) -> TokenStream {
    let krate = krate(args);
    let private = quote! { #krate::__private };
    let fn_name = &f.sig.ident;
    let fn_text = fn_name.to_string();
    let ty = format_ident!("__IdemHandler_{}", fn_name);
    let payload = sig.payload.as_ref().expect("checked: payload exists");
    let payload_span = syn::spanned::Spanned::span(payload);
    let output = sig.output.as_ref().expect("checked: return type exists");

    // A built-in store's type carries the span of its name, so that
    // "not a dedup store" (a cargo feature that is off) points there.
    let (store_ty, store_span) = match &args.store {
        None => (quote! { #krate::NoStore }, Span::call_site()),
        Some((Store::Sqlite, s)) => (respan(quote! { #private::stores::Sqlite }, *s), *s),
        Some((Store::Postgres, s)) => (respan(quote! { #private::stores::Postgres }, *s), *s),
        Some((Store::Redis, s)) => (respan(quote! { #private::stores::Redis }, *s), *s),
        Some((Store::Memory, s)) => (respan(quote! { #private::stores::Memory }, *s), *s),
        Some((Store::Custom(p), s)) => (quote! { #p }, *s),
    };
    let store_text = args
        .store
        .as_ref()
        .map(|(s, _)| s.name())
        .unwrap_or_else(|| "none".into());

    let topic = args.topic.as_ref().expect("checked: topic exists");
    let (name, name_is_default) = match &args.name {
        Some(n) => (n.value(), false),
        None => (fn_text.clone(), true),
    };
    let ack = args.ack.as_ref().map(|(a, _)| *a).unwrap_or(AckMode::Auto);
    let ack_ident = format_ident!("{}", ack.ident());
    let ms = |m: u64| quote! { #private::Duration::from_millis(#m) };
    let ttl = match args.ttl {
        Some(t) => {
            let d = ms(t.0);
            quote! { ::core::option::Option::Some(#d) }
        }
        None => quote! { ::core::option::Option::None },
    };
    let lease = ms(args.lease.map(|l| l.0).unwrap_or(30_000));
    let retries = args.retries.unwrap_or(3);
    let (bmin, bmax) = args
        .backoff
        .map(|(a, b)| (a.0, b.0))
        .unwrap_or((100, 30_000));
    let (bmin, bmax) = (ms(bmin), ms(bmax));
    let dead_letter = match &args.dead_letter {
        Some(d) => quote! { ::core::option::Option::Some(#d) },
        None => quote! { ::core::option::Option::None },
    };
    let ordered = args.ordered.unwrap_or(false);
    let optional_key = args.on_missing_key.is_some();
    let on_missing_key = match args.on_missing_key {
        Some((false, _)) => quote! { #krate::OnMissingKey::Reject },
        _ => quote! { #krate::OnMissingKey::DeadLetter },
    };
    let on_in_progress = match args.on_in_progress {
        Some(true) => quote! { #krate::OnInProgress::Wait },
        _ => quote! { #krate::OnInProgress::Retry },
    };
    let max_key_len = args.max_key_len.map(|m| m as usize).unwrap_or(512);
    let key_text = match (&args.key, &args.with) {
        (Some((k, _)), _) => k.describe(),
        (None, Some(p)) => format!("with {}", quote!(#p).to_string().replace(' ', "")),
        (None, None) => "message_id".into(),
    };

    let key_body = match (&args.key, &args.with) {
        (Some((spec, _)), _) => {
            let e = extractor(spec, payload, &private, optional_key);
            quote! { #krate::KeyExtractor::<#payload>::extract(&#e, __d, __p) }
        }
        (None, Some(path)) => {
            let span = syn::spanned::Spanned::span(path);
            quote_spanned! {span=> #krate::KeyExtractor::<#payload>::extract(&#path, __d, __p) }
        }
        (None, None) => {
            quote! { #krate::KeyExtractor::<#payload>::extract(&#private::MessageId, __d, __p) }
        }
    };

    // Conflict detection is opt-in: the fields named in `fingerprint`, else
    // whatever a `with` extractor supplies, else none.
    let (fingerprint, fingerprint_text) = match (&args.fingerprint, &args.with) {
        (Some(fields), _) => {
            let adds = fields.iter().map(|(path, span)| {
                let access = field_access(path, *span);
                quote_spanned! {*span=> __f.field(&#access); }
            });
            let text = format!(
                "[{}]",
                fields
                    .iter()
                    .map(|(path, _)| format!("{:?}", members_text(path)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let body = quote! {
                fn fingerprint(&self, _d: &#krate::Delivery, __p: &#payload) -> ::core::option::Option<#krate::Fingerprint> {
                    let mut __f = #krate::Fingerprinter::new();
                    #(#adds)*
                    ::core::option::Option::Some(__f.finish())
                }
            };
            (Some(body), quote! { ::core::option::Option::Some(#text) })
        }
        (None, Some(path)) => {
            let span = syn::spanned::Spanned::span(path);
            let text = format!(
                "(supplied by the key extractor `{}`)",
                quote!(#path).to_string().replace(' ', "")
            );
            let body = quote_spanned! {span=>
                fn fingerprint(&self, __d: &#krate::Delivery, __p: &#payload) -> ::core::option::Option<#krate::Fingerprint> {
                    #krate::KeyExtractor::<#payload>::fingerprint(&#path, __d, __p)
                }
            };
            (Some(body), quote! { ::core::option::Option::Some(#text) })
        }
        (None, None) => (None, quote! { ::core::option::Option::None }),
    };

    let call_args = sig.params.iter().map(|(p, span)| match p {
        Param::Payload => quote_spanned! {*span=> __payload },
        Param::Tx => quote_spanned! {*span=> __tx },
        Param::Ack => quote_spanned! {*span=> __ack },
        Param::Delivery => quote_spanned! {*span=> __delivery },
    });
    // The store's mode: a handler with a `tx` parameter needs a TxStore; one
    // without works with any store, generically over the mode.
    let (mode, generics) = if sig.tx.is_some() {
        (quote! { #private::Transactional }, quote! {})
    } else {
        (quote! { __M }, quote! { <__M: 'static> })
    };
    let call_span = fn_name.span();
    let call = quote_spanned! {call_span=>
        #[allow(unused_variables)]
        fn call<'__a, '__c: '__a>(
            &'__a self,
            __payload: #payload,
            __tx: &'__a mut <#store_ty as #krate::DedupStore<#mode>>::Tx<'__c>,
            __delivery: &'__a #krate::Delivery,
            __ack: #krate::Ack,
        ) -> impl ::core::future::Future<Output = #output> + ::core::marker::Send + '__a {
            #fn_name(#(#call_args),*)
        }
    };

    // The payload and store requirements. A wrong type must give one error,
    // at its token, not one per place the handler type uses it. So the
    // impl states them as where clauses (inside `for<'__idem>`, which keeps
    // rustc from rejecting a false bound on a concrete type right there)
    // and nothing inside the impl is checked against them. They are proven
    // once each, in a chain of calls: the payload at the payload's span,
    // then the store (the payload known good) at the store's span. Each
    // link repeats its bound as `assert_*::<T>()` at the same span first:
    // rustc reports the bound once, from the runtime's documented assert.
    let payload_bound = quote_spanned! {payload_span=> for<'__idem> #payload: #krate::Payload };
    let store_bound =
        quote_spanned! {store_span=> for<'__idem> #store_ty: #krate::DedupStore<#mode> };
    let at = |(first, last): (Span, Span), fn_name: &str| {
        let ty = respan(ty.to_token_stream(), first);
        let f = format_ident!("{}", fn_name, span = last);
        quote_spanned! {last=> #ty::#f() }
    };
    let payload_at = first_last(payload);
    let check_payload = at(payload_at, "__idem_payload_checked");
    let assert_payload = respan(quote! { #private::assert_payload }, payload_at.0);
    let store_at = first_last(&store_ty);
    let check_store = at(store_at, "__idem_store_checked");
    let assert_store = respan(quote! { #private::assert_store }, store_at.0);
    // A `tx` parameter needs a transactional store. The store type is
    // spelled `<S as __IdemSame>::This` (= S) so that the turbofish, which
    // rustc points at, can carry the span of the whole parameter.
    let tx_check = sig.tx.as_ref().map(|tx| {
        let (first, last) = first_last(&tx.tokens);
        let lt = quote_spanned! {first=> < };
        let this = quote_spanned! {last=> >::This };
        let assert_tx = respan(quote! { #private::assert_transactional }, first);
        quote! {
            trait __IdemSame {
                type This: ?::core::marker::Sized;
            }
            impl<T: ?::core::marker::Sized> __IdemSame for T {
                type This = T;
            }
            const _: () = #assert_tx::<#lt #store_ty as __IdemSame #this>();
        }
    });

    quote! {
        #[doc(hidden)]
        const _: () = {
            #[allow(non_camel_case_types)]
            #[derive(Default)]
            struct #ty;

            impl #generics #krate::HandlerFn<#mode> for #ty
            where
                #payload_bound,
                #store_bound,
            {
                type Payload = #payload;
                type Store = #store_ty;
                type Codec = #krate::Json;
                type Result = #output;
                const META: #krate::HandlerMeta = #krate::HandlerMeta {
                    name: #name,
                    name_is_default: #name_is_default,
                    path: ::core::concat!(::core::module_path!(), "::", #fn_text),
                    topic: #topic,
                    key: #key_text,
                    store: #store_text,
                    ack: #krate::AckMode::#ack_ident,
                    ttl: #ttl,
                    lease: #lease,
                    retries: #retries,
                    backoff: #krate::Backoff { min: #bmin, max: #bmax },
                    dead_letter: #dead_letter,
                    ordered: #ordered,
                    on_missing_key: #on_missing_key,
                    on_in_progress: #on_in_progress,
                    max_key_len: #max_key_len,
                    fingerprint: #fingerprint_text,
                };

                fn key(&self, __d: &#krate::Delivery, __p: &#payload) -> ::core::result::Result<#krate::Key, #krate::KeyError> {
                    #key_body
                }

                #fingerprint

                #call
            }

            impl #ty {
                const fn __idem_payload_checked() -> #private::HandlerDescriptor
                where
                    #payload_bound,
                {
                    #assert_store::<#store_ty, _>();
                    #check_store
                }
                const fn __idem_store_checked #generics () -> #private::HandlerDescriptor
                where
                    #payload_bound,
                    #store_bound,
                {
                    #private::HandlerDescriptor::of::<#ty, #mode>()
                }
            }

            #tx_check

            #private::inventory::submit! {
                {
                    #assert_payload::<#payload>();
                    #check_payload
                }
            }
        };
    }
}
