//! `with = …` takes any expression that yields a key extractor.
use serde::Deserialize;

use idem::{Delivery, Key, KeyError, KeyExtractor};

#[derive(Deserialize)]
struct OrderPlaced {
    order_id: u64,
}

#[derive(Debug)]
struct AppError;
impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("app")
    }
}

/// An extractor with configuration.
struct Prefixed {
    prefix: String,
}

impl Prefixed {
    fn new(prefix: &str) -> Self {
        Prefixed {
            prefix: prefix.to_owned(),
        }
    }
}

impl KeyExtractor<OrderPlaced> for Prefixed {
    fn extract(&self, _d: &Delivery, p: &OrderPlaced) -> Result<Key, KeyError> {
        Key::new(format!("{}:{}", self.prefix, p.order_id))
    }
}

fn by_fn(_d: &Delivery, p: &OrderPlaced) -> Result<Key, KeyError> {
    Key::new(p.order_id.to_string())
}

static EU: Prefixed = Prefixed {
    prefix: String::new(),
};

#[idem::idempotent(topic = "orders", with = Prefixed::new("eu"), store = "memory")]
async fn with_call(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(topic = "orders", with = Prefixed { prefix: "us".into() }, store = "memory")]
async fn with_struct_literal(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(topic = "orders", with = by_fn, store = "memory")]
async fn with_fn(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(topic = "orders", with = EU, store = "memory")]
async fn with_static(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(topic = "orders", with = (by_fn, Prefixed::new("eu")), store = "memory")]
async fn with_tuple(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

fn main() {}
