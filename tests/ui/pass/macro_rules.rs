//! Arguments passed through `macro_rules!` arrive inside invisible groups
//! (`$x:literal`, `$x:expr`, `$x:path`): every argument accepts them.
use serde::Deserialize;

#[derive(Deserialize)]
struct OrderPlaced {
    order_id: u64,
    amount: i64,
}

#[derive(Debug)]
struct AppError;
impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("app")
    }
}

fn by_fn(_d: &idem::Delivery, p: &OrderPlaced) -> Result<idem::Key, idem::KeyError> {
    idem::Key::new(p.order_id.to_string())
}

macro_rules! handler {
    (
        $fn_name:ident, $topic:literal, $key:literal, $store:literal, $ack:literal,
        $ttl:literal, $lease:literal, $retries:literal, $backoff:literal,
        $dead_letter:literal, $ordered:literal, $name:literal, $fp:literal,
        $on_missing_key:literal, $on_in_progress:literal, $max_key_len:literal,
        $krate:literal, $codec:literal
    ) => {
        #[idem::idempotent(
            topic = $topic,
            key = $key,
            store = $store,
            ack = $ack,
            ttl = $ttl,
            lease = $lease,
            retries = $retries,
            backoff = $backoff,
            dead_letter = $dead_letter,
            ordered = $ordered,
            name = $name,
            fingerprint = [$fp],
            on_missing_key = $on_missing_key,
            on_in_progress = $on_in_progress,
            max_key_len = $max_key_len,
            crate = $krate,
            codec = $codec,
        )]
        async fn $fn_name(order: OrderPlaced, tx: &mut idem::Tx<'_>) -> Result<(), AppError> {
            let _ = (order.amount, tx);
            Ok(())
        }
    };
}

handler!(
    literals, "orders", "order_id", "sqlite", "auto", "7d", "30s", 5, "100ms..30s",
    "orders.dlq", true, "place-order", "amount", "dead_letter", "wait", 128, "idem", "json"
);

macro_rules! exprs {
    ($fn_name:ident, $topic:expr, $key:expr, $store:expr, $ack:expr, $retries:expr) => {
        #[idem::idempotent(topic = $topic, key = $key, store = $store, ack = $ack, retries = $retries)]
        async fn $fn_name(order: OrderPlaced) -> Result<(), AppError> {
            let _ = order;
            Ok(())
        }
    };
}

exprs!(expressions, "orders", ("order_id", header("X-Tenant")), "memory", "before", 2);

macro_rules! paths {
    ($fn_name:ident, $store:path, $with:expr, $key:ident) => {
        #[idem::idempotent(topic = "orders", with = $with, store = $store)]
        async fn $fn_name(order: OrderPlaced) -> Result<(), AppError> {
            let _ = order;
            Ok(())
        }

        #[idem::idempotent(topic = "orders", key = $key, store = $store)]
        async fn by_message_id(order: OrderPlaced) -> Result<(), AppError> {
            let _ = order;
            Ok(())
        }
    };
}

paths!(a_path, idem::store::memory::MemoryStore, by_fn, message_id);

fn main() {}
