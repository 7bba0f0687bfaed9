//! # weft-metrics
//!
//! One Prometheus registry per process, shared by every part of a node
//! that counts something (the API, the data plane, the control plane, the
//! overlay) and by every endpoint that shows it. Built on the `prometheus`
//! crate: its text encoder escapes label values and writes the 0.0.4 text
//! format that Prometheus and `promtool check metrics` read.
//!
//! Each part creates its metrics with the helpers here, which register them
//! in the registry it was given; values read only at scrape time (queue
//! depth, tenants' use) are refreshed by an [`OnScrape`] collector.

#![forbid(unsafe_code)]

pub use prometheus::core::Collector;
pub use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The label value that stands for every value outside a bounded set (a
/// client's unknown model name, say).
pub const OTHER: &str = "other";

/// Everything in `registry`, in the text exposition format.
pub fn encode(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("the text encoder writes to memory");
    String::from_utf8(out).expect("the text encoder writes UTF-8")
}

/// Registers `c` in `registry` and gives it back. Names are fixed in the
/// code, so a bad or repeated one is a bug, found by any test that builds
/// the part.
pub fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    if let Err(e) = registry.register(Box::new(c.clone())) {
        panic!("registering a metric: {e}");
    }
    c
}

/// A counter `name`, registered.
pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("a valid counter name"),
    )
}

/// A counter `name` with `labels`, registered.
pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("a valid counter name"),
    )
}

/// A gauge `name`, registered.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::new(name, help).expect("a valid gauge name"),
    )
}

/// A gauge `name` with `labels`, registered.
pub fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge name"),
    )
}

/// A histogram `name` with bucket upper bounds `buckets`, registered.
pub fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("a valid histogram name and buckets"),
    )
}

/// A gauge or counter not yet registered: for an [`OnScrape`] group.
pub fn unregistered_gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("a valid gauge name")
}

/// A labelled gauge not yet registered: for an [`OnScrape`] group.
pub fn unregistered_gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge name")
}

/// Metrics whose values are read when scraped: `refresh` runs first, then
/// the collectors it set are gathered.
pub struct OnScrape {
    collectors: Vec<Box<dyn Collector>>,
    refresh: Box<dyn Fn() + Send + Sync>,
}

impl OnScrape {
    /// Registers `collectors` in `registry`, refreshed by `refresh` at
    /// every scrape.
    pub fn register(
        registry: &Registry,
        collectors: Vec<Box<dyn Collector>>,
        refresh: impl Fn() + Send + Sync + 'static,
    ) {
        let me = Self {
            collectors,
            refresh: Box::new(refresh),
        };
        if let Err(e) = registry.register(Box::new(me)) {
            panic!("registering scrape-time metrics: {e}");
        }
    }
}

impl Collector for OnScrape {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.collectors.iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        (self.refresh)();
        self.collectors.iter().flat_map(|c| c.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let r = Registry::new();
        let c = counter_vec(&r, "weft_x_total", "x", &["model"]);
        c.with_label_values(&["a\"b\\c\nd"]).inc();
        assert!(
            encode(&r).contains(r#"weft_x_total{model="a\"b\\c\nd"} 1"#),
            "{}",
            encode(&r)
        );
    }

    #[test]
    fn scrape_time_metrics_are_refreshed_when_gathered() {
        let r = Registry::new();
        let g = unregistered_gauge("weft_now", "now");
        let set = g.clone();
        let n = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        let m = n.clone();
        OnScrape::register(&r, vec![Box::new(g)], move || {
            set.set(m.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1)
        });
        assert!(encode(&r).contains("weft_now 1"));
        assert!(encode(&r).contains("weft_now 2"));
    }

    #[test]
    #[should_panic(expected = "registering a metric")]
    fn a_name_registered_twice_is_a_bug_found_at_once() {
        let r = Registry::new();
        counter(&r, "weft_dup_total", "x");
        counter(&r, "weft_dup_total", "x");
    }
}
