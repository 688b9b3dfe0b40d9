//! The Rust client for a running deployment (MII's `mii.client(name)`): finds it in the
//! registry and talks MII's gRPC contract.

use std::collections::HashMap;
use std::path::Path;

use crate::grpc::proto::model_response_client::ModelResponseClient;
use crate::grpc::proto::{
    value::OneofValues, MultiGenerationReply, MultiStringRequest, SingleGenerationReply, Value,
};
use crate::registry::{find, DeploymentRecord, RegistryError};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The deployment could not be found.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The connection failed.
    #[error("cannot reach deployment at {addr}: {why}")]
    Connect { addr: String, why: String },
    /// The server answered with an error status (boxed: a status is large).
    #[error("{}", .0.message())]
    Status(Box<tonic::Status>),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status(Box::new(s))
    }
}

/// A generation option as MII sends it over gRPC.
#[derive(Clone, Debug, PartialEq)]
pub enum KwValue {
    /// A string (`stop`).
    Str(String),
    /// An integer (`max_new_tokens`, `top_k`, `seed`, ...).
    Int(i64),
    /// A float (`top_p`, `temperature`, ...).
    Float(f32),
    /// A bool (`do_sample`, `ignore_eos`, ...).
    Bool(bool),
}

/// A connected client.
pub struct Client {
    inner: ModelResponseClient<tonic::transport::Channel>,
    /// The deployment's record.
    pub record: DeploymentRecord,
}

impl Client {
    /// Connects to deployment `name` registered under `home` (or to the default deployment of
    /// a model named `name`, as MII's `mii.client`).
    pub async fn connect(home: &Path, name: &str) -> Result<Client, ClientError> {
        let record = find(home, name)?;
        let addr = format!("http://{}", record.grpc);
        let inner = ModelResponseClient::connect(addr.clone())
            .await
            .map_err(|e| ClientError::Connect {
                addr,
                why: e.to_string(),
            })?
            .max_decoding_message_size(1 << 27)
            .max_encoding_message_size(1 << 27);
        Ok(Client { inner, record })
    }

    fn request(prompts: &[String], kwargs: &[(String, KwValue)]) -> MultiStringRequest {
        let query_kwargs: HashMap<String, Value> = kwargs
            .iter()
            .map(|(k, v)| {
                let o = match v.clone() {
                    KwValue::Str(s) => OneofValues::Svalue(s),
                    KwValue::Int(i) => OneofValues::Ivalue(i),
                    KwValue::Float(f) => OneofValues::Fvalue(f),
                    KwValue::Bool(b) => OneofValues::Bvalue(b),
                };
                (
                    k.clone(),
                    Value {
                        oneof_values: Some(o),
                    },
                )
            })
            .collect();
        MultiStringRequest {
            request: prompts.to_vec(),
            query_kwargs,
        }
    }

    /// Generates for `prompts` (batched by the server); replies in prompt order.
    pub async fn generate(
        &mut self,
        prompts: &[String],
        kwargs: &[(String, KwValue)],
    ) -> Result<Vec<SingleGenerationReply>, ClientError> {
        Ok(self
            .inner
            .generator_reply(Self::request(prompts, kwargs))
            .await?
            .into_inner()
            .response)
    }

    /// Streams one prompt: MII's replies as they come (dropping the stream cancels the
    /// request on the server).
    pub async fn generate_stream_replies(
        &mut self,
        prompt: &str,
        kwargs: &[(String, KwValue)],
    ) -> Result<tonic::Streaming<MultiGenerationReply>, ClientError> {
        Ok(self
            .inner
            .generator_reply_stream(Self::request(&[prompt.to_string()], kwargs))
            .await?
            .into_inner())
    }

    /// Streams one prompt, calling `on_piece` with each text piece; returns the final reply.
    pub async fn generate_stream(
        &mut self,
        prompt: &str,
        kwargs: &[(String, KwValue)],
        mut on_piece: impl FnMut(&str),
    ) -> Result<SingleGenerationReply, ClientError> {
        let mut s = self.generate_stream_replies(prompt, kwargs).await?;
        let mut last = None;
        while let Some(m) = s.message().await? {
            if let Some(r) = m.response.into_iter().next() {
                on_piece(&r.response);
                last = Some(r);
            }
        }
        last.ok_or_else(|| {
            ClientError::from(tonic::Status::internal("the stream ended without a reply"))
        })
    }

    /// Stops the whole deployment (MII's `terminate_server`).
    pub async fn terminate(&mut self) -> Result<(), ClientError> {
        self.inner.terminate(()).await?;
        Ok(())
    }
}
