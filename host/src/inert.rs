//! Guest text made inert before it reaches a terminal or a text log.
//!
//! Everything the guest sends (errors, step names, log lines, script output, console tails) is
//! written by an untrusted image. A raw ESC could clear the user's screen (`ESC[2J`), retitle
//! the window or write the clipboard (`ESC]52;c;…BEL`); bidi overrides could make a line read
//! differently from what it says. Such characters are shown escaped (`\u{1b}`), never passed on.

use std::borrow::Cow;

/// Whether `c` could act on a terminal or hide text: C0/C1 controls, DEL, bidi controls.
fn active(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(|c| active(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if active(c) && !keep(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Multi-line guest text (error chains, command output tails): newlines and tabs stay.
pub fn inert(text: &str) -> Cow<'_, str> {
    escape(text, |c| c == '\n' || c == '\t')
}

/// One line of guest text (a step name, a log line, a version): every control is escaped.
pub fn inert_line(text: &str) -> Cow<'_, str> {
    escape(text, |c| c == '\t')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_sequences_are_escaped() {
        let cases = [
            ("plain text", "plain text"),
            ("\x1b]52;c;aGVsbG8=\x07", "\\u{1b}]52;c;aGVsbG8=\\u{7}"),
            ("\x1b[2Jcleared", "\\u{1b}[2Jcleared"),
            ("back\x08space\r", "back\\u{8}space\\u{d}"),
            ("c1 \u{9b}2J del \x7f", "c1 \\u{9b}2J del \\u{7f}"),
            ("evil\u{202e}txt.exe", "evil\\u{202e}txt.exe"),
            ("two\nlines\tand a tab", "two\nlines\tand a tab"),
            ("ünïcödé ✓", "ünïcödé ✓"),
        ];
        for (input, expected) in cases {
            assert_eq!(inert(input), expected, "{input:?}");
            assert!(!inert(input).contains('\x1b'));
        }
    }

    #[test]
    fn a_single_line_keeps_no_newline() {
        assert_eq!(inert_line("step\nfake: ok"), "step\\u{a}fake: ok");
        assert_eq!(inert_line("a\tb"), "a\tb");
    }

    #[test]
    fn clean_text_is_not_copied() {
        assert!(matches!(inert("nothing to do"), Cow::Borrowed(_)));
        assert!(matches!(inert("\x1b"), Cow::Owned(_)));
    }
}
