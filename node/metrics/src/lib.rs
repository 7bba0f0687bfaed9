//! # weft-metrics
//!
//! The pieces of Prometheus' text exposition format that every weft
//! endpoint shares: a cumulative [`Histogram`] and [`label`] escaping. Each
//! crate keeps its own counters and renders them with these; none of them
//! knows which endpoint serves it.

#![forbid(unsafe_code)]

use std::fmt::Write;

/// A cumulative histogram in Prometheus form.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// Counts `v` into the buckets with upper bounds `bounds`.
    pub fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.len() != bounds.len() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// Appends the `_bucket`, `_sum` and `_count` lines of `name`.
    pub fn render(&self, out: &mut String, name: &str, bounds: &[f64]) {
        for (i, b) in bounds.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts.get(i).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// A label value as the text format writes it: `\`, `"` and newlines
/// escaped.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
