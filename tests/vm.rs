//! VM end-to-end tests: boot the real builder VM under QEMU for both arches and both
//! transports, and drive the real agent. Needs `scripts/setup` (QEMU, guest images).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vmic::cli::{Arch, TransportChoice};
use vmic::session::{RequestHandle, Session};
use vmic::transport::TransportKind;
use vmic::vm::{RunningVm, VmOptions};
use vmic_protocol::{Event, ExecRequest, Request, Stream};

/// Two cores and TCG: one VM at a time keeps timings sane.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn start(arch: Arch, transport: TransportChoice) -> RunningVm {
    let mut options = VmOptions::new(arch);
    options.transport = transport;
    options.memory_mib = 768;
    match RunningVm::start(options).await {
        Ok(vm) => vm,
        Err(error) => panic!(
            "builder VM {arch} over {transport:?} failed to start (run scripts/setup first):\n{}",
            vmic::report::render_error(&error)
        ),
    }
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs_err::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| stat.contains(") Z "))
            .unwrap_or(true)
}

/// Start `sh -c script` with streamed output and return once it printed `running` on its own
/// line: the guest says the command runs, instead of a sleep guessing it.
async fn start_running<'a>(session: &'a Session, script: &str) -> RequestHandle<'a> {
    let mut request = ExecRequest::new(["/bin/sh", "-c", script]);
    request.stream_output = true;
    let mut handle = session
        .start(Request::Exec(request))
        .await
        .expect("start the command");
    let mut stdout = Vec::new();
    while !stdout
        .split(|&byte| byte == b'\n')
        .any(|line| line == b"running")
    {
        if let Event::Output {
            stream: Stream::Stdout,
            data,
        } = handle.next_event().await.expect("the command runs")
        {
            stdout.extend_from_slice(&data);
        }
    }
    handle
}

/// The vsock daemon's PID: a vhost-user vsock VM must have one and no other VM has one, so the
/// cleanup checks that use it cannot pass for want of something to check.
fn expected_daemon_pid(vm: &RunningVm) -> Option<u32> {
    if vm.transport == TransportKind::VhostUserVsock {
        Some(vm.daemon_pid().expect("a vhost-user vsock VM has a daemon"))
    } else {
        assert_eq!(vm.daemon_pid(), None, "{}", vm.transport.name());
        None
    }
}

fn sha256_file(path: &Path) -> [u8; 32] {
    Sha256::digest(fs_err::read(path).expect("read file")).into()
}

/// Bytes between stdin/stdout and the agent's vsock port through the vhost-user socket: the
/// second local process of the token test (the frames are the test's, the connection its own).
const VSOCK_RELAY: &str = r#"
import socket, sys, threading
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"CONNECT " + sys.argv[2].encode() + b"\n")
line = b""
while not line.endswith(b"\n"):
    byte = s.recv(1)
    if not byte:
        sys.exit("CONNECT: closed")
    line += byte
if not line.startswith(b"OK "):
    sys.exit("CONNECT: " + line.decode(errors="replace"))
s.settimeout(60)  # an agent that never answers ends the relay, not the test run
def up():
    try:
        while data := sys.stdin.buffer.read1(65536):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:  # the agent closed the connection first
        pass
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
"#;

/// Another process connects to the agent while the host's session runs, presents a Hello with
/// a wrong token and returns the agent's answer; the agent must then close the connection.
fn hello_from_another_process(socket: &Path) -> String {
    use std::io::Write;
    use vmic_protocol::{GuestMessage, HostHello, HostMessage};
    let mut relay = std::process::Command::new("python3")
        .args(["-c", VSOCK_RELAY])
        .arg(socket)
        .arg(vmic_protocol::AGENT_VSOCK_PORT.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 relay");
    let mut from_agent = relay.stdout.take().expect("stdout");
    let mut to_agent = relay.stdin.take().expect("stdin");
    let hello = vmic_protocol::read_message::<GuestMessage>(&mut from_agent).expect("agent Hello");
    assert!(matches!(hello, Some(GuestMessage::Hello(_))), "{hello:?}");
    let forged = HostMessage::Hello(HostHello {
        protocol_version: vmic_protocol::PROTOCOL_VERSION,
        host_version: "attacker".into(),
        token: "0".repeat(64),
    });
    to_agent
        .write_all(&vmic_protocol::encode(&forged).expect("encode"))
        .expect("send Hello");
    let answer = match vmic_protocol::read_message::<GuestMessage>(&mut from_agent) {
        Ok(Some(GuestMessage::Fatal(error))) => error.context.join(": "),
        other => panic!("expected the agent's refusal, got {other:?}"),
    };
    // Whatever the attacker sends next is never served: the agent closed the connection.
    let exec = HostMessage::Request {
        id: 1,
        request: Request::Exec(ExecRequest::new(["/bin/touch", "/tmp/attacker-was-here"])),
    };
    let _ = to_agent.write_all(&vmic_protocol::encode(&exec).expect("encode"));
    drop(to_agent);
    let next = vmic_protocol::read_message::<GuestMessage>(&mut from_agent);
    assert!(
        matches!(next, Ok(None)),
        "the agent answered after refusing: {next:?}"
    );
    relay.wait().expect("relay exits");
    answer
}

/// Hello, streamed exec, exit codes, 50 MiB both ways with sha256, cancel; then the agent is
/// killed mid-request and everything must be cleaned up.
fn session_and_agent_killed(arch: Arch, transport: TransportChoice) {
    let _lock = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    runtime().block_on(async {
        let vm = start(arch, transport).await;
        let hello = vm.session.hello().clone();
        assert_eq!(hello.arch, arch.name());
        assert_eq!(hello.protocol_version, vmic_protocol::PROTOCOL_VERSION);
        assert!(!hello.kernel.is_empty());
        eprintln!(
            "{arch} {transport:?}: ready in {:?} ({})",
            vm.ready_after,
            vm.transport.name()
        );

        // Streamed output arrives as events, in order, before the response.
        let mut request = ExecRequest::new([
            "/bin/sh",
            "-c",
            "for i in 1 2 3; do echo line$i; done; echo oops >&2; uname -m",
        ]);
        request.stream_output = true;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let result = vm
            .session
            .exec(request, |stream, data| match stream {
                Stream::Stdout => stdout.extend_from_slice(data),
                Stream::Stderr => stderr.extend_from_slice(data),
            })
            .await
            .expect("exec");
        assert_eq!(result.code, 0);
        assert_eq!(
            String::from_utf8_lossy(&stdout),
            format!("line1\nline2\nline3\n{}\n", arch.name())
        );
        assert_eq!(String::from_utf8_lossy(&stderr), "oops\n");

        // Everything the server runs is inside the build's memory cgroup (memory.rs), whose
        // memory.high keeps the host's RSS flat: 1/8 of the VM within [256 MiB, 1 GiB].
        let cgroup = vm
            .session
            .run(&[
                "/bin/sh",
                "-c",
                "cat /proc/self/cgroup /sys/fs/cgroup/vmic-build/memory.high",
            ])
            .await
            .expect("the build's cgroup");
        let cgroup = String::from_utf8_lossy(&cgroup.stdout).into_owned();
        let mut lines = cgroup.lines();
        assert_eq!(lines.next(), Some("0::/vmic-build"), "{cgroup}");
        let high: u64 = lines
            .next()
            .and_then(|line| line.parse().ok())
            .unwrap_or_else(|| panic!("no memory.high in {cgroup:?}"));
        assert!((256 << 20..=1 << 30).contains(&high), "memory.high {high}");

        let failed = vm.session.run(&["/bin/sh", "-c", "exit 3"]).await;
        let message = format!("{:#}", failed.expect_err("exit 3 is a failure"));
        assert!(message.contains("exited with 3"), "{message}");

        let missing = vm.session.run(&["/no/such/program"]).await;
        let message = format!("{:#}", missing.expect_err("missing program"));
        assert!(message.contains("/no/such/program"), "{message}");

        // 50 MiB host → guest → host, checked by sha256 on both sides.
        let scratch = tempfile::tempdir().expect("tempdir");
        let upload = scratch.path().join("upload.bin");
        let mut data = vec![0u8; 50 << 20];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ arch as u64;
        for byte in data.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        fs_err::write(&upload, &data).expect("write upload");
        let expected = hex::encode(sha256_file(&upload));
        let started = Instant::now();
        vm.session
            .put_file(&upload, "/tmp/upload.bin", 0o600)
            .await
            .expect("put 50 MiB");
        let put_time = started.elapsed();
        let guest_sum = vm
            .session
            .run(&["sha256sum", "/tmp/upload.bin"])
            .await
            .expect("sha256sum in guest");
        assert!(
            String::from_utf8_lossy(&guest_sum.stdout).starts_with(&expected),
            "guest sees a different file"
        );
        let download = scratch.path().join("download.bin");
        let started = Instant::now();
        let digest = vm
            .session
            .get_file("/tmp/upload.bin", &download)
            .await
            .expect("get 50 MiB");
        let get_time = started.elapsed();
        assert_eq!(hex::encode(digest), expected);
        assert_eq!(hex::encode(sha256_file(&download)), expected);
        eprintln!("{arch} {transport:?}: 50 MiB put {put_time:?}, get {get_time:?}");

        // Cancel stops a running request promptly, kills its process, and the session stays
        // usable.
        let mut handle = start_running(
            &vm.session,
            "echo $$ > /tmp/cancelled.pid; echo running; exec sleep 60",
        )
        .await;
        let started = Instant::now();
        handle.cancel().await.expect("send cancel");
        let cancelled = handle.finish(|_| {}).await.expect_err("cancelled");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "cancel took {:?}",
            started.elapsed()
        );
        assert!(
            format!("{cancelled:#}").contains(vmic_protocol::CANCELLED),
            "{cancelled:#}"
        );
        // The shell exec'd sleep, so the pid is the sleep's: gone, or a zombie at most.
        let state = vm
            .session
            .run(&[
                "/bin/sh",
                "-c",
                "awk '{print $3}' /proc/$(cat /tmp/cancelled.pid)/stat 2>/dev/null || echo gone",
            ])
            .await
            .expect("session usable after cancel");
        let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
        assert!(
            state == "gone" || state == "Z",
            "the cancelled command's process is dead: state {state:?}"
        );

        // Issue 10: another local process that reaches the VM's socket cannot drive the
        // agent, and the host's session is not disturbed by the attempt.
        if let Some(socket) = vm.agent_socket() {
            let refusal = tokio::task::spawn_blocking(move || hello_from_another_process(&socket))
                .await
                .expect("attacker thread");
            assert!(
                refusal.contains("refused a Hello without this VM's token"),
                "{refusal}"
            );
            let after = vm
                .session
                .run(&[
                    "/bin/sh",
                    "-c",
                    "test ! -e /tmp/attacker-was-here && echo still mine",
                ])
                .await;
            assert_eq!(after.expect("session usable").stdout, b"still mine\n");
        } else {
            assert_ne!(vm.transport, TransportKind::VhostUserVsock);
        }

        // The serving agent is killed while a request runs: the host reports it, the VM
        // powers off, and nothing is left behind.
        let qemu_pid = vm.qemu_pid().expect("qemu pid");
        // Issue 10: QEMU runs under its seccomp sandbox (mode 2: filter). Debian's QEMU has
        // one, so its absence here is a failure, not a skip.
        let status = fs_err::read_to_string(format!("/proc/{qemu_pid}/status")).expect("status");
        let seccomp = status.lines().find(|line| line.starts_with("Seccomp:"));
        assert!(
            vmic::sandbox::supported(&vmic::qemu::find_system_binary(arch).expect("qemu")),
            "the host QEMU lacks -sandbox"
        );
        assert_eq!(seccomp, Some("Seccomp:\t2"), "{status}");
        let daemon_pid = expected_daemon_pid(&vm);
        let sockets = vm.socket_dir().expect("socket dir");
        let killed = vm
            .session
            .run(&["/bin/sh", "-c", "sleep 0.5; kill -9 $PPID; sleep 30"])
            .await;
        let message = format!("{:#}", killed.expect_err("agent was killed"));
        assert!(message.contains("lost the builder VM's agent"), "{message}");
        let status = vm
            .wait_exit(Duration::from_secs(60))
            .await
            .expect("VM powers off after the agent dies");
        eprintln!("{arch} {transport:?}: QEMU exited with {status} after the agent was killed");
        assert!(!process_alive(qemu_pid), "QEMU still running");
        if let Some(pid) = daemon_pid {
            assert!(!process_alive(pid), "vsock daemon still running");
        }
        assert!(
            !sockets.exists(),
            "socket dir {} left behind",
            sockets.display()
        );
    });
}

/// QEMU dies under a running request: the request fails with a clear error, and cleanup
/// leaves no process or socket.
fn qemu_killed(arch: Arch, transport: TransportChoice) {
    let _lock = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    runtime().block_on(async {
        let vm = start(arch, transport).await;
        let qemu_pid = vm.qemu_pid().expect("qemu pid");
        let daemon_pid = expected_daemon_pid(&vm);
        let sockets = vm.socket_dir().expect("socket dir");
        let mut handle = start_running(&vm.session, "echo running; exec sleep 60").await;
        // SAFETY: plain kill(2) of a child process we started.
        unsafe { libc::kill(qemu_pid as i32, libc::SIGKILL) };
        let started = Instant::now();
        let error = handle
            .finish_within(Duration::from_secs(30), |_| {})
            .await
            .expect_err("request fails when QEMU dies");
        let message = format!("{error:#}");
        assert!(message.contains("lost the builder VM's agent"), "{message}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "noticed after {:?}",
            started.elapsed()
        );
        drop(handle);
        // QEMU must have died of our SIGKILL: wait_exit kills a QEMU that outlives its timeout,
        // which would otherwise hide one that survived.
        let status = vm
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("QEMU exited after SIGKILL");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "{status}"
        );
        assert!(!process_alive(qemu_pid), "QEMU still running");
        if let Some(pid) = daemon_pid {
            assert!(!process_alive(pid), "vsock daemon still running");
        }
        assert!(
            !sockets.exists(),
            "socket dir {} left behind",
            sockets.display()
        );
    });
}

#[test]
fn x86_64_serial_session_and_agent_killed() {
    session_and_agent_killed(Arch::X86_64, TransportChoice::Serial);
}

#[test]
fn x86_64_vsock_session_and_agent_killed() {
    session_and_agent_killed(Arch::X86_64, TransportChoice::Vsock);
}

#[test]
fn aarch64_serial_session_and_agent_killed() {
    session_and_agent_killed(Arch::Aarch64, TransportChoice::Serial);
}

#[test]
fn aarch64_vsock_session_and_agent_killed() {
    session_and_agent_killed(Arch::Aarch64, TransportChoice::Vsock);
}

#[test]
fn x86_64_serial_qemu_killed() {
    qemu_killed(Arch::X86_64, TransportChoice::Serial);
}

#[test]
fn x86_64_vsock_qemu_killed() {
    qemu_killed(Arch::X86_64, TransportChoice::Vsock);
}

#[test]
fn aarch64_serial_qemu_killed() {
    qemu_killed(Arch::Aarch64, TransportChoice::Serial);
}

#[test]
fn aarch64_vsock_qemu_killed() {
    qemu_killed(Arch::Aarch64, TransportChoice::Vsock);
}

mod failures {
    //! The builder VM's clear errors, through the `vmic` binary.

    use std::path::Path;

    use assert_cmd::Command;

    /// A config and a small raw "disk" that pass validation, so the run reaches the VM.
    fn inputs(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let image = dir.join("disk.raw");
        fs_err::write(&image, vec![0u8; 1 << 20]).expect("write image");
        let config = dir.join("config.yaml");
        fs_err::write(&config, "os:\n  hostname: probe\n").expect("write config");
        (image, config)
    }

    fn customize(dir: &Path) -> Command {
        let (image, config) = inputs(dir);
        let mut command = Command::cargo_bin("vmic").expect("vmic binary");
        command
            .args(["customize", "--arch", "x86_64", "--transport", "serial"])
            .arg("--image-file")
            .arg(&image)
            .arg("--config-file")
            .arg(&config)
            .arg("--build-dir")
            .arg(dir.join("build"))
            .arg("--output-image-file")
            .arg(dir.join("out.iso"))
            .args(["--output-image-format", "iso"]);
        command
    }

    fn stderr_of(command: &mut Command, code: i32) -> String {
        let output = command.output().expect("run vmic");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(code), "{stderr}");
        stderr
    }

    #[test]
    fn missing_qemu_names_the_setting_and_the_package() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr = stderr_of(
            customize(dir.path()).env("VMIC_QEMU_X86_64", "/nonexistent/qemu-system-x86_64"),
            1,
        );
        // The setting that chose the path is blamed, not PATH, which was never searched.
        assert!(
            stderr.contains(
                "/nonexistent/qemu-system-x86_64 (set by VMIC_QEMU_X86_64) is not a file"
            ),
            "{stderr}"
        );
        assert!(!stderr.contains("on PATH"), "{stderr}");
        // "qemu-system-x86" alone would match the binary's name: look for the install command.
        assert!(
            stderr.contains("apt-get install qemu-system-x86 "),
            "{stderr}"
        );
        assert!(!dir.path().join("out.iso").exists());
    }

    #[test]
    fn qemu_missing_from_path_names_path_and_the_package() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A PATH with qemu-img (needed first, to read the input) but no emulator. It lives
        // outside the config directory: a symlink out of that directory is refused on upload.
        let path_dir = tempfile::tempdir().expect("tempdir");
        let bin = path_dir.path().join("bin");
        std::fs::create_dir(&bin).expect("creating a PATH dir");
        let qemu_img = vmic::qemu::find_in_path("qemu-img").expect("qemu-img on PATH");
        std::os::unix::fs::symlink(qemu_img, bin.join("qemu-img")).expect("linking qemu-img");
        let stderr = stderr_of(
            customize(dir.path())
                .env_remove("VMIC_QEMU_X86_64")
                .env("PATH", &bin),
            1,
        );
        assert!(
            stderr.contains("qemu-system-x86_64 not found on PATH"),
            "{stderr}"
        );
        assert!(
            stderr.contains("apt-get install qemu-system-x86 "),
            "{stderr}"
        );
        assert!(!dir.path().join("out.iso").exists());
    }

    #[test]
    fn missing_guest_image_names_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr = stderr_of(
            customize(dir.path()).env("VMIC_GUEST_IMAGE_DIR", dir.path().join("none")),
            1,
        );
        assert!(
            stderr.contains("scripts/build-guest-image --arch x86_64"),
            "{stderr}"
        );
    }

    /// Stands in for `vhost-device-vsock`: the first daemon vmic starts is the real one with
    /// its host socket moved aside, and in its place a listener that takes every `CONNECT`
    /// and never answers (the stuck daemon seen in the aarch64 bench); later ones are the real
    /// daemon. Probes with other arguments (QEMU's `-sandbox` check) are refused.
    const SWALLOWING_DAEMON: &str = r#"#!/usr/bin/env python3
import ctypes, os, signal, socket, subprocess, sys
args = sys.argv[1:]
if args[:1] != ["--vm"] or len(args) != 2:
    sys.exit(2)
real = os.environ["VMIC_TEST_REAL_VSOCK_DAEMON"]
marker = os.environ["VMIC_TEST_VSOCK_MARKER"]
if os.path.exists(marker):
    os.execv(real, [real] + args)
open(marker, "w").close()
options = dict(option.split("=", 1) for option in args[1].split(","))
uds = options["uds-path"]
options["uds-path"] = uds + ".hidden"
libc = ctypes.CDLL(None)
subprocess.Popen(
    [real, "--vm", ",".join(f"{key}={value}" for key, value in options.items())],
    preexec_fn=lambda: libc.prctl(1, signal.SIGKILL),
)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(uds)
server.listen(64)
held = []
while True:
    held.append(server.accept()[0])
"#;

    #[test]
    fn a_listening_agent_that_no_connect_reaches_gets_a_new_vm_before_the_deadline() {
        use std::os::unix::fs::PermissionsExt;
        let _lock = super::ONE_VM_AT_A_TIME
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        let real = vmic::transport::vsock_daemon().expect("vhost-device-vsock (scripts/setup)");
        let wrapper = dir.path().join("vhost-device-vsock");
        fs_err::write(&wrapper, SWALLOWING_DAEMON).expect("writing the fake daemon");
        fs_err::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let marker = dir.path().join("first-daemon-started");
        let output = Command::cargo_bin("vmic")
            .expect("vmic binary")
            .args([
                "doctor",
                "--boot",
                "--arch",
                "x86_64",
                "--transport",
                "vsock",
            ])
            .env("VMIC_VSOCK_DAEMON", &wrapper)
            .env("VMIC_TEST_REAL_VSOCK_DAEMON", &real)
            .env("VMIC_TEST_VSOCK_MARKER", &marker)
            .output()
            .expect("run vmic doctor");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(marker.exists(), "the fake daemon ran\n{stdout}\n{stderr}");
        // Given up on after the agent's patience, not at the 120 s deadline.
        assert!(
            stderr.contains("the agent has listened for 20 s and no connection reached it"),
            "{stderr}"
        );
        assert!(
            stderr.contains("starting the builder VM once more"),
            "{stderr}"
        );
        assert!(
            stdout.contains("boot x86_64 vsock: agent ready in"),
            "the second VM answered\n{stdout}\n{stderr}"
        );
        assert!(output.status.success(), "{stdout}\n{stderr}");
    }

    #[test]
    fn a_vm_without_agent_shows_the_console_tail() {
        let _lock = super::ONE_VM_AT_A_TIME
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        // The real kernel with an empty initramfs: no /init, so the kernel panics and QEMU
        // exits; the error must say the agent never came and show why.
        let real = vmic::guest_image::find(vmic::cli::Arch::X86_64).expect("guest image");
        let fake = dir.path().join("images/x86_64");
        fs_err::create_dir_all(&fake).expect("mkdir");
        fs_err::copy(&real.kernel, fake.join("kernel")).expect("kernel");
        fs_err::write(fake.join("initramfs"), b"").expect("initramfs");
        fs_err::copy(real.dir.join("manifest.json"), fake.join("manifest.json")).expect("manifest");
        let stderr = stderr_of(
            customize(dir.path()).env("VMIC_GUEST_IMAGE_DIR", dir.path().join("images")),
            1,
        );
        assert!(stderr.contains("did not become ready"), "{stderr}");
        assert!(stderr.contains("last console lines"), "{stderr}");
        assert!(stderr.contains("Kernel panic"), "{stderr}");
        assert!(!dir.path().join("out.iso").exists());
        assert!(!dir.path().join(".out.iso.vmic-partial").exists());
    }
}
