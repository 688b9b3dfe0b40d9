//! `tandem generate` end to end on the default model.

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
    let out = tandem(&[
        "generate",
        "--chat",
        "--prompt",
        "What is 2 + 2?",
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
