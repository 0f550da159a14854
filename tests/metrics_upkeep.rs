//! The metrics exporter keeps every histogram sample until its upkeep folds them into
//! buckets. A broker that nobody scrapes must still not grow by a sample per envelope: this
//! test counts the heap (in a binary of its own, so that no other test allocates beside it)
//! while a recorder built as the broker builds its own takes samples.

use std::time::{Duration, Instant};

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const CHUNK: usize = 20_000;
/// Bytes the test lets the exporter hold: a chunk of samples left unfolded is about 330,000
/// (eight bytes each, and the blocks' overhead).
const SLACK: isize = 100_000;

/// Bytes allocated and not freed since `region` began.
fn held(region: &Region<'_, std::alloc::System>) -> isize {
    let change = region.change();
    change.bytes_allocated as isize - change.bytes_deallocated as isize + change.bytes_reallocated
}

#[test]
fn histogram_samples_do_not_accumulate_without_a_scrape() {
    let recorder = sealpost::telemetry::metrics_builder()
        .expect("bucket bounds")
        .build_recorder();
    sealpost::telemetry::keep_up(recorder.handle(), Duration::from_millis(1));
    // The first sample creates the series and its buckets; count from after it.
    metrics::with_local_recorder(&recorder, || {
        metrics::histogram!("sealpost_append_seconds").record(0.001);
    });
    std::thread::sleep(Duration::from_millis(50));
    let region = Region::new(GLOBAL);
    for chunk in 1..=3 {
        metrics::with_local_recorder(&recorder, || {
            for i in 0..CHUNK {
                metrics::histogram!("sealpost_append_seconds").record(0.0005 * (i % 7) as f64);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let held = held(&region);
            if held < SLACK {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{held} bytes still held after {} samples",
                chunk * CHUNK
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
