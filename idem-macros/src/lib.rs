//! The `#[idempotent]` attribute of idem. This crate is a thin shim: the
//! arguments are parsed in `args`, the handler's signature read in
//! `signature`, and the code generated in `expand`. Use it through the `idem`
//! crate, which re-exports it; the generated code refers to `::idem`.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;

mod args;
mod expand;
mod signature;

/// Makes an async fn an idempotent message handler. See the `idem` crate's
/// documentation for the arguments and their semantics.
///
/// Set the environment variable `IDEM_MACROS_DEBUG=1` while compiling to
/// print every expansion to stderr.
#[proc_macro_attribute]
pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    let out = expand::idempotent(attr.into(), item.into());
    if std::env::var_os("IDEM_MACROS_DEBUG").is_some_and(|v| v == "1") {
        eprintln!("#[idempotent] expansion:\n{out}\n");
    }
    out.into()
}
