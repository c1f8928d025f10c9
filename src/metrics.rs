//! Prometheus metrics. Events (runs ending, callback attempts, group
//! commits, requests) are counted as they happen, in one process-wide
//! registry; state (executions by status, queue depth, callbacks waiting) is
//! read from the database at scrape time, so it is right after a restart too.

use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub language: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    /// The registry encodes under a lock: scrapes are rare and short.
    registry: Mutex<Registry>,
    pub run_seconds: HistogramFamily<RunLabels>,
    pub callback_attempts: Family<OutcomeLabels, Counter>,
    pub callback_delivery_seconds: Histogram,
    pub db_batch_size: Histogram,
    pub db_commit_seconds: Histogram,
    pub db_sync_seconds: Histogram,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_seconds: Histogram,
    pub executions: Family<RunLabels, Gauge>,
    pub queue_depth: Family<LaneLabels, Gauge>,
    pub running: Family<LaneLabels, Gauge>,
    pub callbacks: Family<StatusLabels, Gauge>,
}

fn seconds_histogram() -> Histogram {
    // 1 ms to about 9 h.
    Histogram::new(exponential_buckets(0.001, 3.0, 16))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("execd");
    let metrics = Metrics {
        registry: Mutex::new(Registry::default()),
        run_seconds: Family::new_with_constructor(seconds_histogram),
        callback_attempts: Family::default(),
        callback_delivery_seconds: seconds_histogram(),
        db_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
        db_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        db_sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        http_requests: Family::default(),
        http_request_seconds: seconds_histogram(),
        executions: Family::default(),
        queue_depth: Family::default(),
        running: Family::default(),
        callbacks: Family::default(),
    };
    registry.register(
        "execution_duration_seconds",
        "Run time of executions that ended, from claim to end",
        metrics.run_seconds.clone(),
    );
    registry.register(
        "callback_attempts",
        "Callback POST attempts by outcome",
        metrics.callback_attempts.clone(),
    );
    registry.register(
        "callback_delivery_latency_seconds",
        "From the callback being queued (the execution ended) to its 2xx",
        metrics.callback_delivery_seconds.clone(),
    );
    registry.register(
        "db_write_batch_size",
        "Writes per group commit",
        metrics.db_batch_size.clone(),
    );
    registry.register(
        "db_commit_seconds",
        "Time of one group commit, begin to commit",
        metrics.db_commit_seconds.clone(),
    );
    registry.register(
        "db_wal_sync_seconds",
        "Time of one sync of the WAL, which makes every group commit before it durable",
        metrics.db_sync_seconds.clone(),
    );
    registry.register(
        "http_requests",
        "HTTP requests answered",
        metrics.http_requests.clone(),
    );
    registry.register(
        "http_request_duration_seconds",
        "HTTP request handling time",
        metrics.http_request_seconds.clone(),
    );
    registry.register(
        "executions",
        "Executions in the database by status and language",
        metrics.executions.clone(),
    );
    registry.register(
        "queue_depth",
        "Queued executions per lane",
        metrics.queue_depth.clone(),
    );
    registry.register(
        "running",
        "Running executions per lane",
        metrics.running.clone(),
    );
    registry.register(
        "callbacks",
        "Callback deliveries by status",
        metrics.callbacks.clone(),
    );
    *metrics.registry.lock().unwrap() = registry;
    metrics
});

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// The Prometheus text exposition of everything registered, once
    /// `set_gauges` has set the gauges read from the database: both under
    /// the registry's lock, so that two scrapes never mix their gauges.
    pub fn encode_with(&self, set_gauges: impl FnOnce(&Metrics)) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap();
        set_gauges(self);
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}
