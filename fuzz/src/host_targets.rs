//! Fuzz entries for what the host parses from untrusted sources: the agent's frames and the
//! user's config file. Compiled into the fuzz crate and into the host's `fuzz_corpus` test.

use std::io::Cursor;
use std::path::Path;

use vmic::config::{self, ValidationContext};
use vmic_protocol::{self as protocol, GuestMessage, HostMessage, Message};

/// A byte stream read as frames, both ways: never panics, never allocates past the frame cap
/// (`read_message` refuses the length first), and every accepted message encodes back to a
/// frame that decodes to the same message.
pub fn frame_decoder(data: &[u8]) {
    frames::<GuestMessage>(data);
    frames::<HostMessage>(data);
    // The body alone, as the async host reader hands it over.
    round_trip(protocol::decode::<GuestMessage>(data).ok());
}

fn frames<M: Message + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let mut reader = Cursor::new(data);
    // Each message consumes at least a 4-byte header, so this ends.
    while let Ok(Some(message)) = protocol::read_message::<M>(&mut reader) {
        round_trip(Some(message));
    }
}

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(message: Option<M>) {
    let Some(message) = message else {
        return;
    };
    let frame = protocol::encode(&message).expect("a decoded message encodes");
    assert!(frame.len() - 4 <= protocol::MAX_FRAME_LEN);
    let again: M = protocol::decode(&frame[4..]).expect("an encoded message decodes");
    assert_eq!(message, again);
}

/// The config loader (YAML → structure walk → model → validation): never panics, and every
/// error points at a line and column inside the text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A directory that does not exist: relative paths in the config resolve to nothing.
    let dir = Path::new("/nonexistent/vmic-fuzz");
    let Err(errors) = config::validate_str(
        text,
        &dir.join("config.yaml"),
        dir,
        &ValidationContext::default(),
    ) else {
        return;
    };
    // Lines as YAML counts them: CR LF, CR and LF each end one (a file of bare CRs, as old Mac
    // editors wrote, has many lines and no LF).
    let lines = text
        .replace("\r\n", "\n")
        .replace('\r', "\n")
        .lines()
        .count()
        .max(1);
    for error in &errors.errors {
        assert!(!error.message.is_empty(), "{error:?}");
        let position = error
            .position
            .as_ref()
            .expect("an error in the text has a position");
        assert!(
            position.line >= 1 && position.line <= lines + 1,
            "{error:?} outside {lines} lines"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every input of `fuzz/corpus/<target>` and `fuzz/regressions/<target>`, by name.
    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut inputs = Vec::new();
        for kind in ["corpus", "regressions"] {
            let dir = fuzz_dir.join(kind).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("corpus dir entry").path();
                let data = std::fs::read(&path).expect("corpus file");
                inputs.push((path.display().to_string(), data));
            }
        }
        inputs.sort();
        assert!(!inputs.is_empty(), "no corpus for {target}");
        inputs
    }

    fn replay(target: &str, entry: fn(&[u8])) {
        for (name, data) in corpus(target) {
            let outcome = std::panic::catch_unwind(|| entry(&data));
            assert!(outcome.is_ok(), "{target}: {name} fails");
        }
    }

    #[test]
    fn frame_decoder_corpus() {
        replay("frame_decoder", super::frame_decoder);
    }

    #[test]
    fn config_corpus() {
        replay("config", super::config);
    }
}
