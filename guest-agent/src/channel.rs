//! Opening the byte stream to the host: a virtio-serial port, one accepted vsock connection,
//! or stdin/stdout (tests).

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use vmic_protocol::SERIAL_PORT_NAME;

/// Where sysfs lists virtio-serial ports (there is no udev, so no `/dev/virtio-ports/NAME`).
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";
/// How long to wait for the port or the vsock family to appear (drivers may still be probing).
const APPEAR_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// `AF_VSOCK`, spelled out: not every libc target exports it.
const AF_VSOCK: libc::c_int = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelSpec {
    Stdio,
    Serial,
    Vsock { port: u32 },
}

impl std::fmt::Display for ChannelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelSpec::Stdio => f.write_str("stdio"),
            ChannelSpec::Serial => write!(f, "virtio-serial port {SERIAL_PORT_NAME}"),
            ChannelSpec::Vsock { port } => write!(f, "vsock port {port}"),
        }
    }
}

/// Both directions of the open channel. For serial and vsock the two are one open file
/// (duplicated descriptors): a virtio-serial port can be opened only once.
pub struct Channel {
    pub reader: File,
    pub writer: File,
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("virtio-serial port {SERIAL_PORT_NAME} did not appear in {VIRTIO_PORTS} within {0:?}")]
    SerialPortMissing(Duration),
    #[error("cannot read {path}")]
    Sysfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create device node {path} ({device})")]
    Mknod {
        path: PathBuf,
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {operation} on vsock port {port}")]
    Vsock {
        operation: &'static str,
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot duplicate the channel's file descriptor")]
    Duplicate(#[source] io::Error),
}

impl Channel {
    /// One bidirectional file (a port, a socket) as a channel.
    pub fn from_file(file: File) -> Result<Channel, ChannelError> {
        let writer = file.try_clone().map_err(ChannelError::Duplicate)?;
        Ok(Channel {
            reader: file,
            writer,
        })
    }
}

/// Hands out channels. For vsock the listener stays open so that a host connection that
/// dropped before the handshake (its CONNECT answer came too late) can be replaced by the
/// next one instead of leaving the agent unreachable.
pub enum Opener {
    Once(Option<ChannelSpec>),
    Vsock { listener: OwnedFd, port: u32 },
}

impl Opener {
    pub fn new(spec: ChannelSpec) -> Result<Opener, ChannelError> {
        match spec {
            ChannelSpec::Vsock { port } => Ok(Opener::Vsock {
                listener: listen_vsock(port)?,
                port,
            }),
            other => Ok(Opener::Once(Some(other))),
        }
    }

    /// Whether another channel can follow a failed one.
    pub fn can_retry(&self) -> bool {
        matches!(self, Opener::Vsock { .. })
    }

    /// The next channel; for vsock this blocks until the host connects.
    pub fn next(&mut self) -> Result<Channel, ChannelError> {
        match self {
            Opener::Once(spec) => match spec.take() {
                Some(ChannelSpec::Stdio) => {
                    let reader = io::stdin().as_fd().try_clone_to_owned();
                    let writer = io::stdout().as_fd().try_clone_to_owned();
                    Ok(Channel {
                        reader: reader.map_err(ChannelError::Duplicate)?.into(),
                        writer: writer.map_err(ChannelError::Duplicate)?.into(),
                    })
                }
                Some(ChannelSpec::Serial) => {
                    Channel::from_file(open_serial(Path::new(VIRTIO_PORTS))?)
                }
                Some(ChannelSpec::Vsock { port }) => {
                    Channel::from_file(accept_vsock(&listen_vsock(port)?, port)?)
                }
                None => Err(ChannelError::Duplicate(io::Error::other(
                    "this channel can be opened only once",
                ))),
            },
            Opener::Vsock { listener, port } => Channel::from_file(accept_vsock(listener, *port)?),
        }
    }
}

/// Wait for the named virtio-serial port, make its device node if needed, and open it.
fn open_serial(ports: &Path) -> Result<File, ChannelError> {
    let start = Instant::now();
    let (port, device) = loop {
        if let Some(found) = find_serial_port(ports, SERIAL_PORT_NAME)? {
            break found;
        }
        if start.elapsed() > APPEAR_TIMEOUT {
            return Err(ChannelError::SerialPortMissing(APPEAR_TIMEOUT));
        }
        thread::sleep(POLL_INTERVAL);
    };
    let path = Path::new("/dev").join(&port);
    if !path.exists() {
        make_char_device(&path, &device)?;
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| ChannelError::Open { path, source })
}

/// The port directory (`vport1p1`) whose `name` is `wanted`, with its `dev` (`major:minor`).
fn find_serial_port(ports: &Path, wanted: &str) -> Result<Option<(String, String)>, ChannelError> {
    let Ok(entries) = fs::read_dir(ports) else {
        // The class directory appears with the first port.
        return Ok(None);
    };
    for entry in entries.flatten() {
        let name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() != wanted {
            continue;
        }
        let dev_path = entry.path().join("dev");
        let device = fs::read_to_string(&dev_path)
            .map_err(|source| ChannelError::Sysfs {
                path: dev_path,
                source,
            })?
            .trim()
            .to_owned();
        return Ok(Some((
            entry.file_name().to_string_lossy().into_owned(),
            device,
        )));
    }
    Ok(None)
}

fn make_char_device(path: &Path, device: &str) -> Result<(), ChannelError> {
    let error = |source| ChannelError::Mknod {
        path: path.to_owned(),
        device: device.to_owned(),
        source,
    };
    let (major, minor) = device
        .split_once(':')
        .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)))
        .ok_or_else(|| error(io::Error::from(io::ErrorKind::InvalidData)))?;
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    let result = unsafe {
        libc::mknod(
            c_path.as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(major, minor),
        )
    };
    if result != 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() != Some(libc::EEXIST) {
            return Err(error(source));
        }
    }
    Ok(())
}

/// Listen on `port` (any CID).
fn listen_vsock(port: u32) -> Result<OwnedFd, ChannelError> {
    let error = |operation, source| ChannelError::Vsock {
        operation,
        port,
        source,
    };
    let start = Instant::now();
    let listener = loop {
        // SAFETY: plain syscall with constant arguments; the result is checked below.
        let fd = unsafe { libc::socket(AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
            break unsafe { OwnedFd::from_raw_fd(fd) };
        }
        let source = io::Error::last_os_error();
        // The transport module may still be probing its device.
        if source.raw_os_error() != Some(libc::EAFNOSUPPORT) || start.elapsed() > APPEAR_TIMEOUT {
            return Err(error("create a socket", source));
        }
        thread::sleep(POLL_INTERVAL);
    };
    let address = libc::sockaddr_vm {
        svm_family: AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: libc::VMADDR_CID_ANY,
        svm_zero: [0; 4],
    };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&listener);
    // SAFETY: `address` is a valid sockaddr_vm and the length passed is its exact size.
    let bound = unsafe {
        libc::bind(
            raw,
            (&address as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(error("bind", io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a valid, bound socket owned by `listener`.
    if unsafe { libc::listen(raw, 1) } != 0 {
        return Err(error("listen", io::Error::last_os_error()));
    }
    Ok(listener)
}

/// Accept one connection on a listening vsock socket.
fn accept_vsock(listener: &OwnedFd, port: u32) -> Result<File, ChannelError> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(listener);
    loop {
        // SAFETY: `raw` is a listening socket; a null address means "don't report the peer".
        let fd = unsafe {
            libc::accept4(
                raw,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` was just returned by accept4(2) and is owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) }.into());
        }
        let source = io::Error::last_os_error();
        if source.kind() != io::ErrorKind::Interrupted {
            return Err(ChannelError::Vsock {
                operation: "accept a connection",
                port,
                source,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_port_is_found_by_name() {
        let sys = tempfile::tempdir().expect("temp dir");
        for (port, name, dev) in [
            ("vport0p0", "other", "250:0"),
            ("vport1p1", SERIAL_PORT_NAME, "250:1\n"),
        ] {
            let dir = sys.path().join(port);
            fs::create_dir(&dir).expect("port dir");
            fs::write(dir.join("name"), format!("{name}\n")).expect("name");
            fs::write(dir.join("dev"), dev).expect("dev");
        }
        let found = find_serial_port(sys.path(), SERIAL_PORT_NAME).expect("readable");
        assert_eq!(found, Some(("vport1p1".into(), "250:1".into())));
        assert_eq!(
            find_serial_port(sys.path(), "absent").expect("readable"),
            None
        );
        assert_eq!(
            find_serial_port(&sys.path().join("missing"), "x").expect("no class"),
            None
        );
    }
}
