//! The generated code: the user's fn (its `tx` parameter's type completed),
//! a unit type implementing `HandlerFn` (key extraction, fingerprint, the
//! call), its constant `HandlerMeta`, and an `inventory::submit!` of its
//! descriptor. All the behaviour lives in the runtime; this is an adapter.
//! Nothing here knows a default or which store has a transaction: the
//! metadata names only what the attribute set (`..HandlerMeta::DEFAULTS`
//! does the rest), and the `tx` type is the store's own.

use proc_macro2::{Delimiter, Group, Span, TokenStream, TokenTree};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ItemFn;

use crate::fallback;
use crate::parse::{Args, BuiltinCodec, Codec, FieldPath, FieldSegment, KeySpec, Store};
use crate::signature::{BatchShape, Param, Signature};
use crate::validate::{Errors, store_text, validate};

pub(crate) fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let mut f: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            errors.at(Span::call_site(), "#[idempotent] goes on an `async fn`");
            let e = errors.into_compile_errors();
            return quote! { #item #e };
        }
    };
    let args = Args::parse(attr.clone(), &mut errors);
    let sig = Signature::read(&f, &mut errors);
    validate(&args, &sig, &attr, &mut errors);
    let krate = krate(&args);
    let store = args
        .store
        .as_ref()
        .map(|s| store_type(&s.value, s.span, &krate));
    let tx = match &store {
        Some(store) => complete_tx_type(&mut f, store, &krate),
        None => None,
    };
    if !errors.is_empty() {
        let written = tx.as_ref().map(|t| &t.written);
        return fallback::expand(&f, &args, &sig, &krate, written, errors);
    }
    if tx.is_some()
        && let Some(store) = &store
    {
        // The signature names `<S as TxStore>::Tx`: it is well-formed under
        // this bound (true or false, `for<'__idem>` keeps rustc from judging
        // it here). Whether it holds is checked once, by the generated code,
        // at this parameter.
        f.sig
            .generics
            .make_where_clause()
            .predicates
            .push(syn::parse_quote!(for<'__idem> #store: #krate::store::TxStore));
    }
    let generated = generate(&args, &sig, &f, &krate, tx.as_ref());
    quote! { #f #generated }
}

/// `::idem` or the `crate = …` path.
pub(crate) fn krate(args: &Args) -> TokenStream {
    args.krate
        .as_ref()
        .map(|p| quote! { #p })
        .unwrap_or_else(|| quote! { ::idem })
}

/// The store's type. A built-in store's type carries the span of its name,
/// so that "not a dedup store" (a cargo feature that is off) points there.
pub(crate) fn store_type(store: &Store, span: Span, krate: &TokenStream) -> TokenStream {
    match store {
        Store::Builtin(b) => {
            let ident = format_ident!("{}", b.ident(), span = span);
            respan(quote! { #krate::__private::stores::#ident }, span)
        }
        Store::Custom(p) => quote! { #p },
    }
}

/// The codec's type: `idem::codec::Json` unless `codec = …` says otherwise.
pub(crate) fn codec_type(args: &Args, krate: &TokenStream) -> TokenStream {
    match args.codec.as_ref() {
        None => quote! { #krate::__private::codecs::Json },
        Some(c) => match &c.value {
            Codec::Builtin(b) => {
                let ident = format_ident!("{}", b.ident(), span = c.span);
                respan(quote! { #krate::__private::codecs::#ident }, c.span)
            }
            Codec::Custom(p) => quote! { #p },
        },
    }
}

/// `tx: &mut idem::Tx<'x>` names no store: it is rewritten to the store's
/// own transaction type, `&mut <S as TxStore>::Tx<'x>`, for every store
/// (built-in or not). A store without a transaction fails right there, with
/// the runtime's advice. Any other `&mut T` is left as written (a mismatch
/// is then a type error). Returns the path as written, which the generated
/// code still mentions so that an import of it stays used.
fn complete_tx_type(f: &mut ItemFn, store: &TokenStream, krate: &TokenStream) -> Option<TxRewrite> {
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
        let elem = ungroup_type(&mut r.elem);
        let syn::Type::Path(path) = elem else {
            continue;
        };
        if path.qself.is_some() {
            continue;
        }
        let Some(last) = path.path.segments.last() else {
            continue;
        };
        if last.ident != "Tx" {
            continue;
        }
        let syn::PathArguments::AngleBracketed(generics) = &last.arguments else {
            continue;
        };
        let [syn::GenericArgument::Lifetime(lt)] = generics.args.iter().collect::<Vec<_>>()[..]
        else {
            continue;
        };
        let lt = lt.clone();
        let mut written = path.path.clone();
        if let Some(seg) = written.segments.last_mut() {
            seg.arguments = syn::PathArguments::None;
        }
        // Every token at the first or the last token of the parameter's
        // type, so that each type rustc checks here (the reference, the
        // projection, its trait) spans all of `&mut Tx<'_>`: a store that
        // is no `TxStore` is then reported once, there.
        let (first, last) = first_last(&*r);
        let head = respan(
            quote! { &mut < #krate::__private::This<#store> as #krate::store:: },
            first,
        );
        let tail = respan(quote! { TxStore>::Tx<#lt> }, last);
        *pat.ty = syn::Type::Verbatim(quote! { #head #tail });
        return Some(TxRewrite { written });
    }
    None
}

/// A `tx: &mut Tx<'_>` parameter, rewritten.
pub(crate) struct TxRewrite {
    /// The path as written, without its lifetime (`idem::Tx`).
    pub(crate) written: syn::Path,
}

/// `tx: &mut Tx<'_>` after `use idem::Tx;`: the rewritten type no longer
/// names `Tx`, so the import is mentioned here to keep it used. A path of
/// several segments (`idem::Tx`) needs no import and is not mentioned: it
/// need not even exist.
pub(crate) fn keep_import_used(written: &syn::Path) -> TokenStream {
    if written.leading_colon.is_none() && written.segments.len() == 1 {
        quote! { #[allow(unused_imports)] use #written as _; }
    } else {
        TokenStream::new()
    }
}

fn ungroup_type(ty: &mut syn::Type) -> &mut syn::Type {
    match ty {
        syn::Type::Group(g) => ungroup_type(&mut g.elem),
        syn::Type::Paren(p) => ungroup_type(&mut p.elem),
        other => other,
    }
}

/// `tokens` with every span set to `span`, so that an error in code built
/// from them points at the user's token instead of the whole attribute.
pub(crate) fn respan(tokens: TokenStream, span: Span) -> TokenStream {
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
pub(crate) fn first_last(tokens: impl ToTokens) -> (Span, Span) {
    let mut it = tokens.into_token_stream().into_iter();
    let first = it.next().map(|t| t.span()).unwrap_or_else(Span::call_site);
    let last = it.last().map(|t| t.span()).unwrap_or(first);
    (first, last)
}

/// `(__p.a.b)`: the payload field named by a string literal.
///
/// The field names take the literal's own span, location and hygiene:
/// under "no field `x` on type `T`" rustc then lists the type's fields
/// ("available fields are: …"), or names the closest one. rustc names
/// fields only for an access in the field's own syntax context (the user's;
/// with the macro's, as `Span::call_site().located_at(…)` would give, it
/// says nothing more), and names the closest one only as a suggestion to
/// replace the access's span, here the literal, with the bare name: rustc
/// 1.95 has no span for the inside of a literal, nor a way to keep the list
/// and drop that suggestion. The parentheses carry the literal's span alone,
/// so that errors about the field's value (not a key part, not hashable)
/// point at the literal.
pub(crate) fn field_access(field: &FieldPath) -> TokenStream {
    let span = field.lit.span();
    let at = span;
    let members = field.members.iter().map(|m| match m {
        FieldSegment::Named(name) => syn::Member::Named(syn::Ident::new(name, at)),
        FieldSegment::Index(index) => syn::Member::Unnamed(syn::Index {
            index: *index,
            span: at,
        }),
    });
    let p = local("__p", span);
    let mut group = Group::new(
        Delimiter::Parenthesis,
        quote_spanned! {span=> (*#p) #(.#members)* },
    );
    group.set_span(span);
    TokenTree::Group(group).into()
}

/// A generated local variable, located at `span` (for error positions) but
/// with the macro's own hygiene: a token from the user, or from a
/// `macro_rules!` that passed it on, cannot see the macro's locals.
pub(crate) fn local(name: &str, span: Span) -> syn::Ident {
    syn::Ident::new(name, Span::call_site().located_at(span))
}

fn extractor(
    spec: &KeySpec,
    payload: &syn::Type,
    private: &TokenStream,
    optional: bool,
) -> TokenStream {
    match spec {
        KeySpec::Field(field) => {
            let span = field.lit.span();
            let access = field_access(field);
            let text = field.text();
            // Every token of the call at the key's literal: a field that is
            // not a key part is then reported there and nowhere else.
            let private = &respan(private.clone(), span);
            let out = local("__out", span);
            let write = if optional {
                quote_spanned! {span=> #private::OptionalKeyPart::write_optional_key(&#access, #out) }
            } else {
                quote_spanned! {span=> { #private::KeyPart::write_key(&#access, #out); ::core::result::Result::Ok(()) } }
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

/// How the generated code reaches a `with = …` extractor: `&path` for a
/// path (a fn, a unit struct, a `static` or `const`: nothing to evaluate),
/// else a `static` that evaluates the expression once, on first use, and
/// keeps it boxed (its type cannot be named here).
pub(crate) struct With {
    /// Items to emit next to the handler type.
    pub(crate) items: TokenStream,
    /// An expression of type `&impl KeyExtractor<P>`.
    pub(crate) reference: TokenStream,
}

pub(crate) fn with_extractor(with: &syn::Expr, payload: &syn::Type, krate: &TokenStream) -> With {
    let private = quote! { #krate::__private };
    let (first, last) = first_last(with);
    let mut inner = with;
    while let syn::Expr::Group(g) = inner {
        inner = &g.expr;
    }
    if let syn::Expr::Path(p) = inner
        && p.qself.is_none()
    {
        return With {
            items: TokenStream::new(),
            reference: quote_spanned! {first=> &#with },
        };
    }
    // `Box::new(<expression>)` from the first token of the expression to
    // its last: rustc underlines the whole expression for an unmet bound.
    let boxed = respan(quote! { ::std::boxed::Box::new }, first);
    let e = local("__idem_with", first);
    let call = quote_spanned! {last=>
        {
            let #e: #private::BoxedExtractor<#payload> = #boxed(#with);
            #e
        }
    };
    With {
        items: quote! {
            static __IDEM_WITH: #private::LazyLock<#private::BoxedExtractor<#payload>> =
                #private::LazyLock::new(|| #call);
        },
        reference: quote! { &**__IDEM_WITH },
    }
}

fn generate(
    args: &Args,
    sig: &Signature,
    f: &ItemFn,
    krate: &TokenStream,
    tx: Option<&TxRewrite>,
) -> TokenStream {
    let private = quote! { #krate::__private };
    let fn_name = &f.sig.ident;
    let fn_text = fn_name.to_string();
    let ty = format_ident!("__IdemHandler_{}", fn_name);
    let payload = sig.payload.as_ref().expect("validated: payload exists");
    let payload_span = syn::spanned::Spanned::span(payload);
    let output = sig.output.as_ref().expect("validated: return type exists");

    let (store_ty, store_span) = match &args.store {
        None => (quote! { #krate::NoStore }, Span::call_site()),
        Some(s) => (store_type(&s.value, s.span, krate), s.span),
    };
    let store_text = args
        .store
        .as_ref()
        .map(|s| store_text(&s.value))
        .unwrap_or_else(|| "none".into());

    let topic = args.topic.as_ref().expect("validated: topic exists");
    let (name, name_is_default) = match &args.name {
        Some(n) => (n.value(), false),
        None => (fn_text.clone(), true),
    };
    let key_text = match (&args.key, &args.with) {
        (Some(k), _) => k.value.describe(),
        (None, Some(w)) => format!("with {}", quote!(#w).to_string().replace(' ', "")),
        (None, None) => "message_id".into(),
    };

    // Only what the attribute set; the runtime's defaults do the rest.
    let mut set = Vec::new();
    let ms = |m: u64| quote! { #private::Duration::from_millis(#m) };
    if let Some(a) = args.ack {
        let ident = format_ident!("{}", a.value.ident());
        set.push(quote! { ack: #krate::AckMode::#ident });
    } else if sig.batch.is_some() {
        // A batch handler's only ack mode (validated).
        set.push(quote! { ack: #krate::AckMode::Batch });
    }
    if let Some(t) = args.ttl {
        let d = ms(t.0);
        set.push(quote! { ttl: ::core::option::Option::Some(#d) });
    }
    if let Some(l) = args.lease {
        let d = ms(l.0);
        set.push(quote! { lease: #d });
    }
    if let Some(r) = args.retries {
        set.push(quote! { retries: #r });
    }
    if let Some((lo, hi)) = args.backoff {
        let (lo, hi) = (ms(lo.0), ms(hi.0));
        set.push(quote! { backoff: #krate::Backoff { min: #lo, max: #hi } });
    }
    if let Some(d) = &args.dead_letter {
        set.push(quote! { dead_letter: ::core::option::Option::Some(#d) });
    }
    if let Some(o) = args.ordered {
        set.push(quote! { ordered: #o });
    }
    if let Some(m) = args.on_missing_key {
        let ident = format_ident!("{}", m.value.ident());
        set.push(quote! { on_missing_key: #krate::OnMissingKey::#ident });
    }
    if let Some(p) = args.on_in_progress {
        let ident = format_ident!("{}", p.ident());
        set.push(quote! { on_in_progress: #krate::OnInProgress::#ident });
    }
    if let Some(m) = args.max_key_len {
        let m = m as usize;
        set.push(quote! { max_key_len: #m });
    }

    let with = args
        .with
        .as_ref()
        .map(|w| with_extractor(w, payload, krate));
    let with_items = with.as_ref().map(|w| w.items.clone());
    let key_body = match (&args.key, &with) {
        (Some(spec), _) => {
            let e = extractor(
                &spec.value,
                payload,
                &private,
                args.on_missing_key.is_some(),
            );
            quote! { #krate::KeyExtractor::<#payload>::extract(&#e, __d, __p) }
        }
        (None, Some(w)) => {
            let r = &w.reference;
            quote! { #krate::KeyExtractor::<#payload>::extract(#r, __d, __p) }
        }
        (None, None) => {
            quote! { #krate::KeyExtractor::<#payload>::extract(&#private::MessageId, __d, __p) }
        }
    };

    // Conflict detection is opt-in: the fields named in `fingerprint`, else
    // whatever a `with` extractor supplies, else none.
    let (fingerprint, fingerprint_text) = match (&args.fingerprint, &with) {
        (Some(fields), _) => {
            let adds = fields.iter().map(|field| {
                let span = field.lit.span();
                let access = field_access(field);
                let f = local("__f", span);
                quote_spanned! {span=> #f.field(&#access); }
            });
            let text = format!(
                "[{}]",
                fields
                    .iter()
                    .map(|field| format!("{:?}", field.text()))
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
        (None, Some(w)) => {
            let with_expr = args.with.as_ref().expect("with");
            let text = format!(
                "(supplied by the key extractor `{}`)",
                quote!(#with_expr).to_string().replace(' ', "")
            );
            let r = &w.reference;
            let body = quote! {
                fn fingerprint(&self, __d: &#krate::Delivery, __p: &#payload) -> ::core::option::Option<#krate::Fingerprint> {
                    #krate::KeyExtractor::<#payload>::fingerprint(#r, __d, __p)
                }
            };
            (Some(body), quote! { ::core::option::Option::Some(#text) })
        }
        (None, None) => (None, quote! { ::core::option::Option::None }),
    };
    if args.fingerprint.is_some() || args.with.is_some() {
        set.push(quote! { fingerprint: #fingerprint_text });
    }

    let call_args = sig.params.iter().map(|(p, span)| match p {
        Param::Payload => local("__payload", *span),
        Param::Tx => local("__tx", *span),
        Param::Ack => local("__ack", *span),
        Param::Delivery => local("__delivery", *span),
    });
    // The store's mode: a handler with a `tx` parameter needs a TxStore (and
    // gets its transaction); one without works with any store, generically
    // over the mode, which the compiler infers.
    let (mode, generics) = if sig.tx.is_some() {
        (quote! { #private::Transactional }, quote! {})
    } else {
        (quote! { __M }, quote! { <__M: 'static> })
    };
    let call_span = fn_name.span();
    let [payload_arg, tx_arg, delivery_arg, ack_arg] =
        ["__payload", "__tx", "__delivery", "__ack"].map(|n| local(n, call_span));
    // One message per call (`HandlerFn`), or a batch (`BatchHandlerFn`,
    // handed over as the `Batch` itself or as its payloads).
    let (call_trait, call, descriptor) = match &sig.batch {
        None => (
            quote! { HandlerFn },
            quote_spanned! {call_span=>
                #[allow(unused_variables)]
                fn call<'__a, '__c: '__a>(
                    &'__a self,
                    #payload_arg: #payload,
                    #tx_arg: &'__a mut <#store_ty as #krate::DedupStore<#mode>>::Tx<'__c>,
                    #delivery_arg: &'__a #krate::Delivery,
                    #ack_arg: #krate::Ack,
                ) -> impl ::core::future::Future<Output = #output> + ::core::marker::Send + '__a {
                    #fn_name(#(#call_args),*)
                }
            },
            quote! { of },
        ),
        Some(batch) => {
            let batch_args = sig.params.iter().map(|(p, span)| match p {
                Param::Payload if batch.shape == BatchShape::Vec => {
                    let p = local("__payload", *span);
                    quote_spanned! {*span=> #p.into_payloads() }
                }
                Param::Payload => local("__payload", *span).into_token_stream(),
                Param::Tx => local("__tx", *span).into_token_stream(),
                // Rejected by validation for batch handlers.
                Param::Ack | Param::Delivery => quote! {},
            });
            (
                quote! { BatchHandlerFn },
                quote_spanned! {call_span=>
                    #[allow(unused_variables)]
                    fn call<'__a, '__c: '__a>(
                        &'__a self,
                        #payload_arg: #krate::Batch<#payload>,
                        #tx_arg: &'__a mut <#store_ty as #krate::DedupStore<#mode>>::Tx<'__c>,
                    ) -> impl ::core::future::Future<Output = #output> + ::core::marker::Send + '__a {
                        #fn_name(#(#batch_args),*)
                    }
                },
                quote! { of_batch },
            )
        }
    };

    // The requirements on the payload (its codec decodes it), the store and
    // the `tx` parameter. A wrong type must give one error, at its token,
    // not one per place the handler type uses it. So the impl states them
    // as where clauses (inside `for<'__idem>`, which keeps rustc from
    // rejecting a false bound on a concrete type right there) and nothing
    // inside the impl is checked against them. They are proven once each,
    // in a chain of calls: the payload at the payload's span, then the
    // store (the payload known good) at the store's span, or, with a `tx`
    // parameter, the store's transaction at that parameter. Each link
    // repeats its bound first, at the same span, as the runtime's
    // documented `assert_*::<T>()` (or the very type of the parameter):
    // rustc reports the bound once.
    let codec_ty = codec_type(args, krate);
    let codec = args.codec.as_ref().map(|c| &c.value);
    let payload_at = first_last(payload);
    // The codec's bound, at the payload's span (`This<C>` from its first
    // token to its last): reported there, once.
    let codec_check = || {
        let assert = respan(quote! { #private::assert_codec }, payload_at.0);
        let this = respan(quote! { #private::This< }, payload_at.0);
        let close = quote_spanned! {payload_at.1=> > };
        (
            quote_spanned! {payload_span=> for<'__idem> #codec_ty: #krate::Codec<#payload> },
            quote! { #assert::<#payload, #this #codec_ty #close>(); },
        )
    };
    // A serde codec (JSON, MessagePack) checks `serde::Deserialize` first,
    // with its advice; MessagePack's codec itself (its cargo feature) next.
    let serde_check = || {
        let assert = respan(quote! { #private::assert_payload }, payload_at.0);
        (
            quote_spanned! {payload_span=> for<'__idem> #payload: #krate::Payload },
            quote! { #assert::<#payload>(); },
        )
    };
    let ((payload_bound, assert_payload), codec_link) = match codec {
        None | Some(Codec::Builtin(BuiltinCodec::Json)) => (serde_check(), None),
        Some(Codec::Builtin(BuiltinCodec::MsgPack)) => (serde_check(), Some(codec_check())),
        Some(Codec::Builtin(BuiltinCodec::Protobuf) | Codec::Custom(_)) => (codec_check(), None),
    };
    let at = |(first, last): (Span, Span), fn_name: &str| {
        let ty = respan(ty.to_token_stream(), first);
        let f = format_ident!("{}", fn_name, span = last);
        quote_spanned! {last=> #ty::#f() }
    };
    let check_payload = at(payload_at, "__idem_payload_checked");
    let (store_bound, check_store) = match &sig.tx {
        None => {
            let store_at = first_last(&store_ty);
            let assert_store = respan(quote! { #private::assert_store }, store_at.0);
            let check = at(store_at, "__idem_store_checked");
            (
                quote_spanned! {store_span=> for<'__idem> #store_ty: #krate::DedupStore<__M> },
                quote! {
                    #assert_store::<#store_ty, _>();
                    #check
                },
            )
        }
        // A `tx` parameter: the store must hand out a transaction. The
        // store type is spelled `<S as __IdemSame>::This` (= S) so that the
        // turbofish, which rustc points at, can carry the span of the whole
        // parameter.
        Some(param) => {
            let (first, last) = first_last(&param.tokens);
            let lt = quote_spanned! {first=> < };
            let this = quote_spanned! {last=> >::This };
            let assert_tx = respan(quote! { #private::assert_transactional }, first);
            let check = at((first, last), "__idem_store_checked");
            (
                quote! { for<'__idem> #store_ty: #krate::store::TxStore },
                quote! {
                    #assert_tx::<#lt #store_ty as __IdemSame #this>();
                    #check
                },
            )
        }
    };
    let same = sig.tx.as_ref().map(|_| {
        quote! {
            trait __IdemSame {
                type This: ?::core::marker::Sized;
            }
            impl<T: ?::core::marker::Sized> __IdemSame for T {
                type This = T;
            }
        }
    });
    let tx_used = tx.map(|t| keep_import_used(&t.written));
    let (payload_checked, codec_checked, codec_bound) = match &codec_link {
        None => (
            quote! {
                const fn __idem_payload_checked() -> #private::HandlerDescriptor
                where
                    #payload_bound,
                {
                    #check_store
                }
            },
            None,
            None,
        ),
        Some((bound, assert)) => {
            let check_codec = at(payload_at, "__idem_codec_checked");
            (
                quote! {
                    const fn __idem_payload_checked() -> #private::HandlerDescriptor
                    where
                        #payload_bound,
                    {
                        #assert
                        #check_codec
                    }
                },
                Some(quote! {
                    const fn __idem_codec_checked() -> #private::HandlerDescriptor
                    where
                        #payload_bound,
                        #bound,
                    {
                        #check_store
                    }
                }),
                Some(quote! { #bound, }),
            )
        }
    };

    quote! {
        #[doc(hidden)]
        const _: () = {
            #[allow(non_camel_case_types)]
            #[derive(Default)]
            struct #ty;

            #with_items
            #tx_used
            #same

            impl #generics #krate::#call_trait<#mode> for #ty
            where
                #payload_bound,
                #codec_bound
                #store_bound,
            {
                type Result = #output;

                #call
            }

            impl #generics #krate::Handler<#mode> for #ty
            where
                #payload_bound,
                #codec_bound
                #store_bound,
            {
                type Payload = #payload;
                type Store = #store_ty;
                type Codec = #codec_ty;
                const META: #krate::HandlerMeta = #krate::HandlerMeta {
                    name: #name,
                    name_is_default: #name_is_default,
                    path: ::core::concat!(::core::module_path!(), "::", #fn_text),
                    topic: #topic,
                    key: #key_text,
                    store: #store_text,
                    #(#set,)*
                    ..#krate::HandlerMeta::DEFAULTS
                };

                fn key(&self, __d: &#krate::Delivery, __p: &#payload) -> ::core::result::Result<#krate::Key, #krate::KeyError> {
                    #key_body
                }

                #fingerprint
            }

            impl #ty {
                #payload_checked
                #codec_checked
                const fn __idem_store_checked #generics () -> #private::HandlerDescriptor
                where
                    #payload_bound,
                    #codec_bound
                    #store_bound,
                {
                    #private::HandlerDescriptor::#descriptor::<#ty, #mode>()
                }
            }

            #private::inventory::submit! {
                {
                    #assert_payload
                    #check_payload
                }
            }
        };
    }
}
