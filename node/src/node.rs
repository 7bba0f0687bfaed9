//! `weft node` and `weft status`: running a node of a cluster, and asking
//! the coordinators how the cluster stands.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use weft_coordinator::Command;

use weft_api::AppState;
use weft_cluster::credentials::{ClusterCa, NodeIdentity, Revoked};
use weft_cluster::member::{self, MemberSettings};
use weft_cluster::overlay::{self, LoadReport, Overlay, OverlaySettings};
use weft_cluster::transport::{self, Caller, Peer, Reply, Request, StatusReport};
use weft_fabric::{Forwarder, Holder, ServedHere, Shards, StartWorker};
use weft_store::ModelStore;
use weft_worker::Supervisor;

use crate::cluster_config::ClusterConfig;
use crate::config::NodeConfig;

/// How long `weft status` and registration wait for the coordinators.
pub const ASK_DEADLINE: Duration = Duration::from_secs(15);

/// Runs the node until `shutdown` resolves: a coordinator member if the
/// config says so; otherwise joins (once) and registers.
pub async fn run_node(
    cfg: ClusterConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let identity = match (cfg.has_identity(), &cfg.join, &cfg.coordinator) {
        (true, _, _) => NodeIdentity::load(&cfg.identity_dir())?,
        (false, Some(j), None) => {
            let coordinator = j.coordinators.first().context("[join] lists no coordinators")?;
            let id = member::join(&coordinator.addr, &coordinator.name, &j.token(&cfg.node.name)?, cfg.member())
                .await
                .context("joining the cluster")?;
            id.save(&cfg.identity_dir())?;
            tracing::info!(name = %id.name, "joined the cluster; identity saved");
            id
        }
        (false, _, Some(_)) => bail!(
            "coordinator {} has no identity in {}: create it with `weft cluster init` or `weft cluster issue`",
            cfg.node.name,
            cfg.identity_dir().display()
        ),
        (false, None, None) => bail!("no identity and no [join] section"),
    };
    if identity.name != cfg.node.name {
        bail!(
            "the identity in {} is for {:?}, but [node] name is {:?}",
            cfg.identity_dir().display(),
            identity.name,
            cfg.node.name
        );
    }
    let revoked = Revoked::default();
    // every metric of this process, shown by the metrics endpoint and the API's /metrics
    let registry = weft_metrics::Registry::new();
    let overlay = match &cfg.overlay {
        Some(o) => {
            let settings = OverlaySettings {
                listen: o
                    .listen
                    .parse()
                    .with_context(|| format!("[overlay] listen {:?}", o.listen))?,
                bootstrap: resolve_bootstrap(&o.bootstrap).await?,
                mdns: o.mdns,
            };
            let report = base_report(&cfg);
            let o = overlay::start(settings, identity.clone(), revoked.clone(), report).await?;
            o.metrics.register(&registry);
            Some(o)
        }
        None => None,
    };
    // the node's intent log, signed with its identity; a coordinator in the
    // same process writes its control-plane records there too
    let node_log = match &cfg.serve {
        Some(serve) => Some(open_intent_log(serve, &cfg.node.data_dir, &identity)?),
        None => None,
    };
    let handle = match &cfg.coordinator {
        Some(c) => {
            let ca = match &c.ca_dir {
                Some(d) => Some(
                    ClusterCa::load(d)
                        .with_context(|| format!("loading the CA from {}", d.display()))?,
                ),
                None => None,
            };
            let mut s = MemberSettings::new(
                c.id,
                cfg.node.listen,
                cfg.node.data_dir.clone(),
                c.peers.clone(),
            );
            s.tick = Duration::from_millis(c.tick_ms.max(1));
            s.bootstrap = c.bootstrap;
            s.live = overlay.as_ref().map(|o| o.table.clone());
            s.registry = registry.clone();
            s.shared_log = node_log.clone();
            let h = member::start(s, identity.clone(), ca).await?;
            tracing::info!(id = c.id, addr = %h.local_addr, "coordinator member started");
            Some(h)
        }
        None => None,
    };
    // ready once the control state lists this node as it is configured
    // (which needs a coordinator quorum)
    let registered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addr) = cfg.node.metrics_addr {
        let r = registry.clone();
        let ready = registered.clone();
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let text = weft_metrics::encode(&r);
                    async move {
                        (
                            [(axum::http::header::CONTENT_TYPE, weft_metrics::CONTENT_TYPE)],
                            text,
                        )
                    }
                }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok\n" }))
            .route(
                "/readyz",
                axum::routing::get(move || {
                    let ok = ready.load(std::sync::atomic::Ordering::Acquire);
                    async move {
                        if ok {
                            (axum::http::StatusCode::OK, "ready\n")
                        } else {
                            (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                "not a member of the control state yet\n",
                            )
                        }
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    // make sure this node is a member of the control state
    let register = {
        let peers = cfg.coordinators();
        let me = cfg.member();
        let identity = identity.clone();
        let registered = registered.clone();
        tokio::spawn(async move {
            let Ok(caller) = Caller::new(&identity) else {
                return;
            };
            loop {
                if let Ok(Reply::Status(s)) =
                    caller.ask(&peers, &Request::Status, ASK_DEADLINE).await
                {
                    if s.state.members.get(&me.id) == Some(&me) {
                        registered.store(true, std::sync::atomic::Ordering::Release);
                        return;
                    }
                    let _ = caller
                        .ask(
                            &peers,
                            &Request::Propose {
                                command: Command::PutMember(me.clone()),
                            },
                            ASK_DEADLINE,
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    match &cfg.serve {
        Some(serve) => {
            let me = cfg.member();
            let base = base_report(&cfg);
            let mut serve = serve.clone();
            if serve.data_addr.is_none() && cfg.coordinator.is_none() {
                serve.data_addr = Some(cfg.node.listen);
            }
            hold_and_serve(
                serve,
                node_log.clone().expect("a serving node has an intent log"),
                &identity,
                &revoked,
                me.id,
                base,
                Caller::new(&identity)?,
                cfg.coordinators(),
                overlay.as_ref(),
                &registry,
                shutdown,
            )
            .await?;
        }
        None => shutdown.await,
    }
    register.abort();
    if let Some(o) = overlay {
        o.stop().await;
    }
    if let Some(h) = handle {
        h.stop().await?;
    }
    Ok(())
}

/// The overlay's bootstrap peers as libp2p addresses. A `/dns4/NAME/...`
/// address (a coordinator's stable name) is resolved here to its current
/// `/ip4/...`, retried for a few seconds while the name does not resolve
/// yet (the peer's pod is starting); one that does not resolve is left out
/// with a warning: the peers that start later dial this node themselves.
async fn resolve_bootstrap(addrs: &[String]) -> Result<Vec<weft_cluster::overlay::Multiaddr>> {
    let mut out = Vec::new();
    for a in addrs {
        let Some(rest) = a.strip_prefix("/dns4/") else {
            out.push(
                a.parse()
                    .with_context(|| format!("[overlay] bootstrap {a:?}"))?,
            );
            continue;
        };
        let (host, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let mut found = None;
        for _ in 0..5 {
            if let Ok(mut it) = tokio::net::lookup_host((host, 0)).await {
                if let Some(ip) = it.find(|s| s.is_ipv4()) {
                    found = Some(ip.ip());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        match found {
            Some(ip) => out.push(
                format!("/ip4/{ip}/{tail}")
                    .parse()
                    .with_context(|| format!("[overlay] bootstrap {a:?}"))?,
            ),
            None => {
                tracing::warn!(peer = %a, "an overlay bootstrap name did not resolve; left out")
            }
        }
    }
    Ok(out)
}

/// The fields of this node's load reports that its configuration fixes.
fn base_report(cfg: &ClusterConfig) -> LoadReport {
    let n = &cfg.node;
    LoadReport {
        site: n.site.clone(),
        address: cfg.advertised(n.listen),
        kind: n.kind,
        region: n.region,
        slots: n.slots,
        capacity_tokens_per_s: n.tokens_per_s,
        cost_per_token: n.cost_per_token,
        ..Default::default()
    }
}

/// Serves the API and holds what the placement assigns to member `me`
/// until `shutdown` resolves; gossips the node's live load if the overlay
/// runs. Cut off from the coordinators, it keeps serving what it holds.
#[allow(clippy::too_many_arguments)]
async fn hold_and_serve(
    serve: NodeConfig,
    log: member::SharedLog,
    identity: &NodeIdentity,
    revoked: &Revoked,
    me: u64,
    base: LoadReport,
    caller: Caller,
    coordinators: Vec<Peer>,
    overlay: Option<&Overlay>,
    registry: &weft_metrics::Registry,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    use weft_fabric::holdings::WATCH_EVERY;
    let addr = serve.validate()?;
    crate::up::check_device(&serve)?;
    tracing::info!("{}", crate::up::cpu_kernels_line()?);
    tracing::info!("{}", crate::up::check_sandbox(&serve)?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("[serve] cannot listen on {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving the API for the models this node is assigned");
    let data_addr = serve.data_addr;
    let mut api = serve.api_config();
    api.node_name = identity.name.clone();
    let app = AppState::empty_in(api, registry);
    if let Some(f) = &serve.tenants_file {
        crate::tenants_file::watch(app.clone(), f.clone());
    }
    app.share_intent_log(log.clone());
    // signed checkpoints of the log, committed to the coordinators
    let (checkpoints_stop, checkpoints_stop_rx) = tokio::sync::watch::channel(false);
    let checkpoints = tokio::spawn(weft_cluster::checkpoints::run(
        log,
        serve.checkpoint_every(),
        Caller::new(identity)?,
        coordinators.clone(),
        checkpoints_stop_rx,
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut base = base;
    let shards = Shards::default();
    // the data plane: forward what others hold, take what peers forward
    let mut fwd = None;
    if let Some(o) = overlay {
        let f = std::sync::Arc::new(Forwarder::new(identity, o.table.clone())?);
        f.register_metrics(registry);
        f.set_local(&app);
        f.set_prefix_routing(serve.prefix_routing);
        app.set_remote(f.clone());
        if let Some(addr) = data_addr {
            let ep = transport::endpoint(identity, revoked, addr, false)
                .with_context(|| format!("data plane on {addr}"))?;
            let local = ep.local_addr()?;
            // listening on 0.0.0.0: peers reach it on the host the node advertises
            base.data_address = match base.address.rsplit_once(':') {
                Some((host, _)) if local.ip().is_unspecified() => {
                    format!("{host}:{}", local.port())
                }
                _ => local.to_string(),
            };
            tracing::info!(addr = %base.data_address, "data plane listening");
            let here = ServedHere {
                app: app.clone(),
                shards: shards.clone(),
                forwarder: Some(f.clone()),
            };
            tokio::spawn(weft_fabric::serve(
                ep,
                here,
                ModelStore::default_location().dir().to_path_buf(),
                revoked.clone(),
                stop_rx.clone(),
            ));
        }
        fwd = Some(f);
    }
    let start: StartWorker = {
        let serve = serve.clone();
        std::sync::Arc::new(move |model, layers, chain| {
            Supervisor::start(serve.worker_spec(model, None, layers, chain))
        })
    };
    let mut holder = Holder::new(
        app.clone(),
        fwd,
        shards,
        start,
        me,
        ModelStore::default_location(),
    );
    let sandboxes = crate::up::start_sandboxes(&serve, &app)?;
    let (svc, routes) = match sandboxes {
        Some((s, r)) => (Some(s), Some(r)),
        None => (None, None),
    };
    let api = tokio::spawn(weft_api::serve_api(
        listener,
        app.clone(),
        routes,
        stop_rx,
        || {},
    ));
    let mut watch = tokio::time::interval(WATCH_EVERY);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = tokio::time::interval(overlay::REPORT_EVERY);
    let mut cut_off = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = watch.tick() => {
                match caller.ask(&coordinators, &Request::Status, WATCH_EVERY * 3).await {
                    Ok(Reply::Status(s)) => {
                        if cut_off {
                            tracing::info!("coordinators reachable again");
                            cut_off = false;
                        }
                        // the replicated revocations reach the overlay and the data plane
                        revoked.set(s.state.revoked.iter().cloned());
                        holder.apply(&s.state).await;
                    }
                    Ok(other) => tracing::warn!("unexpected answer to a status read: {other:?}"),
                    Err(e) => {
                        if !cut_off {
                            tracing::warn!("coordinators unreachable; serving what this node holds: {e}");
                            cut_off = true;
                        }
                    }
                }
            }
            _ = report.tick() => {
                if let Some(o) = overlay {
                    o.set_report(holder.report(&base));
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = api.await;
    if let Some(s) = svc {
        s.shutdown();
    }
    holder.shutdown();
    // the log ends with a signed checkpoint, committed if the coordinators answer
    let _ = checkpoints_stop.send(true);
    let _ = checkpoints.await;
    app.sync_intent_log();
    Ok(())
}

/// Opens the intent log `serve` names (or `data_dir/intent`), signing its
/// checkpoints with `identity` and keeping to its retention limits.
fn open_intent_log(
    serve: &NodeConfig,
    data_dir: &std::path::Path,
    identity: &NodeIdentity,
) -> Result<member::SharedLog> {
    let dir = serve
        .intent_log
        .clone()
        .unwrap_or_else(|| data_dir.join("intent"));
    let mut log = weft_audit::IntentLog::open(&dir, serve.intent_log_file_bytes)
        .with_context(|| format!("opening the intent log in {}", dir.display()))?;
    log.set_signer(std::sync::Arc::new(identity.clone()));
    log.set_retention(serve.intent_retention());
    Ok(std::sync::Arc::new(std::sync::Mutex::new(log)))
}

/// Asks the coordinators for the cluster's state (a linearizable read).
pub async fn status(cfg: &ClusterConfig) -> Result<StatusReport> {
    let identity = NodeIdentity::load(&cfg.identity_dir()).with_context(|| {
        format!(
            "this node has no identity in {}",
            cfg.identity_dir().display()
        )
    })?;
    let caller = Caller::new(&identity)?;
    match caller
        .ask(&cfg.coordinators(), &Request::Status, ASK_DEADLINE)
        .await?
    {
        Reply::Status(s) => Ok(*s),
        other => bail!("unexpected answer: {other:?}"),
    }
}

/// `weft status` as a table.
pub fn status_table(s: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "leader {}  term {}  commit {}  coordinators {:?}  placement epoch {}",
        s.leader.map_or("none".to_string(), |l| l.to_string()),
        s.term,
        s.commit,
        s.voters,
        s.state.epoch()
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<20} {:<12} {:<6} {:>7} {:>10} {:>6} {:>6} {:>6} {:>8} {:>9} {:>7}  HOLDS",
        "MEMBER",
        "SITE",
        "KIND",
        "MEMORY",
        "CAPACITY",
        "SLOTS",
        "QUEUE",
        "RUN",
        "TOK/S",
        "FREE-KV",
        "SEEN"
    );
    let placement = s.state.placement.as_ref();
    for m in s.state.members.values() {
        let holds: Vec<String> = placement
            .map(|p| p.held_by(m.id).iter().map(|h| h.to_string()).collect())
            .unwrap_or_default();
        let live = s.load.get(&m.name);
        let (queue, running, rate, free, seen) = match live {
            Some(l) => (
                l.report.queue_depth.to_string(),
                l.report.running.to_string(),
                format!("{:.1}", l.report.tokens_per_s),
                l.report.free_kv_tokens.to_string(),
                format!("{:.1}s", l.age_ms as f64 / 1e3),
            ),
            None => (
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "never".into(),
            ),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:<6} {:>6}G {:>10.0} {:>6} {:>6} {:>6} {:>8} {:>9} {:>7}  {}",
            m.name,
            m.site,
            match m.kind {
                weft_placement::SiteKind::Edge => "edge",
                weft_placement::SiteKind::Cloud => "cloud",
            },
            m.memory_bytes >> 30,
            m.tokens_per_s,
            m.slots,
            queue,
            running,
            rate,
            free,
            seen,
            {
                let planned = if holds.is_empty() {
                    "-".to_string()
                } else {
                    holds.join(" ")
                };
                match live {
                    Some(l) if l.report.models != holds => {
                        format!("{planned}  (loaded: {})", l.report.models.join(" "))
                    }
                    _ => planned,
                }
            }
        );
    }
    if let Some(p) = placement.filter(|p| !p.links.is_empty()) {
        let links: Vec<String> = p
            .links
            .iter()
            .map(|l| format!("{}-{} {:.1} ms", l.a, l.b, l.rtt_ms))
            .collect();
        let _ = writeln!(
            out,
            "\nplanned with measured round trips: {}",
            links.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\nmodels: {}",
        s.state
            .models
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    out
}
