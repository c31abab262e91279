//! OpenSSH public keys as `authorized_keys` takes them: `sshPublicKeyPaths` files are checked
//! line by line before they go into an image, and a private key is refused by name (copying
//! one into an image would leak it to everyone who gets the image).

/// Key types `sshd` accepts in `authorized_keys`.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-ed25519-cert-v01@openssh.com",
    "ssh-rsa-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "sk-ssh-ed25519-cert-v01@openssh.com",
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
];

/// Whether text holds a PEM or OpenSSH private key block.
pub fn is_private_key(text: &str) -> bool {
    text.contains("PRIVATE KEY-----")
}

/// Checks a whole key file: every non-empty, non-comment line is a public key.
pub fn check_public_key_file(bytes: &[u8]) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err("not a text file; expected OpenSSH public keys, one per line".to_owned());
    };
    if is_private_key(text) {
        return Err(
            "this is a private key; give the public key (the `.pub` file next to it) and keep \
             the private key out of the image"
                .to_owned(),
        );
    }
    let mut keys = 0;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        check_public_key_line(line).map_err(|problem| format!("line {}: {problem}", index + 1))?;
        keys += 1;
    }
    if keys == 0 {
        return Err("holds no public key".to_owned());
    }
    Ok(())
}

/// Checks one `authorized_keys` line: `[options] TYPE BASE64 [comment]`, where the decoded
/// blob starts with the same TYPE.
pub fn check_public_key_line(line: &str) -> Result<(), String> {
    let line = line.trim();
    if is_private_key(line) {
        return Err("this is a private key; give the public key instead".to_owned());
    }
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    // Options (e.g. `no-pty,command="..."`) may precede the type.
    let Some(type_index) = words.iter().position(|word| KEY_TYPES.contains(word)) else {
        return Err(format!(
            "no key type; expected a line such as `ssh-ed25519 AAAA... comment` (types: {})",
            KEY_TYPES[..6].join(", ")
        ));
    };
    let key_type = words[type_index];
    let Some(encoded) = words.get(type_index + 1) else {
        return Err(format!("{key_type} is not followed by the base64 key"));
    };
    let blob = decode_base64(encoded).ok_or_else(|| format!("the {key_type} key is not base64"))?;
    // The blob is an SSH string: a 4-byte big-endian length, then the type again.
    let declared = blob
        .get(..4)
        .map(|length| u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize);
    let inner = declared.and_then(|length| blob.get(4..4 + length));
    if inner != Some(key_type.as_bytes()) {
        return Err(format!(
            "the base64 data is not a {key_type} key (its blob names another type)"
        ));
    }
    Ok(())
}

/// Standard base64 with padding, as OpenSSH writes it.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |byte: u8| -> Option<u32> {
        Some(match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let padding = bytes.iter().rev().take_while(|byte| **byte == b'=').count();
    if padding > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let mut group = 0u32;
        let mut count: usize = 0;
        for &byte in chunk {
            if byte == b'=' {
                group <<= 6;
                continue;
            }
            group = (group << 6) | value(byte)?;
            count += 1;
        }
        let decoded = [(group >> 16) as u8, (group >> 8) as u8, group as u8];
        out.extend_from_slice(&decoded[..count.saturating_sub(1)]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ed25519 public key (ssh-keygen, for these tests; the private half was deleted).
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILwKRzl8MxlJGB3tMhX1ZRAXBOImtoQE7+XSA88aHxTm vmic-test";

    #[test]
    fn accepts_public_keys_with_options_and_comments() {
        check_public_key_line(ED25519).expect("ed25519");
        check_public_key_line(&format!("no-pty,from=\"10.0.0.0/8\" {ED25519}")).expect("options");
        check_public_key_file(format!("# deploy keys\n\n{ED25519}\n").as_bytes()).expect("file");
    }

    #[test]
    fn refuses_what_is_not_a_public_key() {
        let table = [
            ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n", "private key"),
            ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n", "private key"),
            ("ssh-ed25519\n", "not followed"),
            ("ssh-ed25519 not*base64\n", "not base64"),
            // An ed25519 blob labelled as RSA.
            ("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n", "names another type"),
            ("hello world\n", "no key type"),
            ("# only a comment\n", "holds no public key"),
        ];
        for (text, expected) in table {
            let error = check_public_key_file(text.as_bytes()).expect_err(text);
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn base64_round_numbers() {
        assert_eq!(decode_base64("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(decode_base64("aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(decode_base64("YWJj").as_deref(), Some(&b"abc"[..]));
        assert_eq!(decode_base64("YWJ"), None);
    }
}
