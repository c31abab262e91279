//! The builder VM's life: pick accelerator and transport, start QEMU (and the vsock daemon),
//! wait for the agent's hello, and stop everything on every way out.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::accel::Accel;
use crate::cli::{AccelChoice, Arch, TransportChoice};
use crate::guest_image::GuestImage;
use crate::qemu::{BuilderVm, Disk, QemuProcess};
use crate::report::Source;
use crate::session::Session;
use crate::transport::{Transport, TransportKind, Unanswered};

/// Options for starting a builder VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub arch: Arch,
    pub accel: AccelChoice,
    pub transport: TransportChoice,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disks: Vec<Disk>,
    /// Where the console log and sockets go (a fresh temp dir when `None`).
    pub run_dir: Option<PathBuf>,
    /// How long to wait for the agent's hello.
    pub ready_timeout: Duration,
    /// Give the VM a way out: vmic's HTTP/HTTPS proxy (`proxy.rs`), relayed over vsock.
    pub network: bool,
    /// The proxy may connect to private networks (`--allow-private-network`).
    pub allow_private_network: bool,
    /// Where the VM's life, its proxy and the guest's own messages are reported.
    pub reporter: crate::report::Reporter,
}

impl VmOptions {
    /// The options the command line's VM flags (`--accel`, `--transport`, `--vm-cpus`,
    /// `--vm-memory`) ask for, for a build-sized VM.
    pub fn from_args(arch: Arch, args: &crate::cli::VmArgs) -> VmOptions {
        let mut options = VmOptions::new(arch);
        options.accel = args.accel;
        options.transport = args.transport;
        options.memory_mib = args.vm_memory.unwrap_or_else(default_build_memory_mib);
        if let Some(cpus) = args.vm_cpus {
            options.cpus = cpus;
        }
        options
    }

    pub fn new(arch: Arch) -> VmOptions {
        VmOptions {
            arch,
            accel: AccelChoice::Auto,
            transport: TransportChoice::Auto,
            memory_mib: 1024,
            cpus: default_cpus(),
            disks: Vec::new(),
            run_dir: None,
            ready_timeout: Duration::from_secs(120),
            network: false,
            allow_private_network: false,
            reporter: crate::report::Reporter::plain(),
        }
    }
}

/// Memory for a build VM: a quarter of the host's, between 1.5 and 4 GiB. Untouched guest
/// memory costs the host nothing; what is used goes to mksquashfs and the page cache that
/// keeps the image's files warm between dracut and squashing.
pub fn default_build_memory_mib() -> u32 {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .unwrap_or(8 << 20);
    ((total_kib / 1024 / 4) as u32).clamp(1536, 4096)
}

/// One vCPU per host core, at most 4: TCG runs a thread per vCPU and more only adds contention.
pub fn default_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u32)
}

/// The agent did not say hello: the console tail usually tells why.
#[derive(Debug, thiserror::Error)]
#[error("the builder VM's agent did not become ready: {reason}\nlast console lines ({console}):\n{tail}")]
pub struct NotReady {
    pub reason: String,
    /// The agent never answered (as opposed to QEMU exiting).
    pub timed_out: bool,
    pub console: String,
    pub tail: String,
}

/// A running builder VM with a session to its agent. Dropping it kills QEMU and the daemon.
pub struct RunningVm {
    pub session: Session,
    pub accel: Accel,
    pub transport: TransportKind,
    pub image: GuestImage,
    pub ready_after: Duration,
    pub console_log: PathBuf,
    pub cpus: u32,
    qemu: QemuProcess,
    channel: Transport,
    /// The network proxy's task, stopped with the VM.
    _proxy: Option<ProxyTask>,
    _temp: Option<tempfile::TempDir>,
    reporter: crate::report::Reporter,
}

/// The proxy's serving task; aborted when dropped.
pub struct ProxyTask(tokio::task::JoinHandle<()>);

impl Drop for ProxyTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listen where the guest's vsock connections to the proxy port arrive, and serve them.
fn start_proxy(
    channel: &Transport,
    allow_private_network: bool,
    reporter: crate::report::Reporter,
) -> anyhow::Result<ProxyTask> {
    let Some(path) = channel.guest_to_host_socket(vmic_protocol::PROXY_VSOCK_PORT) else {
        return Err(crate::report::hinted(
            format!(
                "packages from the image's own repositories need a network, which vmic gives the builder VM over vhost-user vsock; the {} transport has none",
                channel.kind.name()
            ),
            "install vhost-device-vsock (`scripts/setup`), or install offline with --package-source DIR --disable-base-image-repos",
        ));
    };
    let listener = tokio::net::UnixListener::bind(&path).with_context(|| {
        format!(
            "listening for the builder VM's proxy connections on {}",
            path.display()
        )
    })?;
    let policy = crate::proxy::Policy {
        private: allow_private_network,
        ..crate::proxy::Policy::default()
    };
    Ok(ProxyTask(tokio::spawn(crate::proxy::serve(
        crate::proxy::Listener::Unix(listener),
        policy,
        reporter,
    ))))
}

impl RunningVm {
    pub async fn start(options: VmOptions) -> anyhow::Result<RunningVm> {
        let started = Instant::now();
        let image = crate::guest_image::find(options.arch)?;
        let qemu_binary = crate::qemu::find_system_binary(options.arch)?;
        let accel = crate::accel::resolve(options.accel, options.arch, Some(&image.kernel));
        let reporter = &options.reporter;
        if accel.is_emulated() {
            reporter.note(
                Source::Vmic,
                format_args!(
                    "no hardware acceleration for {}: the builder VM runs under TCG emulation (slow)",
                    options.arch
                ),
            );
        }
        crate::sandbox::warn_if_unsupported(&qemu_binary, reporter);
        let mut kind = crate::transport::select(options.transport)?;
        // The proxy is reached over vsock from the guest to a per-VM unix socket of the
        // vhost-user daemon; a kernel vsock listener would be host-wide.
        if options.network
            && kind == TransportKind::VhostVsock
            && crate::transport::vsock_daemon().is_some()
        {
            kind = TransportKind::VhostUserVsock;
        }
        reporter.note(
            Source::Vmic,
            format_args!(
                "starting builder VM (transport {}, accelerator {})",
                kind.name(),
                accel.name()
            ),
        );

        // Unix socket paths are limited to ~107 bytes: keep them in a short temp dir.
        let temp = tempfile::Builder::new().prefix("vmic-").tempdir()?;
        // The sockets and the token are this user's alone (0700); the token proves to the
        // agent that this host started the VM.
        crate::secret::private_dir(temp.path())?;
        let token = crate::secret::BuildToken::generate()?;
        let token_file = token.write_into(temp.path())?;
        let run_dir = options
            .run_dir
            .clone()
            .unwrap_or_else(|| temp.path().to_path_buf());
        let console_log = run_dir.join("console.log");
        // A VM that boots but never answers (seen once in ~100 TCG boots, cause unknown) gets
        // one more try: a build should not fail on a flake of the emulator.
        let mut attempt = 1;
        let (session, qemu, channel, proxy) = loop {
            let socket_dir = temp.path().join(attempt.to_string());
            fs_err::create_dir_all(&socket_dir)?;
            let channel = Transport::prepare(kind, &socket_dir).await?;
            let proxy = match options.network {
                true => Some(start_proxy(
                    &channel,
                    options.allow_private_network,
                    reporter.clone(),
                )?),
                false => None,
            };
            let console_pipe =
                crate::console::ConsolePipe::new().context("creating the console pipe")?;
            let vm = BuilderVm {
                arch: options.arch,
                accel,
                memory_mib: options.memory_mib,
                cpus: options.cpus,
                kernel: image.kernel.clone(),
                initramfs: image.initramfs.clone(),
                // mitigations=off: the builder VM runs only vmic's agent and the image's own
                // tools on a throwaway kernel; under TCG every speculation barrier and page
                // table switch is emulated (docs/benchmarks.md has the before/after).
                cmdline: format!(
                    "console={} panic=-1 quiet loglevel=4 mitigations=off rdinit=/init {}",
                    crate::machine::console_device(options.arch),
                    channel.cmdline()
                ),
                disks: options.disks.clone(),
                channel: channel.channel.clone(),
                console_fd: std::os::fd::AsRawFd::as_raw_fd(&console_pipe.writer),
                qmp_socket: socket_dir.join("qmp.sock"),
                // No NIC: the proxy relayed over vsock is the only way out.
                network: false,
                token_file: token_file.clone(),
            };
            let argv = crate::qemu::builder_argv(&vm);
            let console = crate::console::console_reader(console_pipe.reader)
                .context("reading the console pipe")?;
            let qemu = QemuProcess::spawn(&qemu_binary, argv, Some(console_pipe.writer))?;
            qemu.warn_if_unwatched(reporter);
            let log =
                crate::console::CappedLog::create(&console_log, crate::console::CONSOLE_LOG_CAP)
                    .with_context(|| {
                        format!("creating the console log {}", console_log.display())
                    })?;
            // A kernel stuck for good (see console::STALL_REPORTS) is stopped at once: before
            // the agent answered, that is one more try below; after, the build fails now
            // instead of at its timeout.
            let stalled = Arc::new(AtomicBool::new(false));
            let on_stall = {
                let (stalled, pid) = (stalled.clone(), qemu.id());
                move || {
                    stalled.store(true, Ordering::SeqCst);
                    if let Some(pid) = pid.and_then(|pid| i32::try_from(pid).ok()) {
                        // SAFETY: kill(2) with a pid and a signal has no memory effects. The
                        // pid is QEMU's, our child. It can be reaped while the recorder still
                        // reads the pipe's last bytes (the recorder is finished after
                        // `qemu.kill()`, within 2 s), but Linux hands out pids in order, so
                        // another process gets it only after the pid space wrapped.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            };
            let (listening, agent_listens) = tokio::sync::watch::channel(false);
            let mut running = RunningVmStart {
                token: token.clone(),
                stalled,
                agent_listens,
                // The second VM gets the whole deadline: a slow one is better than none.
                listening_patience: (attempt == 1).then_some(AGENT_LISTENING_PATIENCE),
                qemu,
                channel,
                console_log: console_log.clone(),
                recorder: Some(crate::console::ConsoleRecorder::spawn(
                    console,
                    log,
                    reporter.clone(),
                    on_stall,
                    listening,
                )),
                reporter: reporter.clone(),
            };
            let deadline = Instant::now() + options.ready_timeout;
            match running.wait_ready(deadline).await {
                Ok(session) => break (session, running.qemu, running.channel, proxy),
                Err(error)
                    if attempt == 1
                        && error
                            .downcast_ref::<NotReady>()
                            .is_some_and(|not_ready| not_ready.timed_out) =>
                {
                    // The first attempt's console is the only evidence of why it never
                    // answered: kept beside the next one's instead of overwritten by it.
                    let first = first_attempt_log(&console_log);
                    let kept = match fs_err::rename(&console_log, &first) {
                        Ok(()) => format!(" (its console: {})", first.display()),
                        Err(_) => String::new(),
                    };
                    reporter.warn(
                        Source::Vmic,
                        format_args!("{error:#}{kept}\nstarting the builder VM once more"),
                    );
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        };
        let ready_after = started.elapsed();
        let hello = session.hello();
        reporter.note(
            Source::Vmic,
            format_args!(
                "builder VM ready after {:.1} s (agent {}, kernel {}, {})",
                ready_after.as_secs_f64(),
                hello.agent_version,
                hello.kernel,
                hello.arch
            ),
        );
        Ok(RunningVm {
            session,
            accel,
            transport: kind,
            image,
            ready_after,
            console_log,
            cpus: options.cpus,
            qemu,
            channel,
            _proxy: proxy,
            _temp: Some(temp),
            reporter: reporter.clone(),
        })
    }

    /// QEMU's PID (for tests that kill it).
    pub fn qemu_pid(&self) -> Option<u32> {
        self.qemu.id()
    }

    /// The vsock daemon's PID, when the transport has one.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.channel.daemon_pid()
    }

    /// The unix socket through which the agent is reached (vhost-user vsock only).
    pub fn agent_socket(&self) -> Option<PathBuf> {
        self.channel.agent_socket().map(Path::to_path_buf)
    }

    /// Where this VM's sockets live (removed when the VM is dropped).
    pub fn socket_dir(&self) -> Option<PathBuf> {
        self._temp.as_ref().map(|temp| temp.path().to_path_buf())
    }

    /// Ask the agent to power off and wait for QEMU to exit; kill it if it takes too long.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.session.shutdown().await;
        let waited = tokio::time::timeout(Duration::from_secs(20), self.qemu.wait()).await;
        if waited.is_err() {
            self.reporter.warn(
                Source::Vmic,
                "builder VM did not power off within 20 s; killing it",
            );
            self.qemu.kill().await;
        }
        self.channel.shutdown().await;
        Ok(())
    }

    /// Wait for QEMU to exit (after the agent died or was told to stop), then clean up.
    pub async fn wait_exit(
        mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let result = tokio::time::timeout(timeout, self.qemu.wait()).await;
        let status = match result {
            Ok(waited) => waited?.0,
            Err(_) => {
                self.qemu.kill().await;
                self.channel.shutdown().await;
                anyhow::bail!("the builder VM did not exit within {timeout:?}");
            }
        };
        self.channel.shutdown().await;
        Ok(status)
    }
}

/// The parts that exist before the agent is ready, so that a failure can still clean up.
struct RunningVmStart {
    token: crate::secret::BuildToken,
    qemu: QemuProcess,
    channel: Transport,
    console_log: PathBuf,
    recorder: Option<crate::console::ConsoleRecorder>,
    reporter: crate::report::Reporter,
    /// Set when the console showed a stuck kernel (and QEMU was killed for it).
    stalled: Arc<AtomicBool>,
    /// Turns true when the agent says on the console that it listens (see
    /// [`Transport::connect_watching`]).
    agent_listens: tokio::sync::watch::Receiver<bool>,
    /// How long a connection may take to reach the listening agent before this VM counts as
    /// stuck; `None`: until the deadline.
    listening_patience: Option<Duration>,
}

/// How long a listening agent may stay unreached before the VM counts as stuck: one
/// `CONNECT` with its whole patience and part of a second. A healthy agent is reached within
/// a second of its line, even under TCG on a loaded host.
const AGENT_LISTENING_PATIENCE: Duration = Duration::from_secs(20);

impl RunningVmStart {
    async fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<Session> {
        let connect_and_greet = async {
            let connection = self
                .channel
                .connect_watching(
                    deadline,
                    self.agent_listens.clone(),
                    self.listening_patience,
                )
                .await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout(
                remaining,
                Session::handshake(connection, self.token.as_str(), self.reporter.clone()),
            )
            .await
            .context("timed out waiting for the agent's hello")?
        };
        let mut exited_early = false;
        let outcome = tokio::select! {
            session = connect_and_greet => session,
            exited = self.qemu.wait() => {
                exited_early = true;
                let reason = match exited {
                    Ok((status, stderr)) => format!("QEMU exited ({status}) {}", stderr.trim()),
                    Err(error) => format!("QEMU failed: {error:#}"),
                };
                Err(anyhow::anyhow!(reason))
            }
        };
        match outcome {
            Ok(session) => Ok(session),
            Err(error) => {
                // Each of these is worth a new VM: nothing the image did caused them.
                let timed_out = (!exited_early && Instant::now() >= deadline)
                    || self.stalled.load(Ordering::SeqCst)
                    || error.downcast_ref::<Unanswered>().is_some();
                self.qemu.kill().await;
                self.channel.shutdown().await;
                // QEMU is gone: the console's last lines are in the log once the pipe closed.
                if let Some(recorder) = self.recorder.take() {
                    recorder.finish(Duration::from_secs(2)).await;
                }
                Err(NotReady {
                    reason: format!("{error:#}"),
                    timed_out,
                    console: self.console_log.display().to_string(),
                    tail: crate::console::log_tail(&self.console_log, 30),
                }
                .into())
            }
        }
    }
}

/// Where the console of a builder VM's first, unanswered attempt is kept: `console.log.1`.
fn first_attempt_log(console_log: &Path) -> PathBuf {
    let mut name = console_log.file_name().unwrap_or_default().to_os_string();
    name.push(".1");
    console_log.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_attempts_console_is_kept_beside_the_next_ones() {
        assert_eq!(
            first_attempt_log(Path::new("/run/vmic/build/console.log")),
            Path::new("/run/vmic/build/console.log.1")
        );
    }
}
