//! The [`LeaseStore`] rules.

use std::collections::HashSet;
use std::time::Instant;

use super::check::{Check, LONG, SHORT, Shape, Want, claimed, key, keys, wait_until_expired};
use super::shared::{self, Probe, one_per_request};
use crate::store::{Claim, ClaimRequest, Claimed, LeaseStore};

/// One rule of the [`LeaseStore`] contract, checked by
/// [`lease_store`](super::lease_store) (all of them) or
/// [`LeaseRule::check`] (one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeaseRule {
    /// A claim of a free key answers `New` with a token no other claim got.
    NewClaimsHaveUniqueTokens,
    /// A completed key answers `Done` with the result it was completed with.
    DoneReturnsTheCachedResult,
    /// While a lease lives, its key answers `InProgress` (with a
    /// `retry_after` no longer than the lease).
    InProgressWhileTheLeaseLives,
    /// A lease that ran out (its holder crashed or is slow) is free: the
    /// next claim answers `New`, not before the lease ran out.
    ExpiredLeaseIsClaimableAgain,
    /// `release` deletes the lease only if it is the caller's (same token).
    ReleaseFreesOnlyOurOwnLease,
    /// A completion after the lease was lost to another consumer overwrites
    /// neither that consumer's lease nor its done-record.
    LostLeaseCompletionKeepsTheNewOwner,
    /// A completion whose lease ran out but whose key nobody claimed since
    /// still writes the done-record.
    LateCompletionOfAnUntakenKeyIsRecorded,
    /// A done-record is kept for `ttl` (forever when `None`), then the key is
    /// free again.
    DoneRecordsExpireAfterTtl,
    /// `Conflict` only when the record and the request both carry a
    /// fingerprint and they differ; `None` never conflicts.
    ConflictOnlyWhenBothFingerprintsDiffer,
    /// `claim_all`, `complete_all` and `release_all` agree with the single
    /// forms and answer in request order.
    BatchFormsAgreeAndKeepOrder,
    /// A key given twice in one `claim_all` is claimed once: `InProgress`
    /// for the later copy.
    KeyTwiceInOneBatch,
    /// `purge_expired(limit)` deletes at most `limit` records, only expired
    /// ones (or none, for stores whose records expire on their own).
    PurgeDeletesOnlyExpiredRecords,
    /// Records are per handler: the same key under two handler names is two
    /// independent records.
    RecordsArePerHandler,
}

impl LeaseRule {
    /// Every rule, in the order [`lease_store`](super::lease_store) checks them.
    pub const ALL: &'static [LeaseRule] = &[
        LeaseRule::NewClaimsHaveUniqueTokens,
        LeaseRule::DoneReturnsTheCachedResult,
        LeaseRule::InProgressWhileTheLeaseLives,
        LeaseRule::ExpiredLeaseIsClaimableAgain,
        LeaseRule::ReleaseFreesOnlyOurOwnLease,
        LeaseRule::LostLeaseCompletionKeepsTheNewOwner,
        LeaseRule::LateCompletionOfAnUntakenKeyIsRecorded,
        LeaseRule::DoneRecordsExpireAfterTtl,
        LeaseRule::ConflictOnlyWhenBothFingerprintsDiffer,
        LeaseRule::BatchFormsAgreeAndKeepOrder,
        LeaseRule::KeyTwiceInOneBatch,
        LeaseRule::PurgeDeletesOnlyExpiredRecords,
        LeaseRule::RecordsArePerHandler,
    ];

    fn text(self) -> (&'static str, &'static str, &'static str) {
        match self {
            LeaseRule::NewClaimsHaveUniqueTokens => (
                "unique-tokens",
                "a claim of a free key answers New with a token unique to this claim",
                "hand out a fresh token per claim (a counter or a random u64) and keep it in the lease: complete and release compare it",
            ),
            LeaseRule::DoneReturnsTheCachedResult => (
                "cached-result",
                "a completed key answers Done { cached } with the result it was completed with",
                "in complete(), store done.result with the done-record; in claim(), return it as Claim::Done { cached }",
            ),
            LeaseRule::InProgressWhileTheLeaseLives => (
                "in-progress",
                "while a lease lives, a claim of its key answers InProgress { retry_after <= lease }",
                "in claim(), answer Claim::InProgress for a lease whose expiry lies ahead, with the time it has left",
            ),
            LeaseRule::ExpiredLeaseIsClaimableAgain => (
                "expired-lease",
                "a lease that ran out is free: the next claim answers New with a new token, and not before the lease ran out",
                "in claim(), treat a lease whose expiry has passed like no record: take a new lease over it",
            ),
            LeaseRule::ReleaseFreesOnlyOurOwnLease => (
                "release-own",
                "release deletes the lease only if it is still the caller's (same token); another token, or a done-record, is left alone",
                "in release(), delete the record only when it is a lease whose token equals claimed.token",
            ),
            LeaseRule::LostLeaseCompletionKeepsTheNewOwner => (
                "lost-lease",
                "a completion after the lease ran out and another consumer claimed the key overwrites neither that consumer's lease nor its done-record",
                "in complete(), write the done-record only when the key holds the caller's own lease (same token) or no live record; leave another token's lease and any done-record alone (and return Ok: the handler ran twice, which a lease store cannot rule out)",
            ),
            LeaseRule::LateCompletionOfAnUntakenKeyIsRecorded => (
                "late-completion",
                "a completion whose lease ran out, but whose key nobody claimed since, still writes the done-record",
                "in complete(), accept the caller's own lease even after its expiry (or a missing record) and write the done-record",
            ),
            LeaseRule::DoneRecordsExpireAfterTtl => (
                "ttl",
                "a done-record answers Done for request.ttl (forever when None), then the key is free again",
                "in complete(), keep the done-record until now + done.request.ttl (no expiry for None); in claim(), treat an expired done-record like no record",
            ),
            LeaseRule::ConflictOnlyWhenBothFingerprintsDiffer => (
                "conflict",
                "Conflict { stored } only when the record and the request both carry a fingerprint and they differ; a None on either side never conflicts",
                "store request.fingerprint with the lease and the done-record, and decide with request.conflict_with(stored) before answering InProgress or Done",
            ),
            LeaseRule::BatchFormsAgreeAndKeepOrder => (
                "batch",
                "claim_all, complete_all and release_all answer as the single forms would, one answer per request, in request order",
                "keep the trait's default batch methods, or make the overrides answer request by request in order",
            ),
            LeaseRule::KeyTwiceInOneBatch => (
                "key-twice",
                "a key given twice in one claim_all is claimed once: New for the first copy, InProgress for the later one",
                "in claim_all(), let each request see the leases taken by the requests before it in the same call",
            ),
            LeaseRule::PurgeDeletesOnlyExpiredRecords => (
                "purge",
                "purge_expired(limit) deletes at most limit records and only expired ones (or none, when records expire on their own)",
                "in purge_expired(), delete only done-records whose ttl has passed, at most limit of them, and return how many",
            ),
            LeaseRule::RecordsArePerHandler => (
                "per-handler",
                "records are per (handler, key): the same key under two handler names is two independent records",
                "key every record by request.handler and request.key together",
            ),
        }
    }

    /// Checks this rule on `store` (fresh, or shared: each check writes its
    /// own records). Panics with the rule, what happened and the fix when
    /// the store breaks it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use idem_runtime::store::memory::MemoryStore;
    /// use idem_runtime::testing::conformance::LeaseRule;
    ///
    /// LeaseRule::ReleaseFreesOnlyOurOwnLease.check(MemoryStore::new()).await;
    /// # }
    /// ```
    pub async fn check<S: LeaseStore>(self, store: S) {
        let (slug, rule, fix) = self.text();
        let check = Check::new("LeaseStore", store.kind(), slug, rule, fix);
        let p = Lease {
            store: &store,
            check,
        };
        match self {
            LeaseRule::NewClaimsHaveUniqueTokens => new_claims_have_unique_tokens(&p).await,
            LeaseRule::DoneReturnsTheCachedResult => {
                shared::done_returns_the_cached_result(&p).await
            }
            LeaseRule::InProgressWhileTheLeaseLives => in_progress_while_the_lease_lives(&p).await,
            LeaseRule::ExpiredLeaseIsClaimableAgain => expired_lease_is_claimable_again(&p).await,
            LeaseRule::ReleaseFreesOnlyOurOwnLease => release_frees_only_our_own_lease(&p).await,
            LeaseRule::LostLeaseCompletionKeepsTheNewOwner => {
                lost_lease_keeps_the_new_owner(&p).await
            }
            LeaseRule::LateCompletionOfAnUntakenKeyIsRecorded => {
                late_completion_is_recorded(&p).await
            }
            LeaseRule::DoneRecordsExpireAfterTtl => shared::done_records_expire_after_ttl(&p).await,
            LeaseRule::ConflictOnlyWhenBothFingerprintsDiffer => {
                conflict_while_in_progress(&p).await;
                shared::conflict_only_when_both_fingerprints_differ(&p).await;
            }
            LeaseRule::BatchFormsAgreeAndKeepOrder => {
                batch_forms_agree_with_single_forms(&p).await;
                shared::batch_claims_keep_order(&p).await;
            }
            LeaseRule::KeyTwiceInOneBatch => shared::key_twice_in_one_call(&p).await,
            LeaseRule::PurgeDeletesOnlyExpiredRecords => {
                shared::records_for_purge(&p).await;
                let held = key("held");
                let r = p.check.req(&held, Shape::PLAIN);
                p.check.new_token("a first claim", &p.claim(&r).await);
                shared::purge_and_check(&p).await;
                p.check.expect(
                    "a claim of a live lease after purge_expired",
                    &p.claim(&r).await,
                    &Want::InProgress,
                );
            }
            LeaseRule::RecordsArePerHandler => {
                let check = Check::new("LeaseStore", store.kind(), slug, rule, fix);
                let other = Lease {
                    store: &store,
                    check,
                };
                shared::records_are_per_handler(&p, &other).await;
                // A lease under one handler does not hold the other's key.
                let k = key("leased");
                let mine = p.check.req(&k, Shape::PLAIN);
                p.check.new_token("a first claim", &p.claim(&mine).await);
                let theirs = other.check.req(&k, Shape::PLAIN);
                p.check.new_token(
                    "a claim of a key another handler holds a lease on",
                    &other.claim(&theirs).await,
                );
            }
        }
    }
}

super::check::rule_text!(LeaseRule);

/// A lease store under one check.
struct Lease<'s, S> {
    store: &'s S,
    check: Check,
}

impl<S: LeaseStore> Lease<'_, S> {
    async fn claim(&self, request: &ClaimRequest<'_>) -> Claim {
        self.check.call("claim()", self.store.claim(request)).await
    }

    async fn claim_all(&self, requests: &[ClaimRequest<'_>]) -> Vec<Claim> {
        let answers = self
            .check
            .call("claim_all()", self.store.claim_all(requests))
            .await;
        one_per_request(&self.check, "claim_all()", requests.len(), &answers);
        answers
    }

    async fn complete(&self, request: &ClaimRequest<'_>, token: u64, result: Option<&str>) {
        let done = claimed(request, token, result);
        self.check
            .call("complete()", self.store.complete(&done))
            .await;
    }

    async fn release(&self, request: &ClaimRequest<'_>, token: u64) {
        let c = claimed(request, token, None);
        self.check.call("release()", self.store.release(&c)).await;
    }

    /// The `New` answers of `requests`, as `Claimed`s.
    fn news<'a>(
        requests: &'a [ClaimRequest<'a>],
        answers: &[Claim],
        result: Option<&'a str>,
    ) -> Vec<Claimed<'a>> {
        requests
            .iter()
            .zip(answers)
            .filter_map(|(r, a)| match a {
                Claim::New { token } => Some(claimed(r, *token, result)),
                _ => None,
            })
            .collect()
    }
}

impl<S: LeaseStore> Probe for Lease<'_, S> {
    fn check(&self) -> &Check {
        &self.check
    }

    async fn claim_and_keep(
        &self,
        requests: &[ClaimRequest<'_>],
        result: Option<&str>,
    ) -> Vec<Claim> {
        let answers = self.claim_all(requests).await;
        let done = Self::news(requests, &answers, result);
        self.check
            .call("complete_all()", self.store.complete_all(&done))
            .await;
        answers
    }

    async fn claim_and_give_back(&self, requests: &[ClaimRequest<'_>]) -> Vec<Claim> {
        let answers = self.claim_all(requests).await;
        let taken = Self::news(requests, &answers, None);
        self.check
            .call("release_all()", self.store.release_all(&taken))
            .await;
        answers
    }

    async fn purge(&self, limit: u32) -> u64 {
        self.check
            .call("purge_expired()", self.store.purge_expired(limit))
            .await
    }
}

async fn new_claims_have_unique_tokens<S: LeaseStore>(p: &Lease<'_, S>) {
    let c = &p.check;
    let ks = keys("token", 8);
    let requests: Vec<_> = ks.iter().map(|k| c.req(k, Shape::PLAIN)).collect();
    let mut seen = HashSet::new();
    let mut unique = |token: u64, how: &str| {
        if !seen.insert(token) {
            c.fail(format_args!(
                "{how} answered New with token {token}, which an earlier claim got too"
            ));
        }
    };
    for r in &requests[..4] {
        let t = c.new_token("a first claim of a free key", &p.claim(r).await);
        unique(t, "a claim of a free key");
    }
    for a in p.claim_all(&requests[4..]).await {
        let t = c.new_token("claim_all() of free keys", &a);
        unique(t, "claim_all() of free keys");
    }
    // A key released and claimed again gets a new token: the old one must
    // not release or complete the new lease.
    let k = key("again");
    let again = c.req(&k, Shape::PLAIN);
    let t = c.new_token("a first claim of a free key", &p.claim(&again).await);
    unique(t, "a claim of a free key");
    p.release(&again, t).await;
    let t = c.new_token("a claim of a released key", &p.claim(&again).await);
    unique(t, "a claim of a released key");
}

async fn in_progress_while_the_lease_lives<S: LeaseStore>(p: &Lease<'_, S>) {
    let c = &p.check;
    let k = key("leased");
    let r = c.req(&k, Shape::PLAIN);
    let t = c.new_token("a first claim of a free key", &p.claim(&r).await);
    for how in [
        "a claim of a key under a live 1 h lease",
        "a second claim of it",
    ] {
        match p.claim(&r).await {
            Claim::InProgress { retry_after } if retry_after <= LONG => {}
            Claim::InProgress { retry_after } => c.fail(format_args!(
                "{how}: answered InProgress {{ retry_after: {retry_after:?} }}, longer than the {LONG:?} lease"
            )),
            other => c.fail(format_args!("{how}: claim answered {other:?}, expected InProgress")),
        }
    }
    // claim_all sees the lease too.
    let answers = p.claim_all(std::slice::from_ref(&r)).await;
    c.expect(
        "claim_all() of a key under a live lease",
        &answers[0],
        &Want::InProgress,
    );
    p.complete(&r, t, None).await;
    c.expect(
        "a claim after the holder completed",
        &p.claim(&r).await,
        &Want::Done(None),
    );
}

async fn expired_lease_is_claimable_again<S: LeaseStore>(p: &Lease<'_, S>) {
    let c = &p.check;
    let k = key("expiring-lease");
    let short = c.req(&k, Shape::PLAIN.lease(SHORT));
    let started = Instant::now();
    let first = c.new_token("a first claim of a free key", &p.claim(&short).await);
    let r = c.req(&k, Shape::PLAIN);
    let what = format!("a lease of {SHORT:?}");
    let claim =
        wait_until_expired(c, &what, started, SHORT, Want::InProgress, || p.claim(&r)).await;
    let second = c.new_token("a claim after the lease ran out", &claim);
    if second == first {
        c.fail(format_args!(
            "the claim that took over an expired lease got the expired lease's token {first}: the late holder could release or complete it"
        ));
    }
    c.expect(
        "a claim of the taken-over key",
        &p.claim(&r).await,
        &Want::InProgress,
    );
    p.complete(&r, second, None).await;
    c.expect(
        "a claim after the new holder completed",
        &p.claim(&r).await,
        &Want::Done(None),
    );
}

async fn release_frees_only_our_own_lease<S: LeaseStore>(p: &Lease<'_, S>) {
    let c = &p.check;
    let k = key("released");
    let r = c.req(&k, Shape::PLAIN);
    let t = c.new_token("a first claim of a free key", &p.claim(&r).await);
    p.release(&r, t.wrapping_add(1)).await;
    c.expect(
        format_args!(
            "after release() with token {} of a lease taken with token {t}",
            t.wrapping_add(1)
        ),
        &p.claim(&r).await,
        &Want::InProgress,
    );
    p.release(&r, t).await;
    let t2 = c.new_token(
        "after release() with the lease's own token (the key must be free at once)",
        &p.claim(&r).await,
    );
    // A stale release (the old token) does not free the new lease.
    p.release(&r, t).await;
    c.expect(
        "after a second release() with the first, already released token",
        &p.claim(&r).await,
        &Want::InProgress,
    );
    p.complete(&r, t2, Some("kept")).await;
    // A release after completion (a retried failure path) keeps the record.
    p.release(&r, t2).await;
    c.expect(
        "after release() of a key its holder had completed",
        &p.claim(&r).await,
        &Want::Done(Some("kept")),
    );
    // The batch form too.
    let ks = keys("released-batch", 2);
    let requests: Vec<_> = ks.iter().map(|k| c.req(k, Shape::PLAIN)).collect();
    let answers = p.claim_all(&requests).await;
    let t0 = c.new_token("claim_all() of free keys", &answers[0]);
    let t1 = c.new_token("claim_all() of free keys", &answers[1]);
    let give_back = [
        claimed(&requests[0], t0, None),
        claimed(&requests[1], t1.wrapping_add(1), None),
    ];
    c.call("release_all()", p.store.release_all(&give_back))
        .await;
    c.new_token(
        "after release_all() with the lease's own token",
        &p.claim(&requests[0]).await,
    );
    c.expect(
        "after release_all() with another token than the lease's",
        &p.claim(&requests[1]).await,
        &Want::InProgress,
    );
}

/// Waits for a `SHORT` lease taken at `started` to run out, by claiming
/// `r` until it answers `New`; returns that claim's token.
async fn take_over<S: LeaseStore>(p: &Lease<'_, S>, started: Instant, r: &ClaimRequest<'_>) -> u64 {
    let what = format!("a lease of {SHORT:?}");
    let claim = wait_until_expired(&p.check, &what, started, SHORT, Want::InProgress, || {
        p.claim(r)
    })
    .await;
    p.check.new_token("a claim after the lease ran out", &claim)
}

async fn lost_lease_keeps_the_new_owner<S: LeaseStore>(p: &Lease<'_, S>) {
    let c = &p.check;
    let k = key("overtaken");
    let a = c.req(&k, Shape::PLAIN.lease(SHORT));
    let started = Instant::now();
    let ta = c.new_token("consumer A's claim of a free key", &p.claim(&a).await);
    let b = c.req(&k, Shape::PLAIN);
    let tb = take_over(p, started, &b).await;

    p.complete(&a, ta, Some(r#""from a""#)).await;
    c.expect(
        "consumer A's lease ran out and B claimed the key; then A called complete(), and a claim",
        &p.claim(&b).await,
        &Want::InProgress,
    );
    p.release(&a, ta).await;
    c.expect(
        "after A (whose lease B took over) called release(), a claim",
        &p.claim(&b).await,
        &Want::InProgress,
    );
    p.complete(&b, tb, Some(r#""from b""#)).await;
    c.expect(
        "after B completed, a claim",
        &p.claim(&b).await,
        &Want::Done(Some(r#""from b""#)),
    );
    p.complete(&a, ta, Some(r#""from a""#)).await;
    c.expect(
        "after B completed, A (whose lease B took over) completed again; a claim",
        &p.claim(&b).await,
        &Want::Done(Some(r#""from b""#)),
    );
}

async fn late_completion_is_recorded<S: LeaseStore>(p: &Lease<'_, S>) {
    let c = &p.check;
    let k = key("late");
    let late = c.req(&k, Shape::PLAIN.lease(SHORT));
    let t = c.new_token("a first claim of a free key", &p.claim(&late).await);
    // A sentinel leased after it runs out after it: once the sentinel is
    // free, so is the late key, which nobody claimed meanwhile.
    let s = key("sentinel");
    let sentinel = c.req(&s, Shape::PLAIN.lease(SHORT));
    let started = Instant::now();
    c.new_token("a first claim of a free key", &p.claim(&sentinel).await);
    take_over(p, started, &c.req(&s, Shape::PLAIN)).await;
    p.complete(&late, t, Some("late")).await;
    c.expect(
        "a lease ran out, nobody claimed its key, then its holder completed; a claim",
        &p.claim(&c.req(&k, Shape::PLAIN)).await,
        &Want::Done(Some("late")),
    );
}

async fn conflict_while_in_progress<S: LeaseStore>(p: &Lease<'_, S>) {
    let c = &p.check;
    let k = key("fingerprinted-lease");
    let r = c.req(&k, Shape::PLAIN.fingerprint(1));
    let t = c.new_token("a first claim with fingerprint 1", &p.claim(&r).await);
    let cases = [
        (
            Shape::PLAIN.fingerprint(2),
            Want::Conflict(1),
            "with fingerprint 2",
        ),
        (
            Shape::PLAIN.fingerprint(1),
            Want::InProgress,
            "with the same fingerprint",
        ),
        (
            Shape::PLAIN,
            Want::InProgress,
            "without fingerprint (None never conflicts)",
        ),
    ];
    for (shape, want, how) in cases {
        c.expect(
            format_args!("a claim of a key leased with fingerprint 1, {how}"),
            &p.claim(&c.req(&k, shape)).await,
            &want,
        );
    }
    p.complete(&r, t, None).await;
}

async fn batch_forms_agree_with_single_forms<S: LeaseStore>(p: &Lease<'_, S>) {
    let c = &p.check;
    let answers = p.claim_all(&[]).await;
    one_per_request(c, "claim_all()", 0, &answers);
    c.call("complete_all()", p.store.complete_all(&[])).await;
    c.call("release_all()", p.store.release_all(&[])).await;

    // Five keys in five states, claimed one by one and in one call.
    let ks = keys("states", 5);
    let done = c.req(&ks[1], Shape::PLAIN);
    let t = c.new_token("a first claim", &p.claim(&done).await);
    p.complete(&done, t, Some("9")).await;
    let held = c.req(&ks[2], Shape::PLAIN);
    c.new_token("a first claim", &p.claim(&held).await);
    let conflicting = c.req(&ks[3], Shape::PLAIN.fingerprint(3));
    let t = c.new_token("a first claim", &p.claim(&conflicting).await);
    p.complete(&conflicting, t, None).await;
    let requests = [
        c.req(&ks[0], Shape::PLAIN),
        c.req(&ks[1], Shape::PLAIN),
        c.req(&ks[2], Shape::PLAIN),
        c.req(&ks[3], Shape::PLAIN.fingerprint(4)),
        c.req(&ks[4], Shape::PLAIN),
    ];
    let wants = [
        Want::New,
        Want::Done(Some("9")),
        Want::InProgress,
        Want::Conflict(3),
        Want::New,
    ];
    let answers = p.claim_all(&requests).await;
    for (i, (a, want)) in answers.iter().zip(&wants).enumerate() {
        c.expect(
            format_args!(
                "claim_all() of [free, done, leased, conflicting, free] keys, answer #{i}"
            ),
            a,
            want,
        );
    }
    // complete_all completes each, release_all releases each.
    let news = Lease::<S>::news(&requests, &answers, Some("10"));
    c.call("complete_all()", p.store.complete_all(&news[..1]))
        .await;
    c.call("release_all()", p.store.release_all(&news[1..]))
        .await;
    c.expect(
        "a claim of a key completed by complete_all()",
        &p.claim(&requests[0]).await,
        &Want::Done(Some("10")),
    );
    c.new_token(
        "a claim of a key released by release_all()",
        &p.claim(&requests[4]).await,
    );
    for (i, r) in requests[1..4].iter().enumerate() {
        c.expect(
            format_args!("a single claim of key #{} after claim_all()", i + 1),
            &p.claim(r).await,
            &wants[i + 1],
        );
    }
}
