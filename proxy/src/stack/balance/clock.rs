//! Instants as nanoseconds after an epoch, so state read on every pick can sit in
//! an `AtomicU64` instead of behind a lock.

use tokio::time::Instant;

/// Nanoseconds from `epoch` to `at` (zero before it); saturates one short of
/// `u64::MAX`, which callers may keep as "never".
pub fn nanos_after(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX - 1)
}
