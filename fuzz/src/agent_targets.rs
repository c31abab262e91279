//! Fuzz entries for the agent's parsers of image-controlled files: `/etc/fstab`, grub.cfg, the
//! ISO settings record, and ELF headers and `ldd` scripts (dracut's `ldd`). Compiled into the fuzz crate and into the agent's tests, where
//! `crate::pipeline` is the same module.

use crate::pipeline::{elf, fstab, grub_cfg, iso_record};

/// `/etc/fstab` → mount plan: never panics; an accepted plan mounts absolute, distinct mount
/// points, parents (shallower) first.
pub fn fstab(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(plan) = fstab::mount_plan(text) else {
        return;
    };
    let depth = |mountpoint: &str| mountpoint.split('/').filter(|c| !c.is_empty()).count();
    for pair in plan.windows(2) {
        assert!(
            depth(&pair[0].mountpoint) <= depth(&pair[1].mountpoint),
            "child mounted before its parent: {plan:?}"
        );
    }
    for (index, entry) in plan.iter().enumerate() {
        assert!(entry.mountpoint.starts_with('/'), "{entry:?}");
        assert!(
            !entry.mountpoint.split('/').any(|c| c == ".." || c == "."),
            "mount point escapes the image root: {entry:?}"
        );
        assert!(
            plan[..index]
                .iter()
                .all(|other| other.mountpoint != entry.mountpoint),
            "mount point twice: {plan:?}"
        );
    }
}

/// grub.cfg → the ISO's grub.cfg (lexer and rewriter): never panics; an accepted config is
/// rewritten idempotently (the promise ISO → ISO re-masters rely on) and every `linux`
/// command boots the live root.
pub fn grub_cfg(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let settings = grub_cfg::IsoBootSettings {
        label: "CDROM".to_owned(),
        user_args: vec!["console=ttyS0".to_owned(), "ds=nocloud;s=x y".to_owned()],
        dropped_args: vec!["vmic.old=1".to_owned()],
    };
    let Ok(first) = grub_cfg::rewrite_for_iso(text, &settings) else {
        return;
    };
    assert!(first.linux_commands > 0);
    assert!(first.text.contains("root=live:LABEL=CDROM"));
    let second = grub_cfg::rewrite_for_iso(&first.text, &settings)
        .expect("a rewritten grub.cfg is rewritten again");
    assert_eq!(first.text, second.text, "the rewrite is not idempotent");
    assert_eq!(first.linux_commands, second.linux_commands);
}

/// The ISO settings record: never panics; an accepted record renders and parses back equal.
pub fn iso_record(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(record) = iso_record::IsoSettingsRecord::parse(text) else {
        return;
    };
    let rendered = record.render().expect("a parsed record renders");
    let again = iso_record::IsoSettingsRecord::parse(&rendered).expect("a rendered record parses");
    assert_eq!(record, again);
}

/// An image file's first bytes as an ELF header, and as an `ldd` script: never panics; an
/// identity has a known class and byte order; the loaders read are words without shell
/// syntax; the loader chosen for the identity is one of them.
pub fn elf(data: &[u8]) {
    let id = elf::elf_id(data);
    if let Some(id) = id {
        assert!(matches!(id.class, 1 | 2), "{id:?}");
        assert!(matches!(id.data, 1 | 2), "{id:?}");
    }
    let Some(list) = elf::rtld_list(&String::from_utf8_lossy(data)) else {
        return;
    };
    assert!(!list.is_empty());
    for rtld in &list {
        assert!(
            !rtld.is_empty() && !rtld.contains(char::is_whitespace),
            "{list:?}"
        );
        assert!(!rtld.contains(['$', '`', '"', '\'', ';']), "{list:?}");
    }
    if let Some(id) = id {
        let candidates: Vec<(String, Option<elf::ElfId>)> =
            list.iter().map(|rtld| (rtld.clone(), Some(id))).collect();
        let chosen = elf::choose_rtld(&id, &candidates).expect("a loader for its own target");
        assert_eq!(chosen, list[0]);
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
    fn fstab_corpus() {
        replay("fstab", super::fstab);
    }

    #[test]
    fn grub_cfg_corpus() {
        replay("grub_cfg", super::grub_cfg);
    }

    #[test]
    fn iso_record_corpus() {
        replay("iso_record", super::iso_record);
    }

    #[test]
    fn elf_corpus() {
        replay("elf", super::elf);
    }
}
