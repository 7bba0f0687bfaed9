//! The request router: given a request and the live state of every node that
//! could take it, rank them and choose, or refuse at once with the reason.
//!
//! Each candidate's expected latency is built from named terms (network,
//! queue wait, compute, staleness of its last report); its utility weighs
//! that against the request's deadline and its cost against the budget. The
//! returned [`Decision`] holds every candidate with every term: it is the
//! record weft appends to its intent log.

use serde::{Deserialize, Serialize};

use crate::admission::{AdmissionPolicy, NodeLoad, Refusal};
use crate::intent::{Criticality, Intent};
use crate::model::{ModelId, WIRE_BYTES_PER_TOKEN};
use crate::topology::{LinkEstimate, NodeId};
use crate::utility::{Outcome, UtilityWeights};

/// A request to route.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RouteRequest {
    /// The model asked for.
    pub model: ModelId,
    /// Its intent.
    pub intent: Intent,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Completion tokens expected (the request's `max_tokens`, or a typical length).
    pub output_tokens: u32,
    /// The model's compute per token (1.0 for the model nodes' rates are quoted in).
    pub compute_per_token: f64,
}

/// A node's last report, plus what the router's caller has sent it since.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeState {
    /// The node.
    pub node: NodeId,
    /// Whether it serves the model (whole, or as the head of a shard chain).
    pub holds_model: bool,
    /// Sequences decoding now.
    pub running: u32,
    /// Requests waiting for a slot.
    pub queued: u32,
    /// Sequences it batches at most.
    pub slots: u32,
    /// Tokens still to decode for the running sequences.
    pub running_tokens: f64,
    /// Tokens of all waiting requests.
    pub queued_tokens: f64,
    /// Of those, tokens of waiting critical requests (they go first).
    pub queued_critical_tokens: f64,
    /// Aggregate decode rate at full batch (tokens/s).
    pub tokens_per_s: f64,
    /// Decode rate of one sequence alone (tokens/s).
    pub sequence_tokens_per_s: f64,
    /// Tokens of KV cache it has free.
    pub free_kv_tokens: u64,
    /// Age of this report (ms).
    pub report_age_ms: f64,
    /// Price per token.
    pub cost_per_token: f64,
    /// Joules per token.
    pub energy_per_token_j: f64,
    /// Prompt tokens of this request it is expected to hold in its prefix
    /// cache (from the prefixes it reported serving).
    pub cached_prompt_tokens: f64,
}

impl NodeState {
    /// Busy slots plus queue, over slots.
    pub fn load(&self) -> f64 {
        (self.running + self.queued) as f64 / self.slots.max(1) as f64
    }
}

/// One node the request could go to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Its state.
    pub state: NodeState,
    /// The path to it.
    pub link: LinkEstimate,
}

/// Tunables of the router.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouterConfig {
    /// The utility of an outcome.
    pub utility: UtilityWeights,
    /// When a node refuses each class.
    pub admission: AdmissionPolicy,
    /// Reports older than this (ms) mark a node as suspect: it is skipped.
    pub max_report_age_ms: f64,
    /// Extra expected delay per ms of report age, per unit of load: a busy
    /// node's state drifts fastest.
    pub staleness_weight: f64,
    /// Scale on the queue-wait estimate (the learner tunes it).
    pub wait_scale: f64,
    /// Cost of a prompt token relative to a decoded token.
    pub prefill_share: f64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            utility: UtilityWeights::default(),
            admission: AdmissionPolicy { max_queue: 64 },
            max_report_age_ms: 5_000.0,
            staleness_weight: 0.05,
            wait_scale: 1.0,
            prefill_share: 0.05,
        }
    }
}

/// Why a candidate was not eligible.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "excluded", rename_all = "kebab-case")]
pub enum Exclusion {
    /// It does not serve the model.
    NoModel,
    /// Its last report is too old.
    Stale {
        /// Age of the report (ms).
        age_ms: f64,
    },
    /// It has no KV room for the request.
    NoKvRoom {
        /// Tokens it has free.
        free: u64,
        /// Tokens the request needs.
        need: u64,
    },
    /// It would cost more than the budget.
    OverBudget {
        /// What it would cost.
        cost: f64,
    },
    /// Its queue refuses this class.
    Refused(Refusal),
}

/// One candidate's score, term by term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateScore {
    /// The node.
    pub node: NodeId,
    /// Why it was not eligible, if it was not.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub excluded: Option<Exclusion>,
    /// Round trip plus transfer of prompt and completion (ms).
    pub network_ms: f64,
    /// Expected wait for a slot (ms).
    pub wait_ms: f64,
    /// Prefill and decode of this request (ms).
    pub compute_ms: f64,
    /// Prefill it would not run, its prefix being cached there (ms): taken
    /// off the expected latency.
    #[serde(default)]
    pub prefill_saved_ms: f64,
    /// Allowance for the age of its report (ms).
    pub stale_ms: f64,
    /// The sum: expected latency (ms).
    pub expected_ms: f64,
    /// Expected price.
    pub cost: f64,
    /// Expected joules.
    pub energy_j: f64,
    /// Utility of the expected outcome.
    pub utility: f64,
}

/// Why a request was refused before it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rejected", rename_all = "kebab-case")]
pub enum Rejection {
    /// No node serves the model.
    NoReplica,
    /// Every node serving it is suspect (no recent report).
    NoFreshReplica,
    /// Even the fastest idle path misses the deadline.
    DeadlineInfeasible {
        /// The least latency any candidate could give (ms).
        best_ms: f64,
        /// The deadline (ms).
        deadline_ms: f64,
    },
    /// A sheddable request would miss its deadline at the current load.
    WouldMissDeadline {
        /// The best expected latency (ms).
        best_ms: f64,
        /// The deadline (ms).
        deadline_ms: f64,
    },
    /// Every candidate costs more than the budget.
    OverBudget {
        /// The cheapest candidate's cost.
        cheapest: f64,
        /// The budget.
        budget: f64,
    },
    /// Every candidate's queue refuses the request's class.
    Overloaded {
        /// The class refused.
        criticality: Criticality,
    },
    /// No candidate has KV room.
    NoKvRoom,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoReplica => write!(f, "no node serves this model"),
            Self::NoFreshReplica => write!(f, "no node serving this model has reported recently"),
            Self::DeadlineInfeasible { best_ms, deadline_ms } => write!(
                f,
                "the deadline of {deadline_ms:.0} ms cannot be met: the fastest path takes {best_ms:.0} ms even when idle"
            ),
            Self::WouldMissDeadline { best_ms, deadline_ms } => write!(
                f,
                "sheddable request refused: at current load it would take {best_ms:.0} ms, past its deadline of {deadline_ms:.0} ms"
            ),
            Self::OverBudget { cheapest, budget } => write!(
                f,
                "no node is within the cost budget {budget:.3e} (cheapest {cheapest:.3e})"
            ),
            Self::Overloaded { criticality } => write!(
                f,
                "every node serving this model is overloaded; {} requests are refused",
                criticality.as_str()
            ),
            Self::NoKvRoom => write!(f, "no node serving this model has KV-cache room for the request"),
        }
    }
}

/// The router's answer with its full record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The node chosen, or why none was.
    pub choice: Result<NodeId, Rejection>,
    /// The chosen candidate's utility (NaN when refused).
    pub utility: f64,
    /// Every candidate, in input order, with its terms.
    pub candidates: Vec<CandidateScore>,
}

impl Decision {
    /// The chosen candidate's score.
    pub fn chosen(&self) -> Option<&CandidateScore> {
        let node = *self.choice.as_ref().ok()?;
        self.candidates.iter().find(|c| c.node == node)
    }
}

/// Scores every candidate and chooses the eligible one with the highest
/// utility (ties: the lower node id).
pub fn route(req: &RouteRequest, candidates: &[Candidate], config: &RouterConfig) -> Decision {
    let mut scores = Vec::with_capacity(candidates.len());
    let c = req.intent.criticality;
    let deadline = req.intent.deadline_ms.map(|d| d as f64);
    let need_kv = u64::from(req.prompt_tokens) + u64::from(req.output_tokens);
    let work = (req.output_tokens as f64 + req.prompt_tokens as f64 * config.prefill_share)
        * req.compute_per_token;
    let bytes = (req.prompt_tokens + req.output_tokens) as f64 * WIRE_BYTES_PER_TOKEN;

    let mut best: Option<(usize, f64)> = None;
    let mut floor_ms = f64::INFINITY;
    let (mut any_model, mut any_fresh, mut any_kv, mut any_admit) = (false, false, false, false);
    let mut cheapest = f64::INFINITY;
    for (i, cand) in candidates.iter().enumerate() {
        let s = &cand.state;
        let l = &cand.link;
        let network_ms = l.rtt_ms + bytes / l.bandwidth_bytes_per_s.max(1.0) * 1000.0;
        let rate = s.tokens_per_s.max(1e-9);
        let full = s.running >= s.slots;
        let ahead = if c == Criticality::Critical {
            s.queued_critical_tokens
        } else {
            s.queued_tokens
        };
        let first_free = if full && s.running > 0 {
            s.running_tokens / s.running as f64 * s.slots as f64
        } else {
            0.0
        };
        let wait_ms = (ahead + if full || ahead > 0.0 { first_free } else { 0.0 }) / rate
            * 1000.0
            * config.wait_scale;
        let share = rate / (s.running + 1).min(s.slots.max(1)) as f64;
        let seq_rate = s.sequence_tokens_per_s.min(share).max(1e-9);
        let compute_ms = work / seq_rate * 1000.0;
        let cached = s.cached_prompt_tokens.clamp(0.0, req.prompt_tokens as f64);
        let prefill_saved_ms =
            cached * config.prefill_share * req.compute_per_token / seq_rate * 1000.0;
        let stale_ms = s.report_age_ms * config.staleness_weight * s.load().min(4.0);
        let expected_ms = network_ms + wait_ms + compute_ms + stale_ms - prefill_saved_ms;
        let tokens = (req.prompt_tokens + req.output_tokens) as f64 * req.compute_per_token;
        let cost = tokens * s.cost_per_token + bytes * l.cost_per_byte;
        let energy_j = tokens * s.energy_per_token_j;
        let utility = config.utility.utility(
            Outcome {
                latency_ms: expected_ms,
                cost,
                energy_j,
            },
            deadline,
            req.intent.max_cost,
        );
        let excluded = if !s.holds_model {
            Some(Exclusion::NoModel)
        } else if s.report_age_ms > config.max_report_age_ms {
            any_model = true;
            Some(Exclusion::Stale {
                age_ms: s.report_age_ms,
            })
        } else if s.free_kv_tokens < need_kv {
            any_model = true;
            any_fresh = true;
            floor_ms = floor_ms.min(network_ms + compute_ms - prefill_saved_ms);
            Some(Exclusion::NoKvRoom {
                free: s.free_kv_tokens,
                need: need_kv,
            })
        } else {
            any_model = true;
            any_fresh = true;
            any_kv = true;
            let alone = s.sequence_tokens_per_s.max(1e-9);
            let saved_alone =
                cached * config.prefill_share * req.compute_per_token / alone * 1000.0;
            floor_ms = floor_ms.min(network_ms + work / alone * 1000.0 - saved_alone);
            cheapest = cheapest.min(cost);
            if req.intent.max_cost.is_some_and(|b| cost > b) {
                Some(Exclusion::OverBudget { cost })
            } else {
                match config.admission.admit(
                    c,
                    NodeLoad {
                        waiting: s.queued as usize,
                    },
                ) {
                    Err(r) => Some(Exclusion::Refused(r)),
                    Ok(()) => {
                        any_admit = true;
                        None
                    }
                }
            }
        };
        if excluded.is_none() && best.is_none_or(|(_, u)| utility > u) {
            best = Some((i, utility));
        }
        scores.push(CandidateScore {
            node: s.node,
            excluded,
            network_ms,
            wait_ms,
            compute_ms,
            prefill_saved_ms,
            stale_ms,
            expected_ms,
            cost,
            energy_j,
            utility,
        });
    }

    let refuse = |r: Rejection, scores: Vec<CandidateScore>| Decision {
        choice: Err(r),
        utility: f64::NAN,
        candidates: scores,
    };
    if !any_model {
        return refuse(Rejection::NoReplica, scores);
    }
    if !any_fresh {
        return refuse(Rejection::NoFreshReplica, scores);
    }
    if let Some(dl) = deadline {
        if floor_ms > dl {
            return refuse(
                Rejection::DeadlineInfeasible {
                    best_ms: floor_ms,
                    deadline_ms: dl,
                },
                scores,
            );
        }
    }
    if !any_kv {
        return refuse(Rejection::NoKvRoom, scores);
    }
    if let Some(b) = req.intent.max_cost {
        if cheapest > b {
            return refuse(
                Rejection::OverBudget {
                    cheapest,
                    budget: b,
                },
                scores,
            );
        }
    }
    let Some((i, utility)) = best else {
        let _ = any_admit;
        return refuse(Rejection::Overloaded { criticality: c }, scores);
    };
    // Ties go to the lower node id, whatever the input order.
    let mut pick = i;
    for (j, s) in scores.iter().enumerate() {
        if s.excluded.is_none() && s.utility == utility && s.node < scores[pick].node {
            pick = j;
        }
    }
    let chosen = &scores[pick];
    if c == Criticality::Sheddable {
        if let Some(dl) = deadline {
            if chosen.expected_ms > dl {
                let best_ms = chosen.expected_ms;
                return refuse(
                    Rejection::WouldMissDeadline {
                        best_ms,
                        deadline_ms: dl,
                    },
                    scores,
                );
            }
        }
    }
    Decision {
        choice: Ok(chosen.node),
        utility,
        candidates: scores,
    }
}
