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
}

/// Registers a metric, returning it (names and help are fixed at compile time, so registration cannot fail).
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and valid");
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, start: f64, count: usize) -> Histogram {
    let buckets = exponential_buckets(start, 2.0, count).expect("valid buckets");
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid histogram"),
    )
}

impl Metrics {
    pub fn new(plan_format: &str, target: &str) -> Self {
        let r = Registry::new();
        let gauge =
            |name: &str, help: &str| register(&r, IntGauge::new(name, help).expect("valid gauge"));
        let counter = |name: &str, help: &str| {
            register(&r, IntCounter::new(name, help).expect("valid counter"))
        };
        // Info metrics as Prometheus writes them: a gauge of 1 whose labels carry the facts.
        let info = |name: &str, help: &str, labels: &[(&str, &str)]| {
            let names: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
            let values: Vec<&str> = labels.iter().map(|(_, v)| *v).collect();
            let family = register(
                &r,
                IntGaugeVec::new(Opts::new(name, help), &names).expect("valid info"),
            );
            family.with_label_values(&values).set(1);
        };
        info(
            "kiln:build_info",
            "The kiln build",
            &[("version", env!("CARGO_PKG_VERSION"))],
        );
        info(
            "kiln:plan_info",
            "The served plan",
            &[("format_version", plan_format), ("target", target)],
        );
        Metrics {
            running: gauge("kiln:num_requests_running", "Requests being generated"),
            waiting: gauge(
                "kiln:num_requests_waiting",
                "Requests queued for the engine",
            ),
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
                &r,
                "kiln:time_to_first_token_seconds",
                "Time from a request's arrival to its first token",
                0.001,
                17,
            ),
            inter_token_latency: histogram(
                &r,
                "kiln:inter_token_latency_seconds",
                "Time between consecutive generated tokens",
                0.001,
                13,
            ),
            e2e_latency: histogram(
                &r,
                "kiln:e2e_request_latency_seconds",
                "Time from a request's arrival to its last token",
                0.01,
                14,
            ),
            queue_time: histogram(
                &r,
                "kiln:request_queue_time_seconds",
                "Time a request waited for the engine",
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
            registry: r,
        }
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
