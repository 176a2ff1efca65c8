//! What both benchmark binaries use: running commands and starting `sluice serve`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};

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
