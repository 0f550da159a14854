//! `sealpost-powercut BACKING MOUNTPOINT [FSYNC_LATENCY_MS]`: serves BACKING at MOUNTPOINT
//! (see the library's doc for the model), each fsync taking FSYNC_LATENCY_MS (default 0). Reads commands from standard input, one a line:
//!
//! - `stats`: prints the counters;
//! - `cut` (or end of input): cuts the power (every file back to its last fsync), unmounts,
//!   prints the counters and exits.
//!
//! Stop the programs using the mount before the cut: a busy mount cannot be unmounted. (The
//! library can cut first and unmount after the programs are killed; tests/power_loss.rs does.)

use std::io::{BufRead, Write};

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let usage = "usage: sealpost-powercut BACKING MOUNTPOINT [FSYNC_LATENCY_MS]";
    let (Some(backing), Some(mountpoint)) = (args.next(), args.next()) else {
        anyhow::bail!(usage);
    };
    let latency_ms: u64 = match args.next() {
        Some(ms) => ms.to_str().and_then(|ms| ms.parse().ok()).context(usage)?,
        None => 0,
    };
    let options = sealpost_powercut::Options {
        fsync_latency: std::time::Duration::from_millis(latency_ms),
    };
    let mounted =
        sealpost_powercut::Mounted::mount_with(backing.as_ref(), mountpoint.as_ref(), options)
            .context("mount (needs /dev/fuse and root or fusermount3)")?;
    let mut out = std::io::stdout();
    writeln!(out, "mounted")?;
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "stats" => writeln!(out, "{:?}", mounted.stats())?,
            "cut" => break,
            "" => {}
            other => writeln!(out, "unknown command {other:?} (stats, cut)")?,
        }
    }
    let cut = mounted.cut().context("cut")?;
    // The programs using the mount were stopped first (see the module doc).
    mounted.unmount().context("unmount")?;
    writeln!(out, "cut {:?}", cut.stats)?;
    for name in cut.unsynced_names {
        writeln!(
            out,
            "name not made durable (no directory fsync): {}",
            name.display()
        )?;
    }
    Ok(())
}
