//! MII's gRPC contract (`modelresponse.ModelResponse`): `GeneratorReply`,
//! `GeneratorReplyStream` and `Terminate`, wire-compatible with stubs generated from MII's
//! proto. Options travel in `query_kwargs` as MII sends them (typed `Value`s) and are parsed
//! exactly like the REST route's JSON options.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use serde_json::{Map, Value as Json};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::mii::{complete, parse_call, stream_one};
use crate::state::AppState;

/// Code generated from `proto/modelresponse.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("modelresponse");
}

use proto::model_response_server::{ModelResponse, ModelResponseServer};
use proto::value::OneofValues;
use proto::{MultiGenerationReply, MultiStringRequest, SingleGenerationReply};

/// MII's message size limit (2**27 bytes) each way.
const MAX_MESSAGE: usize = 1 << 27;

/// The gRPC service over the shared state. `Terminate` notifies `shutdown`.
pub struct GrpcService {
    state: AppState,
    shutdown: Arc<Notify>,
}

impl GrpcService {
    /// The service, wrapped for tonic with MII's message limits.
    pub fn server(state: AppState, shutdown: Arc<Notify>) -> ModelResponseServer<GrpcService> {
        ModelResponseServer::new(GrpcService { state, shutdown })
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

fn to_json(v: &proto::Value) -> Result<Json, ApiError> {
    Ok(match &v.oneof_values {
        Some(OneofValues::Svalue(s)) => Json::from(s.clone()),
        Some(OneofValues::Ivalue(i)) => Json::from(*i),
        Some(OneofValues::Fvalue(f)) => Json::from(*f as f64),
        Some(OneofValues::Bvalue(b)) => Json::from(*b),
        Some(OneofValues::Mvalue(d)) => Json::Object(
            d.values
                .iter()
                .map(|(k, v)| Ok((k.clone(), to_json(v)?)))
                .collect::<Result<Map<_, _>, ApiError>>()?,
        ),
        None => return Err(ApiError::invalid("a query_kwargs value is empty", None)),
    })
}

fn status(e: ApiError) -> Status {
    if e.status.is_client_error() {
        Status::invalid_argument(e.message)
    } else {
        Status::unavailable(e.message)
    }
}

/// The REST-shaped JSON body for a gRPC request.
fn body(req: MultiStringRequest) -> Result<Json, ApiError> {
    let mut obj = Map::new();
    for (k, v) in &req.query_kwargs {
        obj.insert(k.clone(), to_json(v)?);
    }
    obj.insert("prompts".into(), Json::from(req.request));
    Ok(Json::Object(obj))
}

fn reply(
    text: String,
    finish: &str,
    prompt_tokens: usize,
    generated_tokens: usize,
) -> SingleGenerationReply {
    SingleGenerationReply {
        response: text,
        finish_reason: finish.to_string(),
        prompt_tokens: prompt_tokens as i64,
        generated_tokens: generated_tokens as i64,
        time_taken: -1.0,
        model_time_taken: -1.0,
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<MultiGenerationReply, Status>> + Send>>;

#[tonic::async_trait]
impl ModelResponse for GrpcService {
    async fn terminate(&self, _: Request<()>) -> Result<Response<()>, Status> {
        tracing::info!("Terminate received: shutting the deployment down");
        self.shutdown.notify_waiters();
        Ok(Response::new(()))
    }

    async fn generator_reply(
        &self,
        req: Request<MultiStringRequest>,
    ) -> Result<Response<MultiGenerationReply>, Status> {
        let call =
            parse_call(&self.state, body(req.into_inner()).map_err(status)?).map_err(status)?;
        let done = complete(&self.state, call).await.map_err(status)?;
        let response = done
            .into_iter()
            .map(|f| reply(f.text, f.finish, f.prompt_tokens, f.generated_tokens))
            .collect();
        Ok(Response::new(MultiGenerationReply { response }))
    }

    type GeneratorReplyStreamStream = ReplyStream;

    /// As MII: only the first prompt streams; one message per token with its text and
    /// `finish_reason` "none", then a final message with empty text and the finish reason.
    async fn generator_reply_stream(
        &self,
        req: Request<MultiStringRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let mut req = req.into_inner();
        req.request.truncate(1);
        let call = parse_call(&self.state, body(req).map_err(status)?).map_err(status)?;
        let prompt_tokens = call.ids.first().map_or(0, Vec::len);
        let events = stream_one(&self.state, call).map_err(status)?;
        let mut generated = 0usize;
        let out = events.flat_map(move |ev| {
            // A failed request ends its stream with UNAVAILABLE.
            if let Some(e) = ev.finish.as_ref().and_then(ApiError::from_finish) {
                return futures_util::stream::iter(vec![Err(status(e))]);
            }
            generated += ev.token.is_some() as usize;
            let mut msgs = Vec::with_capacity(2);
            if ev.token.is_some() || !ev.text.is_empty() {
                msgs.push(Ok(MultiGenerationReply {
                    response: vec![reply(ev.text, "none", prompt_tokens, generated)],
                }));
            }
            if let Some(f) = ev.finish {
                msgs.push(Ok(MultiGenerationReply {
                    response: vec![reply(String::new(), f.as_str(), prompt_tokens, generated)],
                }));
            }
            futures_util::stream::iter(msgs)
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Serves the gRPC API on `listener` until `shutdown` is notified (by `Terminate` or the caller).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: Arc<Notify>,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stop = shutdown.clone();
    tonic::transport::Server::builder()
        .add_service(GrpcService::server(state, shutdown))
        .serve_with_incoming_shutdown(incoming, async move { stop.notified().await })
        .await
}
