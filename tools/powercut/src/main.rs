//! `sealpost-powercut BACKING MOUNTPOINT`: serves BACKING at MOUNTPOINT (see the library's
//! doc for the model). Reads commands from standard input, one a line:
//!
//! - `stats`: prints the counters;
//! - `cut` (or end of input): cuts the power (every file back to its last fsync), unmounts,
//!   prints the counters and exits.
//!
//! Stop the programs using the mount before the cut: a busy mount cannot be unmounted.

use std::io::{BufRead, Write};

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(backing), Some(mountpoint), None) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: sealpost-powercut BACKING MOUNTPOINT");
    };
    let mounted = sealpost_powercut::Mounted::mount(backing.as_ref(), mountpoint.as_ref())
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
