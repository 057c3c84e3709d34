//! What is emitted when the attribute or the signature is wrong (the shape
//! of thiserror's `fallback.rs`): the errors, the user's fn (so its callers
//! and tests do not pile "cannot find function" errors on top of the real
//! one; its `tx` type completed when the store is known), and a block that
//! mentions what the attribute names (the `with` extractor, a store or
//! codec type, the `Tx` path as written) so that their imports are not
//! reported unused. Nothing in the block is checked beyond name resolution
//! and types: no trait bound of the handler is asked for, so the only
//! errors are the ones found, each once.

use proc_macro2::TokenStream;
use quote::quote;
use syn::ItemFn;

use crate::parse::{Args, Codec, FieldPath, KeySpec, Store};
use crate::signature::Signature;
use crate::validate::Errors;

pub(crate) fn expand(
    f: &ItemFn,
    args: &Args,
    sig: &Signature,
    krate: &TokenStream,
    tx_as_written: Option<&syn::Path>,
    errors: Errors,
) -> TokenStream {
    let errors = errors.into_compile_errors();
    let mut uses = Vec::new();
    if let Some(p) = tx_as_written {
        uses.push(crate::expand::keep_import_used(p));
    }
    if let Some(Store::Custom(p)) = args.store.as_ref().map(|s| &s.value) {
        uses.push(quote! { let _: ::core::marker::PhantomData<#p>; });
    }
    if let Some(Codec::Custom(p)) = args.codec.as_ref().map(|c| &c.value) {
        uses.push(quote! { let _: ::core::marker::PhantomData<#p>; });
    }
    if let Some(with) = &args.with {
        // Inside a closure that is never called: named, not evaluated.
        uses.push(quote! { let _ = || { let _ = &#with; }; });
    }
    // Key and fingerprint fields are still checked against the payload
    // type: a wrong field is a mistake of its own.
    if let Some(payload) = &sig.payload {
        let mut fields = Vec::new();
        if let Some(key) = &args.key {
            key_fields(&key.value, &mut fields);
        }
        if let Some(fingerprint) = &args.fingerprint {
            fields.extend(fingerprint.iter());
        }
        let accesses = fields.into_iter().map(crate::expand::field_access);
        uses.push(quote! { let _ = |__p: &#payload| { #(let _ = &#accesses;)* }; });
    }
    // The handler fn is used by the handler type, which is not generated:
    // mention it, unless its `tx` type names a store that may not have one
    // (that would be a second error for the same mistake).
    let fn_name = &f.sig.ident;
    let fn_used = if sig.payload.is_some() && tx_as_written.is_none() {
        quote! { let _ = #fn_name; }
    } else {
        TokenStream::new()
    };
    let _ = krate;
    quote! {
        #errors
        #f
        #[doc(hidden)]
        const _: () = {
            #[allow(unused, clippy::all)]
            fn __idem_fallback() {
                #fn_used
                #(#uses)*
            }
        };
    }
}

fn key_fields<'a>(key: &'a KeySpec, out: &mut Vec<&'a FieldPath>) {
    match key {
        KeySpec::Field(f) => out.push(f),
        KeySpec::Composite(parts) => parts.iter().for_each(|p| key_fields(p, out)),
        KeySpec::Header(_) | KeySpec::MessageId => {}
    }
}
