//! `tandem bench datadist` runs two processes, checks the pulled bytes, and prints GB/s beside
//! its raw baseline for both transports.

use std::process::Command;

#[test]
fn bench_datadist_runs_over_both_transports() {
    for transport in ["tcp", "shm"] {
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["bench", "datadist", "--transport", transport])
            .args([
                "--layers",
                "2",
                "--pool-blocks",
                "64",
                "--request-blocks",
                "16",
                "--requests",
                "3",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{transport}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("over {transport}")), "{stdout}");
        assert!(stdout.contains("ratio pull_blocks / baseline"), "{stdout}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "datadist", "--request-blocks", "5000"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--request-blocks"));
}
