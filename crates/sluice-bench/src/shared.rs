//! What the benchmark binaries use: running commands, building the local-storage `sluice`
//! and starting `sluice serve` on an embedded store. Each binary uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A benchmark step's result; the error is printed as it is.
pub type Res<T> = Result<T, String>;

/// Runs `cmd`; its trimmed stdout, or its stderr as the error.
pub fn sh(cmd: &mut Command) -> Res<String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The URL a starting `sluice serve` (spawned with a piped stdout) prints in its
/// `sluice listening on <url>` line; the rest of its stdout is drained in the background.
pub fn listening_url(child: &mut Child) -> Res<String> {
    let stdout = child.stdout.take().ok_or("sluice serve's stdout is not piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(u) = l.strip_prefix("sluice listening on ") {
                    break u.trim().to_string();
                }
            }
            _ => return Err("sluice serve did not start".into()),
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok(url)
}

/// The release `sluice` binary built `--no-default-features` (local storage, no cloud
/// SDKs) next to the running one, built if needed by the cargo running this bench, into
/// the same target folder.
pub fn local_sluice_bin() -> Res<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/release/<this binary>
    let target = exe.parent().and_then(Path::parent).ok_or("cannot tell the target folder")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    sh(Command::new(cargo)
        .args(["build", "--release", "-q", "-p", "sluice", "--no-default-features"])
        .env("CARGO_TARGET_DIR", target)
        .current_dir(env!("CARGO_MANIFEST_DIR")))?;
    Ok(exe.with_file_name("sluice"))
}

/// The files of `set` to load: its resource files (`<Type>.000.ndjson.gz`), and the names
/// of those skipped. A bulk-export folder may hold other NDJSON (a client's
/// `log.ndjson.gz`) that `sluice load` rejects, as it rejects any line without a
/// `resourceType`.
pub fn resource_files(set: &Path) -> Res<(Vec<PathBuf>, Vec<String>)> {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for e in std::fs::read_dir(set).map_err(|e| format!("{}: {e}", set.display()))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ndjson = name.ends_with(".ndjson") || name.ends_with(".ndjson.gz");
        if ndjson && name.starts_with(|c: char| c.is_ascii_uppercase()) {
            files.push(e.path());
        } else {
            skipped.push(name);
        }
    }
    files.sort();
    skipped.sort();
    if files.is_empty() {
        return Err(format!("{}: no <Type>.ndjson(.gz) files", set.display()));
    }
    Ok((files, skipped))
}

/// A `sluice serve` on an embedded store in a temporary folder, removed with it.
pub struct EmbeddedServer {
    pub child: Child,
    pub url: String,
    pub dir: PathBuf,
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl EmbeddedServer {
    /// Starts `bin serve` on 127.0.0.1 (a free port) with `args`, loading `files`, in the
    /// folder `sluice-<label>-<pid>` under the temporary folder; its log goes to `stderr`.
    pub fn start(bin: &Path, label: &str, args: &[&str], files: &[PathBuf], stderr: Stdio) -> Res<EmbeddedServer> {
        let dir = std::env::temp_dir().join(format!("sluice-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .args(args)
            .arg("--load")
            .args(files)
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        // From here on, dropping the server kills it and removes its folder.
        let mut server = EmbeddedServer { child, url: String::new(), dir };
        server.url = listening_url(&mut server.child).map_err(|e| format!("{e} ({label})"))?;
        Ok(server)
    }

    /// User plus system CPU time the process has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which is in parentheses and may hold spaces):
        // state is field 3, utime 14 and stime 15, in clock ticks (100 a second on Linux).
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(14) + ticks(15)) / 100.0
    }

    /// A `/proc/<pid>/status` figure in KiB (`VmHWM`: peak resident set; `VmRSS`: now).
    pub fn memory_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
        line.trim().trim_end_matches("kB").trim().parse().ok()
    }

    /// Whether the process still runs (it exists and is not a zombie).
    pub fn running(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next());
        matches!(state, Some(s) if s != "Z" && s != "X")
    }
}
