//! A node with no data plane (`weft up`) asks the same router what
//! serving a request itself would take: the prediction goes back to the
//! agent and into the intent log, and a cost budget below its price is
//! refused, as a cluster's router refuses it.

use std::time::Instant;

use serde_json::Value;
use weft_api::{LocalLoad, Prediction};
use weft_cluster::overlay::{Entry, LoadReport, PeerId, RoutingTable};
use weft_placement::{Intent, LinkDefaults, Rejection};

use crate::routing::{route_request, router_config, Ask};

/// The router over this node alone, as it describes itself.
pub struct Alone {
    me: String,
    report: LoadReport,
    peer: PeerId,
}

impl Alone {
    /// `me`, with the capacity, slots and price of `report`.
    pub fn new(me: &str, report: LoadReport) -> Self {
        Self {
            me: me.to_string(),
            report,
            peer: PeerId::random(),
        }
    }
}

/// A number of a logged candidate's score.
fn term(c: &Value, k: &str) -> Option<f64> {
    c.get(k).and_then(Value::as_f64)
}

impl weft_api::remote::Predict for Alone {
    fn predict(
        &self,
        model: &str,
        intent: Intent,
        prompt_tokens: u32,
        output_tokens: u32,
        load: Option<LocalLoad>,
    ) -> (Option<Prediction>, Option<Rejection>, Value) {
        let mut report = self.report.clone();
        report.node = self.me.clone();
        report.models = vec![model.to_string()];
        let mut table = RoutingTable::default();
        table.nodes.insert(
            self.me.clone(),
            Entry {
                report,
                seen: Instant::now(),
                peer: self.peer,
            },
        );
        let ask = Ask {
            model,
            intent,
            prompt_tokens,
            output_tokens,
            fingerprints: &[],
        };
        let routed = route_request(
            &table,
            &self.me,
            &ask,
            load,
            &[],
            &router_config(),
            &LinkDefaults::default(),
        );
        // what serving it here would take, even where the router refused
        let prediction = routed.prediction.or_else(|| {
            let c = routed.record.pointer("/candidates/0")?;
            Some(Prediction {
                latency_ms: term(c, "expected_ms")?,
                cost: term(c, "cost")?,
                utility: term(c, "utility").unwrap_or(f64::NAN),
            })
        });
        (prediction, routed.target.err(), routed.record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::remote::Predict;
    use weft_placement::Criticality;

    fn alone(cost_per_token: f64) -> Alone {
        Alone::new(
            "local",
            LoadReport {
                capacity_tokens_per_s: 400.0,
                slots: 8,
                cost_per_token,
                ..Default::default()
            },
        )
    }

    fn idle() -> Option<LocalLoad> {
        Some(LocalLoad {
            queued: 0,
            running: 0,
            free_kv_tokens: 1 << 20,
        })
    }

    fn intent(max_cost: Option<f64>) -> Intent {
        Intent {
            criticality: Criticality::Standard,
            deadline_ms: None,
            max_cost,
        }
    }

    #[test]
    fn a_node_alone_predicts_the_latency_and_cost_of_serving_a_request() {
        let (p, refused, record) = alone(1e-6).predict("m", intent(None), 100, 50, idle());
        let p = p.unwrap();
        assert!(refused.is_none());
        assert!(p.latency_ms > 0.0 && p.utility.is_finite(), "{p:?}");
        assert!((p.cost - 150.0 * 1e-6).abs() < 1e-9, "{p:?}");
        assert_eq!(record["choice"], "local");
    }

    #[test]
    fn a_node_alone_refuses_a_budget_below_its_price() {
        let (p, refused, _) = alone(1e-6).predict("m", intent(Some(1e-5)), 100, 50, idle());
        assert!(
            matches!(refused, Some(Rejection::OverBudget { .. })),
            "{refused:?}"
        );
        assert!(p.unwrap().cost > 1e-5);
    }
}
