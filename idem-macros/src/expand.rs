//! The generated code: the user's fn unchanged, a unit type implementing
//! `HandlerFn` (key extraction, fingerprint, the call), its constant
//! `HandlerMeta`, and an `inventory::submit!` of its descriptor. All the
//! behaviour lives in the runtime; this is an adapter.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
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
    let args = Args::parse(attr, &mut errors);
    let sig = Signature::read(&f, &mut errors);
    check(&args, &sig, &f, &mut errors);
    if !errors.is_empty() {
        let e = errors.into_compile_errors();
        return quote! { #f #e };
    }
    let generated = generate(&args, &sig, &f);
    quote! { #f #generated }
}

/// Checks that need both the arguments and the signature.
fn check(args: &Args, sig: &Signature, f: &ItemFn, errors: &mut Errors) {
    if args.topic.is_none() {
        errors.at(Span::call_site(), "missing `topic = \"…\"`: the topic, stream, queue or subject this handler consumes");
    }
    if args.key.is_some() && args.with.is_some() {
        errors.at(Span::call_site(), "give either `key = …` or `with = …`, not both");
    }
    if args.store.is_some() && args.key.is_none() && args.with.is_none() {
        errors.at(
            Span::call_site(),
            "missing `key = …`: what identifies a message? e.g. key = \"order_id\", key = (\"tenant\", \"id\"), key = header(\"Idempotency-Key\"), key = message_id, or with = my_extractor",
        );
    }
    let ack = args.ack.as_ref().map(|(a, _)| *a).unwrap_or(AckMode::Auto);
    match (ack.is_manual(), sig.ack) {
        (true, None) => {
            let span = args.ack.as_ref().map(|(_, s)| *s).unwrap_or_else(Span::call_site);
            errors.at(span, "a manual ack mode needs an `ack: idem::Ack` parameter, and the handler calls `ack.ack()`");
        }
        (false, Some(span)) => errors.at(
            span,
            "an `Ack` parameter needs `ack = \"manual\"` or `ack = \"manual_immediate\"`; in other modes idem acks by itself",
        ),
        _ => {}
    }
    if let Some(tx) = sig.tx {
        match args.store.as_ref().map(|(s, _)| s) {
            None => errors.at(
                tx,
                "this handler takes a transaction but has no `store`: use store = \"sqlite\" or store = \"postgres\", whose dedup record commits in the handler's transaction",
            ),
            Some(s) if s.transactional() == Some(false) => errors.at(
                tx,
                format!(
                    "store `{}` has no transaction to give the handler: remove the `tx` parameter, or use store = \"sqlite\" / \"postgres\"",
                    s.name()
                ),
            ),
            _ => {}
        }
    }
    if let Some((true, span)) | Some((false, span)) = args.on_missing_key.as_ref().map(|(b, s)| (*b, *s))
        && !args.key.as_ref().is_some_and(|(k, _)| k.has_field())
    {
        errors.at(span, "`on_missing_key` applies to payload-field keys only (`key = \"field\"`)");
    }
    let _ = f;
}

fn member_path(path: &[syn::Member]) -> TokenStream {
    quote! { #(.#path)* }
}

fn extractor(spec: &KeySpec, payload: &syn::Type, private: &TokenStream, optional: bool) -> TokenStream {
    match spec {
        KeySpec::Field { path, text, span } => {
            let access = member_path(path);
            let write = if optional {
                quote_spanned! {*span=> #private::OptionalKeyPart::write_optional_key(&__p #access, __out) }
            } else {
                quote_spanned! {*span=> { #private::KeyPart::write_key(&__p #access, __out); ::core::result::Result::Ok(()) } }
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
            let parts = parts.iter().map(|p| extractor(p, payload, private, optional));
            quote! { ( #(#parts,)* ) }
        }
    }
}

fn generate(args: &Args, sig: &Signature, f: &ItemFn) -> TokenStream {
    let krate = args.krate.as_ref().map(|p| quote! { #p }).unwrap_or_else(|| quote! { ::idem });
    let private = quote! { #krate::__private };
    let fn_name = &f.sig.ident;
    let fn_text = fn_name.to_string();
    let ty = format_ident!("__IdemHandler_{}", fn_name);
    let payload = sig.payload.as_ref().expect("checked: payload exists");
    let output = sig.output.as_ref().expect("checked: return type exists");

    let (store_ty, store_span) = match &args.store {
        None => (quote! { #krate::NoStore }, Span::call_site()),
        Some((Store::Sqlite, s)) => (quote! { #private::stores::Sqlite }, *s),
        Some((Store::Postgres, s)) => (quote! { #private::stores::Postgres }, *s),
        Some((Store::Redis, s)) => (quote! { #private::stores::Redis }, *s),
        Some((Store::Memory, s)) => (quote! { #private::stores::Memory }, *s),
        Some((Store::Custom(p), s)) => (quote! { #p }, *s),
    };
    let store_text = args.store.as_ref().map(|(s, _)| s.name()).unwrap_or_else(|| "none".into());

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
    let (bmin, bmax) = args.backoff.map(|(a, b)| (a.0, b.0)).unwrap_or((100, 30_000));
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
        (None, None) => quote! { #krate::KeyExtractor::<#payload>::extract(&#private::MessageId, __d, __p) },
    };

    let fingerprint = args.fingerprint.as_ref().map(|fields| {
        let adds = fields.iter().map(|(path, span)| {
            let access = member_path(path);
            quote_spanned! {*span=> __f.field(&__p #access); }
        });
        quote! {
            fn fingerprint(&self, _d: &#krate::Delivery, __p: &#payload) -> #krate::Fingerprint {
                let mut __f = #krate::Fingerprinter::new();
                #(#adds)*
                __f.finish()
            }
        }
    });

    let call_args = sig.params.iter().map(|(p, span)| match p {
        Param::Payload => quote_spanned! {*span=> __payload },
        Param::Tx => quote_spanned! {*span=> __tx },
        Param::Ack => quote_spanned! {*span=> __ack },
        Param::Delivery => quote_spanned! {*span=> __delivery },
    });
    let payload_span = syn::spanned::Spanned::span(payload);
    let assert_payload = quote_spanned! {payload_span=> #private::assert_payload::<#payload>(); };
    let assert_store = quote_spanned! {store_span=> #private::assert_store::<#store_ty>(); };
    let assert_tx = sig.tx.map(|span| quote_spanned! {span=> #private::assert_transactional::<#store_ty>(); });
    let call_span = fn_name.span();
    let call = quote_spanned! {call_span=>
        #[allow(unused_variables)]
        fn call<'__a, '__c: '__a>(
            &'__a self,
            __payload: #payload,
            __tx: &'__a mut <#store_ty as #krate::DedupStore>::Tx<'__c>,
            __delivery: &'__a #krate::Delivery,
            __ack: #krate::Ack,
        ) -> impl ::core::future::Future<Output = #output> + ::core::marker::Send + '__a {
            #fn_name(#(#call_args),*)
        }
    };

    quote! {
        #[doc(hidden)]
        const _: () = {
            const _: () = { #assert_payload #assert_store #assert_tx };

            #[allow(non_camel_case_types)]
            #[derive(Default)]
            struct #ty;

            impl #krate::HandlerFn for #ty {
                type Payload = #payload;
                type Store = #store_ty;
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
                };

                fn key(&self, __d: &#krate::Delivery, __p: &#payload) -> ::core::result::Result<#krate::Key, #krate::KeyError> {
                    #key_body
                }

                #fingerprint

                #call
            }

            #private::inventory::submit! { #private::HandlerDescriptor::of::<#ty>() }
        };
    }
}
