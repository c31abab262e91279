//! File transfer: `PutFile` (host → guest, verified and atomically renamed into place) and
//! `GetFile` (guest → host, streamed with its sha256).

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use anyhow::{bail, Context as _};
use sha2::{Digest, Sha256 as Hasher};
use vmic_protocol::{hex_digest, GuestMessage, Response, Sha256, CHUNK_LEN};

use crate::context::{Incoming, RequestContext};

/// How often a waiting `PutFile` looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Receive the file's `Data` chunks and `DataEnd` into a temporary file next to `path`, check
/// size and sha256, fsync, set `mode`, and rename it into place.
pub fn put(path: &str, mode: u32, size: u64, context: &RequestContext) -> anyhow::Result<Response> {
    let incoming = context
        .incoming
        .as_ref()
        .context("no data channel for this request")?
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let target = Path::new(path);
    let (Some(directory), Some(name)) = (target.parent(), target.file_name()) else {
        bail!("not a file path");
    };
    if !target.is_absolute() {
        bail!("not an absolute path");
    }
    let partial = Partial(directory.join(format!(
        ".{}.vmic-{}.partial",
        name.to_string_lossy(),
        context.id
    )));
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial.0)
        .with_context(|| format!("creating {}", partial.0.display()))?;

    let mut hasher = Hasher::new();
    let mut received = 0u64;
    let expected = loop {
        match incoming.recv_timeout(CANCEL_POLL) {
            Ok(Incoming::Chunk(chunk)) => {
                received += chunk.len() as u64;
                if received > size {
                    bail!("received more than the announced {size} bytes");
                }
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .with_context(|| format!("writing {}", partial.0.display()))?;
                context.cancel.check()?;
            }
            Ok(Incoming::End(expected)) => break expected,
            Err(RecvTimeoutError::Timeout) => context.cancel.check()?,
            Err(RecvTimeoutError::Disconnected) => bail!("the session ended before the file did"),
        }
    };
    if received != size {
        bail!("size mismatch: announced {size} bytes, received {received}");
    }
    let actual: Sha256 = hasher.finalize().into();
    if actual != expected {
        bail!(
            "sha256 mismatch: expected {}, actual {}",
            hex_digest(&expected),
            hex_digest(&actual)
        );
    }
    file.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o}"))?;
    file.sync_all().context("syncing the file")?;
    drop(file);
    fs::rename(&partial.0, target)
        .with_context(|| format!("renaming {} into place", partial.0.display()))?;
    partial.keep();
    // Make the rename durable too; a failure here only weakens crash safety.
    if let Ok(directory) = File::open(directory) {
        let _ = directory.sync_all();
    }
    Ok(Response::File {
        size: received,
        sha256: actual,
    })
}

/// A temporary file that is removed unless [`Partial::keep`] is called.
struct Partial(PathBuf);

impl Partial {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Stream `path` as `Data` chunks of [`CHUNK_LEN`], then `DataEnd` with its sha256.
pub fn get(path: &str, context: &RequestContext) -> anyhow::Result<Response> {
    let mut file = File::open(path).context("opening the file")?;
    let mut hasher = Hasher::new();
    let mut size = 0u64;
    let mut buffer = vec![0; CHUNK_LEN];
    loop {
        context.cancel.check()?;
        let read = fill(&mut file, &mut buffer).context("reading the file")?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
        context
            .writer
            .send(&GuestMessage::Data {
                id: context.id,
                chunk: buffer[..read].to_vec(),
            })
            .context("sending file data")?;
    }
    let sha256: Sha256 = hasher.finalize().into();
    context
        .writer
        .send(&GuestMessage::DataEnd {
            id: context.id,
            sha256,
        })
        .context("sending the end of the file")?;
    Ok(Response::File { size, sha256 })
}

/// Read until `buffer` is full or the file ends (so every chunk but the last is full).
fn fill(file: &mut File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}
