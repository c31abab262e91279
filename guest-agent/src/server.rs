//! The session with the host: hello, the reader loop, the shared writer, one thread per
//! request, cancellation, and the one place guest errors become a [`RemoteError`].

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use vmic_protocol::{
    read_message, Event, GuestHello, GuestMessage, HostMessage, Level, ProtocolError, RemoteError,
    Request, RequestId, Response, CANCELLED, PROTOCOL_VERSION,
};

use crate::channel::{Channel, ChannelSpec, Opener};
use crate::context::{debug_enabled, CancelToken, Cancelled, Incoming, RequestContext, Writer};
use crate::token::Expected;

/// The token the in-process tests' fake host presents.
#[cfg(test)]
const TEST_TOKEN: &str = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2";
use crate::init::Note;
use crate::{console, disks, exec, files};

/// File chunks queued between the reader and a `PutFile` thread (backpressure beyond this).
const DATA_QUEUE: usize = 16;

/// The session's writer, for the panic hook.
static PANIC_WRITER: Mutex<Option<Writer>> = Mutex::new(None);

/// Report a panic to the host (if a session is up) and the console, then end this process;
/// the PID 1 parent then powers the VM off.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info.to_string();
        console!("{message}");
        let writer = match PANIC_WRITER.try_lock() {
            Ok(writer) => writer.clone(),
            Err(_) => None,
        };
        if let Some(writer) = writer {
            let fatal = GuestMessage::Fatal(RemoteError {
                context: vec!["agent panicked".into(), message],
            });
            writer.send_within(&fatal, Duration::from_secs(1));
        }
        if std::process::id() == 1 {
            crate::init::power_off();
        }
        std::process::exit(101);
    }));
}

struct Active {
    cancel: Arc<CancelToken>,
    incoming: Option<SyncSender<Incoming>>,
}

type Registry = Arc<Mutex<HashMap<RequestId, Active>>>;

fn lock(registry: &Registry) -> std::sync::MutexGuard<'_, HashMap<RequestId, Active>> {
    registry.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Open the channel and serve until the host says `Shutdown` or goes away.
pub fn run(spec: ChannelSpec, notes: Vec<Note>) -> anyhow::Result<()> {
    let expected = Expected::for_channel(spec)?;
    let mut opener = Opener::new(spec).with_context(|| format!("opening the {spec}"))?;
    // The host watches the console for this line (its patience with an unanswered connection
    // starts here): written whole, not through `console!`.
    eprintln!("{} {spec}", vmic_protocol::AGENT_LISTENING_LINE);
    loop {
        let channel = opener
            .next()
            .with_context(|| format!("opening the {spec}"))?;
        match greet(channel, &expected) {
            Ok((reader, writer)) => {
                if opener.can_retry() {
                    let expected = expected.clone();
                    thread::spawn(move || refuse_latecomers(opener, expected));
                }
                return serve_session(reader, writer, notes);
            }
            // A vsock connection the host gave up on before its Hello, or another process
            // without the token: take the next one.
            Err(error) if opener.can_retry() => {
                crate::console!("{error:#}; waiting for another connection");
            }
            Err(error) => return Err(error),
        }
    }
}

/// Connections after the host's, answered at once: more are closed unanswered.
const LATECOMERS: usize = 4;

/// Answer every connection that follows the host's with a refusal, so that another local
/// process that reaches the VM's socket learns at once that it cannot drive the agent (without
/// the token, or with it: one host per VM) instead of hanging in the listen backlog.
fn refuse_latecomers(mut opener: Opener, expected: Expected) {
    let answering = Arc::new(AtomicUsize::new(0));
    while let Ok(channel) = opener.next() {
        // A silent latecomer holds its thread until it closes; the count bounds them.
        if answering.fetch_add(1, Ordering::SeqCst) >= LATECOMERS {
            answering.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let expected = expected.clone();
        let answering = Arc::clone(&answering);
        thread::spawn(move || {
            // greet sends the refusal itself when the Hello lacks the token.
            if let Ok((_, writer)) = greet(channel, &expected) {
                fatal(
                    &writer,
                    &anyhow!(
                        "refused a second session: this VM already serves the host that started it"
                    ),
                );
            }
            answering.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Serve one session on an open channel.
#[cfg(test)]
fn serve(channel: Channel, notes: Vec<Note>) -> anyhow::Result<()> {
    let (reader, writer) = greet(channel, &Expected::Token(TEST_TOKEN.into()))?;
    serve_session(reader, writer, notes)
}

/// Exchange Hellos on a fresh channel.
fn greet(channel: Channel, expected: &Expected) -> anyhow::Result<(File, Writer)> {
    let Channel { mut reader, writer } = channel;
    let writer = Writer::new(writer);
    writer
        .send(&GuestMessage::Hello(GuestHello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            arch: std::env::consts::ARCH.into(),
            kernel: crate::init::kernel_release(),
        }))
        .context("sending Hello")?;
    if let Err(error) = handshake(&mut reader, expected) {
        fatal(&writer, &error);
        return Err(error);
    }
    Ok((reader, writer))
}

fn serve_session(mut reader: File, writer: Writer, notes: Vec<Note>) -> anyhow::Result<()> {
    *PANIC_WRITER.lock().unwrap_or_else(PoisonError::into_inner) = Some(writer.clone());
    for note in notes {
        writer.event(
            None,
            Event::Log {
                level: note.level,
                message: note.message,
            },
        );
    }

    let registry = Registry::default();
    let result = reader_loop(&mut reader, &writer, &registry);
    // Whatever ended the session, nothing it started keeps running.
    for active in lock(&registry).values() {
        active.cancel.cancel();
    }
    if let Err(error) = &result {
        fatal(&writer, error);
    }
    result
}

fn handshake(reader: &mut File, expected: &Expected) -> anyhow::Result<()> {
    let message = read_message::<HostMessage>(reader).context("reading the host's Hello")?;
    match message {
        Some(HostMessage::Hello(hello))
            if hello.protocol_version == PROTOCOL_VERSION && !expected.accepts(&hello.token) =>
        {
            Err(anyhow!(
                "refused a Hello without this VM's token: only the host that started the VM may drive it"
            ))
        }
        Some(HostMessage::Hello(hello)) if hello.protocol_version == PROTOCOL_VERSION => Ok(()),
        Some(HostMessage::Hello(hello)) => Err(anyhow!(
            "protocol version mismatch: host {} speaks version {}, agent {} speaks version {}",
            hello.host_version,
            hello.protocol_version,
            env!("CARGO_PKG_VERSION"),
            PROTOCOL_VERSION
        )),
        Some(other) => Err(anyhow!(
            "expected the host's Hello, got {}",
            message_kind(&other)
        )),
        None => Err(anyhow!("the host closed the channel before its Hello")),
    }
}

fn reader_loop(reader: &mut File, writer: &Writer, registry: &Registry) -> anyhow::Result<()> {
    loop {
        let message = read_message::<HostMessage>(reader).context("reading from the host")?;
        match message {
            None => {
                console!("the host closed the channel");
                return Ok(());
            }
            Some(HostMessage::Shutdown) => {
                console!("shutdown requested by the host");
                return Ok(());
            }
            Some(HostMessage::Request { id, request }) => {
                start_request(id, request, writer, registry)
            }
            Some(HostMessage::Cancel { id }) => match lock(registry).get(&id) {
                Some(active) => active.cancel.cancel(),
                None => writer.log(
                    Level::Debug,
                    format!("cancel of request {id}, which is not running"),
                ),
            },
            Some(HostMessage::Data { id, chunk }) => route(id, Incoming::Chunk(chunk), registry),
            Some(HostMessage::DataEnd { id, sha256 }) => route(id, Incoming::End(sha256), registry),
            Some(other @ (HostMessage::Hello(_) | HostMessage::Invalid)) => {
                writer.log(
                    Level::Warn,
                    format!("ignoring an unexpected {}", message_kind(&other)),
                );
            }
        }
    }
}

/// Hand file data to its request's thread (blocking when that thread is behind).
fn route(id: RequestId, incoming: Incoming, registry: &Registry) {
    let sender = lock(registry)
        .get(&id)
        .and_then(|active| active.incoming.clone());
    // Data for a request that already failed (or never took data) is dropped: the request's
    // response tells the host why.
    if let Some(sender) = sender {
        let _ = sender.send(incoming);
    } else if debug_enabled() {
        console!("dropping file data for request {id}, which is not receiving");
    }
}

fn start_request(id: RequestId, request: Request, writer: &Writer, registry: &Registry) {
    let mut active = lock(registry);
    if active.contains_key(&id) {
        drop(active);
        respond(
            writer,
            id,
            Err(RemoteError::new(format!(
                "request id {id} is already running"
            ))),
        );
        return;
    }
    let (sender, incoming) = match request {
        Request::PutFile { .. } => {
            let (sender, receiver) = mpsc::sync_channel(DATA_QUEUE);
            (Some(sender), Some(Mutex::new(receiver)))
        }
        _ => (None, None),
    };
    let cancel = Arc::new(CancelToken::default());
    active.insert(
        id,
        Active {
            cancel: cancel.clone(),
            incoming: sender,
        },
    );
    drop(active);

    let context = RequestContext {
        id,
        writer: writer.clone(),
        cancel,
        incoming,
    };
    let thread_registry = registry.clone();
    let spawned = thread::Builder::new()
        .name(format!("request-{id}"))
        .spawn(move || {
            if debug_enabled() {
                context.writer.log(
                    Level::Debug,
                    format!("request {id}: {}", describe(&request)),
                );
            }
            let result = dispatch(request, &context).map_err(|error| remote_error(&error));
            lock(&thread_registry).remove(&id);
            respond(&context.writer, id, result);
        });
    if let Err(error) = spawned {
        lock(registry).remove(&id);
        let error = anyhow!(error).context("starting a thread for the request");
        respond(writer, id, Err(remote_error(&error)));
    }
}

/// The thin dispatch: each request to its step module.
fn dispatch(request: Request, context: &RequestContext) -> anyhow::Result<Response> {
    match request {
        Request::Invalid => Err(anyhow!("invalid request")),
        Request::Ping => Ok(Response::Pong),
        Request::Exec(exec) => exec::run(exec, context),
        Request::PutFile { path, mode, size } => {
            files::put(&path, mode, size, context).with_context(|| format!("writing {path}"))
        }
        Request::GetFile { path } => {
            files::get(&path, context).with_context(|| format!("reading {path}"))
        }
        Request::ListDisks => {
            disks::list(std::path::Path::new(disks::SYS_BLOCK)).map(Response::Disks)
        }
        Request::MountScratch { serial, path } => {
            crate::scratch::mount_scratch(&serial, &path, context)
        }
        Request::BuildIso(build) => crate::iso::build(*build, context).map(Response::Iso),
        Request::CustomizeDisk(build) => {
            crate::disk::customize(*build, context).map(Response::Disk)
        }
        Request::Inspect { input_serial } => crate::inspect::inspect(&input_serial, context)
            .map(|inspection| Response::Inspection(Box::new(inspection))),
    }
}

fn respond(writer: &Writer, id: RequestId, result: Result<Response, RemoteError>) {
    match writer.send(&GuestMessage::Response { id, result }) {
        Ok(()) => {}
        Err(error @ ProtocolError::FrameTooLarge(_)) => {
            let error = RemoteError {
                context: vec![
                    "the response does not fit in a frame".into(),
                    error.to_string(),
                ],
            };
            respond(writer, id, Err(error));
        }
        Err(error) => console!("cannot send the response to request {id}: {error}"),
    }
}

fn fatal(writer: &Writer, error: &anyhow::Error) {
    console!("fatal: {error:#}");
    let _ = writer.send(&GuestMessage::Fatal(remote_error(error)));
}

/// The only conversion of a guest error into wire data: its context chain, outermost first,
/// with [`CANCELLED`] moved to the front when the request was cancelled.
pub fn remote_error(error: &anyhow::Error) -> RemoteError {
    let mut context: Vec<String> = error
        .chain()
        .filter(|cause| !cause.is::<Cancelled>())
        .map(ToString::to_string)
        .collect();
    if error.chain().any(|cause| cause.is::<Cancelled>()) {
        context.insert(0, CANCELLED.into());
    }
    RemoteError { context }
}

fn message_kind(message: &HostMessage) -> &'static str {
    match message {
        HostMessage::Invalid => "invalid message",
        HostMessage::Hello(_) => "Hello",
        HostMessage::Request { .. } => "Request",
        HostMessage::Cancel { .. } => "Cancel",
        HostMessage::Data { .. } => "Data",
        HostMessage::DataEnd { .. } => "DataEnd",
        HostMessage::Shutdown => "Shutdown",
    }
}

fn describe(request: &Request) -> String {
    match request {
        Request::Invalid => "invalid".into(),
        Request::Ping => "ping".into(),
        Request::Exec(exec) => format!("exec {:?}", exec.argv),
        Request::PutFile { path, size, .. } => format!("put {path} ({size} bytes)"),
        Request::GetFile { path } => format!("get {path}"),
        Request::ListDisks => "list disks".into(),
        Request::MountScratch { serial, path } => format!("mount scratch disk {serial} at {path}"),
        Request::BuildIso(build) => format!("build ISO from {}", build.input_serial),
        Request::CustomizeDisk(build) => format!("customize disk {}", build.input_serial),
        Request::Inspect { input_serial } => format!("inspect disk {input_serial}"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    use std::time::Instant;
    use vmic_protocol::{
        sha256, write_message, ExecRequest, ExecResult, HostHello, Sha256, Stream, CHUNK_LEN,
    };

    use super::*;

    /// The host's end of an in-process session.
    struct FakeHost {
        stream: UnixStream,
        agent: Option<thread::JoinHandle<anyhow::Result<()>>>,
    }

    impl FakeHost {
        /// Start an agent session; the agent's Hello is checked and answered with `version`.
        fn start_with_version(version: u32) -> FakeHost {
            let (host, agent) = UnixStream::pair().expect("socket pair");
            host.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let channel = Channel::from_file(File::from(OwnedFd::from(agent))).expect("channel");
            let agent = thread::spawn(move || serve(channel, Vec::new()));
            let mut host = FakeHost {
                stream: host,
                agent: Some(agent),
            };
            match host.recv() {
                GuestMessage::Hello(hello) => {
                    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
                    assert_eq!(hello.arch, std::env::consts::ARCH);
                    assert!(!hello.kernel.is_empty());
                }
                other => panic!("expected Hello, got {other:?}"),
            }
            host.send(&HostMessage::Hello(HostHello {
                protocol_version: version,
                host_version: "test".into(),
                token: TEST_TOKEN.into(),
            }));
            host
        }

        fn start() -> FakeHost {
            FakeHost::start_with_version(PROTOCOL_VERSION)
        }

        fn send(&mut self, message: &HostMessage) {
            write_message(&mut self.stream, message).expect("host write");
        }

        fn recv(&mut self) -> GuestMessage {
            read_message(&mut self.stream)
                .expect("host read")
                .expect("a message")
        }

        fn request(&mut self, id: RequestId, request: Request) {
            self.send(&HostMessage::Request { id, request });
        }

        /// Wait for the response to `id`, collecting what came before it.
        fn response(
            &mut self,
            id: RequestId,
        ) -> (Vec<GuestMessage>, Result<Response, RemoteError>) {
            let mut before = Vec::new();
            loop {
                match self.recv() {
                    GuestMessage::Response { id: got, result } if got == id => {
                        return (before, result)
                    }
                    other => before.push(other),
                }
            }
        }

        fn shutdown(mut self) -> anyhow::Result<()> {
            self.send(&HostMessage::Shutdown);
            self.agent
                .take()
                .expect("running")
                .join()
                .expect("agent thread")
        }
    }

    fn exec(argv: &[&str], stream_output: bool) -> Request {
        Request::Exec(ExecRequest {
            stream_output,
            ..ExecRequest::new(argv.iter().copied())
        })
    }

    #[test]
    fn hello_ping_and_shutdown() {
        let mut host = FakeHost::start();
        host.request(1, Request::Ping);
        assert_eq!(host.response(1).1, Ok(Response::Pong));
        host.shutdown().expect("clean shutdown");
    }

    #[test]
    fn host_closing_the_channel_ends_the_session() {
        let mut host = FakeHost::start();
        let agent = host.agent.take().expect("running");
        drop(host);
        agent.join().expect("agent thread").expect("clean end");
    }

    #[test]
    fn protocol_version_mismatch_is_fatal() {
        let mut host = FakeHost::start_with_version(PROTOCOL_VERSION + 41);
        match host.recv() {
            GuestMessage::Fatal(error) => {
                assert!(
                    error.to_string().contains("protocol version mismatch"),
                    "{error}"
                );
            }
            other => panic!("expected Fatal, got {other:?}"),
        }
        let agent = host.agent.take().expect("running");
        assert!(agent.join().expect("agent thread").is_err());
    }

    #[test]
    fn exec_streams_output_and_reports_exit_code() {
        let mut host = FakeHost::start();
        host.request(
            2,
            exec(&["sh", "-c", "echo out; echo err >&2; exit 3"], true),
        );
        let (events, result) = host.response(2);
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        for event in events {
            match event {
                GuestMessage::Event {
                    id: Some(2),
                    event: Event::Output { stream, data },
                } => match stream {
                    Stream::Stdout => stdout.extend(data),
                    Stream::Stderr => stderr.extend(data),
                },
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            (stdout.as_slice(), stderr.as_slice()),
            (&b"out\n"[..], &b"err\n"[..])
        );
        match result {
            Ok(Response::Exec(ExecResult {
                code: 3,
                signal: None,
                stdout,
                stderr,
            })) => {
                assert!(stdout.is_empty() && stderr.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
        host.shutdown().expect("clean shutdown");
    }

    #[test]
    fn exec_collects_output_with_env_and_cwd() {
        let mut host = FakeHost::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut request = ExecRequest::new(["sh", "-c", "echo $GREETING; pwd; kill -TERM $$"]);
        request.env = vec![("GREETING".into(), "hello".into())];
        request.cwd = Some(dir.path().to_string_lossy().into_owned());
        host.request(3, Request::Exec(request));
        match host.response(3).1 {
            Ok(Response::Exec(result)) => {
                let expected = format!(
                    "hello\n{}\n",
                    dir.path().canonicalize().expect("dir").display()
                );
                assert_eq!(String::from_utf8_lossy(&result.stdout), expected);
                assert_eq!(
                    (result.code, result.signal),
                    (128 + libc::SIGTERM, Some(libc::SIGTERM))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        host.shutdown().expect("clean shutdown");
    }

    #[test]
    fn exec_in_a_chroot_uses_cwd_inside_it() {
        let mut host = FakeHost::start();
        let mut request = ExecRequest::new(["pwd"]);
        request.chroot = Some("/".into());
        request.cwd = Some("/tmp".into());
        host.request(12, Request::Exec(request));
        let result = host.response(12).1;
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            match result {
                Ok(Response::Exec(result)) => assert_eq!(result.stdout, b"/tmp\n"),
                other => panic!("unexpected {other:?}"),
            }
        } else {
            // chroot(2) needs root: without it the request fails naming the root, it does
            // not run the program outside the chroot.
            let error = result.expect_err("chroot refused without root");
            assert_eq!(error.context[0], "running pwd in /", "{error}");
            assert!(
                error.to_string().contains("Operation not permitted"),
                "{error}"
            );
        }
        let mut request = ExecRequest::new(["true"]);
        request.chroot = Some("/nonexistent-root".into());
        host.request(13, Request::Exec(request));
        let error = host.response(13).1.expect_err("no such root");
        assert_eq!(error.context[0], "running true in /nonexistent-root");
        host.shutdown().expect("clean shutdown");
    }

    #[test]
    fn exec_of_a_missing_program_is_an_error_with_context() {
        let mut host = FakeHost::start();
        host.request(4, exec(&["/nonexistent/program"], false));
        let error = host.response(4).1.expect_err("spawn fails");
        assert_eq!(error.context[0], "running /nonexistent/program");
        assert!(error.context[1].contains("No such file"), "{error}");
        host.shutdown().expect("clean shutdown");
    }

    /// The pid a command wrote to `path` once it ran (written beside, then renamed into
    /// place): waiting on the file, not on a guessed delay, is what says the command runs.
    fn wait_for_pid_file(path: &std::path::Path) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                return text.trim().parse().expect("a pid");
            }
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Gone, or a zombie waiting for its parent (either way it runs no more), within `limit`:
    /// SIGKILL to a process group is delivered at once but a loaded machine may take a moment
    /// to schedule each member's exit.
    fn dies_within(pid: i32, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let dead = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| stat.contains(") Z "))
                .unwrap_or(true);
            if dead || Instant::now() > deadline {
                return dead;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn cancel_works_after_the_program_closed_its_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("sh.pid");
        let mut host = FakeHost::start();
        let script = format!(
            "exec >&- 2>&-; echo $$ > {0}.new; mv {0}.new {0}; sleep 30",
            pid_file.display()
        );
        host.request(11, exec(&["sh", "-c", &script], false));
        let pid = wait_for_pid_file(&pid_file);
        let start = Instant::now();
        host.send(&HostMessage::Cancel { id: 11 });
        let error = host.response(11).1.expect_err("cancelled");
        assert!(error.is_cancelled(), "{error}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            dies_within(pid, Duration::from_secs(2)),
            "the cancelled shell {pid} is dead"
        );
        host.shutdown().expect("clean shutdown");
    }

    #[test]
    fn cancel_kills_a_running_exec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("sleep.pid");
        let mut host = FakeHost::start();
        // The child of sh stays in the process group: cancelling must kill it too, or the
        // output pipe would stay open for 30 s.
        let script = format!(
            "sleep 30 & echo $! > {0}.new; mv {0}.new {0}; wait; echo done",
            pid_file.display()
        );
        host.request(5, exec(&["sh", "-c", &script], true));
        let sleep_pid = wait_for_pid_file(&pid_file);
        let start = Instant::now();
        host.send(&HostMessage::Cancel { id: 5 });
        let (before, result) = host.response(5);
        let error = result.expect_err("cancelled");
        assert!(error.is_cancelled(), "{error}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            dies_within(sleep_pid, Duration::from_secs(2)),
            "sh's child {sleep_pid} is dead"
        );
        // The script never got past `wait`.
        let printed: Vec<u8> = before
            .iter()
            .filter_map(|message| match message {
                GuestMessage::Event {
                    event: Event::Output { data, .. },
                    ..
                } => Some(data.as_slice()),
                _ => None,
            })
            .flatten()
            .copied()
            .collect();
        assert_eq!(printed, b"", "nothing printed after the cancel");
        host.shutdown().expect("clean shutdown");
    }

    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_u32;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    }

    fn put(
        host: &mut FakeHost,
        id: RequestId,
        path: &str,
        data: &[u8],
        digest: Sha256,
    ) -> Result<Response, RemoteError> {
        host.request(
            id,
            Request::PutFile {
                path: path.into(),
                mode: 0o640,
                size: data.len() as u64,
            },
        );
        for chunk in data.chunks(CHUNK_LEN) {
            host.send(&HostMessage::Data {
                id,
                chunk: chunk.to_vec(),
            });
        }
        host.send(&HostMessage::DataEnd { id, sha256: digest });
        host.response(id).1
    }

    #[test]
    fn put_and_get_round_trip() {
        let mut host = FakeHost::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("payload.bin");
        let path_text = path.to_string_lossy().into_owned();
        let data = pseudo_random(3 * CHUNK_LEN + 12345);
        let digest = sha256(&data);

        let put = put(&mut host, 6, &path_text, &data, digest);
        assert_eq!(
            put,
            Ok(Response::File {
                size: data.len() as u64,
                sha256: digest
            })
        );
        assert_eq!(std::fs::read(&path).expect("written"), data);
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o640);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temp file left"
        );

        host.request(7, Request::GetFile { path: path_text });
        let (before, result) = host.response(7);
        let mut received = Vec::new();
        let mut end = None;
        for message in before {
            match message {
                GuestMessage::Data { id: 7, chunk } => {
                    assert!(end.is_none() && chunk.len() <= CHUNK_LEN);
                    received.extend(chunk);
                }
                GuestMessage::DataEnd { id: 7, sha256 } => end = Some(sha256),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(received, data);
        assert_eq!(end, Some(digest));
        assert_eq!(
            result,
            Ok(Response::File {
                size: data.len() as u64,
                sha256: digest
            })
        );
        host.shutdown().expect("clean shutdown");
    }

    #[test]
    fn put_with_a_bad_sha256_is_rejected_and_leaves_nothing() {
        let mut host = FakeHost::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config");
        let error = put(&mut host, 8, &path.to_string_lossy(), b"content", [7; 32])
            .expect_err("digest mismatch");
        assert!(error.to_string().contains("sha256 mismatch"), "{error}");
        assert!(error.to_string().contains(&"07".repeat(32)), "{error}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);

        // A failed PutFile (missing directory) answers early; its trailing data is dropped and
        // the session goes on.
        let missing = dir.path().join("no/such/dir/file");
        let error = put(
            &mut host,
            9,
            &missing.to_string_lossy(),
            &[1; 3 * CHUNK_LEN],
            [0; 32],
        )
        .expect_err("no directory");
        assert!(error.context[0].starts_with("writing "), "{error}");
        host.request(10, Request::Ping);
        assert_eq!(host.response(10).1, Ok(Response::Pong));
        host.shutdown().expect("clean shutdown");
    }

    #[test]
    fn remote_errors_carry_the_chain_with_cancellation_first() {
        let error = anyhow::Error::from(Cancelled).context("running sleep");
        let remote = remote_error(&error);
        assert!(remote.is_cancelled());
        assert_eq!(remote.context, [CANCELLED, "running sleep"]);
        let error = anyhow!("inner").context("middle").context("outer");
        assert_eq!(remote_error(&error).context, ["outer", "middle", "inner"]);
    }

    #[test]
    fn a_hello_without_the_token_is_refused() {
        for token in [String::new(), "0".repeat(TEST_TOKEN.len())] {
            let (mut host, agent) = UnixStream::pair().expect("socket pair");
            host.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let channel = Channel::from_file(File::from(OwnedFd::from(agent))).expect("channel");
            let agent = thread::spawn(move || serve(channel, Vec::new()));
            let hello: GuestMessage = read_message(&mut host).expect("read").expect("hello");
            assert!(matches!(hello, GuestMessage::Hello(_)));
            write_message(
                &mut host,
                &HostMessage::Hello(HostHello {
                    protocol_version: PROTOCOL_VERSION,
                    host_version: "intruder".into(),
                    token,
                }),
            )
            .expect("write");
            // Whatever follows the refused Hello is never served.
            let _ = write_message(
                &mut host,
                &HostMessage::Request {
                    id: 1,
                    request: vmic_protocol::Request::Ping,
                },
            );
            match read_message::<GuestMessage>(&mut host).expect("read") {
                Some(GuestMessage::Fatal(error)) => {
                    assert!(error.context.join(" ").contains("token"), "{error:?}")
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            let served = agent.join().expect("agent thread");
            assert!(served.is_err(), "the session was refused");
            // Then the agent hangs up (an end of stream, or a reset for the unread Ping).
            assert!(!matches!(
                read_message::<GuestMessage>(&mut host),
                Ok(Some(_))
            ));
        }
    }
}
