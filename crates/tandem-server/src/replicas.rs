//! Replicas behind a load balancer: each request goes to the live replica with the fewest
//! outstanding tokens (prompt plus generation budget of the requests it is serving), not round
//! robin. A replica whose engine has stopped is taken out of rotation and reported, and, when
//! the deployment knows how to build one, started again with backoff.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tandem_engine::{Engine, EngineError, EngineInfo, EngineStats, EventStream, GenerateParams};
use tandem_model::Tokenizer;

/// Anything that turns prompts into event streams: a local engine, or a disaggregated
/// deployment behind a router.
pub trait Generator: Send + Sync {
    /// Validates and starts a request; dropping the stream cancels it.
    fn submit(&self, prompt: Vec<u32>, params: GenerateParams) -> Result<EventStream, EngineError>;
    /// The model's tokenizer.
    fn tokenizer(&self) -> &Arc<Tokenizer>;
    /// Engine facts.
    fn info(&self) -> EngineInfo;
    /// Live counters.
    fn stats(&self) -> EngineStats;
    /// Whether it can serve, and what is missing.
    fn health(&self) -> crate::health::Health {
        crate::health::Health::ok()
    }
    /// Whether it has stopped for good (an engine whose loop ended); such a replica is taken
    /// out of rotation and restarted.
    fn stopped(&self) -> bool {
        false
    }
}

impl Generator for Engine {
    fn submit(&self, prompt: Vec<u32>, params: GenerateParams) -> Result<EventStream, EngineError> {
        Engine::submit(self, prompt, params)
    }
    fn tokenizer(&self) -> &Arc<Tokenizer> {
        Engine::tokenizer(self)
    }
    fn info(&self) -> EngineInfo {
        Engine::info(self)
    }
    fn stats(&self) -> EngineStats {
        Engine::stats(self)
    }
    fn stopped(&self) -> bool {
        !Engine::is_running(self)
    }
}

struct Replica {
    engine: RwLock<Arc<dyn Generator>>,
    outstanding: Arc<AtomicI64>,
    up: AtomicBool,
    served: AtomicU64,
    /// A restart is under way.
    restarting: AtomicBool,
}

impl Replica {
    fn engine(&self) -> Arc<dyn Generator> {
        self.engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Builds replica `i`'s engine again after it stopped.
pub type Restart = Arc<dyn Fn(usize) -> Result<Arc<dyn Generator>, String> + Send + Sync>;

/// First delay before restarting a stopped replica; doubles per failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest delay between restart attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The engines serving one deployment.
pub struct Replicas {
    replicas: Vec<Arc<Replica>>,
    tokenizer: Arc<Tokenizer>,
    restart: Option<Restart>,
    restarts: Arc<AtomicU64>,
}

/// Holds a request's share of its replica's load; released when dropped (request over).
pub struct LoadGuard {
    counter: Arc<AtomicI64>,
    amount: i64,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.amount, Relaxed);
    }
}

impl From<Arc<Engine>> for Replicas {
    fn from(e: Arc<Engine>) -> Self {
        Replicas::new(vec![e])
    }
}

impl From<Arc<dyn Generator>> for Replicas {
    fn from(g: Arc<dyn Generator>) -> Self {
        Replicas::from_generators(vec![g])
    }
}

impl Replicas {
    /// Replicas over `engines` (at least one).
    pub fn new(engines: Vec<Arc<Engine>>) -> Self {
        Self::from_generators(
            engines
                .into_iter()
                .map(|e| e as Arc<dyn Generator>)
                .collect(),
        )
    }

    /// Replicas over any generators (at least one).
    pub fn from_generators(engines: Vec<Arc<dyn Generator>>) -> Self {
        assert!(
            !engines.is_empty(),
            "a deployment needs at least one replica"
        );
        let tokenizer = engines[0].tokenizer().clone();
        let replicas = engines
            .into_iter()
            .map(|engine| {
                Arc::new(Replica {
                    engine: RwLock::new(engine),
                    outstanding: Arc::default(),
                    up: AtomicBool::new(true),
                    served: AtomicU64::new(0),
                    restarting: AtomicBool::new(false),
                })
            })
            .collect();
        Replicas {
            replicas,
            tokenizer,
            restart: None,
            restarts: Arc::default(),
        }
    }

    /// Restarts stopped replicas with `restart` (with backoff, on a thread of their own).
    pub fn with_restart(mut self, restart: Restart) -> Self {
        self.restart = Some(restart);
        self
    }

    /// The tokenizer (the same model on every replica).
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Engine facts (the same configuration on every replica).
    pub fn info(&self) -> EngineInfo {
        self.replicas[0].engine().info()
    }

    /// Takes replica `i` out of rotation and, if the deployment can, starts it again.
    fn take_out(&self, i: usize) {
        let r = &self.replicas[i];
        r.up.store(false, Relaxed);
        tracing::error!(
            replica = i,
            "replica's engine has stopped; taken out of rotation"
        );
        let Some(restart) = self.restart.clone() else {
            return;
        };
        if r.restarting.swap(true, Relaxed) {
            return;
        }
        let (r, restarts) = (r.clone(), self.restarts.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("tandem-replica-restart-{i}"))
            .spawn(move || {
                let mut backoff = FIRST_BACKOFF;
                loop {
                    std::thread::sleep(backoff);
                    match restart(i) {
                        Ok(engine) => {
                            *r.engine.write().unwrap_or_else(|p| p.into_inner()) = engine;
                            r.up.store(true, Relaxed);
                            r.restarting.store(false, Relaxed);
                            restarts.fetch_add(1, Relaxed);
                            tracing::info!(replica = i, "replica restarted");
                            return;
                        }
                        Err(e) => {
                            tracing::error!(replica = i, "restarting the replica failed: {e}");
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start a replica restart: {e}");
        }
    }

    /// Number of replicas, and how many are in rotation.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.replicas.len(),
            self.replicas.iter().filter(|r| r.up.load(Relaxed)).count(),
        )
    }

    /// The deployment's health: a single generator's own (a disaggregated deployment's
    /// workers), or the replicas in rotation.
    pub fn health(&self) -> crate::health::Health {
        use crate::health::{Health, HealthStatus, RoleCount};
        // A replica whose engine stopped on its own (a dead tensor-parallel rank) is noticed
        // here too, not only by the next request sent to it.
        for (i, r) in self.replicas.iter().enumerate() {
            if r.up.load(Relaxed) && r.engine().stopped() {
                self.take_out(i);
            }
        }
        let (total, up) = self.counts();
        if total == 1 && up == 1 && self.restart.is_none() {
            return self.replicas[0].engine().health();
        }
        let status = match up {
            0 => HealthStatus::Down,
            n if n < total => HealthStatus::Degraded,
            _ => HealthStatus::Ok,
        };
        let reason = if up < total {
            format!("{} of {total} replicas stopped", total - up)
        } else {
            String::new()
        };
        Health {
            status,
            reason,
            workers: vec![RoleCount {
                role: "replica",
                up,
                expected: total,
            }],
            restarts: self.restarts.load(Relaxed),
            ..Health::ok()
        }
    }

    /// Requests each replica has been given.
    pub fn served(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .map(|r| r.served.load(Relaxed))
            .collect()
    }

    /// Counters summed over all replicas, and their total KV blocks.
    pub fn stats(&self) -> (EngineStats, usize) {
        let mut sum = EngineStats::default();
        for r in &self.replicas {
            sum += r.engine().stats();
        }
        (
            sum,
            self.replicas
                .iter()
                .map(|r| r.engine().info().num_blocks)
                .sum(),
        )
    }

    /// Submits to the least-loaded live replica; a replica found stopped is taken out and the
    /// next one tried.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<(EventStream, LoadGuard), EngineError> {
        self.submit_preferring(prompt, params, None)
            .map(|(s, g, _)| (s, g))
    }

    /// Like [`submit`](Self::submit), to replica `prefer` while it is live (requests that
    /// share a prompt meet its KV in that replica's prefix cache); returns the replica used.
    pub fn submit_preferring(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        prefer: Option<usize>,
    ) -> Result<(EventStream, LoadGuard, usize), EngineError> {
        let weight = (prompt.len()
            + params
                .max_new_tokens
                .unwrap_or(self.info().max_length - prompt.len().min(self.info().max_length)))
            as i64;
        let mut order: Vec<(usize, &Arc<Replica>)> = self
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.up.load(Relaxed))
            .collect();
        order.sort_by_key(|(i, r)| (Some(*i) != prefer, r.outstanding.load(Relaxed)));
        for (i, r) in order {
            match r.engine().submit(prompt.clone(), params.clone()) {
                Ok(stream) => {
                    r.outstanding.fetch_add(weight, Relaxed);
                    r.served.fetch_add(1, Relaxed);
                    return Ok((
                        stream,
                        LoadGuard {
                            counter: r.outstanding.clone(),
                            amount: weight,
                        },
                        i,
                    ));
                }
                Err(EngineError::Closed) => self.take_out(i),
                Err(e) => return Err(e),
            }
        }
        Err(EngineError::Closed)
    }
}
