//! The worker's half: what a sandboxed worker does to itself right after
//! `exec`, before it reads a byte of its model or a prompt. It is root of
//! its own user namespace (mapped to its dedicated kernel uid), with
//! capabilities over nothing but its own namespaces; it uses them once, to
//! build its root, and then gives them up:
//!
//! 1. every mount made private; a tmpfs holding only `/dev/null`,
//!    `/dev/zero` and `/dev/urandom` (bound from the host), remounted
//!    read-only and entered with `pivot_root`; the host's root detached;
//! 2. the capability bounding set emptied, ambient capabilities cleared,
//!    the secure bits locked, every capability dropped;
//! 3. Landlock: no file access but those devices, no TCP bind or connect,
//!    no abstract Unix socket or signal out of the sandbox;
//! 4. a fork, so the engine is PID 1 of the PID namespace; the first
//!    process only waits for it (under a wait-only seccomp filter) and
//!    passes on its exit status.
//!
//! The seccomp filter of the engine comes once its model is loaded
//! ([`super::seccomp`]).

use std::ffi::CString;
use std::io;

use landlock::{
    Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
    ABI,
};

use super::seccomp::{self, Profile};
use super::{check, observe_self, Confinement, Layer, Plan, Tier};

/// Where the new root is assembled before `pivot_root`, first that exists.
const STAGING: &[&str] = &["/tmp", "/run", "/proc"];

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// Confines the calling process as `plan` says; returns in the engine
/// (PID 1 of its namespace) with what it holds. Call before any thread
/// starts.
pub fn enter(plan: &Plan) -> io::Result<Confinement> {
    let mut c = Confinement {
        tier: plan.tier,
        ..Confinement::default()
    };
    if plan.tier == Tier::Gvisor {
        c.hold(Layer::Gvisor);
    }
    if plan.new_root {
        new_root(&plan.devices)?;
        c.hold(Layer::NewRoot);
    }
    drop_capabilities()?;
    c.hold(Layer::NoCapabilities);
    match landlock(&plan.devices) {
        Ok((abi, true)) => {
            c.landlock_abi = abi;
            c.hold(Layer::Landlock);
        }
        Ok((abi, false)) => c.landlock_abi = abi,
        Err(e) => tracing::warn!("Landlock: {e}"),
    }
    if plan.tier == Tier::Process {
        enter_pid_namespace(plan)?;
    }
    let seen = observe_self();
    c.pid = seen.pid;
    c.uid = seen.uid;
    c.gid = seen.gid;
    c.no_new_privs = seen.no_new_privs;
    if seen.no_new_privs {
        c.hold(Layer::NoNewPrivs);
    }
    if plan.tier == Tier::Process && seen.pid == 1 {
        c.hold(Layer::PidNamespace);
        c.hold(Layer::UserNamespace);
        c.hold(Layer::NetworkNamespace);
    }
    Ok(c)
}

/// Builds a read-only tmpfs root holding `devices`, and enters it.
fn new_root(devices: &[String]) -> io::Result<()> {
    let staging = STAGING
        .iter()
        .find(|d| std::path::Path::new(d).is_dir())
        .ok_or_else(|| io::Error::other("no directory to build the new root in"))?;
    let none = std::ptr::null::<libc::c_char>();
    let root = cstr("/")?;
    let base = cstr(staging)?;
    let tmpfs = cstr("tmpfs")?;
    let opts = cstr("size=1m,mode=0755")?;
    // SAFETY: mount/mkdir/pivot_root/chdir/umount2 on NUL-terminated paths
    // we own, in this process's own mount namespace.
    unsafe {
        check(
            libc::mount(
                none,
                root.as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "making mounts private",
        )?;
        check(
            libc::mount(
                tmpfs.as_ptr(),
                base.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            ),
            "mounting the new root's tmpfs",
        )?;
    }
    let new = format!("{staging}/root");
    for d in [new.clone(), format!("{new}/dev"), format!("{new}/.old")] {
        std::fs::create_dir(&d)?;
    }
    for dev in devices {
        let target = format!("{new}{dev}");
        std::fs::File::create(&target)?;
        let (src, dst) = (cstr(dev)?, cstr(&target)?);
        // SAFETY: a bind mount of a host device node onto a file we made.
        unsafe {
            check(
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ),
                "binding a device into the new root",
            )?;
        }
        if dev != "/dev/null" {
            remount_read_only(&target)?;
        }
    }
    let newc = cstr(&new)?;
    let dot = cstr(".")?;
    let old = cstr(".old")?;
    let slash_old = cstr("/.old")?;
    // SAFETY: as above.
    unsafe {
        // pivot_root wants the new root to be a mount point of its own
        check(
            libc::mount(
                newc.as_ptr(),
                newc.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            "binding the new root onto itself",
        )?;
        check(libc::chdir(newc.as_ptr()), "chdir to the new root")?;
        check(
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old.as_ptr()) as libc::c_int,
            "pivot_root",
        )?;
        check(libc::chdir(root.as_ptr()), "chdir /")?;
        check(
            libc::umount2(slash_old.as_ptr(), libc::MNT_DETACH),
            "detaching the host's root",
        )?;
        check(libc::rmdir(slash_old.as_ptr()), "removing /.old")?;
    }
    remount_read_only("/")
}

/// Remounts the bind mount at `path` read-only, keeping the flags it has
/// (a user namespace may not clear a flag the host locked).
fn remount_read_only(path: &str) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: statvfs into a zeroed struct on the stack; mount on our path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        check(libc::statvfs(p.as_ptr(), &mut st), "statvfs")?;
        // the ST_* flags statvfs reports are the MS_* flags mount takes
        let keep = st.f_flag
            & (libc::ST_NOSUID
                | libc::ST_NODEV
                | libc::ST_NOEXEC
                | libc::ST_NOATIME
                | libc::ST_NODIRATIME
                | libc::ST_RELATIME);
        check(
            libc::mount(
                std::ptr::null(),
                p.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NOEXEC
                    | keep as libc::c_ulong,
                std::ptr::null(),
            ),
            "remounting read-only",
        )
    }
}

/// Empties the bounding set, clears ambient capabilities, locks the secure
/// bits and drops every capability.
fn drop_capabilities() -> io::Result<()> {
    const SECBITS: libc::c_ulong = 0x3f; // NOROOT, NO_SETUID_FIXUP, KEEP_CAPS: each with its lock
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    // SAFETY: prctl with integer arguments; capset with a header and two
    // data structs on the stack, as the v3 ABI wants.
    unsafe {
        // (a process that is not root of its namespace, as under gVisor,
        // starts with an empty bounding set and cannot lock bits it could
        // not use)
        let mut cap = 0;
        loop {
            match libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) {
                -1 => break,
                1 => check(
                    libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0),
                    "dropping a capability from the bounding set",
                )?,
                _ => {}
            }
            cap += 1;
        }
        // (EINVAL: a kernel, or gVisor, without ambient capabilities)
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) == -1
            && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
        {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_SECUREBITS, SECBITS, 0, 0, 0) == -1 && libc::geteuid() == 0 {
            return Err(io::Error::last_os_error());
        }
        let header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let data = [Data::default(); 2];
        check(
            libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int,
            "capset",
        )?;
    }
    Ok(())
}

/// Restricts this process with Landlock; returns the kernel's ABI and
/// whether every right was enforced.
fn landlock(devices: &[String]) -> Result<(u8, bool), landlock::RulesetError> {
    let abi = ABI::V6;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?;
    for dev in devices {
        let Ok(fd) = landlock::PathFd::new(dev) else {
            continue;
        };
        let rights = if dev == "/dev/null" {
            AccessFs::ReadFile | AccessFs::WriteFile
        } else {
            AccessFs::ReadFile.into()
        };
        ruleset = ruleset.add_rule(landlock::PathBeneath::new(fd, rights))?;
    }
    let status = ruleset.restrict_self()?;
    Ok((
        super::host::landlock_abi(),
        status.ruleset == RulesetStatus::FullyEnforced,
    ))
}

/// Forks so that the engine runs as PID 1 of the new PID namespace.
/// Returns in the engine; the first process confines itself to waiting and
/// exits with the engine's status.
fn enter_pid_namespace(plan: &Plan) -> io::Result<()> {
    // SAFETY: fork in a single-threaded process; the parent only waits and
    // exits.
    unsafe {
        let pid = libc::fork();
        if pid == -1 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // the engine: die if the waiting parent does
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            return Ok(());
        }
        if let Err(e) = seccomp::install(Profile::Waiter, plan.seccomp) {
            tracing::error!("the waiter's seccomp filter: {e}");
            libc::kill(pid, libc::SIGKILL);
            libc::_exit(1);
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
