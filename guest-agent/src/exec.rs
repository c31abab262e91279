//! Running a program for the host: explicit argv, optional chroot, its own process group (so
//! a cancel kills everything it started), output streamed as events or collected.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::thread;

use anyhow::Context as _;
use vmic_protocol::{Event, ExecRequest, ExecResult, RequestId, Response, Stream};

use crate::context::{kill_group, RequestContext, Writer};

/// Largest `Event::Output` payload.
const OUTPUT_CHUNK: usize = 64 << 10;
/// Collected output kept per stream (its tail), so that a response always fits in a frame.
const COLLECT_LIMIT: usize = 768 << 10;

pub fn run(request: ExecRequest, context: &RequestContext) -> anyhow::Result<Response> {
    run_with(request, context, None).map(Response::Exec)
}

/// Run a program whose stdout is data, not text: it is copied into `into` as it comes (e.g. an
/// ISO image onto a disk), never held in memory. The result's `stdout` stays empty.
pub fn run_into(
    request: ExecRequest,
    context: &RequestContext,
    into: &mut dyn io::Write,
) -> anyhow::Result<ExecResult> {
    run_with(request, context, Some(into))
}

fn run_with(
    request: ExecRequest,
    context: &RequestContext,
    into: Option<&mut dyn io::Write>,
) -> anyhow::Result<ExecResult> {
    let ExecRequest {
        argv,
        env,
        cwd,
        chroot,
        stream_output,
    } = request;
    let Some(program) = argv.first() else {
        anyhow::bail!("cannot run an empty argv");
    };
    let what = || match &chroot {
        Some(root) => format!("running {program} in {root}"),
        None => format!("running {program}"),
    };
    context.cancel.check().with_context(what)?;

    let mut command = Command::new(program);
    command
        .args(&argv[1..])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    match &chroot {
        Some(root) => {
            enter_root(&mut command, root, cwd.as_deref().unwrap_or("/")).with_context(what)?
        }
        None => {
            if let Some(cwd) = &cwd {
                command.current_dir(cwd);
            }
        }
    }

    let mut child = command.spawn().with_context(what)?;
    // process_group(0) made the child the leader of group `child.id()`.
    let group = libc::pid_t::try_from(child.id()).context("child pid out of range")?;
    context.cancel.add_process_group(group);
    let sink = stream_output.then(|| (context.writer.clone(), context.id));
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (stdout, stderr, copied) = match into {
        None => {
            let stdout = {
                let sink = sink.clone();
                thread::spawn(move || pump(stdout, Stream::Stdout, sink))
            };
            let stderr = pump(stderr, Stream::Stderr, sink);
            let stdout = stdout.join().expect("the output thread does not panic");
            (stdout, stderr, Ok(0))
        }
        Some(into) => {
            enlarge_pipe(&stdout);
            let stderr = thread::spawn(move || pump(stderr, Stream::Stderr, sink));
            let copied = copy_large(&mut stdout, into);
            if copied.is_err() {
                // The program must not block on a pipe nobody reads any more.
                kill_group(group);
            }
            let stderr = stderr.join().expect("the output thread does not panic");
            (Ok(Vec::new()), stderr, copied)
        }
    };
    // Until the leader is reaped its id, the group's, cannot be reused: a cancel may kill the
    // group up to that point, even if the program closed its output early.
    let exited = wait_for_exit(group);
    context.cancel.remove_process_group(group);
    exited.with_context(what)?;
    let status = child.wait().with_context(what)?;
    context.cancel.check().with_context(what)?;
    copied.with_context(|| format!("storing the output of {program}"))?;

    let signal = status.signal();
    Ok(ExecResult {
        code: status.code().unwrap_or_else(|| 128 + signal.unwrap_or(0)),
        signal,
        stdout: stdout.with_context(|| format!("reading the output of {program}"))?,
        stderr: stderr.with_context(|| format!("reading the error output of {program}"))?,
    })
}

/// The pipe a program's bulk output comes through, grown from 64 KiB to [`PIPE_BYTES`]: with
/// the default the program blocks as soon as it is 64 KiB ahead, so it and the reader's
/// processing of each 1 MiB chunk (a disk write, a hash) take turns instead of overlapping.
/// Without root the limit is `/proc/sys/fs/pipe-max-size` (1 MiB unless changed), which still
/// holds one chunk. Best effort: a smaller pipe is only slower.
fn enlarge_pipe(pipe: &impl std::os::fd::AsRawFd) {
    for bytes in PIPE_BYTES {
        // SAFETY: F_SETPIPE_SZ on a pipe descriptor the caller owns; no memory is passed.
        if unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) } >= 0 {
            return;
        }
    }
}

/// Four of [`copy_large`]'s chunks (an A/B of ISO builds, 2026-12-04: xorriso to the output
/// disk 6.8 s instead of 8.0 s), else one.
const PIPE_BYTES: [libc::c_int; 2] = [4 << 20, 1 << 20];

/// `io::copy` with 1 MiB reads: its 8 KiB buffer costs a syscall pair per 8 KiB, which is
/// what dominates writing an image under emulation.
fn copy_large(from: &mut impl Read, into: &mut dyn io::Write) -> io::Result<u64> {
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        // Fill the buffer (a pipe returns at most 64 KiB per read) before writing.
        while filled < buffer.len() {
            match from.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        }
        if filled == 0 {
            return Ok(total);
        }
        into.write_all(&buffer[..filled])?;
        total += filled as u64;
    }
}

/// Wait until `pid` (our child) has exited, leaving it to be reaped by `Child::wait`.
fn wait_for_exit(pid: libc::pid_t) -> io::Result<()> {
    loop {
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid out pointer; WNOWAIT leaves the child waitable.
        let result = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Make the child `chroot` into `root` and `chdir` to `cwd` (inside it) before exec.
fn enter_root(command: &mut Command, root: &str, cwd: &str) -> anyhow::Result<()> {
    let root = CString::new(root).context("root path contains NUL")?;
    let cwd = CString::new(cwd).context("working directory contains NUL")?;
    let enter = move || {
        // SAFETY: chroot(2) with a valid C string; async-signal-safe, allocation-free.
        if unsafe { libc::chroot(root.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: chdir(2) with a valid C string; async-signal-safe, allocation-free.
        if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe syscalls on strings built before fork.
    unsafe { command.pre_exec(enter) };
    Ok(())
}

/// Copy one output pipe until EOF: to the host as events, or into a bounded buffer.
fn pump(
    mut pipe: impl Read,
    stream: Stream,
    sink: Option<(Writer, RequestId)>,
) -> io::Result<Vec<u8>> {
    let mut buffer = vec![0; OUTPUT_CHUNK];
    let mut tail = Tail::default();
    loop {
        let read = match pipe.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        match &sink {
            // Send failures (host gone) are ignored: keep draining so the child never blocks.
            Some((writer, id)) => writer.event(
                Some(*id),
                Event::Output {
                    stream,
                    data: buffer[..read].to_vec(),
                },
            ),
            None => tail.push(&buffer[..read]),
        }
    }
    Ok(tail.finish())
}

/// The last [`COLLECT_LIMIT`] bytes of a stream, with a marker when earlier bytes were dropped.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    dropped: usize,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > 2 * COLLECT_LIMIT {
            self.trim();
        }
    }

    fn trim(&mut self) {
        let excess = self.bytes.len().saturating_sub(COLLECT_LIMIT);
        self.bytes.drain(..excess);
        self.dropped += excess;
    }

    fn finish(mut self) -> Vec<u8> {
        self.trim();
        if self.dropped == 0 {
            return self.bytes;
        }
        let mut bytes =
            format!("[vmic-agent: {} earlier bytes dropped]\n", self.dropped).into_bytes();
        bytes.extend(self.bytes);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn large_copies_keep_every_byte_in_order() {
        let data: Vec<u8> = (0..(3 << 20) + 12345).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        let copied = copy_large(&mut &data[..], &mut out).expect("copy");
        assert_eq!(copied, data.len() as u64);
        assert_eq!(out, data);
    }

    #[test]
    fn bulk_output_pipes_hold_at_least_one_chunk() {
        let (reader, _writer) = std::io::pipe().expect("pipe");
        // SAFETY: F_GETPIPE_SZ on a live pipe.
        let before = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_GETPIPE_SZ) };
        enlarge_pipe(&reader);
        // SAFETY: as above.
        let after = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert!(before < 1 << 20, "{before}");
        assert!(after >= 1 << 20, "{after}");
    }

    #[test]
    fn collected_output_keeps_the_tail() {
        let mut tail = Tail::default();
        tail.push(b"short");
        assert_eq!(tail.finish(), b"short");

        let mut tail = Tail::default();
        for _ in 0..40 {
            tail.push(&[b'x'; 64 << 10]);
        }
        tail.push(b"END");
        let bytes = tail.finish();
        assert!(bytes.starts_with(b"[vmic-agent: "));
        assert!(bytes.ends_with(b"xEND"));
        assert!(bytes.len() < COLLECT_LIMIT + 100);
    }
}
