//! The [`TxStore`] rules.

use std::sync::Arc;
use std::time::Duration;

use super::check::{CALL, Check, Shape, Want, claimed, key, keys};
use super::shared::{self, Probe, one_per_request};
use crate::key::Key;
use crate::store::{Claim, ClaimRequest, Claimed, TxStore};

/// How long a claim of a key another transaction holds must keep waiting
/// before that transaction ends. A store that answers earlier (a claim that
/// does not wait for the row lock) answers within a round trip; one that
/// waits passes however long this is.
const STILL_WAITING: Duration = Duration::from_millis(300);

/// One rule of the [`TxStore`] contract, checked by
/// [`tx_store`](super::tx_store) (all of them) or [`TxRule::check`] (one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TxRule {
    /// A claim of a free key answers `New`; once committed, `Done` with the
    /// result the commit saved.
    CommittedClaimIsDoneWithTheCachedResult,
    /// A rollback undoes the claim: the key is free again.
    RollbackUndoesTheClaim,
    /// A claim of a key another transaction claimed waits for it, and then
    /// answers `Done` if that transaction committed.
    ConcurrentClaimWaitsThenSeesTheCommit,
    /// … and `New` if it rolled back.
    ConcurrentClaimWaitsThenSeesTheRollback,
    /// A savepoint keeps (`keep = true`) or undoes its claims.
    SavepointsKeepOrUndoTheirClaims,
    /// `unclaim` inside a transaction that still commits frees those keys;
    /// the others commit.
    UnclaimInACommittingTransaction,
    /// A done-record is kept for `ttl` (forever when `None`), then the key is
    /// free again.
    DoneRecordsExpireAfterTtl,
    /// `Conflict` only when the record and the request both carry a
    /// fingerprint and they differ; `None` never conflicts.
    ConflictOnlyWhenBothFingerprintsDiffer,
    /// One claim call answers once per request, in request order.
    BatchClaimsKeepOrder,
    /// A key given twice in one claim call is claimed once: `InProgress` for
    /// the later copy.
    KeyTwiceInOneCall,
    /// `purge_expired(limit)` deletes at most `limit` records, only expired
    /// ones (or none, for stores whose records expire on their own).
    PurgeDeletesOnlyExpiredRecords,
    /// Records are per handler: the same key under two handler names is two
    /// independent records.
    RecordsArePerHandler,
}

impl TxRule {
    /// Every rule, in the order [`tx_store`](super::tx_store) checks them.
    pub const ALL: &'static [TxRule] = &[
        TxRule::CommittedClaimIsDoneWithTheCachedResult,
        TxRule::RollbackUndoesTheClaim,
        TxRule::ConcurrentClaimWaitsThenSeesTheCommit,
        TxRule::ConcurrentClaimWaitsThenSeesTheRollback,
        TxRule::SavepointsKeepOrUndoTheirClaims,
        TxRule::UnclaimInACommittingTransaction,
        TxRule::DoneRecordsExpireAfterTtl,
        TxRule::ConflictOnlyWhenBothFingerprintsDiffer,
        TxRule::BatchClaimsKeepOrder,
        TxRule::KeyTwiceInOneCall,
        TxRule::PurgeDeletesOnlyExpiredRecords,
        TxRule::RecordsArePerHandler,
    ];

    fn text(self) -> (&'static str, &'static str, &'static str) {
        match self {
            TxRule::CommittedClaimIsDoneWithTheCachedResult => (
                "cached-result",
                "a claim of a free key answers New; after commit, a claim answers Done { cached } with the result commit saved",
                "in claim(), insert the record inside the transaction; in commit(), save each done.result with its record before committing",
            ),
            TxRule::RollbackUndoesTheClaim => (
                "rollback",
                "rollback undoes everything since begin, the claims included: the key is free again",
                "write the claim through the transaction (never through another connection or in autocommit)",
            ),
            TxRule::ConcurrentClaimWaitsThenSeesTheCommit => (
                "waits-commit",
                "a claim of a key that another open transaction claimed waits for that transaction, then answers Done once it committed (never New, never Done before the commit)",
                "claim with a statement that blocks on the other transaction's row lock (INSERT … ON CONFLICT on the primary key) and reads the committed row after it, in READ COMMITTED",
            ),
            TxRule::ConcurrentClaimWaitsThenSeesTheRollback => (
                "waits-rollback",
                "a claim of a key that another open transaction claimed waits for that transaction, then answers New once it rolled back",
                "claim with a statement that blocks on the other transaction's row lock and inserts the row once the lock is released without a row",
            ),
            TxRule::SavepointsKeepOrUndoTheirClaims => (
                "savepoints",
                "end_savepoint(keep = true) keeps the savepoint's claims in the transaction, keep = false undoes them",
                "open a real savepoint (SAVEPOINT / RELEASE / ROLLBACK TO) and claim through it",
            ),
            TxRule::UnclaimInACommittingTransaction => (
                "unclaim",
                "unclaim deletes the given claims inside a transaction that then commits: those keys are free, the others are done",
                "in unclaim(), delete the records of the given (handler, key)s through the transaction",
            ),
            TxRule::DoneRecordsExpireAfterTtl => (
                "ttl",
                "a committed record answers Done for request.ttl (forever when None), then the key is free again",
                "store an expiry of claim time + request.ttl (none for None); in claim(), take over a record whose expiry has passed",
            ),
            TxRule::ConflictOnlyWhenBothFingerprintsDiffer => (
                "conflict",
                "Conflict { stored } only when the record and the request both carry a fingerprint and they differ; a None on either side never conflicts",
                "store request.fingerprint with the record (Fingerprint::stored) and decide with request.conflict_with(stored)",
            ),
            TxRule::BatchClaimsKeepOrder => (
                "batch",
                "one claim call answers once per request, in request order",
                "return the answers in the order of the requests (ORDER BY the requests' ordinal)",
            ),
            TxRule::KeyTwiceInOneCall => (
                "key-twice",
                "a key given twice in one claim call is claimed once: New for the first copy, InProgress for the later one",
                "in claim(), answer Claim::InProgress for a request whose (handler, key) an earlier request of the same call claimed",
            ),
            TxRule::PurgeDeletesOnlyExpiredRecords => (
                "purge",
                "purge_expired(limit) deletes at most limit records and only expired ones (or none, when records expire on their own)",
                "in purge_expired(), delete only records whose expiry has passed, at most limit of them, and return how many",
            ),
            TxRule::RecordsArePerHandler => (
                "per-handler",
                "records are per (handler, key): the same key under two handler names is two independent records",
                "make (handler, key) the record's primary key",
            ),
        }
    }

    /// Checks this rule on `store` (fresh, or shared: each check writes its
    /// own records). Panics with the rule, what happened and the fix when
    /// the store breaks it.
    pub async fn check<S: TxStore>(self, store: S) {
        let (slug, rule, fix) = self.text();
        let kind = store.kind();
        let store = Arc::new(store);
        let p = Tx {
            store: store.clone(),
            check: Check::new("TxStore", kind, slug, rule, fix),
        };
        match self {
            TxRule::CommittedClaimIsDoneWithTheCachedResult => {
                shared::done_returns_the_cached_result(&p).await
            }
            TxRule::RollbackUndoesTheClaim => rollback_undoes_the_claim(&p).await,
            TxRule::ConcurrentClaimWaitsThenSeesTheCommit => concurrent_claim_waits(&p, true).await,
            TxRule::ConcurrentClaimWaitsThenSeesTheRollback => {
                concurrent_claim_waits(&p, false).await
            }
            TxRule::SavepointsKeepOrUndoTheirClaims => savepoints_keep_or_undo(&p).await,
            TxRule::UnclaimInACommittingTransaction => unclaim_then_commit(&p).await,
            TxRule::DoneRecordsExpireAfterTtl => shared::done_records_expire_after_ttl(&p).await,
            TxRule::ConflictOnlyWhenBothFingerprintsDiffer => {
                shared::conflict_only_when_both_fingerprints_differ(&p).await
            }
            TxRule::BatchClaimsKeepOrder => shared::batch_claims_keep_order(&p).await,
            TxRule::KeyTwiceInOneCall => shared::key_twice_in_one_call(&p).await,
            TxRule::PurgeDeletesOnlyExpiredRecords => {
                shared::records_for_purge(&p).await;
                shared::purge_and_check(&p).await;
            }
            TxRule::RecordsArePerHandler => {
                let other = Tx {
                    store,
                    check: Check::new("TxStore", kind, slug, rule, fix),
                };
                shared::records_are_per_handler(&p, &other).await;
            }
        }
    }
}

super::check::rule_text!(TxRule);

/// A transactional store under one check.
struct Tx<S> {
    store: Arc<S>,
    check: Check,
}

impl<S: TxStore> Tx<S> {
    async fn begin(&self) -> S::Tx<'static> {
        self.check.call("begin()", self.store.begin()).await
    }

    async fn claim(&self, tx: &mut S::Tx<'_>, requests: &[ClaimRequest<'_>]) -> Vec<Claim> {
        let answers = self
            .check
            .call("claim()", self.store.claim(tx, requests))
            .await;
        one_per_request(&self.check, "claim()", requests.len(), &answers);
        answers
    }

    async fn commit(&self, tx: S::Tx<'static>, done: &[Claimed<'_>]) {
        self.check
            .call("commit()", self.store.commit(tx, done))
            .await;
    }

    async fn rollback(&self, tx: S::Tx<'static>) {
        self.check.call("rollback()", self.store.rollback(tx)).await;
    }

    /// Claims one request in a transaction of its own and rolls it back.
    async fn peek(&self, request: &ClaimRequest<'_>) -> Claim {
        self.claim_and_give_back(std::slice::from_ref(request))
            .await
            .remove(0)
    }
}

impl<S: TxStore> Probe for Tx<S> {
    fn check(&self) -> &Check {
        &self.check
    }

    async fn claim_and_keep(
        &self,
        requests: &[ClaimRequest<'_>],
        result: Option<&str>,
    ) -> Vec<Claim> {
        let mut tx = self.begin().await;
        let answers = self.claim(&mut tx, requests).await;
        let done: Vec<_> = requests
            .iter()
            .zip(&answers)
            .filter(|(_, a)| matches!(a, Claim::New { .. }))
            .map(|(r, _)| claimed(r, 0, result))
            .collect();
        self.commit(tx, &done).await;
        answers
    }

    async fn claim_and_give_back(&self, requests: &[ClaimRequest<'_>]) -> Vec<Claim> {
        let mut tx = self.begin().await;
        let answers = self.claim(&mut tx, requests).await;
        self.rollback(tx).await;
        answers
    }

    async fn purge(&self, limit: u32) -> u64 {
        self.check
            .call("purge_expired()", self.store.purge_expired(limit))
            .await
    }
}

async fn rollback_undoes_the_claim<S: TxStore>(p: &Tx<S>) {
    let c = &p.check;
    let k = key("rolled-back");
    let r = c.req(&k, Shape::PLAIN);
    let mut tx = p.begin().await;
    let a = p.claim(&mut tx, std::slice::from_ref(&r)).await;
    c.new_token("a first claim of a free key", &a[0]);
    p.rollback(tx).await;
    let mut tx = p.begin().await;
    let a = p.claim(&mut tx, std::slice::from_ref(&r)).await;
    c.new_token("a claim of a key whose claim was rolled back", &a[0]);
    p.commit(tx, &[claimed(&r, 0, None)]).await;
    c.expect("a claim after commit", &p.peek(&r).await, &Want::Done(None));
}

/// Aborts the task when dropped, so that a failing rule does not leave a
/// claim waiting in the background.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn concurrent_claim_waits<S: TxStore>(p: &Tx<S>, commit: bool) {
    let c = &p.check;
    let name = if commit {
        "waits-for-commit"
    } else {
        "waits-for-rollback"
    };
    let k = key(name);
    let r = c.req(&k, Shape::PLAIN);
    let mut first = p.begin().await;
    let a = p.claim(&mut first, std::slice::from_ref(&r)).await;
    c.new_token("a first claim of a free key", &a[0]);

    // The other consumer, on its own transaction.
    let (store, handler) = (p.store.clone(), c.handler.clone());
    let mut second = AbortOnDrop(tokio::spawn(async move {
        let k = Key::new(name).expect("non-empty key");
        let r = Shape::PLAIN.request(&handler, &k);
        let mut tx = store.begin().await?;
        let answers = store.claim(&mut tx, std::slice::from_ref(&r)).await;
        let answers = match answers {
            Ok(a) => a,
            Err(e) => {
                let _ = store.rollback(tx).await;
                return Err(e);
            }
        };
        // Commit what it claimed: after a rollback of the first, this
        // consumer runs the handler and its record must stick.
        let done: Vec<_> = answers
            .iter()
            .filter(|a| matches!(a, Claim::New { .. }))
            .map(|_| claimed(&r, 0, Some("second")))
            .collect();
        store.commit(tx, &done).await?;
        Ok(answers)
    }));
    if let Ok(early) = tokio::time::timeout(STILL_WAITING, &mut second.0).await {
        let answered = match early {
            Ok(Ok(a)) => format!("{a:?}"),
            Ok(Err(e)) => format!("an error: {e}"),
            Err(e) => format!("a panic: {e}"),
        };
        c.fail(format_args!(
            "while one transaction held an uncommitted claim of a key, a claim of the same key from another transaction answered {answered} without waiting for it"
        ));
    }
    if commit {
        p.commit(first, &[claimed(&r, 0, Some("first"))]).await;
    } else {
        p.rollback(first).await;
    }
    let outcome = if commit { "committed" } else { "rolled back" };
    let answers = match tokio::time::timeout(CALL, &mut second.0).await {
        Err(_) => c.fail(format_args!(
            "the first transaction {outcome}, but the claim waiting on it did not answer within {CALL:?}"
        )),
        Ok(Err(e)) => c.fail(format_args!("the waiting claim panicked: {e}")),
        Ok(Ok(Err(e))) => c.fail(format_args!("the waiting claim returned an error: {e}")),
        Ok(Ok(Ok(answers))) => answers,
    };
    one_per_request(c, "claim()", 1, &answers);
    let (want, after) = if commit {
        (Want::Done(Some("first")), Want::Done(Some("first")))
    } else {
        (Want::New, Want::Done(Some("second")))
    };
    c.expect(
        format_args!("the claim that waited for the other transaction, once that one {outcome}"),
        &answers[0],
        &want,
    );
    c.expect(
        "a claim after both transactions ended",
        &p.peek(&r).await,
        &after,
    );
}

async fn savepoints_keep_or_undo<S: TxStore>(p: &Tx<S>) {
    let c = &p.check;
    let ks = keys("savepoint", 2);
    let (undone, kept) = (c.req(&ks[0], Shape::PLAIN), c.req(&ks[1], Shape::PLAIN));
    let mut tx = p.begin().await;
    {
        let mut sp = c.call("savepoint()", p.store.savepoint(&mut tx)).await;
        let a = p.claim(&mut sp, std::slice::from_ref(&undone)).await;
        c.new_token("a claim of a free key in a savepoint", &a[0]);
        c.call(
            "end_savepoint(keep = false)",
            p.store.end_savepoint(sp, false),
        )
        .await;
    }
    {
        let mut sp = c.call("savepoint()", p.store.savepoint(&mut tx)).await;
        let a = p.claim(&mut sp, std::slice::from_ref(&kept)).await;
        c.new_token("a claim of a free key in a savepoint", &a[0]);
        c.call(
            "end_savepoint(keep = true)",
            p.store.end_savepoint(sp, true),
        )
        .await;
    }
    p.commit(tx, &[claimed(&kept, 0, None)]).await;
    c.expect(
        "after commit, a claim of the key claimed in an undone savepoint",
        &p.peek(&undone).await,
        &Want::New,
    );
    c.expect(
        "after commit, a claim of the key claimed in a kept savepoint",
        &p.peek(&kept).await,
        &Want::Done(None),
    );
    // An undone claim is gone inside its transaction too: the batch retry
    // claims the key again there.
    let k = key("savepoint-again");
    let again = c.req(&k, Shape::PLAIN);
    let mut tx = p.begin().await;
    {
        let mut sp = c.call("savepoint()", p.store.savepoint(&mut tx)).await;
        let a = p.claim(&mut sp, std::slice::from_ref(&again)).await;
        c.new_token("a claim of a free key in a savepoint", &a[0]);
        c.call(
            "end_savepoint(keep = false)",
            p.store.end_savepoint(sp, false),
        )
        .await;
    }
    let a = p.claim(&mut tx, std::slice::from_ref(&again)).await;
    c.new_token(
        "in the same transaction, a claim of the key an undone savepoint had claimed",
        &a[0],
    );
    p.rollback(tx).await;
}

async fn unclaim_then_commit<S: TxStore>(p: &Tx<S>) {
    let c = &p.check;
    let ks = keys("unclaimed", 3);
    let requests: Vec<_> = ks.iter().map(|k| c.req(k, Shape::PLAIN)).collect();
    let mut tx = p.begin().await;
    let answers = p.claim(&mut tx, &requests).await;
    for a in &answers {
        c.new_token("a claim of free keys", a);
    }
    let failed = [
        claimed(&requests[0], 0, None),
        claimed(&requests[2], 0, None),
    ];
    c.call("unclaim()", p.store.unclaim(&mut tx, &failed)).await;
    p.commit(tx, &[claimed(&requests[1], 0, Some("ok"))]).await;
    for i in [0, 2] {
        c.expect(
            format_args!("after unclaim() of key #{i} and commit, a claim of it"),
            &p.peek(&requests[i]).await,
            &Want::New,
        );
    }
    c.expect(
        "after commit, a claim of the key that was not unclaimed",
        &p.peek(&requests[1]).await,
        &Want::Done(Some("ok")),
    );
}
