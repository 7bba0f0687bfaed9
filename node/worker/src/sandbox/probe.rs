//! Escape attempts, made from inside a real worker sandbox by the probe
//! binary (`weft-sandbox-probe`, the worker with one attempt in place of
//! its engine): each reports the errno it got, or it dies of the signal
//! the sandbox answers with. The escape suite (`tests/escape.rs`) asserts
//! every attempt is denied, at both tiers.

use std::ffi::CString;

use serde::{Deserialize, Serialize};

/// What one attempt got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// It worked (the sandbox failed).
    Done(String),
    /// Refused with this errno.
    Errno(i32),
    /// A count the attempt reached before it was stopped, and the errno
    /// that stopped it (a thread bomb).
    Stopped {
        /// How far it got.
        reached: u64,
        /// The errno.
        errno: i32,
    },
}

/// The result frame a probe sends: its attempt and what it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probed {
    /// The attempt's name.
    pub attempt: String,
    /// What it got.
    pub outcome: Outcome,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// `ret` of a syscall: [`Outcome::Done`] when it is not -1.
fn sys(ret: i64, what: &str) -> Outcome {
    if ret == -1 {
        Outcome::Errno(errno())
    } else {
        Outcome::Done(format!("{what} returned {ret}"))
    }
}

fn open(path: &str, flags: libc::c_int) -> Outcome {
    let p = c(path);
    // SAFETY: open on a NUL-terminated path; the descriptor is closed.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd >= 0 {
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
    }
    sys(fd as i64, &format!("open {path}"))
}

fn write_file(path: &str) -> Outcome {
    open(path, libc::O_WRONLY | libc::O_APPEND)
}

fn socket(domain: libc::c_int, kind: libc::c_int, proto: libc::c_int) -> Outcome {
    // SAFETY: socket with integer arguments.
    sys(
        unsafe { libc::socket(domain, kind, proto) } as i64,
        "socket",
    )
}

/// The attempts, by name; `target` is what an attempt aims at (a path or
/// an address the test gives).
pub const ATTEMPTS: &[&str] = &[
    "write-node-data",
    "write-model",
    "write-etc-passwd",
    "write-tmp",
    "create-file",
    "read-etc-shadow",
    "read-proc-1-environ",
    "read-cluster-keys",
    "read-other-worker",
    "list-host-processes",
    "open-dev-mem",
    "open-dev-kvm",
    "open-block-device",
    "socket-inet",
    "connect-node-api",
    "abstract-unix-socket",
    "netlink",
    "packet-socket",
    "vsock-socket",
    "alg-socket",
    "ptrace-node",
    "process-vm-readv-node",
    "kill-all",
    "mount",
    "unshare-user",
    "unshare-mount",
    "setns",
    "chroot",
    "pivot-root",
    "bpf",
    "perf-event-open",
    "userfaultfd",
    "io-uring-setup",
    "keyctl",
    "init-module",
    "open-by-handle-at",
    "x32-syscall",
    "int80",
    "tiocsti",
    "exec-setuid",
    "fork",
    "mmap-exec",
    "mprotect-exec",
    "thread-bomb",
    "memory-bomb",
    "cpu-spin",
];

/// Makes attempt `name` against `target`.
pub fn attempt(name: &str, target: &str) -> Outcome {
    // SAFETY (every block below): one syscall with integer, null or stack
    // arguments, as a hostile worker would make it; nothing here is
    // relied upon afterwards.
    unsafe {
        match name {
            "write-node-data" | "write-model" | "read-other-worker" => write_file(target),
            "write-etc-passwd" => write_file("/etc/passwd"),
            "write-tmp" => open("/tmp/weft-escape", libc::O_WRONLY | libc::O_CREAT),
            "create-file" => open("/escape", libc::O_WRONLY | libc::O_CREAT),
            "read-etc-shadow" => open("/etc/shadow", libc::O_RDONLY),
            "read-proc-1-environ" => open("/proc/1/environ", libc::O_RDONLY),
            "read-cluster-keys" => open(target, libc::O_RDONLY),
            "list-host-processes" => list_processes(),
            "open-dev-mem" => open("/dev/mem", libc::O_RDONLY),
            "open-dev-kvm" => open("/dev/kvm", libc::O_RDWR),
            "open-block-device" => open(target, libc::O_RDONLY),
            "socket-inet" => socket(libc::AF_INET, libc::SOCK_STREAM, 0),
            "connect-node-api" => connect_tcp(target),
            "abstract-unix-socket" => connect_abstract(target),
            "netlink" => socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE),
            "packet-socket" => socket(libc::AF_PACKET, libc::SOCK_RAW, 0),
            // the host's hypervisor and other guests (not confined by a
            // network namespace), and the kernel's crypto sockets
            "vsock-socket" => socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0),
            "alg-socket" => socket(libc::AF_ALG, libc::SOCK_SEQPACKET, 0),
            "ptrace-node" => sys(
                libc::ptrace(
                    libc::PTRACE_ATTACH,
                    target.parse::<i32>().unwrap_or(1),
                    0,
                    0,
                ),
                "ptrace",
            ),
            "process-vm-readv-node" => {
                let mut buf = [0u8; 8];
                let local = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: 8,
                };
                let remote = libc::iovec {
                    iov_base: 0x400000 as *mut libc::c_void,
                    iov_len: 8,
                };
                sys(
                    libc::process_vm_readv(target.parse().unwrap_or(1), &local, 1, &remote, 1, 0)
                        as i64,
                    "process_vm_readv",
                )
            }
            "kill-all" => sys(libc::kill(-1, libc::SIGKILL) as i64, "kill(-1)"),
            "mount" => {
                let t = c("tmpfs");
                let d = c("/");
                sys(
                    libc::mount(t.as_ptr(), d.as_ptr(), t.as_ptr(), 0, std::ptr::null()) as i64,
                    "mount",
                )
            }
            "unshare-user" => sys(libc::unshare(libc::CLONE_NEWUSER) as i64, "unshare(user)"),
            "unshare-mount" => sys(libc::unshare(libc::CLONE_NEWNS) as i64, "unshare(mount)"),
            "setns" => sys(libc::setns(0, libc::CLONE_NEWNET) as i64, "setns"),
            "chroot" => {
                let d = c("/");
                sys(libc::chroot(d.as_ptr()) as i64, "chroot")
            }
            "pivot-root" => {
                let d = c(".");
                sys(
                    libc::syscall(libc::SYS_pivot_root, d.as_ptr(), d.as_ptr()),
                    "pivot_root",
                )
            }
            "bpf" => sys(
                libc::syscall(libc::SYS_bpf, 5, std::ptr::null::<u8>(), 0),
                "bpf",
            ),
            "perf-event-open" => sys(
                libc::syscall(
                    libc::SYS_perf_event_open,
                    std::ptr::null::<u8>(),
                    0,
                    -1,
                    -1,
                    0,
                ),
                "perf_event_open",
            ),
            "userfaultfd" => sys(libc::syscall(libc::SYS_userfaultfd, 0), "userfaultfd"),
            "io-uring-setup" => {
                let mut params = [0u8; 120];
                sys(
                    libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()),
                    "io_uring_setup",
                )
            }
            "keyctl" => sys(libc::syscall(libc::SYS_keyctl, 0, -3, 0), "keyctl"),
            "init-module" => sys(
                libc::syscall(
                    libc::SYS_init_module,
                    std::ptr::null::<u8>(),
                    0,
                    c("").as_ptr(),
                ),
                "init_module",
            ),
            "open-by-handle-at" => {
                let mut handle = [0u8; 136];
                sys(
                    libc::syscall(
                        libc::SYS_open_by_handle_at,
                        libc::AT_FDCWD,
                        handle.as_mut_ptr(),
                        0,
                    ),
                    "open_by_handle_at",
                )
            }
            "x32-syscall" => sys(libc::syscall(libc::SYS_getpid | 0x4000_0000), "x32 getpid"),
            "int80" => int80(),
            "tiocsti" => {
                let ch = b'x';
                sys(libc::ioctl(0, libc::TIOCSTI, &ch) as i64, "ioctl(TIOCSTI)")
            }
            "exec-setuid" => {
                let p = c(target);
                let argv = [p.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                sys(
                    libc::execve(p.as_ptr(), argv.as_ptr(), envp.as_ptr()) as i64,
                    "execve",
                )
            }
            "fork" => {
                let pid = libc::fork();
                if pid == 0 {
                    libc::_exit(0);
                }
                sys(pid as i64, "fork")
            }
            "mmap-exec" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                sys(
                    if p == libc::MAP_FAILED { -1 } else { 0 },
                    "mmap(PROT_EXEC)",
                )
            }
            "mprotect-exec" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                sys(
                    libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC) as i64,
                    "mprotect(PROT_EXEC)",
                )
            }
            "thread-bomb" => thread_bomb(),
            "memory-bomb" => memory_bomb(),
            "cpu-spin" => cpu_spin(target.parse().unwrap_or(1000)),
            other => Outcome::Done(format!("no such attempt {other:?}")),
        }
    }
}

fn list_processes() -> Outcome {
    match std::fs::read_dir("/proc") {
        Err(e) => Outcome::Errno(e.raw_os_error().unwrap_or(0)),
        Ok(d) => {
            let pids = d
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .count();
            Outcome::Done(format!("{pids} processes"))
        }
    }
}

fn connect_tcp(addr: &str) -> Outcome {
    let Ok(a) = addr.parse::<std::net::SocketAddrV4>() else {
        return Outcome::Done(format!("not an address: {addr}"));
    };
    // SAFETY: socket and connect with a sockaddr_in on the stack.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd == -1 {
            return Outcome::Errno(errno());
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        sys(r as i64, "connect")
    }
}

fn connect_abstract(name: &str) -> Outcome {
    // SAFETY: socket and connect with a sockaddr_un on the stack.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if fd == -1 {
            return Outcome::Errno(errno());
        }
        let mut sa: libc::sockaddr_un = std::mem::zeroed();
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        // abstract: a leading NUL
        for (i, b) in name.bytes().take(100).enumerate() {
            sa.sun_path[i + 1] = b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len().min(100);
        let r = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        );
        sys(r as i64, "connect(abstract)")
    }
}

#[cfg(target_arch = "x86_64")]
fn int80() -> Outcome {
    let ret: i64;
    // SAFETY: the i386 getpid (20) through the legacy gate; clobbers only
    // what the asm names.
    unsafe {
        std::arch::asm!("int 0x80", inlateout("rax") 20i64 => ret, out("rcx") _, out("r11") _);
    }
    if ret < 0 {
        Outcome::Errno(-ret as i32)
    } else {
        Outcome::Done(format!("int 0x80 getpid returned {ret}"))
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn int80() -> Outcome {
    Outcome::Errno(libc::ENOSYS)
}

fn thread_bomb() -> Outcome {
    let mut n = 0u64;
    loop {
        let spawned = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(std::thread::park);
        match spawned {
            Ok(_) => n += 1,
            Err(e) => {
                return Outcome::Stopped {
                    reached: n,
                    errno: e.raw_os_error().unwrap_or(0),
                }
            }
        }
        if n >= 100_000 {
            return Outcome::Done(format!("{n} threads"));
        }
    }
}

fn memory_bomb() -> Outcome {
    let mut held: Vec<Vec<u8>> = Vec::new();
    for _ in 0..(64 << 10) {
        // 1 MiB at a time, each page touched
        held.push(vec![1u8; 1 << 20]);
    }
    Outcome::Done(format!("{} MiB allocated", held.len()))
}

/// Spins two threads for `ms` of wall time; reports the CPU time used.
fn cpu_spin(ms: u64) -> Outcome {
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    let spin = move || {
        let mut x = 0u64;
        while std::time::Instant::now() < until {
            x = x.wrapping_add(1);
            std::hint::black_box(x);
        }
    };
    let a = std::thread::spawn(spin);
    let b = std::thread::spawn(spin);
    let _ = a.join();
    let _ = b.join();
    // SAFETY: clock_gettime into a zeroed struct on the stack.
    let cpu_ms = unsafe {
        let mut t: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t);
        (t.tv_sec * 1000 + t.tv_nsec / 1_000_000) as u64
    };
    Outcome::Done(format!("cpu_ms={cpu_ms} wall_ms={ms}"))
}
