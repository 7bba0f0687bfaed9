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

    fn render_metrics(&self) -> String {
        Forwarder::render_metrics(self)
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
    let ask = Ask {
        model: &r.model,
        intent,
        prompt_tokens: prompt,
        output_tokens: output,
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
        "decision": "routed",
        "route": routed.record,
        "received_unix_ms": received,
        "decided_unix_ms": unix_ms(),
    }));
    let target = match routed.target {
        // a stream served here still goes through the forwarder, so that
        // it continues on another replica if this one fails midway
        Ok(Target::Local) if r.stream && r.hops == 0 => Target::Local,
        Ok(Target::Local) => return Routing::Here,
        Ok(t) => t,
        // no node serves it: the local checks say so
        Err(Rejection::NoReplica) => return Routing::Here,
        Err(rej) => return Routing::Refused(rej),
    };
    if r.hops >= MAX_HOPS {
        let why = format!("forwarded {} times already; not forwarding again", r.hops);
        local.record(json!({"request_id": request_id, "decision": "refused", "reason": why}));
        return Routing::Looped(why);
    }
    let mut out = Outgoing::new(r.uri, &r.headers, r.body.clone(), r.hops, r.stream);
    out.headers
        .push((REQUEST_ID_HEADER.into(), request_id.clone()));
    let reroute = {
        let (local, fwd, model) = (local.clone(), fwd.clone(), r.model.clone());
        Box::new(move |failed: &[String]| {
            let ask = Ask {
                model: &model,
                intent,
                prompt_tokens: prompt,
                output_tokens: output,
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
