//! Rewriting the image's grub.cfg for the LiveOS ISO (spec step 6), idempotently.
//!
//! The config is changed command by command, everything else is kept byte for byte:
//! - `linux`/`linuxefi`/`linux16`: the kernel path points into the ISO's `/boot`; `root=`,
//!   `security=`, `selinux=`, `enforcing=` and earlier copies of the LiveOS and user args
//!   are dropped; then `root=live:LABEL=<label>`, the dracut LiveOS args, `selinux=0` and
//!   the user's ISO args are appended, in that order. Later args win in both the kernel and
//!   dracut (`getarg` takes the last), so the appended ones beat anything an unexpandable
//!   `$variable` earlier on the line might carry.
//! - `initrd`/`initrdefi`/`initrd16`: paths point into the ISO's `/boot`.
//! - every `search` and every `set root=<device>`: `search --no-floppy --label <label>
//!   --set=<var>`; `set prefix=` → `($root)/boot/grub2`; `set bootprefix=` → `/boot`.
//!
//! Arguments with grub variables (`$mariner_cmdline`, `$kernelopts`) are kept as they are:
//! their values are only known when grub runs.

/// The dracut LiveOS args (spec step 6), appended after the image's args.
///
/// Unlike the spec's list (and AzL-IC's), no `rd.live.overlay=1`: upstream dracut (Debian,
/// Fedora) reads its value as the device of a persistent overlay, does not find device "1",
/// and then waits at the console for Enter, forever (`systemd-ask-password --timeout=0`).
/// Azure Linux's dracut avoids that with its own `rd.live.overlay.nouserconfirmprompt`
/// patch. Without the arg both keep the RAM overlay that `rd.live.overlay.overlayfs` asks for.
pub const LIVE_ARGS: [&str; 4] = [
    "rd.live.image",
    "rd.live.dir=liveos",
    "rd.live.squashimg=rootfs.img",
    "rd.live.overlay.overlayfs",
];

/// SELinux is not supported on the ISO (seed): this replaces every SELinux arg.
pub const SELINUX_OFF: &str = "selinux=0";

/// The ISO volume label when the config names none (as AzL-IC).
#[cfg(test)]
pub const DEFAULT_LABEL: &str = "CDROM";

/// What [`rewrite_for_iso`] needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoBootSettings {
    /// The ISO volume label (`-V`), also the live root (`root=live:LABEL=`).
    pub label: String,
    /// The user's ISO kernel args, in order, already merged with the ones recorded in an input
    /// ISO ([`super::iso_record::merge_user_args`]). Literal kernel args: quoted for grub here.
    pub user_args: Vec<String>,
    /// Args of an earlier build to take off every `linux` line (vmic's build cache replaces the
    /// cached ISO's `iso.*` args instead of keeping them).
    pub dropped_args: Vec<String>,
}

/// A kernel or initrd named by grub.cfg, after the rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFileRef {
    /// The path as grub.cfg now has it (may contain `$variables`).
    pub path: String,
    /// The file name when it is literal (`vmlinuz-6.1.0-28-cloud-amd64`).
    pub file_name: Option<String>,
    /// The kernel version in the file name (`vmlinuz-<v>`, `initrd.img-<v>`,
    /// `initramfs-<v>.img`, `initrd-<v>`).
    pub kernel_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrittenGrubCfg {
    pub text: String,
    /// Each kernel referenced by a `linux` command, in order, without repeats.
    pub kernels: Vec<BootFileRef>,
    /// Each initrd referenced by an `initrd` command, in order, without repeats.
    pub initrds: Vec<BootFileRef>,
    /// How many `linux` commands were rewritten.
    pub linux_commands: usize,
}

impl RewrittenGrubCfg {
    /// The literal initrd file names, for [`super::plan_iso_tree`].
    pub fn initrd_file_names(&self) -> Vec<String> {
        self.initrds
            .iter()
            .filter_map(|i| i.file_name.clone())
            .collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrubCfgError {
    #[error(
        "grub.cfg has no `linux` command: it must be the main grub configuration, not a \
         redirection to another file"
    )]
    NoLinuxCommand,
    #[error(
        "ISO volume label {label:?} must be 1 to 32 characters from A-Z, a-z, 0-9, `_`, `-`, \
         `.`, and not {reserved:?}"
    )]
    BadLabel {
        label: String,
        reserved: &'static str,
    },
    #[error("ISO kernel argument {arg:?} is not supported: SELinux is always off on the ISO")]
    SelinuxArg { arg: String },
    #[error("ISO kernel argument {arg:?} is not supported: the ISO's root is the LiveOS image")]
    RootArg { arg: String },
    #[error("an ISO kernel argument is empty")]
    EmptyArg,
    #[error(
        "grub.cfg line {line}: a quote opens there and never closes; grub itself cannot read \
         this file (close the quote in the image's grub.cfg)"
    )]
    UnterminatedQuote { line: usize },
    #[error("the PXE bootstrap URL {url:?} cannot be a kernel argument (empty, or spaces or control characters in it)")]
    BadBootstrapUrl { url: String },
}

/// Checks a volume label for use in `-V`, `root=live:LABEL=` and `search --label`.
pub fn validate_label(label: &str) -> Result<(), GrubCfgError> {
    let reserved = super::argv::EFIBOOT_FAT_LABEL;
    let ok = (1..=32).contains(&label.len())
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !label.eq_ignore_ascii_case(reserved);
    if ok {
        Ok(())
    } else {
        Err(GrubCfgError::BadLabel {
            label: label.to_owned(),
            reserved,
        })
    }
}

/// Checks the user's ISO kernel args: none empty, none that would undo the LiveOS root or
/// turn SELinux on (`selinux=0` is accepted, and added once anyway).
pub fn validate_user_args(args: &[String]) -> Result<(), GrubCfgError> {
    for arg in args {
        if arg.is_empty() {
            return Err(GrubCfgError::EmptyArg);
        }
        let key = arg_key(arg);
        if matches!(key, "security" | "selinux" | "enforcing") && arg != SELINUX_OFF {
            return Err(GrubCfgError::SelinuxArg { arg: arg.clone() });
        }
        if key == "root" {
            return Err(GrubCfgError::RootArg { arg: arg.clone() });
        }
    }
    Ok(())
}

/// The key of a kernel arg: `console` for `console=ttyS0`, `quiet` for `quiet`.
fn arg_key(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(key, _)| key)
}

/// Rewrites the image's (or a previous ISO's) grub.cfg for the ISO. Idempotent: rewriting
/// the result with the same settings gives the same text.
pub fn rewrite_for_iso(
    grub_cfg: &str,
    settings: &IsoBootSettings,
) -> Result<RewrittenGrubCfg, GrubCfgError> {
    rewrite(grub_cfg, settings, false)
}

/// [`rewrite_for_iso`] for a full-OS initrd (`initramfsType: full-os`): the initrd is the
/// root, so no `root=` at all (the kernel keeps the unpacked initramfs as `/`) and no LiveOS
/// args; grub still finds the kernel on the ISO by its label.
pub fn rewrite_for_full_os_iso(
    grub_cfg: &str,
    settings: &IsoBootSettings,
) -> Result<RewrittenGrubCfg, GrubCfgError> {
    rewrite(grub_cfg, settings, true)
}

/// The kernel arg that brings the network up in a PXE-booted initrd (dracut's `ip=`).
pub const PXE_NETWORK_ARG: &str = "ip=dhcp";

/// The PXE grub.cfg made from the ISO's: grub was loaded over TFTP and `$root` is the TFTP
/// server, so every `search` goes (it would look for the ISO's label on disks); the media
/// check entry goes (there is no medium). With a bootstrap initrd, `root=live:<url>` replaces
/// the ISO's `root=live:LABEL=...` and [`PXE_NETWORK_ARG`] is added, so that dracut's
/// `livenet` fetches the ISO; a full-OS initrd needs neither.
pub fn rewrite_for_pxe(
    iso_grub_cfg: &str,
    bootstrap_url: Option<&str>,
) -> Result<String, GrubCfgError> {
    if let Some(url) = bootstrap_url {
        if url.is_empty() || url.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(GrubCfgError::BadBootstrapUrl {
                url: url.to_owned(),
            });
        }
    }
    let stripped = super::media_check::strip_entry(iso_grub_cfg);
    let text = edit_commands(&stripped, |first, _| match first {
        "search" | "search.fs_uuid" | "search.fs_label" | "search.file" => Some(String::new()),
        _ => None,
    })?;
    let Some(url) = bootstrap_url else {
        return Ok(text);
    };
    let root = format!("root=live:{url}");
    edit_linux_args(&text, |present| {
        present
            .iter()
            .filter(|w| arg_key(&w.value) != "root" && w.value != PXE_NETWORK_ARG)
            .map(|w| w.raw.to_owned())
            .chain([grub_quote(&root), PXE_NETWORK_ARG.to_owned()])
            .collect()
    })
}

fn rewrite(
    grub_cfg: &str,
    settings: &IsoBootSettings,
    full_os: bool,
) -> Result<RewrittenGrubCfg, GrubCfgError> {
    validate_label(&settings.label)?;
    validate_user_args(&settings.user_args)?;
    let grub_cfg = &super::media_check::strip_entry(grub_cfg);
    let user_args: Vec<&str> = settings
        .user_args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != SELINUX_OFF)
        .collect();

    let mut result = RewrittenGrubCfg {
        text: String::new(),
        kernels: Vec::new(),
        initrds: Vec::new(),
        linux_commands: 0,
    };
    let text = edit_commands(grub_cfg, |first, words| match first {
        "linux" | "linuxefi" | "linux16" if words.len() >= 2 => {
            result.linux_commands += 1;
            let (path, reference) = rewrite_boot_path(&words[1]);
            push_unique(&mut result.kernels, reference);
            let mut parts: Vec<String> = vec![words[0].raw.to_owned(), path];
            parts.extend(
                words[2..]
                    .iter()
                    .filter(|w| !is_replaced_arg(w, &user_args))
                    .filter(|w| !settings.dropped_args.contains(&w.value))
                    .map(|w| w.raw.to_owned()),
            );
            if !full_os {
                parts.push(format!("root=live:LABEL={}", settings.label));
                parts.extend(LIVE_ARGS.iter().map(|a| (*a).to_owned()));
            }
            parts.push(SELINUX_OFF.to_owned());
            parts.extend(user_args.iter().map(|a| grub_quote(a)));
            Some(parts.join(" "))
        }
        // A bare `initrd` comes out as it went in: nothing to rewrite, nothing recorded.
        "initrd" | "initrdefi" | "initrd16" => {
            let mut parts = vec![words[0].raw.to_owned()];
            for word in &words[1..] {
                let (path, reference) = rewrite_boot_path(word);
                push_unique(&mut result.initrds, reference);
                parts.push(path);
            }
            Some(parts.join(" "))
        }
        "search" | "search.fs_uuid" | "search.fs_label" | "search.file" => Some(search_command(
            &settings.label,
            search_variable(&words[1..]),
        )),
        "set" if words.len() == 2 => rewrite_set(&words[1], &settings.label),
        _ => None,
    })?;
    if result.linux_commands == 0 {
        return Err(GrubCfgError::NoLinuxCommand);
    }
    result.text = text;
    Ok(result)
}

/// Appends each of `args` that a `linux`/`linuxefi`/`linux16` command lacks to it
/// (`os.kernelCommandLine`); args already there stay where they are. Args are literal kernel
/// args, quoted for grub here (so `a;b` stays one word).
pub fn append_kernel_args(grub_cfg: &str, args: &[String]) -> Result<String, GrubCfgError> {
    edit_linux_args(grub_cfg, |present| {
        let mut kept: Vec<String> = present.iter().map(|w| w.raw.to_owned()).collect();
        for arg in args {
            if !present.iter().any(|w| w.value == *arg) {
                kept.push(grub_quote(arg));
            }
        }
        kept
    })
}

/// Drops every arg whose key (`selinux` of `selinux=1`) is in `remove_keys` from each `linux`
/// command, then appends `args` (quoted for grub). Idempotent.
pub fn replace_kernel_args(
    grub_cfg: &str,
    remove_keys: &[&str],
    args: &[&str],
) -> Result<String, GrubCfgError> {
    edit_linux_args(grub_cfg, |present| {
        present
            .iter()
            .filter(|w| !remove_keys.contains(&arg_key(&w.value)))
            .map(|w| w.raw.to_owned())
            .chain(args.iter().map(|a| grub_quote(a)))
            .collect()
    })
}

/// Replaces the args (the words after the kernel path) of every `linux` command with what
/// `edit` makes of them; the command and the kernel path are kept as written.
fn edit_linux_args(
    grub_cfg: &str,
    mut edit: impl FnMut(&[Word<'_>]) -> Vec<String>,
) -> Result<String, GrubCfgError> {
    let mut found_linux = false;
    let text = edit_commands(grub_cfg, |first, words| match first {
        "linux" | "linuxefi" | "linux16" if words.len() >= 2 => {
            found_linux = true;
            let mut parts = vec![words[0].raw.to_owned(), words[1].raw.to_owned()];
            parts.extend(edit(&words[2..]));
            Some(parts.join(" "))
        }
        _ => None,
    })?;
    if !found_linux {
        return Err(GrubCfgError::NoLinuxCommand);
    }
    Ok(text)
}

/// The one walk over grub.cfg every edit shares: each command (after `then`/`else`/`do`) is
/// offered to `replace` with its unquoted first word; a returned text takes the command's
/// place, everything else is kept byte for byte.
fn edit_commands(
    grub_cfg: &str,
    mut replace: impl FnMut(&str, &[Word<'_>]) -> Option<String>,
) -> Result<String, GrubCfgError> {
    let mut out = String::with_capacity(grub_cfg.len() + 512);
    for line in logical_lines(grub_cfg)? {
        let mut replacements: Vec<(usize, usize, String)> = Vec::new();
        for command in lex(line) {
            let words = skip_keywords(&command);
            let Some(first) = words.first() else {
                continue;
            };
            let range = (first.start, words.last().map_or(first.end, |w| w.end));
            if let Some(text) = replace(first.value.as_str(), words) {
                replacements.push((range.0, range.1, text));
            }
        }
        let mut cursor = 0;
        for (start, end, text) in replacements {
            out.push_str(&line[cursor..start]);
            out.push_str(&text);
            cursor = end;
        }
        out.push_str(&line[cursor..]);
    }
    Ok(out)
}

/// The `search` line that finds the ISO 9660 file system.
pub fn search_command(label: &str, variable: &str) -> String {
    format!("search --no-floppy --label {label} --set={variable}")
}

fn push_unique(list: &mut Vec<BootFileRef>, item: BootFileRef) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// The image args the rewrite drops from a `linux` line (they are re-added canonically, or
/// must go).
fn is_replaced_arg(word: &Word<'_>, user_args: &[&str]) -> bool {
    let value = word.value.as_str();
    matches!(
        arg_key(value),
        "root" | "security" | "selinux" | "enforcing"
    ) || LIVE_ARGS.contains(&value)
        || user_args.contains(&value)
}

/// `search ... --set=VAR ...` → VAR; `-s`/`--set` without a value (or no such option) set
/// `root`.
fn search_variable<'a>(args: &'a [Word<'_>]) -> &'a str {
    args.iter()
        .find_map(|w| {
            let value = w.value.as_str();
            value
                .strip_prefix("--set=")
                .or_else(|| value.strip_prefix("-s").filter(|v| !v.is_empty()))
        })
        .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or("root")
}

/// `set root=<device>`, `set prefix=...`, `set bootprefix=...`.
fn rewrite_set(assignment: &Word<'_>, label: &str) -> Option<String> {
    let (name, value) = assignment.value.split_once('=')?;
    match name {
        "root" => {
            let device = value.starts_with('(')
                || ["hd", "cd", "fd"].iter().any(|p| {
                    value
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
                });
            device.then(|| search_command(label, "root"))
        }
        "prefix" => Some("set prefix=($root)/boot/grub2".to_owned()),
        "bootprefix" => Some("set bootprefix=/boot".to_owned()),
        _ => None,
    }
}

/// A kernel/initrd path pointed into the ISO's `/boot`: the device part (`(hd0,gpt2)`,
/// `($root)`) goes, and a path relative to a separate `/boot` file system gets `/boot`.
/// Paths with variables are kept as they are.
fn rewrite_boot_path(word: &Word<'_>) -> (String, BootFileRef) {
    let mut path = word.value.as_str();
    if path.starts_with('(') {
        if let Some(end) = path.find(')') {
            path = &path[end + 1..];
        }
    }
    if path.contains('$') {
        let last = word.value.rsplit('/').next().unwrap_or(&word.value);
        let literal_name = (!last.contains('$')).then(|| last.to_owned());
        let reference = BootFileRef {
            path: word.raw.to_owned(),
            kernel_version: literal_name.as_deref().and_then(kernel_version_of),
            file_name: literal_name,
        };
        return (word.raw.to_owned(), reference);
    }
    let path = if path.starts_with("/boot/") {
        path.to_owned()
    } else if path.starts_with('/') {
        format!("/boot{path}")
    } else {
        format!("/boot/{path}")
    };
    let file_name = path.rsplit('/').next().unwrap_or(&path).to_owned();
    let reference = BootFileRef {
        path: path.clone(),
        kernel_version: kernel_version_of(&file_name),
        file_name: Some(file_name),
    };
    (grub_quote(&path), reference)
}

/// The kernel version in a kernel or initrd file name, by the usual naming conventions.
pub fn kernel_version_of(file_name: &str) -> Option<String> {
    let version = file_name
        .strip_prefix("vmlinuz-")
        .or_else(|| file_name.strip_prefix("initrd.img-"))
        .or_else(|| {
            file_name
                .strip_prefix("initramfs-")
                .map(|v| v.strip_suffix(".img").unwrap_or(v))
        })
        .or_else(|| {
            file_name
                .strip_prefix("initrd-")
                .map(|v| v.strip_suffix(".img").unwrap_or(v))
        })?;
    (!version.is_empty()).then(|| version.to_owned())
}

/// A grub word for a literal string: as is when it has no character grub treats specially,
/// else single-quoted.
pub fn grub_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%~".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

// --- a small lexer for grub's shell-like script ------------------------------------------

/// One word of a command: its text as written and its value once quotes and escapes are
/// removed (variables are left as `$name`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Word<'a> {
    raw: &'a str,
    value: String,
    start: usize,
    end: usize,
}

/// The file cut into logical lines: a line ending in `\` continues on the next, and so does
/// one whose quote is still open (grub's words may hold newlines). Each item keeps its line
/// ends, so concatenating them gives the input back. A quote open at the end of the file is
/// an error, as it is to grub.
fn logical_lines(text: &str) -> Result<Vec<&str>, GrubCfgError> {
    let bytes = text.as_bytes();
    let mut lines = Vec::new();
    let mut start = 0;
    // The open quote and the line it opened on.
    let mut quote: Option<(u8, usize)> = None;
    let mut line = 1;
    let mut word_start = true;
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        match (quote, byte) {
            (Some((b'\'', _)), b'\'') | (Some((b'"', _)), b'"') => quote = None,
            // An escape: the next byte is taken as is (a newline after it continues the line).
            (Some((b'"', _)), b'\\') | (None, b'\\') if i + 1 < bytes.len() => {
                i += 1;
                if bytes[i] == b'\n' {
                    line += 1;
                }
            }
            (Some(_), _) => {}
            (None, b'\'' | b'"') => quote = Some((byte, line)),
            (None, b'#') if word_start => {
                // A comment runs to the end of the line; its quotes are text.
                while i + 1 < bytes.len() && bytes[i + 1] != b'\n' {
                    i += 1;
                }
            }
            (None, b'\n') => {
                lines.push(&text[start..=i]);
                start = i + 1;
            }
            (None, _) => {}
        }
        if byte == b'\n' {
            line += 1;
        }
        word_start = quote.is_none() && matches!(bytes[i], b' ' | b'\t' | b'\r' | b'\n' | b';');
        i += 1;
    }
    if let Some((_, line)) = quote {
        return Err(GrubCfgError::UnterminatedQuote { line });
    }
    if start < text.len() {
        lines.push(&text[start..]);
    }
    Ok(lines)
}

/// Splits a logical line into commands (at `;`, and at `{`/`}` words), ignoring comments.
fn lex(line: &str) -> Vec<Vec<Word<'_>>> {
    let bytes = line.as_bytes();
    let mut commands = Vec::new();
    let mut words: Vec<Word<'_>> = Vec::new();
    let mut i = 0;
    loop {
        // Blanks, including `\`-newline continuations.
        while i < bytes.len() {
            match bytes[i] {
                b' ' | b'\t' | b'\r' | b'\n' => i += 1,
                b'\\' if bytes.get(i + 1) == Some(&b'\n') => i += 2,
                // A `\` that ends the file escapes nothing: kept as text, outside any word, so
                // that what an edit appends after the word is not escaped by it.
                b'\\' if i + 1 == bytes.len() => i += 1,
                _ => break,
            }
        }
        if i >= bytes.len() || bytes[i] == b'#' {
            break;
        }
        if bytes[i] == b';' {
            commands.push(std::mem::take(&mut words));
            i += 1;
            continue;
        }
        let start = i;
        let mut value = String::new();
        while i < bytes.len() {
            match bytes[i] {
                b' ' | b'\t' | b'\r' | b'\n' | b';' => break,
                b'\\' => {
                    if bytes.get(i + 1) == Some(&b'\n') {
                        break;
                    }
                    let Some(c) = line[i + 1..].chars().next() else {
                        break;
                    };
                    value.push(c);
                    i += 1 + c.len_utf8();
                }
                b'\'' => {
                    let close = line[i + 1..].find('\'').map_or(line.len(), |p| i + 1 + p);
                    value.push_str(&line[i + 1..close]);
                    i = (close + 1).min(line.len());
                }
                b'"' => {
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'"' {
                        if bytes[i] == b'\\'
                            && matches!(bytes.get(i + 1), Some(b'"' | b'\\' | b'$'))
                        {
                            value.push(char::from(bytes[i + 1]));
                            i += 2;
                            continue;
                        }
                        let c = line[i..].chars().next().unwrap_or('\u{fffd}');
                        value.push(c);
                        i += c.len_utf8();
                    }
                    i = (i + 1).min(line.len());
                }
                _ => {
                    let c = line[i..].chars().next().unwrap_or('\u{fffd}');
                    value.push(c);
                    i += c.len_utf8();
                }
            }
        }
        let raw = &line[start..i];
        if raw == "{" || raw == "}" {
            commands.push(std::mem::take(&mut words));
            continue;
        }
        words.push(Word {
            raw,
            value,
            start,
            end: i,
        });
    }
    commands.push(words);
    commands.retain(|c| !c.is_empty());
    commands
}

/// The words of a command after leading `then`/`else`/`do` keywords.
fn skip_keywords<'w, 'a>(words: &'w [Word<'a>]) -> &'w [Word<'a>] {
    let skip = words
        .iter()
        .take_while(|w| matches!(w.raw, "then" | "else" | "do"))
        .count();
    &words[skip..]
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_UUID: &str = "7d1c8a6e-0e49-4c5e-9d9c-3f1f6c9f2a11";

    /// The grub.cfg of scripts/make-test-image (root file system holds /boot).
    fn test_image_cfg() -> String {
        format!(
            "# Main grub config of the vmic test image (x86_64-minimal).\n\
             set timeout=0\n\
             set default=0\n\
             serial --unit=0 --speed=115200\n\
             terminal_input serial console\n\
             terminal_output serial console\n\
             search --no-floppy --fs-uuid --set=root {ROOT_UUID}\n\
             menuentry \"Debian GNU/Linux 12 (vmic test image, 6.1.0-28-cloud-amd64)\" {{\n\
             \tsearch --no-floppy --fs-uuid --set=root {ROOT_UUID}\n\
             \tlinux /boot/vmlinuz-6.1.0-28-cloud-amd64 root=UUID={ROOT_UUID} rw console=ttyS0,115200 net.ifnames=0\n\
             \tinitrd /boot/initrd.img-6.1.0-28-cloud-amd64\n\
             }}\n"
        )
    }

    /// The same image built with a separate /boot partition: paths relative to it.
    fn test_image_bootpart_cfg() -> String {
        test_image_cfg()
            .replace("/boot/vmlinuz", "/vmlinuz")
            .replace("/boot/initrd", "/initrd")
    }

    /// Azure Linux 3 (toolkit-made) grub.cfg.
    const AZURE_LINUX_CFG: &str = r#"set timeout=0
set bootprefix=/boot
search -n -u c380c8e5-88ec-4c3e-85bb-aa1e4d667dfc -s

load_env -f $bootprefix/mariner.cfg
if [ -f  $bootprefix/systemd.cfg ]; then
        load_env -f $bootprefix/systemd.cfg
else
        set systemd_cmdline=net.ifnames=0
fi
if [ -f $bootprefix/grub2/grubenv ]; then
        load_env -f $bootprefix/grub2/grubenv
fi

set rootdevice=PARTUUID=fc7675ee-37ce-471f-9a6c-7e840189b70c

menuentry "Azure Linux" {
        linux $bootprefix/$mariner_linux security=selinux selinux=1 rd.auto=1 root=$rootdevice $mariner_cmdline lockdown=integrity sysctl.kernel.unprivileged_bpf_disabled=1 $systemd_cmdline console=tty0 console=ttyS0 $kernelopts
        if [ -f $bootprefix/$mariner_initrd ]; then
                initrd $bootprefix/$mariner_initrd
        fi
}
"#;

    /// Debian's grub-mkconfig output (abridged), with hints, quoting and `set root=`.
    const DEBIAN_MKCONFIG_CFG: &str = r#"if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
insmod part_gpt
insmod ext2
set root='hd0,gpt1'
if [ x$feature_platform_search_hint = xy ]; then
  search --no-floppy --fs-uuid --set=root --hint-bios=hd0,gpt1 --hint-efi=hd0,gpt1 --hint-baremetal=ahci0,gpt1  3a9d2c1e-aaaa-bbbb-cccc-0123456789ab
else
  search --no-floppy --fs-uuid --set=root 3a9d2c1e-aaaa-bbbb-cccc-0123456789ab
fi
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-simple-3a9d2c1e' {
	load_video
	insmod gzio
	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
	echo	'Loading Linux 6.1.0-28-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-28-amd64 root=UUID=3a9d2c1e-aaaa-bbbb-cccc-0123456789ab ro  quiet
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-28-amd64
}
"#;

    fn settings(user_args: &[&str]) -> IsoBootSettings {
        IsoBootSettings {
            label: DEFAULT_LABEL.to_owned(),
            user_args: user_args.iter().map(|a| (*a).to_owned()).collect(),
            dropped_args: Vec::new(),
        }
    }

    #[test]
    fn a_full_os_iso_boots_the_initrd_as_root_without_root_or_live_args() {
        let rewritten =
            rewrite_for_full_os_iso(AZURE_LINUX_CFG, &settings(&["console=ttyS0"])).unwrap();
        for line in linux_lines(&rewritten.text) {
            assert!(!line.contains("root="), "{line}");
            assert!(!LIVE_ARGS.iter().any(|arg| line.contains(arg)), "{line}");
            assert!(line.ends_with("selinux=0 console=ttyS0"), "{line}");
        }
        // grub still finds the kernel on the ISO by its label.
        assert!(rewritten
            .text
            .contains(&search_command(DEFAULT_LABEL, "root")));
        // The bootstrap rewrite of the same file has both.
        let bootstrap = rewrite_for_iso(AZURE_LINUX_CFG, &settings(&[])).unwrap();
        assert!(linux_lines(&bootstrap.text)
            .iter()
            .all(|line| line.contains("root=live:LABEL=CDROM") && line.contains("rd.live.image")));
    }

    #[test]
    fn the_pxe_grub_cfg_fetches_the_iso_from_the_url_and_searches_nothing() {
        let iso = rewrite_for_iso(AZURE_LINUX_CFG, &settings(&["rd.info"]))
            .unwrap()
            .text;
        let iso = super::super::media_check::add_entry(&iso, DEFAULT_LABEL);
        let url = "http://10.0.2.2:8080/image.iso";
        let pxe = rewrite_for_pxe(&iso, Some(url)).unwrap();
        assert!(!pxe.contains("search"), "{pxe}");
        assert!(!pxe.contains(super::super::media_check::MEDIA_CHECK_ARG));
        let lines = linux_lines(&pxe);
        assert!(!lines.is_empty());
        for line in &lines {
            assert!(!line.contains("LABEL=CDROM"), "{line}");
            assert_eq!(line.matches("root=").count(), 1, "{line}");
            assert!(
                line.ends_with(&format!("root=live:{url} {PXE_NETWORK_ARG}")),
                "{line}"
            );
            // The LiveOS args and the user's stay.
            assert!(
                line.contains("rd.live.image") && line.contains("rd.info"),
                "{line}"
            );
        }
        // Idempotent: the PXE file rewritten again is the same.
        assert_eq!(rewrite_for_pxe(&pxe, Some(url)).unwrap(), pxe);
        // A full-OS PXE grub.cfg only loses the searches.
        let full = rewrite_for_full_os_iso(AZURE_LINUX_CFG, &settings(&[]))
            .unwrap()
            .text;
        let full_pxe = rewrite_for_pxe(&full, None).unwrap();
        assert!(!full_pxe.contains("search") && !full_pxe.contains("root="));
        assert_eq!(linux_lines(&full_pxe), linux_lines(&full));
        assert_eq!(
            rewrite_for_pxe(&iso, Some("http://a b/x.iso")),
            Err(GrubCfgError::BadBootstrapUrl {
                url: "http://a b/x.iso".into()
            })
        );
    }

    fn linux_lines(text: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.trim_start().starts_with("linux"))
            .map(|l| l.trim().to_owned())
            .collect()
    }

    fn snapshot(name: &str, text: &str) {
        insta::with_settings!({prepend_module_to_snapshot => false}, {
            insta::assert_snapshot!(name, text);
        });
    }

    #[test]
    fn test_image_layout() {
        let rewritten =
            rewrite_for_iso(&test_image_cfg(), &settings(&["ds=nocloud"])).expect("rewrite");
        snapshot("grub_cfg_test_image", &rewritten.text);
        // The rule behind the snapshot (spec step 6): the image's own args first (its root=
        // dropped), then root=live:LABEL=<label> and the LiveOS args in order, then SELinux
        // off, then the user's args last, in their order.
        let lines = linux_lines(&rewritten.text);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let args: Vec<&str> = lines[0].split_whitespace().skip(2).collect();
        let mut expected = vec!["rw", "console=ttyS0,115200", "net.ifnames=0"];
        let live_root = format!("root=live:LABEL={DEFAULT_LABEL}");
        expected.push(&live_root);
        expected.extend(LIVE_ARGS);
        expected.push(SELINUX_OFF);
        expected.push("ds=nocloud");
        assert_eq!(args, expected);
        assert_eq!(
            rewritten.kernels,
            vec![BootFileRef {
                path: "/boot/vmlinuz-6.1.0-28-cloud-amd64".into(),
                file_name: Some("vmlinuz-6.1.0-28-cloud-amd64".into()),
                kernel_version: Some("6.1.0-28-cloud-amd64".into()),
            }]
        );
        assert_eq!(
            rewritten.initrd_file_names(),
            vec!["initrd.img-6.1.0-28-cloud-amd64".to_owned()]
        );
        assert_eq!(rewritten.linux_commands, 1);
    }

    #[test]
    fn separate_boot_partition_paths_gain_boot() {
        let rewritten =
            rewrite_for_iso(&test_image_bootpart_cfg(), &settings(&[])).expect("rewrite");
        // Same result as the image whose root file system holds /boot.
        let same = rewrite_for_iso(&test_image_cfg(), &settings(&[])).expect("rewrite");
        assert_eq!(rewritten.text, same.text);
        assert_eq!(
            rewritten.kernels[0].path,
            "/boot/vmlinuz-6.1.0-28-cloud-amd64"
        );
    }

    #[test]
    fn azure_linux_layout() {
        let rewritten = rewrite_for_iso(AZURE_LINUX_CFG, &settings(&["ds=nocloud", "rd.debug"]))
            .expect("rewrite");
        snapshot("grub_cfg_azure_linux", &rewritten.text);
        assert_eq!(
            rewritten.kernels,
            vec![BootFileRef {
                path: "$bootprefix/$mariner_linux".into(),
                file_name: None,
                kernel_version: None,
            }]
        );
        assert!(rewritten.initrd_file_names().is_empty());
    }

    #[test]
    fn debian_grub_mkconfig_layout() {
        let rewritten = rewrite_for_iso(DEBIAN_MKCONFIG_CFG, &settings(&[])).expect("rewrite");
        snapshot("grub_cfg_debian_mkconfig", &rewritten.text);
    }

    #[test]
    fn idempotent() {
        let cases: [(&str, String); 4] = [
            ("test image", test_image_cfg()),
            ("bootpart", test_image_bootpart_cfg()),
            ("azure linux", AZURE_LINUX_CFG.to_owned()),
            ("debian", DEBIAN_MKCONFIG_CFG.to_owned()),
        ];
        for (name, cfg) in cases {
            for args in [
                &[][..],
                &["ds=nocloud", "console=ttyS0,115200", "x='a b'"][..],
            ] {
                let once = rewrite_for_iso(&cfg, &settings(args)).expect("once");
                let twice = rewrite_for_iso(&once.text, &settings(args)).expect("twice");
                assert_eq!(once.text, twice.text, "{name} {args:?}");
                assert_eq!(once.kernels, twice.kernels, "{name}");
            }
        }
    }

    #[test]
    fn argument_order_and_no_duplicates() {
        let once = rewrite_for_iso(&test_image_cfg(), &settings(&["ds=nocloud"])).expect("once");
        // ISO → ISO: the recorded arg stays first, the new ones follow.
        let merged = super::super::iso_record::merge_user_args(
            &["ds=nocloud".to_owned()],
            &[
                "quiet".to_owned(),
                "ds=nocloud".to_owned(),
                "loglevel=3".to_owned(),
            ],
        );
        let again = rewrite_for_iso(
            &once.text,
            &IsoBootSettings {
                label: DEFAULT_LABEL.into(),
                user_args: merged,
                dropped_args: Vec::new(),
            },
        )
        .expect("again");
        assert_eq!(
            linux_lines(&again.text),
            vec![
                "linux /boot/vmlinuz-6.1.0-28-cloud-amd64 rw console=ttyS0,115200 net.ifnames=0 \
                 root=live:LABEL=CDROM rd.live.image rd.live.dir=liveos \
                 rd.live.squashimg=rootfs.img rd.live.overlay.overlayfs \
                 selinux=0 ds=nocloud quiet loglevel=3"
                    .to_owned()
            ]
        );
    }

    #[test]
    fn selinux_args_dropped_and_selinux_off_once() {
        let cfg = "menuentry x {\n linux /boot/vmlinuz-1 security=selinux selinux=1 enforcing=1 \
                   root=/dev/sda2 selinux=0 quiet\n}\n";
        let rewritten = rewrite_for_iso(cfg, &settings(&["selinux=0"])).expect("rewrite");
        let line = &linux_lines(&rewritten.text)[0];
        assert_eq!(line.matches("selinux").count(), 1, "{line}");
        assert!(
            !line.contains("enforcing") && !line.contains("security"),
            "{line}"
        );
        assert_eq!(line.matches("root=").count(), 1, "{line}");
        assert!(
            line.ends_with("rd.live.overlay.overlayfs selinux=0"),
            "{line}"
        );
    }

    #[test]
    fn one_line_menuentry_and_continuations() {
        let cfg = "set timeout=0\n\
                   search --no-floppy --fs-uuid --set=root 1234-ABCD\n\
                   menuentry \"Debian\" { linux /boot/vmlinuz-6.1.0-28-cloud-amd64 root=UUID=1234 ro console=ttyS0 ; initrd /boot/initrd.img-6.1.0-28-cloud-amd64 }\n\
                   menuentry \"Continued\" {\n\
                   \x20   linux (hd0,gpt2)/vmlinuz-5 \\\n\
                   \x20         root=PARTUUID=abc \\\n\
                   \x20         quiet\n\
                   \x20   initrd ($root)/boot/intel-ucode.img /initramfs-5.img\n\
                   }\n";
        let rewritten = rewrite_for_iso(cfg, &settings(&["a=b"])).expect("rewrite");
        snapshot("grub_cfg_one_line_and_continuations", &rewritten.text);
        assert_eq!(rewritten.linux_commands, 2);
        let versions: Vec<Option<String>> = rewritten
            .initrds
            .iter()
            .map(|i| i.kernel_version.clone())
            .collect();
        assert_eq!(
            versions,
            vec![Some("6.1.0-28-cloud-amd64".into()), None, Some("5".into())]
        );
        let again = rewrite_for_iso(&rewritten.text, &settings(&["a=b"])).expect("again");
        assert_eq!(again.text, rewritten.text);
    }

    #[test]
    fn search_variants() {
        let cases = [
            (
                "search -n -u c380c8e5 -s\n",
                "search --no-floppy --label CDROM --set=root\n",
            ),
            (
                "search --no-floppy --fs-uuid --set=root 1234\n",
                "search --no-floppy --label CDROM --set=root\n",
            ),
            (
                "  search --no-floppy --label OLD --set boot\n",
                "  search --no-floppy --label CDROM --set=root\n",
            ),
            (
                "search --file --set=bootdev /boot/grub2/grub.cfg\n",
                "search --no-floppy --label CDROM --set=bootdev\n",
            ),
            (
                "search.fs_uuid 1234 root\n",
                "search --no-floppy --label CDROM --set=root\n",
            ),
            (
                "set root=(hd0,gpt2)\n",
                "search --no-floppy --label CDROM --set=root\n",
            ),
            (
                "set root='hd0,msdos1'\n",
                "search --no-floppy --label CDROM --set=root\n",
            ),
            ("set root=$bootdev\n", "set root=$bootdev\n"),
            (
                "set prefix=(hd0,gpt2)/grub2\n",
                "set prefix=($root)/boot/grub2\n",
            ),
            ("set bootprefix=\n", "set bootprefix=/boot\n"),
            (
                "search -sbootdev --file /boot/grub2/grub.cfg\n",
                "search --no-floppy --label CDROM --set=bootdev\n",
            ),
            ("# search --fs-uuid x\n", "# search --fs-uuid x\n"),
            ("echo 'search me'\n", "echo 'search me'\n"),
        ];
        for (input, expected) in cases {
            let cfg = format!("{input}linux /boot/vmlinuz-1\n");
            let rewritten = rewrite_for_iso(&cfg, &settings(&[])).expect("rewrite");
            let first = rewritten.text.split_inclusive('\n').next().unwrap_or("");
            assert_eq!(first, expected, "for {input:?}");
        }
    }

    #[test]
    fn user_args_are_quoted_for_grub() {
        let rewritten = rewrite_for_iso(
            "linux /boot/vmlinuz-1\n",
            &settings(&["ds=nocloud;s=file:///cidata/", "msg=it's", "a=\"b c\""]),
        )
        .expect("rewrite");
        assert!(
            rewritten
                .text
                .ends_with("selinux=0 'ds=nocloud;s=file:///cidata/' 'msg=it'\\''s' 'a=\"b c\"'\n"),
            "{}",
            rewritten.text
        );
        // Quoted user args are recognized (and not repeated) on a second pass.
        let again = rewrite_for_iso(
            &rewritten.text,
            &settings(&["ds=nocloud;s=file:///cidata/", "msg=it's", "a=\"b c\""]),
        )
        .expect("again");
        assert_eq!(again.text, rewritten.text);
    }

    #[test]
    fn other_label() {
        let rewritten = rewrite_for_iso(
            &test_image_cfg(),
            &IsoBootSettings {
                label: "VMIC_LIVE-1.0".into(),
                user_args: vec![],
                dropped_args: Vec::new(),
            },
        )
        .expect("rewrite");
        assert!(rewritten.text.contains("root=live:LABEL=VMIC_LIVE-1.0 "));
        assert!(rewritten
            .text
            .contains("search --no-floppy --label VMIC_LIVE-1.0 --set=root"));
    }

    #[test]
    fn errors() {
        let redirect =
            "search -n -u 1234 -s\nset prefix=($root)/boot/grub2\nconfigfile $prefix/grub.cfg\n";
        assert_eq!(
            rewrite_for_iso(redirect, &settings(&[])),
            Err(GrubCfgError::NoLinuxCommand)
        );
        for label in [
            "",
            "has space",
            "quote\"",
            "x".repeat(33).as_str(),
            "vmic_efi",
        ] {
            let result = rewrite_for_iso(
                "linux /boot/vmlinuz-1\n",
                &IsoBootSettings {
                    label: label.to_owned(),
                    user_args: vec![],
                    dropped_args: Vec::new(),
                },
            );
            assert!(
                matches!(result, Err(GrubCfgError::BadLabel { .. })),
                "{label:?}: {result:?}"
            );
        }
        for (arg, expected) in [
            ("selinux=1", "SELinux is always off"),
            ("enforcing=0", "SELinux is always off"),
            ("security=apparmor", "SELinux is always off"),
            ("root=/dev/sda1", "the ISO's root is the LiveOS image"),
            ("", "empty"),
        ] {
            let message = rewrite_for_iso("linux /boot/vmlinuz-1\n", &settings(&[arg]))
                .expect_err(arg)
                .to_string();
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn kernel_versions() {
        let cases = [
            ("vmlinuz-6.1.0-28-cloud-amd64", Some("6.1.0-28-cloud-amd64")),
            (
                "initrd.img-6.1.0-28-cloud-amd64",
                Some("6.1.0-28-cloud-amd64"),
            ),
            ("initramfs-6.6.57.1-2.azl3.img", Some("6.6.57.1-2.azl3")),
            ("initrd-5.14.21-default", Some("5.14.21-default")),
            ("vmlinuz", None),
            ("intel-ucode.img", None),
        ];
        for (name, expected) in cases {
            assert_eq!(kernel_version_of(name).as_deref(), expected, "{name}");
        }
    }

    #[test]
    fn quotes_may_span_lines_but_must_close() {
        // A quoted word with a newline is one word of one command, as grub reads it; an
        // apostrophe in a comment opens nothing.
        let cfg = "# the image's own menu\nmenuentry 'Linux' {\n\techo 'two\nlines'\n\tlinux /boot/vmlinuz-6.1 root=/dev/sda2\n}\n";
        let lines = logical_lines(cfg).expect("quotes close");
        assert_eq!(lines.concat(), cfg);
        assert!(lines.contains(&"\techo 'two\nlines'\n"), "{lines:?}");
        let settings = IsoBootSettings {
            label: "CDROM".into(),
            user_args: vec!["a;b".into()],
            dropped_args: Vec::new(),
        };
        let once = rewrite_for_iso(cfg, &settings).expect("rewritten");
        assert!(once.text.contains("\techo 'two\nlines'\n"), "{}", once.text);
        let twice = rewrite_for_iso(&once.text, &settings).expect("rewritten again");
        assert_eq!(once.text, twice.text);

        // What the fuzzer found: a quote left open re-quoted the rest on every rewrite.
        let open = "menuentry x {\n\tlinux /vmlinuz ro\n\tinitrd /initrd ...'\n}\n";
        assert_eq!(
            rewrite_for_iso(open, &settings).map(|r| r.text),
            Err(GrubCfgError::UnterminatedQuote { line: 3 })
        );
        // The second: a backslash ending the file escaped the space before the appended args.
        let dangling = "menuentry x {\n\tlinux /vmlinuz c380\\em\\\\\\";
        let once = rewrite_for_iso(dangling, &settings).expect("rewritten");
        let twice = rewrite_for_iso(&once.text, &settings).expect("rewritten again");
        assert_eq!(once.text, twice.text);
        assert_eq!(once.text.matches("root=live:").count(), 1, "{}", once.text);
        let open_double = "echo \"x\\\"\nlinux /vmlinuz\n";
        assert_eq!(
            logical_lines(open_double),
            Err(GrubCfgError::UnterminatedQuote { line: 1 })
        );
        // A `\`-newline continues the line but is still a line of the file: the error counts it.
        let continued = "echo a\\\nb 'c\n";
        assert_eq!(
            logical_lines(continued),
            Err(GrubCfgError::UnterminatedQuote { line: 2 })
        );
    }

    #[test]
    fn lexer_keeps_unknown_text_byte_for_byte() {
        let cfg = "if [ \"${grub_platform}\" = \"efi\" ]; then insmod efi_gop; fi\r\n\
                   menuentry 'a;b' { echo \"x } y\"; }\n\
                   \tload_env -f $bootprefix/mariner.cfg\n\
                   no newline at end";
        let rewritten = rewrite_for_iso(&format!("linux /boot/vmlinuz-1\n{cfg}"), &settings(&[]))
            .expect("rewrite");
        assert!(rewritten.text.ends_with(cfg), "{}", rewritten.text);
    }

    /// A `linux` or `initrd` without its file is not what the rewrites edit: it stays as
    /// written (and never makes them index past the words they have).
    #[test]
    fn commands_without_their_file_are_left_as_written() {
        let bare = "linux\ninitrd\t  # no file\n";
        let cfg = format!("linux /boot/vmlinuz-1 ro\ninitrd /boot/initrd-1\n{bare}");
        let rewritten = rewrite_for_iso(&cfg, &settings(&[])).expect("rewrite");
        assert!(rewritten.text.ends_with(bare), "{}", rewritten.text);
        assert_eq!(rewritten.linux_commands, 1);
        let appended = append_kernel_args(&cfg, &["a=1".to_string()]).expect("append");
        assert!(appended.ends_with(bare), "{appended}");
        assert!(
            appended.starts_with("linux /boot/vmlinuz-1 ro a=1\n"),
            "{appended}"
        );
    }

    /// A `\`-newline right after a word ends the word and joins the lines.
    #[test]
    fn a_continuation_right_after_a_word_joins_the_lines() {
        let cfg = "linux /boot/vmlinuz-1 ro\\\n  quiet\n";
        let appended = append_kernel_args(cfg, &["x=1".to_string()]).expect("append");
        assert_eq!(appended, "linux /boot/vmlinuz-1 ro quiet x=1\n");
    }

    /// A word that starts with an escape keeps it: `\$x` is a literal `$x` to grub.
    #[test]
    fn a_word_starting_with_an_escape_keeps_it() {
        let cfg = "linux /boot/vmlinuz-1 \\$notvar\n";
        let appended = append_kernel_args(cfg, &["y=1".to_string()]).expect("append");
        assert_eq!(appended, "linux /boot/vmlinuz-1 \\$notvar y=1\n");
    }

    /// `#` starts a comment only at the start of a word: inside one it is text, so a quote
    /// after it opens (here one that spans two lines, which grub reads as one word).
    #[test]
    fn a_hash_inside_a_word_is_part_of_it() {
        let cfg = "linux /boot/vmlinuz-1 tag=a#b quiet\n";
        let appended = append_kernel_args(cfg, &["x=1".to_string()]).expect("append");
        assert_eq!(appended, "linux /boot/vmlinuz-1 tag=a#b quiet x=1\n");
        let cfg = "linux /boot/vmlinuz-1 x=a#'b\nc'\n";
        let appended = append_kernel_args(cfg, &["y=1".to_string()]).expect("append");
        assert_eq!(appended, "linux /boot/vmlinuz-1 x=a#'b\nc' y=1\n");
        // Right after a closing quote is still inside the word.
        let cfg = "linux /boot/vmlinuz-1 x='a'#'b\nc'\n";
        let appended = append_kernel_args(cfg, &["y=1".to_string()]).expect("append");
        assert_eq!(appended, "linux /boot/vmlinuz-1 x='a'#'b\nc' y=1\n");
    }

    #[test]
    fn appended_args_go_on_every_linux_command_once() {
        let cfg = "menuentry x {\n  linux /boot/vmlinuz-1 root=UUID=a ro quiet\n  initrd /boot/initrd.img-1\n}\n\
                   menuentry \"old\" { linux16 /vmlinuz-0 ro ; initrd16 /initrd-0 }\n\
                   if true; then linuxefi /vmlinuz-2 'quiet'; fi\n";
        let args = strings(&["ds=nocloud", "quiet"]);
        let once = append_kernel_args(cfg, &args).expect("append");
        assert_eq!(
            once,
            "menuentry x {\n  linux /boot/vmlinuz-1 root=UUID=a ro quiet ds=nocloud\n  initrd /boot/initrd.img-1\n}\n\
             menuentry \"old\" { linux16 /vmlinuz-0 ro ds=nocloud quiet ; initrd16 /initrd-0 }\n\
             if true; then linuxefi /vmlinuz-2 'quiet' ds=nocloud; fi\n"
        );
        assert_eq!(append_kernel_args(&once, &args).expect("again"), once);
    }

    #[test]
    fn an_appended_arg_with_a_semicolon_or_quotes_stays_one_word() {
        let args = strings(&["ds=nocloud;s=file:///cidata/", "msg=it's fine"]);
        let once =
            append_kernel_args("linux /vmlinuz-1 ro\ninitrd /initrd-1\n", &args).expect("append");
        assert_eq!(
            once,
            "linux /vmlinuz-1 ro 'ds=nocloud;s=file:///cidata/' 'msg=it'\\''s fine'\ninitrd /initrd-1\n"
        );
        // grub reads the line back as one command with the args as written.
        let commands = lex(logical_lines(&once).expect("quotes close")[0]);
        assert_eq!(commands.len(), 1, "{commands:?}");
        let values: Vec<&str> = commands[0].iter().map(|w| w.value.as_str()).collect();
        assert_eq!(
            values,
            [
                "linux",
                "/vmlinuz-1",
                "ro",
                "ds=nocloud;s=file:///cidata/",
                "msg=it's fine"
            ]
        );
        assert_eq!(append_kernel_args(&once, &args).expect("again"), once);
    }

    /// Inside double quotes grub unescapes `\"`, `\\` and `\$` only; any other `\` stays.
    #[test]
    fn double_quotes_unescape_quote_backslash_and_dollar_only() {
        let line = r#"linux "a\"b\\c\$d\ne" x"#;
        let commands = lex(line);
        let values: Vec<&str> = commands[0].iter().map(|w| w.value.as_str()).collect();
        assert_eq!(values, ["linux", r#"a"b\c$d\ne"#, "x"]);
    }

    #[test]
    fn replaced_args_go_wherever_they_were_and_quoted_ones_too() {
        let cfg =
            "menuentry a { linux16 /vmlinuz-1 'selinux=1' ro security=selinux; initrd16 /i }\n\
                   linux /vmlinuz-2 \\\n   enforcing=1 quiet\n";
        let replaced =
            replace_kernel_args(cfg, &["selinux", "security", "enforcing"], &["selinux=0"])
                .expect("replace");
        assert_eq!(
            replaced,
            "menuentry a { linux16 /vmlinuz-1 ro selinux=0; initrd16 /i }\nlinux /vmlinuz-2 quiet selinux=0\n"
        );
        let removed = replace_kernel_args(&replaced, &["selinux"], &[]).expect("remove");
        assert!(!removed.contains("selinux"), "{removed}");
        assert_eq!(
            replace_kernel_args("set default=0\n", &["selinux"], &[]),
            Err(GrubCfgError::NoLinuxCommand)
        );
        assert_eq!(
            append_kernel_args("configfile /boot/grub2/grub.cfg\n", &strings(&["a"])),
            Err(GrubCfgError::NoLinuxCommand)
        );
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn dropped_args_leave_every_linux_line() {
        let grub = "menuentry 'a' {\n  linux /boot/vmlinuz root=live:LABEL=CDROM rd.live.image vmic.old=1 quiet vmic.keep=2\n  initrd /boot/initrd.img\n}\n";
        let rewritten = rewrite_for_iso(
            grub,
            &IsoBootSettings {
                label: DEFAULT_LABEL.into(),
                user_args: vec!["vmic.keep=2".into(), "vmic.new=3".into()],
                dropped_args: vec!["vmic.old=1".into()],
            },
        )
        .expect("rewritten");
        let linux = rewritten
            .text
            .lines()
            .find(|line| line.trim_start().starts_with("linux"))
            .expect("a linux line");
        assert!(!linux.contains("vmic.old=1"), "{linux}");
        assert!(linux.contains(" quiet "), "{linux}");
        assert!(linux.ends_with("vmic.keep=2 vmic.new=3"), "{linux}");
        assert_eq!(linux.matches("vmic.keep=2").count(), 1, "{linux}");
    }
}
