//! The metrics exporter keeps every histogram sample until its upkeep folds them into
//! buckets. A broker that nobody scrapes must still not grow by a sample per envelope: this
//! test installs the broker's recorder as the broker does and counts the heap (in a binary
//! of its own, so that no other test allocates beside it) while it takes samples.

use std::time::{Duration, Instant};

use sealpost::telemetry::{METRICS_UPKEEP_EVERY, init_metrics};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const SAMPLES: usize = 20_000;
/// Bytes the test lets the exporter hold: the samples left unfolded are about 330,000 (16
/// bytes each, a value and a timestamp, and the blocks they sit in).
const SLACK: isize = 100_000;

/// Bytes allocated and not freed since `region` began.
fn held(region: &Region<'_, std::alloc::System>) -> isize {
    let change = region.change();
    change.bytes_allocated as isize - change.bytes_deallocated as isize + change.bytes_reallocated
}

#[test]
fn histogram_samples_do_not_accumulate_without_a_scrape() {
    let _handle = init_metrics().expect("the first recorder of this process");
    // The first sample starts the exporter's clock; count from after it.
    metrics::histogram!("sealpost_flush_seconds").record(0.001);
    std::thread::sleep(Duration::from_millis(50));
    let region = Region::new(GLOBAL);
    for i in 0..SAMPLES {
        metrics::histogram!("sealpost_flush_seconds").record(0.0005 * (i % 7) as f64);
    }
    let recorded = held(&region);
    let deadline = Instant::now() + 3 * METRICS_UPKEEP_EVERY;
    loop {
        let held = held(&region);
        if held < SLACK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{held} bytes still held {:?} after {SAMPLES} samples ({recorded} right after them)",
            3 * METRICS_UPKEEP_EVERY
        );
        // Traffic goes on, a sample every 10 ms: the exporter frees the blocks it drained
        // through crossbeam's epochs, which move on only as threads record.
        std::thread::sleep(Duration::from_millis(10));
        metrics::histogram!("sealpost_flush_seconds").record(0.001);
    }
}
