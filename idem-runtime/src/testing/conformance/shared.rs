//! The rules both store traits share (`TxStore::claim` "answers as for
//! `LeaseStore`"), written once over [`Probe`]: claim in one call, then
//! keep (complete / commit) or give back (release / roll back) what was
//! claimed.

use std::future::Future;
use std::time::Instant;

use super::check::{Check, LONG, SHORT, Shape, Want, key, keys, wait_until_expired};
use crate::store::{Claim, ClaimRequest};

/// One store, seen through the two things every store does.
pub(super) trait Probe {
    fn check(&self) -> &Check;

    /// Claims `requests` in one call, then keeps the `New` ones as done
    /// with `result` cached (complete / commit). Returns the answers.
    fn claim_and_keep(
        &self,
        requests: &[ClaimRequest<'_>],
        result: Option<&str>,
    ) -> impl Future<Output = Vec<Claim>>;

    /// Claims `requests` in one call, then gives back the `New` ones
    /// (release / roll back): what a claim answers now, leaving no trace.
    fn claim_and_give_back(
        &self,
        requests: &[ClaimRequest<'_>],
    ) -> impl Future<Output = Vec<Claim>>;

    /// `purge_expired(limit)`.
    fn purge(&self, limit: u32) -> impl Future<Output = u64>;
}

/// One request's answer.
async fn peek<P: Probe>(p: &P, request: &ClaimRequest<'_>) -> Claim {
    let mut answers = p.claim_and_give_back(std::slice::from_ref(request)).await;
    answers.remove(0)
}

/// Claims and keeps one request; returns its answer.
async fn keep<P: Probe>(p: &P, request: &ClaimRequest<'_>, result: Option<&str>) -> Claim {
    let mut answers = p
        .claim_and_keep(std::slice::from_ref(request), result)
        .await;
    answers.remove(0)
}

/// Checks that a call answered once per request.
pub(super) fn one_per_request(check: &Check, call: &str, asked: usize, answers: &[Claim]) {
    if answers.len() != asked {
        check.fail(format_args!(
            "{call} with {asked} requests answered {} claims: {answers:?}",
            answers.len()
        ));
    }
}

pub(super) async fn done_returns_the_cached_result<P: Probe>(p: &P) {
    let c = p.check();
    let (with, without) = (key("with-result"), key("without-result"));
    let r = c.req(&with, Shape::PLAIN);
    c.new_token(
        "a first claim of a free key",
        &keep(p, &r, Some(r#"{"receipt":7}"#)).await,
    );
    for n in [
        "a claim after completion",
        "a second claim after completion",
    ] {
        c.expect(n, &peek(p, &r).await, &Want::Done(Some(r#"{"receipt":7}"#)));
    }
    let r = c.req(&without, Shape::PLAIN);
    c.new_token("a first claim of a free key", &keep(p, &r, None).await);
    c.expect(
        "a claim after a completion without result",
        &peek(p, &r).await,
        &Want::Done(None),
    );
}

pub(super) async fn conflict_only_when_both_fingerprints_differ<P: Probe>(p: &P) {
    let c = p.check();
    let k = key("fingerprinted");
    let first = c.req(&k, Shape::PLAIN.fingerprint(1));
    c.new_token(
        "a first claim with fingerprint 1",
        &keep(p, &first, None).await,
    );
    let cases = [
        (
            Shape::PLAIN.fingerprint(2),
            Want::Conflict(1),
            "with fingerprint 2",
        ),
        (
            Shape::PLAIN.fingerprint(1),
            Want::Done(None),
            "with the same fingerprint",
        ),
        (
            Shape::PLAIN,
            Want::Done(None),
            "without fingerprint (None never conflicts)",
        ),
    ];
    for (shape, want, how) in cases {
        let r = c.req(&k, shape);
        c.expect(
            format_args!("a claim of a key done with fingerprint 1, {how}"),
            &peek(p, &r).await,
            &want,
        );
    }
    // A record written without fingerprint (conflict detection off, or a
    // record from before it was turned on) conflicts with nothing.
    let k = key("unfingerprinted");
    let r = c.req(&k, Shape::PLAIN);
    c.new_token(
        "a first claim without fingerprint",
        &keep(p, &r, None).await,
    );
    let r = c.req(&k, Shape::PLAIN.fingerprint(2));
    c.expect(
        "a claim with fingerprint 2 of a key done without fingerprint",
        &peek(p, &r).await,
        &Want::Done(None),
    );
}

pub(super) async fn done_records_expire_after_ttl<P: Probe>(p: &P) {
    let c = p.check();
    let (long, forever, short) = (key("ttl-long"), key("ttl-none"), key("ttl-short"));
    let r = c.req(&long, Shape::PLAIN.ttl(Some(LONG)));
    c.new_token("a first claim", &keep(p, &r, None).await);
    c.expect(
        "a claim of a record with a 1 h ttl",
        &peek(p, &r).await,
        &Want::Done(None),
    );
    let r = c.req(&forever, Shape::PLAIN.ttl(None));
    c.new_token("a first claim", &keep(p, &r, None).await);
    c.expect(
        "a claim of a record kept forever (ttl None)",
        &peek(p, &r).await,
        &Want::Done(None),
    );

    let r = c.req(&short, Shape::PLAIN.ttl(Some(SHORT)));
    let started = Instant::now();
    c.new_token("a first claim", &keep(p, &r, None).await);
    let what = format!("a done-record with ttl {SHORT:?}");
    wait_until_expired(c, &what, started, SHORT, Want::Done(None), || peek(p, &r)).await;

    let r = c.req(&long, Shape::PLAIN.ttl(Some(LONG)));
    c.expect(
        "a claim of the 1 h record after another record expired",
        &peek(p, &r).await,
        &Want::Done(None),
    );
}

pub(super) async fn batch_claims_keep_order<P: Probe>(p: &P) {
    let c = p.check();
    let answers = p.claim_and_give_back(&[]).await;
    one_per_request(c, "a claim", 0, &answers);
    // Keys in four states, answered in request order.
    let ks = keys("batch", 4);
    let done = c.req(&ks[1], Shape::PLAIN);
    c.new_token("a first claim", &keep(p, &done, Some("1")).await);
    let conflicting = c.req(&ks[3], Shape::PLAIN.fingerprint(5));
    c.new_token("a first claim", &keep(p, &conflicting, None).await);
    let requests = [
        c.req(&ks[0], Shape::PLAIN),
        c.req(&ks[1], Shape::PLAIN),
        c.req(&ks[2], Shape::PLAIN),
        c.req(&ks[3], Shape::PLAIN.fingerprint(6)),
    ];
    let wants = [
        Want::New,
        Want::Done(Some("1")),
        Want::New,
        Want::Conflict(5),
    ];
    let answers = p.claim_and_give_back(&requests).await;
    one_per_request(c, "a claim", requests.len(), &answers);
    for (i, (answer, want)) in answers.iter().zip(&wants).enumerate() {
        c.expect(
            format_args!("in one call claiming [free, done, free, conflicting] keys, answer #{i}"),
            answer,
            want,
        );
    }
    // Keeping a batch keeps each of its keys, with the result.
    let fresh = keys("kept", 3);
    let requests: Vec<_> = fresh.iter().map(|k| c.req(k, Shape::PLAIN)).collect();
    let answers = p.claim_and_keep(&requests, Some("2")).await;
    one_per_request(c, "a claim", requests.len(), &answers);
    for (i, (r, a)) in requests.iter().zip(&answers).enumerate() {
        c.new_token(format_args!("a batch claim of free keys, answer #{i}"), a);
        c.expect(
            format_args!("a claim of key #{i} of a batch completed together"),
            &peek(p, r).await,
            &Want::Done(Some("2")),
        );
    }
}

pub(super) async fn key_twice_in_one_call<P: Probe>(p: &P) {
    let c = p.check();
    let k = key("twice");
    let r = c.req(&k, Shape::PLAIN);
    let answers = p.claim_and_keep(&[r.clone(), r.clone()], None).await;
    one_per_request(c, "a claim", 2, &answers);
    c.new_token(
        "the first copy of a key given twice in one call",
        &answers[0],
    );
    c.expect(
        "the second copy of a key given twice in one call (its twin holds the claim)",
        &answers[1],
        &Want::InProgress,
    );
    c.expect(
        "a claim after the twin was kept",
        &peek(p, &r).await,
        &Want::Done(None),
    );
    // A done key twice: the first copy is a duplicate; the later one may
    // be one too, or wait for its twin, but never runs.
    let answers = p.claim_and_give_back(&[r.clone(), r]).await;
    one_per_request(c, "a claim", 2, &answers);
    c.expect(
        "the first copy of a done key given twice in one call",
        &answers[0],
        &Want::Done(None),
    );
    if !(Want::Done(None).matches(&answers[1]) || Want::InProgress.matches(&answers[1])) {
        c.fail(format_args!(
            "the second copy of a done key given twice in one call: claim answered {:?}, expected Done {{ cached: None }} or InProgress",
            answers[1]
        ));
    }
}

pub(super) async fn records_are_per_handler<P: Probe, Q: Probe>(p: &P, other: &Q) {
    let (c, o) = (p.check(), other.check());
    let k = key("shared-key");
    let mine = c.req(&k, Shape::PLAIN);
    let theirs = o.req(&k, Shape::PLAIN);
    c.new_token("a first claim", &keep(p, &mine, Some("mine")).await);
    c.new_token(
        format_args!(
            "a claim of the same key by handler {:?} after {:?} completed it (records are per handler and key)",
            o.handler, c.handler
        ),
        &peek(other, &theirs).await,
    );
    c.expect(
        "a claim by the first handler",
        &peek(p, &mine).await,
        &Want::Done(Some("mine")),
    );
}

/// How many expired records the purge rule writes.
const EXPIRED: usize = 5;

/// Writes `EXPIRED` records with a short TTL and live ones with a long TTL
/// or none; returns once the short ones have expired (checked on a sentinel
/// written after them, so that they are not claimed again).
pub(super) async fn records_for_purge<P: Probe>(p: &P) {
    let c = p.check();
    let expiring = keys("expiring", EXPIRED);
    let requests: Vec<_> = expiring
        .iter()
        .map(|k| c.req(k, Shape::PLAIN.ttl(Some(SHORT))))
        .collect();
    p.claim_and_keep(&requests, None).await;
    let live = keys("live", 3);
    let requests: Vec<_> = live.iter().map(|k| c.req(k, Shape::PLAIN)).collect();
    p.claim_and_keep(&requests, None).await;
    let forever = key("forever");
    keep(p, &c.req(&forever, Shape::PLAIN.ttl(None)), None).await;
    let sentinel = key("sentinel");
    let r = c.req(&sentinel, Shape::PLAIN.ttl(Some(SHORT)));
    let started = Instant::now();
    keep(p, &r, None).await;
    let what = format!("a done-record with ttl {SHORT:?}");
    wait_until_expired(c, &what, started, SHORT, Want::Done(None), || peek(p, &r)).await;
}

/// Purges in calls of 2 until a call comes back short; checks the limit,
/// the count, and that live records stay.
pub(super) async fn purge_and_check<P: Probe>(p: &P) {
    let c = p.check();
    let mut total = 0;
    for _ in 0..10_000 {
        let n = p.purge(2).await;
        if n > 2 {
            c.fail(format_args!(
                "purge_expired(2) deleted {n} records, more than its limit"
            ));
        }
        total += n;
        if n < 2 {
            break;
        }
    }
    // 0 in all: the store's records expire on their own (Redis), allowed.
    if total > 0 && total < EXPIRED as u64 {
        c.fail(format_args!(
            "{EXPIRED} done-records had expired, but purging until a call came back short deleted {total}"
        ));
    }
    for k in keys("live", 3) {
        c.expect(
            "a claim of a record with a 1 h ttl after purge_expired",
            &peek(p, &c.req(&k, Shape::PLAIN)).await,
            &Want::Done(None),
        );
    }
    c.expect(
        "a claim of a record kept forever (ttl None) after purge_expired",
        &peek(p, &c.req(&key("forever"), Shape::PLAIN.ttl(None))).await,
        &Want::Done(None),
    );
    for k in keys("expiring", EXPIRED) {
        c.expect(
            "a claim of an expired record after purge_expired",
            &peek(p, &c.req(&k, Shape::PLAIN)).await,
            &Want::New,
        );
    }
}
