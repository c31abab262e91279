//! A session with the guest agent: handshake, requests with ids, events, file transfer,
//! cancellation, and turning guest failures into host errors with the guest's context.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use vmic_protocol::{
    self as protocol, Event, ExecRequest, ExecResult, GuestHello, GuestMessage, HostHello,
    HostMessage, RemoteError, Request, RequestId, Response, Stream, CHUNK_LEN,
};

use crate::transport::Connection;

/// What the agent sent for one request, routed by id.
#[derive(Debug)]
enum Incoming {
    Event(Event),
    Data(Vec<u8>),
    DataEnd(protocol::Sha256),
    Done(Result<Response, RemoteError>),
    /// The channel closed or the agent reported a fatal error.
    Lost(String),
}

/// A failure reported by the guest: its context chain, outermost first.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.context.first().map(String::as_str).unwrap_or("guest failure"))]
pub struct GuestError(pub RemoteError);

/// The channel to the agent closed or it crashed while a request was in flight.
#[derive(Debug, thiserror::Error)]
#[error("lost the builder VM's agent during {request}: {reason}")]
pub struct AgentLost {
    pub request: String,
    pub reason: String,
}

/// Turn a guest error chain into an anyhow chain, so the host renders it as `caused by:` lines.
pub fn guest_error(error: RemoteError) -> anyhow::Error {
    let mut lines: Vec<String> = error
        .context
        .iter()
        .map(|line| cap_guest_text(line).into_owned())
        .collect();
    let innermost = lines.pop().unwrap_or_else(|| "guest failure".to_string());
    if lines.len() > MAX_GUEST_ERROR_LINES - 1 {
        let cut = lines.len() - (MAX_GUEST_ERROR_LINES - 1);
        lines.truncate(MAX_GUEST_ERROR_LINES - 1);
        lines.push(format!("({cut} more lines of the guest's error cut)"));
    }
    let mut chain = anyhow!("{innermost}");
    while let Some(line) = lines.pop() {
        chain = chain.context(line);
    }
    chain.context("the builder VM reported a failure")
}

type Pending = Arc<Mutex<HashMap<RequestId, mpsc::Sender<Incoming>>>>;

/// Messages queued per request before the reader stops reading the channel: a flood from the
/// guest then waits in the transport instead of the host's memory (at most this many frames of
/// [`protocol::MAX_FRAME_LEN`] each, per request).
pub const REQUEST_QUEUE_LEN: usize = 16;
/// Once a frame's length arrived, its body must follow within this time: a guest that sends
/// half a frame and goes silent fails the session instead of holding it forever. Generous:
/// a full frame takes milliseconds even under TCG.
pub const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest guest text (a log line, an error context line) the host keeps; the rest is cut.
pub const MAX_GUEST_LINE: usize = 4096;
/// Most lines of a guest error chain the host keeps (the innermost is always kept).
pub const MAX_GUEST_ERROR_LINES: usize = 32;

/// `text` cut to at most [`MAX_GUEST_LINE`] bytes on a character boundary, saying how much
/// was cut: guest text is untrusted and ends up in logs and error messages.
pub fn cap_guest_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_GUEST_LINE {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = MAX_GUEST_LINE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}… ({} more bytes cut)",
        &text[..end],
        text.len() - end
    ))
}

pub struct Session {
    hello: GuestHello,
    writer: Arc<tokio::sync::Mutex<Pin<Box<dyn AsyncWrite + Send>>>>,
    pending: Pending,
    /// Set once the channel is gone; later requests fail at once with this reason.
    lost: Arc<Mutex<Option<String>>>,
    next_id: Mutex<RequestId>,
    reader_task: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader_task.abort();
    }
}

async fn read_frame<M: protocol::Message>(
    reader: &mut (impl AsyncRead + Unpin),
) -> anyhow::Result<Option<M>> {
    let mut header = [0u8; 4];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let len = protocol::frame_len(header)?;
    let mut body = vec![0u8; len];
    tokio::time::timeout(FRAME_BODY_TIMEOUT, reader.read_exact(&mut body))
        .await
        .map_err(|_| {
            anyhow!(
                "the agent sent the start of a {len}-byte message and then nothing for {}s",
                FRAME_BODY_TIMEOUT.as_secs()
            )
        })??;
    Ok(Some(protocol::decode(&body)?))
}

impl Session {
    /// Wait for the agent's hello, check the protocol version, answer with ours and the
    /// build's token (the agent refuses a Hello without it). What the guest says outside any
    /// request goes to `reporter`.
    pub async fn handshake(
        connection: Connection,
        token: &str,
        reporter: crate::report::Reporter,
    ) -> anyhow::Result<Session> {
        let Connection {
            mut reader,
            mut writer,
        } = connection;
        let hello = match read_frame::<GuestMessage>(&mut reader)
            .await
            .context("reading the agent's hello")?
            .map(inert_message)
        {
            Some(GuestMessage::Hello(hello)) => hello,
            Some(GuestMessage::Fatal(error)) => return Err(guest_error(error)),
            Some(other) => bail!("expected the agent's hello, got {other:?}"),
            None => bail!("the agent closed the channel before saying hello"),
        };
        let supported = protocol::MIN_PROTOCOL_VERSION..=protocol::PROTOCOL_VERSION;
        if !supported.contains(&hello.protocol_version) {
            return Err(crate::report::hinted(
                format!(
                    "protocol mismatch: the guest agent {} speaks protocol version {}, this vmic speaks {}..={}",
                    hello.agent_version,
                    hello.protocol_version,
                    supported.start(),
                    supported.end()
                ),
                "rebuild the builder VM image with `scripts/build-guest-image` so agent and host match",
            ));
        }
        let frame = protocol::encode(&HostMessage::Hello(HostHello {
            protocol_version: protocol::PROTOCOL_VERSION,
            host_version: env!("CARGO_PKG_VERSION").to_string(),
            token: token.to_string(),
        }))?;
        writer.write_all(&frame).await?;
        writer.flush().await?;

        let pending: Pending = Arc::default();
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let reader_task = tokio::spawn(route_messages(
            reader,
            pending.clone(),
            lost.clone(),
            reporter,
        ));
        Ok(Session {
            hello,
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            pending,
            lost,
            next_id: Mutex::new(1),
            reader_task,
        })
    }

    pub fn hello(&self) -> &GuestHello {
        &self.hello
    }

    async fn send(&self, message: &HostMessage) -> anyhow::Result<()> {
        let frame = protocol::encode(message)?;
        let mut writer = self.writer.lock().await;
        writer
            .write_all(&frame)
            .await
            .context("writing to the agent")?;
        writer.flush().await.context("writing to the agent")?;
        Ok(())
    }

    /// Send a request; the returned handle receives its events, data and response.
    pub async fn start(&self, request: Request) -> anyhow::Result<RequestHandle<'_>> {
        let id = {
            let mut next = self.next_id.lock().expect("id lock is never poisoned");
            let id = *next;
            *next += 1;
            id
        };
        let (sender, receiver) = mpsc::channel(REQUEST_QUEUE_LEN);
        if let Some(reason) = self.lost.lock().expect("lost lock").clone() {
            return Err(AgentLost {
                request: describe(&request),
                reason,
            }
            .into());
        }
        self.pending
            .lock()
            .expect("pending lock")
            .insert(id, sender);
        let description = describe(&request);
        self.send(&HostMessage::Request { id, request }).await?;
        Ok(RequestHandle {
            session: self,
            id,
            description,
            receiver,
        })
    }

    /// Run a command; `on_output` sees streamed output. A non-zero exit is returned, not failed.
    pub async fn exec(
        &self,
        request: ExecRequest,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> anyhow::Result<ExecResult> {
        let mut handle = self.start(Request::Exec(request)).await?;
        match handle
            .finish(|event| {
                if let Event::Output { stream, data } = event {
                    on_output(stream, &data);
                }
            })
            .await?
        {
            Response::Exec(result) => Ok(result),
            other => bail!("unexpected response to exec: {other:?}"),
        }
    }

    /// Run a command and fail unless it exits 0 (its stderr becomes the error).
    pub async fn run(&self, argv: &[&str]) -> anyhow::Result<ExecResult> {
        let result = self
            .exec(ExecRequest::new(argv.iter().copied()), |_, _| {})
            .await?;
        if result.code != 0 {
            bail!(
                "`{}` in the builder VM exited with {}: {}",
                argv.join(" "),
                result.code,
                String::from_utf8_lossy(&result.stderr).trim()
            );
        }
        Ok(result)
    }

    /// Copy a host file into the guest; the agent verifies size and sha256.
    pub async fn put_file(&self, local: &Path, remote: &str, mode: u32) -> anyhow::Result<()> {
        self.put_file_within(local, remote, mode, u64::MAX).await
    }

    /// [`Session::put_file`], sending at most `limit` bytes: a file that grew after the plan
    /// counted it sends what was counted.
    pub async fn put_file_within(
        &self,
        local: &Path,
        remote: &str,
        mode: u32,
        limit: u64,
    ) -> anyhow::Result<()> {
        let file = tokio::fs::File::open(local)
            .await
            .with_context(|| format!("opening {}", local.display()))?;
        let size = file.metadata().await?.len().min(limit);
        // A file that grows while it is sent sends what it held when opened: the size the
        // agent was told.
        let mut file = file.take(size);
        let mut handle = self
            .start(Request::PutFile {
                path: remote.to_string(),
                mode,
                size,
            })
            .await?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; CHUNK_LEN];
        loop {
            let read = file.read(&mut buffer).await?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            self.send(&HostMessage::Data {
                id: handle.id,
                chunk: buffer[..read].to_vec(),
            })
            .await?;
        }
        let sha256: protocol::Sha256 = hasher.finalize().into();
        self.send(&HostMessage::DataEnd {
            id: handle.id,
            sha256,
        })
        .await?;
        match handle.finish(|_| {}).await? {
            Response::File {
                size: got_size,
                sha256: got,
            } if got_size == size && got == sha256 => Ok(()),
            other => bail!(
                "the agent stored {remote} differently than sent ({size} bytes, sha256 {}): {other:?}",
                protocol::hex_digest(&sha256)
            ),
        }
    }

    /// Copy a guest file to `local`, verifying its sha256; returns the digest.
    pub async fn get_file(&self, remote: &str, local: &Path) -> anyhow::Result<protocol::Sha256> {
        let mut file = tokio::fs::File::create(local)
            .await
            .with_context(|| format!("creating {}", local.display()))?;
        let mut handle = self
            .start(Request::GetFile {
                path: remote.to_string(),
            })
            .await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut announced = None;
        let response = loop {
            match handle.next().await? {
                Incoming::Data(chunk) => {
                    hasher.update(&chunk);
                    size += chunk.len() as u64;
                    file.write_all(&chunk).await?;
                }
                Incoming::DataEnd(digest) => announced = Some(digest),
                Incoming::Event(_) => {}
                Incoming::Done(result) => break result.map_err(guest_error)?,
                Incoming::Lost(reason) => return Err(handle.lost(reason)),
            }
        };
        file.sync_all().await?;
        let digest: protocol::Sha256 = hasher.finalize().into();
        match (response, announced) {
            (Response::File { size: sent, sha256 }, Some(end))
                if sent == size && sha256 == digest && end == digest =>
            {
                Ok(digest)
            }
            (response, _) => bail!(
                "{remote} arrived corrupted: received {size} bytes with sha256 {}, the agent announced {response:?}",
                protocol::hex_digest(&digest)
            ),
        }
    }

    /// Ask the agent to power the VM off.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        self.send(&HostMessage::Shutdown).await
    }

    /// Why the channel is gone, if it is.
    pub fn lost_reason(&self) -> Option<String> {
        self.lost.lock().expect("lost lock").clone()
    }
}

fn describe(request: &Request) -> String {
    match request {
        Request::Exec(exec) => format!("exec `{}`", exec.argv.join(" ")),
        Request::PutFile { path, .. } => format!("upload of {path}"),
        Request::GetFile { path } => format!("download of {path}"),
        Request::Ping => "ping".to_string(),
        Request::ListDisks => "disk listing".to_string(),
        Request::MountScratch { serial, .. } => format!("scratch disk {serial} setup"),
        Request::BuildIso(_) => "the ISO build".to_string(),
        Request::CustomizeDisk(_) => "the disk customization".to_string(),
        Request::Inspect { .. } => "the inspection".to_string(),
        Request::Invalid => "invalid request".to_string(),
    }
}

/// Reads every message from the agent and hands it to the request it belongs to.
async fn route_messages(
    mut reader: Pin<Box<dyn AsyncRead + Send>>,
    pending: Pending,
    lost: Arc<Mutex<Option<String>>>,
    reporter: crate::report::Reporter,
) {
    let reason = loop {
        let message = match read_frame::<GuestMessage>(&mut reader).await {
            Ok(Some(message)) => inert_message(message),
            Ok(None) => break "the channel closed (agent exited or VM stopped)".to_string(),
            Err(error) => break format!("the channel failed: {error:#}"),
        };
        let message = cap_log_event(message);
        let (id, incoming) = match message {
            GuestMessage::Response { id, result } => (id, Incoming::Done(result)),
            GuestMessage::Data { id, chunk } => (id, Incoming::Data(chunk)),
            GuestMessage::DataEnd { id, sha256 } => (id, Incoming::DataEnd(sha256)),
            GuestMessage::Event {
                id: Some(id),
                event,
            } => (id, Incoming::Event(event)),
            GuestMessage::Event { id: None, event } => {
                log_guest_event(&event, &reporter);
                continue;
            }
            GuestMessage::Fatal(error) => {
                break format!(
                    "the agent failed fatally: {}",
                    cap_guest_text(&error.to_string())
                )
            }
            GuestMessage::Hello(_) | GuestMessage::Invalid => {
                break "the agent sent a second hello".to_string()
            }
        };
        let done = matches!(incoming, Incoming::Done(_));
        let sender = {
            let mut map = pending.lock().expect("pending lock");
            if done {
                map.remove(&id)
            } else {
                map.get(&id).cloned()
            }
        };
        // Waits while the request's queue is full: back-pressure onto the guest. A request
        // nobody waits for any more (handle dropped) fails the send and its messages are dropped.
        if let Some(sender) = sender {
            let _ = sender.send(incoming).await;
        }
    };
    tracing::debug!("agent channel ended: {reason}");
    *lost.lock().expect("lost lock") = Some(reason.clone());
    let senders: Vec<_> = pending
        .lock()
        .expect("pending lock")
        .drain()
        .map(|(_, sender)| sender)
        .collect();
    // A full queue does not get the Lost message, but dropping its sender here ends it, and
    // the handle then reads the reason from `lost`.
    for sender in senders {
        let _ = sender.try_send(Incoming::Lost(reason.clone()));
    }
}

/// Guest log lines cut to [`MAX_GUEST_LINE`] before anything prints or queues them.
fn cap_log_event(message: GuestMessage) -> GuestMessage {
    match message {
        GuestMessage::Event {
            id,
            event: Event::Log { level, message },
        } if message.len() > MAX_GUEST_LINE => GuestMessage::Event {
            id,
            event: Event::Log {
                level,
                message: cap_guest_text(&message).into_owned(),
            },
        },
        other => other,
    }
}

/// The guest's text made inert at the door, so that no later printer can forget it. Output
/// bytes stay as sent (callers may parse them); whoever prints them makes them inert.
fn inert_message(message: GuestMessage) -> GuestMessage {
    use crate::inert::{inert, inert_line};
    let error = |error: RemoteError| RemoteError {
        context: error
            .context
            .iter()
            .map(|line| inert(line).into_owned())
            .collect(),
    };
    match message {
        GuestMessage::Hello(hello) => GuestMessage::Hello(GuestHello {
            agent_version: inert_line(&hello.agent_version).into_owned(),
            arch: inert_line(&hello.arch).into_owned(),
            kernel: inert_line(&hello.kernel).into_owned(),
            ..hello
        }),
        GuestMessage::Response {
            id,
            result: Err(failure),
        } => GuestMessage::Response {
            id,
            result: Err(error(failure)),
        },
        GuestMessage::Fatal(failure) => GuestMessage::Fatal(error(failure)),
        GuestMessage::Event {
            id,
            event: Event::Log { level, message },
        } => GuestMessage::Event {
            id,
            event: Event::Log {
                level,
                message: inert(&message).into_owned(),
            },
        },
        // Progress carries a typed `Step`: nothing of the guest's text to clean.
        other => other,
    }
}

fn log_guest_event(event: &Event, reporter: &crate::report::Reporter) {
    use crate::report::Source::Guest;
    match event {
        Event::Log { level, message } => match level {
            protocol::Level::Error => reporter.guest_error(message),
            protocol::Level::Warn => reporter.warn(Guest, message),
            protocol::Level::Info => reporter.note(Guest, message),
            protocol::Level::Debug => tracing::debug!(target: "vmic::guest", "{message}"),
            protocol::Level::Trace => tracing::trace!(target: "vmic::guest", "{message}"),
        },
        Event::Progress { step, done, total } => {
            tracing::debug!(target: "vmic::guest", step = step.title(), done, total, "progress")
        }
        Event::Output { .. } | Event::Invalid => {}
    }
}

/// One request in flight.
pub struct RequestHandle<'a> {
    session: &'a Session,
    pub id: RequestId,
    description: String,
    receiver: mpsc::Receiver<Incoming>,
}

impl RequestHandle<'_> {
    async fn next(&mut self) -> anyhow::Result<Incoming> {
        match self.receiver.recv().await {
            Some(incoming) => Ok(incoming),
            None => Err(self.lost(
                self.session
                    .lost_reason()
                    .unwrap_or_else(|| "the session ended".to_string()),
            )),
        }
    }

    fn lost(&self, reason: String) -> anyhow::Error {
        AgentLost {
            request: self.description.clone(),
            reason,
        }
        .into()
    }

    /// Ask the agent to stop this request; its response then reports the cancellation.
    pub async fn cancel(&self) -> anyhow::Result<()> {
        self.session
            .send(&HostMessage::Cancel { id: self.id })
            .await
    }

    /// The request's next event; an error if it finished or was lost first. Lets a caller wait
    /// for something the request does (a line of output) instead of sleeping.
    pub async fn next_event(&mut self) -> anyhow::Result<Event> {
        loop {
            match self.next().await? {
                Incoming::Event(event) => return Ok(event),
                Incoming::Data(_) | Incoming::DataEnd(_) => {}
                Incoming::Done(_) => {
                    bail!("{} finished before the event waited for", self.description)
                }
                Incoming::Lost(reason) => return Err(self.lost(reason)),
            }
        }
    }

    /// Wait for the response, passing events to `on_event`.
    pub async fn finish(&mut self, mut on_event: impl FnMut(Event)) -> anyhow::Result<Response> {
        loop {
            match self.next().await? {
                Incoming::Event(event) => on_event(event),
                Incoming::Data(_) | Incoming::DataEnd(_) => {}
                Incoming::Done(result) => {
                    return result
                        .map_err(guest_error)
                        .with_context(|| format!("{} in the builder VM", self.description))
                }
                Incoming::Lost(reason) => return Err(self.lost(reason)),
            }
        }
    }

    /// Like [`finish`](Self::finish) but gives up after `timeout`, cancelling the request.
    pub async fn finish_within(
        &mut self,
        timeout: Duration,
        on_event: impl FnMut(Event),
    ) -> anyhow::Result<Response> {
        match tokio::time::timeout(timeout, self.finish(on_event)).await {
            Ok(result) => result,
            Err(_) => {
                let _ = self.cancel().await;
                bail!("{} timed out after {timeout:?}", self.description)
            }
        }
    }
}
