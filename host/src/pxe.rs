//! PXE artifacts on the host. The builder VM writes them as one tar stream on the output disk:
//! guest data, so every entry is checked ([`check_entry`]: regular files with plain relative
//! paths, bounded in count and size) before it becomes the `pxe-dir` directory or the
//! `pxe-tar` archive, which vmic writes itself (owners root, modes 0644/0755, the entries'
//! times, gzip without a name or time: the same artifacts give the same bytes). `vmic boot
//! --media pxe` reads a directory or archive of them with the same checks.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// At most this many files: a PXE root holds a few boot files and the user's additions.
pub const MAX_ENTRIES: usize = 10_000;
/// Longest relative path accepted.
pub const MAX_PATH_LEN: usize = 1024;

/// One file of the artifacts, found in a checked tar stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Relative, `/`-separated, every component a plain name.
    pub path: String,
    /// Where the content starts in the stream (seekable streams only).
    pub offset: u64,
    pub size: u64,
    /// 0o755 when any execute bit was set, else 0o644: nothing else of the guest's mode.
    pub mode: u32,
    pub mtime: u64,
}

/// Checks a tar entry's path: relative, plain names only, no NUL, bounded.
pub fn check_path(path: &[u8]) -> anyhow::Result<String> {
    let text = std::str::from_utf8(path).context("a PXE artifact's name is not UTF-8")?;
    let text = text.strip_suffix('/').unwrap_or(text);
    if text.is_empty() || text.len() > MAX_PATH_LEN || text.contains('\0') {
        bail!("a PXE artifact's name is empty, too long or has a NUL: {text:?}");
    }
    // By segment, not Path::components, which quietly drops `.`.
    let plain = text
        .split('/')
        .all(|segment| !segment.is_empty() && segment != "." && segment != "..");
    if !plain {
        bail!("a PXE artifact's name is not a plain relative path: {text:?}");
    }
    Ok(text.to_string())
}

/// The artifact an entry describes: `None` for a directory (directories are made from the
/// files' paths); an error for anything but a regular file or a directory.
pub fn check_entry<R: Read>(entry: &tar::Entry<'_, R>) -> anyhow::Result<Option<Artifact>> {
    let header = entry.header();
    let path = check_path(&entry.path_bytes())?;
    match header.entry_type() {
        tar::EntryType::Directory => Ok(None),
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let mode = header.mode().context("a PXE artifact's mode")?;
            Ok(Some(Artifact {
                offset: entry.raw_file_position(),
                size: entry.size(),
                mode: if mode & 0o111 != 0 { 0o755 } else { 0o644 },
                mtime: header.mtime().context("a PXE artifact's time")?,
                path,
            }))
        }
        other => bail!("the PXE artifact {path} is a {other:?}, not a regular file"),
    }
}

/// Every artifact of a seekable tar stream whose first `size` bytes are the archive.
pub fn read_artifacts<R: Read + Seek>(reader: R, size: u64) -> anyhow::Result<Vec<Artifact>> {
    let mut archive = tar::Archive::new(reader);
    let mut artifacts: Vec<Artifact> = Vec::new();
    for entry in archive
        .entries_with_seek()
        .context("reading the PXE artifacts")?
    {
        let entry = entry.context("reading the PXE artifacts")?;
        let Some(artifact) = check_entry(&entry)? else {
            continue;
        };
        if artifact.offset.saturating_add(artifact.size) > size {
            bail!(
                "the PXE artifact {} runs past the stream the builder VM vouched for",
                artifact.path
            );
        }
        push_checked(&mut artifacts, artifact)?;
    }
    if artifacts.is_empty() {
        bail!("the builder VM wrote no PXE artifacts");
    }
    Ok(artifacts)
}

fn push_checked(artifacts: &mut Vec<Artifact>, artifact: Artifact) -> anyhow::Result<()> {
    if artifacts.len() >= MAX_ENTRIES {
        bail!("more than {MAX_ENTRIES} PXE artifacts");
    }
    let clash = artifacts.iter().any(|other| {
        other.path == artifact.path
            || artifact.path.starts_with(&format!("{}/", other.path))
            || other.path.starts_with(&format!("{}/", artifact.path))
    });
    if clash {
        bail!("the PXE artifact {} is named twice", artifact.path);
    }
    artifacts.push(artifact);
    Ok(())
}

/// The artifacts copied out of `stream` into the new directory `dir` (its parent must exist;
/// it must not). Returns the `sha256sum` lines of the files, with paths under `name`.
pub fn write_dir(
    stream: &Path,
    artifacts: &[Artifact],
    dir: &Path,
    name: &str,
) -> anyhow::Result<String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    fs_err::create_dir(dir)?;
    let mut source = fs_err::File::open(stream)?;
    let mut manifest = String::new();
    let mut sorted: Vec<&Artifact> = artifacts.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for artifact in sorted {
        let target = dir.join(&artifact.path);
        if let Some(parent) = target.parent() {
            fs_err::create_dir_all(parent)?;
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(artifact.mode)
            .open(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        source.seek(SeekFrom::Start(artifact.offset))?;
        let mut hashing = HashingReader::new((&mut source).take(artifact.size));
        let copied = std::io::copy(&mut hashing, &mut out)?;
        if copied != artifact.size {
            bail!("the PXE artifact {} is cut short", artifact.path);
        }
        out.set_permissions(std::fs::Permissions::from_mode(artifact.mode))?;
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(artifact.mtime);
        out.set_modified(time)?;
        manifest.push_str(&format!(
            "{}  {name}/{}\n",
            hex::encode(hashing.finish()),
            artifact.path
        ));
    }
    Ok(manifest)
}

/// The artifacts as a `.tar.gz` at `output` (created), entries in path order.
pub fn write_tar_gz(stream: &Path, artifacts: &[Artifact], output: &Path) -> anyhow::Result<()> {
    let file = fs_err::File::create_new(output)?;
    // No file name and time 0 in the gzip header: the archive depends on the artifacts only.
    let gzip = flate2::GzBuilder::new().mtime(0).write(
        std::io::BufWriter::new(file),
        flate2::Compression::default(),
    );
    let mut tar = tar::Builder::new(gzip);
    let mut source = fs_err::File::open(stream)?;
    let mut sorted: Vec<&Artifact> = artifacts.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for artifact in sorted {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(artifact.size);
        header.set_mode(artifact.mode);
        header.set_mtime(artifact.mtime);
        header.set_uid(0);
        header.set_gid(0);
        source.seek(SeekFrom::Start(artifact.offset))?;
        tar.append_data(
            &mut header,
            &artifact.path,
            (&mut source).take(artifact.size),
        )
        .with_context(|| format!("writing {} to {}", artifact.path, output.display()))?;
    }
    let gzip = tar.into_inner()?;
    let mut file = gzip.finish()?;
    file.flush()?;
    file.into_inner()
        .map_err(|error| error.into_error())?
        .sync_all()?;
    Ok(())
}

/// A directory of PXE artifacts to boot: `path` itself, or an archive (`.tar`, `.tar.gz`)
/// unpacked below `scratch` with the same checks as the builder's stream.
pub fn artifacts_dir(path: &Path, scratch: &Path) -> anyhow::Result<PathBuf> {
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let mut archive = open_archive(path)?;
    let dir = scratch.join("pxe");
    fs_err::create_dir(&dir)?;
    let mut seen: Vec<Artifact> = Vec::new();
    for entry in archive
        .entries()
        .with_context(|| format!("{} is not a tar archive of PXE artifacts", path.display()))?
    {
        let mut entry =
            entry.with_context(|| format!("reading {} as a tar archive", path.display()))?;
        let Some(artifact) = check_entry(&entry).with_context(|| {
            format!("{} holds something else than PXE artifacts", path.display())
        })?
        else {
            continue;
        };
        push_checked(&mut seen, artifact.clone())?;
        let target = dir.join(&artifact.path);
        if let Some(parent) = target.parent() {
            fs_err::create_dir_all(parent)?;
        }
        let mut out = fs_err::File::create_new(&target)?;
        std::io::copy(&mut (&mut entry).take(artifact.size), &mut out)?;
    }
    if seen.is_empty() {
        bail!("{} holds no PXE artifacts", path.display());
    }
    Ok(dir)
}

/// The file the firmware's PXE loads first (shim), as the artifacts name it.
pub fn boot_file_name(arch: crate::cli::Arch) -> &'static str {
    match arch {
        crate::cli::Arch::X86_64 => "bootx64.efi",
        crate::cli::Arch::Aarch64 => "bootaa64.efi",
    }
}

/// The artifacts' architecture, from the boot file they carry (a directory or an archive).
pub fn boot_arch(path: &Path) -> anyhow::Result<crate::cli::Arch> {
    use crate::cli::Arch;
    let arch_of = |name: &str| {
        [Arch::X86_64, Arch::Aarch64]
            .into_iter()
            .find(|arch| name == boot_file_name(*arch))
    };
    // x86_64's boot file wins when both are there.
    let found = if path.is_dir() {
        let names = fs_err::read_dir(path)?
            .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        [Arch::X86_64, Arch::Aarch64]
            .into_iter()
            .find(|arch| names.iter().any(|name| name == boot_file_name(*arch)))
    } else {
        // Stops at x86_64's boot file: what follows it (the bootstrap ISO) is not decompressed.
        let mut archive = open_archive(path)?;
        let mut found = None;
        for entry in archive
            .entries()
            .with_context(|| format!("{} is not a tar archive of PXE artifacts", path.display()))?
            .take(MAX_ENTRIES)
        {
            let entry = entry.with_context(|| format!("reading {}", path.display()))?;
            match arch_of(&String::from_utf8_lossy(&entry.path_bytes())) {
                Some(Arch::X86_64) => return Ok(Arch::X86_64),
                Some(arch) => found = Some(arch),
                None => {}
            }
        }
        found
    };
    found.with_context(|| {
        format!(
            "{} has neither bootx64.efi nor bootaa64.efi at its top: not PXE artifacts (or pass --arch)",
            path.display()
        )
    })
}

/// A tar archive, plain or gzipped (told by gzip's magic bytes, not by the file's name).
fn open_archive(path: &Path) -> anyhow::Result<tar::Archive<Box<dyn Read>>> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(fs_err::File::open(path)?);
    let gzip = reader.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = match gzip {
        true => Box::new(flate2::read::GzDecoder::new(reader)),
        false => Box::new(reader),
    };
    Ok(tar::Archive::new(reader))
}

/// The loopback port that serves the artifacts' bootstrap ISO: their grub.cfg fetches it from
/// `root=live:http://10.0.2.2:PORT/...`, and 10.0.2.2 is the host in QEMU's user network.
/// `None`: no bootstrap ISO, or one fetched from elsewhere (that server must be up).
pub fn served_bootstrap(dir: &Path) -> anyhow::Result<Option<u16>> {
    const GRUB_CFG: &str = "boot/grub2/grub.cfg";
    let path = dir.join(GRUB_CFG);
    if !path.is_file() {
        return Ok(None);
    }
    let mut text = String::new();
    fs_err::File::open(&path)?
        .take(1 << 20)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(bootstrap_port(&text))
}

/// [`served_bootstrap`]'s reading of a grub.cfg.
pub fn bootstrap_port(grub_cfg: &str) -> Option<u16> {
    let url = grub_cfg
        .split_whitespace()
        .map(|word| word.trim_matches(['\'', '"']))
        .find_map(|word| word.strip_prefix("root=live:"))?;
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (authority, 80),
    };
    (host == "10.0.2.2").then_some(port)
}

/// A minimal HTTP/1.1 file server for `vmic boot --media pxe`: GET and HEAD of the regular
/// files below one directory, nothing else. Stops when dropped.
pub struct HttpServer {
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    pub async fn start(port: u16, root: PathBuf) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on 127.0.0.1:{port}, where the artifacts fetch their ISO (http://10.0.2.2:{port}/ in QEMU's user network); free the port"
                )
            })?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let root = root.clone();
                tokio::spawn(async move {
                    let _ = serve_one(stream, &root).await;
                });
            }
        });
        Ok(HttpServer { task })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request on one connection (`Connection: close`).
async fn serve_one(mut stream: tokio::net::TcpStream, root: &Path) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    let read_head = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let read = stream.read(&mut buffer).await?;
            request.extend_from_slice(&buffer[..read]);
            // Checked after the read: a client that stops past the bound is not waited for.
            if read == 0 || request.len() > 8192 {
                return Err(std::io::Error::other("no complete request head"));
            }
        }
        Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read_head)
        .await
        .map_err(|_| std::io::Error::other("request head timed out"))??;
    let line = String::from_utf8_lossy(&request);
    let mut words = line.lines().next().unwrap_or("").split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let file = target
        .split(['?', '#'])
        .next()
        .and_then(|path| path.strip_prefix('/'))
        .and_then(|path| check_path(path.as_bytes()).ok())
        .map(|path| root.join(path))
        .filter(|path| {
            std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_file())
        });
    let status = match (method, &file) {
        ("GET" | "HEAD", Some(_)) => "200 OK",
        ("GET" | "HEAD", None) => "404 Not Found",
        _ => "405 Method Not Allowed",
    };
    let opened = match (&file, status) {
        (Some(path), "200 OK") => Some(tokio::fs::File::open(path).await?),
        _ => None,
    };
    let length = match &opened {
        Some(file) => file.metadata().await?.len(),
        None => 0,
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {length}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    if let (Some(mut file), "GET") = (opened, method) {
        tokio::io::copy(&mut file, &mut stream).await?;
    }
    stream.shutdown().await
}

/// sha256 of what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R> HashingReader<R> {
    fn new(inner: R) -> Self {
        use sha2::Digest;
        HashingReader {
            inner,
            hasher: sha2::Sha256::new(),
        }
    }

    fn finish(self) -> [u8; 32] {
        use sha2::Digest;
        self.hasher.finalize().into()
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let read = self.inner.read(buf)?;
        self.hasher.update(&buf[..read]);
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar stream as a hostile builder VM might write it: raw headers, whatever they say.
    fn stream(entries: &[(&str, tar::EntryType, &[u8], u32)]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, kind, data, mode) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(*mode);
            header.set_mtime(1_700_000_000);
            // Bypass the crate's own path checks: write the name bytes as they come.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            tar.append(&header, *data).expect("append");
        }
        tar.into_inner().expect("finish")
    }

    fn read(bytes: &[u8]) -> anyhow::Result<Vec<Artifact>> {
        read_artifacts(std::io::Cursor::new(bytes), bytes.len() as u64)
    }

    #[test]
    fn a_builder_stream_becomes_a_directory_and_an_archive_with_the_same_content() {
        let bytes = stream(&[
            (
                "boot/grub2/grub.cfg",
                tar::EntryType::Regular,
                b"menuentry",
                0o644,
            ),
            ("bootx64.efi", tar::EntryType::Regular, b"shim", 0o4755),
            ("boot/", tar::EntryType::Directory, b"", 0o755),
        ]);
        let artifacts = read(&bytes).expect("a good stream");
        assert_eq!(
            artifacts
                .iter()
                .map(|a| (a.path.as_str(), a.mode))
                .collect::<Vec<_>>(),
            [("boot/grub2/grub.cfg", 0o644), ("bootx64.efi", 0o755)],
            "setuid and the rest of the guest's mode are dropped"
        );
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        fs_err::write(&raw, &bytes).unwrap();
        let out = dir.path().join("pxe");
        let manifest = write_dir(&raw, &artifacts, &out, "pxe").unwrap();
        assert_eq!(
            fs_err::read(out.join("boot/grub2/grub.cfg")).unwrap(),
            b"menuentry"
        );
        assert_eq!(
            manifest,
            format!(
                "{}  pxe/boot/grub2/grub.cfg\n{}  pxe/bootx64.efi\n",
                vmic_protocol::hex_digest(&vmic_protocol::sha256(b"menuentry")),
                vmic_protocol::hex_digest(&vmic_protocol::sha256(b"shim"))
            )
        );
        let tarball = dir.path().join("pxe.tar.gz");
        write_tar_gz(&raw, &artifacts, &tarball).unwrap();
        let again = dir.path().join("again.tar.gz");
        write_tar_gz(&raw, &artifacts, &again).unwrap();
        assert_eq!(
            fs_err::read(&tarball).unwrap(),
            fs_err::read(&again).unwrap()
        );
        let unpacked = artifacts_dir(&tarball, &tempfile::tempdir().unwrap().keep()).unwrap();
        assert_eq!(fs_err::read(unpacked.join("bootx64.efi")).unwrap(), b"shim");
    }

    #[test]
    fn links_devices_escaping_names_and_duplicates_are_refused() {
        for (entries, why) in [
            (
                vec![("../etc/passwd", tar::EntryType::Regular, &b"x"[..], 0o644)],
                "not a plain relative path",
            ),
            (
                vec![("/etc/passwd", tar::EntryType::Regular, &b"x"[..], 0o644)],
                "not a plain relative path",
            ),
            (
                vec![("a/./b", tar::EntryType::Regular, &b"x"[..], 0o644)],
                "not a plain relative path",
            ),
            (
                vec![("link", tar::EntryType::Symlink, &b""[..], 0o777)],
                "not a regular file",
            ),
            (
                vec![("hard", tar::EntryType::Link, &b""[..], 0o644)],
                "not a regular file",
            ),
            (
                vec![("dev", tar::EntryType::Char, &b""[..], 0o644)],
                "not a regular file",
            ),
            (
                vec![
                    ("a", tar::EntryType::Regular, &b"x"[..], 0o644),
                    ("a", tar::EntryType::Regular, &b"y"[..], 0o644),
                ],
                "named twice",
            ),
            (
                vec![
                    ("a", tar::EntryType::Regular, &b"x"[..], 0o644),
                    ("a/b", tar::EntryType::Regular, &b"y"[..], 0o644),
                ],
                "named twice",
            ),
        ] {
            let error = read(&stream(&entries)).expect_err(why);
            assert!(format!("{error:#}").contains(why), "{why}: {error:#}");
        }
        let error = read(&stream(&[])).expect_err("empty");
        assert!(error.to_string().contains("no PXE artifacts"));
    }

    #[test]
    fn the_served_port_is_the_one_a_bootstrap_url_on_the_user_networks_host_names() {
        let line = |url: &str| format!("linux /boot/vmlinuz root={url} ip=dhcp\n");
        assert_eq!(
            bootstrap_port(&line("live:http://10.0.2.2:8080/image.iso")),
            Some(8080)
        );
        assert_eq!(
            bootstrap_port("linux /v 'root=live:http://10.0.2.2/x/image.iso' ip=dhcp\n"),
            Some(80)
        );
        assert_eq!(
            bootstrap_port(&line("live:http://192.0.2.1:8080/image.iso")),
            None
        );
        assert_eq!(
            bootstrap_port(&line("live:tftp://10.0.2.2/image.iso")),
            None
        );
        assert_eq!(bootstrap_port(&line("live:LABEL=CDROM")), None);
        assert_eq!(bootstrap_port("linux /boot/vmlinuz\n"), None);
    }

    #[tokio::test]
    async fn the_http_server_serves_files_below_its_root_and_nothing_else() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(dir.path().join("image.iso"), b"ISO!").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let _server = HttpServer::start(port, dir.path().to_path_buf())
            .await
            .unwrap();
        let get = |request: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let ok = get("GET /image.iso HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nISO!"),
            "{ok}"
        );
        assert!(ok.contains("Content-Length: 4\r\n"));
        let head = get("HEAD /image.iso HTTP/1.1\r\n\r\n").await;
        assert!(
            head.contains("Content-Length: 4") && !head.contains("ISO!"),
            "{head}"
        );
        for path in ["/../etc/passwd", "/link", "/missing", "/"] {
            let request: &'static str =
                Box::leak(format!("GET {path} HTTP/1.1\r\n\r\n").into_boxed_str());
            assert!(get(request).await.starts_with("HTTP/1.1 404"), "{path}");
        }
        assert!(get("PUT /image.iso HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        // A head that never ends is cut off at its bound, not read for ever: the server
        // closes the connection while the client still holds it open.
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        stream.write_all(&[b'A'; 9000]).await.unwrap();
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            stream.read_to_end(&mut answer),
        )
        .await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "closed without an answer: {closed:?}"
        );
    }

    #[tokio::test]
    async fn a_dropped_http_server_stops_listening() {
        let dir = tempfile::tempdir().unwrap();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let server = HttpServer::start(port, dir.path().to_path_buf())
            .await
            .unwrap();
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok());
        drop(server);
        // The aborted task (and its listener) is dropped the next time the runtime turns.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "nothing listens after the boot"
        );
    }

    #[test]
    fn names_are_bounded_and_plain() {
        let long = "a".repeat(MAX_PATH_LEN);
        assert_eq!(check_path(long.as_bytes()).unwrap(), long);
        assert!(check_path(format!("{long}b").as_bytes()).is_err());
        assert_eq!(check_path(b"dir/").unwrap(), "dir");
        for bad in [&b""[..], b"/", b"a\0b", b"a//b", b"./a", b"a/..", b"\xff"] {
            assert!(
                check_path(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn archives_plain_or_gzipped_give_their_arch_and_unpack_with_times_kept() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = stream(&[
            ("bootaa64.efi", tar::EntryType::Regular, b"shim", 0o644),
            (
                "boot/grub2/grub.cfg",
                tar::EntryType::Regular,
                b"linux /v root=live:http://10.0.2.2:9/i.iso",
                0o644,
            ),
        ]);
        let plain = dir.path().join("plain.tar");
        fs_err::write(&plain, &bytes).unwrap();
        let gzipped = dir.path().join("pxe.tar.gz");
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&bytes).unwrap();
        fs_err::write(&gzipped, gzip.finish().unwrap()).unwrap();
        for (archive, scratch) in [(&plain, "one"), (&gzipped, "two")] {
            assert_eq!(
                boot_arch(archive).unwrap(),
                crate::cli::Arch::Aarch64,
                "{archive:?}"
            );
            let scratch = dir.path().join(scratch);
            fs_err::create_dir(&scratch).unwrap();
            let unpacked = artifacts_dir(archive, &scratch).unwrap();
            assert_eq!(
                fs_err::read(unpacked.join("bootaa64.efi")).unwrap(),
                b"shim"
            );
            assert_eq!(served_bootstrap(&unpacked).unwrap(), Some(9));
            // A directory is booted where it is, with the same answers.
            assert_eq!(artifacts_dir(&unpacked, &scratch).unwrap(), unpacked);
            assert_eq!(boot_arch(&unpacked).unwrap(), crate::cli::Arch::Aarch64);
        }
        let x86 = dir.path().join("x86");
        fs_err::create_dir(&x86).unwrap();
        fs_err::write(x86.join(boot_file_name(crate::cli::Arch::X86_64)), b"shim").unwrap();
        assert_eq!(boot_file_name(crate::cli::Arch::X86_64), "bootx64.efi");
        assert_eq!(boot_arch(&x86).unwrap(), crate::cli::Arch::X86_64);
        assert_eq!(
            served_bootstrap(&x86).unwrap(),
            None,
            "no grub.cfg, nothing to serve"
        );
        let neither = dir.path().join("neither");
        fs_err::create_dir(&neither).unwrap();
        assert!(boot_arch(&neither)
            .unwrap_err()
            .to_string()
            .contains("neither bootx64.efi"));
    }

    #[test]
    fn written_files_keep_the_entries_time() {
        let bytes = stream(&[("a", tar::EntryType::Regular, b"x", 0o644)]);
        let artifacts = read(&bytes).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        fs_err::write(&raw, &bytes).unwrap();
        write_dir(&raw, &artifacts, &dir.path().join("out"), "out").unwrap();
        let modified = fs_err::metadata(dir.path().join("out/a"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(
            modified,
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)
        );
    }

    #[test]
    fn an_entry_past_the_vouched_size_is_refused() {
        let bytes = stream(&[("a", tar::EntryType::Regular, b"0123456789", 0o644)]);
        let error = read_artifacts(std::io::Cursor::new(&bytes), 521).expect_err("past the end");
        assert!(error.to_string().contains("runs past"), "{error}");
        // Ending exactly at the vouched size is fine.
        assert_eq!(
            read_artifacts(std::io::Cursor::new(&bytes), 522)
                .unwrap()
                .len(),
            1
        );
    }
}
