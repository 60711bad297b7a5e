//! The Redis ring layout (`lua/window.lua`) as the property tests check it.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// The ring's block sums (`lua/window.lua`) equal the sums of their slots, the head
/// bucket's slot is empty (its counts are in the header), and the header's totals are the
/// sums of all slots and the head's counts: the invariants that let a scan skip whole
/// blocks and an admission touch only the header.
pub async fn check_ring(url: &str, ring: &str, slots: usize) -> Result<(), TestCaseError> {
    const HDR: usize = 58;
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
    prop_assert_eq!(bytes.len(), HDR + 10 * slots + 24 * blocks);
    let be = |at: usize, n: usize| {
        bytes[at..at + n]
            .iter()
            .fold(0i64, |a, b| a << 8 | *b as i64)
    };
    let slot = |s: usize| {
        let at = HDR + 10 * s;
        [be(at, 2), be(at + 2, 4), be(at + 6, 4)]
    };
    let head = be(0, 8);
    prop_assert_eq!(
        slot(head.rem_euclid(slots as i64) as usize),
        [0, 0, 0],
        "the head's slot of {}",
        ring
    );
    let mut totals = [be(48, 2), be(50, 4), be(54, 4)];
    for j in 0..blocks {
        let mut sum = [0i64; 3];
        for s in j * block..((j + 1) * block).min(slots) {
            let v = slot(s);
            for k in 0..3 {
                sum[k] += v[k];
                totals[k] += v[k];
            }
        }
        let at = HDR + 10 * slots + 24 * j;
        let stored = [be(at, 8), be(at + 8, 8), be(at + 16, 8)];
        prop_assert_eq!(stored, sum, "block {} of {}", j, ring);
    }
    prop_assert_eq!(
        [be(16, 8), be(24, 8), be(32, 8)],
        totals,
        "totals of {}",
        ring
    );
    Ok(())
}
