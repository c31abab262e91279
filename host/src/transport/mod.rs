//! Host-guest channels: choosing one, wiring it into QEMU, and connecting to the agent.
//!
//! A closed set (Cloud Hypervisor style): kernel vhost-vsock, vhost-user-vsock through the
//! rust-vmm `vhost-device-vsock` daemon, and virtio-serial. Each yields the same byte stream.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::cli::TransportChoice;
use crate::qemu::{Channel, QemuProcess};
use vmic_protocol::{AGENT_VSOCK_PORT, SERIAL_PORT_NAME};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    VhostVsock,
    VhostUserVsock,
    Serial,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::VhostVsock => "vsock (vhost-vsock)",
            TransportKind::VhostUserVsock => "vsock (vhost-user, vhost-device-vsock)",
            TransportKind::Serial => "virtio-serial",
        }
    }

    /// The agent's `vmic.transport=` value.
    fn guest_value(self) -> &'static str {
        match self {
            TransportKind::Serial => "serial",
            TransportKind::VhostVsock | TransportKind::VhostUserVsock => "vsock",
        }
    }
}

/// Name of the vhost-user vsock daemon (crates.io `vhost-device-vsock`).
pub const VSOCK_DAEMON: &str = "vhost-device-vsock";
/// How long one vhost-user `CONNECT` waits for its answer before a fresh one is sent.
const CONNECT_ATTEMPT_PATIENCE: Duration = Duration::from_secs(15);
/// How long vhost-user vsock holds its first `CONNECT` back for the agent's console line
/// (see [`Transport::connect_watching`]); a console that says nothing costs at most this.
/// The agent listens 4-8 s after QEMU starts here, ~20 s on a loaded host.
const SILENT_CONSOLE_GRACE: Duration = Duration::from_secs(30);

/// Whether the kernel's vhost-vsock device can be opened.
pub fn vhost_vsock_usable() -> bool {
    fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-vsock")
        .is_ok()
}

/// The daemon binary: `$VMIC_VSOCK_DAEMON`, on `PATH`, or in `~/.cargo/bin`.
pub fn vsock_daemon() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("VMIC_VSOCK_DAEMON") {
        return Some(PathBuf::from(path));
    }
    crate::qemu::find_in_path(VSOCK_DAEMON).or_else(|| {
        let home = std::env::var_os("HOME")?;
        let path = Path::new(&home).join(".cargo/bin").join(VSOCK_DAEMON);
        path.is_file().then_some(path)
    })
}

/// Pick the transport for `choice`: auto prefers kernel vsock, then vhost-user vsock, then
/// virtio-serial, which works everywhere (macOS included).
pub fn select(choice: TransportChoice) -> anyhow::Result<TransportKind> {
    let vsock = || {
        if cfg!(target_os = "linux") && vhost_vsock_usable() {
            Some(TransportKind::VhostVsock)
        } else if cfg!(target_os = "linux") && vsock_daemon().is_some() {
            Some(TransportKind::VhostUserVsock)
        } else {
            None
        }
    };
    match choice {
        TransportChoice::Serial => Ok(TransportKind::Serial),
        TransportChoice::Auto => Ok(vsock().unwrap_or(TransportKind::Serial)),
        TransportChoice::Vsock => vsock().ok_or_else(|| {
            crate::report::hinted(
                "vsock is not available: /dev/vhost-vsock cannot be opened and vhost-device-vsock is not installed",
                "`cargo install vhost-device-vsock` (or `scripts/setup`), or use `--transport serial`",
            )
        }),
    }
}

/// The agent said that it listens, and no connection reached it within the patience (seconds).
#[derive(Debug, thiserror::Error)]
#[error("the agent has listened for {} s and no connection reached it", .0.as_secs())]
pub struct Unanswered(pub Duration);

/// A transport set up for one VM: the QEMU channel, the kernel cmdline keys, and the daemon
/// it needs, if any.
pub struct Transport {
    pub kind: TransportKind,
    pub channel: Channel,
    /// The host side of vhost-user vsock: `CONNECT <port>` goes here.
    uds_path: Option<PathBuf>,
    daemon: Option<QemuProcess>,
    /// [`CONNECT_ATTEMPT_PATIENCE`]; shorter in tests.
    connect_patience: Duration,
    /// [`SILENT_CONSOLE_GRACE`]; other in tests.
    silent_console_grace: Duration,
}

impl Transport {
    /// Prepare `kind` with its sockets under `run_dir` (short path: unix sockets are limited to
    /// ~107 bytes). Starts the vsock daemon when one is needed; QEMU must start after this.
    pub async fn prepare(kind: TransportKind, run_dir: &Path) -> anyhow::Result<Transport> {
        match kind {
            TransportKind::Serial => Ok(Transport {
                kind,
                channel: Channel::Serial {
                    socket: run_dir.join("agent.sock"),
                    name: SERIAL_PORT_NAME.to_string(),
                },
                uds_path: None,
                daemon: None,
                connect_patience: CONNECT_ATTEMPT_PATIENCE,
                silent_console_grace: SILENT_CONSOLE_GRACE,
            }),
            TransportKind::VhostVsock => Ok(Transport {
                kind,
                // CIDs are host-global: a random one differs between parallel runs and
                // cannot be guessed by another process.
                channel: Channel::VhostVsock {
                    cid: crate::secret::random_cid()?,
                },
                uds_path: None,
                daemon: None,
                connect_patience: CONNECT_ATTEMPT_PATIENCE,
                silent_console_grace: SILENT_CONSOLE_GRACE,
            }),
            TransportKind::VhostUserVsock => {
                let daemon_binary = vsock_daemon().context("vhost-device-vsock not found")?;
                let socket = run_dir.join("vhost.sock");
                let uds_path = run_dir.join("vsock.sock");
                let argv = vsock_daemon_argv(&socket, &uds_path);
                let mut daemon = QemuProcess::spawn(&daemon_binary, argv, None)?;
                // QEMU connects to the daemon's socket at start-up: wait until it listens.
                let deadline = Instant::now() + Duration::from_secs(10);
                while !socket.exists() {
                    if Instant::now() > deadline {
                        daemon.kill().await;
                        bail!(
                            "{VSOCK_DAEMON} did not create {} within 10 s",
                            socket.display()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Transport {
                    kind,
                    channel: Channel::VhostUserVsock { socket },
                    uds_path: Some(uds_path),
                    daemon: Some(daemon),
                    connect_patience: CONNECT_ATTEMPT_PATIENCE,
                    silent_console_grace: SILENT_CONSOLE_GRACE,
                })
            }
        }
    }

    /// Kernel command-line keys telling the agent which channel to open.
    pub fn cmdline(&self) -> String {
        format!(
            "vmic.transport={} vmic.port={AGENT_VSOCK_PORT}",
            self.kind.guest_value()
        )
    }

    /// Connect to the agent, retrying until it listens or `deadline` passes. The caller races
    /// this against QEMU exiting.
    async fn connect(&self, deadline: Instant) -> anyhow::Result<Connection> {
        loop {
            match self.try_connect(deadline).await {
                Ok(connection) => return Ok(connection),
                Err(error) if Instant::now() >= deadline => {
                    return Err(error.context(format!("connecting over {}", self.kind.name())))
                }
                Err(error) => {
                    tracing::trace!("agent not reachable yet: {error:#}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// [`connect`](Self::connect), with the agent's word that it listens (`listening` turns
    /// true when its console line came).
    ///
    /// vhost-user vsock sends no CONNECT before that word, or before [`SILENT_CONSOLE_GRACE`]
    /// without it: vhost-device-vsock 0.3 handles a CONNECT that arrives before the guest set
    /// up its virtqueues with an error (its log: `Received a backend event before vring
    /// initialization`, once per early CONNECT), and a failure there can end the daemon's
    /// worker (vhost-user-backend's event loop stops on an error), after which every CONNECT
    /// goes unanswered: the stall seen in the aarch64 bench. Once the agent listens, the
    /// guest's vsock device is up.
    ///
    /// Once the agent listens, a fresh attempt starts (one sent earlier may never be answered)
    /// and, with a `patience`, the agent must be reached within it, or this fails with
    /// [`Unanswered`] long before `deadline`: a VM in which no connection reaches a listening
    /// agent is stuck, and the caller starts a new one instead of waiting out the deadline.
    pub async fn connect_watching(
        &self,
        deadline: Instant,
        mut listening: tokio::sync::watch::Receiver<bool>,
        patience: Option<Duration>,
    ) -> anyhow::Result<Connection> {
        let agent_listens = async {
            if listening.wait_for(|listening| *listening).await.is_err() {
                // The console closed without the line: QEMU is gone, which the caller sees.
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(agent_listens);
        if self.kind == TransportKind::VhostUserVsock {
            let hold = deadline.min(Instant::now() + self.silent_console_grace);
            let heard = tokio::time::timeout_at(hold.into(), &mut agent_listens).await;
            if heard.is_ok() {
                return self.connect_listening(deadline, patience).await;
            }
            tracing::debug!("no word from the agent yet: connecting anyway");
        }
        tokio::select! {
            connected = self.connect(deadline) => connected,
            () = &mut agent_listens => self.connect_listening(deadline, patience).await,
        }
    }

    /// Connect to an agent that said it listens, within `patience` if given.
    async fn connect_listening(
        &self,
        deadline: Instant,
        patience: Option<Duration>,
    ) -> anyhow::Result<Connection> {
        let Some(patience) = patience else {
            return self.connect(deadline).await;
        };
        let within = deadline.min(Instant::now() + patience);
        self.connect(within).await.map_err(|error| {
            if Instant::now() < deadline {
                error.context(Unanswered(patience))
            } else {
                error
            }
        })
    }

    async fn try_connect(&self, deadline: Instant) -> anyhow::Result<Connection> {
        match &self.channel {
            Channel::Serial { socket, .. } => {
                let stream = UnixStream::connect(socket).await?;
                Ok(Connection::from_unix(stream))
            }
            Channel::VhostUserVsock { .. } => {
                let uds = self
                    .uds_path
                    .as_ref()
                    .expect("vhost-user transport has a uds path");
                let stream = UnixStream::connect(uds).await?;
                let (read, mut write) = stream.into_split();
                write
                    .write_all(format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes())
                    .await?;
                let mut reader = BufReader::new(read);
                let mut line = String::new();
                // The daemon answers `OK <port>` once the guest accepted; it closes the stream
                // when nothing listens yet. A guest slowed down by emulation may answer late,
                // so one attempt waits long; but not until the deadline: a CONNECT that reached
                // the daemon before the guest's vsock device was up was seen (CI, loaded
                // machine) to get no answer ever, while the agent listened. A fresh CONNECT
                // then gets through; the agent takes a connection abandoned before its Hello
                // as such and waits for the next.
                let patience = deadline
                    .saturating_duration_since(Instant::now())
                    .min(self.connect_patience)
                    .max(Duration::from_secs(2));
                let read = tokio::time::timeout(patience, reader.read_line(&mut line))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "no answer to CONNECT within {:.1} s",
                            patience.as_secs_f64()
                        )
                    })??;
                if read == 0 || !line.starts_with("OK ") {
                    bail!("vsock CONNECT refused ({})", line.trim());
                }
                Ok(Connection {
                    reader: Box::pin(reader),
                    writer: Box::pin(write),
                })
            }
            Channel::VhostVsock { cid } => {
                let stream = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(
                    *cid,
                    AGENT_VSOCK_PORT,
                ))
                .await?;
                let (read, write) = tokio::io::split(stream);
                Ok(Connection {
                    reader: Box::pin(read),
                    writer: Box::pin(write),
                })
            }
        }
    }

    /// Where the guest's vsock connections to host `port` arrive (vhost-user: the daemon
    /// connects to `<uds>_<port>`); `None` for transports without guest-to-host connections.
    pub fn guest_to_host_socket(&self, port: u32) -> Option<PathBuf> {
        let uds = self.uds_path.as_ref()?;
        let mut name = uds.as_os_str().to_os_string();
        name.push(format!("_{port}"));
        Some(PathBuf::from(name))
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(QemuProcess::id)
    }

    /// Where any local process that can open it reaches the agent (`CONNECT <port>`), for
    /// vhost-user vsock: the tests attack it.
    pub fn agent_socket(&self) -> Option<&Path> {
        self.uds_path.as_deref()
    }

    /// Stop the daemon (QEMU must be gone first, or it will complain about the lost backend).
    pub async fn shutdown(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.kill().await;
        }
    }
}

/// Argv for `vhost-device-vsock`. 64 KiB TX buffers: 1 MiB ones stalled guest→host transfers.
pub fn vsock_daemon_argv(socket: &Path, uds_path: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--vm".into(),
        format!(
            "guest-cid=3,socket={},uds-path={},tx-buffer-size=65536",
            socket.display(),
            uds_path.display()
        )
        .into(),
    ]
}

/// A connected byte stream to the agent.
pub struct Connection {
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
    pub writer: Pin<Box<dyn AsyncWrite + Send>>,
}

impl Connection {
    pub fn from_unix(stream: UnixStream) -> Connection {
        let (read, write) = stream.into_split();
        Connection {
            reader: Box::pin(read),
            writer: Box::pin(write),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One line from a fake daemon's client.
    async fn read_connect(stream: UnixStream) -> (BufReader<UnixStream>, String) {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("reading CONNECT");
        (reader, line)
    }

    fn fake_vhost_user(dir: &Path, connect_patience: Duration) -> Transport {
        Transport {
            kind: TransportKind::VhostUserVsock,
            channel: Channel::VhostUserVsock {
                socket: dir.join("qemu.sock"),
            },
            uds_path: Some(dir.join("vsock.sock")),
            daemon: None,
            connect_patience,
            silent_console_grace: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn once_the_agent_listens_a_fresh_connect_replaces_the_pending_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = tokio::net::UnixListener::bind(dir.path().join("vsock.sock")).expect("bind");
        let (listening, told) = tokio::sync::watch::channel(false);
        // The first CONNECT is swallowed; the agent's line comes while it waits; the CONNECT
        // after it is answered.
        let daemon = tokio::spawn(async move {
            let (first, _) = listener.accept().await.expect("first");
            let (first, _) = read_connect(first).await;
            listening.send_replace(true);
            let (second, _) = listener.accept().await.expect("second");
            let (mut second, line) = read_connect(second).await;
            assert_eq!(line, format!("CONNECT {AGENT_VSOCK_PORT}\n"));
            second.get_mut().write_all(b"OK 1\n").await.expect("answer");
            (first, second)
        });
        // Without the fresh attempt, the first one would wait its whole minute and fail. The
        // console said nothing at first: connecting at once, as after the grace.
        let mut transport = fake_vhost_user(dir.path(), Duration::from_secs(60));
        transport.silent_console_grace = Duration::ZERO;
        let connected = transport
            .connect_watching(
                Instant::now() + Duration::from_secs(60),
                told,
                Some(Duration::from_secs(30)),
            )
            .await;
        assert!(connected.is_ok(), "{:#}", connected.err().expect("error"));
        daemon.await.expect("the daemon saw both CONNECTs");
    }

    #[tokio::test]
    async fn no_connect_is_sent_before_the_agent_listens() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = tokio::net::UnixListener::bind(dir.path().join("vsock.sock")).expect("bind");
        let (listening, told) = tokio::sync::watch::channel(false);
        let line_came = Arc::new(AtomicBool::new(false));
        let daemon = {
            let line_came = line_came.clone();
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.expect("a CONNECT");
                // A CONNECT before the line is what upsets vhost-device-vsock 0.3.
                let early = !line_came.load(Ordering::SeqCst);
                let (mut stream, _) = read_connect(stream).await;
                stream.get_mut().write_all(b"OK 1\n").await.expect("answer");
                (early, stream)
            })
        };
        let transport = fake_vhost_user(dir.path(), Duration::from_secs(15));
        let connecting = tokio::spawn(async move {
            transport
                .connect_watching(Instant::now() + Duration::from_secs(60), told, None)
                .await
                .map(|_| ())
        });
        // Room for a CONNECT that should not be sent (a negative cannot be waited for).
        tokio::time::sleep(Duration::from_millis(500)).await;
        line_came.store(true, Ordering::SeqCst);
        listening.send_replace(true);
        let (early, _stream) = daemon.await.expect("the daemon");
        assert!(!early, "a CONNECT came before the agent's line");
        connecting
            .await
            .expect("joined")
            .expect("connected once the agent listens");
    }

    #[tokio::test]
    async fn a_listening_agent_never_reached_fails_before_the_deadline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = tokio::net::UnixListener::bind(dir.path().join("vsock.sock")).expect("bind");
        // A daemon that swallows every CONNECT, as the stuck one did.
        let daemon = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let transport = fake_vhost_user(dir.path(), Duration::from_millis(300));
        let fails = |deadline: Duration, listening: bool| {
            let (sender, told) = tokio::sync::watch::channel(listening);
            let connecting = transport.connect_watching(
                Instant::now() + deadline,
                told,
                Some(Duration::from_millis(500)),
            );
            async move {
                let outcome = connecting.await;
                drop(sender);
                outcome.err().expect("nothing answers")
            }
        };
        let error = fails(Duration::from_secs(60), true).await;
        assert!(error.downcast_ref::<Unanswered>().is_some(), "{error:#}");
        // Without the agent's line, the same daemon fails the connection only at the deadline,
        // and not as unanswered.
        let error = fails(Duration::from_secs(3), false).await;
        assert!(error.downcast_ref::<Unanswered>().is_none(), "{error:#}");
        daemon.abort();
    }

    #[tokio::test]
    async fn a_connect_left_unanswered_is_sent_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = tokio::net::UnixListener::bind(dir.path().join("vsock.sock")).expect("bind");
        // A daemon that swallows the first CONNECT (as one sent before the guest's vsock
        // device was up) and answers the second.
        let daemon = tokio::spawn(async move {
            let (first, _) = listener.accept().await.expect("first");
            let (first, line) = read_connect(first).await;
            assert_eq!(line, format!("CONNECT {AGENT_VSOCK_PORT}\n"));
            let (second, _) = listener.accept().await.expect("second");
            let (mut second, line) = read_connect(second).await;
            assert_eq!(line, format!("CONNECT {AGENT_VSOCK_PORT}\n"));
            second.get_mut().write_all(b"OK 1\n").await.expect("answer");
            (first, second)
        });
        let transport = fake_vhost_user(dir.path(), Duration::from_millis(300));
        let connected = transport
            .connect(Instant::now() + Duration::from_secs(10))
            .await;
        assert!(connected.is_ok(), "{:#}", connected.err().expect("error"));
        daemon.await.expect("the daemon saw both CONNECTs");
    }
}
