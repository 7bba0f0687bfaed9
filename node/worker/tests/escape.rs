//! The escape suite: a probe (the worker binary, confined exactly as the
//! node confines a worker, with one attempt in place of serving) tries each
//! way out, from inside a real worker sandbox started by the real launcher,
//! and reports the errno it got or dies of the signal the sandbox answers
//! with. Every attempt must be denied; the test process plays the node and
//! keeps serving its own "API" socket throughout. Every attempt runs at
//! tier `process` and tier `gvisor` (`.ci/run` installs `runsc`).
//!
//! The node side needs root (it maps workers to uids of their own), as CI
//! runs; a test that cannot map says so and fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use weft_kernels::testing::{write_tiny_model, TinyModelSpec};
use weft_worker::protocol::read_any_async;
use weft_worker::protocol::Frame;
use weft_worker::sandbox::cgroup::Limits;
use weft_worker::sandbox::launch::Rlimits;
use weft_worker::sandbox::probe::{Outcome, Probed};
use weft_worker::sandbox::{Policy, SeccompMode, Tier};
use weft_worker::{SandboxSpec, WorkerSpec};

/// The probe binary.
const PROBE: &str = env!("CARGO_BIN_EXE_weft-sandbox-probe");
/// How long one attempt may take, start to report.
const ATTEMPT_DEADLINE: Duration = Duration::from_secs(60);
/// The pids limit of a probe's cgroup.
const PIDS: u64 = 64;
/// The memory limit of a probe's cgroup.
const MEMORY: u64 = 256 << 20;

/// Files a hostile worker goes for, made by the test as the node's would be.
struct Host {
    _dir: tempfile::TempDir,
    model: PathBuf,
    data_dir: PathBuf,
    keys: PathBuf,
    /// The "node's API": a listener the test keeps accepting on.
    api: TcpListener,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        write_tiny_model(&model, &TinyModelSpec::default()).unwrap();
        // readable by everyone, as a model cache's files are
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).unwrap();
        let keys = data_dir.join("node.key");
        std::fs::write(&keys, "-----BEGIN PRIVATE KEY-----\nsecret\n").unwrap();
        std::fs::write(data_dir.join("raft.log"), "entries").unwrap();
        let api = TcpListener::bind("127.0.0.1:0").unwrap();
        Host {
            _dir: dir,
            model,
            data_dir,
            keys,
            api,
        }
    })
}

fn spec(tier: Tier, exe: &str) -> WorkerSpec {
    let state = std::env::temp_dir().join(format!("weft-escape-{}", std::process::id()));
    WorkerSpec {
        exe: PathBuf::from(exe),
        model: host().model.clone(),
        threads: 1,
        device: "cpu".into(),
        device_memory_budget: 0,
        kv_budget: 16 << 20,
        max_context: 256,
        max_running: 4,
        sandbox: SandboxSpec {
            policy: Policy { tier, strict: true },
            uids: 200_000..265_536,
            limits: Limits {
                memory_bytes: Some(MEMORY),
                pids: Some(PIDS),
                cpus: Some(1.0),
            },
            rlimits: Rlimits::default(),
            seccomp: SeccompMode::Enforce,
            runsc: PathBuf::from("runsc"),
            state_dir: state,
        },
        probe: None,
        layers: None,
        chain: None,
        kv_shares: Vec::new(),
        prefix_cache: true,
    }
}

/// What became of one attempt: its report, or the signal it died of.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Reported(Outcome),
    Killed(i32),
    Exited(i32),
}

/// Runs `attempt` against `target` in a probe at `tier`.
fn probe(tier: Tier, attempt: &str, target: &str, before_seccomp: bool) -> Seen {
    probe_with(tier, attempt, target, before_seccomp, None).0
}

/// Like [`probe`], with the most CPU periods the host throttled the
/// probe's cgroup in, sampled while it ran (runsc removes its cgroup when
/// the sandbox exits).
fn probe_throttled(tier: Tier, attempt: &str, target: &str, cpus: f64) -> (Seen, u64) {
    probe_with(tier, attempt, target, false, Some(cpus))
}

fn probe_with(
    tier: Tier,
    attempt: &str,
    target: &str,
    before_seccomp: bool,
    cpus: Option<f64>,
) -> (Seen, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = spec(tier, PROBE);
        if cpus.is_some() {
            s.sandbox.limits.cpus = cpus;
        }
        let mut extra = vec![
            "--attempt".to_string(),
            attempt.to_string(),
            "--target".to_string(),
            target.to_string(),
        ];
        if before_seccomp {
            extra.push("--before-seccomp".into());
        }
        let mut spawned = weft_worker::spawn::spawn(&s, &extra)
            .unwrap_or_else(|e| panic!("starting the probe at tier {tier}: {e:#}"));
        let stat = spawned.cpu_throttled();
        let mut throttled = 0;
        let read = read_any_async::<Probed>(&mut spawned.reader);
        let sample = async {
            let mut every = tokio::time::interval(Duration::from_millis(20));
            loop {
                every.tick().await;
                if let Some(s) = &stat {
                    throttled = throttled.max(s.read());
                }
            }
        };
        let report = tokio::select! {
            r = tokio::time::timeout(ATTEMPT_DEADLINE, read) => r,
            never = sample => never,
        }
        .unwrap_or_else(|_| panic!("{attempt} hung at tier {tier}"));
        let status = tokio::time::timeout(ATTEMPT_DEADLINE, spawned.child.wait())
            .await
            .expect("the probe did not exit")
            .unwrap();
        let seen = match report {
            Ok(Frame::Msg(p)) => Seen::Reported(p.outcome),
            _ => {
                use std::os::unix::process::ExitStatusExt;
                match (status.signal(), status.code()) {
                    (Some(sig), _) => Seen::Killed(sig),
                    // the waiter passes the engine's death on as 128 + signal
                    (None, Some(c)) if c > 128 => Seen::Killed(c - 128),
                    (None, Some(c)) => Seen::Exited(c),
                    (None, None) => Seen::Exited(-1),
                }
            }
        };
        (seen, throttled)
    })
}

fn runsc_present() -> bool {
    std::process::Command::new("runsc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Tiers to run an attempt at. gVisor is installed by `.ci/run`; a machine
/// without it fails the suite rather than passing half of it.
fn tiers() -> Vec<Tier> {
    assert!(
        runsc_present(),
        "runsc is not installed: apt-get install runsc (.ci/run does)"
    );
    vec![Tier::Process, Tier::Gvisor]
}

/// Whether `seen` is a denial: an errno, or death by SIGSYS (seccomp).
fn denied(seen: &Seen) -> bool {
    matches!(
        seen,
        Seen::Reported(Outcome::Errno(_)) | Seen::Killed(libc::SIGSYS)
    )
}

/// Asserts `attempt` is denied at every tier, and that the node (the
/// test's API socket) is still there after it.
fn assert_denied(attempt: &str, target: &str) {
    for tier in tiers() {
        let seen = probe(tier, attempt, target, false);
        assert!(denied(&seen), "{attempt} at tier {tier}: {seen:?}");
    }
    assert_node_serves();
}

/// The node's API still accepts a connection.
fn assert_node_serves() {
    let addr = host().api.local_addr().unwrap();
    let c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    assert!(c.is_ok(), "the node's API no longer accepts");
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn a_probe_reports_under_the_full_sandbox() {
    // the probe itself works: an attempt that cannot fail comes back
    for tier in tiers() {
        let seen = probe(tier, "no-such-attempt", "", false);
        assert!(
            matches!(&seen, Seen::Reported(Outcome::Done(_))),
            "at tier {tier}: {seen:?}"
        );
    }
}

#[test]
fn writing_the_nodes_data_directory_is_denied() {
    assert_denied("write-node-data", &s(&host().data_dir.join("raft.log")));
}

#[test]
fn writing_the_model_file_is_denied() {
    assert_denied("write-model", &s(&host().model));
}

#[test]
fn writing_etc_passwd_is_denied() {
    assert_denied("write-etc-passwd", "");
}

#[test]
fn writing_tmp_is_denied() {
    assert_denied("write-tmp", "");
}

#[test]
fn creating_a_file_is_denied() {
    assert_denied("create-file", "");
}

#[test]
fn reading_etc_shadow_is_denied() {
    assert_denied("read-etc-shadow", "");
}

#[test]
fn reading_proc_1_environ_is_denied() {
    assert_denied("read-proc-1-environ", "");
}

#[test]
fn reading_the_cluster_keys_is_denied() {
    assert_denied("read-cluster-keys", &s(&host().keys));
}

#[test]
fn reading_another_workers_files_is_denied() {
    // another worker's process, as the host names it
    assert_denied(
        "read-other-worker",
        &format!("/proc/{}/environ", std::process::id()),
    );
}

#[test]
fn listing_host_processes_is_denied() {
    assert_denied("list-host-processes", "");
}

#[test]
fn opening_dev_mem_is_denied() {
    assert_denied("open-dev-mem", "");
}

#[test]
fn opening_dev_kvm_is_denied() {
    assert_denied("open-dev-kvm", "");
}

#[test]
fn opening_a_block_device_is_denied() {
    let dev = ["/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/loop0"]
        .into_iter()
        .find(|d| Path::new(d).exists())
        .unwrap_or("/dev/vda");
    assert_denied("open-block-device", dev);
}

#[test]
fn an_inet_socket_is_denied() {
    assert_denied("socket-inet", "");
}

#[test]
fn connecting_to_the_nodes_api_is_denied() {
    assert_denied(
        "connect-node-api",
        &host().api.local_addr().unwrap().to_string(),
    );
}

#[test]
fn an_abstract_unix_socket_is_denied() {
    // one the node listens on
    let name = format!("weft-escape-{}", std::process::id());
    let _l = std::os::unix::net::UnixListener::bind_addr(
        &<std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_denied("abstract-unix-socket", &name);
}

#[test]
fn a_netlink_socket_is_denied() {
    assert_denied("netlink", "");
}

#[test]
fn a_packet_socket_is_denied() {
    assert_denied("packet-socket", "");
}

#[test]
fn ptrace_of_the_node_is_denied() {
    assert_denied("ptrace-node", &std::process::id().to_string());
}

#[test]
fn process_vm_readv_of_the_node_is_denied() {
    assert_denied("process-vm-readv-node", &std::process::id().to_string());
}

#[test]
fn kill_of_every_process_is_denied() {
    assert_denied("kill-all", "");
}

#[test]
fn mount_is_denied() {
    assert_denied("mount", "");
}

#[test]
fn unshare_of_a_user_namespace_is_denied() {
    assert_denied("unshare-user", "");
}

#[test]
fn unshare_of_a_mount_namespace_is_denied() {
    assert_denied("unshare-mount", "");
}

#[test]
fn setns_is_denied() {
    assert_denied("setns", "");
}

#[test]
fn chroot_is_denied() {
    assert_denied("chroot", "");
}

#[test]
fn pivot_root_is_denied() {
    assert_denied("pivot-root", "");
}

#[test]
fn bpf_is_denied() {
    assert_denied("bpf", "");
}

#[test]
fn perf_event_open_is_denied() {
    assert_denied("perf-event-open", "");
}

#[test]
fn userfaultfd_is_denied() {
    assert_denied("userfaultfd", "");
}

#[test]
fn io_uring_setup_is_denied() {
    assert_denied("io-uring-setup", "");
}

#[test]
fn keyctl_is_denied() {
    assert_denied("keyctl", "");
}

#[test]
fn init_module_is_denied() {
    assert_denied("init-module", "");
}

#[test]
fn open_by_handle_at_is_denied() {
    assert_denied("open-by-handle-at", "");
}

#[test]
fn an_x32_syscall_number_is_denied() {
    assert_denied("x32-syscall", "");
}

#[test]
fn int_0x80_is_denied() {
    assert_denied("int80", "");
}

#[test]
fn tiocsti_is_denied() {
    assert_denied("tiocsti", "");
}

#[test]
fn executing_a_setuid_binary_is_denied() {
    let su = ["/usr/bin/su", "/bin/su", "/usr/bin/passwd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("/usr/bin/su");
    assert_denied("exec-setuid", su);
}

#[test]
fn fork_is_denied() {
    assert_denied("fork", "");
}

#[test]
fn an_executable_mapping_is_denied() {
    assert_denied("mmap-exec", "");
}

#[test]
fn making_memory_executable_is_denied() {
    assert_denied("mprotect-exec", "");
}

#[test]
fn a_thread_bomb_stops_at_the_pids_limit() {
    match probe(Tier::Process, "thread-bomb", "", false) {
        Seen::Reported(Outcome::Stopped { reached, errno }) => {
            assert!(reached < PIDS, "{reached} threads");
            assert_eq!(errno, libc::EAGAIN);
        }
        other => panic!("the bomb was not stopped: {other:?}"),
    }
    assert_node_serves();
}

#[test]
fn a_thread_bomb_under_gvisor_ends_its_sandbox_at_the_pids_limit() {
    // gVisor's own threads count against the sandbox's pids limit: the
    // bomb takes its sandbox down with it, and nothing else
    tiers();
    let seen = probe(Tier::Gvisor, "thread-bomb", "", false);
    assert!(
        matches!(seen, Seen::Reported(Outcome::Stopped { reached, .. }) if reached < PIDS)
            || matches!(seen, Seen::Killed(_) | Seen::Exited(1..)),
        "{seen:?}"
    );
    assert_node_serves();
}

#[test]
fn a_memory_bomb_is_killed_inside_the_sandbox() {
    for tier in tiers() {
        let seen = probe(tier, "memory-bomb", "", false);
        assert_eq!(seen, Seen::Killed(libc::SIGKILL), "at tier {tier}");
    }
    assert_node_serves();
}

#[test]
fn a_cpu_spin_at_tier_process_uses_at_most_its_quota() {
    // two threads spin for a second of wall time under a quota of one CPU
    let (seen, _) = probe_throttled(Tier::Process, "cpu-spin", "1000", 1.0);
    let Seen::Reported(Outcome::Done(said)) = &seen else {
        panic!("{seen:?}");
    };
    let cpu_ms: u64 = said
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cpu_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    // one CPU over about a second, with room for the period's edges
    assert!(cpu_ms < 1_400, "{cpu_ms} ms of CPU in 1 s");
}

#[test]
fn a_cpu_spin_is_throttled_by_the_host_at_every_tier() {
    // gVisor's clocks inside are its own; the host's throttle count is not.
    // A fifth of a CPU: two spinning threads pass it in every period even
    // when the other tests leave them little of this machine's two cores.
    for tier in tiers() {
        let (seen, throttled) = probe_throttled(tier, "cpu-spin", "1000", 0.2);
        assert!(
            matches!(seen, Seen::Reported(Outcome::Done(_))),
            "at tier {tier}: {seen:?}"
        );
        assert!(
            throttled > 0,
            "two spinning threads under a fifth of a CPU were never throttled at tier {tier}"
        );
    }
}

/// The layers beneath seccomp hold on their own: with the filter not yet
/// installed, the new root, the dedicated uid and Landlock still refuse
/// the file attempts.
#[test]
fn without_seccomp_the_root_the_uid_and_landlock_still_refuse_files() {
    let h = host();
    for (attempt, target) in [
        ("write-node-data", s(&h.data_dir.join("raft.log"))),
        ("write-model", s(&h.model)),
        ("write-etc-passwd", String::new()),
        ("write-tmp", String::new()),
        ("create-file", String::new()),
        ("read-etc-shadow", String::new()),
        ("read-cluster-keys", s(&h.keys)),
        ("open-dev-mem", String::new()),
    ] {
        let seen = probe(Tier::Process, attempt, &target, true);
        assert!(
            matches!(seen, Seen::Reported(Outcome::Errno(e)) if [libc::ENOENT, libc::EACCES, libc::EROFS, libc::EPERM].contains(&e)),
            "{attempt} without seccomp: {seen:?}"
        );
    }
}

#[test]
fn without_seccomp_no_host_process_is_visible() {
    let seen = probe(Tier::Process, "list-host-processes", "", true);
    assert!(
        matches!(seen, Seen::Reported(Outcome::Errno(libc::ENOENT))),
        "{seen:?}"
    );
}

#[test]
fn without_seccomp_the_network_is_unreachable() {
    let addr = host().api.local_addr().unwrap().to_string();
    let seen = probe(Tier::Process, "connect-node-api", &addr, true);
    assert!(denied(&seen), "{seen:?}");
}
