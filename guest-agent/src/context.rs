//! What every request's steps get from the server: the request's id, the writer for events,
//! its cancel token with the process groups it runs, and (for uploads) its incoming data. Step
//! modules import this, never the server, so that the server alone depends on them.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use vmic_protocol::{
    write_message, Event, GuestMessage, Level, ProtocolError, RequestId, Sha256, CANCELLED,
};

use crate::console;

static DEBUG: AtomicBool = AtomicBool::new(false);

pub fn set_debug(enabled: bool) {
    DEBUG.store(enabled, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// The sending half of the channel, shared by all threads; one frame per lock.
#[derive(Clone)]
pub struct Writer(Arc<Mutex<File>>);

impl Writer {
    pub(crate) fn new(file: File) -> Writer {
        Writer(Arc::new(Mutex::new(file)))
    }

    pub fn send(&self, message: &GuestMessage) -> Result<(), ProtocolError> {
        let mut file = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        write_message(&mut *file, message)
    }

    /// Best effort, for the panic hook: the panicking thread may hold the lock.
    pub(crate) fn send_within(&self, message: &GuestMessage, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut file = match self.0.try_lock() {
                Ok(file) => file,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(TryLockError::WouldBlock) => return,
            };
            let _ = write_message(&mut *file, message);
            return;
        }
    }

    pub fn event(&self, id: Option<RequestId>, event: Event) {
        if let Err(error) = self.send(&GuestMessage::Event { id, event }) {
            console!("cannot send an event: {error}");
        }
    }

    pub fn log(&self, level: Level, message: impl Into<String>) {
        let message = message.into();
        if level != Level::Debug || debug_enabled() {
            console!("{message}");
        }
        self.event(None, Event::Log { level, message });
    }
}

/// The error a cancelled request ends with; [`remote_error`] puts it first in the chain.
#[derive(Debug, thiserror::Error)]
#[error("{CANCELLED}")]
pub struct Cancelled;

/// Cancellation of one request: a flag, plus the process groups to kill while they run (a
/// request may run programs in parallel, e.g. dracut beside mksquashfs).
#[derive(Default)]
pub struct CancelToken(Mutex<CancelState>);

#[derive(Default)]
struct CancelState {
    cancelled: bool,
    process_groups: Vec<libc::pid_t>,
}

impl CancelToken {
    pub fn cancel(&self) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        state.cancelled = true;
        for &group in &state.process_groups {
            kill_group(group);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cancelled
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.is_cancelled() {
            return Err(Cancelled.into());
        }
        Ok(())
    }

    /// Register a running child's process group (killed at once if already cancelled).
    pub fn add_process_group(&self, group: libc::pid_t) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        state.process_groups.push(group);
        if state.cancelled {
            kill_group(group);
        }
    }

    /// Forget a process group; the caller does so before reaping its leader, so that an id
    /// in the list is never stale.
    pub fn remove_process_group(&self, group: libc::pid_t) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        state.process_groups.retain(|&known| known != group);
    }
}

pub(crate) fn kill_group(group: libc::pid_t) {
    // SAFETY: kill(2) of a process group we created and whose leader we have not reaped yet.
    unsafe { libc::kill(-group, libc::SIGKILL) };
}

/// File data routed from the reader to a `PutFile` thread.
pub enum Incoming {
    Chunk(Vec<u8>),
    End(Sha256),
}

/// What a request's thread gets.
pub struct RequestContext {
    pub id: RequestId,
    pub writer: Writer,
    pub cancel: Arc<CancelToken>,
    /// `Data`/`DataEnd` for this id (`PutFile` only). In a mutex so that the context can be
    /// shared by threads of one request (a build runs dracut and mksquashfs side by side).
    pub incoming: Option<Mutex<Receiver<Incoming>>>,
}
