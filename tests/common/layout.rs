//! The Redis ring layout (`lua/window.lua`) as the property tests check it.

use llm_ratelimit::engine::WindowShape;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// The ring's block sums (`lua/window.lua`) equal the sums of their slots, the head
/// bucket's slot is empty (its counts are in the header), the header's totals are the
/// sums of all slots and the head's counts, and the tail is exact: the invariants that let
/// a scan skip whole blocks and an admission touch only the header.
/// A slot's requests are a u16 in buckets under a second and a u32 in longer ones.
pub async fn check_ring(url: &str, ring: &str, shape: WindowShape) -> Result<(), TestCaseError> {
    const HDR: usize = 60;
    let slots = shape.slots() as usize;
    let req = if shape.precision_ms() >= 1000 { 4 } else { 2 };
    let width = req + 8;
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let bytes: Option<Vec<u8>> = redis::cmd("GET")
        .arg(ring)
        .query_async(&mut c)
        .await
        .unwrap();
    let Some(bytes) = bytes else {
        return Ok(());
    };
    let block = (slots as f64).sqrt().ceil() as usize;
    let blocks = slots.div_ceil(block);
    prop_assert_eq!(bytes.len(), HDR + width * slots + 24 * blocks);
    let be = |at: usize, n: usize| {
        bytes[at..at + n]
            .iter()
            .fold(0i64, |a, b| a << 8 | *b as i64)
    };
    let slot = |s: usize| {
        let at = HDR + width * s;
        [be(at, req), be(at + req, 4), be(at + req + 4, 4)]
    };
    let head = be(0, 8);
    prop_assert_eq!(
        slot(head.rem_euclid(slots as i64) as usize),
        [0, 0, 0],
        "the head's slot of {}",
        ring
    );
    let mut totals = [be(48, 4), be(52, 4), be(56, 4)];
    for j in 0..blocks {
        let mut sum = [0i64; 3];
        for s in j * block..((j + 1) * block).min(slots) {
            let v = slot(s);
            for k in 0..3 {
                sum[k] += v[k];
                totals[k] += v[k];
            }
        }
        let at = HDR + width * slots + 24 * j;
        let stored = [be(at, 8), be(at + 8, 8), be(at + 16, 8)];
        prop_assert_eq!(stored, sum, "block {} of {}", j, ring);
    }
    prop_assert_eq!(
        [be(16, 8), be(24, 8), be(32, 8)],
        totals,
        "totals of {}",
        ring
    );
    // The head's requests fit the slot they will move to.
    prop_assert!(be(48, 4) < 1 << (8 * req), "head requests of {}", ring);
    // The tail is exact: the oldest non-empty bucket in the window, or the head. Slot s
    // holds the bucket of the window that is s modulo the slots.
    let n = slots as i64;
    let oldest = (0..slots)
        .filter(|s| slot(*s) != [0, 0, 0])
        .map(|s| head - (head - s as i64).rem_euclid(n))
        .min()
        .unwrap_or(head);
    prop_assert_eq!(be(8, 8), oldest, "tail of {}", ring);
    Ok(())
}
