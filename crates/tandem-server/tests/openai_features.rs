//! The rest of the OpenAI API over real sockets with the reference model: structured output,
//! tool calls (plain and streamed), `n` sharing one prompt prefill, penalties and
//! `logit_bias`, `stop_token_ids`, content parts, completions logprobs and prompt scoring,
//! and `/tokenize` / `/detokenize`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tandem_engine::{Engine, EngineConfig};
use tandem_server::AppState;

struct Server {
    base: String,
    engine: Arc<Engine>,
    rt: tokio::runtime::Runtime,
}

fn start() -> Server {
    let path = tandem_model::fetch::ensure_default_model(false).expect("default model");
    let engine = Arc::new(
        Engine::start(tandem_model::load(&path).unwrap(), EngineConfig::default()).unwrap(),
    );
    let state = AppState::new(engine.clone(), "smol", "smol-mii-deployment");
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
    Server { base, engine, rt }
}

impl Server {
    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.rt.block_on(async {
            let r = client()
                .post(format!("{}{path}", self.base))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json().await.unwrap())
        })
    }

    /// The `data:` payloads of an SSE response, parsed (`[DONE]`, which must end it, left out).
    fn sse(&self, path: &str, body: Value) -> Vec<Value> {
        let text = self.rt.block_on(async {
            let r = client()
                .post(format!("{}{path}", self.base))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.text().await.unwrap()
        });
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"));
        data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(180))
        .build()
        .unwrap()
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": false}}}])
}

#[test]
fn structured_outputs_on_both_routes() {
    let s = start();
    let schema = json!({"type": "object", "properties": {
        "answer": {"type": "integer"}, "reason": {"type": "string", "maxLength": 60}},
        "required": ["answer", "reason"], "additionalProperties": false});
    let (st, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "What is 2 + 2? Answer in JSON."}],
               "temperature": 0.7, "seed": 3, "max_tokens": 120,
               "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": true}}}),
    );
    assert_eq!(st, 200, "{r}");
    let v: Value =
        serde_json::from_str(r["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(v["answer"].is_i64() && v["reason"].is_string(), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 2);
    // vLLM's guided_choice on completions, streamed.
    let chunks = s.sse(
        "/v1/completions",
        json!({"prompt": "Is the sky blue? Answer:", "stream": true,
               "guided_choice": ["yes", "no", "sometimes"]}),
    );
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert!(
        ["yes", "no", "sometimes"].contains(&text.as_str()),
        "{text}"
    );
    // json_object.
    let (st, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Give me a JSON object about cats."}],
               "temperature": 0, "max_tokens": 200, "response_format": {"type": "json_object"}}),
    );
    assert_eq!(st, 200);
    let content = r["choices"][0]["message"]["content"].as_str().unwrap();
    if r["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(content).unwrap().is_object());
    }
    assert_eq!(s.engine.stats().blocks_in_use, 0);
}

#[test]
fn tool_calls_required_named_and_streamed() {
    let s = start();
    let ask = json!([{"role": "user", "content": "What's the weather like in Paris today?"}]);
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        let (st, r) = s.post(
            "/v1/chat/completions",
            json!({"messages": ask, "tools": weather_tools(), "tool_choice": choice, "temperature": 0}),
        );
        assert_eq!(st, 200, "{r}");
        let c = &r["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{r}");
        let call = &c["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(args["city"].is_string());
        assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()));
    }
    // Streamed: the call arrives as a tool_calls delta, the reason is tool_calls.
    let chunks = s.sse(
        "/v1/chat/completions",
        json!({"messages": ask, "tools": weather_tools(), "tool_choice": "required", "temperature": 0, "stream": true}),
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0][0]["index"], 0);
    assert_eq!(calls[0][0]["function"]["name"], "get_weather");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
    // The round trip: the call and its result in the history; the answer is text.
    let history = json!([
        {"role": "user", "content": "What's the weather like in Paris today?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 22, \"sky\": \"sunny\"}"}
    ]);
    let (st, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": history, "tools": weather_tools(), "tool_choice": "none", "temperature": 0, "max_tokens": 40}),
    );
    assert_eq!(st, 200, "{r}");
    assert!(r["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert!(r["choices"][0]["message"].get("tool_calls").is_none());
}

#[test]
fn n_choices_share_one_prompt_prefill() {
    let s = start();
    let prompt = "In a quiet town by the river there lived an old clockmaker who repaired every kind of clock. ".repeat(3);
    let before = s.engine.stats();
    let (st, r) = s.post(
        "/v1/completions",
        json!({"prompt": prompt, "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 5}),
    );
    assert_eq!(st, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let idx: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2]);
    let after = s.engine.stats();
    let tokens = s.engine.tokenizer().encode(&prompt, true).unwrap().len();
    let full_blocks = ((tokens - 1) / 16) as u64;
    // Choices 2 and 3 found every full block of the prompt in the prefix cache.
    assert_eq!(after.prefix_hits - before.prefix_hits, 2 * full_blocks);
    assert_eq!(r["usage"]["prompt_tokens"], tokens);
    assert_eq!(r["usage"]["completion_tokens"], 24);
    // The same seed gives the same three choices again.
    let (_, again) = s.post(
        "/v1/completions",
        json!({"prompt": prompt, "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 5}),
    );
    assert_eq!(again["choices"], r["choices"]);
    // Chat, streamed: every choice index ends.
    let chunks = s.sse(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 4, "stream": true}),
    );
    let mut ended: Vec<u64> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .map(|c| c["choices"][0]["index"].as_u64().unwrap())
        .collect();
    ended.sort();
    assert_eq!(ended, vec![0, 1]);
}

#[test]
fn penalties_bias_stop_ids_and_content_parts() {
    let s = start();
    let tok = s.engine.tokenizer().clone();
    let greedy = |extra: Value| {
        let mut body =
            json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (st, r) = s.post("/v1/completions", body);
        assert_eq!(st, 200, "{r}");
        r["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let plain = greedy(json!({}));
    let first = tok.encode(&plain, false).unwrap()[0];
    // Banning the first token changes the output; a big bias forces a token.
    let banned = greedy(json!({"logit_bias": {first.to_string(): -100}}));
    assert_ne!(tok.encode(&banned, false).unwrap()[0], first);
    let forced = tok.encode(" banana", false).unwrap()[0];
    let with_bias = greedy(json!({"logit_bias": {forced.to_string(): 100}}));
    assert!(
        with_bias.starts_with(&tok.decode(&[forced], false).unwrap()),
        "{with_bias}"
    );
    // Penalties are accepted and change a repetitive continuation.
    let rep = json!({"prompt": "one one one one one one", "max_tokens": 8, "temperature": 0});
    let (_, a) = s.post("/v1/completions", rep.clone());
    let mut pen = rep.clone();
    pen["frequency_penalty"] = json!(2.0);
    pen["presence_penalty"] = json!(2.0);
    let (st, b) = s.post("/v1/completions", pen);
    assert_eq!(st, 200);
    assert_ne!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // stop_token_ids ends at that token.
    let ids = tok.encode(&plain, false).unwrap();
    let stopped = greedy(json!({"stop_token_ids": [ids[2]]}));
    assert_eq!(stopped, tok.decode(&ids[..2], false).unwrap());
    // Content parts equal plain content.
    let ask = |content: Value| {
        let (st, r) = s.post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                                {"role": "user", "content": content}], "max_completion_tokens": 8, "temperature": 0}),
        );
        assert_eq!(st, 200, "{r}");
        r["choices"][0]["message"]["content"].clone()
    };
    assert_eq!(
        ask(json!([{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}])),
        ask(json!("What is 2+2?"))
    );
}

#[test]
fn completion_logprobs_scoring_and_tokenize() {
    let s = start();
    let (st, r) = s.post(
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(st, 200);
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);
    let text = r["choices"][0]["text"].as_str().unwrap();
    let joined: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(joined, text);
    // Scoring: echo, no new tokens; the first prompt token has nulls.
    let (st, r) = s.post(
        "/v1/completions",
        json!({"prompt": "The capital of France is Paris", "max_tokens": 0, "echo": true, "logprobs": 1}),
    );
    assert_eq!(st, 200, "{r}");
    let c = &r["choices"][0];
    assert_eq!(c["text"], "The capital of France is Paris");
    let lp = &c["logprobs"];
    let n = s
        .engine
        .tokenizer()
        .encode("The capital of France is Paris", true)
        .unwrap()
        .len();
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n);
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][n - 1].as_f64().unwrap() < 0.0);
    assert_eq!(r["usage"]["completion_tokens"], 0);
    // Tokenize / detokenize, vLLM's and llama.cpp's shapes.
    let (st, t) = s.post("/tokenize", json!({"prompt": "Hello world"}));
    assert_eq!(st, 200);
    assert_eq!(t["count"], t["tokens"].as_array().unwrap().len());
    let (_, t2) = s.post(
        "/tokenize",
        json!({"content": "Hello world", "with_pieces": true}),
    );
    assert_eq!(t2["tokens"][0]["id"], t["tokens"][0]);
    let (_, d) = s.post("/detokenize", json!({"tokens": t["tokens"]}));
    assert_eq!(
        (d["prompt"].as_str(), d["content"].as_str()),
        (Some("Hello world"), Some("Hello world"))
    );
    let (_, chat) = s.post(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert!(chat["count"].as_u64().unwrap() > 2);
    assert_eq!(s.engine.stats().blocks_in_use, 0);
}
