//! The worker process (`weft worker`, started by the node): loads the model
//! and drives the engine's continuous batching for every request the node
//! sends, on the socket it inherited.

use std::io::{BufReader, BufWriter, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;

use anyhow::{Context, Result};
use weft_kernels::{Backend, Engine, EngineConfig, Request};

use super::protocol::{read_frame, write_frame, FromWorker, ToWorker};
use crate::sandbox::{self, WORKER_FD};

/// What a worker is told on its command line.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The GGUF file to serve.
    #[arg(long)]
    pub model: PathBuf,
    /// CPU threads.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
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
}

/// Runs the worker until the node closes the socket. A node that went away
/// mid-write (broken pipe) is a normal end, not an error.
pub fn run(args: WorkerArgs) -> Result<()> {
    match serve(args) {
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                    || c.downcast_ref::<super::protocol::FrameError>().is_some_and(|f| {
                        matches!(f, super::protocol::FrameError::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
                    })
            }) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn serve(args: WorkerArgs) -> Result<()> {
    if std::env::var_os(sandbox::SANDBOXED_ENV).is_some() {
        sandbox::enter_pid_namespace().context("entering the PID namespace")?;
    }
    // the node put our socket on WORKER_FD before exec
    let stream = socket()?;
    weft_kernels::set_threads(args.threads);
    let lm = weft_kernels::load(&args.model, None, Backend::Cpu)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let mut engine = Engine::new(
        lm.model,
        lm.tokenizer,
        EngineConfig {
            kv_budget_bytes: args.kv_budget,
            max_context: args.max_context,
            max_step_tokens: args.max_step_tokens,
            max_running: args.max_running,
        },
    )?;
    let reached_node = args
        .probe
        .as_deref()
        .is_some_and(|a| std::net::TcpStream::connect(a).is_ok());
    let mut out = BufWriter::new(stream.try_clone()?);
    let (_, kv_total) = engine.kv_usage();
    write_frame(
        &mut out,
        &FromWorker::Ready {
            context_length: engine.config().max_context,
            kv_blocks: kv_total,
            confinement: sandbox::confinement(),
            reached_node,
        },
    )?;
    out.flush()?;

    let (tx, rx) = mpsc::channel::<Option<ToWorker>>();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        loop {
            match read_frame::<ToWorker>(&mut r) {
                Ok(m) => {
                    if tx.send(Some(m)).is_err() {
                        return;
                    }
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
                }) => {
                    let req = Request {
                        id,
                        prompt,
                        params,
                        priority,
                    };
                    if let Err(e) = engine.add_resumed(req, resume) {
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
            for ev in engine.step()? {
                write_frame(
                    &mut out,
                    &FromWorker::Event {
                        id: ev.id,
                        token: ev.token,
                        text: ev.text,
                        logprob: ev.logprob,
                        finish: ev.finish,
                    },
                )?;
            }
            let (kv_used, kv_total) = engine.kv_usage();
            write_frame(
                &mut out,
                &FromWorker::Stats {
                    waiting: engine.waiting(),
                    running: engine.running(),
                    kv_used,
                    kv_total,
                },
            )?;
        }
        out.flush()?;
    }
}

#[allow(unsafe_code)]
fn socket() -> Result<UnixStream> {
    // SAFETY: the node dup'ed a connected Unix socket onto WORKER_FD for this
    // process, which owns it from here on.
    let s = unsafe { UnixStream::from_raw_fd(WORKER_FD) };
    s.peer_addr()
        .context("fd 3 is not a connected Unix socket: `weft worker` is started by the node")?;
    Ok(s)
}
