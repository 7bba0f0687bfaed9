//! The worker sandbox: what the node does to a worker process between `fork`
//! and `exec`, and the worker's first step after `exec`.
//!
//! The child gets `no_new_privs`, new user, mount, IPC, network and PID
//! namespaces (so it runs as an unmapped user that cannot write the model file
//! or anything else it does not own, sees no network interface but a downed
//! loopback, and cannot signal the node), and an address-space limit. Its only
//! channel to the node is an inherited Unix socket on [`WORKER_FD`]. A new PID
//! namespace applies to the children of the process that creates it, so the
//! worker forks once at start ([`enter_pid_namespace`]): the child is PID 1 of
//! the namespace and runs the engine; the parent only waits and passes on the
//! exit status. Seccomp and Landlock are the hardening issue's.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

/// The file descriptor on which a worker finds its socket to the node.
pub const WORKER_FD: RawFd = 3;
/// Environment variable telling a worker it was started inside the sandbox.
pub const SANDBOXED_ENV: &str = "WEFT_WORKER_SANDBOXED";

fn check(ret: libc::c_int, what: &'static str) -> io::Result<()> {
    if ret == -1 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Runs in the forked child before `exec`: only async-signal-safe calls.
/// `socket` is moved to [`WORKER_FD`]; `sandbox` adds the namespaces.
pub fn child_setup(
    socket: RawFd,
    sandbox: bool,
    address_space_limit: Option<u64>,
) -> io::Result<()> {
    // SAFETY: plain syscalls on integers in the single-threaded child after fork.
    unsafe {
        check(libc::dup2(socket, WORKER_FD), "dup2 worker socket")?;
        let flags = libc::fcntl(WORKER_FD, libc::F_GETFD);
        check(
            libc::fcntl(WORKER_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC),
            "fcntl",
        )?;
        // die with the node
        check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            "prctl(PDEATHSIG)",
        )?;
        // own process group: a Ctrl-C at the terminal reaches only the node,
        // which drains its requests before it stops the worker
        check(libc::setpgid(0, 0), "setpgid")?;
        if sandbox {
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                "prctl(NO_NEW_PRIVS)",
            )?;
            check(
                libc::unshare(
                    libc::CLONE_NEWUSER
                        | libc::CLONE_NEWNS
                        | libc::CLONE_NEWNET
                        | libc::CLONE_NEWIPC
                        | libc::CLONE_NEWPID,
                ),
                "unshare(user, mount, net, ipc, pid namespaces)",
            )?;
        }
        if let Some(limit) = address_space_limit {
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            check(libc::setrlimit(libc::RLIMIT_AS, &rl), "setrlimit(AS)")?;
        }
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        check(libc::setrlimit(libc::RLIMIT_CORE, &core), "setrlimit(CORE)")?;
    }
    Ok(())
}

/// In a sandboxed worker: forks so that the engine runs as PID 1 of the new
/// PID namespace. Returns in the child; the parent never returns (it exits with
/// the child's status). Call before any thread is started.
pub fn enter_pid_namespace() -> io::Result<()> {
    // SAFETY: fork in a single-threaded process; the parent only waits and exits.
    unsafe {
        let pid = libc::fork();
        if pid == -1 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // the engine process: die if the waiting parent does
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            return Ok(());
        }
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) == -1 {
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                libc::_exit(1);
            }
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        libc::_exit(code);
    }
}

/// What a worker can observe about its own confinement (reported to the node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Confinement {
    /// Its PID as it sees it (1 inside a new PID namespace).
    pub pid: u32,
    /// Its user id as it sees it (the overflow id when unmapped).
    pub uid: u32,
    /// Whether `no_new_privs` is set.
    pub no_new_privs: bool,
}

/// Observes the calling process's confinement.
pub fn confinement() -> Confinement {
    // SAFETY: getters without arguments or with integer arguments.
    unsafe {
        Confinement {
            pid: libc::getpid() as u32,
            uid: libc::getuid(),
            no_new_privs: libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1,
        }
    }
}
