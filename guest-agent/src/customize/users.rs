//! `os.groups` and `os.users`, with the image's own shadow tools in the chroot.
//!
//! As AzL-IC: a missing group or user is added, an existing one is updated (its gid, uid and
//! home cannot change); a password that is not given, or is empty, is locked with `*` (no
//! password login, SSH keys still work, even with sshd's `UsePAM no`); plain-text passwords
//! are hashed here (SHA-512 crypt, as AzL-IC's `openssl passwd -6`) since the agent cannot
//! feed `chpasswd` a standard input; SSH keys are added to `~/.ssh/authorized_keys`.

use std::io::Read;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context};
use sha2::{Digest, Sha512};
use vmic_protocol::{GroupSpec, PasswordSpec, UserSpec};

use super::read_optional;
use crate::build::{output_tail, strings, Build};
use crate::rootfs::scoped_join;

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";
const USERADD_DEFAULTS: &str = "/etc/default/useradd";
/// The shadow password field of a locked account (AzL-IC's choice over `!`, which some sshd
/// builds take as "no login at all").
const LOCKED: &str = "*";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum UsersError {
    #[error("group {group} exists with gid {existing}; its gid cannot be changed to {wanted}")]
    GidChange {
        group: String,
        existing: u32,
        wanted: u32,
    },
    #[error("user {user} exists with uid {existing}; its uid cannot be changed to {wanted}")]
    UidChange {
        user: String,
        existing: u32,
        wanted: u32,
    },
    #[error("user {user} exists with home directory {existing}; it cannot be changed to {wanted}")]
    HomeChange {
        user: String,
        existing: String,
        wanted: String,
    },
    #[error("the password hash of user {user} contains `:` or a line break")]
    BadHash { user: String },
}

/// What the image's `/etc/passwd` says about a user.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

pub(crate) fn apply_groups(
    build: &Build<'_>,
    root: &Path,
    groups: &[GroupSpec],
) -> anyhow::Result<()> {
    for group in groups {
        // Read again each time: an earlier entry may have added this group.
        let existing = group_gid(&read_optional(root, GROUP)?, &group.name);
        match group_command(group, existing)? {
            Some(argv) => {
                build.log(format!("adding group {}", group.name));
                build.run(&argv, Some(root))?;
            }
            None => build.log(format!("group {} exists", group.name)),
        }
    }
    Ok(())
}

pub(crate) fn apply_users(
    build: &Build<'_>,
    root: &Path,
    users: &[UserSpec],
) -> anyhow::Result<()> {
    for user in users {
        apply_user(build, root, user).with_context(|| format!("user {}", user.name))?;
    }
    Ok(())
}

fn apply_user(build: &Build<'_>, root: &Path, user: &UserSpec) -> anyhow::Result<()> {
    let existing = find_user(&read_optional(root, PASSWD)?, &user.name);
    let home_exists = match &existing {
        Some(_) => true,
        None => {
            let home = new_user_home(user, &read_optional(root, USERADD_DEFAULTS)?);
            scoped_join(root, &home)?.is_dir()
        }
    };
    build.log(match existing {
        Some(_) => format!("updating user {}", user.name),
        None => format!("adding user {}", user.name),
    });
    for argv in account_commands(user, existing.as_ref(), home_exists)? {
        build.run(&argv, Some(root))?;
    }

    let field = password_field(user, random_salt)?;
    let argv = vec![
        "usermod".to_owned(),
        "-p".to_owned(),
        field,
        user.name.clone(),
    ];
    let result = build.run_unchecked(&argv, Some(root), Vec::new())?;
    if result.code != 0 {
        // Not `build.run`: its error would carry the argv, and with it the hash.
        bail!(
            "`usermod -p <password> {}` failed with exit code {}{}",
            user.name,
            result.code,
            output_tail(&result)
        );
    }

    if let Some(days) = user.password_expires_days {
        let mut argv = strings(["chage", "-M"]);
        argv.push(days.to_string());
        argv.push(user.name.clone());
        build.run(&argv, Some(root))?;
    }

    if !user.ssh_public_keys.is_empty() {
        let entry = find_user(&read_optional(root, PASSWD)?, &user.name)
            .with_context(|| format!("{} has no entry in the image's {PASSWD}", user.name))?;
        install_authorized_keys(root, &entry, &user.ssh_public_keys)?;
        build.log(format!(
            "{} SSH key(s) authorized for {}",
            user.ssh_public_keys.len(),
            user.name
        ));
    }
    Ok(())
}

fn group_gid(group_file: &str, name: &str) -> Option<u32> {
    group_file.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields[..] {
            [group, _, gid, ..] if group == name => gid.parse().ok(),
            _ => None,
        }
    })
}

fn find_user(passwd: &str, name: &str) -> Option<PasswdEntry> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields[..] {
            [user, _, uid, gid, _, home, ..] if user == name => Some(PasswdEntry {
                name: user.to_owned(),
                uid: uid.parse().ok()?,
                gid: gid.parse().ok()?,
                home: home.to_owned(),
            }),
            _ => None,
        }
    })
}

/// `groupadd` for a missing group; nothing for one that exists with the asked gid (or when
/// none is asked).
fn group_command(
    group: &GroupSpec,
    existing_gid: Option<u32>,
) -> Result<Option<Vec<String>>, UsersError> {
    match (existing_gid, group.gid) {
        (Some(existing), Some(wanted)) if existing != wanted => Err(UsersError::GidChange {
            group: group.name.clone(),
            existing,
            wanted,
        }),
        (Some(_), _) => Ok(None),
        (None, gid) => {
            let mut argv = strings(["groupadd"]);
            if let Some(gid) = gid {
                argv.extend(["-g".to_owned(), gid.to_string()]);
            }
            argv.push(group.name.clone());
            Ok(Some(argv))
        }
    }
}

/// Where `useradd` will put a new user's home: the asked one, else `HOME=` of
/// `/etc/default/useradd` (default `/home`) and the name.
fn new_user_home(user: &UserSpec, useradd_defaults: &str) -> String {
    if let Some(home) = &user.home_directory {
        return home.clone();
    }
    let base = useradd_defaults
        .lines()
        .filter_map(|line| line.trim().strip_prefix("HOME="))
        .map(|value| value.trim().trim_end_matches('/'))
        .next_back()
        .unwrap_or("/home");
    format!("{base}/{}", user.name)
}

/// `useradd` for a new user, `usermod` for the fields given of an existing one. The password,
/// its expiry and the SSH keys are separate steps.
fn account_commands(
    user: &UserSpec,
    existing: Option<&PasswdEntry>,
    home_exists: bool,
) -> Result<Vec<Vec<String>>, UsersError> {
    let mut options: Vec<String> = Vec::new();
    match existing {
        None => {
            // -M: an existing home (e.g. from os.additionalDirs) is used as it is.
            let mut useradd = strings(["useradd", if home_exists { "-M" } else { "-m" }]);
            if let Some(uid) = user.uid {
                push_option(&mut options, "-u", &uid.to_string());
            }
            if let Some(group) = &user.primary_group {
                push_option(&mut options, "-g", group);
            }
            if !user.secondary_groups.is_empty() {
                push_option(&mut options, "-G", &user.secondary_groups.join(","));
            }
            if let Some(home) = &user.home_directory {
                push_option(&mut options, "-d", home);
            }
            if let Some(shell) = &user.startup_command {
                push_option(&mut options, "-s", shell);
            }
            useradd.append(&mut options);
            useradd.push(user.name.clone());
            Ok(vec![useradd])
        }
        Some(entry) => {
            if let Some(wanted) = user.uid.filter(|uid| *uid != entry.uid) {
                return Err(UsersError::UidChange {
                    user: user.name.clone(),
                    existing: entry.uid,
                    wanted,
                });
            }
            let same_home =
                |home: &String| home.trim_end_matches('/') == entry.home.trim_end_matches('/');
            if let Some(wanted) = user.home_directory.as_ref().filter(|h| !same_home(h)) {
                return Err(UsersError::HomeChange {
                    user: user.name.clone(),
                    existing: entry.home.clone(),
                    wanted: wanted.clone(),
                });
            }
            if let Some(group) = &user.primary_group {
                push_option(&mut options, "-g", group);
            }
            if !user.secondary_groups.is_empty() {
                // -a: added to these groups, not removed from others (as AzL-IC).
                options.push("-a".to_owned());
                push_option(&mut options, "-G", &user.secondary_groups.join(","));
            }
            if let Some(shell) = &user.startup_command {
                push_option(&mut options, "-s", shell);
            }
            if options.is_empty() {
                return Ok(Vec::new());
            }
            let mut usermod = strings(["usermod"]);
            usermod.append(&mut options);
            usermod.push(user.name.clone());
            Ok(vec![usermod])
        }
    }
}

fn push_option(argv: &mut Vec<String>, flag: &str, value: &str) {
    argv.push(flag.to_owned());
    argv.push(value.to_owned());
}

/// The shadow password field for `user`: [`LOCKED`] unless a non-empty password is given.
fn password_field(
    user: &UserSpec,
    salt: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    Ok(match &user.password {
        None | Some(PasswordSpec::Locked) => LOCKED.to_owned(),
        Some(PasswordSpec::Hashed(hash) | PasswordSpec::PlainText(hash)) if hash.is_empty() => {
            LOCKED.to_owned()
        }
        Some(PasswordSpec::Hashed(hash)) => {
            if hash.contains([':', '\n', '\r']) {
                return Err(UsersError::BadHash {
                    user: user.name.clone(),
                }
                .into());
            }
            hash.clone()
        }
        Some(PasswordSpec::PlainText(password)) => sha512_crypt(password.as_bytes(), &salt()?),
    })
}

const CRYPT_ALPHABET: &[u8; 64] =
    b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// 16 random characters from the crypt alphabet (the most SHA-512 crypt uses).
fn random_salt() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("reading /dev/urandom for a password salt")?;
    Ok(bytes
        .iter()
        .map(|byte| char::from(CRYPT_ALPHABET[usize::from(byte & 0x3f)]))
        .collect())
}

/// SHA-512 crypt (`$6$`, 5000 rounds), per Ulrich Drepper's "Unix crypt using SHA-256 and
/// SHA-512", the scheme of `openssl passwd -6` and glibc's crypt(3).
fn sha512_crypt(password: &[u8], salt: &str) -> String {
    let salt = &salt.as_bytes()[..salt.len().min(16)];
    let length = password.len();
    let b = Sha512::new()
        .chain_update(password)
        .chain_update(salt)
        .chain_update(password)
        .finalize();
    let mut a = Sha512::new();
    a.update(password);
    a.update(salt);
    let mut remaining = length;
    while remaining > 64 {
        a.update(b.as_slice());
        remaining -= 64;
    }
    a.update(&b[..remaining]);
    let mut bits = length;
    while bits > 0 {
        if bits & 1 == 1 {
            a.update(b.as_slice());
        } else {
            a.update(password);
        }
        bits >>= 1;
    }
    let a = a.finalize();

    let mut dp = Sha512::new();
    for _ in 0..length {
        dp.update(password);
    }
    let p_bytes: Vec<u8> = dp.finalize().iter().copied().cycle().take(length).collect();
    let mut ds = Sha512::new();
    for _ in 0..16 + usize::from(a[0]) {
        ds.update(salt);
    }
    let s_bytes: Vec<u8> = ds
        .finalize()
        .iter()
        .copied()
        .cycle()
        .take(salt.len())
        .collect();

    let mut c = a;
    for round in 0..5000 {
        let mut h = Sha512::new();
        if round % 2 == 1 {
            h.update(&p_bytes);
        } else {
            h.update(c.as_slice());
        }
        if round % 3 != 0 {
            h.update(&s_bytes);
        }
        if round % 7 != 0 {
            h.update(&p_bytes);
        }
        if round % 2 == 1 {
            h.update(c.as_slice());
        } else {
            h.update(&p_bytes);
        }
        c = h.finalize();
    }

    let mut out = format!("$6${}$", String::from_utf8_lossy(salt));
    let mut push = |b2: u8, b1: u8, b0: u8, chars: usize| {
        let mut word = u32::from(b2) << 16 | u32::from(b1) << 8 | u32::from(b0);
        for _ in 0..chars {
            out.push(char::from(CRYPT_ALPHABET[(word & 0x3f) as usize]));
            word >>= 6;
        }
    };
    // The scheme's byte order: triples (i, i+21, i+42), rotated by one more each time.
    for i in 0..21 {
        let (x, y, z) = (c[i], c[i + 21], c[i + 42]);
        match i % 3 {
            0 => push(x, y, z, 4),
            1 => push(y, z, x, 4),
            _ => push(z, x, y, 4),
        }
    }
    push(0, 0, c[63], 2);
    out
}

/// `existing` with each key not in it yet appended, one per line.
fn merge_authorized_keys(existing: &str, keys: &[String]) -> String {
    let mut out = existing.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let mut present: Vec<String> = existing.lines().map(|l| l.trim().to_owned()).collect();
    for key in keys.iter().flat_map(|key| key.lines()).map(str::trim) {
        if key.is_empty() || present.iter().any(|line| line == key) {
            continue;
        }
        out.push_str(key);
        out.push('\n');
        present.push(key.to_owned());
    }
    out
}

/// Add `keys` to the user's `~/.ssh/authorized_keys`: `.ssh` 0700 and the file 0600, both
/// owned by the user and their primary group.
fn install_authorized_keys(root: &Path, user: &PasswdEntry, keys: &[String]) -> anyhow::Result<()> {
    let home = scoped_join(root, &user.home)?;
    if !home.is_dir() {
        bail!(
            "the home directory {} of {} does not exist in the image",
            user.home,
            user.name
        );
    }
    let ssh_dir = home.join(".ssh");
    let shown_dir = format!("{}/.ssh", user.home.trim_end_matches('/'));
    // Never follow a link here: chown through it could hand any file of the image to the user.
    match std::fs::symlink_metadata(&ssh_dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => bail!("{shown_dir} exists and is not a directory"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(&ssh_dir).with_context(|| format!("creating {shown_dir}"))?;
        }
        Err(error) => return Err(error).with_context(|| format!("inspecting {shown_dir}")),
    }
    set_owner_and_mode(&ssh_dir, user, 0o700, &shown_dir)?;

    let keys_path = ssh_dir.join("authorized_keys");
    let shown_keys = format!("{shown_dir}/authorized_keys");
    let existing = match std::fs::symlink_metadata(&keys_path) {
        Ok(meta) if meta.is_file() => {
            std::fs::read_to_string(&keys_path).with_context(|| format!("reading {shown_keys}"))?
        }
        Ok(_) => bail!("{shown_keys} exists and is not a regular file"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(error).with_context(|| format!("inspecting {shown_keys}")),
    };
    std::fs::write(&keys_path, merge_authorized_keys(&existing, keys))
        .with_context(|| format!("writing {shown_keys}"))?;
    set_owner_and_mode(&keys_path, user, 0o600, &shown_keys)
}

fn set_owner_and_mode(
    path: &Path,
    user: &PasswdEntry,
    mode: u32,
    shown: &str,
) -> anyhow::Result<()> {
    chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("giving {shown} to {}", user.name))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the permissions of {shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/bash\n\
                               alice:x:1000:1000::/home/alice:/bin/sh\n";

    fn user(name: &str) -> UserSpec {
        UserSpec {
            name: name.to_owned(),
            ..UserSpec::default()
        }
    }

    fn no_salt() -> anyhow::Result<String> {
        panic!("no salt is needed here")
    }

    #[test]
    fn sha512_crypt_matches_openssl_passwd_6() {
        // `openssl passwd -6 -salt saltstring 'Hello world!'` (also Drepper's test vector).
        assert_eq!(
            sha512_crypt(b"Hello world!", "saltstring"),
            "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
        );
        // Longer than one SHA-512 block, short salt from every part of the alphabet.
        assert_eq!(
            sha512_crypt(
                b"a much longer password that goes past sixty-four bytes in length for the block path!!",
                "Zz./09"
            ),
            "$6$Zz./09$fPYSLtvipBPvVLdfnuuDqpRpla2hqX5w33LTl.5uuMz4EUELFuBqIACrRn0EFUlidDYkz0wsctP65Ae6vEMYX/"
        );
    }

    #[test]
    fn salts_are_sixteen_crypt_characters() {
        let salt = random_salt().expect("salt");
        assert_eq!(salt.len(), 16);
        assert!(salt.bytes().all(|b| CRYPT_ALPHABET.contains(&b)));
    }

    #[test]
    fn passwords_are_locked_unless_given() {
        let mut spec = user("alice");
        assert_eq!(password_field(&spec, no_salt).expect("none"), "*");
        spec.password = Some(PasswordSpec::Locked);
        assert_eq!(password_field(&spec, no_salt).expect("locked"), "*");
        spec.password = Some(PasswordSpec::PlainText(String::new()));
        assert_eq!(password_field(&spec, no_salt).expect("empty"), "*");
        spec.password = Some(PasswordSpec::Hashed("$6$s$h".into()));
        assert_eq!(password_field(&spec, no_salt).expect("hashed"), "$6$s$h");
        spec.password = Some(PasswordSpec::PlainText("Hello world!".into()));
        let hash = password_field(&spec, || Ok("saltstring".into())).expect("plain");
        assert!(hash.starts_with("$6$saltstring$svn8"));
        spec.password = Some(PasswordSpec::Hashed("a:b".into()));
        let error = password_field(&spec, no_salt).expect_err("colon");
        assert_eq!(
            error.downcast_ref::<UsersError>(),
            Some(&UsersError::BadHash {
                user: "alice".into()
            })
        );
    }

    #[test]
    fn groups_are_added_once_and_keep_their_gid() {
        let group = "wheel:x:10:alice\ndocker:x:990:\n";
        let spec = |name: &str, gid| GroupSpec {
            name: name.to_owned(),
            gid,
        };
        assert_eq!(group_gid(group, "docker"), Some(990));
        assert_eq!(group_gid(group, "dock"), None);
        assert_eq!(
            group_command(&spec("app", Some(2000)), group_gid(group, "app")),
            Ok(Some(strings(["groupadd", "-g", "2000", "app"])))
        );
        assert_eq!(
            group_command(&spec("app", None), None),
            Ok(Some(strings(["groupadd", "app"])))
        );
        assert_eq!(group_command(&spec("docker", None), Some(990)), Ok(None));
        assert_eq!(
            group_command(&spec("docker", Some(990)), Some(990)),
            Ok(None)
        );
        assert_eq!(
            group_command(&spec("docker", Some(991)), Some(990)),
            Err(UsersError::GidChange {
                group: "docker".into(),
                existing: 990,
                wanted: 991
            })
        );
    }

    #[test]
    fn new_users_get_useradd_with_every_field() {
        let spec = UserSpec {
            uid: Some(1500),
            primary_group: Some("users".into()),
            secondary_groups: vec!["wheel".into(), "docker".into()],
            startup_command: Some("/bin/zsh".into()),
            home_directory: Some("/srv/bob".into()),
            ..user("bob")
        };
        assert_eq!(
            account_commands(&spec, None, false),
            Ok(vec![strings([
                "useradd",
                "-m",
                "-u",
                "1500",
                "-g",
                "users",
                "-G",
                "wheel,docker",
                "-d",
                "/srv/bob",
                "-s",
                "/bin/zsh",
                "bob"
            ])])
        );
        assert_eq!(
            account_commands(&user("bob"), None, true),
            Ok(vec![strings(["useradd", "-M", "bob"])])
        );
        assert_eq!(new_user_home(&spec, ""), "/srv/bob");
        assert_eq!(new_user_home(&user("bob"), ""), "/home/bob");
        assert_eq!(
            new_user_home(&user("bob"), "GROUP=100\nHOME=/users/\n"),
            "/users/bob"
        );
    }

    #[test]
    fn existing_users_are_updated_but_keep_uid_and_home() {
        let alice = find_user(PASSWD_TEXT, "alice").expect("alice");
        assert_eq!(
            alice,
            PasswdEntry {
                name: "alice".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice".into()
            }
        );
        assert_eq!(find_user(PASSWD_TEXT, "bob"), None);
        assert_eq!(
            account_commands(&user("alice"), Some(&alice), true),
            Ok(vec![])
        );
        let spec = UserSpec {
            uid: Some(1000),
            home_directory: Some("/home/alice/".into()),
            primary_group: Some("staff".into()),
            secondary_groups: vec!["wheel".into()],
            startup_command: Some("/bin/bash".into()),
            ..user("alice")
        };
        assert_eq!(
            account_commands(&spec, Some(&alice), true),
            Ok(vec![strings([
                "usermod",
                "-g",
                "staff",
                "-a",
                "-G",
                "wheel",
                "-s",
                "/bin/bash",
                "alice"
            ])])
        );
        let uid = UserSpec {
            uid: Some(1001),
            ..user("alice")
        };
        assert_eq!(
            account_commands(&uid, Some(&alice), true),
            Err(UsersError::UidChange {
                user: "alice".into(),
                existing: 1000,
                wanted: 1001
            })
        );
        let home = UserSpec {
            home_directory: Some("/srv/alice".into()),
            ..user("alice")
        };
        assert!(matches!(
            account_commands(&home, Some(&alice), true),
            Err(UsersError::HomeChange { .. })
        ));
    }

    #[test]
    fn authorized_keys_are_appended_once() {
        let keys = vec![
            "ssh-ed25519 AAAA one".to_owned(),
            " ssh-ed25519 BBBB two \n".to_owned(),
        ];
        let once = merge_authorized_keys("ssh-rsa CCCC old", &keys);
        assert_eq!(
            once,
            "ssh-rsa CCCC old\nssh-ed25519 AAAA one\nssh-ed25519 BBBB two\n"
        );
        assert_eq!(merge_authorized_keys(&once, &keys), once);
        assert_eq!(
            merge_authorized_keys("", &keys[..1]),
            "ssh-ed25519 AAAA one\n"
        );
    }

    #[test]
    fn authorized_keys_are_installed_with_owner_and_modes() {
        let image = tempfile::tempdir().expect("tempdir");
        let root = image.path();
        std::fs::create_dir_all(root.join("home/alice")).expect("mkdir");
        // SAFETY: getuid/getgid cannot fail and have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let alice = PasswdEntry {
            name: "alice".into(),
            uid,
            gid,
            home: "/home/alice".into(),
        };
        let keys = vec!["ssh-ed25519 AAAA one".to_owned()];
        install_authorized_keys(root, &alice, &keys).expect("install");
        install_authorized_keys(root, &alice, &keys).expect("install again");
        let file = root.join("home/alice/.ssh/authorized_keys");
        assert_eq!(
            std::fs::read_to_string(&file).expect("read"),
            "ssh-ed25519 AAAA one\n"
        );
        let dir_meta = std::fs::metadata(root.join("home/alice/.ssh")).expect("stat");
        let file_meta = std::fs::metadata(&file).expect("stat");
        assert_eq!(dir_meta.mode() & 0o7777, 0o700);
        assert_eq!(file_meta.mode() & 0o7777, 0o600);
        assert_eq!((file_meta.uid(), file_meta.gid()), (uid, gid));

        // A link where .ssh goes is refused rather than followed.
        std::fs::create_dir_all(root.join("home/eve")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", root.join("home/eve/.ssh")).expect("symlink");
        let eve = PasswdEntry {
            name: "eve".into(),
            home: "/home/eve".into(),
            ..alice
        };
        assert!(install_authorized_keys(root, &eve, &keys).is_err());
        let missing = PasswdEntry {
            home: "/home/nobody".into(),
            ..eve
        };
        assert!(install_authorized_keys(root, &missing, &keys).is_err());
    }
}
