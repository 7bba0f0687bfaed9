//! Routing each request a cluster node receives: `weft-placement`'s router
//! over the live gossip table. Every node that reported recently is a
//! candidate, this one included; each gets the router's terms (network,
//! queue wait, compute, staleness, cost, utility) or the reason it was
//! excluded, and the whole decision goes to the intent log.
//!
//! When no replica has KV-cache room for a request right now, it is not
//! refused: it goes to the replica expected to serve it soonest, whose
//! engine queues it until blocks free up (the record says so).
//!
//! What the table does not carry is estimated: a waiting request is taken
//! to decode [`TYPICAL_OUTPUT_TOKENS`], a running one to have half that
//! left, and a prompt to be one token per [`PROMPT_BYTES_PER_TOKEN`] bytes
//! of request body.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use weft_placement::{
    route, Candidate, CandidateScore, Intent, LinkClass, LinkDefaults, LinkEstimate, NodeId,
    NodeState, Rejection, RouteRequest, RouterConfig, Site,
};

use weft_placement::topology::SINGLE_SEQUENCE_SHARE;

use weft_api::LocalLoad;
use weft_cluster::overlay::{LoadReport, RoutingTable, NODE_TIMEOUT};

/// Tokens a request is taken to decode when nothing says otherwise.
pub const TYPICAL_OUTPUT_TOKENS: f64 = 128.0;
/// Request-body bytes per prompt token, for estimating a prompt's length
/// before it is tokenized (the node routing it may not hold the tokenizer).
pub const PROMPT_BYTES_PER_TOKEN: usize = 4;

/// What to route.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    /// The model asked for.
    pub model: &'a str,
    /// The request's intent.
    pub intent: Intent,
    /// Prompt tokens (estimated).
    pub prompt_tokens: u32,
    /// Tokens to decode at most.
    pub output_tokens: u32,
    /// The names of its prefixes (see `weft_api::affinity`): a node whose
    /// report holds one is taken to have that much of the prompt cached.
    pub fingerprints: &'a [(u32, u64)],
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Served by this node.
    Local,
    /// Forwarded to a peer.
    Peer {
        /// Its node name.
        name: String,
        /// Its data-plane address.
        addr: SocketAddr,
        /// The class of the path to it.
        class: LinkClass,
    },
}

/// A routing decision: where, or why nowhere, and the record for the log.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The choice.
    pub target: Result<Target, Rejection>,
    /// The candidates with their terms, the choice and its utility.
    pub record: Value,
    /// Where the choice is, as `weft_route_decisions_total`'s `target`
    /// label writes it: `local`, `edge_peer` or `cloud` (`local` when
    /// refused).
    pub target_kind: &'static str,
    /// The chosen candidate's utility (none when refused).
    pub utility: Option<f64>,
    /// What the router expects of the chosen candidate (none when refused).
    pub prediction: Option<weft_api::Prediction>,
}

/// The `target` label of a node at a site of `kind` (`local` for this one).
fn target_kind(is_me: bool, kind: weft_placement::SiteKind) -> &'static str {
    match (is_me, kind) {
        (true, _) => "local",
        (false, weft_placement::SiteKind::Edge) => "edge_peer",
        (false, weft_placement::SiteKind::Cloud) => "cloud",
    }
}

/// Routes `ask` over `table`, as node `me` (which serves the model itself
/// when `local` is given). Nodes in `exclude` (replicas that already failed
/// this request) and peers without a data-plane address are not candidates.
pub fn route_request(
    table: &RoutingTable,
    me: &str,
    ask: &Ask<'_>,
    local: Option<LocalLoad>,
    exclude: &[String],
    config: &RouterConfig,
    links: &LinkDefaults,
) -> Routed {
    let mine = table.nodes.get(me).map(|e| &e.report);
    let my_site = site_of(mine);
    let mut names = Vec::new();
    let mut targets = Vec::new();
    let mut kinds = Vec::new();
    let mut cands = Vec::new();
    for (name, e) in &table.nodes {
        if exclude.contains(name) {
            continue;
        }
        let r = &e.report;
        let is_me = name == me;
        let class = if is_me {
            LinkClass::Local
        } else {
            LinkClass::between(&my_site, &site_of(Some(r)), r.site == my_site_name(mine))
        };
        let target = if is_me {
            Target::Local
        } else {
            match r.data_address.parse() {
                Ok(addr) => Target::Peer {
                    name: name.clone(),
                    addr,
                    class,
                },
                Err(_) => continue,
            }
        };
        let mut state = node_state(names.len(), r, e.seen.elapsed());
        state.cached_prompt_tokens = cached_tokens(ask, &r.prefixes);
        let link = if is_me {
            if let Some(l) = local {
                state.queued = l.queued;
                state.running = l.running;
                state.free_kv_tokens = l.free_kv_tokens;
                state.report_age_ms = 0.0;
            }
            state.holds_model = local.is_some();
            LinkEstimate {
                rtt_ms: 0.0,
                bandwidth_bytes_per_s: f64::INFINITY,
                class: LinkClass::Local,
                cost_per_byte: 0.0,
            }
        } else {
            state.holds_model = r.models.iter().any(|m| m == ask.model);
            let class =
                LinkClass::between(&my_site, &site_of(Some(r)), r.site == my_site_name(mine));
            LinkEstimate {
                rtt_ms: table
                    .rtt_to(name)
                    .map_or(links.rtt_ms[class.index()], |d| d.as_secs_f64() * 1e3),
                bandwidth_bytes_per_s: links.bandwidth_bytes_per_s[class.index()],
                class,
                cost_per_byte: links.cost_per_byte(class),
            }
        };
        names.push(name.clone());
        targets.push(target);
        kinds.push(target_kind(is_me, r.kind));
        cands.push(Candidate { state, link });
    }
    // not yet in its own table (the first report is still to come)
    if let (Some(l), false) = (local, names.iter().any(|n| n == me)) {
        if !exclude.iter().any(|n| n == me) {
            let mut state = node_state(names.len(), &LoadReport::default(), Duration::ZERO);
            state.holds_model = true;
            state.queued = l.queued;
            state.running = l.running;
            state.free_kv_tokens = l.free_kv_tokens;
            names.push(me.to_string());
            targets.push(Target::Local);
            kinds.push("local");
            cands.push(Candidate {
                state,
                link: LinkEstimate {
                    rtt_ms: 0.0,
                    bandwidth_bytes_per_s: f64::INFINITY,
                    class: LinkClass::Local,
                    cost_per_byte: 0.0,
                },
            });
        }
    }
    let req = RouteRequest {
        model: weft_placement::ModelId(0),
        intent: ask.intent,
        prompt_tokens: ask.prompt_tokens,
        output_tokens: ask.output_tokens,
        compute_per_token: 1.0,
    };
    let mut d = route(&req, &cands, config);
    let mut queued_for_kv = false;
    if d.choice == Err(Rejection::NoKvRoom) {
        // every replica's cache is full now: the request waits in the
        // queue of the one expected to serve it soonest (its engine admits
        // it when blocks free up) instead of being refused
        for c in &mut cands {
            c.state.free_kv_tokens = u64::MAX;
        }
        d = route(&req, &cands, config);
        queued_for_kv = true;
    }
    let scores: Vec<Value> = d
        .candidates
        .iter()
        .map(|c| named_score(c, &names, &cands))
        .collect();
    let target = d
        .choice
        .as_ref()
        .map(|n| targets[n.0 as usize].clone())
        .map_err(Clone::clone);
    let record = json!({
        "candidates": scores,
        "choice": d.choice.as_ref().ok().map(|n| &names[n.0 as usize]),
        "rejected": d.choice.as_ref().err().map(|r| json!({"reason": r, "message": r.to_string()})),
        "utility": d.choice.is_ok().then_some(d.utility),
        "queued_for_kv": queued_for_kv,
    });
    Routed {
        target,
        record,
        target_kind: d.choice.as_ref().map_or("local", |n| kinds[n.0 as usize]),
        utility: d.choice.is_ok().then_some(d.utility),
        prediction: d.chosen().map(|c| weft_api::Prediction {
            latency_ms: c.expected_ms,
            cost: c.cost,
            utility: c.utility,
        }),
    }
}

/// A candidate's score as logged: its name instead of its index, and the
/// state the router saw.
fn named_score(c: &CandidateScore, names: &[String], cands: &[Candidate]) -> Value {
    let i = c.node.0 as usize;
    let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
    v["node"] = json!(names[i]);
    let s = &cands[i].state;
    v["seen"] = json!({
        "queued": s.queued,
        "running": s.running,
        "free_kv_tokens": s.free_kv_tokens,
        "report_age_ms": s.report_age_ms.round(),
        "cached_prompt_tokens": s.cached_prompt_tokens,
        "link": cands[i].link.class,
        "rtt_ms": cands[i].link.rtt_ms,
    });
    v
}

/// Prompt tokens of `ask` a node whose report names `held` prefixes is
/// taken to have cached: the deepest of its names there, in bytes over
/// [`PROMPT_BYTES_PER_TOKEN`], short of the whole prompt.
fn cached_tokens(ask: &Ask<'_>, held: &[u64]) -> f64 {
    let chunks = weft_api::affinity::deepest_match(ask.fingerprints, held) as usize;
    let tokens = chunks * weft_api::affinity::CHUNK_BYTES / PROMPT_BYTES_PER_TOKEN;
    tokens.min(ask.prompt_tokens.saturating_sub(1) as usize) as f64
}

fn node_state(index: usize, r: &LoadReport, age: Duration) -> NodeState {
    let slots = r.slots.max(1);
    // a node with no configured capacity is taken at what it last did
    let rate = if r.capacity_tokens_per_s > 0.0 {
        r.capacity_tokens_per_s
    } else {
        r.tokens_per_s.max(1.0)
    };
    NodeState {
        node: NodeId(index as u32),
        holds_model: false,
        running: r.running,
        queued: r.queue_depth,
        slots,
        running_tokens: r.running as f64 * TYPICAL_OUTPUT_TOKENS / 2.0,
        queued_tokens: r.queue_depth as f64 * TYPICAL_OUTPUT_TOKENS,
        // reports do not split the queue by class: critical work is taken
        // to wait behind all of it
        queued_critical_tokens: r.queue_depth as f64 * TYPICAL_OUTPUT_TOKENS,
        tokens_per_s: rate,
        sequence_tokens_per_s: rate * SINGLE_SEQUENCE_SHARE.max(1.0 / slots as f64),
        free_kv_tokens: r.free_kv_tokens,
        report_age_ms: if age >= NODE_TIMEOUT {
            f64::INFINITY
        } else {
            age.as_secs_f64() * 1e3
        },
        cost_per_token: r.cost_per_token,
        energy_per_token_j: 0.0,
        cached_prompt_tokens: 0.0,
    }
}

fn site_of(r: Option<&LoadReport>) -> Site {
    Site {
        kind: r.map(|r| r.kind).unwrap_or_default(),
        region: r.map_or(0, |r| r.region),
    }
}

fn my_site_name(r: Option<&LoadReport>) -> &str {
    r.map_or("", |r| r.site.as_str())
}

/// The router's settings for a node: a report older than the overlay's
/// timeout is stale.
pub fn router_config() -> RouterConfig {
    RouterConfig {
        max_report_age_ms: NODE_TIMEOUT.as_secs_f64() * 1e3,
        ..RouterConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use weft_cluster::overlay::Entry;
    use weft_placement::{Criticality, Intent};

    use super::*;

    /// An agent's next turn: 6,000 bytes of context it sent before, plus a
    /// tool output.
    fn turn() -> Vec<u8> {
        let context = "tool definitions and the plan so far. ".repeat(160);
        serde_json::to_vec(&json!({"model": "m", "prompt": format!("{context}tool output: ok")}))
            .unwrap()
    }

    /// A table of this node `a` (no model) and gateways `b` and `c` serving
    /// `m`, `c` having served `tenant`'s earlier turn; `c` runs `c_queue`
    /// waiting requests.
    fn table(c_queue: u32) -> RoutingTable {
        let context = "tool definitions and the plan so far. ".repeat(160);
        let earlier = serde_json::to_vec(&json!({"model": "m", "prompt": context})).unwrap();
        let held: Vec<u64> = weft_api::affinity::fingerprints("acme", &earlier)
            .into_iter()
            .map(|f| f.1)
            .collect();
        let mut t = RoutingTable::default();
        for (name, models, prefixes, queue) in [
            ("a", vec![], vec![], 0),
            ("b", vec!["m".to_string()], vec![], 0),
            ("c", vec!["m".to_string()], held, c_queue),
        ] {
            t.nodes.insert(
                name.into(),
                Entry {
                    report: LoadReport {
                        node: name.into(),
                        site: "edge-a".into(),
                        data_address: "127.0.0.1:9".into(),
                        models,
                        slots: 4,
                        tokens_per_s: 40.0,
                        free_kv_tokens: 1 << 20,
                        queue_depth: queue,
                        prefixes,
                        ..LoadReport::default()
                    },
                    seen: Instant::now(),
                    peer: libp2p::PeerId::random(),
                },
            );
        }
        t
    }

    fn routed(c_queue: u32) -> Routed {
        let body = turn();
        let fps = weft_api::affinity::fingerprints("acme", &body);
        let ask = Ask {
            model: "m",
            intent: Intent {
                criticality: Criticality::Standard,
                deadline_ms: None,
                max_cost: None,
            },
            prompt_tokens: (body.len() / PROMPT_BYTES_PER_TOKEN) as u32,
            output_tokens: 32,
            fingerprints: &fps,
        };
        route_request(
            &table(c_queue),
            "a",
            &ask,
            None,
            &[],
            &router_config(),
            &LinkDefaults::default(),
        )
    }

    #[test]
    fn a_sessions_next_turn_goes_to_the_gateway_holding_its_prefix() {
        let r = routed(0);
        assert_eq!(r.record["choice"], "c", "{}", r.record);
        let c = r.record["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["node"] == "c")
            .unwrap();
        assert!(c["prefill_saved_ms"].as_f64().unwrap() > 0.0, "{c}");
        assert!(
            c["seen"]["cached_prompt_tokens"].as_f64().unwrap() >= 1000.0,
            "{c}"
        );
    }

    #[test]
    fn a_gateway_holding_the_prefix_but_overloaded_loses_the_turn() {
        let r = routed(40);
        assert_eq!(r.record["choice"], "b", "{}", r.record);
    }
}
