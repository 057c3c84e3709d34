//! The `#[idempotent]` attribute of idem. This crate is a thin shim: the
//! arguments are parsed in `parse`, the handler's signature read in
//! `signature`, both checked together in `validate`, and the code generated
//! in `expand` (or, after an error, in `fallback`). Use it through the `idem`
//! crate, which re-exports it; the generated code refers to `::idem`.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;

mod expand;
mod fallback;
mod parse;
mod signature;
mod validate;

// The reference (every argument, its values and default, the parameter
// rules) is `idempotent.md`: shown here and on the `idem` re-export, whose
// doctests run its examples (this crate cannot: it has no `idem`).
#[doc = include_str!("idempotent.md")]
#[proc_macro_attribute]
pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    let out = expand::idempotent(attr.into(), item.into());
    if std::env::var_os("IDEM_MACROS_DEBUG").is_some_and(|v| v == "1") {
        eprintln!("#[idempotent] expansion:\n{out}\n");
    }
    out.into()
}
