//! The HTTP API over real sockets on 127.0.0.1 with the reference model: OpenAI routes (plain
//! and streaming, chat and completion), MII's REST route, bad requests, and disconnects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_engine::{Engine, EngineConfig};
use tandem_server::AppState;

struct Server {
    base: String,
    engine: Arc<Engine>,
    _rt: tokio::runtime::Runtime,
}

fn start() -> Server {
    start_with_key(None)
}

fn start_with_key(key: Option<&str>) -> Server {
    let path = tandem_model::fetch::ensure_default_model(false).expect("default model");
    let engine = Arc::new(
        Engine::start(tandem_model::load(&path).unwrap(), EngineConfig::default()).unwrap(),
    );
    let state = AppState::new(engine.clone(), "smol", "smol-mii-deployment")
        .with_api_key(key.map(String::from));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(tandem_server::serve(
        listener,
        state,
        std::future::pending(),
    ));
    Server {
        base,
        engine,
        _rt: rt,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The `data:` payloads of an SSE body.
async fn sse(base: &str, path: &str, body: Value) -> Vec<String> {
    let r = client()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(String::from)
        .collect()
}

#[test]
fn openai_and_mii_routes() {
    let s = start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let b = &s.base;
        let health: Value = client().get(format!("{b}/healthz")).send().await.unwrap().json().await.unwrap();
        assert_eq!(health["status"], "ok");
        let models: Value = client().get(format!("{b}/v1/models")).send().await.unwrap().json().await.unwrap();
        assert_eq!(models["data"][0]["id"], "smol");

        // Completion, greedy: text, usage, and the streamed version of the same request.
        let req = json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
        let (st, plain) = post(b, "/v1/completions", req.clone()).await;
        assert_eq!(st, 200, "{plain}");
        assert_eq!(plain["object"], "text_completion");
        assert_eq!(plain["choices"][0]["finish_reason"], "length");
        assert_eq!(plain["usage"]["completion_tokens"], 8);
        assert_eq!(plain["usage"]["prompt_tokens"], 5);
        let mut sreq = req.clone();
        sreq["stream"] = json!(true);
        sreq["stream_options"] = json!({"include_usage": true});
        let chunks = sse(b, "/v1/completions", sreq).await;
        assert_eq!(chunks.last().unwrap(), "[DONE]");
        let parsed: Vec<Value> = chunks[..chunks.len() - 1].iter().map(|c| serde_json::from_str(c).unwrap()).collect();
        let text: String = parsed.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
        assert_eq!(text, plain["choices"][0]["text"].as_str().unwrap());
        assert_eq!(parsed.last().unwrap()["usage"]["completion_tokens"], 8);

        // Prompts as token ids, several at once.
        let (st, ids) = post(b, "/v1/completions", json!({"prompt": [[504, 3575, 282, 4649, 314], [1604, 3987]], "max_tokens": 3, "temperature": 0})).await;
        assert_eq!(st, 200, "{ids}");
        assert_eq!(ids["choices"].as_array().unwrap().len(), 2);
        let (_, as_text) = post(b, "/v1/completions", json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})).await;
        assert_eq!(ids["choices"][0]["text"], as_text["choices"][0]["text"]);

        // Chat, plain and streamed.
        let chat = json!({"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 40, "temperature": 0});
        let (st, c) = post(b, "/v1/chat/completions", chat.clone()).await;
        assert_eq!(st, 200, "{c}");
        assert_eq!(c["choices"][0]["message"]["role"], "assistant");
        let answer = c["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        assert!(!answer.is_empty());
        let mut schat = chat.clone();
        schat["stream"] = json!(true);
        let chunks = sse(b, "/v1/chat/completions", schat).await;
        let parsed: Vec<Value> = chunks[..chunks.len() - 1].iter().map(|c| serde_json::from_str(c).unwrap()).collect();
        assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
        let streamed: String = parsed.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(streamed, answer);

        // MII's REST route: an array of responses in prompt order.
        let (st, m) = post(b, "/mii/smol-mii-deployment", json!({"prompts": ["The capital of France is", "Hi"], "max_new_tokens": 8, "do_sample": false})).await;
        assert_eq!(st, 200, "{m}");
        assert_eq!(m[0]["generated_text"], plain["choices"][0]["text"]);
        assert_eq!(m[0]["prompt_length"], 5);
        assert_eq!(m[1]["generated_length"], 8);
        let (st, _) = post(b, "/mii/other-deployment", json!({"prompts": "x"})).await;
        assert_eq!(st, 404);
    });
}

#[test]
fn bad_requests_get_json_errors_and_the_server_stays_healthy() {
    let s = start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let b = &s.base;
        let raw = client()
            .post(format!("{b}/v1/completions"))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(raw.status().as_u16(), 400);
        let e: Value = raw.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error");
        let long = "word ".repeat(9000);
        let cases = [
            ("/v1/completions", json!({"prompt": "x", "bogus": 1})),
            ("/v1/completions", json!({"prompt": "x", "top_p": 2.0})),
            ("/v1/completions", json!({"prompt": "x", "temperature": -1})),
            ("/v1/completions", json!({"prompt": "x", "n": 0})),
            ("/v1/completions", json!({"prompt": "x", "n": 99})),
            ("/v1/completions", json!({"prompt": "x", "max_tokens": 0})),
            ("/v1/completions", json!({"prompt": "x", "logit_bias": {"x": 1}})),
            ("/v1/completions", json!({"prompt": "x", "logit_bias": {"1": 500}})),
            ("/v1/completions", json!({"prompt": "x", "logit_bias": {"99999999": 1}})),
            ("/v1/completions", json!({"prompt": "x", "stop_token_ids": [99999999]})),
            ("/v1/completions", json!({"prompt": "x", "guided_regex": "(unclosed"})),
            ("/v1/completions", json!({"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]})),
            ("/v1/completions", json!({"prompt": "x", "guided_choice": []})),
            ("/v1/completions", json!({"prompt": "x", "guided_grammar": "start: nothing_here"})),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "x"}],
                       "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nope"}}}}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
                       "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
                       "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "tool", "content": "x"}]}),
            ),
            ("/tokenize", json!({})),
            ("/detokenize", json!({"tokens": [99999999]})),
            ("/v1/completions", json!({"prompt": ""})),
            ("/v1/completions", json!({"prompt": []})),
            ("/v1/completions", json!({"prompt": [999999]})),
            ("/v1/completions", json!({"prompt": long})),
            (
                "/v1/completions",
                json!({"prompt": "x", "presence_penalty": 3.0}),
            ),
            ("/v1/completions", json!([1, 2])),
            ("/v1/chat/completions", json!({"messages": []})),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user"}]}),
            ),
            (
                "/mii/smol-mii-deployment",
                json!({"prompts": "x", "top_p": 0}),
            ),
            ("/mii/smol-mii-deployment", json!({"prompt": "x"})),
        ];
        for (path, body) in cases {
            let (st, e) = post(b, path, body.clone()).await;
            assert_eq!(st, 400, "{path} {body}: {e}");
            assert!(e["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
        let (st, _) = post(
            b,
            "/v1/completions",
            json!({"model": "gpt-4", "prompt": "x"}),
        )
        .await;
        assert_eq!(st, 404);
        let big = client()
            .post(format!("{b}/v1/completions"))
            .body(vec![b'x'; tandem_server::MAX_BODY_BYTES + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(big.status().as_u16(), 413);
        // Still serving, and nothing leaked.
        let (st, ok) = post(
            b,
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0}),
        )
        .await;
        assert_eq!(st, 200, "{ok}");
        assert_eq!(s.engine.stats().blocks_in_use, 0);
    });
}

#[test]
fn client_disconnect_frees_kv() {
    let s = start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let b = &s.base;
        let mut r = client()
            .post(format!("{b}/v1/completions"))
            .json(&json!({"prompt": "Tell me a long story.", "max_tokens": 2000, "ignore_eos": true, "stream": true}))
            .send()
            .await
            .unwrap();
        let first = r.chunk().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("data:"));
        let t = Instant::now();
        while s.engine.stats().blocks_in_use == 0 {
            assert!(t.elapsed() < Duration::from_secs(20), "the request never held KV");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(r);
        let t = Instant::now();
        while s.engine.stats().blocks_in_use > 0 || s.engine.stats().running > 0 {
            assert!(t.elapsed() < Duration::from_secs(20), "KV not freed after disconnect");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}

#[test]
fn api_key_and_metrics() {
    let s = start_with_key(Some("sekret"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let b = &s.base;
        let body = json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0});
        let no_key = client()
            .post(format!("{b}/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(no_key.status().as_u16(), 401);
        let e: Value = no_key.json().await.unwrap();
        assert!(e["error"]["message"].as_str().unwrap().contains("API key"));
        let wrong = client()
            .post(format!("{b}/v1/completions"))
            .bearer_auth("nope")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status().as_u16(), 401);
        let ok = client()
            .post(format!("{b}/v1/completions"))
            .bearer_auth("sekret")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status().as_u16(), 200);
        // Health and metrics need no key.
        assert_eq!(
            client()
                .get(format!("{b}/healthz"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            200
        );
        let m = client()
            .get(format!("{b}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in [
            "tandem_requests_total 1",
            "tandem_request_errors_total 2",
            "tandem_generation_tokens_total 3",
            "tandem_time_to_first_token_seconds_count 1",
            "tandem_inter_token_latency_seconds_count 2",
            "tandem_e2e_request_latency_seconds_count 1",
            "tandem_requests_running 0",
            "tandem_kv_usage_ratio 0",
        ] {
            assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
        }
        assert!(m.contains("tandem_prefix_cache_hit_rate"));
    });
}

/// Two replicas share concurrent requests by load; a replica whose engine has stopped is taken
/// out of rotation (and reported in /metrics) while its requests go to the others.
#[test]
fn replicas_share_load_and_a_failed_one_is_taken_out() {
    let path = tandem_model::fetch::ensure_default_model(false).expect("default model");
    let start_engine =
        || Engine::start(tandem_model::load(&path).unwrap(), EngineConfig::default()).unwrap();
    let mut dead = start_engine();
    dead.shutdown();
    let live: Vec<Arc<Engine>> = (0..2).map(|_| Arc::new(start_engine())).collect();
    let replicas = tandem_server::replicas::Replicas::new(vec![
        Arc::new(dead),
        live[0].clone(),
        live[1].clone(),
    ]);
    let state = AppState::new(replicas, "smol", "smol-mii-deployment");
    let replicas = state.replicas.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(tandem_server::serve(listener, state, std::future::pending()));
        let reqs = (0..6).map(|i| {
            let base = base.clone();
            async move {
                let body = json!({"prompt": format!("Request number {i}:"), "max_tokens": 24, "temperature": 0, "ignore_eos": true});
                post(&base, "/v1/completions", body).await
            }
        });
        for (st, r) in futures_util::future::join_all(reqs).await {
            assert_eq!(st, 200, "{r}");
            assert_eq!(r["usage"]["completion_tokens"], 24);
        }
        let served = replicas.served();
        assert_eq!(served[0], 0, "the stopped replica serves nothing");
        assert!(served[1] >= 2 && served[2] >= 2, "both live replicas take requests: {served:?}");
        assert_eq!(replicas.counts(), (3, 2));
        let m = client().get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(m.lines().any(|l| l == "tandem_replicas_up 2"), "{m}");
    });
}

#[test]
fn a_stopped_replica_is_restarted() {
    let path = tandem_model::fetch::ensure_default_model(false).expect("default model");
    let start_engine =
        move || Engine::start(tandem_model::load(&path).unwrap(), EngineConfig::default()).unwrap();
    let mut dead = start_engine();
    dead.shutdown();
    let builds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = builds.clone();
    let restart: tandem_server::replicas::Restart = Arc::new(move |i| {
        assert_eq!(i, 0, "only the stopped replica is rebuilt");
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Arc::new(start_engine()) as Arc<dyn tandem_server::replicas::Generator>)
    });
    let live = Arc::new(
        Engine::start(
            tandem_model::load(&tandem_model::fetch::ensure_default_model(false).unwrap()).unwrap(),
            EngineConfig::default(),
        )
        .unwrap(),
    );
    let replicas =
        tandem_server::replicas::Replicas::new(vec![Arc::new(dead), live]).with_restart(restart);
    let state = AppState::new(replicas, "smol", "smol-mii-deployment");
    let replicas = state.replicas.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(tandem_server::serve(
            listener,
            state,
            std::future::pending(),
        ));
        let ask = || {
            let base = base.clone();
            async move {
                let body = json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0});
                post(&base, "/v1/completions", body).await
            }
        };
        // The stopped replica is found at the first request, which the live one serves.
        let (st, r) = ask().await;
        assert_eq!(st, 200, "{r}");
        let health = |base: String| async move {
            let r = client()
                .get(format!("{base}/healthz"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        };
        let (st, h) = health(base.clone()).await;
        if replicas.counts() == (2, 1) {
            assert_eq!((st, h["status"].as_str()), (200, Some("degraded")), "{h}");
        }
        let t = Instant::now();
        while replicas.counts() != (2, 2) {
            assert!(t.elapsed() < Duration::from_secs(60), "never restarted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (st, h) = health(base.clone()).await;
        assert_eq!(
            (st, h["status"].as_str(), h["restarts"].as_u64()),
            (200, Some("ok"), Some(1)),
            "{h}"
        );
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Both serve again.
        for _ in 0..4 {
            let (st, r) = ask().await;
            assert_eq!(st, 200, "{r}");
        }
        let served = replicas.served();
        assert!(
            served[0] >= 1,
            "the restarted replica takes requests: {served:?}"
        );
        let m = client()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            m.lines().any(|l| l == "tandem_worker_restarts_total 1"),
            "{m}"
        );
    });
}
