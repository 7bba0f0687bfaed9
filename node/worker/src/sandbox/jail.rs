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
        // a kernel that refuses mounts in a user namespace of its own
        // (gVisor's older releases) leaves a relaxed worker in its own
        // mount namespace over the host's files, the layer reported
        // missing; a strict worker stops here, before its model
        match new_root(&plan.devices, &RootExtras::default()) {
            Ok(()) => c.hold(Layer::NewRoot),
            Err(e) if plan.relaxed && e.kind() == io::ErrorKind::PermissionDenied => {
                tracing::warn!("no root of its own: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    drop_capabilities()?;
    c.hold(Layer::NoCapabilities);
    match landlock(&plan.devices, &[], &[]) {
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

/// What an agent sandbox's root holds beyond the devices.
#[derive(Debug, Default)]
struct RootExtras<'a> {
    /// Host directories bound read-only at the same path (a template's
    /// root filesystem); a host symlink is made again as a symlink.
    binds: &'a [String],
    /// A `/proc` of the caller's PID namespace (the caller must be in it).
    proc: bool,
    /// Empty directories to make (mount points for later).
    dirs: &'a [&'a str],
}

/// Builds a read-only tmpfs root holding `devices` (and `extras`), and
/// enters it.
fn new_root(devices: &[String], extras: &RootExtras<'_>) -> io::Result<()> {
    let staging = STAGING
        .iter()
        .find(|d| std::path::Path::new(d).is_dir())
        .ok_or_else(|| io::Error::other("no directory to build the new root in"))?;
    // the template's paths, held open before the staging tmpfs may cover
    // them (it covers /tmp)
    let sources = extras
        .binds
        .iter()
        .map(|b| {
            Source::open(b).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("template path {b}: {e} (the sandbox's uid must be able to read it)"),
                )
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
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
    for d in extras.dirs {
        std::fs::create_dir_all(format!("{new}{d}"))?;
    }
    for src in &sources {
        src.bind_under(&new)
            .map_err(|e| io::Error::new(e.kind(), format!("template path {}: {e}", src.path)))?;
    }
    if extras.proc {
        mount_proc(&format!("{new}/proc"))?;
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

/// A template path, opened before the new root is built.
struct Source {
    path: String,
    /// Where a symlink points (it is made again as one).
    link: Option<std::path::PathBuf>,
    is_dir: bool,
    fd: Option<std::os::fd::OwnedFd>,
}

impl Source {
    fn open(path: &str) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Ok(Self {
                path: path.to_string(),
                link: Some(std::fs::read_link(path)?),
                is_dir: false,
                fd: None,
            });
        }
        let c = cstr(path)?;
        // SAFETY: open of a NUL-terminated path; the descriptor is owned
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd;
        Ok(Self {
            path: path.to_string(),
            link: None,
            is_dir: meta.is_dir(),
            // SAFETY: a descriptor we just opened
            fd: Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }),
        })
    }

    /// Binds it read-only at its own path under `new` (a symlink is made
    /// again as one: Debian's `/bin` is `usr/bin`).
    fn bind_under(&self, new: &str) -> io::Result<()> {
        let target = format!("{new}{}", self.path);
        if let Some(parent) = std::path::Path::new(&target).parent() {
            std::fs::create_dir_all(parent)?;
        }
        if let Some(link) = &self.link {
            return std::os::unix::fs::symlink(link, &target);
        }
        if self.is_dir {
            std::fs::create_dir_all(&target)?;
        } else {
            std::fs::File::create(&target)?;
        }
        use std::os::fd::AsRawFd;
        let fd = self.fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        let (src, dst) = (cstr(&format!("/proc/self/fd/{fd}"))?, cstr(&target)?);
        // SAFETY: a recursive bind mount of an opened host path onto one
        // we made.
        unsafe {
            check(
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ),
                "binding a template path into the new root",
            )?;
        }
        remount_read_only_exec(&target)
    }
}

/// Mounts a proc of the caller's PID namespace at `at`, then its `sys`
/// read-only.
fn mount_proc(at: &str) -> io::Result<()> {
    std::fs::create_dir_all(at)?;
    let (proc_, dst) = (cstr("proc")?, cstr(at)?);
    // SAFETY: a proc mount on a directory we made, in our mount namespace.
    unsafe {
        check(
            libc::mount(
                proc_.as_ptr(),
                dst.as_ptr(),
                proc_.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
            "mounting the sandbox's /proc",
        )?;
    }
    let sys = format!("{at}/sys");
    let s = cstr(&sys)?;
    // SAFETY: a bind of /proc/sys onto itself, then made read-only.
    unsafe {
        check(
            libc::mount(
                s.as_ptr(),
                s.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            "binding /proc/sys",
        )?;
    }
    remount_read_only(&sys)
}

/// As [`remount_read_only`], but programs under it may still run.
fn remount_read_only_exec(path: &str) -> io::Result<()> {
    remount_bind(
        path,
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_REC,
        "remounting a template path read-only",
    )?;
    read_only_beneath(&cstr(path)?)
}

/// Makes every mount beneath `p` read-only and nosuid too (a remount
/// changes only the top one; a host mount nested under a template path
/// would stay writable): `mount_setattr` with `AT_RECURSIVE`, where the
/// kernel has it (5.12).
fn read_only_beneath(p: &std::ffi::CStr) -> io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const AT_RECURSIVE: libc::c_int = 0x8000;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr on our path with a struct on the stack and
    // its size
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            p.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOSYS) {
            return Err(io::Error::new(
                e.kind(),
                format!("making the mounts beneath a template path read-only: {e}"),
            ));
        }
    }
    Ok(())
}

/// Remounts the bind mount at `path` read-only, keeping the flags it has
/// (a user namespace may not clear a flag the host locked).
fn remount_read_only(path: &str) -> io::Result<()> {
    remount_bind(
        path,
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        "remounting read-only",
    )
}

/// Remounts the bind mount at `path` with `flags` on top of the ones it
/// has that a user namespace may not clear.
fn remount_bind(path: &str, flags: libc::c_ulong, what: &'static str) -> io::Result<()> {
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
                libc::MS_BIND | libc::MS_REMOUNT | flags | keep as libc::c_ulong,
                std::ptr::null(),
            ),
            what,
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
                // past the last capability; one that cannot read even the
                // first cannot say its bounding set is empty
                -1 if cap == 0 => return Err(io::Error::last_os_error()),
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
        // (EINVAL: gVisor's older releases, which do not lock securebits;
        // with the bounding set empty, an exec cannot gain a capability
        // back even as root of the namespace)
        if libc::prctl(libc::PR_SET_SECUREBITS, SECBITS, 0, 0, 0) == -1
            && libc::geteuid() == 0
            && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
        {
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
fn landlock(
    devices: &[String],
    read_exec: &[String],
    writable: &[&str],
) -> Result<(u8, bool), landlock::RulesetError> {
    let abi = ABI::V6;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?;
    for p in read_exec {
        let Ok(fd) = landlock::PathFd::new(p) else {
            continue;
        };
        // the root itself may be listed, nothing more
        let rights = if p == "/" {
            AccessFs::ReadDir.into()
        } else {
            AccessFs::from_read(abi)
        };
        ruleset = ruleset.add_rule(landlock::PathBeneath::new(fd, rights))?;
    }
    for p in writable {
        let Ok(fd) = landlock::PathFd::new(p) else {
            continue;
        };
        ruleset = ruleset.add_rule(landlock::PathBeneath::new(fd, AccessFs::from_all(abi)))?;
    }
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

/// Where an agent sandbox's scratch space is (a tmpfs, its size the disk
/// limit); its `/tmp` is a directory of it.
pub const SCRATCH: &str = "/work";
/// The sandbox's `/tmp`.
pub const SANDBOX_TMP: &str = "/tmp";

/// An agent sandbox's first half, at start (a warm pool's sandboxes stop
/// here): PID 1 of a PID namespace of its own, in a read-only root with
/// the template's paths (`plan.binds`), the devices, its own `/proc`, and
/// empty mount points for its scratch space. It keeps its capabilities
/// over its own namespaces until [`seal_sandbox`]; nothing untrusted runs
/// before that. Call before any thread starts.
pub fn prepare_sandbox(plan: &Plan) -> io::Result<()> {
    if plan.tier == Tier::Process {
        enter_pid_namespace(plan)?;
    }
    if plan.new_root {
        new_root(
            &plan.devices,
            &RootExtras {
                binds: &plan.binds,
                proc: plan.proc,
                dirs: &[SCRATCH, SANDBOX_TMP],
            },
        )?;
    }
    Ok(())
}

/// An agent sandbox's second half, when it is claimed: its scratch tmpfs
/// of `disk_bytes` at [`SCRATCH`] (and `/tmp` in it), then every
/// capability dropped, Landlock (the template read-only, the scratch space
/// read-write, no network, no signals or abstract sockets out) and the
/// sandbox's seccomp filter. What it holds comes back.
pub fn seal_sandbox(plan: &Plan, disk_bytes: u64) -> io::Result<Confinement> {
    let mut c = Confinement {
        tier: plan.tier,
        ..Confinement::default()
    };
    if plan.tier == Tier::Gvisor {
        c.hold(Layer::Gvisor);
    }
    mount_scratch(disk_bytes)?;
    if plan.new_root {
        c.hold(Layer::NewRoot);
    }
    drop_capabilities()?;
    c.hold(Layer::NoCapabilities);
    let mut read_exec = plan.binds.clone();
    read_exec.push("/proc".into());
    read_exec.push("/".into());
    match landlock(&plan.devices, &read_exec, &[SCRATCH, SANDBOX_TMP]) {
        Ok((abi, true)) => {
            c.landlock_abi = abi;
            c.hold(Layer::Landlock);
        }
        Ok((abi, false)) => c.landlock_abi = abi,
        Err(e) => tracing::warn!("Landlock: {e}"),
    }
    seccomp::install(Profile::Sandbox, plan.seccomp).map_err(io::Error::other)?;
    c.hold(Layer::Seccomp);
    // SAFETY: prctl with integer arguments: no core dumps, and no
    // /proc/<pid>/mem of this process for its children
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
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

/// The scratch tmpfs of `disk_bytes` at [`SCRATCH`], and `/tmp` as a
/// directory of it (so both count against the one limit).
fn mount_scratch(disk_bytes: u64) -> io::Result<()> {
    let (tmpfs, at) = (cstr("tmpfs")?, cstr(SCRATCH)?);
    let opts = cstr(&format!("size={},mode=0777", disk_bytes.max(4096)))?;
    // SAFETY: a tmpfs mount on the scratch mount point we made.
    unsafe {
        check(
            libc::mount(
                tmpfs.as_ptr(),
                at.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            ),
            "mounting the scratch space",
        )?;
    }
    let tmp = format!("{SCRATCH}/.tmp");
    std::fs::create_dir(&tmp)?;
    let (src, dst) = (cstr(&tmp)?, cstr(SANDBOX_TMP)?);
    // SAFETY: a bind of a directory of the scratch space onto /tmp.
    unsafe {
        check(
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ),
            "binding /tmp into the scratch space",
        )?;
    }
    Ok(())
}
