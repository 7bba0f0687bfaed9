//! The worker process (`weft worker`, started by the node): confines itself
//! as its sandbox plan says, loads the model, installs its seccomp filter,
//! and drives the engine's continuous batching for every request the node
//! sends, on the channel it inherited.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::mpsc;

use anyhow::{Context, Result};
use weft_kernels::{
    Backend, Chunk, ChunkOutput, Engine, EngineConfig, KernelError, LoadedModel, Request,
};

use crate::protocol::{
    encode_chain, read_any, write_frame, Frame, FrameError, FromWorker, ToWorker,
};
use crate::sandbox::seccomp::{self, Profile};
use crate::sandbox::{
    self, jail, Confinement, Layer, Plan, SeccompMode, Tier, MODEL_FD, WORKER_FD,
};

/// What a worker is told on its command line.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The GGUF file to serve.
    #[arg(long)]
    pub model: PathBuf,
    /// CPU threads.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: weft_kernels::Backend,
    /// Bytes of GPU memory the model may take (0: 90% of what is free).
    #[arg(long, default_value_t = 0)]
    pub device_memory_budget: usize,
    /// KV pool budget in bytes.
    #[arg(long)]
    pub kv_budget: usize,
    /// Longest sequence.
    #[arg(long)]
    pub max_context: usize,
    /// Most tokens one engine step runs.
    #[arg(long, default_value_t = 512)]
    pub max_step_tokens: usize,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// An address the worker tries to reach, to report its network isolation.
    #[arg(long)]
    pub probe: Option<String>,
    /// The layers to run, `A..B` (default: all). From layer 0 it is a
    /// chain's head: it serves requests and sends its hidden states to the
    /// node; otherwise it runs the node's chain steps on its layers.
    #[arg(long, value_parser = parse_layers)]
    pub layers: Option<std::ops::Range<usize>>,
    /// Turn the prefix cache off (every prompt is computed in full).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// A tenant's share of the KV cache, `NAME=SHARE` (repeated); the name
    /// `default` sets it for every tenant not named.
    #[arg(long = "tenant-kv-share", value_parser = parse_share)]
    pub tenant_kv_shares: Vec<(String, f64)>,
    /// Where the node is: `fd` (a Unix socket on descriptor 3) or `stdio`
    /// (stdin and stdout, under gVisor).
    #[arg(long, default_value = "fd")]
    pub channel: ChannelKind,
}

/// How a worker reaches its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChannelKind {
    /// A Unix socket on descriptor 3.
    Fd,
    /// Standard input and output.
    Stdio,
}

/// A worker's line to its node: what it reads, and what it writes.
pub struct Channel {
    /// Frames from the node.
    pub from_node: File,
    /// Frames to the node.
    pub to_node: File,
}

impl Channel {
    /// The channel the node set up for this process.
    #[allow(unsafe_code)]
    pub fn adopt(kind: ChannelKind) -> Result<Self> {
        match kind {
            ChannelKind::Fd => {
                // SAFETY: the node put a connected Unix socket on WORKER_FD
                // for this process, which owns it from here on.
                let s = unsafe { std::os::unix::net::UnixStream::from_raw_fd(WORKER_FD) };
                s.peer_addr().context(
                    "fd 3 is not a connected Unix socket: `weft worker` is started by the node",
                )?;
                // the node cleared close-on-exec to pass it down; nothing
                // this process starts (an agent sandbox's commands) may
                // inherit it
                // SAFETY: fcntl on a descriptor this process owns
                if unsafe { libc::fcntl(WORKER_FD, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("setting close-on-exec on the node's channel");
                }
                let from_node = File::from(std::os::fd::OwnedFd::from(s));
                let to_node = from_node.try_clone()?;
                Ok(Self { from_node, to_node })
            }
            // SAFETY: stdin and stdout are this process's; it takes them
            // over (nothing else reads or writes them).
            ChannelKind::Stdio => unsafe {
                Ok(Self {
                    from_node: File::from_raw_fd(0),
                    to_node: File::from_raw_fd(1),
                })
            },
        }
    }
}

/// A worker confined, connected and loaded: what [`run`] serves with, and
/// what the escape probe attacks from.
pub struct Confined {
    /// Its line to the node.
    pub channel: Channel,
    /// The model.
    pub lm: LoadedModel,
    /// What it holds.
    pub confinement: Confinement,
    /// Whether it could reach the probe address (it must not).
    pub reached_node: bool,
}

/// Everything a worker does before serving: confines itself as its plan
/// says (when the node sandboxed it), adopts its channel, loads its model,
/// tries the probe address, and installs its seccomp filter (unless
/// `seccomp` is false: the escape probe's look at the layers beneath it).
pub fn confine(args: &WorkerArgs, with_seccomp: bool) -> Result<Confined> {
    let plan: Option<Plan> = match std::env::var(sandbox::PLAN_ENV) {
        Ok(p) => Some(serde_json::from_str(&p).context("the sandbox plan")?),
        Err(_) => None,
    };
    let mut confinement = match &plan {
        Some(p) => jail::enter(p).context("entering the sandbox")?,
        None => sandbox::observe_self(),
    };
    let channel = Channel::adopt(args.channel)?;
    weft_kernels::set_threads(args.threads);
    let path = weft_kernels::quant::init_cpu_path()?;
    tracing::info!(%path, "CPU kernels");
    if args.device != Backend::Cpu && args.layers.is_some() {
        anyhow::bail!(
            "the {} backend runs whole models, not layer ranges",
            args.device
        );
    }
    let lm = match &plan {
        // the node handed the file over open: no path to it is visible here
        Some(p) if p.tier == Tier::Process => {
            #[allow(unsafe_code)]
            // SAFETY: the node put the model file, open read-only, on MODEL_FD.
            let file = unsafe { File::from_raw_fd(MODEL_FD) };
            weft_kernels::load_file(file, &args.model, args.layers.clone(), args.device)
        }
        _ => weft_kernels::load(&args.model, args.layers.clone(), args.device),
    }
    .with_context(|| format!("loading {}", args.model.display()))?;
    let reached_node = args
        .probe
        .as_deref()
        .is_some_and(|a| std::net::TcpStream::connect(a).is_ok());
    if let (Some(p), true) = (&plan, with_seccomp) {
        seccomp::install(Profile::ModelWorker, p.seccomp)
            .map_err(|e| anyhow::anyhow!("installing the seccomp filter: {e}"))?;
        if p.seccomp == SeccompMode::Enforce {
            confinement.hold(Layer::Seccomp);
        }
    }
    Ok(Confined {
        channel,
        lm,
        confinement,
        reached_node,
    })
}

fn parse_share(s: &str) -> Result<(String, f64), String> {
    let (name, v) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=SHARE"))?;
    let v: f64 = v.trim().parse().map_err(|e| format!("{v:?}: {e}"))?;
    Ok((name.to_string(), v))
}

fn parse_layers(s: &str) -> Result<std::ops::Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a layer range like 0..13"))?;
    let a: usize = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: usize = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a >= b {
        return Err(format!("{s:?} is an empty layer range"));
    }
    Ok(a..b)
}

/// How long a head waits for the rest of its chain to answer a step.
const CHAIN_STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The rest of a head worker's model, behind its node: each step goes out
/// on the socket as a chain frame and the node's reply comes back on it.
struct ViaNode {
    out: File,
    replies: mpsc::Receiver<(u64, Vec<u8>)>,
    step: u64,
}

impl ViaNode {
    /// Sends `m` down the chain as the next step and waits for its reply.
    fn call(&mut self, m: &crate::chain::Message) -> weft_kernels::Result<Vec<u8>> {
        self.step += 1;
        let frame = encode_chain(self.step, &crate::chain::encode_message(m))
            .map_err(|e| KernelError::BadInput(e.to_string()))?;
        self.out
            .write_all(&frame)
            .map_err(|e| KernelError::BadInput(format!("the node went away: {e}")))?;
        loop {
            match self.replies.recv_timeout(CHAIN_STEP_TIMEOUT) {
                Ok((step, body)) if step == self.step => return Ok(body),
                Ok(_) => continue, // a late reply to a step already given up
                Err(_) => {
                    return Err(KernelError::BadInput(format!(
                        "the chain did not answer within {CHAIN_STEP_TIMEOUT:?}"
                    )))
                }
            }
        }
    }
}

impl weft_kernels::Downstream for ViaNode {
    fn forward(&mut self, chunks: &[Chunk]) -> weft_kernels::Result<Vec<ChunkOutput>> {
        use crate::chain::{decode_reply, Message};
        let body = self.call(&Message::Forward(chunks.to_vec()))?;
        decode_reply(&body).map_err(KernelError::BadInput)
    }

    fn release(&mut self, seq: weft_kernels::SeqId) {
        use crate::chain::{encode_message, Message};
        if let Ok(frame) = encode_chain(0, &encode_message(&Message::Release(vec![seq]))) {
            let _ = self.out.write_all(&frame);
        }
    }

    fn map_prefix(
        &mut self,
        seq: weft_kernels::SeqId,
        hashes: &[weft_kernels::BlockHash],
    ) -> weft_kernels::Result<usize> {
        use crate::chain::{decode_mapped, Message};
        let body = self.call(&Message::Map {
            seq,
            hashes: hashes.to_vec(),
        })?;
        decode_mapped(&body).map_err(KernelError::BadInput)
    }

    fn register(
        &mut self,
        seq: weft_kernels::SeqId,
        first: usize,
        hashes: &[weft_kernels::BlockHash],
    ) {
        use crate::chain::{encode_message, Message};
        let m = Message::Register(vec![(seq, first as u32, hashes.to_vec())]);
        if let Ok(frame) = encode_chain(0, &encode_message(&m)) {
            let _ = self.out.write_all(&frame);
        }
    }
}

/// Runs the worker until the node closes the socket. A node that went away
/// mid-write (broken pipe) is a normal end, not an error.
pub fn run(args: WorkerArgs) -> Result<()> {
    match serve(args) {
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                    || c.downcast_ref::<FrameError>().is_some_and(|f| {
                        matches!(f, FrameError::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
                    })
            }) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn serve(args: WorkerArgs) -> Result<()> {
    let Confined {
        channel,
        lm,
        confinement,
        reached_node,
    } = confine(&args, true)?;
    if !lm.model.is_first() {
        return serve_shard(channel, lm.model, args.kv_budget, confinement, reached_node);
    }
    let mut shares: std::collections::BTreeMap<String, f64> =
        args.tenant_kv_shares.iter().cloned().collect();
    let cfg = EngineConfig {
        kv_budget_bytes: args.kv_budget,
        max_context: args.max_context,
        max_step_tokens: args.max_step_tokens,
        max_running: args.max_running,
        tenant_kv_share: shares.remove("default").unwrap_or(1.0),
        tenant_kv_shares: shares,
        device_memory_budget: args.device_memory_budget,
        prefix_cache: !args.no_prefix_cache,
    };
    // chain steps' replies come on their own channel, so a head blocked on
    // one still takes requests afterwards in order
    let (chain_tx, chain_rx) = mpsc::channel::<(u64, Vec<u8>)>();
    let mut engine = if lm.model.is_last() {
        args.device
            .engine(&lm, cfg)
            .with_context(|| format!("starting the engine on {}", args.device))?
    } else {
        let rest = ViaNode {
            out: channel.to_node.try_clone()?,
            replies: chain_rx,
            step: 0,
        };
        Engine::new_chain(lm.model, Box::new(rest), lm.tokenizer, cfg)?
    };
    let mut out = BufWriter::new(channel.to_node);
    let (_, kv_total) = engine.kv_usage();
    write_frame(
        &mut out,
        &FromWorker::Ready {
            context_length: engine.config().max_context,
            kv_blocks: kv_total,
            confinement,
            reached_node,
        },
    )?;
    out.flush()?;

    let (tx, rx) = mpsc::channel::<Option<ToWorker>>();
    let from_node = channel.from_node;
    std::thread::spawn(move || {
        let mut r = BufReader::new(from_node);
        loop {
            match read_any::<ToWorker>(&mut r) {
                Ok(Frame::Msg(m)) => {
                    if tx.send(Some(m)).is_err() {
                        return;
                    }
                }
                Ok(Frame::Chain { step, body }) => {
                    let _ = chain_tx.send((step, body));
                }
                Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
            }
        }
    });

    loop {
        // block while idle; otherwise take what has arrived and step
        let mut inbox = Vec::new();
        if !engine.has_work() {
            match rx.recv() {
                Ok(m) => inbox.push(m),
                Err(_) => return Ok(()),
            }
        }
        inbox.extend(rx.try_iter());
        for m in inbox {
            match m {
                None => return Ok(()), // the node closed the socket
                Some(ToWorker::Submit {
                    id,
                    prompt,
                    params,
                    priority,
                    resume,
                    tenant,
                    shared_tokens,
                }) => {
                    let req = Request {
                        id,
                        prompt,
                        params,
                        priority,
                        tenant,
                    };
                    let scope = weft_kernels::CacheScope { shared_tokens };
                    if let Err(e) = engine.add_with(req, resume, scope) {
                        write_frame(
                            &mut out,
                            &FromWorker::Rejected {
                                id,
                                reason: e.to_string(),
                            },
                        )?;
                    }
                }
                Some(ToWorker::Cancel { id }) => {
                    engine.cancel(id);
                }
            }
        }
        if engine.has_work() {
            // a chain step goes out on the socket too: nothing half-written
            out.flush()?;
            for ev in engine.step()? {
                write_frame(
                    &mut out,
                    &FromWorker::Event {
                        id: ev.id,
                        token: ev.token,
                        text: ev.text,
                        logprob: ev.logprob,
                        finish: ev.finish,
                        cached: ev.cached_tokens,
                    },
                )?;
            }
            let (kv_used, kv_total) = engine.kv_usage();
            let st = engine.stats();
            write_frame(
                &mut out,
                &FromWorker::Stats {
                    waiting: engine.waiting(),
                    running: engine.running(),
                    kv_used,
                    kv_total,
                    tenants: engine.tenants(),
                    cache: crate::runner::CacheStats {
                        hits: st.cache_hits,
                        cached_tokens: st.cached_prompt_tokens,
                        computed_tokens: st.prefill_tokens,
                        evictions: st.cache_evictions,
                        blocks: engine.cached_blocks(),
                    },
                },
            )?;
        }
        out.flush()?;
    }
}

/// A shard worker: runs the node's chain steps through its layers, one at
/// a time, until the node closes the socket.
fn serve_shard(
    channel: Channel,
    shard: std::sync::Arc<weft_kernels::Model>,
    kv_budget: usize,
    confinement: Confinement,
    reached_node: bool,
) -> Result<()> {
    use crate::chain::{decode_message, encode_reply, Message};
    // the last range sends back its final hidden states, not logits: the
    // head holds the (tied) projection, and a row of `hidden` values is
    // far smaller than one of `vocab`
    let mut stage = weft_kernels::Stage::new(shard, kv_budget).leaving_projection_to_the_head();
    let mut out = BufWriter::new(channel.to_node);
    write_frame(
        &mut out,
        &FromWorker::Ready {
            context_length: stage.shard().config().context_length,
            kv_blocks: stage.kv_usage().1,
            confinement,
            reached_node,
        },
    )?;
    out.flush()?;
    let mut r = BufReader::new(channel.from_node);
    loop {
        let (step, body) = match read_any::<ToWorker>(&mut r) {
            Ok(Frame::Chain { step, body }) => (step, body),
            Ok(Frame::Msg(_)) => continue, // requests go to heads, not shards
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let reply = match decode_message(&body) {
            Ok(Message::Release(seqs)) => {
                for s in seqs {
                    stage.release(s);
                }
                None
            }
            Ok(Message::Forward(chunks)) => Some(stage.forward(&chunks).map_err(|e| e.to_string())),
            // traces are the nodes' to log; a worker has no use for them
            Ok(Message::Trace(_)) => None,
            Ok(Message::Map { seq, hashes }) => {
                let n = stage.map_or_keep(seq, &hashes);
                out.write_all(&encode_chain(step, &crate::chain::mapped(n))?)?;
                out.flush()?;
                continue;
            }
            Ok(Message::Register(entries)) => {
                for (seq, first, hashes) in entries {
                    stage.register(seq, first as usize, &hashes);
                }
                None
            }
            // a message that wants no reply gets none, even undecoded
            Err(_) if !crate::chain::wants_reply(&body) => None,
            Err(e) => Some(Err(format!("bad chain step: {e}"))),
        };
        if let Some(reply) = reply {
            out.write_all(&encode_chain(step, &encode_reply(&reply))?)?;
            let (kv_used, kv_total) = stage.kv_usage();
            write_frame(
                &mut out,
                &FromWorker::Stats {
                    waiting: 0,
                    running: 0,
                    kv_used,
                    kv_total,
                    tenants: Vec::new(),
                    cache: crate::runner::CacheStats {
                        blocks: stage.cache_usage().0,
                        evictions: stage.cache_usage().1,
                        ..Default::default()
                    },
                },
            )?;
            out.flush()?;
        }
    }
}
