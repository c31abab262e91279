//! Running a program for the host: explicit argv, optional chroot, its own process group (so
//! a cancel kills everything it started), output streamed as events or collected.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::thread;

use anyhow::Context as _;
use vmic_protocol::{Event, ExecRequest, ExecResult, RequestId, Response, Stream};

use crate::server::{RequestContext, Writer};

/// Largest `Event::Output` payload.
const OUTPUT_CHUNK: usize = 64 << 10;
/// Collected output kept per stream (its tail), so that a response always fits in a frame.
const COLLECT_LIMIT: usize = 768 << 10;

pub fn run(request: ExecRequest, context: &RequestContext) -> anyhow::Result<Response> {
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
    context.cancel.set_process_group(Some(group));
    let sink = stream_output.then(|| (context.writer.clone(), context.id));
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let stdout = {
        let sink = sink.clone();
        thread::spawn(move || pump(stdout, Stream::Stdout, sink))
    };
    let stderr = pump(stderr, Stream::Stderr, sink);
    let stdout = stdout.join().expect("the output thread does not panic");
    // Until the leader is reaped its id, the group's, cannot be reused: a cancel may kill the
    // group up to that point, even if the program closed its output early.
    wait_for_exit(group).with_context(what)?;
    context.cancel.set_process_group(None);
    let status = child.wait().with_context(what)?;
    context.cancel.check().with_context(what)?;

    let signal = status.signal();
    Ok(Response::Exec(ExecResult {
        code: status.code().unwrap_or_else(|| 128 + signal.unwrap_or(0)),
        signal,
        stdout: stdout.with_context(|| format!("reading the output of {program}"))?,
        stderr: stderr.with_context(|| format!("reading the error output of {program}"))?,
    }))
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
