//! Command ids: `cmd-` and a ULID (48-bit milliseconds, 80 random bits, Crockford base32).
//!
//! Ids sort by creation time, which is what the per-device list cursors and humans reading
//! logs want. Within one millisecond the random part is incremented instead of redrawn (the
//! ULID "monotonic" rule), so ids made by one process also sort in creation order.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use polyhub_store::Millis;

/// Prefix of every command id.
pub const COMMAND_ID_PREFIX: &str = "cmd-";

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const RANDOM_BITS: u32 = 80;
const RANDOM_MASK: u128 = (1 << RANDOM_BITS) - 1;
const TIME_MASK: u64 = (1 << 48) - 1;

/// The last id's time and random part, for the monotonic rule.
static LAST: Mutex<(u64, u128)> = Mutex::new((0, 0));
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new command id for a command created at `now`.
pub fn new_command_id(now: Millis) -> String {
    let millis = u64::try_from(now).unwrap_or(0) & TIME_MASK;
    let (millis, random) = {
        let mut last = LAST.lock();
        let next = if millis <= last.0 && last.0 != 0 {
            // Same (or an earlier, clock went back) millisecond: stay after the last id.
            let random = (last.1 + 1) & RANDOM_MASK;
            let millis = if random == 0 { last.0 + 1 } else { last.0 };
            (millis, random)
        } else {
            (millis, random_bits())
        };
        *last = next;
        next
    };
    encode((u128::from(millis) << RANDOM_BITS) | random)
}

/// 80 unpredictable-enough bits without a dependency: std's `RandomState` is seeded from
/// the OS once per thread and its keys change with every instance; a counter and the clock
/// make each draw distinct.
fn random_bits() -> u128 {
    let draw = |salt: u64| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u64(salt);
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        hasher.finish()
    };
    let high = u128::from(draw(1));
    let low = u128::from(draw(2));
    // Leave the top bit clear so that the next ids in the same millisecond do not overflow
    // into the next millisecond in practice.
    ((high << 64) | low) & (RANDOM_MASK >> 1)
}

fn encode(value: u128) -> String {
    let mut id = String::with_capacity(COMMAND_ID_PREFIX.len() + 26);
    id.push_str(COMMAND_ID_PREFIX);
    for index in (0..26).rev() {
        let digit = (value >> (index * 5)) & 31;
        id.push(char::from(CROCKFORD[digit as usize]));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_documented_shape() {
        let id = new_command_id(1_700_000_000_000);
        assert!(id.starts_with("cmd-"), "{id}");
        assert_eq!(id.len(), 30, "{id}");
        assert!(id[4..].bytes().all(|b| CROCKFORD.contains(&b)), "{id}");
        assert!(polyhub_store::validate_id("command", &id).is_ok());
    }

    #[test]
    fn ids_sort_in_creation_order_even_within_a_millisecond() {
        let ids: Vec<String> = (0..1000)
            .map(|i| new_command_id(1_800_000_000_000 + i / 100))
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len());
    }

    #[test]
    fn the_time_is_the_leading_part() {
        assert_eq!(encode(0), "cmd-00000000000000000000000000");
        let id = new_command_id(2_000_000_000_000);
        let later = new_command_id(2_000_000_000_000 + 86_400_000);
        assert!(id[..14] < later[..14], "{id} {later}");
    }
}
