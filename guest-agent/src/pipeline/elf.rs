//! The ELF identity of a file as a loader sees it, and the loaders glibc's `ldd` script
//! tries: what `crate::ldd` needs to trace a file as the script would. Pure; the bytes are
//! an image's, so every offset is checked.

const PT_DYNAMIC: u32 = 2;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;

/// What decides which loader can load an ELF file, and whether it has dynamic linking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfId {
    /// `EI_CLASS`: 1 = 32-bit, 2 = 64-bit.
    pub class: u8,
    /// `EI_DATA`: 1 = little-endian, 2 = big-endian.
    pub data: u8,
    pub machine: u16,
    /// `e_type` is `ET_EXEC` or `ET_DYN` and there is a `PT_DYNAMIC` program header.
    pub dynamic: bool,
}

impl ElfId {
    fn same_target(&self, other: &ElfId) -> bool {
        (self.class, self.data, self.machine) == (other.class, other.data, other.machine)
    }
}

/// The ELF identity of a file's first bytes; `None` when they are not a whole ELF header with
/// its program headers inside `head`.
pub fn elf_id(head: &[u8]) -> Option<ElfId> {
    if head.len() < 52 || head[..4] != *b"\x7fELF" {
        return None;
    }
    let (class, data) = (head[4], head[5]);
    let big_endian = match data {
        1 => false,
        2 => true,
        _ => return None,
    };
    // `n` bytes at `at` as a number in the file's byte order.
    let bytes_at = |at: usize, n: usize| -> Option<u64> {
        let bytes = head.get(at..at.checked_add(n)?)?;
        let push = |acc: u64, byte: &u8| acc << 8 | u64::from(*byte);
        Some(match big_endian {
            true => bytes.iter().fold(0, push),
            false => bytes.iter().rev().fold(0, push),
        })
    };
    let u16_at = |at| bytes_at(at, 2).map(|v| v as u16);
    let u32_at = |at| bytes_at(at, 4).map(|v| v as u32);
    let u64_at = |at| bytes_at(at, 8);
    let e_type = u16_at(16)?;
    let machine = u16_at(18)?;
    // e_phoff, e_phentsize, e_phnum: where the two classes differ.
    let (phoff, phentsize, phnum) = match class {
        1 => (u64::from(u32_at(28)?), u16_at(42)?, u16_at(44)?),
        2 => (u64_at(32)?, u16_at(54)?, u16_at(56)?),
        _ => return None,
    };
    let mut has_dynamic = false;
    for index in 0..u64::from(phnum) {
        let at = phoff.checked_add(index.checked_mul(u64::from(phentsize))?)?;
        let at = usize::try_from(at).ok()?;
        if u32_at(at)? == PT_DYNAMIC {
            has_dynamic = true;
        }
    }
    Some(ElfId {
        class,
        data,
        machine,
        dynamic: has_dynamic && (e_type == ET_EXEC || e_type == ET_DYN),
    })
}

/// The loaders glibc's `ldd` script tries, from its `RTLDLIST=` line; `None` when the script
/// has none or computes it (then it is not the script this replaces).
pub fn rtld_list(ldd_script: &str) -> Option<Vec<String>> {
    let value = ldd_script
        .lines()
        .find_map(|line| line.strip_prefix("RTLDLIST="))?;
    let value = value.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if value.is_empty() || value.contains(['$', '`', '"', '\'', '\\', ';', '(']) {
        return None;
    }
    Some(value.split_whitespace().map(str::to_string).collect())
}

/// The loader `ldd` would trace `file` with: the first candidate (in `RTLDLIST` order, with
/// its ELF identity when it is an executable file) built for the file's target. The script
/// asks each loader `--verify`, which fails for another class, byte order or machine.
pub fn choose_rtld<'a>(file: &ElfId, candidates: &'a [(String, Option<ElfId>)]) -> Option<&'a str> {
    candidates
        .iter()
        .find(|(_, id)| id.is_some_and(|id| id.same_target(file)))
        .map(|(path, _)| path.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF header with one program header of type `ptype`.
    fn elf(class: u8, data: u8, e_type: u16, machine: u16, ptype: u32) -> Vec<u8> {
        let mut head = vec![0u8; 256];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = class;
        head[5] = data;
        // `value`'s low `n` bytes at `at`, in the header's byte order.
        let put = |head: &mut Vec<u8>, at: usize, n: usize, value: u64| {
            let bytes = value.to_le_bytes();
            let field = &mut head[at..at + n];
            field.copy_from_slice(&bytes[..n]);
            if data == 2 {
                field.reverse();
            }
        };
        let put16 = |head: &mut Vec<u8>, at, value: u16| put(head, at, 2, value.into());
        let put32 = |head: &mut Vec<u8>, at, value: u32| put(head, at, 4, value.into());
        put16(&mut head, 16, e_type);
        put16(&mut head, 18, machine);
        if class == 2 {
            put(&mut head, 32, 8, 64);
            put16(&mut head, 54, 56);
            put16(&mut head, 56, 1);
            put32(&mut head, 64, ptype);
        } else {
            put32(&mut head, 28, 52);
            put16(&mut head, 42, 32);
            put16(&mut head, 44, 1);
            put32(&mut head, 52, ptype);
        }
        head
    }

    #[test]
    fn elf_headers_of_both_classes_and_byte_orders_are_read() {
        for (class, data) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            let id = elf_id(&elf(class, data, ET_DYN, 62, PT_DYNAMIC)).expect("an ELF header");
            assert_eq!(
                id,
                ElfId {
                    class,
                    data,
                    machine: 62,
                    dynamic: true
                },
                "class {class} data {data}"
            );
        }
    }

    #[test]
    fn only_executables_and_shared_objects_with_a_dynamic_section_are_dynamic() {
        // PT_LOAD only: static.
        assert!(!elf_id(&elf(2, 1, ET_EXEC, 62, 1)).unwrap().dynamic);
        assert!(elf_id(&elf(2, 1, ET_EXEC, 62, PT_DYNAMIC)).unwrap().dynamic);
        // ET_REL (a kernel module) with PT_DYNAMIC is still not a program.
        assert!(!elf_id(&elf(2, 1, 1, 62, PT_DYNAMIC)).unwrap().dynamic);
    }

    #[test]
    fn what_is_not_a_whole_elf_header_has_no_id() {
        assert_eq!(elf_id(b"#!/bin/sh\necho hi\n"), None);
        let whole = elf(2, 1, ET_DYN, 62, PT_DYNAMIC);
        assert_eq!(elf_id(&whole[..40]), None, "cut in the header");
        assert_eq!(elf_id(&whole[..66]), None, "cut in the program headers");
        let mut odd = whole.clone();
        odd[4] = 3;
        assert_eq!(elf_id(&odd), None, "unknown class");
        // Program headers claimed far beyond the bytes read.
        let mut far = whole;
        far[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(elf_id(&far), None, "program headers out of reach");
    }

    #[test]
    fn rtldlist_is_read_from_glibcs_script() {
        let script = "#! /bin/bash\nTEXTDOMAIN=libc\nRTLDLIST=\"/lib/ld-linux.so.2 /lib64/ld-linux-x86-64.so.2 /libx32/ld-linux-x32.so.2\"\nwarn=\n";
        assert_eq!(
            rtld_list(script).unwrap(),
            [
                "/lib/ld-linux.so.2",
                "/lib64/ld-linux-x86-64.so.2",
                "/libx32/ld-linux-x32.so.2"
            ]
        );
        assert_eq!(
            rtld_list("RTLDLIST=/lib/ld-linux-aarch64.so.1\n").unwrap(),
            ["/lib/ld-linux-aarch64.so.1"]
        );
        assert_eq!(
            rtld_list("#!/bin/sh\nexec /lib/ld-musl-x86_64.so.1 --list \"$@\"\n"),
            None
        );
        assert_eq!(rtld_list("RTLDLIST=\"$(find /lib -name 'ld-*')\"\n"), None);
        assert_eq!(rtld_list("RTLDLIST=\n"), None);
    }

    #[test]
    fn the_loader_is_the_first_built_for_the_files_target() {
        let id = |class, machine| {
            Some(ElfId {
                class,
                data: 1,
                machine,
                dynamic: true,
            })
        };
        let candidates = vec![
            ("/lib/ld-linux.so.2".to_string(), id(1, 3)),
            ("/lib64/missing".to_string(), None),
            ("/lib64/ld-linux-x86-64.so.2".to_string(), id(2, 62)),
            ("/libx32/ld-linux-x32.so.2".to_string(), id(1, 62)),
        ];
        let file = |class, machine| ElfId {
            class,
            data: 1,
            machine,
            dynamic: true,
        };
        assert_eq!(
            choose_rtld(&file(2, 62), &candidates),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(
            choose_rtld(&file(1, 3), &candidates),
            Some("/lib/ld-linux.so.2")
        );
        assert_eq!(
            choose_rtld(&file(1, 62), &candidates),
            Some("/libx32/ld-linux-x32.so.2")
        );
        assert_eq!(
            choose_rtld(&file(2, 183), &candidates),
            None,
            "aarch64: no loader here"
        );
        let big_endian = ElfId {
            data: 2,
            ..file(2, 62)
        };
        assert_eq!(choose_rtld(&big_endian, &candidates), None);
    }
}
