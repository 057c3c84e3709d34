//! What every rule's code shares: the failure message (rule, what
//! happened, fix), deadlines on store calls, waiting on a store's clock, and
//! building requests.

use std::fmt::{self, Display};
use std::future::Future;
use std::time::{Duration, Instant};

use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::store::{Claim, ClaimRequest, Claimed, StoreError};

/// A rule enum's `statement()`, `fix()` and `Display` (the statement),
/// from its private `text()`: (slug, statement, fix).
macro_rules! rule_text {
    ($rule:ty) => {
        impl $rule {
            /// The rule in one sentence, as failures quote it.
            pub fn statement(self) -> &'static str {
                self.text().1
            }

            /// How to fix a store that breaks it.
            pub fn fix(self) -> &'static str {
                self.text().2
            }
        }

        impl std::fmt::Display for $rule {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.statement())
            }
        }
    };
}
pub(super) use rule_text;

/// A lease or TTL that outlives any test.
pub(super) const LONG: Duration = Duration::from_secs(3600);
/// A lease or TTL the suite waits out. Short enough to keep the suite
/// quick, long enough that a store with millisecond timestamps can tell it
/// from zero.
pub(super) const SHORT: Duration = Duration::from_millis(200);
/// How much earlier than its lease or TTL a record may look expired
/// (timestamps truncated to milliseconds, a server's clock read at the
/// start of its transaction).
pub(super) const EARLY: Duration = Duration::from_millis(25);
/// How long after its lease or TTL a record may still look live before the
/// rule fails (a loaded machine, a store that expires lazily).
pub(super) const LATE: Duration = Duration::from_secs(10);
/// How long one store call may take before the rule fails as hung.
pub(super) const CALL: Duration = Duration::from_secs(30);
/// Between two looks at a record that is about to expire.
pub(super) const POLL: Duration = Duration::from_millis(10);

/// The rule being checked, with what a failure says.
pub(super) struct Check {
    /// `"LeaseStore"` or `"TxStore"`.
    pub(super) contract: &'static str,
    /// The store's `kind()`.
    pub(super) kind: &'static str,
    /// The rule, as the trait docs state it.
    pub(super) rule: &'static str,
    /// How to fix a store that breaks it.
    pub(super) fix: &'static str,
    /// The handler name (record namespace) this check uses, unique per run
    /// so that several checks can share one store.
    pub(super) handler: String,
}

impl Check {
    pub(super) fn new(
        contract: &'static str,
        kind: &'static str,
        slug: &str,
        rule: &'static str,
        fix: &'static str,
    ) -> Check {
        Check {
            contract,
            kind,
            rule,
            fix,
            handler: format!("conformance-{slug}-{:016x}", fastrand::u64(..)),
        }
    }

    /// Fails the rule: panics with the store, the rule, what happened and
    /// the fix.
    #[track_caller]
    pub(super) fn fail(&self, what: impl Display) -> ! {
        panic!(
            "idem store conformance: store `{kind}` breaks the {contract} rule: {rule}\n  what happened: {what}\n  fix: {fix}",
            kind = self.kind,
            contract = self.contract,
            rule = self.rule,
            fix = self.fix,
        )
    }

    /// The value of a store call, or a failure naming the call.
    #[track_caller]
    pub(super) fn ok<T>(&self, call: &str, result: Result<T, StoreError>) -> T {
        match result {
            Ok(v) => v,
            Err(e) => self.fail(format_args!(
                "{call} returned an error: {e} (the suite needs the store's backend up and migrated)"
            )),
        }
    }

    /// Awaits a store call, failing the rule if it takes longer than [`CALL`].
    pub(super) async fn call<T>(
        &self,
        call: &str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> T {
        match tokio::time::timeout(CALL, fut).await {
            Ok(result) => self.ok(call, result),
            Err(_) => self.fail(format_args!(
                "{call} did not return within {CALL:?}: a store call must not block forever"
            )),
        }
    }

    /// The token of a `New` claim, or a failure saying what `when` expected.
    #[track_caller]
    pub(super) fn new_token(&self, when: impl Display, claim: &Claim) -> u64 {
        match claim {
            Claim::New { token } => *token,
            other => self.fail(format_args!(
                "{when}: claim answered {other:?}, expected New"
            )),
        }
    }

    /// Fails unless `claim` is the expected answer (`InProgress` matches any
    /// `retry_after`).
    #[track_caller]
    pub(super) fn expect(&self, when: impl Display, claim: &Claim, want: &Want) {
        if !want.matches(claim) {
            self.fail(format_args!(
                "{when}: claim answered {claim:?}, expected {want}"
            ));
        }
    }

    /// A request in this check's namespace.
    pub(super) fn req<'a>(&'a self, key: &'a Key, shape: Shape) -> ClaimRequest<'a> {
        shape.request(&self.handler, key)
    }
}

/// The lease, TTL and fingerprint of a request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub(super) fingerprint: Option<u64>,
    pub(super) lease: Duration,
    pub(super) ttl: Option<Duration>,
}

impl Shape {
    /// A long lease, a long TTL, no fingerprint.
    pub(super) const PLAIN: Shape = Shape {
        fingerprint: None,
        lease: LONG,
        ttl: Some(LONG),
    };

    pub(super) const fn fingerprint(self, fp: u64) -> Shape {
        Shape {
            fingerprint: Some(fp),
            ..self
        }
    }

    pub(super) const fn lease(self, lease: Duration) -> Shape {
        Shape { lease, ..self }
    }

    pub(super) const fn ttl(self, ttl: Option<Duration>) -> Shape {
        Shape { ttl, ..self }
    }

    /// A request of this shape.
    pub(super) fn request<'a>(self, handler: &'a str, key: &'a Key) -> ClaimRequest<'a> {
        ClaimRequest {
            handler,
            key,
            fingerprint: self.fingerprint.map(Fingerprint::new),
            message_id: "conformance",
            lease: self.lease,
            ttl: self.ttl,
        }
    }
}

/// An expected claim answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Want {
    New,
    Done(Option<&'static str>),
    InProgress,
    Conflict(u64),
}

impl Want {
    pub(super) fn matches(&self, claim: &Claim) -> bool {
        match (self, claim) {
            (Want::New, Claim::New { .. }) | (Want::InProgress, Claim::InProgress { .. }) => true,
            (Want::Done(want), Claim::Done { cached }) => cached.as_deref() == *want,
            (Want::Conflict(fp), Claim::Conflict { stored }) => stored.get() == *fp,
            _ => false,
        }
    }
}

impl Display for Want {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Want::New => f.write_str("New"),
            Want::Done(cached) => write!(f, "Done {{ cached: {cached:?} }}"),
            Want::InProgress => f.write_str("InProgress"),
            Want::Conflict(fp) => write!(f, "Conflict {{ stored: Fingerprint({fp}) }}"),
        }
    }
}

/// `n` keys `<prefix>0`, `<prefix>1`, …
pub(super) fn keys(prefix: &str, n: usize) -> Vec<Key> {
    (0..n)
        .map(|i| Key::new(format!("{prefix}{i}")).expect("non-empty key"))
        .collect()
}

pub(super) fn key(name: &str) -> Key {
    Key::new(name).expect("non-empty key")
}

/// What to complete or release: a request, its token, the result to cache.
pub(super) fn claimed<'a>(
    request: &'a ClaimRequest<'a>,
    token: u64,
    result: Option<&'a str>,
) -> Claimed<'a> {
    Claimed {
        request,
        token,
        result,
    }
}

/// Looks at a record until it expires, on the store's clock.
///
/// `look` answers the claim of the record (and gives back whatever it took).
/// Until the record expires it must answer `live`; once `started + span`
/// has passed it may answer `New` instead, which ends the wait. `New`
/// earlier than `span - EARLY` after `started` (taken before the record was
/// written) means the store expired it early; still live `LATE` after the
/// span means it never expires. Returns the `New` claim.
pub(super) async fn wait_until_expired<F, Fut>(
    check: &Check,
    what: &str,
    started: Instant,
    span: Duration,
    live: Want,
    mut look: F,
) -> Claim
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Claim>,
{
    loop {
        let claim = look().await;
        let age = started.elapsed();
        match claim {
            Claim::New { .. } if age + EARLY < span => check.fail(format_args!(
                "{what} expired early: a claim {age:?} after it was written answered New, before its {span:?} ran out"
            )),
            Claim::New { .. } => return claim,
            ref other if !live.matches(other) => check.fail(format_args!(
                "while {what} had not expired, a claim answered {other:?}, expected {live}"
            )),
            _ if age > span + LATE => check.fail(format_args!(
                "{what} never expired: {age:?} after it was written a claim still answered {live} ({span:?} {LATE:?} ago it should have been free)"
            )),
            _ => tokio::time::sleep(POLL).await,
        }
    }
}
