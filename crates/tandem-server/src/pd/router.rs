//! The router in front of disaggregation workers: each request goes to the least-loaded
//! prefill worker, then to the least-loaded decode worker, which pulls the prompt's KV and
//! streams; short prompts go straight to a decode worker. It presents itself as one
//! [`Generator`], so the HTTP and gRPC front ends serve it like a local engine.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tandem_engine::{
    EngineError, EngineInfo, EngineStats, Event, EventStream, FinishReason, GenerateParams,
};
use tandem_model::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::wire::*;
use crate::replicas::Generator;

/// One worker as the router sees it.
pub struct WorkerHandle {
    /// Control URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// llm-datadist cluster id.
    pub cluster_id: u64,
    outstanding: AtomicI64,
    datadist_port: Mutex<Option<u16>>,
}

impl WorkerHandle {
    /// A worker at `url` with `cluster_id`.
    pub fn new(url: String, cluster_id: u64) -> Arc<Self> {
        Arc::new(Self {
            url,
            cluster_id,
            outstanding: AtomicI64::new(0),
            datadist_port: Mutex::new(None),
        })
    }
}

/// Holds a request's weight on a worker until dropped.
struct Load(Arc<WorkerHandle>, i64);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(self.1, Relaxed);
    }
}

/// Frees the producer's held KV when dropped (consumer has it, request over, or aborted).
struct Release {
    http: reqwest::Client,
    url: String,
    handle: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        let (http, url, handle) = (self.http.clone(), self.url.clone(), self.handle);
        tokio::spawn(async move {
            let body = ReleaseRequest { handle };
            if let Err(e) = http
                .post(format!("{url}/pd/release"))
                .json(&body)
                .send()
                .await
            {
                tracing::warn!("could not release held KV {handle} on {url}: {e}");
            }
        });
    }
}

/// A worker's role in the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdRole {
    /// Prefill (llm-datadist Prompt, listening).
    Prefill,
    /// Decode (llm-datadist Decoder, linked to every prefill worker).
    Decode,
}

/// The disaggregated deployment behind one front end.
pub struct PdRouter {
    prefill: RwLock<Vec<Arc<WorkerHandle>>>,
    decode: RwLock<Vec<Arc<WorkerHandle>>>,
    http: reqwest::Client,
    tokenizer: Arc<Tokenizer>,
    info: EngineInfo,
    local_prefill_max: usize,
    stats: Arc<Mutex<EngineStats>>,
    rt: tokio::runtime::Handle,
    /// Checks requests' grammars up front (the workers compile their own).
    grammars: tandem_engine::GrammarCompiler,
}

async fn post_json<B: Serialize, R: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    body: &B,
) -> Result<R, String> {
    let resp = http
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("{url}: {status}: {text}"));
    }
    resp.json().await.map_err(|e| format!("{url}: {e}"))
}

fn least_loaded(list: &RwLock<Vec<Arc<WorkerHandle>>>) -> Option<Arc<WorkerHandle>> {
    list.read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .min_by_key(|w| w.outstanding.load(Relaxed))
        .cloned()
}

fn error_event(msg: String) -> Event {
    tracing::error!("disaggregated request failed: {msg}");
    Event {
        token: None,
        text: String::new(),
        logprobs: None,
        finish: Some(FinishReason::Error(msg)),
        usage: None,
        prompt_logprobs: None,
    }
}

impl PdRouter {
    /// A router over linked workers. `info` and `tokenizer` describe the model they serve;
    /// prompts of at most `local_prefill_max` tokens are prefilled on the decode worker.
    pub async fn new(
        prefill: Vec<Arc<WorkerHandle>>,
        decode: Vec<Arc<WorkerHandle>>,
        tokenizer: Arc<Tokenizer>,
        local_prefill_max: usize,
    ) -> Result<Arc<Self>, String> {
        if prefill.is_empty() || decode.is_empty() {
            return Err("disaggregation needs at least one prefill and one decode worker".into());
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        let first: WorkerInfo = http
            .get(format!("{}/pd/info", decode[0].url))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let router = Arc::new(Self {
            prefill: RwLock::new(prefill),
            decode: RwLock::new(decode),
            http,
            grammars: tandem_engine::GrammarCompiler::new(tokenizer.clone(), first.info.vocab_size),
            tokenizer,
            info: first.info,
            local_prefill_max,
            stats: Arc::default(),
            rt: tokio::runtime::Handle::current(),
        });
        router.link_all().await?;
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            while let Some(r) = weak.upgrade() {
                r.refresh_stats().await;
                drop(r);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Ok(router)
    }

    fn list(&self, role: PdRole) -> &RwLock<Vec<Arc<WorkerHandle>>> {
        match role {
            PdRole::Prefill => &self.prefill,
            PdRole::Decode => &self.decode,
        }
    }

    fn snapshot(&self, role: PdRole) -> Vec<Arc<WorkerHandle>> {
        self.list(role)
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn worker_info(&self, w: &WorkerHandle) -> Result<WorkerInfo, String> {
        let info: WorkerInfo = self
            .http
            .get(format!("{}/pd/info", w.url))
            .send()
            .await
            .map_err(|e| format!("{}: {e}", w.url))?
            .json()
            .await
            .map_err(|e| format!("{}: {e}", w.url))?;
        *w.datadist_port.lock().unwrap_or_else(|p| p.into_inner()) = info.datadist_port;
        Ok(info)
    }

    async fn peer(&self, w: &WorkerHandle) -> Result<Peer, String> {
        let port = self
            .worker_info(w)
            .await?
            .datadist_port
            .ok_or_else(|| format!("prefill worker {} is not listening", w.url))?;
        Ok(Peer {
            cluster_id: w.cluster_id,
            host: "127.0.0.1".into(),
            port,
        })
    }

    async fn link(
        &self,
        decode: &WorkerHandle,
        prefill: &[Arc<WorkerHandle>],
        unlink: bool,
    ) -> Result<(), String> {
        let mut peers = Vec::new();
        for p in prefill {
            peers.push(self.peer(p).await?);
        }
        if peers.is_empty() {
            return Ok(());
        }
        let path = if unlink { "unlink" } else { "link" };
        let reply: StatusReply = post_json(
            &self.http,
            &format!("{}/pd/{path}", decode.url),
            &LinkRequest {
                peers,
                force: false,
            },
        )
        .await?;
        if reply.status != "LLM_SUCCESS" {
            return Err(format!(
                "{path} {} -> prefill workers: {} {:?} {}",
                decode.url, reply.status, reply.per_peer, reply.message
            ));
        }
        Ok(())
    }

    /// Links every decode worker to every prefill worker.
    async fn link_all(&self) -> Result<(), String> {
        let prefill = self.snapshot(PdRole::Prefill);
        for d in self.snapshot(PdRole::Decode) {
            self.link(&d, &prefill, false).await?;
        }
        Ok(())
    }

    async fn refresh_stats(&self) {
        let mut sum = EngineStats::default();
        for w in self
            .snapshot(PdRole::Prefill)
            .iter()
            .chain(&self.snapshot(PdRole::Decode))
        {
            if let Ok(i) = self.worker_info(w).await {
                sum += i.stats;
            }
        }
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = sum;
    }

    /// Every worker with its role and live facts.
    pub async fn workers(&self) -> Vec<(PdRole, String, Result<WorkerInfo, String>)> {
        let mut out = Vec::new();
        for role in [PdRole::Prefill, PdRole::Decode] {
            for w in self.snapshot(role) {
                out.push((role, w.url.clone(), self.worker_info(&w).await));
            }
        }
        out
    }

    /// Moves the worker at `url` to `to`: drains it, unlinks it, calls llm-datadist's
    /// `switch_role` on it (which enforces the seed's rules), and links it in its new role.
    pub async fn switch_role(&self, url: &str, to: PdRole) -> Result<(), String> {
        let from = if to == PdRole::Prefill {
            PdRole::Decode
        } else {
            PdRole::Prefill
        };
        let w = {
            let mut list = self.list(from).write().unwrap_or_else(|p| p.into_inner());
            let i = list
                .iter()
                .position(|w| w.url == url)
                .ok_or_else(|| format!("no {from:?} worker at {url}"))?;
            if list.len() == 1 {
                return Err(format!("{url} is the last {from:?} worker"));
            }
            list.remove(i)
        };
        let result = self.move_worker(&w, to).await;
        let home = if result.is_ok() { to } else { from };
        self.list(home)
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(w);
        if result.is_err() {
            let _ = self.link_all().await;
        }
        result
    }

    async fn move_worker(&self, w: &Arc<WorkerHandle>, to: PdRole) -> Result<(), String> {
        for _ in 0..600 {
            if w.outstanding.load(Relaxed) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url = format!("{}/pd/switch_role", w.url);
        let switch = |role: &str, listen: Option<String>| {
            let body = SwitchRoleRequest {
                role: role.into(),
                listen,
            };
            let (http, url) = (self.http.clone(), url.clone());
            async move { post_json::<_, StatusReply>(&http, &url, &body).await }
        };
        let ok = |r: StatusReply| {
            if r.status == "LLM_SUCCESS" {
                Ok(())
            } else {
                Err(format!(
                    "switch_role on {}: {} {}",
                    w.url, r.status, r.message
                ))
            }
        };
        match to {
            PdRole::Decode => {
                for d in self.snapshot(PdRole::Decode) {
                    self.link(&d, std::slice::from_ref(w), true).await?;
                }
                ok(switch("decoder", None).await?)?;
                self.link(w, &self.snapshot(PdRole::Prefill), false).await
            }
            PdRole::Prefill => {
                self.link(w, &self.snapshot(PdRole::Prefill), true).await?;
                ok(switch("prompt", Some("127.0.0.1:0".into())).await?)?;
                for d in self.snapshot(PdRole::Decode) {
                    self.link(&d, std::slice::from_ref(w), false).await?;
                }
                Ok(())
            }
        }
    }
}

/// What one request does: which workers, and how much of its budget remains after one token.
struct Plan {
    prefill: Option<(Arc<WorkerHandle>, Load)>,
    decode: (Arc<WorkerHandle>, Load),
    max_new: usize,
}

impl Generator for PdRouter {
    fn submit(&self, prompt: Vec<u32>, params: GenerateParams) -> Result<EventStream, EngineError> {
        let max_new = self.info.check(&prompt, &params)?;
        if let Some(g) = &params.grammar {
            self.grammars.compile(g)?;
        }
        let weight = (prompt.len() + max_new) as i64;
        let take = |w: Arc<WorkerHandle>| {
            w.outstanding.fetch_add(weight, Relaxed);
            (w.clone(), Load(w, weight))
        };
        let decode = least_loaded(&self.decode).ok_or(EngineError::Closed)?;
        // A scored prompt's log-probabilities are computed where it is prefilled: locally.
        let handoff = prompt.len() > self.local_prefill_max && params.prompt_logprobs.is_none();
        let prefill = if handoff {
            Some(least_loaded(&self.prefill).ok_or(EngineError::Closed)?)
        } else {
            None
        };
        let plan = Plan {
            prefill: prefill.map(take),
            decode: take(decode),
            max_new,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let http = self.http.clone();
        self.rt.spawn(async move {
            let outcome = tokio::select! {
                r = run(&http, &plan, prompt, params, &tx) => r,
                _ = tx.closed() => Ok(()), // client gone: dropping `run` cancels everything
            };
            if let Err(msg) = outcome {
                let _ = tx.send(error_event(msg));
            }
            drop(plan);
        });
        Ok(rx)
    }

    fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    fn info(&self) -> EngineInfo {
        self.info
    }

    fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn run(
    http: &reqwest::Client,
    plan: &Plan,
    prompt: Vec<u32>,
    params: GenerateParams,
    tx: &UnboundedSender<Event>,
) -> Result<(), String> {
    let decode = &plan.decode.0;
    let mut release = None;
    let resp = match &plan.prefill {
        None => {
            let body = GenerateRequest { prompt, params };
            http.post(format!("{}/pd/generate", decode.url))
                .json(&body)
                .send()
                .await
        }
        Some((p, _)) => {
            let body = PrefillRequest {
                prompt: prompt.clone(),
                params: params.clone(),
            };
            let reply: PrefillReply =
                post_json(http, &format!("{}/pd/prefill", p.url), &body).await?;
            if let Some(h) = &reply.held {
                release = Some(Release {
                    http: http.clone(),
                    url: p.url.clone(),
                    handle: h.handle,
                });
            }
            let ev = reply.event;
            // The request may end at its first token: EOS, a stop string, or a budget of one.
            let ended =
                ev.token.is_none() || ev.finish != Some(FinishReason::Length) || plan.max_new <= 1;
            if ended
                || matches!(
                    ev.finish,
                    Some(FinishReason::Abort | FinishReason::Error(_))
                )
            {
                let _ = tx.send(ev);
                return Ok(());
            }
            let (first, held) = match (ev.token, reply.held) {
                (Some(t), Some(h)) => (t, h),
                _ => return Err("prefill worker returned no KV".into()),
            };
            let body = DecodeRequest {
                prompt,
                params,
                first_token: first,
                source_cluster: p.cluster_id,
                blocks: held.blocks,
            };
            http.post(format!("{}/pd/decode", decode.url))
                .json(&body)
                .send()
                .await
        }
    }
    .map_err(|e| format!("{}: {e}", decode.url))?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(format!(
            "{}: {status}: {}",
            decode.url,
            resp.text().await.unwrap_or_default()
        ));
    }
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| format!("{}: {e}", decode.url))?);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line: StreamLine =
                serde_json::from_slice(&line).map_err(|e| format!("bad worker line: {e}"))?;
            match line {
                StreamLine::Pulled => drop(release.take()),
                StreamLine::Error(msg) => return Err(msg),
                StreamLine::Event(ev) => {
                    let done = ev.finish.is_some();
                    if tx.send(ev).is_err() || done {
                        return Ok(());
                    }
                }
            }
        }
    }
    Err(format!("{} ended the stream early", decode.url))
}
