//! The one way the runtime takes a std mutex.
//!
//! Every critical section in idem leaves its data consistent before it can
//! panic (each update is one insert, remove or push), so a lock poisoned by a
//! panicking thread is still safe to use: recovering it beats turning one
//! handler's panic into a panic of every consumer that touches the lock.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering it if a panicking thread poisoned it.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
