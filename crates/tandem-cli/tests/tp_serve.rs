//! Tensor-parallel serving end to end: `tandem serve --tensor-parallel 2` (rank 0 in the
//! server, rank 1 a `tandem tp-rank` process) gives the one-rank deployment's greedy outputs,
//! streams, ends in-flight streams with errors when a rank is killed, reports it and comes
//! back; samples, preempts and cancels as one rank does; limits the machine cannot meet are
//! refused with clear messages.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Process ids of the `tp-rank` processes started by the deployment `d`.
fn ranks_of(d: &Deployment) -> Vec<u32> {
    let parent = d.child.id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1));
            String::from_utf8_lossy(&cmd).contains("tp-rank") && ppid == Some(parent.as_str())
        })
        .collect()
}

fn health(d: &Deployment) -> Value {
    let (_, text) = http(&d.http, "GET", "/healthz", None);
    serde_json::from_str(&text).unwrap()
}

#[test]
fn tensor_parallel_serving_matches_one_rank_and_survives_a_killed_rank() {
    // The default (fast) path: the ranks compute the one rank's sums in the same parts and
    // add them in the same order, so the outputs are the same bit for bit.
    let one = start("tp-one", &[]);
    let two = start("tp-two", &["--tensor-parallel", "2"]);
    assert_eq!(ranks_of(&two).len(), 1, "{}", two.log_tail());
    let prompts = golden_prompts();
    let want: Vec<String> = prompts.iter().map(|p| complete(&one, p)).collect();
    for (p, w) in prompts.iter().zip(&want) {
        assert_eq!(&complete(&two, p), w, "prompt {p:?}");
    }
    match stream_completion(&two.http, &prompts[0], 12) {
        Streamed::Complete(t) => assert_eq!(t, want[0]),
        Streamed::Error(e) => panic!("{e}"),
    }
    drop(one);

    // Kill rank 1 while streams are in flight: they end with errors, not hangs.
    let rank = ranks_of(&two)[0];
    let streams: Vec<_> = (0..3)
        .map(|i| {
            let (http, prompt) = (two.http.clone(), prompts[i].clone());
            std::thread::spawn(move || stream_completion(&http, &prompt, 2000))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    assert!(std::process::Command::new("kill")
        .args(["-9", &rank.to_string()])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    for h in streams {
        match h.join().unwrap() {
            Streamed::Error(e) => assert!(e.contains("rank") || e.contains("stopped"), "{e}"),
            Streamed::Complete(t) => panic!("a stream outlived its rank: {t:?}"),
        }
    }
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "streams took {:?} to end",
        t.elapsed()
    );
    // Until the replica is back: JSON 503s, then the same outputs from fresh ranks.
    let body =
        json!({"prompt": prompts[1], "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let t = Instant::now();
    loop {
        let (status, text) = http(&two.http, "POST", "/v1/completions", Some(&body));
        if status == 200 {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want[1]);
            break;
        }
        assert_eq!(status, 503, "{text}");
        assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string());
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never came back\n{}",
            two.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let h = health(&two);
    assert_eq!(h["status"], "ok", "{h}");
    assert!(h["restarts"].as_u64().unwrap() >= 1, "{h}");
    // The dead rank was reaped (no zombie) and a new one runs.
    assert!(!std::path::Path::new(&format!("/proc/{rank}")).exists());
    let now = ranks_of(&two);
    assert!(now.len() == 1 && now[0] != rank, "{now:?}");
}

#[test]
fn tensor_parallel_limits_are_refused_with_clear_messages() {
    let refused = |model: &str, extra: &[&str], why: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args([
                "serve",
                "--model",
                model,
                "--port",
                "0",
                "--restful-api-port",
                "0",
            ])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{extra:?}: {err}"
        );
    };
    let qwen = named_model_path("Qwen2.5-Coder-0.5B-Instruct");
    refused(
        qwen.to_str().unwrap(),
        &["--tensor-parallel", "3"],
        "exceeds the model's 2 KV heads",
    );
    let smol = model_path();
    let smol = smol.to_str().unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    refused(
        smol,
        // Three ranks per replica (the model's 3 KV heads allow it), one replica per core.
        &[
            "--tensor-parallel",
            "3",
            "--replica-num",
            &cores.to_string(),
        ],
        "ranks, but this process may run on",
    );
    refused(
        smol,
        &["--tensor-parallel", "2", "--etcd", "http://127.0.0.1:9"],
        "a router (--etcd without --role) runs no engine",
    );
    // A worker whose ranks are on other hosts names the group they join.
    refused(
        smol,
        &[
            "--tensor-parallel",
            "2",
            "--etcd",
            "http://127.0.0.1:9",
            "--role",
            "replica",
        ],
        "needs --tp-group NAME",
    );
    if cores >= 4 {
        // Replicas of tensor-parallel engines, where the cores allow it.
        let d = start(
            "tp-replicas",
            &["--tensor-parallel", "2", "--replica-num", "2"],
        );
        assert_eq!(ranks_of(&d).len(), 2);
        let p = &golden_prompts()[0];
        assert_eq!(complete(&d, p), complete(&d, p));
    } else {
        refused(
            smol,
            &["--tensor-parallel", "2", "--replica-num", "2"],
            "ranks, but this process may run on",
        );
    }
}

/// A `/metrics` value (the first sample of `name`).
fn metric(d: &Deployment, name: &str) -> f64 {
    let (_, text) = http(&d.http, "GET", "/metrics", None);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

fn completion(d: &Deployment, body: Value) -> String {
    let (status, text) = http(&d.http, "POST", "/v1/completions", Some(&body));
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

#[test]
fn tensor_parallel_sampling_preemption_and_cancellation_behave_as_one_rank() {
    // A pool of 12 blocks of 16 tokens: four 60-token generations at once do not fit, so
    // sequences are preempted and recomputed.
    let args = ["--num-blocks", "12", "--block-size", "16"];
    let one = start("tp-sampling-one", &args);
    let mut tp_args = args.to_vec();
    tp_args.extend(["--tensor-parallel", "2"]);
    let two = start("tp-sampling-two", &tp_args);
    let prompts = golden_prompts();

    // Sampling options (seeded): the same tokens as one rank.
    let sampled = |d: &Deployment, p: &[u32]| {
        completion(
            d,
            json!({"prompt": p, "max_tokens": 24, "temperature": 0.8, "top_p": 0.9,
                "top_k": 40, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.3,
                "ignore_eos": true}),
        )
    };
    for p in prompts.iter().take(3) {
        assert_eq!(sampled(&one, p), sampled(&two, p));
    }

    // Preemption under a full pool: the greedy outputs are unchanged.
    let run_four = |d: &Deployment| -> Vec<String> {
        let handles: Vec<_> = prompts
            .iter()
            .take(4)
            .map(|p| {
                let (http_addr, body) = (
                    d.http.clone(),
                    json!({"prompt": p, "max_tokens": 60, "temperature": 0, "ignore_eos": true}),
                );
                std::thread::spawn(move || {
                    let (status, text) = http(&http_addr, "POST", "/v1/completions", Some(&body));
                    assert_eq!(status, 200, "{text}");
                    let v: Value = serde_json::from_str(&text).unwrap();
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    assert_eq!(run_four(&one), run_four(&two));
    assert!(
        metric(&two, "tandem_preemptions_total") > 0.0,
        "{}",
        two.log_tail()
    );

    // A streaming client that disconnects: its sequence ends and its blocks come back.
    let s = stream_in_flight(&two.http, &prompts[0]);
    assert_eq!(metric(&two, "tandem_requests_running"), 1.0);
    drop(s);
    let t = Instant::now();
    while metric(&two, "tandem_requests_running") > 0.0
        || metric(&two, "tandem_kv_usage_ratio") > 0.0
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the disconnected request was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the ranks still serve.
    assert_eq!(complete(&two, &prompts[1]), complete(&one, &prompts[1]));
}
