//! The guest's serial console as the host reads it: bytes in, clean lines out, each checked
//! against the expected pattern and for a kernel panic; the last lines kept for error reports.

use std::collections::VecDeque;

use regex::Regex;

/// How many console lines an error report shows.
pub const TAIL_LINES: usize = 40;

/// What a console line means for the boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The line matches `--expect`.
    Matched(String),
    /// The guest kernel panicked.
    Panic(String),
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
            if byte == b'\n' {
                let line = clean_line(&self.partial);
                self.partial.clear();
                if verdict.is_none() {
                    verdict = self.judge(&line);
                }
                if !line.trim().is_empty() {
                    self.remember(line.clone());
                }
                lines.push(line);
            } else {
                self.partial.push(byte);
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
