//! Disaggregated serving end to end: `tandem serve --prefill-workers N --decode-workers M`
//! (worker processes linked by llm-datadist) gives the same greedy outputs as a colocated
//! deployment on the reference prompts, prefills short prompts locally, frees KV on both sides
//! when a streaming client disconnects, and moves a worker between roles; and the same outputs
//! on Qwen2.5-Coder-0.5B.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[test]
fn disaggregated_serving_matches_colocated_frees_kv_and_switches_roles() {
    let colocated = start("colocated", &[]);
    let pd = start(
        "disaggregated",
        &[
            "--prefill-workers",
            "2",
            "--decode-workers",
            "1",
            "--local-prefill-max",
            "4",
        ],
    );
    let ws = workers(&pd);
    assert_eq!(ws.len(), 3);
    assert_eq!(ws.iter().filter(|w| w["role"] == "prefill").count(), 2);
    let decode_links =
        ws.iter().find(|w| w["role"] == "decode").unwrap()["worker"]["links"].clone();
    assert_eq!(
        decode_links.as_array().unwrap().len(),
        2,
        "the decode worker links to both prefill workers"
    );

    // Same greedy outputs on the reference prompts.
    let prompts = golden_prompts();
    for p in &prompts {
        assert_eq!(complete(&pd, p), complete(&colocated, p), "prompt {p:?}");
    }
    // Conditional disaggregation: a prompt of at most 4 tokens prefills on the decode worker
    // (the prefill workers compute nothing for it); a longer new one on a prefill worker.
    let prefilled = || -> u64 {
        workers(&pd)
            .iter()
            .filter(|w| w["role"] == "prefill")
            .map(|w| stat(w, "tokens_computed"))
            .sum()
    };
    let before = prefilled();
    let short = vec![1, 504, 3458];
    assert_eq!(complete(&pd, &short), complete(&colocated, &short));
    assert_eq!(prefilled(), before);
    let long = vec![1, 504, 3458, 5, 1057, 2106, 42, 318];
    assert_eq!(complete(&pd, &long), complete(&colocated, &long));
    assert_eq!(prefilled(), before + long.len() as u64);

    // A streaming client that disconnects mid-flight: KV freed on every worker.
    let s = stream_in_flight(&pd.http, &prompts[0]);
    assert!(workers(&pd).iter().any(|w| stat(w, "blocks_in_use") > 0));
    drop(s);
    let t = Instant::now();
    loop {
        let ws = workers(&pd);
        let busy: u64 = ws
            .iter()
            .map(|w| {
                stat(w, "blocks_in_use")
                    + stat(w, "blocks_held")
                    + stat(w, "blocks_reserved")
                    + stat(w, "running")
            })
            .sum();
        if busy == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "KV not freed after a disconnect: {ws:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Move a prefill worker to decode (unlink, switch_role, relink) and back; still serving.
    let url = ws_url(&workers(&pd), "prefill");
    let (status, text) = http(
        &pd.http,
        "POST",
        "/admin/workers/role",
        Some(&json!({"url": url, "role": "decode"})),
    );
    assert_eq!(status, 200, "{text}");
    let ws = workers(&pd);
    assert_eq!(ws.iter().filter(|w| w["role"] == "decode").count(), 2);
    let moved = ws.iter().find(|w| w["url"] == url.as_str()).unwrap();
    assert_eq!(moved["worker"]["role"], "decoder");
    assert!(
        moved["worker"]["datadist_port"].is_null(),
        "a decoder stops listening"
    );
    for w in ws.iter().filter(|w| w["role"] == "decode") {
        assert_eq!(w["worker"]["links"].as_array().unwrap().len(), 1);
    }
    for p in prompts.iter().take(3) {
        assert_eq!(complete(&pd, p), complete(&colocated, p));
    }
    let (status, text) = http(
        &pd.http,
        "POST",
        "/admin/workers/role",
        Some(&json!({"url": url, "role": "prefill"})),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        workers(&pd)
            .iter()
            .filter(|w| w["role"] == "prefill")
            .count(),
        2
    );
    assert_eq!(
        complete(&pd, &prompts[1]),
        complete(&colocated, &prompts[1])
    );
    // The last worker of a role cannot move.
    let last = ws_url(&workers(&pd), "decode");
    let (status, _) = http(
        &pd.http,
        "POST",
        "/admin/workers/role",
        Some(&json!({"url": last, "role": "prefill"})),
    );
    assert_eq!(status, 400);
    // Malformed admin bodies get a JSON 400.
    for bad in [
        json!("not an object"),
        json!({"url": last, "role": "decode", "extra": 1}),
        json!({"url": last}),
    ] {
        let (status, text) = http(&pd.http, "POST", "/admin/workers/role", Some(&bad));
        assert_eq!(status, 400, "{text}");
        assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string());
    }
    // A colocated deployment has no workers to list.
    assert_eq!(http(&colocated.http, "GET", "/admin/workers", None).0, 404);
}

/// Disaggregated serving of Qwen2.5-Coder-0.5B (q/k/v biases, 2 KV heads, a Q5_0 / Q8_0 /
/// k-quant mix) gives the colocated outputs and leaves no KV behind.
#[test]
fn qwen_disaggregated_serving_matches_colocated() {
    let path = named_model_path("Qwen2.5-Coder-0.5B-Instruct");
    let model = path.to_str().unwrap();
    let colocated = start_model("qwen-colocated", model, &[]);
    let pd = start_model(
        "qwen-disaggregated",
        model,
        &[
            "--prefill-workers",
            "1",
            "--decode-workers",
            "1",
            "--local-prefill-max",
            "4",
        ],
    );
    for p in golden_prompts_of("qwen2.5-coder-0.5b_golden.json")
        .iter()
        .take(4)
    {
        assert_eq!(complete(&pd, p), complete(&colocated, p), "prompt {p:?}");
    }
    wait_workers(&pd, 10, "no KV held after the requests", no_kv_held);
}

/// Disaggregated serving with tensor-parallel workers on both sides (two ranks each): every
/// rank registers its KV shard as its own llm-datadist cluster and pulls its shard from the
/// prefill worker's same rank; the outputs are the colocated one-rank deployment's bit for
/// bit (the ranks add the same parts of each sum in the same order). A decode worker whose
/// rank is killed exits, is started again, and serves the same outputs.
#[test]
fn tensor_parallel_workers_hand_off_kv_shard_to_shard() {
    let colocated = start("tp-colocated", &[]);
    let pd = start(
        "tp-disaggregated",
        &[
            "--tensor-parallel",
            "2",
            "--prefill-workers",
            "1",
            "--decode-workers",
            "1",
            "--local-prefill-max",
            "2",
        ],
    );
    let ws = workers(&pd);
    let prefill = ws.iter().find(|w| w["role"] == "prefill").unwrap();
    assert_eq!(
        prefill["worker"]["rank_ports"].as_array().unwrap().len(),
        1,
        "{prefill}"
    );
    let prompts = golden_prompts();
    let want: Vec<String> = prompts.iter().map(|p| complete(&colocated, p)).collect();
    for (p, w) in prompts.iter().zip(&want) {
        assert_eq!(&complete(&pd, p), w, "prompt {p:?}");
    }
    let prefilled: u64 = workers(&pd)
        .iter()
        .filter(|w| w["role"] == "prefill")
        .map(|w| stat(w, "tokens_computed"))
        .sum();
    assert!(
        prefilled > 0,
        "the prompts were prefilled on the prefill worker"
    );
    wait_workers(&pd, 10, "no KV held after the requests", no_kv_held);

    // Kill the decode worker's rank 1: the worker exits with its engine, comes back, and the
    // outputs are the same again.
    let decode = pid(ws.iter().find(|w| w["role"] == "decode").unwrap());
    let rank = std::fs::read_to_string(format!("/proc/{decode}/task/{decode}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(std::process::Command::new("kill")
        .args(["-9", &rank])
        .status()
        .unwrap()
        .success());
    wait_workers(&pd, 60, "the decode worker was not restarted", |ws| {
        ws.iter()
            .any(|w| w["role"] == "decode" && w.get("worker").is_some() && pid(w) != decode)
    });
    let body =
        json!({"prompt": prompts[1], "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let t = Instant::now();
    loop {
        let (status, text) = http(&pd.http, "POST", "/v1/completions", Some(&body));
        if status == 200 {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want[1]);
            break;
        }
        assert_eq!(status, 503, "{text}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{text}\n{}",
            pd.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ws_url(ws: &[Value], role: &str) -> String {
    ws.iter().find(|w| w["role"] == role).unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string()
}
