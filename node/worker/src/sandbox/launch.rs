//! The node's half of the process tier: what happens to a worker between
//! `fork` and `exec`.
//!
//! In the child (async-signal-safe calls only): the socket to the node goes
//! to [`WORKER_FD`], the model file to [`MODEL_FD`], every other descriptor
//! is closed; the child dies with the node, leaves the node's process
//! group, sets `no_new_privs`, drops its supplementary groups and unshares
//! user, mount, PID, network, IPC, UTS and cgroup namespaces. It then tells
//! the node its pid and waits. A thread of the node writes the child's uid
//! and gid maps (its namespace's root is the dedicated kernel uid and gid,
//! nothing else) and puts it in its cgroup, then lets it go on. The child
//! becomes that uid and gid, sets its rlimits, and executes the worker
//! through `/proc/self/fd`, so no directory above the executable needs to
//! be open to the dedicated uid.
//!
//! A node that is not root can map no uid but its own: the worker then
//! runs without [`Layer::DedicatedUid`], which a strict policy refuses.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::cgroup::Cgroup;
use super::{check, Layer, MODEL_FD, WORKER_FD};

/// Where a worker's executable is while the child execs it.
const EXE_FD: RawFd = 5;
/// The child's end of the handshake on which it tells its pid.
const TELL_FD: RawFd = 6;
/// The child's end of the handshake on which it waits to go on.
const GO_FD: RawFd = 7;
/// How long the node waits for a child to say it unshared.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Resource limits of one worker's process (rlimits; the cgroup holds the
/// rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    /// Open files.
    pub nofile: u64,
    /// Bytes of any file it writes (0: none; a worker writes no file).
    pub fsize: u64,
    /// Bytes of locked memory.
    pub memlock: u64,
}

impl Default for Rlimits {
    fn default() -> Self {
        Self {
            nofile: 256,
            fsize: 0,
            memlock: 64 << 10,
        }
    }
}

/// How one process-tier worker is launched.
#[derive(Debug)]
pub struct Launch {
    /// The kernel uid and gid its namespace's root maps to (`None`: the
    /// node's own, when the node cannot map another).
    pub uid: Option<u32>,
    /// Its cgroup, made beforehand (off the launch path): the child joins
    /// it before it goes on past the handshake.
    pub cgroup: Option<std::sync::Arc<Cgroup>>,
    /// Its rlimits.
    pub rlimits: Rlimits,
}

/// The layers [`Launch`] gives a child that starts.
pub fn layers(uid: Option<u32>, cgroup: bool) -> Vec<Layer> {
    let mut l = vec![
        Layer::UserNamespace,
        Layer::PidNamespace,
        Layer::NetworkNamespace,
    ];
    if uid.is_some() {
        l.push(Layer::DedicatedUid);
    }
    if cgroup {
        l.push(Layer::Cgroup);
    }
    l
}

/// A launch under way: the child's ends of the handshake (held until the
/// fork has them), and the node's thread that maps the child.
pub struct Pending {
    child_ends: Option<(std::fs::File, std::fs::File)>,
    mapper: std::thread::JoinHandle<std::io::Result<u32>>,
}

impl Pending {
    /// After spawning, whether it worked or not: the child's pid as the
    /// mapper saw it, or why mapping failed.
    pub fn finish(mut self) -> std::io::Result<u32> {
        // the node's copies of the child's ends: closed, so a child that
        // never spoke reads as gone
        self.child_ends = None;
        self.mapper
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the uid mapper panicked")))
    }
}

/// Sets `cmd` up to run `exe` as a process-tier worker with `socket` and
/// `model` as its descriptors; call [`Pending::finish`] after spawning.
pub fn prepare(
    cmd: &mut tokio::process::Command,
    launch: Launch,
    exe: &std::fs::File,
    socket: RawFd,
    model: Option<RawFd>,
) -> std::io::Result<Pending> {
    let (tell_r, tell_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let exe_fd = exe.as_raw_fd();
    let (child_tell, child_go) = (tell_w.as_raw_fd(), go_r.as_raw_fd());
    let rl = launch.rlimits;
    let dedicated = launch.uid;
    // without a uid of its own the child maps itself (root in its
    // namespace is the node's uid): an unprivileged process may map its own
    // uid, where writing another's maps may be refused (gVisor does)
    // SAFETY: getters without arguments.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let own_maps = dedicated.is_none().then(|| {
        (
            format!("0 {euid} 1\n").into_bytes(),
            format!("0 {egid} 1\n").into_bytes(),
        )
    });
    cmd.as_std_mut().env_clear().current_dir("/").arg0("weft");
    // SAFETY: the closure runs in the child between fork and exec and makes
    // only async-signal-safe syscalls on integers and stack memory.
    unsafe {
        cmd.pre_exec(move || {
            child(
                socket,
                model,
                exe_fd,
                child_tell,
                child_go,
                match &own_maps {
                    None => Maps::ByNode,
                    Some((u, g)) => Maps::Own(u, g),
                },
                rl,
            )
        });
    }
    let uid = launch.uid;
    let cgroup = launch.cgroup;
    let mapper = std::thread::spawn(move || map_child(tell_r, go_w, uid, cgroup.as_deref()));
    Ok(Pending {
        child_ends: Some((tell_w, go_r)),
        mapper,
    })
}

/// The node's half of the handshake: reads the child's pid, writes its
/// maps, joins it to its cgroup, and lets it go on.
fn map_child(
    mut tell: std::fs::File,
    mut go: std::fs::File,
    uid: Option<u32>,
    cgroup: Option<&Cgroup>,
) -> std::io::Result<u32> {
    let mut pid = [0u8; 4];
    wait_readable(&tell, HANDSHAKE_TIMEOUT)?;
    tell.read_exact(&mut pid)?;
    let pid = u32::from_le_bytes(pid);
    let proc = format!("/proc/{pid}");
    // a child without a uid of its own has mapped itself
    if let Some(u) = uid {
        std::fs::write(format!("{proc}/setgroups"), "deny")?;
        std::fs::write(format!("{proc}/uid_map"), format!("0 {u} 1\n"))?;
        std::fs::write(format!("{proc}/gid_map"), format!("0 {u} 1\n"))?;
    }
    if let Some(c) = cgroup {
        c.add(pid)?;
    }
    go.write_all(b"g")?;
    Ok(pid)
}

fn wait_readable(f: &std::fs::File, within: Duration) -> std::io::Result<()> {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack.
    let n = unsafe { libc::poll(&mut p, 1, within.as_millis() as libc::c_int) };
    match n {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the worker did not start its namespaces in time",
        )),
        _ => Ok(()),
    }
}

fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: a two-int array for pipe2 to fill.
    check(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        "pipe2",
    )?;
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    unsafe {
        Ok((
            std::fs::File::from(OwnedFd::from_raw_fd(fds[0])),
            std::fs::File::from(OwnedFd::from_raw_fd(fds[1])),
        ))
    }
}

/// Who writes the child's uid and gid maps.
#[derive(Clone, Copy)]
enum Maps<'a> {
    /// The node, to its dedicated uid (the node is root).
    ByNode,
    /// The child itself, these lines (its own uid and gid: the node is not
    /// root).
    Own(&'a [u8], &'a [u8]),
}

/// Runs in the forked child before `exec`: only async-signal-safe calls.
fn child(
    socket: RawFd,
    model: Option<RawFd>,
    exe: RawFd,
    tell: RawFd,
    go: RawFd,
    maps: Maps<'_>,
    rl: Rlimits,
) -> std::io::Result<()> {
    let dedicated = matches!(maps, Maps::ByNode);
    // SAFETY: plain syscalls on integers and stack buffers in the
    // single-threaded child after fork.
    unsafe {
        // the handshake's descriptors out of the way of the fixed ones,
        // then the worker's at their numbers, the handshake's after them
        let tell = moved_above(tell, 100)?;
        let go = moved_above(go, 100)?;
        let socket = moved_above(socket, 100)?;
        let model = match model {
            Some(m) => Some(moved_above(m, 100)?),
            None => None,
        };
        let exe = moved_above(exe, 100)?;
        check(libc::dup2(socket, WORKER_FD), "dup2 worker socket")?;
        if let Some(m) = model {
            check(libc::dup2(m, MODEL_FD), "dup2 model file")?;
        }
        check(libc::dup2(exe, EXE_FD), "dup2 executable")?;
        check(libc::dup2(tell, TELL_FD), "dup2 handshake")?;
        check(libc::dup2(go, GO_FD), "dup2 handshake")?;
        for fd in [WORKER_FD, MODEL_FD] {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags != -1 {
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
        }
        // the executable goes with the exec
        check(
            libc::fcntl(EXE_FD, libc::F_SETFD, libc::FD_CLOEXEC),
            "fcntl executable",
        )?;
        // nothing else of the node's reaches the worker
        if model.is_none() {
            libc::close(MODEL_FD);
        }
        close_from(GO_FD + 1)?;
        let (tell, go) = (TELL_FD, GO_FD);
        // die with the node; own process group (a Ctrl-C at the terminal
        // reaches only the node, which drains before it stops the worker)
        check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            "prctl(PDEATHSIG)",
        )?;
        check(libc::setpgid(0, 0), "setpgid")?;
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "prctl(NO_NEW_PRIVS)",
        )?;
        // supplementary groups would keep the node's (root's) group
        // rights: gone before the namespace makes them unchangeable
        if dedicated {
            check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        }
        check(
            libc::unshare(
                libc::CLONE_NEWUSER
                    | libc::CLONE_NEWNS
                    | libc::CLONE_NEWPID
                    | libc::CLONE_NEWNET
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWUTS
                    | libc::CLONE_NEWCGROUP,
            ),
            "unshare(user, mount, pid, net, ipc, uts, cgroup namespaces)",
        )?;
        if let Maps::Own(uid_map, gid_map) = maps {
            // gVisor has no setgroups file (nor the hole it closes)
            match write_proc(c"/proc/self/setgroups", b"deny") {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                r => r?,
            }
            write_proc(c"/proc/self/uid_map", uid_map)?;
            write_proc(c"/proc/self/gid_map", gid_map)?;
        }
        let pid = libc::getpid().to_le_bytes();
        if libc::write(tell, pid.as_ptr().cast(), 4) != 4 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ok = [0u8; 1];
        if libc::read(go, ok.as_mut_ptr().cast(), 1) != 1 {
            return Err(std::io::Error::other(
                "the node did not map the worker's uid and gid",
            ));
        }
        libc::close(tell);
        libc::close(go);
        // the namespace's root: the dedicated kernel uid and gid
        check(libc::setresgid(0, 0, 0), "setresgid")?;
        check(libc::setresuid(0, 0, 0), "setresuid")?;
        for (res, v) in [
            (libc::RLIMIT_CORE, 0),
            (libc::RLIMIT_NOFILE, rl.nofile),
            (libc::RLIMIT_FSIZE, rl.fsize),
            (libc::RLIMIT_MEMLOCK, rl.memlock),
        ] {
            let lim = libc::rlimit {
                rlim_cur: v,
                rlim_max: v,
            };
            check(libc::setrlimit(res, &lim), "setrlimit")?;
        }
    }
    Ok(())
}

/// Writes `bytes` to the /proc file `path` in one write.
///
/// # Safety
/// Async-signal-safe; for the child between fork and exec.
unsafe fn write_proc(path: &std::ffi::CStr, bytes: &[u8]) -> std::io::Result<()> {
    // SAFETY: open of a NUL-terminated path, a write of a slice, a close.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            // the errno as it is: a caller tells a missing file apart
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != bytes.len() as isize {
            return Err(err);
        }
    }
    Ok(())
}

/// The highest open descriptor, read from `/proc/self/fd` with raw
/// `getdents64` (no allocation: async-signal-safe); `None` without /proc,
/// or when the listing fails or does not parse (never a partial answer).
///
/// # Safety
/// Async-signal-safe; for the child between fork and exec.
unsafe fn highest_fd() -> Option<RawFd> {
    // SAFETY: open of a NUL-terminated path.
    let dir = unsafe {
        libc::open(
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return None;
    }
    let mut buf = [0u8; 4096];
    let mut max: RawFd = -1;
    loop {
        // SAFETY: getdents64 into a local buffer of its length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            // SAFETY: closing the descriptor opened above.
            unsafe { libc::close(dir) };
            return None;
        }
        if n == 0 {
            break;
        }
        let mut off = 0usize;
        // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name
        while off + 19 <= n as usize {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            if reclen < 19 || off + reclen > n as usize {
                // SAFETY: closing the descriptor opened above.
                unsafe { libc::close(dir) };
                return None;
            }
            let mut v: i64 = 0;
            let mut digits = 0;
            for &c in &buf[off + 19..off + reclen] {
                if c == 0 {
                    break;
                }
                if !c.is_ascii_digit() {
                    digits = 0;
                    break;
                }
                v = v * 10 + i64::from(c - b'0');
                digits += 1;
            }
            if digits > 0 && v != i64::from(dir) && v > i64::from(max) && v <= i64::from(i32::MAX) {
                max = v as RawFd;
            }
            off += reclen;
        }
    }
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(dir) };
    Some(max)
}

/// Closes every descriptor from `first` on: `close_range`, or where the
/// kernel has none (gVisor's older releases answer EINVAL, kernels before
/// 5.9 ENOSYS) one `close` per descriptor up to the highest open one. With
/// neither that nor a readable `/proc/self/fd` it fails: no descriptor of
/// the node may reach the worker.
///
/// # Safety
/// Async-signal-safe; for the child between fork and exec.
unsafe fn close_from(first: RawFd) -> std::io::Result<()> {
    // SAFETY: close_range on integer descriptors.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0u32) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
        return Err(e);
    }
    // SAFETY: async-signal-safe, as this function is.
    let end =
        match unsafe { highest_fd() } {
            // the fixed descriptors below `first` are open: a listing that
            // does not show them is wrong
            Some(max) if max >= first - 1 => max + 1,
            _ => return Err(std::io::Error::other(
                "no close_range and no readable /proc/self/fd: cannot close the node's descriptors",
            )),
        };
    for fd in first..end {
        // SAFETY: closing a descriptor number; EBADF for unused ones is fine.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// `fd` moved to a number at least `min` (out of the way of the fixed
/// ones).
///
/// # Safety
/// Async-signal-safe; for the child between fork and exec.
unsafe fn moved_above(fd: RawFd, min: RawFd) -> std::io::Result<RawFd> {
    // SAFETY: fcntl on an integer descriptor.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    check(n, "fcntl(F_DUPFD)")?;
    Ok(n)
}

/// The program a [`prepare`]d command runs: the executable through the
/// descriptor the child put it on.
pub fn program() -> &'static str {
    "/proc/self/fd/5"
}

use std::os::unix::process::CommandExt as _;
