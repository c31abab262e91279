//! The host session against a scripted hostile agent (no QEMU): an in-process peer speaking
//! the protocol over an in-memory pipe sends what a compromised guest could. The host must
//! stay within its memory bound, fail with a clear message and let go of the channel.
//!
//! Time is tokio's paused clock: a timer fires only once every task is blocked, so "the
//! host stopped reading" and "the agent went silent for 30 s" are events, not sleeps.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use vmic::report::Reporter;
use vmic::session::{Session, MAX_GUEST_LINE, REQUEST_QUEUE_LEN};
use vmic::transport::Connection;
use vmic_protocol::{
    self as protocol, Event, GuestHello, GuestMessage, HostMessage, IsoOutcome, Level, Request,
    Response, Stream,
};

/// Counts live heap bytes and their peak, so the tests measure the host's memory bound.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `dealloc`'s contract, passed on as is.
        unsafe { System.dealloc(pointer, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1 << 20;

/// Peak heap growth over the live bytes at the start of `work`. The tests in this file run one
/// at a time (a mutex), so the counters see only one of them.
async fn peak_growth<T>(work: impl std::future::Future<Output = T>) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let value = work.await;
    (value, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The hostile agent's end of the channel.
struct Agent {
    reader: ReadHalf<DuplexStream>,
    writer: WriteHalf<DuplexStream>,
}

impl Agent {
    async fn send(&mut self, message: &GuestMessage) {
        let frame = protocol::encode(message).expect("encode");
        self.writer.write_all(&frame).await.expect("agent write");
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("agent write");
    }

    /// The next host message, `None` once the host let go of the channel.
    async fn receive(&mut self) -> Option<HostMessage> {
        let mut header = [0u8; 4];
        self.reader.read_exact(&mut header).await.ok()?;
        let mut body = vec![0u8; protocol::frame_len(header).expect("host frame")];
        self.reader.read_exact(&mut body).await.expect("host body");
        Some(protocol::decode(&body).expect("host message"))
    }

    /// Says hello and reads the host's, as a well-behaved agent would (the attack follows).
    async fn greet(&mut self) {
        self.send(&GuestMessage::Hello(GuestHello {
            protocol_version: protocol::PROTOCOL_VERSION,
            agent_version: "hostile".into(),
            arch: "x86_64".into(),
            kernel: "6.1.0".into(),
        }))
        .await;
        assert!(matches!(self.receive().await, Some(HostMessage::Hello(_))));
    }

    /// Waits for a request and returns its id.
    async fn request(&mut self) -> u64 {
        match self.receive().await {
            Some(HostMessage::Request { id, .. }) => id,
            other => panic!("expected a request, got {other:?}"),
        }
    }
}

/// A greeted session and the hostile agent behind it (64 KiB of pipe between them, like a
/// socket buffer).
async fn session() -> (Session, Agent) {
    let (host_end, agent_end) = tokio::io::duplex(64 * 1024);
    let (host_reader, host_writer) = tokio::io::split(host_end);
    let (reader, writer) = tokio::io::split(agent_end);
    let mut agent = Agent { reader, writer };
    let connection = Connection {
        reader: Box::pin(host_reader),
        writer: Box::pin(host_writer),
    };
    let (session, ()) = tokio::join!(
        Session::handshake(connection, "hostile-test-token", Reporter::plain()),
        agent.greet()
    );
    (session.expect("handshake"), agent)
}

/// Lets every task run until all are blocked (the paused clock only advances then).
async fn until_quiet() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn oversized_frame_length_fails_the_request_without_allocating_it() {
    let _serial = SERIAL.lock().await;
    let (session, mut agent) = session().await;
    let mut handle = session.start(Request::Ping).await.expect("start");
    agent.request().await;
    let (error, growth) = peak_growth(async {
        agent.raw(&u32::MAX.to_le_bytes()).await;
        handle.finish(|_| {}).await.expect_err("oversized frame")
    })
    .await;
    let message = format!("{error:#}");
    assert!(
        message.contains("lost the builder VM's agent during ping")
            && message.contains("frame of 4294967295 bytes exceeds the 2097152-byte limit"),
        "{message}"
    );
    assert!(growth < MIB, "{growth} bytes for a refused frame");
    // Later requests fail at once with the same reason.
    let later = session.start(Request::Ping).await.err().expect("lost");
    assert!(format!("{later:#}").contains("exceeds the 2097152-byte limit"));
    // The host let go of the channel: the agent reads its end.
    drop(handle);
    drop(session);
    assert!(agent.receive().await.is_none());

    // The same as the first frame, before the hello.
    let (host_end, agent_end) = tokio::io::duplex(1024);
    let (host_reader, host_writer) = tokio::io::split(host_end);
    let (_agent_reader, mut agent_writer) = tokio::io::split(agent_end);
    agent_writer
        .write_all(&(protocol::MAX_FRAME_LEN as u32 + 1).to_le_bytes())
        .await
        .expect("write");
    let error = Session::handshake(
        Connection {
            reader: Box::pin(host_reader),
            writer: Box::pin(host_writer),
        },
        "hostile-test-token",
        Reporter::plain(),
    )
    .await
    .err()
    .expect("refused hello");
    assert!(
        format!("{error:#}").contains("reading the agent's hello: frame of 2097153 bytes"),
        "{error:#}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_output_waits_in_the_channel_not_in_host_memory() {
    let _serial = SERIAL.lock().await;
    let (session, mut agent) = session().await;
    let mut handle = session.start(Request::Ping).await.expect("start");
    let id = agent.request().await;
    const FLOOD: usize = 256;
    let chunk = vec![b'x'; MIB];
    let flood = async move {
        for _ in 0..FLOOD {
            agent
                .send(&GuestMessage::Event {
                    id: Some(id),
                    event: Event::Output {
                        stream: Stream::Stdout,
                        data: chunk.clone(),
                    },
                })
                .await;
        }
        // A log line far over the cap, then the answer.
        agent
            .send(&GuestMessage::Event {
                id: Some(id),
                event: Event::Log {
                    level: Level::Info,
                    message: "é".repeat(MIB / 2),
                },
            })
            .await;
        agent
            .send(&GuestMessage::Response {
                id,
                result: Ok(Response::Pong),
            })
            .await;
        agent
    };
    let mut flood = tokio::spawn(flood);
    // The host does not read its events yet: the agent must end up blocked, its 256 MiB
    // neither sent nor buffered by the host.
    let ((), growth) = peak_growth(until_quiet()).await;
    assert!(!flood.is_finished(), "the host took the whole flood in");
    let bound = (REQUEST_QUEUE_LEN + 8) * MIB;
    assert!(growth < bound, "{growth} bytes queued, bound {bound}");

    let mut output = 0usize;
    let mut log = None;
    let (response, growth) = peak_growth(handle.finish(|event| match event {
        Event::Output { data, .. } => output += data.len(),
        Event::Log { message, .. } => log = Some(message),
        _ => {}
    }))
    .await;
    assert_eq!(response.expect("answered"), Response::Pong);
    assert_eq!(output, FLOOD * MIB, "events lost");
    assert!(
        growth < bound,
        "{growth} bytes while draining, bound {bound}"
    );
    let log = log.expect("log line");
    assert!(
        log.len() <= MAX_GUEST_LINE + 64,
        "log line of {} bytes",
        log.len()
    );
    assert!(
        log.ends_with("more bytes cut)"),
        "{}",
        &log[log.len() - 40..]
    );
    (&mut flood).await.expect("flood task");
}

#[tokio::test(start_paused = true)]
async fn half_a_frame_then_silence_fails_after_the_frame_timeout() {
    let _serial = SERIAL.lock().await;
    let (session, mut agent) = session().await;
    let mut handle = session.start(Request::Ping).await.expect("start");
    agent.request().await;
    let started = tokio::time::Instant::now();
    agent.raw(&100u32.to_le_bytes()).await;
    agent.raw(&[1; 10]).await;
    let error = handle.finish(|_| {}).await.expect_err("silence");
    let waited = started.elapsed();
    assert!(
        format!("{error:#}").contains(
            "lost the builder VM's agent during ping: the channel failed: the agent sent the \
             start of a 100-byte message and then nothing for 30s"
        ),
        "{error:#}"
    );
    assert!(
        waited >= vmic::session::FRAME_BODY_TIMEOUT && waited < Duration::from_secs(31),
        "{waited:?}"
    );
    drop(handle);
    drop(session);
    assert!(agent.receive().await.is_none(), "the host kept the channel");
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_answers_is_cancelled_at_the_deadline() {
    let _serial = SERIAL.lock().await;
    let (session, mut agent) = session().await;
    let mut handle = session.start(Request::Ping).await.expect("start");
    let id = agent.request().await;
    let error = handle
        .finish_within(Duration::from_secs(600), |_| {})
        .await
        .expect_err("no answer");
    assert_eq!(format!("{error:#}"), "ping timed out after 600s");
    // The host asked the agent to stop the request, then let go of the channel.
    assert_eq!(agent.receive().await, Some(HostMessage::Cancel { id }));
    drop(handle);
    drop(session);
    assert!(agent.receive().await.is_none(), "the host kept the channel");
}

/// A guest error chain of 1000 lines of 1 MiB each reaches the user cut down.
#[tokio::test(start_paused = true)]
async fn a_huge_guest_error_is_cut() {
    let _serial = SERIAL.lock().await;
    let (session, mut agent) = session().await;
    let mut handle = session.start(Request::Ping).await.expect("start");
    let id = agent.request().await;
    // One frame holds at most 2 MiB, so the chain is many short lines plus one long one.
    let mut context: Vec<String> = (0..1000).map(|i| format!("context {i}")).collect();
    context.push("y".repeat(MIB));
    agent
        .send(&GuestMessage::Response {
            id,
            result: Err(protocol::RemoteError { context }),
        })
        .await;
    let error = handle.finish(|_| {}).await.expect_err("guest error");
    let rendered = vmic::report::render_error(&error);
    assert!(
        rendered.len() < 16 * 1024,
        "{} bytes of error",
        rendered.len()
    );
    assert!(rendered.contains("context 0"), "{rendered}");
    assert!(
        rendered.contains("more lines of the guest's error cut"),
        "{rendered}"
    );
    assert!(rendered.contains("more bytes cut)"), "{rendered}");
}

/// The build's ISO acceptance against what the agent claims in its `Iso` response.
#[tokio::test(start_paused = true)]
async fn claimed_iso_sizes_and_digests_are_checked_before_the_rename() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join(".out.iso.vmic-partial");
    let disk_size: u64 = 4 * MIB as u64;
    let mut iso = vec![0u8; MIB];
    iso[32769..32774].copy_from_slice(b"CD001");
    let digest = protocol::sha256(&iso);
    let mut content = iso.clone();
    content.resize(disk_size as usize, 0);
    let mut unsigned = content.clone();
    unsigned[32769..32774].copy_from_slice(b"XXXXX");
    let huge = 1u64 << 50;
    // (the disk the guest left, the size and digest it claims, what the host says)
    let cases = [
        (
            &content,
            huge,
            digest,
            "reported a 1125899906842624-byte ISO, more than the 4194304-byte output disk",
        ),
        (
            &content,
            iso.len() as u64,
            [9; 32],
            "the ISO copied out of the builder VM is corrupted",
        ),
        // A right digest does not make the disk an ISO.
        (
            &unsigned,
            disk_size,
            protocol::sha256(&unsigned),
            "is not an ISO 9660 image",
        ),
    ];
    for (written, size, sha256, expected) in cases {
        fs_err::write(&disk, written).expect("disk");
        let (session, mut agent) = session().await;
        let mut handle = session.start(Request::Ping).await.expect("start");
        let id = agent.request().await;
        agent
            .send(&GuestMessage::Response {
                id,
                result: Ok(Response::Iso(IsoOutcome {
                    size,
                    sha256,
                    rootfs_sha256: [0; 32],
                    steps: Vec::new(),
                    packages: Default::default(),
                    source_date_epoch: 0,
                })),
            })
            .await;
        let Response::Iso(outcome) = handle.finish(|_| {}).await.expect("response") else {
            panic!("not an ISO outcome");
        };
        let error = vmic::accept::accept_iso(&disk, disk_size, outcome.size, &outcome.sha256)
            .expect_err("refused");
        assert!(error.to_string().contains(expected), "{error}");
        assert!(fs_err::metadata(&disk).expect("disk").len() <= disk_size);
    }
    // And the honest answer is accepted, the disk cut to the ISO.
    fs_err::write(&disk, &content).expect("disk");
    let accepted =
        vmic::accept::accept_iso(&disk, disk_size, iso.len() as u64, &digest).expect("honest ISO");
    assert_eq!(accepted, digest);
    assert_eq!(
        fs_err::metadata(&disk).expect("disk").len(),
        iso.len() as u64
    );
}
