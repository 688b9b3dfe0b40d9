//! Prometheus metrics: request and token counters, TTFT / inter-token / end-to-end latency
//! histograms (recorded as each request's events are consumed), and the engine's gauges.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use futures_util::Stream;
use tandem_engine::{EngineStats, Event, EventStream};

/// A latency histogram with fixed buckets (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, seconds: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

const LATENCY: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Server-wide metrics.
pub struct Metrics {
    /// Generation requests accepted.
    pub requests: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    ttft: Histogram,
    inter_token: Histogram,
    e2e: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY),
            inter_token: Histogram::new(LATENCY),
            e2e: Histogram::new(LATENCY),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition, with the engines' current gauges.
    pub fn render(
        &self,
        e: &EngineStats,
        total_blocks: usize,
        replicas: (usize, usize),
        health: &crate::health::Health,
    ) -> String {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        put(
            "tandem_requests_total",
            "counter",
            "Generation requests accepted.",
            self.requests.load(Relaxed) as f64,
        );
        put(
            "tandem_request_errors_total",
            "counter",
            "Requests answered with an error.",
            self.errors.load(Relaxed) as f64,
        );
        put(
            "tandem_prompt_tokens_total",
            "counter",
            "Prompt tokens of accepted requests.",
            self.prompt_tokens.load(Relaxed) as f64,
        );
        put(
            "tandem_generation_tokens_total",
            "counter",
            "Tokens generated.",
            self.generated_tokens.load(Relaxed) as f64,
        );
        put(
            "tandem_requests_running",
            "gauge",
            "Sequences holding KV.",
            e.running as f64,
        );
        put(
            "tandem_requests_waiting",
            "gauge",
            "Requests waiting for admission.",
            e.waiting as f64,
        );
        put(
            "tandem_kv_usage_ratio",
            "gauge",
            "Fraction of KV blocks in use.",
            e.blocks_in_use as f64 / total_blocks.max(1) as f64,
        );
        put(
            "tandem_kv_blocks_cached",
            "gauge",
            "Free KV blocks holding a reusable prefix.",
            e.blocks_cached as f64,
        );
        let rate = if e.prefix_lookups == 0 {
            0.0
        } else {
            e.prefix_hits as f64 / e.prefix_lookups as f64
        };
        put(
            "tandem_prefix_cache_hit_rate",
            "gauge",
            "Prefix-cache hits per lookup.",
            rate,
        );
        put(
            "tandem_prefix_cache_hits_total",
            "counter",
            "Prompt KV blocks found in the prefix cache.",
            e.prefix_hits as f64,
        );
        put(
            "tandem_prefix_cache_lookups_total",
            "counter",
            "Prompt KV blocks looked up in the prefix cache.",
            e.prefix_lookups as f64,
        );
        put(
            "tandem_tokens_computed_total",
            "counter",
            "Tokens run through the model (prompt chunks and decodes).",
            e.tokens_computed as f64,
        );
        put(
            "tandem_preemptions_total",
            "counter",
            "Sequences preempted for recompute.",
            e.preemptions as f64,
        );
        put(
            "tandem_engine_steps_total",
            "counter",
            "Forward passes run.",
            e.steps as f64,
        );
        put(
            "tandem_replicas",
            "gauge",
            "Replicas in the deployment.",
            replicas.0 as f64,
        );
        put(
            "tandem_replicas_up",
            "gauge",
            "Replicas in rotation.",
            replicas.1 as f64,
        );
        put(
            "tandem_worker_restarts_total",
            "counter",
            "Workers restarted after a failure.",
            health.restarts as f64,
        );
        put(
            "tandem_requests_retried_total",
            "counter",
            "Requests moved to another worker after one failed.",
            health.retried as f64,
        );
        put(
            "tandem_requests_failed_total",
            "counter",
            "Requests that failed in the deployment (the client got an error).",
            health.failed as f64,
        );
        let status = match health.status {
            crate::health::HealthStatus::Ok => 0.0,
            crate::health::HealthStatus::Degraded => 1.0,
            crate::health::HealthStatus::Down => 2.0,
        };
        put(
            "tandem_health_status",
            "gauge",
            "0 ok, 1 degraded (serving with workers missing), 2 down.",
            status,
        );
        if !health.workers.is_empty() {
            let _ = writeln!(
                out,
                "# HELP tandem_workers_up Workers in rotation, by role.\n# TYPE tandem_workers_up gauge"
            );
            for w in &health.workers {
                let _ = writeln!(out, "tandem_workers_up{{role=\"{}\"}} {}", w.role, w.up);
            }
        }
        self.ttft.render(
            "tandem_time_to_first_token_seconds",
            "Time to first token.",
            &mut out,
        );
        self.inter_token.render(
            "tandem_inter_token_latency_seconds",
            "Time between two tokens of a request.",
            &mut out,
        );
        self.e2e.render(
            "tandem_e2e_request_latency_seconds",
            "Time from submission to the last event.",
            &mut out,
        );
        out
    }
}

/// A request's event stream that records its latencies and tokens as it is consumed.
pub struct Metered {
    inner: EventStream,
    /// An event already received by [`wait_started`](Self::wait_started).
    pending: Option<Event>,
    _load: crate::replicas::LoadGuard,
    metrics: std::sync::Arc<Metrics>,
    start: Instant,
    last: Option<Instant>,
}

impl Metered {
    /// Wraps `inner`, counting the request and its prompt tokens now.
    pub fn new(
        inner: EventStream,
        metrics: std::sync::Arc<Metrics>,
        prompt_tokens: usize,
        load: crate::replicas::LoadGuard,
    ) -> Self {
        metrics.requests.fetch_add(1, Relaxed);
        metrics
            .prompt_tokens
            .fetch_add(prompt_tokens as u64, Relaxed);
        Metered {
            inner,
            pending: None,
            _load: load,
            metrics,
            start: Instant::now(),
            last: None,
        }
    }

    /// Waits for the request's first event (its prompt is computed by then); the event is
    /// kept for [`recv`](Self::recv).
    pub async fn wait_started(&mut self) {
        if self.pending.is_none() {
            self.pending = self.next().await;
        }
    }

    /// The next event, recorded.
    pub async fn recv(&mut self) -> Option<Event> {
        match self.pending.take() {
            Some(ev) => Some(ev),
            None => self.next().await,
        }
    }

    async fn next(&mut self) -> Option<Event> {
        let ev = self.inner.recv().await?;
        let now = Instant::now();
        if ev.token.is_some() {
            self.metrics.generated_tokens.fetch_add(1, Relaxed);
            match self.last {
                None => self.metrics.ttft.observe((now - self.start).as_secs_f64()),
                Some(t) => self.metrics.inter_token.observe((now - t).as_secs_f64()),
            }
            self.last = Some(now);
        }
        if ev.finish.is_some() {
            self.metrics.e2e.observe((now - self.start).as_secs_f64());
        }
        Some(ev)
    }

    /// As a `Stream` of events.
    pub fn into_stream(self) -> impl Stream<Item = Event> + Send {
        futures_util::stream::unfold(self, |mut m| async move { m.recv().await.map(|e| (e, m)) })
    }
}
