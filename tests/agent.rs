//! Runs the JS agent's own test suite (node's test runner) as part of
//! `cargo test`, so one command tests everything.

use std::process::Command;

#[test]
fn agent_suite_passes_under_node_test_runner() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("agent");
    let out = Command::new("node")
        .args(["--test", "--test-timeout=30000", "test/"])
        .current_dir(&dir)
        .output()
        .expect("running node --test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "agent tests failed:\n{text}");
    assert!(
        text.contains("# fail 0") || text.contains("ℹ fail 0"),
        "{text}"
    );
}
