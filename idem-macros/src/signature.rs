//! What the handler's parameters and return type are. Parameters are
//! recognised by their shape: `&mut T` is the store transaction, `Ack` the
//! ack token, `&Delivery` the delivery, and the one by-value parameter left
//! is the payload. A payload of `Vec<T>` or `Batch<T>` makes a batch
//! handler, whose messages are `T`s.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, Type};

use crate::validate::Errors;

pub(crate) enum Param {
    Payload,
    Tx,
    Ack,
    Delivery,
}

/// How a batch handler takes its batch.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchShape {
    /// `Vec<T>`: the payloads.
    Vec,
    /// `idem::Batch<T>`: the payloads with their deliveries.
    Batch,
}

/// A batch handler's payload parameter: the shape, and the type as written.
pub(crate) struct BatchParam {
    pub(crate) shape: BatchShape,
    pub(crate) written: Type,
}

/// `Vec<T>` / `Batch<T>` (any path ending so, one type argument): the shape
/// and `T`.
fn batch_of(ty: &Type) -> Option<(BatchShape, Type)> {
    let Type::Path(p) = ty else {
        return match ty {
            Type::Group(g) => batch_of(&g.elem),
            Type::Paren(p) => batch_of(&p.elem),
            _ => None,
        };
    };
    let last = p.path.segments.last()?;
    let shape = match last.ident.to_string().as_str() {
        "Vec" => BatchShape::Vec,
        "Batch" => BatchShape::Batch,
        _ => return None,
    };
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.iter().collect::<Vec<_>>().as_slice() {
        [syn::GenericArgument::Type(t)] if p.qself.is_none() => Some((shape, t.clone())),
        _ => None,
    }
}

/// A parameter as written (`name: Type`), for errors that underline it.
pub(crate) struct ParamLoc {
    pub(crate) tokens: TokenStream,
}

pub(crate) struct Signature {
    /// The parameters in order, with their types' spans.
    pub(crate) params: Vec<(Param, Span)>,
    /// The payload of one message (for a batch handler: the element type).
    pub(crate) payload: Option<Type>,
    /// Set for a batch handler (`Vec<T>` / `Batch<T>` payload).
    pub(crate) batch: Option<BatchParam>,
    /// The `&Delivery` parameter, if any.
    pub(crate) delivery: Option<ParamLoc>,
    pub(crate) tx: Option<ParamLoc>,
    pub(crate) ack: Option<ParamLoc>,
    pub(crate) output: Option<Type>,
}

fn last_segment_is(ty: &Type, name: &str) -> bool {
    match ty {
        Type::Path(p) => {
            p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == name)
        }
        Type::Group(g) => last_segment_is(&g.elem, name),
        Type::Paren(p) => last_segment_is(&p.elem, name),
        _ => false,
    }
}

impl Signature {
    pub(crate) fn read(f: &ItemFn, errors: &mut Errors) -> Signature {
        let sig = &f.sig;
        if sig.asyncness.is_none() {
            errors.at(
                sig.fn_token.span,
                "#[idempotent] handlers must be `async fn`: add `async` before `fn`",
            );
        }
        if !sig.generics.params.is_empty() {
            errors.at(sig.generics.span(), "#[idempotent] handlers cannot be generic: the runtime needs one concrete payload type");
        }
        if let Some(v) = &sig.variadic {
            errors.at(v.span(), "#[idempotent] handlers cannot be variadic");
        }
        let mut out = Signature {
            params: Vec::new(),
            payload: None,
            batch: None,
            delivery: None,
            tx: None,
            ack: None,
            output: None,
        };
        for input in &sig.inputs {
            let pat = match input {
                FnArg::Receiver(r) => {
                    errors.at(
                        r.span(),
                        "#[idempotent] handlers are free functions, not methods: remove `self`",
                    );
                    continue;
                }
                FnArg::Typed(pat) => pat,
            };
            let ty = &*pat.ty;
            let span = ty.span();
            let loc = ParamLoc {
                tokens: pat.to_token_stream(),
            };
            let (param, slot) = match ty {
                Type::Reference(r) if r.mutability.is_some() => (Param::Tx, &mut out.tx),
                Type::Reference(r) if last_segment_is(&r.elem, "Delivery") => {
                    (Param::Delivery, &mut out.delivery)
                }
                Type::Reference(_) => {
                    errors.spanned(
                        ty,
                        "unsupported parameter: the payload is taken by value; `&mut idem::Tx<'_>` is the transaction, `&idem::Delivery` the delivery",
                    );
                    continue;
                }
                t if last_segment_is(t, "Ack") => (Param::Ack, &mut out.ack),
                _ => {
                    if out.payload.is_some() {
                        errors.spanned(
                            pat,
                            "a handler takes one payload parameter; the others must be `tx: &mut idem::Tx<'_>`, `ack: idem::Ack` or `delivery: &idem::Delivery`",
                        );
                        continue;
                    }
                    match batch_of(ty) {
                        Some((shape, elem)) => {
                            out.payload = Some(elem);
                            out.batch = Some(BatchParam {
                                shape,
                                written: ty.clone(),
                            });
                        }
                        None => out.payload = Some(ty.clone()),
                    }
                    out.params.push((Param::Payload, span));
                    continue;
                }
            };
            if slot.is_some() {
                errors.spanned(pat, "this kind of parameter is given twice; keep one");
                continue;
            }
            *slot = Some(loc);
            out.params.push((param, span));
        }
        if out.payload.is_none() {
            errors.at(
                sig.ident.span(),
                "a handler needs a payload parameter, e.g. `order: OrderPlaced` (a type implementing serde::Deserialize)",
            );
        }
        match &sig.output {
            syn::ReturnType::Type(_, ty) => out.output = Some((**ty).clone()),
            syn::ReturnType::Default => errors.at(
                sig.paren_token.span.join(),
                "an idempotent handler must return `Result<T, E>`: the error decides retry and dead-lettering",
            ),
        }
        out
    }
}
