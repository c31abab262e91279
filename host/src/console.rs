//! The guest's serial console as the host reads it: bytes in, clean lines out, each checked
//! against the expected pattern and for a kernel panic; the last lines kept for error reports;
//! the raw bytes kept in a log whose size the guest cannot grow past a cap.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use tokio::io::AsyncReadExt;

/// Console bytes kept per log file. A guest that prints without end (a boot loop, a flood from
/// the image's scripts) must not fill the host's disk: when a log reaches this size it becomes
/// `NAME.1` (replacing the older one) and a new log starts, so at most twice this is kept, and
/// always the newest output.
pub const CONSOLE_LOG_CAP: u64 = 8 << 20;

/// How many console lines an error report shows.
/// Longest console line kept whole; longer ones are cut (see [`Console::feed`]).
pub const MAX_LINE: usize = 64 << 10;
pub const TAIL_LINES: usize = 40;

/// What a console line means for the boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The line matches `--expect`.
    Matched(String),
    /// The guest kernel panicked.
    Panic(String),
    /// The firmware or shim refused to run a boot loader or kernel (Secure Boot).
    SecureBootRefused(String),
}

/// The last [`TAIL_LINES`] non-empty console lines, shown when a boot fails.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleTail {
    pub lines: Vec<String>,
}

impl std::fmt::Display for ConsoleTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lines.is_empty() {
            return f.write_str("the serial console printed nothing");
        }
        write!(f, "last {} console lines:", self.lines.len())?;
        for line in &self.lines {
            write!(f, "\n{line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConsoleTail {}

/// Splits console bytes into lines and judges each one.
#[derive(Debug)]
pub struct Console {
    expect: Option<Regex>,
    partial: Vec<u8>,
    tail: VecDeque<String>,
}

impl Console {
    pub fn new(expect: Option<Regex>) -> Console {
        Console {
            expect,
            partial: Vec::new(),
            tail: VecDeque::with_capacity(TAIL_LINES + 1),
        }
    }

    /// Take more console bytes; returns the complete lines they finish (cleaned) and the first
    /// verdict among them.
    pub fn feed(&mut self, bytes: &[u8]) -> (Vec<String>, Option<Verdict>) {
        let mut lines = Vec::new();
        let mut verdict = None;
        for &byte in bytes {
            // A console that never ends its line (a firmware dialog, a flood) is cut into
            // lines of at most MAX_LINE bytes: memory stays bounded whatever the guest prints.
            if byte == b'\n' || self.partial.len() >= MAX_LINE {
                let line = clean_line(&self.partial);
                self.partial.clear();
                if verdict.is_none() {
                    verdict = self.judge(&line);
                }
                if !line.trim().is_empty() {
                    self.remember(line.clone());
                }
                lines.push(line);
                if byte == b'\n' {
                    continue;
                }
            }
            self.partial.push(byte);
        }
        // Shim's refusal is a dialog box waiting for a key: its line never ends.
        if verdict.is_none() {
            let partial = clean_line(&self.partial);
            if is_secure_boot_refusal(&partial) {
                verdict = Some(Verdict::SecureBootRefused(refusal_text(&partial)));
            }
        }
        (lines, verdict)
    }

    /// The unfinished line, if it matches `--expect`: a prompt (`login: `) never gets its
    /// newline. The caller accepts it only once the console has been quiet for a moment, so
    /// that a line still being written is not cut short.
    pub fn partial_match(&self) -> Option<String> {
        let expect = self.expect.as_ref()?;
        let line = clean_line(&self.partial);
        (!line.is_empty() && expect.is_match(&line)).then_some(line)
    }

    fn judge(&self, line: &str) -> Option<Verdict> {
        if let Some(expect) = &self.expect {
            if expect.is_match(line) {
                return Some(Verdict::Matched(line.to_string()));
            }
        }
        if is_secure_boot_refusal(line) {
            return Some(Verdict::SecureBootRefused(refusal_text(line)));
        }
        is_kernel_panic(line).then(|| Verdict::Panic(line.to_string()))
    }

    fn remember(&mut self, line: String) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// The last lines seen, the unfinished one included.
    pub fn tail(&self) -> ConsoleTail {
        let mut lines: Vec<String> = self.tail.iter().cloned().collect();
        let partial = clean_line(&self.partial);
        if !partial.trim().is_empty() {
            if lines.len() == TAIL_LINES {
                lines.remove(0);
            }
            lines.push(partial);
        }
        ConsoleTail { lines }
    }
}

/// A console log that keeps the newest output within a size cap (see [`CONSOLE_LOG_CAP`]).
pub struct CappedLog {
    path: PathBuf,
    cap: u64,
    written: u64,
    file: std::fs::File,
}

impl CappedLog {
    pub fn create(path: &Path, cap: u64) -> std::io::Result<CappedLog> {
        Ok(CappedLog {
            file: std::fs::File::create(path)?,
            path: path.to_path_buf(),
            cap,
            written: 0,
        })
    }

    /// Where the output before the current log's went.
    pub fn older(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_os_string();
        name.push(".1");
        PathBuf::from(name)
    }

    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.written > 0 && self.written + bytes.len() as u64 > self.cap {
            std::fs::rename(&self.path, Self::older(&self.path))?;
            self.file = std::fs::File::create(&self.path)?;
            self.written = 0;
        }
        self.file.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Copies a VM's console into a [`CappedLog`] until QEMU closes it.
pub struct ConsoleRecorder(tokio::task::JoinHandle<()>);

/// How many RCU stall reports in one boot mean the builder VM's kernel is stuck for good. The
/// kernel reports a stall after 21 s without a grace period and then every ~60 s; a busy host
/// can cause one report, but a vCPU whose timer never fires again (seen under TCG with both
/// host cores loaded: the build hung 16 minutes until QEMU was killed) repeats them forever.
pub const STALL_REPORTS: usize = 3;

/// Whether a console line is the kernel's RCU stall report (`rcu: INFO: rcu_preempt detected
/// stalls on CPUs/tasks:`, `... self-detected stall on CPU`).
pub fn is_rcu_stall_report(line: &str) -> bool {
    // "detected stall" covers "self-detected stall" too.
    line.contains("rcu: INFO: rcu_") && line.contains("detected stall")
}

/// Reads a builder VM's console line by line across reads: counts the kernel's stall reports
/// and notes the agent's [`AGENT_LISTENING_LINE`](vmic_protocol::AGENT_LISTENING_LINE).
#[derive(Default)]
pub struct ConsoleWatch {
    partial: Vec<u8>,
    reports: usize,
    listening: bool,
}

impl ConsoleWatch {
    /// Feed console bytes; true once [`STALL_REPORTS`] stall reports were seen.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        for &byte in bytes {
            if byte == b'\n' {
                let line = String::from_utf8_lossy(&self.partial);
                if is_rcu_stall_report(&line) {
                    self.reports += 1;
                }
                // A kernel message may come first on the same line (printk and the agent
                // write the console independently).
                if line.contains(vmic_protocol::AGENT_LISTENING_LINE) {
                    self.listening = true;
                }
                self.partial.clear();
            } else if self.partial.len() < 512 {
                // Both lines looked for are short; longer lines are cut, not kept whole.
                self.partial.push(byte);
            }
        }
        self.reports >= STALL_REPORTS
    }

    /// Whether the agent said that its channel listens.
    pub fn agent_listening(&self) -> bool {
        self.listening
    }
}

impl ConsoleRecorder {
    /// Record the console into `log`. When the guest kernel reports an RCU stall
    /// [`STALL_REPORTS`] times, `on_stall` runs once (the builder VM stops it: a stuck kernel
    /// never finishes the build, and waiting would last until the build's timeout). `listening`
    /// turns true when the agent says that it listens.
    pub fn spawn(
        mut stream: tokio::net::unix::pipe::Receiver,
        mut log: CappedLog,
        reporter: crate::report::Reporter,
        on_stall: impl FnOnce() + Send + 'static,
        listening: tokio::sync::watch::Sender<bool>,
    ) -> ConsoleRecorder {
        ConsoleRecorder(tokio::spawn(async move {
            let mut buffer = vec![0u8; 16 << 10];
            let mut failed = false;
            let mut watch = ConsoleWatch::default();
            let mut on_stall = Some(on_stall);
            // Keep reading after a write error: a console nobody reads stalls the guest.
            while let Ok(count @ 1..) = stream.read(&mut buffer).await {
                if let Err(error) = log.write(&buffer[..count]) {
                    if !failed {
                        reporter.warn(
                            crate::report::Source::Vmic,
                            format_args!("writing the console log {}: {error}", log.path.display()),
                        );
                        failed = true;
                    }
                }
                let stuck = watch.feed(&buffer[..count]);
                if watch.agent_listening() && !*listening.borrow() {
                    listening.send_replace(true);
                }
                if stuck {
                    if let Some(on_stall) = on_stall.take() {
                        reporter.warn(
                            crate::report::Source::Vmic,
                            format_args!(
                                "the builder VM's kernel stopped making progress ({STALL_REPORTS} RCU stall reports on its console, {}): stopping it. This is the emulator's fault, not the image's; run the build again",
                                log.path.display()
                            ),
                        );
                        on_stall();
                    }
                }
            }
        }))
    }

    /// Wait until QEMU (already gone or being killed) closed the console and everything it
    /// printed is in the log, for at most `within`.
    pub async fn finish(self, within: Duration) {
        let _ = tokio::time::timeout(within, self.0).await;
    }
}

/// The pipe a VM's serial console goes through: QEMU writes the write end (passed to it with
/// `-add-fd`, see [`crate::qemu::console_argv`]), vmic reads the other. Not a unix socket: a
/// socket queues each byte QEMU's UART sends as its own buffer, so it is full after ~280
/// bytes; a reader held up for a moment (a busy host) then stalls the UART, and both the
/// firmware's serial driver (which gives up on a string it cannot send) and QEMU (which drops
/// a byte it cannot write after a few tries) lose output: shim's refusal went missing that way
/// on a loaded CI host. A pipe holds 64 KiB, on Linux grown to 1 MiB, and it is there before
/// QEMU starts, so nothing is printed before vmic reads.
pub struct ConsolePipe {
    pub reader: std::os::fd::OwnedFd,
    pub writer: std::os::fd::OwnedFd,
}

/// What vmic asks a console pipe to hold (Linux; `fs.pipe-max-size` allows 1 MiB unprivileged).
pub const CONSOLE_PIPE_BYTES: usize = 1 << 20;

impl ConsolePipe {
    pub fn new() -> std::io::Result<ConsolePipe> {
        // Both ends close on exec; QemuProcess::spawn clears that for the write end in QEMU.
        let (reader, writer) = std::io::pipe()?;
        let (reader, writer) = (
            std::os::fd::OwnedFd::from(reader),
            std::os::fd::OwnedFd::from(writer),
        );
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: fcntl on an fd we own, with an integer argument. Best effort: a smaller
            // pipe (the 64 KiB default) still works, with less slack.
            unsafe {
                libc::fcntl(
                    writer.as_raw_fd(),
                    libc::F_SETPIPE_SZ,
                    CONSOLE_PIPE_BYTES as libc::c_int,
                )
            };
        }
        Ok(ConsolePipe { reader, writer })
    }
}

/// The read end as an async reader (inside the runtime). EOF comes when QEMU, the only holder
/// of the write end once it started, exits.
pub fn console_reader(
    reader: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::Receiver::from_owned_fd(reader)
}

/// The last `count` lines of a console log and the file before it, cleaned like `vmic boot`'s
/// (escapes and `\r` removed), each indented for an error report.
pub fn log_tail(path: &Path, count: usize) -> String {
    let mut bytes = std::fs::read(CappedLog::older(path)).unwrap_or_default();
    bytes.extend(std::fs::read(path).unwrap_or_default());
    if bytes.is_empty() {
        return String::new();
    }
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let lines: Vec<&[u8]> = bytes.split(|&byte| byte == b'\n').collect();
    let start = lines.len().saturating_sub(count);
    lines[start..]
        .iter()
        .map(|line| format!("  | {}", crate::inert::inert_line(&clean_line(line))))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The refusal's own words out of a line drawn as a dialog box (runs of padding and frame
/// characters around it).
fn refusal_text(line: &str) -> String {
    line.split("   ")
        .map(|part| part.trim_matches(|c: char| c.is_whitespace() || !c.is_ascii()))
        .find(|part| is_secure_boot_refusal(part))
        .unwrap_or(line)
        .trim()
        .to_string()
}

/// A refusal to start an image that fails signature checks: shim's `Verification failed:
/// (0x1A) Security Violation`, OVMF's `BdsDxe: failed to load Boot0001 … : Access Denied`, and
/// grub's `bad shim signature` for a kernel.
pub fn is_secure_boot_refusal(line: &str) -> bool {
    line.contains("Security Violation")
        || (line.contains("BdsDxe: failed to load") && line.contains("Access Denied"))
        || line.contains("bad shim signature")
}

/// Linux's panic message (x86_64 and arm64 alike).
pub fn is_kernel_panic(line: &str) -> bool {
    line.contains("Kernel panic - not syncing")
}

/// A console line as a person reads it: UTF-8 (lossy), without terminal escape sequences,
/// carriage returns or other control characters (tabs stay).
pub fn clean_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters and intermediates, then one final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC, DCS etc.: up to BEL or ST (ESC \).
                Some(']' | 'P' | '_' | '^' | 'X') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' && chars.peek() == Some(&'\\') {
                            chars.next();
                            break;
                        }
                    }
                }
                // Character set selection: one more byte.
                Some('(' | ')' | '*' | '+') => {
                    chars.next();
                }
                // Two-byte sequences (ESC M, ESC 7, ESC c, ...).
                _ => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines of a real hang (a TCG builder VM whose second vCPU never took a timer interrupt
    /// again), as its console showed them every ~21 s.
    const STALL: &str = "[   23.920014] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n\
        [   23.922841] rcu: \t1-...!: (0 ticks this GP) idle=a010/0/0x0 softirq=13/13 fqs=0\n\
        [   23.923707] rcu: RCU grace-period kthread stack dump:\n";

    #[test]
    fn a_kernel_stuck_for_good_is_told_from_one_slow_moment() {
        let mut watch = ConsoleWatch::default();
        for report in 1..STALL_REPORTS {
            assert!(
                !watch.feed(STALL.as_bytes()),
                "{report} report(s) may be a busy host"
            );
        }
        // Split anywhere, across reads, the third report still counts.
        let (head, tail) = STALL.as_bytes().split_at(20);
        assert!(!watch.feed(head));
        assert!(watch.feed(tail), "{STALL_REPORTS} reports: stuck");

        let mut quiet = ConsoleWatch::default();
        for _ in 0..10 {
            let other = "[   24.1] rcu: RCU grace-period kthread stack dump:\nrcu: INFO: nothing\n";
            assert!(!quiet.feed(other.as_bytes()));
        }
        let self_detected = "[ 50.0] rcu: INFO: rcu_sched self-detected stall on CPU\n";
        let mut watch = ConsoleWatch::default();
        let fed: Vec<bool> = (0..STALL_REPORTS)
            .map(|_| watch.feed(self_detected.as_bytes()))
            .collect();
        assert_eq!(fed.last(), Some(&true), "{fed:?}");
    }

    /// Records `output` as a guest console through a [`ConsoleRecorder`] until its end.
    async fn record(
        output: &[&[u8]],
        on_stall: impl FnOnce() + Send + 'static,
        listening: tokio::sync::watch::Sender<bool>,
    ) {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let pipe = ConsolePipe::new().expect("a console pipe");
        let mut guest =
            tokio::net::unix::pipe::Sender::from_owned_fd(pipe.writer).expect("the write end");
        let log = CappedLog::create(&dir.path().join("console.log"), 1 << 20).expect("log");
        let recorder = ConsoleRecorder::spawn(
            console_reader(pipe.reader).expect("the read end"),
            log,
            crate::report::Reporter::plain(),
            on_stall,
            listening,
        );
        for bytes in output {
            guest.write_all(bytes).await.expect("console write");
        }
        drop(guest);
        recorder.finish(Duration::from_secs(10)).await;
    }

    /// QEMU's UART writes one byte at a time and drops what it cannot write after a few tries:
    /// the console must hold what a reader held up for a moment has not read yet (a unix
    /// socket held ~280 such bytes).
    #[test]
    fn a_console_pipe_holds_64_kib_of_single_bytes_unread() {
        use std::os::fd::AsRawFd;
        let pipe = ConsolePipe::new().expect("a console pipe");
        let fd = pipe.writer.as_raw_fd();
        // SAFETY: fcntl on an fd the pipe owns.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        let mut held = 0usize;
        // SAFETY: a one-byte write from a live buffer to an fd the pipe owns.
        while unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) } == 1 {
            held += 1;
            if held > CONSOLE_PIPE_BYTES {
                break;
            }
        }
        assert!(held >= 64 << 10, "held {held} bytes");
        #[cfg(target_os = "linux")]
        assert_eq!(held, CONSOLE_PIPE_BYTES, "grown to 1 MiB on Linux");
    }

    #[tokio::test]
    async fn the_recorder_stops_a_stuck_kernel_once() {
        let (fired, mut stopped) = tokio::sync::mpsc::unbounded_channel();
        let (listening, _) = tokio::sync::watch::channel(false);
        let output = vec![STALL.as_bytes(); STALL_REPORTS + 2];
        record(
            &output,
            move || fired.send(()).expect("the test listens"),
            listening,
        )
        .await;
        assert_eq!(stopped.recv().await, Some(()), "stopped");
        assert_eq!(stopped.recv().await, None, "once");
    }

    #[test]
    fn the_agents_listening_line_is_noticed_whole_and_only_it() {
        let mut watch = ConsoleWatch::default();
        let line = format!(
            "[    4.1] virtio_vsock: probe\n{} vsock port 1024\r\n",
            vmic_protocol::AGENT_LISTENING_LINE
        );
        let (head, tail) = line.as_bytes().split_at(line.len() - 12);
        watch.feed(head);
        assert!(!watch.agent_listening(), "not before the line ends");
        watch.feed(tail);
        assert!(watch.agent_listening());

        // After a kernel message written into the same line.
        let mut interleaved = ConsoleWatch::default();
        let line = format!(
            "[    5.2] sr 0:0:0:0: attached{} serial port\n",
            vmic_protocol::AGENT_LISTENING_LINE
        );
        interleaved.feed(line.as_bytes());
        assert!(interleaved.agent_listening());

        let mut other = ConsoleWatch::default();
        other.feed(b"vmic-agent: mounting /proc\nvmic-agent: waiting for nothing\n");
        other.feed(b"[ 2.0] Run /init as init process\n");
        assert!(!other.agent_listening());
    }

    #[tokio::test]
    async fn the_recorder_tells_when_the_agent_listens() {
        let (listening, told) = tokio::sync::watch::channel(false);
        let line = format!("{} vsock port 1024\n", vmic_protocol::AGENT_LISTENING_LINE);
        record(
            &[
                b"[ 1.0] Linux version 6.1\nvmic-agent: mounting\n",
                line.as_bytes(),
            ],
            || panic!("no stall"),
            listening,
        )
        .await;
        assert!(*told.borrow(), "told once the line was read");
    }

    #[test]
    fn a_console_log_keeps_the_newest_output_within_twice_its_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut log = CappedLog::create(&path, 100).expect("create");
        for line in 0..1000 {
            log.write(format!("line {line:04}\n").as_bytes())
                .expect("write");
        }
        let current = std::fs::read_to_string(&path).expect("log");
        let older = std::fs::read_to_string(CappedLog::older(&path)).expect("older");
        assert!(
            current.len() <= 100 && older.len() <= 100,
            "{current:?} {older:?}"
        );
        assert!(older.len() > 90, "rotated only when full: {older:?}");
        assert!(current.ends_with("line 0999\n"), "{current:?}");
        // The two files are consecutive: the older one ends where the current one starts.
        let first: u32 = current[5..9].parse().expect("number");
        assert!(
            older.ends_with(&format!("line {:04}\n", first - 1)),
            "{older:?}"
        );
        // No third file.
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 2);
        // The tail reads across both files, cleaned and indented.
        let tail = log_tail(&path, 12);
        assert_eq!(tail.lines().count(), 12);
        assert!(tail.starts_with("  | line 0988"), "{tail}");
        assert!(tail.ends_with("  | line 0999"), "{tail}");
    }

    #[test]
    fn a_chunk_larger_than_the_cap_is_kept_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut log = CappedLog::create(&path, 10).expect("create");
        log.write(b"0123456789abcdef\n").expect("write");
        log.write(b"next\n").expect("write");
        assert_eq!(std::fs::read(&path).expect("log"), b"next\n");
        assert_eq!(
            std::fs::read(CappedLog::older(&path)).expect("older"),
            b"0123456789abcdef\n"
        );
        let tail = log_tail(&dir.path().join("none.log"), 5);
        assert_eq!(tail, "", "no console output, no tail lines");
    }

    #[test]
    fn escapes_and_carriage_returns_are_removed() {
        let cases: &[(&[u8], &str)] = &[
            (b"plain text\r", "plain text"),
            (
                b"[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mjournald\x1b[0m.",
                "[  OK  ] Started journald.",
            ),
            (b"\x1bM\x1b[K[ \x1b[0;31m*\x1b[0m] Job", "[ *] Job"),
            (b"\x1b]0;title\x07after", "after"),
            (b"\x1b(Bcharset\x1b=", "charset"),
            (
                b"\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: loading",
                "BdsDxe: loading",
            ),
            (b"a\tb\x08c\x00", "a\tbc"),
            (b"\xff\xfebroken utf-8", "\u{fffd}\u{fffd}broken utf-8"),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                clean_line(bytes),
                *expected,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn lines_split_across_reads_are_matched_once_complete() {
        let mut console = Console::new(Some(Regex::new("VMIC-TEST-BOOTED host=").unwrap()));
        let (lines, verdict) = console.feed(b"booting\r\nVMIC-TEST-");
        assert_eq!(lines, vec!["booting".to_string()]);
        assert_eq!(verdict, None);
        let (lines, verdict) = console.feed(b"BOOTED host=vmic-test cmdline=x\r\nnext");
        assert_eq!(
            lines,
            vec!["VMIC-TEST-BOOTED host=vmic-test cmdline=x".to_string()]
        );
        assert_eq!(
            verdict,
            Some(Verdict::Matched(
                "VMIC-TEST-BOOTED host=vmic-test cmdline=x".into()
            ))
        );
    }

    #[test]
    fn a_prompt_without_newline_can_match() {
        let mut console = Console::new(Some(Regex::new("login: $").unwrap()));
        let (_, verdict) = console.feed(b"\r\nvmic-test login: ");
        assert_eq!(verdict, None);
        assert_eq!(console.partial_match(), Some("vmic-test login: ".into()));
        console.feed(b"\r\n");
        assert_eq!(console.partial_match(), None);
    }

    #[test]
    fn secure_boot_refusals_of_shim_ovmf_and_grub_are_recognised() {
        for line in [
            "Verification failed: (0x1A) Security Violation",
            "BdsDxe: failed to load Boot0001 \"UEFI QEMU HARDDISK QM00001 \" from PciRoot(0x0)/Pci(0x2,0x0): Access Denied",
            "error: bad shim signature.",
        ] {
            let mut console = Console::new(None);
            let verdict = console.feed(format!("{line}\n").as_bytes()).1;
            assert_eq!(verdict, Some(Verdict::SecureBootRefused(line.to_string())));
        }
        let mut console = Console::new(None);
        let ordinary = b"BdsDxe: loading Boot0001 \"UEFI QEMU HARDDISK\"\nAccess granted\n";
        assert_eq!(console.feed(ordinary).1, None);
        // Shim draws its refusal as a dialog box and waits for a key: the line never ends.
        let mut console = Console::new(None);
        let dialog = format!(
            "\u{1b}[0m\u{da}\u{c4}\u{c4}\u{bf}{pad}ERROR{pad}{pad}Verification failed: (0x1A) Security Violation{pad}{pad}",
            pad = " ".repeat(30)
        );
        assert_eq!(
            console.feed(dialog.as_bytes()).1,
            Some(Verdict::SecureBootRefused(
                "Verification failed: (0x1A) Security Violation".to_string()
            ))
        );
    }

    #[test]
    fn a_line_that_never_ends_is_cut_at_the_bound() {
        let mut console = Console::new(None);
        let flood = vec![b'x'; MAX_LINE * 3 + 5];
        let (lines, _) = console.feed(&flood);
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|line| line.len() == MAX_LINE));
        assert_eq!(console.partial.len(), 5);
    }

    #[test]
    fn kernel_panics_are_recognised_unless_expected() {
        let panic = b"[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs\n";
        let mut console = Console::new(None);
        assert!(matches!(console.feed(panic).1, Some(Verdict::Panic(_))));
        let mut console = Console::new(Some(Regex::new("Kernel panic").unwrap()));
        assert!(matches!(console.feed(panic).1, Some(Verdict::Matched(_))));
    }

    #[test]
    fn the_tail_keeps_the_last_non_empty_lines() {
        let mut console = Console::new(None);
        for index in 0..100 {
            console.feed(format!("line {index}\r\n\r\n").as_bytes());
        }
        console.feed(b"partial");
        let tail = console.tail();
        assert_eq!(tail.lines.len(), TAIL_LINES);
        assert_eq!(tail.lines[0], "line 61");
        assert_eq!(tail.lines[TAIL_LINES - 2], "line 99");
        assert_eq!(tail.lines[TAIL_LINES - 1], "partial");
        assert!(tail
            .to_string()
            .starts_with("last 40 console lines:\nline 61\n"));
    }
}
