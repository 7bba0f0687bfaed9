//! The seccomp filters, as data: every allowed syscall with the reason a
//! worker needs it, derived from `strace -f` of the test suite's workers
//! after their model is loaded (`scripts/trace_worker_syscalls.sh` redoes
//! it). Anything else kills the process (SIGSYS), or is allowed and logged
//! by the kernel in [`SeccompMode::Log`] (for finding a missing syscall).
//!
//! A few calls are refused with an errno instead of killing, because the C
//! library or std try them and handle the refusal: `clone3` (glibc falls
//! back to `clone`) and `openat` (a lazy lookup of a file the new root
//! does not have). They sit in a second filter whose errno wins over the
//! first filter's allow (the kernel takes the strictest verdict of all
//! filters).
//!
//! Not allowed, among others: `socket`, `connect`, `bind`, `execve`,
//! `ptrace`, `process_vm_*`, `mount`, `unshare`, `setns`, `bpf`,
//! `perf_event_open`, `userfaultfd`, `io_uring_*`, `keyctl`, `ioctl`;
//! `clone` only with `CLONE_THREAD`; `mmap` and `mprotect` never with
//! `PROT_EXEC` (no code is mapped after the model is loaded). The filter is
//! built for the native architecture: a call from another ABI (x32 numbers,
//! `int 0x80`) is a mismatch and kills.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::SeccompMode;

/// Which process a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A model worker once its model is loaded.
    ModelWorker,
    /// The worker's first process, which only waits for the engine (the
    /// PID namespace's PID 1) and passes on its exit status.
    Waiter,
    /// An agent sandbox, which runs any program: everything but the
    /// calls on [`SANDBOX_DENIED`], which fail with `EPERM`; a call of
    /// another ABI (x32 numbers, `int 0x80`) kills.
    Sandbox,
}

/// A condition on one argument.
#[derive(Debug, Clone, Copy)]
enum Arg {
    /// `arg[i] & mask == value`.
    Masked(u8, u64, u64),
    /// `arg[i] == value`.
    Eq(u8, u64),
}

/// One allowed syscall: its number, why, and what its arguments must be.
struct Allow {
    nr: i64,
    why: &'static str,
    args: &'static [Arg],
}

const fn allow(nr: i64, why: &'static str) -> Allow {
    Allow { nr, why, args: &[] }
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;

/// What a model worker needs after its model is loaded.
const MODEL_WORKER: &[Allow] = &[
    allow(libc::SYS_read, "frames from the node"),
    allow(libc::SYS_write, "frames and logs to the node"),
    allow(libc::SYS_writev, "logs (stderr) and buffered frames"),
    allow(
        libc::SYS_recvfrom,
        "the socket to the node (std reads with recv)",
    ),
    allow(
        libc::SYS_sendto,
        "the socket to the node (std writes with send)",
    ),
    allow(libc::SYS_close, "descriptors the engine drops"),
    Allow {
        nr: libc::SYS_mmap,
        why: "the allocator and thread stacks; never executable",
        args: &[Arg::Masked(2, PROT_EXEC, 0)],
    },
    Allow {
        nr: libc::SYS_mprotect,
        why: "thread stack guards; never executable",
        args: &[Arg::Masked(2, PROT_EXEC, 0)],
    },
    allow(libc::SYS_munmap, "the allocator"),
    allow(libc::SYS_mremap, "the allocator growing a buffer"),
    allow(libc::SYS_madvise, "the allocator giving memory back"),
    allow(libc::SYS_brk, "the allocator"),
    allow(libc::SYS_futex, "locks and channels between threads"),
    allow(libc::SYS_set_robust_list, "a new thread's futex list"),
    allow(libc::SYS_rseq, "a new thread's restartable sequences"),
    allow(libc::SYS_sched_yield, "spinning thread pools"),
    allow(
        libc::SYS_sched_getaffinity,
        "counting CPUs for the thread pool",
    ),
    Allow {
        nr: libc::SYS_clone,
        why: "threads of the engine; never a process",
        args: &[Arg::Masked(0, CLONE_THREAD, CLONE_THREAD)],
    },
    allow(
        libc::SYS_clone3,
        "refused politely below: glibc falls back to clone",
    ),
    allow(
        libc::SYS_openat,
        "refused politely below: lazy lookups fail cleanly",
    ),
    allow(libc::SYS_exit, "a thread ending"),
    allow(libc::SYS_exit_group, "the worker ending"),
    allow(libc::SYS_rt_sigreturn, "returning from a signal handler"),
    allow(
        libc::SYS_rt_sigprocmask,
        "threads block signals while they start",
    ),
    allow(
        libc::SYS_rt_sigaction,
        "std's stack-overflow handler in new threads",
    ),
    allow(
        libc::SYS_sigaltstack,
        "std's stack-overflow handler in new threads",
    ),
    allow(libc::SYS_getpid, "the C library"),
    allow(libc::SYS_gettid, "the C library"),
    allow(libc::SYS_getrandom, "hash seeds and sampling"),
    allow(
        libc::SYS_clock_gettime,
        "timing steps (when the vDSO is not used)",
    ),
    allow(libc::SYS_clock_nanosleep, "sleeps"),
    allow(libc::SYS_nanosleep, "sleeps"),
    allow(libc::SYS_restart_syscall, "a sleep or wait interrupted"),
    Allow {
        nr: libc::SYS_prctl,
        why: "naming threads",
        args: &[Arg::Eq(0, libc::PR_SET_NAME as u64)],
    },
    allow(
        libc::SYS_tgkill,
        "abort() after a panic signals the worker itself",
    ),
    allow(libc::SYS_fcntl, "std checking a descriptor's flags"),
    allow(libc::SYS_fstat, "std sizing a read"),
    allow(libc::SYS_statx, "std sizing a read"),
    allow(libc::SYS_lseek, "std reading"),
    allow(libc::SYS_poll, "std checking the standard descriptors"),
];

/// What the waiter needs.
const WAITER: &[Allow] = &[
    allow(libc::SYS_wait4, "waiting for the engine"),
    allow(libc::SYS_exit_group, "passing on its exit status"),
    allow(libc::SYS_exit, "ending"),
    allow(libc::SYS_rt_sigreturn, "returning from a signal handler"),
    allow(libc::SYS_restart_syscall, "a wait interrupted"),
];

const NS_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// What an agent sandbox may not call (each fails with `EPERM`): what
/// reaches the kernel's less-guarded parts, or out of the sandbox.
pub const SANDBOX_DENIED: &[(i64, &str)] = &[
    (libc::SYS_mount, "filesystems are the template's"),
    (libc::SYS_umount2, "filesystems are the template's"),
    (libc::SYS_pivot_root, "the root is fixed"),
    (libc::SYS_chroot, "the root is fixed"),
    (libc::SYS_move_mount, "the new mount API"),
    (libc::SYS_open_tree, "the new mount API"),
    (libc::SYS_fsopen, "the new mount API"),
    (libc::SYS_fsconfig, "the new mount API"),
    (libc::SYS_fsmount, "the new mount API"),
    (libc::SYS_fspick, "the new mount API"),
    (libc::SYS_mount_setattr, "the new mount API"),
    (
        libc::SYS_unshare,
        "no namespaces of its own (user namespaces above all)",
    ),
    (libc::SYS_setns, "no joining other namespaces"),
    (libc::SYS_ptrace, "no debugging its own init or neighbours"),
    (libc::SYS_process_vm_readv, "another process's memory"),
    (libc::SYS_process_vm_writev, "another process's memory"),
    (libc::SYS_kcmp, "comparing kernel objects across processes"),
    (libc::SYS_bpf, "kernel programs"),
    (
        libc::SYS_perf_event_open,
        "performance counters (a side channel and a kernel attack surface)",
    ),
    (libc::SYS_userfaultfd, "a tool of kernel exploits"),
    (libc::SYS_io_uring_setup, "a large kernel attack surface"),
    (libc::SYS_io_uring_enter, "a large kernel attack surface"),
    (libc::SYS_io_uring_register, "a large kernel attack surface"),
    (libc::SYS_keyctl, "the kernel keyring"),
    (libc::SYS_add_key, "the kernel keyring"),
    (libc::SYS_request_key, "the kernel keyring"),
    (libc::SYS_init_module, "kernel modules"),
    (libc::SYS_finit_module, "kernel modules"),
    (libc::SYS_delete_module, "kernel modules"),
    (libc::SYS_kexec_load, "replacing the kernel"),
    (libc::SYS_kexec_file_load, "replacing the kernel"),
    (libc::SYS_reboot, "the host's power"),
    (libc::SYS_swapon, "the host's swap"),
    (libc::SYS_swapoff, "the host's swap"),
    (libc::SYS_acct, "process accounting"),
    (libc::SYS_quotactl, "disk quotas"),
    (libc::SYS_syslog, "the kernel log"),
    (libc::SYS_vhangup, "terminals"),
    (libc::SYS_iopl, "I/O ports"),
    (libc::SYS_ioperm, "I/O ports"),
    (
        libc::SYS_open_by_handle_at,
        "opening files by handle bypasses paths",
    ),
    (libc::SYS_name_to_handle_at, "file handles"),
    (libc::SYS_lookup_dcookie, "kernel profiling"),
    (libc::SYS_settimeofday, "the host's clock"),
    (libc::SYS_clock_settime, "the host's clock"),
    (libc::SYS_clock_adjtime, "the host's clock"),
    (libc::SYS_adjtimex, "the host's clock"),
    (libc::SYS_uselib, "an obsolete loader"),
    (libc::SYS_fanotify_init, "watching the filesystem's events"),
];

/// The sandbox's filters: namespaces by `clone` flags, the denied calls,
/// and a guard that kills a call of another ABI (whose numbers a
/// default-allow filter would otherwise let past).
fn sandbox_programs(mode: SeccompMode) -> Result<Vec<BpfProgram>, String> {
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = SANDBOX_DENIED
        .iter()
        .map(|(nr, _)| (*nr, Vec::new()))
        .collect();
    let clone_rules = NS_FLAGS
        .iter()
        .map(|f| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                Len::Qword,
                Op::MaskedEq(*f),
                *f,
            )
            .map_err(|e| e.to_string())?])
            .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    denied.insert(libc::SYS_clone, clone_rules);
    // sockets of families other than Unix, IPv4, IPv6 and netlink (the
    // network namespace confines those; vsock, AF_ALG and the rest are
    // kernel surface it does not)
    let mut family_rules = vec![SeccompRule::new(vec![SeccompCondition::new(
        0,
        Len::Dword,
        Op::Gt,
        libc::AF_NETLINK as u64,
    )
    .map_err(|e| e.to_string())?])
    .map_err(|e| e.to_string())?];
    for f in (0..libc::AF_NETLINK as u64).filter(|f| {
        ![
            libc::AF_UNSPEC as u64,
            libc::AF_UNIX as u64,
            libc::AF_INET as u64,
            libc::AF_INET6 as u64,
        ]
        .contains(f)
    }) {
        family_rules.push(
            SeccompRule::new(vec![
                SeccompCondition::new(0, Len::Dword, Op::Eq, f).map_err(|e| e.to_string())?
            ])
            .map_err(|e| e.to_string())?,
        );
    }
    denied.insert(libc::SYS_socket, family_rules.clone());
    denied.insert(libc::SYS_socketpair, family_rules);
    // TIOCSTI: pushing input into a terminal
    denied.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            1,
            Len::Dword,
            Op::Eq,
            libc::TIOCSTI,
        )
        .map_err(|e| e.to_string())?])
        .map_err(|e| e.to_string())?],
    );
    let deny = match mode {
        SeccompMode::Enforce => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Log => SeccompAction::Log,
    };
    let filter: BpfProgram = SeccompFilter::new(denied, SeccompAction::Allow, deny, arch())
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    // clone3's flags sit in memory a filter cannot read: ENOSYS, on which
    // glibc and std fall back to clone (whose flags the filter checks)
    let clone3: BpfProgram = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch(),
    )
    .map_err(|e| e.to_string())?
    .try_into()
    .map_err(|e: seccompiler::BackendError| e.to_string())?;
    Ok(vec![other_abi_guard(), clone3, filter])
}

/// A filter that kills any call with the x32 bit set (on x86_64), and
/// allows the rest to the next filter.
fn other_abi_guard() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const KILL_PROCESS: u32 = 0x8000_0000;
    const ALLOW: u32 = 0x7fff_0000;
    #[cfg(target_arch = "x86_64")]
    const X32: u32 = 0x4000_0000;
    #[cfg(not(target_arch = "x86_64"))]
    const X32: u32 = 0;
    vec![
        // the syscall number is at offset 0 of seccomp_data
        sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: JSET_K,
            jt: 0,
            jf: 1,
            k: X32,
        },
        sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: KILL_PROCESS,
        },
        sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: ALLOW,
        },
    ]
}

/// Calls refused with an errno instead of a kill.
const POLITE: &[(i64, i32, &str)] = &[
    (
        libc::SYS_clone3,
        libc::ENOSYS,
        "glibc then falls back to clone",
    ),
    (
        libc::SYS_openat,
        libc::EACCES,
        "nothing is opened after load",
    ),
];

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
}

fn rules(list: &[Allow]) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut out: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in list {
        let conds: Vec<SeccompCondition> = a
            .args
            .iter()
            .map(|c| match *c {
                Arg::Masked(i, mask, v) => {
                    SeccompCondition::new(i, Len::Qword, Op::MaskedEq(mask), v)
                }
                Arg::Eq(i, v) => SeccompCondition::new(i, Len::Qword, Op::Eq, v),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("syscall {} ({}): {e}", a.nr, a.why))?;
        let entry = out.entry(a.nr).or_default();
        if !conds.is_empty() {
            entry.push(SeccompRule::new(conds).map_err(|e| e.to_string())?);
        }
    }
    Ok(out)
}

/// The programs of `profile`, in the order they are installed: the polite
/// refusals, then the allow-list (installing a filter sets
/// `no_new_privs` with `prctl`, which the allow-list would kill).
pub fn programs(profile: Profile, mode: SeccompMode) -> Result<Vec<BpfProgram>, String> {
    let list = match profile {
        Profile::ModelWorker => MODEL_WORKER,
        Profile::Waiter => WAITER,
        Profile::Sandbox => return sandbox_programs(mode),
    };
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let allow: BpfProgram =
        SeccompFilter::new(rules(list)?, mismatch, SeccompAction::Allow, arch())
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?;
    let mut out = Vec::new();
    if profile == Profile::ModelWorker {
        for &(nr, errno, _why) in POLITE {
            let one: BpfProgram = SeccompFilter::new(
                BTreeMap::from([(nr, Vec::new())]),
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
                arch(),
            )
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?;
            out.push(one);
        }
    }
    out.push(allow);
    Ok(out)
}

/// Installs `profile`'s filters on every thread of this process.
pub fn install(profile: Profile, mode: SeccompMode) -> Result<(), String> {
    for p in programs(profile, mode)? {
        seccompiler::apply_filter_all_threads(&p).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The syscalls `profile` allows, with why (for review and `--help`).
pub fn allowed(profile: Profile) -> Vec<(i64, &'static str)> {
    let list = match profile {
        Profile::ModelWorker => MODEL_WORKER,
        Profile::Waiter => WAITER,
        // everything but the denied calls
        Profile::Sandbox => &[],
    };
    list.iter().map(|a| (a.nr, a.why)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allowed_syscall_says_why() {
        for p in [Profile::ModelWorker, Profile::Waiter] {
            for (nr, why) in allowed(p) {
                assert!(!why.trim().is_empty(), "syscall {nr} has no reason");
            }
        }
    }

    #[test]
    fn every_call_denied_to_a_sandbox_says_why() {
        for (nr, why) in SANDBOX_DENIED {
            assert!(!why.trim().is_empty(), "syscall {nr} has no reason");
        }
    }

    #[test]
    fn the_filters_compile_for_this_architecture() {
        for p in [Profile::ModelWorker, Profile::Waiter, Profile::Sandbox] {
            for m in [SeccompMode::Enforce, SeccompMode::Log] {
                let progs = programs(p, m).unwrap();
                assert!(!progs.is_empty() && progs.iter().all(|b| !b.is_empty()));
            }
        }
    }

    #[test]
    fn no_dangerous_syscall_is_on_the_worker_list() {
        let allowed: Vec<i64> = allowed(Profile::ModelWorker).iter().map(|a| a.0).collect();
        for nr in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_io_uring_setup,
            libc::SYS_keyctl,
            libc::SYS_ioctl,
            libc::SYS_kill,
            libc::SYS_init_module,
            libc::SYS_open_by_handle_at,
            libc::SYS_chroot,
            libc::SYS_pivot_root,
        ] {
            assert!(!allowed.contains(&nr), "syscall {nr} is allowed");
        }
    }
}
