//! The "Check the medium and boot" grub menu entry: the first entry's kernel and initrd with
//! `rd.live.check`, so dracut's dmsquash-live verifies the MD5 implanted in the ISO
//! (`checkisomd5`, when the image's initrd has it) before it boots.

/// Marks the entry vmic adds, so a re-master replaces it instead of adding a second one.
const BEGIN: &str = "### vmic: media check entry";
const END: &str = "### vmic: end of media check entry";

pub const MEDIA_CHECK_TITLE: &str = "Check the medium and boot";
pub const MEDIA_CHECK_ARG: &str = "rd.live.check";

/// `grub_cfg` without the entry [`add_entry`] appended (unchanged if it has none).
pub fn strip_entry(grub_cfg: &str) -> String {
    let mut out = String::with_capacity(grub_cfg.len());
    let mut inside = false;
    for line in grub_cfg.split_inclusive('\n') {
        match line.trim_end() {
            BEGIN => inside = true,
            END => inside = false,
            _ if !inside => out.push_str(line),
            _ => {}
        }
    }
    out
}

/// The lines of the command starting at `lines[start]`, with its `\`-continuations.
fn command_lines<'a>(lines: &[&'a str], start: usize) -> Vec<&'a str> {
    let mut command = Vec::new();
    for line in &lines[start..] {
        command.push(*line);
        if !line.trim_end().ends_with('\\') {
            break;
        }
    }
    command
}

fn starts_command(line: &str, names: &[&str]) -> bool {
    let first = line.split_whitespace().next().unwrap_or("");
    names.contains(&first)
}

/// `grub_cfg` (already rewritten for the ISO) with the media check entry appended: the first
/// `linux` command and the `initrd` after it, `rd.live.check` added to the kernel's args.
/// Without a `linux` command the text is returned as it is.
pub fn add_entry(grub_cfg: &str, label: &str) -> String {
    let text = strip_entry(grub_cfg);
    let lines: Vec<&str> = text.lines().collect();
    let Some(linux_at) = lines
        .iter()
        .position(|line| starts_command(line, &["linux", "linuxefi", "linux16"]))
    else {
        return text;
    };
    let linux = command_lines(&lines, linux_at);
    let initrd = lines[linux_at + linux.len()..]
        .iter()
        .position(|line| starts_command(line, &["initrd", "initrdefi", "initrd16"]))
        .map(|offset| command_lines(&lines, linux_at + linux.len() + offset))
        .unwrap_or_default();
    let mut entry = format!(
        "{BEGIN}\nmenuentry '{MEDIA_CHECK_TITLE}' --id vmic-media-check {{\n\
         \t{}\n",
        super::grub_cfg::search_command(label, "root")
    );
    let last = linux.len() - 1;
    for (index, line) in linux.iter().enumerate() {
        let line = line.trim();
        if index == last {
            entry.push_str(&format!("\t{line} {MEDIA_CHECK_ARG}\n"));
        } else {
            entry.push_str(&format!("\t{line}\n"));
        }
    }
    for line in initrd {
        entry.push_str(&format!("\t{}\n", line.trim()));
    }
    entry.push_str(&format!("}}\n{END}\n"));
    let mut out = text;
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&entry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "set timeout=3\n\
                       menuentry 'Debian' {\n\
                       \tsearch --no-floppy --label CDROM --set=root\n\
                       \tlinux /boot/vmlinuz-6.1 root=live:LABEL=CDROM rd.live.image \\\n\
                       \t  quiet\n\
                       \tinitrd /boot/initrd.img-6.1\n\
                       }\n\
                       menuentry 'Other' {\n\
                       \tlinux /boot/vmlinuz-5 ro\n\
                       \tinitrd /boot/initrd.img-5\n\
                       }\n";

    #[test]
    fn the_entry_boots_the_first_kernel_with_the_check() {
        let out = add_entry(CFG, "CDROM");
        assert!(out.starts_with(CFG), "the rest is kept:\n{out}");
        let entry = &out[CFG.len()..];
        assert_eq!(
            entry,
            "### vmic: media check entry\n\
             menuentry 'Check the medium and boot' --id vmic-media-check {\n\
             \tsearch --no-floppy --label CDROM --set=root\n\
             \tlinux /boot/vmlinuz-6.1 root=live:LABEL=CDROM rd.live.image \\\n\
             \tquiet rd.live.check\n\
             \tinitrd /boot/initrd.img-6.1\n\
             }\n\
             ### vmic: end of media check entry\n"
        );
    }

    #[test]
    fn added_once_and_removable() {
        let once = add_entry(CFG, "CDROM");
        assert_eq!(add_entry(&once, "CDROM"), once, "a second pass replaces it");
        assert_eq!(strip_entry(&once), CFG);
        assert_eq!(out_count(&add_entry(&once, "NEW"), "--label NEW"), 1);
        assert_eq!(add_entry("set timeout=1\n", "CDROM"), "set timeout=1\n");
    }

    fn out_count(text: &str, needle: &str) -> usize {
        text.matches(needle).count()
    }
}
