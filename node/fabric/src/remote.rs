//! The data plane as the API sees it ([`weft_api::Remote`]): each request
//! a cluster node receives is routed over the live gossip table, the
//! decision goes to the intent log, and the request is served here or
//! forwarded (a stream served here goes through the forwarder too, so that
//! it continues on another replica if this one fails midway). A request
//! forwarded [`MAX_HOPS`] times is refused, so a stale table cannot loop it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use serde_json::{json, Value};
use weft_api::headers::REQUEST_ID_HEADER;
use weft_api::trace::TRACEPARENT_HEADER;
use weft_api::{LocalNode, Remote, RouteAsk, Routing};
use weft_placement::{AdmissionPolicy, Rejection, RouterConfig};

use crate::forwarder::{Forwarder, Outgoing};
use crate::routing::{router_config, Ask, Target, PROMPT_BYTES_PER_TOKEN};

/// Most times a request is forwarded.
pub const MAX_HOPS: u32 = 2;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Remote for Forwarder {
    fn route(
        self: Arc<Self>,
        ask: RouteAsk,
        local: Arc<dyn LocalNode>,
    ) -> BoxFuture<'static, Routing> {
        Box::pin(route(self, ask, local))
    }
}

async fn route(fwd: Arc<Forwarder>, r: RouteAsk, local: Arc<dyn LocalNode>) -> Routing {
    let intent = r.intent;
    let output = r.output_tokens;
    let prompt = (r.body.len() / PROMPT_BYTES_PER_TOKEN).max(1) as u32;
    let config = RouterConfig {
        admission: AdmissionPolicy {
            max_queue: r.max_queue,
        },
        ..router_config()
    };
    let received = unix_ms();
    let fingerprints = if fwd.prefix_routing() {
        weft_api::affinity::fingerprints(&r.tenant, &r.body)
    } else {
        Vec::new()
    };
    let ask = Ask {
        model: &r.model,
        intent,
        prompt_tokens: prompt,
        output_tokens: output,
        fingerprints: &fingerprints,
    };
    let routed = fwd.choose(&ask, local.load(&r.model), &[], &config);
    let request_id = r.request_id.clone();
    local.record(json!({
        "request_id": request_id,
        "tenant": r.tenant,
        "model": r.model,
        "intent": intent,
        "prompt_tokens_estimate": prompt,
        "max_tokens": output,
        "hops": r.hops,
        "constrained": r.constrained,
        "decision": "routed",
        "trace_id": r.trace.trace_id,
        "span_id": r.trace.span_id,
        "parent_span_id": r.trace.parent_id,
        "route": routed.record,
        "received_unix_ms": received,
        "decided_unix_ms": unix_ms(),
    }));
    tracing::info!(
        request_id = %request_id,
        trace_id = %r.trace.trace_id,
        span_id = %r.trace.span_id,
        parent_span_id = r.trace.parent_id.as_deref(),
        model = %r.model,
        choice = routed.record["choice"].as_str(),
        target = routed.target.is_ok().then_some(routed.target_kind),
        criticality = intent.criticality.as_str(),
        hops = r.hops,
        "routed"
    );
    let target = match routed.target {
        // a stream served here still goes through the forwarder, so that
        // it continues on another replica if this one fails midway
        Ok(Target::Local) if r.stream && r.hops == 0 => Target::Local,
        Ok(Target::Local) => {
            local.routed("local", intent.criticality.as_str(), routed.utility);
            return Routing::Here(routed.prediction);
        }
        Ok(t) => t,
        // no node serves it: the local checks say so
        Err(Rejection::NoReplica) => return Routing::Here(None),
        Err(rej) => return Routing::Refused(rej),
    };
    if r.hops >= MAX_HOPS {
        let why = format!("forwarded {} times already; not forwarding again", r.hops);
        local.record(json!({"request_id": request_id, "decision": "refused", "reason": why}));
        return Routing::Looped(why);
    }
    local.routed(
        routed.target_kind,
        intent.criticality.as_str(),
        routed.utility,
    );
    let mut out = Outgoing::new(r.uri, &r.headers, r.body.clone(), r.hops, r.stream);
    out.headers
        .push((REQUEST_ID_HEADER.into(), request_id.clone()));
    // the serving node gives the agent this router's prediction
    if let Some(p) = routed.prediction {
        out.headers
            .extend(p.headers().into_iter().map(|(k, v)| (k.to_string(), v)));
    }
    // the next node's span is a child of this one's
    out.headers
        .push((TRACEPARENT_HEADER.into(), r.trace.header()));
    let reroute = {
        let (local, fwd, model) = (local.clone(), fwd.clone(), r.model.clone());
        Box::new(move |failed: &[String]| {
            let ask = Ask {
                model: &model,
                intent,
                prompt_tokens: prompt,
                output_tokens: output,
                fingerprints: &fingerprints,
            };
            let routed = fwd.choose(&ask, local.load(&model), failed, &config);
            local.record(json!({"request_id": request_id, "decision": "rerouted", "failed": failed, "route": routed.record}));
            routed.target.ok()
        })
    };
    let record = {
        let local = local.clone();
        Box::new(move |v: Value| local.record(v))
    };
    match fwd.forward(target, out, reroute, record).await {
        Ok(resp) => Routing::Answered(resp),
        Err(why) => Routing::Failed(why),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, RwLock};
    use std::time::Instant;

    use weft_api::LocalLoad;
    use weft_cluster::credentials::ClusterCa;
    use weft_cluster::overlay::{Entry, LoadReport, RoutingTable};
    use weft_placement::{Criticality, Intent};

    use super::*;

    /// This node: no model, its decisions kept.
    #[derive(Default)]
    struct Here {
        records: Mutex<Vec<Value>>,
    }

    impl LocalNode for Here {
        fn load(&self, _model: &str) -> Option<LocalLoad> {
            None
        }
        fn record(&self, record: Value) {
            self.records.lock().unwrap().push(record);
        }
        fn routed(&self, _target: &'static str, _criticality: &str, _utility: Option<f64>) {}
    }

    /// A forwarder of node `a` whose table has peer `b` holding model `m`.
    fn forwarder() -> (tempfile::TempDir, Arc<Forwarder>) {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(dir.path(), "t").unwrap();
        let id = ca
            .issue_identity("a", weft_cluster::credentials::Role::Node)
            .unwrap();
        let mut table = RoutingTable::default();
        for (name, models) in [("a", vec![]), ("b", vec!["m".to_string()])] {
            table.nodes.insert(
                name.into(),
                Entry {
                    report: LoadReport {
                        node: name.into(),
                        site: "edge-a".into(),
                        data_address: "127.0.0.1:9".into(),
                        models,
                        slots: 4,
                        tokens_per_s: 100.0,
                        ..LoadReport::default()
                    },
                    seen: Instant::now(),
                    peer: libp2p::PeerId::random(),
                },
            );
        }
        let f = Forwarder::new(&id, Arc::new(RwLock::new(table))).unwrap();
        (dir, Arc::new(f))
    }

    fn ask(hops: u32) -> RouteAsk {
        RouteAsk {
            uri: "/v1/completions",
            headers: Default::default(),
            body: axum::body::Bytes::from_static(b"{\"model\":\"m\",\"prompt\":\"x\"}"),
            model: "m".into(),
            stream: false,
            hops,
            tenant: "t".into(),
            intent: Intent {
                criticality: Criticality::Standard,
                deadline_ms: None,
                max_cost: None,
            },
            output_tokens: 8,
            request_id: "req-1".into(),
            max_queue: 16,
            trace: weft_api::trace::Trace::root(),
            constrained: None,
        }
    }

    #[tokio::test]
    async fn a_request_forwarded_max_hops_times_is_refused_not_looped() {
        let (_d, f) = forwarder();
        let here = Arc::new(Here::default());
        match f.route(ask(MAX_HOPS), here.clone()).await {
            Routing::Looped(why) => assert!(why.contains("forwarded"), "{why}"),
            _ => panic!("not refused"),
        }
        let records = here.records.lock().unwrap();
        assert!(
            records.iter().any(|r| r["decision"] == "refused"),
            "{records:?}"
        );
    }
}
