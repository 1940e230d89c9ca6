//! Prometheus metrics, vLLM's names under a `kiln:` prefix, served on their own port (`--metrics-port`).

use prometheus::{
    exponential_buckets, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_cache_usage: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub queue_time: Histogram,
    success: IntCounterVec,
    plan_info: IntGaugeVec,
}

/// Registers a metric and returns it (names and help are fixed in the code, so registration cannot fail).
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and valid");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let gauge =
            |name: &str, help: &str| register(&r, IntGauge::new(name, help).expect("valid gauge"));
        let counter = |name: &str, help: &str| {
            register(&r, IntCounter::new(name, help).expect("valid counter"))
        };
        let histogram = |name: &str, help: &str, start: f64, count: usize| {
            let buckets = exponential_buckets(start, 2.0, count).expect("valid buckets");
            register(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .expect("valid histogram"),
            )
        };
        // Info metrics as Prometheus writes them: a gauge of 1 whose labels carry the facts.
        let info = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid info"),
            )
        };
        info("kiln:build_info", "The kiln build", &["version"])
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            running: gauge("kiln:num_requests_running", "Requests being generated"),
            waiting: gauge("kiln:num_requests_waiting", "Requests queued for an engine"),
            kv_cache_usage: register(
                &r,
                Gauge::new(
                    "kiln:kv_cache_usage_perc",
                    "Fraction of the KV cache in use (0..1)",
                )
                .expect("valid gauge"),
            ),
            prompt_tokens: counter("kiln:prompt_tokens_total", "Prompt tokens processed"),
            generation_tokens: counter("kiln:generation_tokens_total", "Tokens generated"),
            // 1 ms .. ~65 s to the first token and end to end; 1 ms .. ~4 s between tokens.
            time_to_first_token: histogram(
                "kiln:time_to_first_token_seconds",
                "Time from a request's arrival to its first token",
                0.001,
                17,
            ),
            inter_token_latency: histogram(
                "kiln:inter_token_latency_seconds",
                "Time between consecutive generated tokens",
                0.001,
                13,
            ),
            e2e_latency: histogram(
                "kiln:e2e_request_latency_seconds",
                "Time from a request's arrival to its last token",
                0.01,
                14,
            ),
            queue_time: histogram(
                "kiln:request_queue_time_seconds",
                "Time a request waited for an engine",
                0.001,
                17,
            ),
            success: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "kiln:request_success_total",
                        "Finished requests, by finish reason",
                    ),
                    &["finished_reason"],
                )
                .expect("valid counter"),
            ),
            plan_info: info(
                "kiln:plan_info",
                "A served plan",
                &["model", "format_version", "target"],
            ),
            registry: r,
        }
    }

    /// Records a served model's plan as `kiln:plan_info{model, format_version, target} 1`.
    pub fn plan_loaded(&self, model: &str, format_version: &str, target: &str) {
        self.plan_info
            .with_label_values(&[model, format_version, target])
            .set(1);
    }

    pub fn finished(&self, reason: &'static str) {
        self.success.with_label_values(&[reason]).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("metrics encode as text")
    }
}
