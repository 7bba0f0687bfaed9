//! The sandbox's init (`weft sandbox-init`): the first process inside an
//! agent sandbox. It confines itself as its plan says
//! ([`weft_worker::sandbox::jail::prepare_sandbox`]), says it is ready,
//! and waits for its claim; then mounts its scratch space, seals itself
//! ([`weft_worker::sandbox::jail::seal_sandbox`]) and runs what the node
//! asks: commands (each in a process group of its own, with its limits,
//! its output streamed back) and file requests beneath the scratch space.
//!
//! It trusts only the node: the commands it runs are the untrusted part,
//! and they run confined as it is, with no capabilities, unable to
//! ptrace it or read its memory (it is not dumpable).

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use weft_worker::process::{Channel, ChannelKind};
use weft_worker::protocol::{read_frame, write_frame, FrameError};
use weft_worker::sandbox::jail::{self, SCRATCH};
use weft_worker::sandbox::{Plan, PLAN_ENV};

use crate::protocol::{scratch_path, Entry, ExecLimits, FailKind, FromInit, Stream, ToInit};

/// Output is sent in pieces of at most this many bytes.
const OUTPUT_CHUNK: usize = 64 << 10;

/// Most entries one listing answers with (a frame has a size limit).
const MAX_LISTING: usize = 10_000;

/// How long a command's output may go on after it exited and its process
/// group was killed (a descendant in a session of its own may hold its
/// pipes open).
const DRAIN: Duration = Duration::from_secs(1);

/// Runs the init on the channel `kind` names; returns when the node goes.
pub fn run(kind: ChannelKind) -> Result<()> {
    let plan: Plan = serde_json::from_str(
        &std::env::var(PLAN_ENV)
            .context("no sandbox plan: `weft sandbox-init` is started by the node")?,
    )
    .context("the sandbox plan")?;
    jail::prepare_sandbox(&plan).context("preparing the sandbox")?;
    let Channel {
        mut from_node,
        mut to_node,
    } = Channel::adopt(kind)?;
    write_frame(&mut to_node, &FromInit::Ready)?;
    let (disk_bytes, env) = match read_frame::<ToInit>(&mut from_node) {
        Ok(ToInit::Claim { disk_bytes, env }) => (disk_bytes, env),
        Ok(other) => bail!("a request before the claim: {other:?}"),
        // the node let the pool go without claiming it
        Err(_) => return Ok(()),
    };
    let confinement = jail::seal_sandbox(&plan, disk_bytes).context("sealing the sandbox")?;
    write_frame(&mut to_node, &FromInit::Claimed { confinement })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(from_node, to_node, env))
}

/// What runs: each command's process group, by id.
type Running = Arc<Mutex<HashMap<u64, i32>>>;

async fn serve(
    mut from_node: std::fs::File,
    mut to_node: std::fs::File,
    env: Vec<(String, String)>,
) -> Result<()> {
    // blocking reads and writes of the channel on threads of their own
    let (in_tx, mut requests) = mpsc::unbounded_channel::<ToInit>();
    std::thread::spawn(move || {
        while let Ok(m) = read_frame::<ToInit>(&mut from_node) {
            if in_tx.send(m).is_err() {
                return;
            }
        }
    });
    let (out, mut out_rx) = mpsc::unbounded_channel::<FromInit>();
    std::thread::spawn(move || {
        while let Some(m) = out_rx.blocking_recv() {
            match write_frame(&mut to_node, &m) {
                Ok(()) => {}
                // an answer too large for a frame fails alone (nothing of
                // it was written)
                Err(FrameError::TooLarge(n)) => {
                    let Some(id) = m.id() else { continue };
                    let failed = FromInit::Failed {
                        id,
                        kind: FailKind::TooLarge,
                        message: format!("the answer ({n} bytes) is over the frame limit"),
                    };
                    if write_frame(&mut to_node, &failed).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let running: Running = Arc::default();
    let env = Arc::new(env);
    while let Some(req) = requests.recv().await {
        match req {
            ToInit::Claim { .. } => {}
            ToInit::Exec {
                id,
                cmd,
                cwd,
                env: extra,
                stdin,
                timeout_ms,
                limits,
            } => {
                let (out, running, env) = (out.clone(), running.clone(), env.clone());
                tokio::spawn(async move {
                    let r = exec(
                        id, cmd, &cwd, &env, extra, stdin, timeout_ms, limits, &out, &running,
                    )
                    .await;
                    if let Err((kind, message)) = r {
                        let _ = out.send(FromInit::Failed { id, kind, message });
                    }
                });
            }
            ToInit::Kill { id } => {
                if let Some(pg) = running.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
                    // SAFETY: a signal to a process group this init made
                    unsafe { libc::kill(-pg, libc::SIGKILL) };
                }
            }
            ToInit::ReadFile {
                id,
                path,
                max_bytes,
            } => {
                let m = match read_file(&path, max_bytes) {
                    Ok(data) => FromInit::File { id, data },
                    Err((kind, message)) => FromInit::Failed { id, kind, message },
                };
                let _ = out.send(m);
            }
            ToInit::WriteFile { id, path, data } => {
                let _ = out.send(done(id, write_file(&path, &data)));
            }
            ToInit::DeleteFile { id, path } => {
                let _ = out.send(done(id, delete_file(&path)));
            }
            ToInit::ListFiles { id, path } => {
                let m = match list(&path) {
                    Ok(entries) => FromInit::Listing { id, entries },
                    Err((kind, message)) => FromInit::Failed { id, kind, message },
                };
                let _ = out.send(m);
            }
        }
    }
    // the node is gone: end every command
    for pg in running.lock().unwrap_or_else(|e| e.into_inner()).values() {
        // SAFETY: as above
        unsafe { libc::kill(-pg, libc::SIGKILL) };
    }
    Ok(())
}

type Failure = (FailKind, String);

fn done(id: u64, r: Result<(), Failure>) -> FromInit {
    match r {
        Ok(()) => FromInit::Done { id },
        Err((kind, message)) => FromInit::Failed { id, kind, message },
    }
}

fn io_failure(what: &str, e: io::Error) -> Failure {
    let kind = match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => FailKind::NotFound,
        Some(libc::ELOOP) => {
            return (
                FailKind::Invalid,
                format!("{what}: a symlink (file requests do not follow them)"),
            )
        }
        Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT) => FailKind::TooLarge,
        _ => FailKind::Io,
    };
    (kind, format!("{what}: {e}"))
}

/// Runs one command to its end, streaming what it says.
#[allow(clippy::too_many_arguments)]
async fn exec(
    id: u64,
    cmd: Vec<String>,
    cwd: &str,
    env: &[(String, String)],
    extra: Vec<(String, String)>,
    stdin: Vec<u8>,
    timeout_ms: u64,
    limits: ExecLimits,
    out: &mpsc::UnboundedSender<FromInit>,
    running: &Running,
) -> Result<(), Failure> {
    let Some((program, args)) = cmd.split_first() else {
        return Err((FailKind::Invalid, "an empty command".into()));
    };
    let cwd = scratch_path(cwd).map_err(|e| (FailKind::Invalid, e))?;
    let dir = format!("{SCRATCH}/{cwd}");
    let mut c = tokio::process::Command::new(program);
    c.args(args)
        .env_clear()
        .envs(env.iter().cloned())
        .envs(extra)
        .current_dir(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: setrlimit with integers, between fork and exec
    unsafe {
        c.pre_exec(move || {
            let set = |res, v: u64| {
                let r = libc::rlimit {
                    rlim_cur: v,
                    rlim_max: v,
                };
                libc::setrlimit(res, &r);
            };
            set(libc::RLIMIT_NOFILE, limits.nofile);
            set(libc::RLIMIT_CORE, 0);
            if limits.cpu_s > 0 {
                let r = libc::rlimit {
                    rlim_cur: limits.cpu_s,
                    rlim_max: limits.cpu_s + 1,
                };
                libc::setrlimit(libc::RLIMIT_CPU, &r);
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = c
        .spawn()
        .map_err(|e| (FailKind::NotStarted, format!("{program}: {e} (in {dir})")))?;
    let pid = child.id().unwrap_or(0);
    running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, pid as i32);
    let _ = out.send(FromInit::Started { id, pid });
    if let Some(mut w) = child.stdin.take() {
        tokio::spawn(async move {
            let _ = w.write_all(&stdin).await;
        });
    }
    let pump = |r: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>, stream: Stream| {
        let out = out.clone();
        tokio::spawn(async move {
            let Some(mut r) = r else { return };
            let mut buf = vec![0u8; OUTPUT_CHUNK];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let _ = out.send(FromInit::Output {
                            id,
                            stream,
                            data: buf[..n].to_vec(),
                        });
                    }
                }
            }
        })
    };
    let so = pump(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        Stream::Stdout,
    );
    let se = pump(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        Stream::Stderr,
    );
    let limit = Duration::from_millis(timeout_ms.max(1));
    let (status, timed_out) = match tokio::time::timeout(limit, child.wait()).await {
        Ok(s) => (s.ok(), false),
        Err(_) => {
            // SAFETY: a signal to the command's own process group
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            (child.wait().await.ok(), true)
        }
    };
    // what the command left running ends with it, so its output ends too
    // SAFETY: as above
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    let last = {
        let mut r = running.lock().unwrap_or_else(|e| e.into_inner());
        r.remove(&id);
        r.is_empty()
    };
    if last {
        // with no other command running, nothing but this init may be
        // left: a process that escaped the group (setsid) goes too
        kill_all_but_self();
    }
    let (a, b) = (so.abort_handle(), se.abort_handle());
    if tokio::time::timeout(DRAIN, async {
        let _ = tokio::join!(so, se);
    })
    .await
    .is_err()
    {
        a.abort();
        b.abort();
    }
    use std::os::unix::process::ExitStatusExt;
    let _ = out.send(FromInit::Exited {
        id,
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        timed_out,
        duration_ms: start.elapsed().as_millis() as u64,
    });
    Ok(())
}

/// SIGKILL to every process this init can see but itself.
fn kill_all_but_self() {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid != me {
            // SAFETY: a signal; the init's own PID namespace holds only
            // the sandbox's processes
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

fn cstr(s: &str) -> Result<CString, Failure> {
    CString::new(s).map_err(|_| (FailKind::Invalid, "a NUL in a path".into()))
}

/// Opens `path` (checked relative) beneath the scratch space without
/// following any symlink on the way: directories one by one with
/// `O_NOFOLLOW`. Returns the directory holding the last component and its
/// name (`None` for the scratch space itself).
fn walk(path: &str, make_dirs: bool) -> Result<(OwnedFd, Option<String>), Failure> {
    let rel = scratch_path(path).map_err(|e| (FailKind::Invalid, e))?;
    let root = cstr(SCRATCH)?;
    // SAFETY: open of a NUL-terminated path; the descriptor is owned below
    let fd = unsafe {
        libc::open(
            root.as_ptr(),
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io_failure("the scratch space", io::Error::last_os_error()));
    }
    // SAFETY: fd is a descriptor we just opened
    let mut dir = unsafe { OwnedFd::from_raw_fd(fd) };
    if rel.is_empty() {
        return Ok((dir, None));
    }
    let parts: Vec<&str> = rel.split('/').collect();
    let (last, dirs) = parts.split_last().expect("a non-empty path");
    for d in dirs {
        let c = cstr(d)?;
        use std::os::fd::AsRawFd;
        if make_dirs {
            // SAFETY: mkdirat relative to a directory we hold
            let r = unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) };
            if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(io_failure(d, io::Error::last_os_error()));
            }
        }
        // SAFETY: openat relative to a directory we hold
        let next = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if next < 0 {
            let mut e = io::Error::last_os_error();
            // (a symlink opened with O_DIRECTORY | O_NOFOLLOW is ENOTDIR,
            // not ELOOP: say which it was)
            if e.raw_os_error() == Some(libc::ENOTDIR) && is_symlink(&dir, &c) {
                e = io::Error::from_raw_os_error(libc::ELOOP);
            }
            return Err(io_failure(path, e));
        }
        // SAFETY: as above
        dir = unsafe { OwnedFd::from_raw_fd(next) };
    }
    Ok((dir, Some(last.to_string())))
}

/// Whether `name` in `dir` is a symlink (not following it).
fn is_symlink(dir: &OwnedFd, name: &std::ffi::CStr) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatat relative to a directory we hold, into a zeroed
    // struct on the stack
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ) == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFLNK
    }
}

fn open_in(dir: &OwnedFd, name: &str, flags: i32) -> Result<std::fs::File, Failure> {
    use std::os::fd::AsRawFd;
    let c = cstr(name)?;
    // SAFETY: openat relative to a directory we hold; never following a
    // symlink
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            // (O_NONBLOCK: a FIFO an agent's command made must not stall
            // the init; regular files ignore it)
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
            0o644,
        )
    };
    if fd < 0 {
        return Err(io_failure(name, io::Error::last_os_error()));
    }
    // SAFETY: a descriptor we just opened
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

fn read_file(path: &str, max_bytes: u64) -> Result<Vec<u8>, Failure> {
    let (dir, name) = walk(path, false)?;
    let name = name.ok_or((FailKind::IsDir, "the scratch space is a directory".into()))?;
    let f = open_in(&dir, &name, libc::O_RDONLY)?;
    let meta = f.metadata().map_err(|e| io_failure(path, e))?;
    if meta.is_dir() {
        return Err((FailKind::IsDir, format!("{path} is a directory")));
    }
    if !meta.is_file() {
        return Err((FailKind::Invalid, format!("{path} is not a file")));
    }
    if meta.len() > max_bytes {
        return Err((
            FailKind::TooLarge,
            format!(
                "{path} is {} bytes, over the {max_bytes}-byte limit",
                meta.len()
            ),
        ));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    f.take(max_bytes)
        .read_to_end(&mut data)
        .map_err(|e| io_failure(path, e))?;
    Ok(data)
}

fn write_file(path: &str, data: &[u8]) -> Result<(), Failure> {
    use std::io::Write;
    let (dir, name) = walk(path, true)?;
    let name = name.ok_or((FailKind::Invalid, "the scratch space is a directory".into()))?;
    let mut f = open_in(&dir, &name, libc::O_WRONLY | libc::O_CREAT)?;
    let meta = f.metadata().map_err(|e| io_failure(path, e))?;
    if !meta.is_file() {
        return Err((FailKind::Invalid, format!("{path} is not a file")));
    }
    f.set_len(0).map_err(|e| io_failure(path, e))?;
    f.write_all(data).map_err(|e| io_failure(path, e))
}

fn delete_file(path: &str) -> Result<(), Failure> {
    use std::os::fd::AsRawFd;
    let (dir, name) = walk(path, false)?;
    let name = name.ok_or((
        FailKind::Invalid,
        "the scratch space itself cannot go".into(),
    ))?;
    let c = cstr(&name)?;
    // SAFETY: unlinkat relative to a directory we hold (a symlink is
    // removed, never followed)
    let r = unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EISDIR) {
        // SAFETY: as above
        if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) } == 0 {
            return Ok(());
        }
        return Err(io_failure(path, io::Error::last_os_error()));
    }
    Err(io_failure(path, e))
}

fn list(path: &str) -> Result<Vec<Entry>, Failure> {
    let (dir, name) = walk(path, false)?;
    let d = match name {
        None => dir,
        Some(n) => {
            let f = open_in(&dir, &n, libc::O_RDONLY | libc::O_DIRECTORY)?;
            OwnedFd::from(f)
        }
    };
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let entries = std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))
        .map_err(|e| io_failure(path, e))?;
    for e in entries.flatten() {
        if out.len() == MAX_LISTING {
            return Err((
                FailKind::TooLarge,
                format!("{path} holds over {MAX_LISTING} entries: list a directory beneath it"),
            ));
        }
        let Ok(meta) = e.path().symlink_metadata() else {
            continue;
        };
        let t = meta.file_type();
        let kind = if t.is_symlink() {
            "symlink"
        } else if t.is_dir() {
            "dir"
        } else if t.is_file() {
            "file"
        } else {
            "other"
        };
        out.push(Entry {
            name: e.file_name().to_string_lossy().into_owned(),
            kind: kind.into(),
            size: meta.len(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
