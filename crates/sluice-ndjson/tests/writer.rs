//! Behaviour of `NdjsonWriter` on real FHIR lines: round trips, exact counts, splitting,
//! chunking and rejected input.

use std::io::{BufRead, BufReader, Read};

use flate2::read::{GzDecoder, MultiGzDecoder};
use sluice_ndjson::{Compression, Event, FileSummary, NdjsonError, NdjsonWriter, SplitLimits};

const OBSERVATIONS: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/data/r4-100-patients-groups/Observation.ndjson.gz");

/// The first `n` lines of the Observation sample, without their newlines.
fn fhir_lines(n: usize) -> Vec<Vec<u8>> {
    let file = std::fs::File::open(OBSERVATIONS).expect("open Observation sample");
    let reader = BufReader::new(MultiGzDecoder::new(file));
    let lines: Vec<Vec<u8>> = reader.split(b'\n').take(n).map(|l| l.expect("read Observation sample")).collect();
    assert_eq!(lines.len(), n, "sample has fewer than {n} lines");
    assert!(lines.iter().all(|l| !l.is_empty()));
    lines
}

/// At least `min_bytes` of FHIR lines (the sample repeated as needed).
fn fhir_volume(min_bytes: usize) -> Vec<Vec<u8>> {
    let base = fhir_lines(2000);
    let mut lines = Vec::new();
    let mut total = 0;
    for l in base.iter().cycle() {
        if total >= min_bytes {
            break;
        }
        total += l.len() + 1;
        lines.push(l.clone());
    }
    lines
}

/// One output file as reassembled from the events.
#[derive(Debug)]
struct File {
    bytes: Vec<u8>,
    chunks: Vec<usize>,
    summary: FileSummary,
}

/// Checks the event-stream invariants (files numbered 0, 1, …; Data never empty; Finished
/// right after a file's last Data and before any Data of the next file; summary counts exact)
/// and reassembles the files.
fn collect(events: &[Event]) -> Vec<File> {
    let mut files: Vec<File> = Vec::new();
    let mut open: Option<(u32, Vec<u8>, Vec<usize>)> = None;
    for event in events {
        match event {
            Event::Data { file, bytes } => {
                assert!(!bytes.is_empty(), "empty Data event");
                let (index, data, chunks) = open.get_or_insert_with(|| {
                    assert_eq!(*file as usize, files.len(), "files must be numbered in order");
                    (*file, Vec::new(), Vec::new())
                });
                assert_eq!(file, index, "Data for file {file} while file {index} is open");
                data.extend_from_slice(bytes);
                chunks.push(bytes.len());
            }
            Event::Finished(summary) => {
                let (index, bytes, chunks) = open.take().expect("Finished without Data");
                assert_eq!(summary.file, index);
                assert_eq!(summary.bytes, bytes.len() as u64, "summary bytes must be exact");
                assert!(summary.resources > 0, "a file is never empty");
                files.push(File { bytes, chunks, summary: *summary });
            }
        }
    }
    assert!(open.is_none(), "file left without Finished");
    files
}

/// The text of a file, decompressed if needed; gzip files must be exactly one gzip member.
fn text(file: &File, compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => file.bytes.clone(),
        Compression::Gzip { .. } => {
            let mut decoder = GzDecoder::new(&file.bytes[..]);
            let mut text = Vec::new();
            decoder.read_to_end(&mut text).expect("valid gzip");
            let mut rest = Vec::new();
            decoder.into_inner().read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "bytes after the gzip member");
            text
        }
    }
}

/// Lines of a file's text, checking it ends with a newline.
fn lines_of(text: &[u8]) -> Vec<Vec<u8>> {
    assert_eq!(text.last(), Some(&b'\n'), "file must end with a newline");
    text[..text.len() - 1].split(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
}

/// Writes `lines` and returns the events and the totals reported just before `finish`.
fn run(
    compression: Compression,
    limits: SplitLimits,
    chunk_size: Option<usize>,
    lines: &[Vec<u8>],
) -> (Vec<Event>, (u64, u64)) {
    let mut writer = NdjsonWriter::new(compression, limits);
    if let Some(size) = chunk_size {
        writer = writer.with_chunk_size(size);
    }
    let mut events = Vec::new();
    writer.write_lines(lines.iter().map(Vec::as_slice), &mut events).unwrap();
    let totals = writer.totals();
    let emitted: usize = events
        .iter()
        .map(|e| match e {
            Event::Data { bytes, .. } => bytes.len(),
            Event::Finished(_) => 0,
        })
        .sum();
    assert_eq!(totals, (lines.len() as u64, emitted as u64));
    writer.finish(&mut events).unwrap();
    (events, totals)
}

/// Writes, reassembles and checks that the files hold exactly `lines`, in order, with exact
/// per-file counts. Returns the files.
fn round_trip(
    compression: Compression,
    limits: SplitLimits,
    chunk_size: Option<usize>,
    lines: &[Vec<u8>],
) -> Vec<File> {
    let (events, _) = run(compression, limits, chunk_size, lines);
    let files = collect(&events);
    let mut all = Vec::new();
    for file in &files {
        let text = text(file, compression);
        let file_lines = lines_of(&text);
        assert_eq!(file.summary.resources, file_lines.len() as u64);
        assert_eq!(file.summary.uncompressed_bytes, text.len() as u64);
        if compression == Compression::None {
            assert_eq!(file.summary.bytes, file.summary.uncompressed_bytes);
        }
        all.extend(file_lines);
    }
    assert!(all == lines, "lines must come back unchanged and in order");
    files
}

/// Reference plain splitting: lines per file when packing greedily under `max_bytes`.
fn greedy_counts(lines: &[Vec<u8>], max_bytes: u64) -> Vec<u64> {
    let mut counts = Vec::new();
    let (mut count, mut bytes) = (0u64, 0u64);
    for line in lines {
        let len = line.len() as u64 + 1;
        if count > 0 && bytes + len > max_bytes {
            counts.push(count);
            (count, bytes) = (0, 0);
        }
        count += 1;
        bytes += len;
    }
    if count > 0 {
        counts.push(count);
    }
    counts
}

fn gzip(level: u32) -> Compression {
    Compression::Gzip { level }
}

fn bytes_limit(max_bytes: u64) -> SplitLimits {
    SplitLimits { max_resources: 0, max_bytes }
}

fn count_limit(max_resources: u64) -> SplitLimits {
    SplitLimits { max_resources, max_bytes: 0 }
}

#[test]
fn extensions() {
    assert_eq!(Compression::None.extension(), "ndjson");
    assert_eq!(gzip(6).extension(), "ndjson.gz");
}

#[test]
fn plain_round_trip() {
    let lines = fhir_lines(2000);
    let files = round_trip(Compression::None, SplitLimits::default(), None, &lines);
    assert_eq!(files.len(), 1);
    let expected: usize = lines.iter().map(|l| l.len() + 1).sum();
    assert_eq!(
        files[0].summary,
        FileSummary { file: 0, resources: 2000, bytes: expected as u64, uncompressed_bytes: expected as u64 }
    );
}

#[test]
fn gzip_round_trip() {
    let lines = fhir_lines(2000);
    let expected: usize = lines.iter().map(|l| l.len() + 1).sum();
    for level in [0, 1, 6, 9, 12] {
        let files = round_trip(gzip(level), SplitLimits::default(), None, &lines);
        assert_eq!(files.len(), 1);
        let summary = files[0].summary;
        assert_eq!(summary.resources, 2000);
        assert_eq!(summary.uncompressed_bytes, expected as u64);
        if level > 0 {
            assert!(summary.bytes * 5 < summary.uncompressed_bytes, "{summary:?}");
        }
    }
}

#[test]
fn gzip_files_concatenate_to_one_multi_member_stream() {
    let lines = fhir_lines(500);
    let (events, _) = run(gzip(6), count_limit(120), None, &lines);
    let files = collect(&events);
    assert_eq!(files.len(), 5);
    let joined: Vec<u8> = files.iter().flat_map(|f| f.bytes.clone()).collect();
    let mut text = Vec::new();
    MultiGzDecoder::new(&joined[..]).read_to_end(&mut text).unwrap();
    assert!(lines_of(&text) == lines);
}

#[test]
fn totals_count_emitted_bytes() {
    let lines = fhir_lines(300);
    let mut writer = NdjsonWriter::new(Compression::None, count_limit(100)).with_chunk_size(4096);
    let mut events = Vec::new();
    assert_eq!(writer.totals(), (0, 0));
    for (n, line) in lines.iter().enumerate() {
        writer.write_line(line, &mut events).unwrap();
        let emitted: u64 = collect_data_len(&events);
        assert_eq!(writer.totals(), (n as u64 + 1, emitted));
    }
    writer.finish(&mut events).unwrap();
    let files = collect(&events);
    let total: u64 = files.iter().map(|f| f.summary.bytes).sum();
    assert_eq!(total, collect_data_len(&events));
    assert_eq!(total, lines.iter().map(|l| l.len() as u64 + 1).sum::<u64>());
}

fn collect_data_len(events: &[Event]) -> u64 {
    events
        .iter()
        .map(|e| match e {
            Event::Data { bytes, .. } => bytes.len() as u64,
            Event::Finished(_) => 0,
        })
        .sum()
}

#[test]
fn split_by_count() {
    let lines = fhir_lines(10);
    for compression in [Compression::None, gzip(1), gzip(6)] {
        let files = round_trip(compression, count_limit(3), None, &lines);
        let counts: Vec<u64> = files.iter().map(|f| f.summary.resources).collect();
        assert_eq!(counts, [3, 3, 3, 1], "{compression:?}");
        let indexes: Vec<u32> = files.iter().map(|f| f.summary.file).collect();
        assert_eq!(indexes, [0, 1, 2, 3]);
    }
    // Exactly divisible: no trailing empty file.
    let files = round_trip(Compression::None, count_limit(5), None, &lines);
    assert_eq!(files.len(), 2);
    let files = round_trip(Compression::None, count_limit(1), None, &lines);
    assert_eq!(files.len(), 10);
}

#[test]
fn split_by_bytes_plain() {
    let lines = fhir_lines(2000);
    let max_bytes = 64 * 1024;
    let files = round_trip(Compression::None, bytes_limit(max_bytes), Some(4096), &lines);
    assert!(files.len() > 10, "{} files", files.len());
    let counts: Vec<u64> = files.iter().map(|f| f.summary.resources).collect();
    assert_eq!(counts, greedy_counts(&lines, max_bytes));
    let mut next_line = 0;
    for (n, file) in files.iter().enumerate() {
        assert!(file.summary.bytes <= max_bytes, "{:?}", file.summary);
        next_line += file.summary.resources as usize;
        if n + 1 < files.len() {
            // Files are packed greedily: the next line would not have fitted.
            let next = lines[next_line].len() as u64 + 1;
            assert!(file.summary.bytes + next > max_bytes);
        }
    }
}

#[test]
fn plain_line_larger_than_limit_gets_its_own_file() {
    let mut lines = fhir_lines(6);
    let max = 2 * lines.iter().map(|l| l.len() as u64 + 1).max().unwrap();
    let huge = format!(r#"{{"resourceType":"Binary","data":"{}"}}"#, "A".repeat(3 * max as usize));
    lines.insert(3, huge.into_bytes());
    let files = round_trip(Compression::None, bytes_limit(max), Some(1024), &lines);
    let counts: Vec<u64> = files.iter().map(|f| f.summary.resources).collect();
    assert_eq!(counts, greedy_counts(&lines, max));
    assert_eq!(files.iter().filter(|f| f.summary.bytes > max).count(), 1);
    for file in &files {
        assert!(file.summary.bytes <= max || file.summary.resources == 1);
    }
    // A limit smaller than every line: one line per file.
    let files = round_trip(Compression::None, bytes_limit(10), None, &lines);
    assert_eq!(files.len(), lines.len());
}

#[test]
fn split_by_bytes_gzip() {
    let lines = fhir_lines(2000);
    for (level, max_bytes) in [(1, 40_000), (2, 30_000), (6, 25_000), (6, 30_000), (9, 20_000)] {
        let files = round_trip(gzip(level), bytes_limit(max_bytes), Some(8192), &lines);
        assert!(files.len() >= 3, "level {level}: only {} files", files.len());
        let total: u64 = files.iter().map(|f| f.summary.bytes).sum();
        let mut sizes = Vec::new();
        for (n, file) in files.iter().enumerate() {
            sizes.push(file.summary.bytes);
            // Deflate holds back at most about one block; allow it.
            assert!(file.summary.bytes <= max_bytes + 32 * 1024, "level {level}: {:?}", file.summary);
            if n + 1 < files.len() {
                // The estimate must not be wildly conservative.
                assert!(file.summary.bytes * 10 > max_bytes * 8, "level {level}: {:?}", file.summary);
            }
        }
        eprintln!("level {level} max {max_bytes}: {total} bytes in files {sizes:?}");
    }
}

#[test]
fn gzip_line_larger_than_limit_gets_its_own_file() {
    let mut lines = fhir_lines(20);
    // Incompressible-ish base64 so the compressed line exceeds the limit.
    let mut state = 0x2545_f491_u32;
    let noise: String = (0..40_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[(state % 64) as usize])
        })
        .collect();
    let huge = format!(r#"{{"resourceType":"Binary","data":"{noise}"}}"#);
    lines.insert(10, huge.into_bytes());
    let files = round_trip(gzip(6), bytes_limit(10_000), Some(4096), &lines);
    let big = files.iter().find(|f| f.summary.bytes > 10_000 + 8 * 1024).expect("the huge line's file");
    assert_eq!(big.summary.resources, 1);
}

#[test]
fn chunking() {
    let lines = fhir_volume(1_000_000);
    let longest = lines.iter().map(|l| l.len() + 1).max().unwrap();
    let chunk = 1024;
    for (compression, limits) in [
        (Compression::None, SplitLimits::default()),
        (gzip(1), SplitLimits::default()),
        (gzip(6), SplitLimits::default()),
        (Compression::None, count_limit(300)),
        (gzip(6), bytes_limit(30_000)),
    ] {
        let files = round_trip(compression, limits, Some(chunk), &lines);
        for file in &files {
            let (last, rest) = file.chunks.split_last().unwrap();
            assert!(rest.iter().all(|&c| c >= chunk), "{compression:?}: short chunk before the end of a file");
            assert!(
                file.chunks.iter().all(|&c| c <= chunk + longest),
                "{compression:?}: chunk larger than chunk size plus one line"
            );
            assert!(*last > 0);
        }
        if limits == SplitLimits::default() {
            assert_eq!(files.len(), 1);
            assert!(files[0].chunks.len() > 10);
        }
    }
}

#[test]
fn default_chunk_size_is_256_kib() {
    let lines = fhir_volume(1_000_000);
    let writer = NdjsonWriter::new(Compression::None, SplitLimits::default());
    assert_eq!(writer.chunk_size(), 256 * 1024);
    let files = round_trip(Compression::None, SplitLimits::default(), None, &lines);
    let (_, rest) = files[0].chunks.split_last().unwrap();
    assert!(!rest.is_empty());
    assert!(rest.iter().all(|&c| c == 256 * 1024));
}

#[test]
fn invalid_lines_are_rejected_and_write_nothing() {
    let good = fhir_lines(3);
    for compression in [Compression::None, gzip(6)] {
        let mut writer = NdjsonWriter::new(compression, count_limit(1)).with_chunk_size(1);
        let mut events = Vec::new();
        let bad: [&[u8]; 5] = [b"", b"{\"a\":1}\n", b"{\"a\":\n1}", b"{\"a\":1}\r", b"\r\n"];
        for line in bad {
            let err = writer.write_line(line, &mut events).unwrap_err();
            assert!(matches!(err, NdjsonError::InvalidLine { .. }), "{err:?}");
            assert!(events.is_empty());
            assert_eq!(writer.totals(), (0, 0));
        }
        // A JSON-escaped newline is fine.
        writer.write_line(br#"{"text":"a\nb\r\n"}"#, &mut events).unwrap();
        let before = events.len();
        let totals = writer.totals();
        let err = writer.write_line(b"", &mut events).unwrap_err();
        assert_eq!(err.to_string(), "invalid ndjson line: empty line");
        assert_eq!(events.len(), before, "no file may be started or finished");
        assert_eq!(writer.totals(), totals);

        // write_lines stops at the first bad line, keeping the ones before it.
        let batch: Vec<&[u8]> = vec![&good[0], &good[1], b"x\ny", &good[2]];
        assert!(writer.write_lines(batch, &mut events).is_err());
        writer.finish(&mut events).unwrap();
        let files = collect(&events);
        assert_eq!(files.len(), 3);
        let texts: Vec<Vec<u8>> = files.iter().map(|f| text(f, compression)).collect();
        assert_eq!(texts[0], b"{\"text\":\"a\\nb\\r\\n\"}\n");
        assert_eq!(lines_of(&texts[1]), [good[0].clone()]);
        assert_eq!(lines_of(&texts[2]), [good[1].clone()]);
    }
}

#[test]
fn empty_writer_emits_nothing() {
    for compression in [Compression::None, gzip(6)] {
        let writer = NdjsonWriter::new(compression, count_limit(1));
        assert_eq!(writer.totals(), (0, 0));
        let mut events = Vec::new();
        writer.finish(&mut events).unwrap();
        assert!(events.is_empty());

        let mut writer = NdjsonWriter::new(compression, SplitLimits::default());
        assert!(writer.write_line(b"", &mut events).is_err());
        writer.finish(&mut events).unwrap();
        assert!(events.is_empty());
    }
}

#[test]
fn finished_comes_before_next_files_data() {
    let lines = fhir_lines(50);
    for compression in [Compression::None, gzip(6)] {
        let (events, _) = run(compression, count_limit(7), Some(512), &lines);
        let mut finished = 0;
        for event in &events {
            match event {
                Event::Data { file, .. } => assert_eq!(*file, finished),
                Event::Finished(summary) => {
                    assert_eq!(summary.file, finished);
                    finished += 1;
                }
            }
        }
        assert_eq!(finished, 8);
        assert!(matches!(events.last(), Some(Event::Finished(_))));
    }
}

#[test]
fn both_limits_apply() {
    let lines = fhir_lines(400);
    let limits = SplitLimits { max_resources: 50, max_bytes: 40_000 };
    let files = round_trip(Compression::None, limits, None, &lines);
    for file in &files {
        assert!(file.summary.resources <= 50);
        assert!(file.summary.bytes <= 40_000);
    }
    assert!(files.iter().any(|f| f.summary.resources == 50) || files.len() >= 8);
}

#[test]
fn joined_lines_stay_in_the_file_of_the_line_before_them() {
    // Blocks of 4 lines: a split may only come before a block's first line.
    let lines = fhir_lines(40);
    for (compression, limits) in [
        (Compression::None, count_limit(6)),
        (gzip(6), count_limit(6)),
        (Compression::None, bytes_limit(2000)),
        (gzip(1), bytes_limit(1000)),
    ] {
        let mut w = NdjsonWriter::new(compression, limits);
        let mut events = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if i % 4 == 0 {
                w.write_line(line, &mut events).unwrap();
            } else {
                w.write_line_joined(line, &mut events).unwrap();
            }
        }
        w.finish(&mut events).unwrap();
        let files = collect(&events);
        assert!(files.len() > 1, "{compression:?} {limits:?}: the limits split the output");
        let mut all = Vec::new();
        for file in &files {
            let file_lines = lines_of(&text(file, compression));
            assert_eq!(file_lines.len() % 4, 0, "{compression:?} {limits:?}: whole blocks only");
            if limits.max_resources > 0 {
                assert!(file_lines.len() as u64 <= limits.max_resources + 3, "over by less than a block");
            }
            all.extend(file_lines);
        }
        assert!(all == lines, "lines come back unchanged and in order");
    }
    // A joined first line opens the first file.
    let mut w = NdjsonWriter::new(Compression::None, count_limit(1));
    let mut events = Vec::new();
    w.write_line_joined(&lines[0], &mut events).unwrap();
    w.write_line_joined(&lines[1], &mut events).unwrap();
    w.finish(&mut events).unwrap();
    assert_eq!(collect(&events).len(), 1);
    // Validation is the same.
    let mut w = NdjsonWriter::new(Compression::None, count_limit(1));
    assert!(w.write_line_joined(b"a\nb", &mut Vec::new()).is_err());
}
