//! The escape probe: the worker itself, confined exactly as the node
//! confines a worker (same launcher, same steps, same seccomp filter once
//! its model is loaded), that makes one escape attempt in place of serving
//! and sends back what it got. Only the escape suite runs it.

use std::io::Write;

use clap::Parser;
use weft_worker::process::{confine, WorkerArgs};
use weft_worker::protocol::encode;
use weft_worker::sandbox::probe::{attempt, Probed};

#[derive(Parser, Debug)]
#[command(
    name = "weft-sandbox-probe",
    about = "An escape attempt from inside a worker sandbox (for the escape suite)"
)]
struct Args {
    /// `worker`, as the node starts its workers.
    #[arg(value_parser = ["worker"])]
    _worker: String,
    #[command(flatten)]
    worker: WorkerArgs,
    /// The attempt (see weft_worker::sandbox::probe::ATTEMPTS).
    #[arg(long)]
    attempt: String,
    /// What it aims at: a path, an address or a pid.
    #[arg(long, default_value = "")]
    target: String,
    /// Attempt before the seccomp filter (the layers beneath it, alone).
    #[arg(long)]
    before_seccomp: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut c = confine(&a.worker, !a.before_seccomp)?;
    let outcome = attempt(&a.attempt, &a.target);
    let frame = encode(&Probed {
        attempt: a.attempt,
        outcome,
    })?;
    c.channel.to_node.write_all(&frame)?;
    Ok(())
}
