//! The store conformance suite: one call checks every rule the
//! [`LeaseStore`] or [`TxStore`] docs state, and fails naming the rule
//! broken, what happened and how to fix it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use idem_runtime::store::memory::MemoryStore;
//! use idem_runtime::testing::conformance::{self, LeaseRule};
//!
//! // Every rule…
//! conformance::lease_store(MemoryStore::new).await;
//! // …or one at a time.
//! LeaseRule::ConflictOnlyWhenBothFingerprintsDiffer.check(MemoryStore::new()).await;
//! # }
//! ```
//!
//! For your own store, in a test: `conformance::lease_store(|| MyStore::new()).await`
//! or `conformance::tx_store(|| my_store.clone()).await`. The suite calls the
//! closure once per rule. Each rule writes its own records (under a handler
//! name of its own), so the closure may hand out clones of one connected
//! store; a store with its own key prefix or schema is cleaner still.
//! [`LeaseRule`] and [`TxRule`] list the rules; `Rule::check` runs one.
//!
//! Leases and TTLs run on the store's clock (the wall clock, a server's
//! clock), so the rules that wait for an expiry use leases and TTLs of
//! 200 ms and poll until the record is free, with margins that do not make
//! a loaded machine fail the suite: a record may look free at most 25 ms
//! early and must be free at most 10 s late. The whole suite takes a few
//! seconds. Run it on tokio's normal clock (not `start_paused`): the stores
//! do not read tokio's clock. The failure is a panic, like an `assert!`:
//!
//! ```text
//! idem store conformance: store `map` breaks the LeaseStore rule: release deletes the lease only if it is still the caller's (same token); …
//!   what happened: after release() with token 2 of a lease taken with token 1: claim answered New { token: 3 }, expected InProgress
//!   fix: in release(), delete the record only when it is a lease whose token equals claimed.token
//! ```

mod check;
mod lease;
mod shared;
mod tx;

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

pub use lease::LeaseRule;
pub use tx::TxRule;

use crate::store::{LeaseStore, TxStore};

/// Checks every [`LeaseRule`] on stores from `new_store` (called once per
/// rule), then panics listing every rule the store breaks, if any.
///
/// The `testing` module docs show a store that passes. One that forgets
/// everything does not:
///
/// ```should_panic
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use idem_runtime::store::{Claim, ClaimRequest, Claimed, LeaseStore, StoreError};
///
/// struct Forgetful;
///
/// impl LeaseStore for Forgetful {
///     fn kind(&self) -> &'static str { "forgetful" }
///     async fn claim(&self, _: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
///         Ok(Claim::New { token: 1 })
///     }
///     async fn complete(&self, _: &Claimed<'_>) -> Result<(), StoreError> { Ok(()) }
///     async fn release(&self, _: &Claimed<'_>) -> Result<(), StoreError> { Ok(()) }
/// }
///
/// // Panics: "store `forgetful` breaks 11 of the 13 LeaseStore rules: …"
/// idem_runtime::testing::conformance::lease_store(|| Forgetful).await;
/// # }
/// ```
pub async fn lease_store<S: LeaseStore>(new_store: impl FnMut() -> S) {
    run_all(
        "LeaseStore",
        LeaseRule::ALL,
        new_store,
        S::kind,
        LeaseRule::check,
    )
    .await;
}

/// Checks every [`TxRule`] on stores from `new_store` (called once per
/// rule), then panics listing every rule the store breaks, if any.
///
/// The rules that check waiting claims keep one transaction open while
/// another claims the same key, so the store must be able to run two
/// transactions at once (or make the second `begin` wait, like SQLite's
/// single writer).
///
/// ```should_panic
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use idem_runtime::store::{Claim, ClaimRequest, Claimed, NoTx, StoreError, TxStore};
///
/// /// Claims every key, remembers nothing: no transaction at all.
/// struct Forgetful;
///
/// // Keep the trait's `Self::Tx<'_>` in the signatures: spelling out
/// // `&mut NoTx` there does not match the trait's lifetimes (E0195).
/// impl TxStore for Forgetful {
///     type Tx<'c> = NoTx;
///     fn kind(&self) -> &'static str { "forgetful" }
///     async fn begin(&self) -> Result<NoTx, StoreError> { Ok(NoTx) }
///     async fn claim(&self, _: &mut Self::Tx<'_>, r: &[ClaimRequest<'_>]) -> Result<Vec<Claim>, StoreError> {
///         Ok(vec![Claim::New { token: 0 }; r.len()])
///     }
///     async fn commit(&self, _: NoTx, _: &[Claimed<'_>]) -> Result<(), StoreError> { Ok(()) }
///     async fn rollback(&self, _: NoTx) -> Result<(), StoreError> { Ok(()) }
///     async fn savepoint<'t>(&self, _: &'t mut Self::Tx<'_>) -> Result<Self::Tx<'t>, StoreError> {
///         Ok(NoTx)
///     }
///     async fn end_savepoint(&self, _: Self::Tx<'_>, _: bool) -> Result<(), StoreError> { Ok(()) }
///     async fn unclaim(&self, _: &mut Self::Tx<'_>, _: &[Claimed<'_>]) -> Result<(), StoreError> {
///         Ok(())
///     }
/// }
///
/// idem_runtime::testing::conformance::tx_store(|| Forgetful).await;
/// # }
/// ```
pub async fn tx_store<S: TxStore>(new_store: impl FnMut() -> S) {
    run_all("TxStore", TxRule::ALL, new_store, S::kind, TxRule::check).await;
}

/// Checks each rule on a store of its own, then panics listing every rule
/// broken (each rule's own panic is caught, so one broken rule does not
/// hide the next).
async fn run_all<R: Copy, S, F: Future<Output = ()>>(
    contract: &str,
    rules: &[R],
    mut new_store: impl FnMut() -> S,
    kind: impl Fn(&S) -> &'static str,
    check: impl Fn(R, S) -> F,
) {
    let mut name = None;
    let mut failures = Vec::new();
    for &rule in rules {
        let store = new_store();
        name.get_or_insert(kind(&store));
        if let Err(panic) = catch(check(rule, store)).await {
            failures.push(message(panic));
        }
    }
    report(contract, name, rules.len(), &failures);
}

async fn catch(check: impl Future<Output = ()>) -> Result<(), Box<dyn Any + Send>> {
    AssertUnwindSafe(check).catch_unwind().await
}

fn message(panic: Box<dyn Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(s) => *s,
        Err(panic) => match panic.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "a rule panicked with a non-text payload".to_owned(),
        },
    }
}

#[track_caller]
fn report(contract: &str, kind: Option<&str>, rules: usize, failures: &[String]) {
    if failures.is_empty() {
        return;
    }
    panic!(
        "idem store conformance: store `{}` breaks {} of the {rules} {contract} rules:\n\n{}",
        kind.unwrap_or("?"),
        failures.len(),
        failures.join("\n\n")
    );
}
