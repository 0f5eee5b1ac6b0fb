//! A skip must be seen: its line reaches the real stderr of a default (captured) test run
//! and the tally file, and under `CI` it fails the test. Each check runs this test binary
//! again as a child, filtered to the probe, so libtest's own capture is what is tested.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

/// Set in the child: the probe then skips instead of checking.
const CHILD: &str = "TESTKIT_SKIP_PROBE_CHILD";
const REASON: &str = "no probe server (this is the skip probe)";

fn run_child(test: &str, ci: Option<&str>, tally: Option<&std::path::Path>) -> Output {
    let mut child = Command::new(std::env::current_exe().unwrap());
    // Default output: libtest captures the test's prints, as in `cargo test`.
    child.args(["--exact", test, "--test-threads", "2"]);
    child
        .env(CHILD, "1")
        .env_remove("CI")
        .env_remove(testkit::SKIP_LOG_VAR);
    if let Some(ci) = ci {
        child.env("CI", ci);
    }
    if let Some(tally) = tally {
        child.env(testkit::SKIP_LOG_VAR, tally);
    }
    child.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_skip_is_shown_in_the_default_output_and_tallied() {
    if std::env::var_os(CHILD).is_some() {
        testkit::skip(REASON);
        return;
    }
    let tally = std::env::temp_dir().join(format!("skips-{}.log", uuid::Uuid::new_v4()));
    let out = run_child(
        "a_skip_is_shown_in_the_default_output_and_tallied",
        None,
        Some(&tally),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    let expected =
        format!("SKIPPED a_skip_is_shown_in_the_default_output_and_tallied [skip]: {REASON}\n");
    assert!(stderr.contains(&expected), "stderr: {stderr:?}");
    let tallied = std::fs::read_to_string(&tally).unwrap();
    let _ = std::fs::remove_file(&tally);
    assert_eq!(tallied, expected);
}

#[test]
fn a_skip_under_ci_fails_the_test_with_its_reason() {
    if std::env::var_os(CHILD).is_some() {
        testkit::skip(REASON);
        return;
    }
    let out = run_child(
        "a_skip_under_ci_fails_the_test_with_its_reason",
        Some("true"),
        None,
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("cannot run under CI") && stdout.contains(REASON),
        "{stdout}{stderr}"
    );
    assert!(stdout.contains("1 failed"), "{stdout}");
    assert!(!stderr.contains("SKIPPED"), "{stderr}");
}
