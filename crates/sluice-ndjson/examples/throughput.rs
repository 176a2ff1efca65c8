//! Throughput of `NdjsonWriter` on real FHIR data, against a plain memcpy of the same bytes.
//!
//! Reads every `*.ndjson.gz` in the folder given as the first argument into memory, then
//! writes all lines through the writer as plain NDJSON and as gzip at levels 1, 2 and 6,
//! dropping the emitted chunks as a storage sink would after shipping them.
//!
//! ```text
//! cargo run --release -p sluice-ndjson --example throughput -- /work/shared/data/r4-615-patients
//! ```
//!
//! An optional second argument runs only the writer runs whose name contains it
//! (e.g. `plain` or `level 6`), which helps when profiling.

use std::hint::black_box;
use std::io::Read;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use flate2::read::MultiGzDecoder;
use sluice_ndjson::{Compression, Event, NdjsonWriter, SplitLimits};

/// Lines handed to the writer per `write_lines` call before the events are drained.
const BATCH: usize = 256;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or("usage: throughput <folder with *.ndjson.gz> [run name filter]")?;
    let only = std::env::args().nth(2).unwrap_or_default();
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(&dir)?.map(|entry| entry.map(|e| e.path())).collect::<Result<_, _>>()?;
    paths.retain(|p| p.to_string_lossy().ends_with(".ndjson.gz"));
    paths.sort();
    if paths.is_empty() {
        return Err(format!("no *.ndjson.gz in {}", dir.display()).into());
    }

    let mut data = Vec::new();
    for path in &paths {
        MultiGzDecoder::new(std::fs::File::open(path)?).read_to_end(&mut data)?;
        if data.last().is_some_and(|&b| b != b'\n') {
            data.push(b'\n');
        }
    }
    let lines = line_ranges(&data);
    let mb = data.len() as f64 / 1e6;
    println!("{} files, {} lines, {:.1} MB of NDJSON in memory", paths.len(), lines.len(), mb);

    let memcpy = best_of(5, || {
        let mut copy = vec![0u8; data.len()];
        // Touch every page first so the timing covers the copy, not page faults.
        copy.fill(1);
        let start = Instant::now();
        copy.copy_from_slice(&data);
        black_box(&copy);
        (start.elapsed(), data.len() as u64)
    });
    let base = mb / memcpy.0.as_secs_f64();
    println!("{:<16} {:>9.1} MB/s", "memcpy", base);

    for (name, compression, runs) in [
        ("plain", Compression::None, 3),
        ("gzip level 1", Compression::Gzip { level: 1 }, 1),
        ("gzip level 2", Compression::Gzip { level: 2 }, 1),
        ("gzip level 6", Compression::Gzip { level: 6 }, 1),
    ] {
        if !name.contains(&only) {
            continue;
        }
        let (elapsed, stored) = best_of(runs, || write_all(&data, &lines, compression));
        let speed = mb / elapsed.as_secs_f64();
        println!(
            "{:<16} {:>9.1} MB/s  {:>6.3}x memcpy  {:>7.2} s  output {:>6.1} MB ({:.1}%)",
            name,
            speed,
            speed / base,
            elapsed.as_secs_f64(),
            stored as f64 / 1e6,
            100.0 * stored as f64 / data.len() as f64
        );
    }
    Ok(())
}

/// Byte ranges of the lines of `data`, without their newlines; empty lines are skipped.
fn line_ranges(data: &[u8]) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    for (i, &b) in data.iter().enumerate() {
        if b == b'\n' {
            if i > start {
                ranges.push(start..i);
            }
            start = i + 1;
        }
    }
    if start < data.len() {
        ranges.push(start..data.len());
    }
    ranges
}

/// Writes every line through one writer without limits; returns the time and stored bytes.
fn write_all(data: &[u8], lines: &[Range<usize>], compression: Compression) -> (Duration, u64) {
    let start = Instant::now();
    let mut writer = NdjsonWriter::new(compression, SplitLimits::default());
    let mut events = Vec::new();
    let mut stored = 0u64;
    let mut drain = |events: &mut Vec<Event>| {
        for event in events.drain(..) {
            if let Event::Data { bytes, .. } = event {
                stored += bytes.len() as u64;
                black_box(bytes);
            }
        }
    };
    for batch in lines.chunks(BATCH) {
        writer.write_lines(batch.iter().map(|r| &data[r.clone()]), &mut events).expect("valid lines");
        drain(&mut events);
    }
    writer.finish(&mut events).expect("finish");
    drain(&mut events);
    (start.elapsed(), stored)
}

/// Runs `f` `runs` times and keeps the fastest run.
fn best_of(runs: u32, mut f: impl FnMut() -> (Duration, u64)) -> (Duration, u64) {
    (0..runs).map(|_| f()).min_by_key(|(elapsed, _)| *elapsed).expect("at least one run")
}
