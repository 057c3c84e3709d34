//! Every way of naming the idempotency key.
use serde::Deserialize;

#[derive(Deserialize)]
struct OrderPlaced {
    order_id: u64,
    customer: Customer,
    tenant: String,
    coupon: Option<String>,
}

#[derive(Deserialize)]
struct Customer {
    id: String,
}

#[derive(Debug)]
struct AppError;
impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("app")
    }
}

#[idem::idempotent(topic = "orders", key = "order_id", store = "sqlite")]
async fn by_field(order: OrderPlaced, tx: &mut idem::Tx<'_>) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

#[idem::idempotent(topic = "orders", key = "customer.id", store = "memory")]
async fn by_nested_field(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(topic = "orders", key = ("tenant", "order_id"), store = "sqlite")]
async fn by_composite(order: OrderPlaced, tx: &mut idem::Tx<'_>) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

#[idem::idempotent(topic = "orders", key = header("Idempotency-Key"), store = "memory")]
async fn by_header(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(topic = "orders", key = message_id, store = "memory")]
async fn by_message_id(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(topic = "orders", key = ("tenant", header("X-Request-Id")), store = "memory")]
async fn by_field_and_header(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

fn my_fn(d: &idem::Delivery, p: &OrderPlaced) -> Result<idem::Key, idem::KeyError> {
    let _ = d;
    idem::Key::new(format!("{}:{}", p.tenant, p.order_id))
}

#[idem::idempotent(topic = "orders", with = my_fn, store = "memory")]
async fn by_fn(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

struct MyExtractor;

impl idem::KeyExtractor<OrderPlaced> for MyExtractor {
    fn extract(&self, _d: &idem::Delivery, p: &OrderPlaced) -> Result<idem::Key, idem::KeyError> {
        idem::Key::new(p.customer.id.clone())
    }
}

#[idem::idempotent(topic = "orders", with = MyExtractor, store = "memory")]
async fn by_extractor(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(
    topic = "orders",
    key = "coupon",
    on_missing_key = "dead_letter",
    store = "memory"
)]
async fn by_optional_field(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(topic = "orders", key = ("tenant", "coupon"), on_missing_key = "reject", store = "memory")]
async fn by_optional_composite(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

fn main() {}
