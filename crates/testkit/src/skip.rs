//! Skipping a test that cannot run, visibly.
//!
//! libtest has no way to mark a test ignored once it runs, and it captures `eprintln!`, so
//! a test that returns early would pass in silence. [`skip`] therefore writes its line to
//! the process's real stderr (a direct write that libtest's capture does not see), appends
//! it to the tally file named by [`SKIP_LOG_VAR`] (which `scripts/test.sh` sums into its
//! closing line), and under CI, where the servers are there, fails the test instead.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// The environment variable naming the tally file each skip appends one line to.
pub const SKIP_LOG_VAR: &str = "TESTKIT_SKIP_LOG";

/// The start of every skip line, on stderr and in the tally file.
pub const SKIP_MARK: &str = "SKIPPED ";

/// Tests already reported, so a test that skips twice counts once.
static REPORTED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Reports that the running test cannot run, for `reason` (e.g. `no MySQL (set …)`); the
/// caller then returns early.
///
/// # Panics
/// When `CI` is set (to anything but empty, `0` or `false`): in CI the servers are there,
/// so a test that cannot reach them is a failure, not a skip.
#[allow(clippy::panic)]
pub fn skip(reason: &str) {
    let test = test_name();
    if is_ci(std::env::var("CI").ok().as_deref()) {
        panic!("{test} cannot run under CI ({reason}); CI must provide what it needs");
    }
    let first = REPORTED
        .lock()
        .map(|mut seen| seen.insert(test.clone()))
        .unwrap_or(true);
    if !first {
        return;
    }
    let line = skip_line(&test, reason);
    // A direct write: `eprintln!` would be captured by libtest and shown only on failure.
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os(SKIP_LOG_VAR).filter(|p| !p.is_empty()) {
        // The tally is a convenience for the summary; the stderr line above already
        // said it, so a tally that cannot be written is not the test's failure.
        let _ = append(Path::new(&path), &line);
    }
}

/// Whether the value of `CI` means "running in CI".
pub fn is_ci(value: Option<&str>) -> bool {
    match value.map(str::trim) {
        None | Some("" | "0") => false,
        Some(v) => !v.eq_ignore_ascii_case("false"),
    }
}

/// One skip line: `SKIPPED <test> [<test binary>]: <reason>\n`, on one line whatever the
/// reason holds.
pub fn skip_line(test: &str, reason: &str) -> String {
    let reason = reason.replace(['\n', '\r'], " ");
    let binary = test_binary();
    format!("{SKIP_MARK}{test} [{binary}]: {reason}\n")
}

/// The running test's name: libtest runs each test on a thread named after it.
fn test_name() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" && !name.starts_with("tokio-runtime-worker") => {
            name.to_owned()
        }
        _ => "<a test>".to_owned(),
    }
}

/// The test binary's name without cargo's hash (`mysql-0a1b…` → `mysql`).
fn test_binary() -> String {
    let stem = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
        _ => stem,
    }
}

fn append(path: &Path, line: &str) -> std::io::Result<()> {
    // One write of the whole line to a file opened for appending: the test binaries of one
    // run and the threads of one binary never interleave within a line.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::{is_ci, skip_line};

    #[test]
    fn what_counts_as_ci() {
        for ci in ["true", "1", "yes", "TRUE"] {
            assert!(is_ci(Some(ci)), "{ci}");
        }
        for not_ci in [None, Some(""), Some("0"), Some("false"), Some("False")] {
            assert!(!is_ci(not_ci), "{not_ci:?}");
        }
    }

    #[test]
    fn a_skip_line_is_one_line() {
        let line = skip_line("real::charge", "no MySQL (a\nb)");
        assert!(line.starts_with("SKIPPED real::charge ["), "{line}");
        assert!(line.ends_with("]: no MySQL (a b)\n"), "{line}");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
    }
}
