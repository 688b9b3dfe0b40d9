//! A disaggregated deployment that survives its workers: `kill -9` of a prefill worker while
//! streams are in flight (every request completes or gets a clear error, long prompts keep
//! being served, the worker is restarted and serves again), and of the decode worker
//! mid-stream (its streams end with error events, requests succeed again after the restart).
//! In every case the workers' KV block counters return to zero.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn long_prompt(seed: u32) -> Vec<u32> {
    (0..48)
        .map(|i| 200 + (i * 37 + seed * 101) % 20000)
        .collect()
}

fn kill9(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn of_role<'a>(ws: &'a [Value], role: &str) -> Vec<&'a Value> {
    ws.iter().filter(|w| w["role"] == role).collect()
}

fn health(d: &Deployment) -> (u16, Value) {
    let (status, body) = http(&d.http, "GET", "/healthz", None);
    (status, serde_json::from_str(&body).unwrap())
}

fn metric(d: &Deployment, name: &str) -> f64 {
    let (_, body) = http(&d.http, "GET", "/metrics", None);
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[test]
fn a_killed_prefill_worker_is_replaced_while_requests_go_on() {
    let d = start(
        "pd-kill-prefill",
        &[
            "--prefill-workers",
            "1",
            "--decode-workers",
            "1",
            "--local-prefill-max",
            "8",
        ],
    );
    let ws = workers(&d);
    let prefill = pid(of_role(&ws, "prefill")[0]);
    let streams: Vec<_> = (0..8)
        .map(|i| {
            let (http, prompt) = (d.http.clone(), long_prompt(i));
            std::thread::spawn(move || stream_completion(&http, &prompt, 40))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    kill9(prefill);
    let outcomes: Vec<Streamed> = streams.into_iter().map(|h| h.join().unwrap()).collect();
    for o in &outcomes {
        match o {
            Streamed::Complete(t) => assert!(!t.is_empty()),
            Streamed::Error(e) => assert!(e.contains("message"), "{e}"),
        }
    }
    // Long prompts keep being served (by the decode worker, or the restarted prefill worker).
    for i in 0..3 {
        match stream_completion(&d.http, &long_prompt(100 + i), 8) {
            Streamed::Complete(_) => {}
            Streamed::Error(e) => panic!("a long prompt failed after the kill: {e}"),
        }
    }
    // The worker is restarted (a new process) and the deployment is healthy again.
    wait_workers(&d, 60, "the prefill worker was not restarted", |ws| {
        let p = of_role(ws, "prefill");
        p.len() == 1 && p[0].get("worker").is_some() && pid(p[0]) != prefill
    });
    let t = Instant::now();
    while health(&d).1["status"] != "ok" {
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", health(&d));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(metric(&d, "tandem_worker_restarts_total") >= 1.0);
    // It serves again: long prompts reach it.
    let before = stat(of_role(&workers(&d), "prefill")[0], "tokens_computed");
    assert!(matches!(
        stream_completion(&d.http, &long_prompt(7), 4),
        Streamed::Complete(_)
    ));
    assert!(stat(of_role(&workers(&d), "prefill")[0], "tokens_computed") > before);
    wait_workers(&d, 30, "KV was leaked", no_kv_held);
}

#[test]
fn a_killed_decode_worker_ends_its_streams_with_errors_and_comes_back() {
    let d = start(
        "pd-kill-decode",
        &[
            "--prefill-workers",
            "1",
            "--decode-workers",
            "1",
            "--local-prefill-max",
            "8",
        ],
    );
    let ws = workers(&d);
    let decode = pid(of_role(&ws, "decode")[0]);
    let streams: Vec<_> = (0..4)
        .map(|i| {
            let http = d.http.clone();
            let prompt: Vec<u32> = long_prompt(i)[..6].to_vec();
            std::thread::spawn(move || stream_completion(&http, &prompt, 400))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    kill9(decode);
    for h in streams {
        match h.join().unwrap() {
            Streamed::Error(e) => assert!(e.contains("message"), "{e}"),
            Streamed::Complete(t) => panic!("a stream outlived its decode worker: {t:?}"),
        }
    }
    // Until a decode worker is back, requests are refused with a JSON 503, never 200.
    let body = json!({"prompt": long_prompt(9), "max_tokens": 4, "temperature": 0});
    let t = Instant::now();
    loop {
        let (status, text) = http(&d.http, "POST", "/v1/completions", Some(&body));
        if status == 200 {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(
                !v["choices"][0]["text"].as_str().unwrap().is_empty(),
                "{text}"
            );
            break;
        }
        assert_eq!(status, 503, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"]["message"].is_string());
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the decode worker never came back: {text}\n{}",
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(metric(&d, "tandem_requests_failed_total") >= 4.0);
    wait_workers(&d, 30, "the decode worker was not restarted", |ws| {
        let w = of_role(ws, "decode");
        w.len() == 1 && w[0].get("worker").is_some() && pid(w[0]) != decode
    });
    wait_workers(&d, 30, "KV was leaked", no_kv_held);
}
