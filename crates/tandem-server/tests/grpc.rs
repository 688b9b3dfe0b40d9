//! MII's gRPC contract over a real socket on 127.0.0.1: both RPCs, options in `query_kwargs`,
//! bad options, and `Terminate` stopping the server.

use std::collections::HashMap;
use std::sync::Arc;

use tandem_engine::{Engine, EngineConfig};
use tandem_server::grpc::proto::model_response_client::ModelResponseClient;
use tandem_server::grpc::proto::{value::OneofValues, MultiStringRequest, Value};
use tandem_server::AppState;

fn v(o: OneofValues) -> Value {
    Value {
        oneof_values: Some(o),
    }
}

fn request(prompts: &[&str], kwargs: &[(&str, OneofValues)]) -> MultiStringRequest {
    MultiStringRequest {
        request: prompts.iter().map(|s| s.to_string()).collect(),
        query_kwargs: kwargs
            .iter()
            .map(|(k, o)| (k.to_string(), v(o.clone())))
            .collect::<HashMap<_, _>>(),
    }
}

#[test]
fn generator_reply_stream_and_terminate() {
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
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(tokio::sync::Notify::new());
        let server = tokio::spawn(tandem_server::grpc::serve(listener, state, stop));
        let mut c = ModelResponseClient::connect(format!("http://{addr}"))
            .await
            .unwrap();

        let greedy = [
            ("max_new_tokens", OneofValues::Ivalue(8)),
            ("do_sample", OneofValues::Bvalue(false)),
        ];
        let r = c
            .generator_reply(request(&["The capital of France is", "Hi"], &greedy))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.response.len(), 2);
        let first = &r.response[0];
        assert_eq!(
            (
                first.finish_reason.as_str(),
                first.prompt_tokens,
                first.generated_tokens
            ),
            ("length", 5, 8)
        );
        assert_eq!(first.time_taken, -1.0);
        assert!(first.response.starts_with(" Paris"));

        // Streaming: one message per token with finish_reason "none", then an empty final one.
        let mut s = c
            .generator_reply_stream(request(&["The capital of France is"], &greedy))
            .await
            .unwrap()
            .into_inner();
        let mut msgs = vec![];
        while let Some(m) = s.message().await.unwrap() {
            msgs.push(m.response[0].clone());
        }
        let last = msgs.pop().unwrap();
        assert_eq!(
            (
                last.finish_reason.as_str(),
                last.response.as_str(),
                last.generated_tokens
            ),
            ("length", "", 8)
        );
        assert!(msgs.iter().all(|m| m.finish_reason == "none"));
        let text: String = msgs.iter().map(|m| m.response.as_str()).collect();
        assert_eq!(text, first.response);

        // Options MII sends as floats and strings; a stop string as svalue.
        let opts = [
            ("max_new_tokens", OneofValues::Ivalue(16)),
            ("do_sample", OneofValues::Bvalue(false)),
            ("stop", OneofValues::Svalue(".".into())),
            ("top_p", OneofValues::Fvalue(0.5)),
        ];
        let r = c
            .generator_reply(request(&["The capital of France is"], &opts))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.response[0].finish_reason, "stop");
        assert!(!r.response[0].response.contains('.'));

        // Bad options are INVALID_ARGUMENT and the server keeps serving.
        for bad in [
            request(&["x"], &[("bogus", OneofValues::Ivalue(1))]),
            request(&["x"], &[("top_p", OneofValues::Fvalue(2.0))]),
            request(
                &["x"],
                &[("max_new_tokens", OneofValues::Svalue("many".into()))],
            ),
            request(&[], &[]),
            request(&[""], &[]),
        ] {
            let e = c.generator_reply(bad).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
        let r = c
            .generator_reply(request(&["Hi"], &greedy))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.response[0].generated_tokens, 8);

        // A streaming client that goes away cancels its request and frees its KV.
        let long = [
            ("max_new_tokens", OneofValues::Ivalue(2000)),
            ("do_sample", OneofValues::Bvalue(false)),
            ("ignore_eos", OneofValues::Bvalue(true)),
        ];
        let mut s = c
            .generator_reply_stream(request(&["Tell me a long story."], &long))
            .await
            .unwrap()
            .into_inner();
        for _ in 0..3 {
            assert_eq!(
                s.message().await.unwrap().unwrap().response[0].finish_reason,
                "none"
            );
        }
        assert!(engine.stats().blocks_in_use > 0);
        drop(s);
        let t = std::time::Instant::now();
        while engine.stats().blocks_in_use > 0 || engine.stats().running > 0 {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "KV not freed after the stream was dropped"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }

        // Terminate stops the server.
        c.terminate(()).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("server stopped")
            .unwrap()
            .unwrap();
    });
}
