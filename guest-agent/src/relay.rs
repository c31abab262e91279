//! The builder VM's only way out: a listener on the VM's own `127.0.0.1` whose connections are
//! relayed over vsock to the HTTP/HTTPS proxy vmic runs on the host. The VM has no NIC: what the
//! proxy refuses (the host's loopback, private and link-local networks) is out of reach.

use std::fs::File;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;

use anyhow::Context;
use vmic_protocol::{PROXY_GUEST_ADDRESS, PROXY_VSOCK_PORT};

/// `AF_VSOCK`, spelled out: not every libc target exports it.
const AF_VSOCK: libc::c_int = 40;
/// The host, as a vsock peer.
const HOST_CID: u32 = 2;
/// Connections relayed at once; the host proxy bounds them again.
const MAX_CONNECTIONS: usize = 64;

static STARTED: OnceLock<()> = OnceLock::new();

/// The proxy URL the image's package manager is pointed at.
pub fn proxy_url() -> String {
    format!("http://{PROXY_GUEST_ADDRESS}")
}

/// Start relaying (once per VM; later calls do nothing). The loopback device must be up.
pub fn start() -> anyhow::Result<()> {
    if STARTED.get().is_some() {
        return Ok(());
    }
    let listener = TcpListener::bind(PROXY_GUEST_ADDRESS)
        .with_context(|| format!("listening on {PROXY_GUEST_ADDRESS} for the host's proxy"))?;
    let _ = STARTED.set(());
    let active = Arc::new(AtomicUsize::new(0));
    thread::spawn(move || {
        for client in listener.incoming().flatten() {
            if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                continue;
            }
            active.fetch_add(1, Ordering::SeqCst);
            let active = active.clone();
            thread::spawn(move || {
                if let Err(error) = relay(client) {
                    crate::console!("proxy relay: {error}");
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok(())
}

fn relay(client: TcpStream) -> io::Result<()> {
    let host = connect_host(PROXY_VSOCK_PORT)?;
    let host_copy = host.try_clone()?;
    let client_copy = client.try_clone()?;
    let upload = thread::spawn(move || {
        let (mut from, mut to) = (&client_copy, &host_copy);
        let _ = io::copy(&mut from, &mut to);
        // Half close: the host proxy sees the end of the request.
        let _ = shutdown_write(&host_copy);
    });
    let (mut from, mut to) = (&host, &client);
    let _ = io::copy(&mut from, &mut to);
    let _ = client.shutdown(Shutdown::Write);
    let _ = upload.join();
    Ok(())
}

fn shutdown_write(file: &File) -> io::Result<()> {
    // SAFETY: the fd is a valid socket owned by `file` for the duration of the call.
    let result = unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(file), libc::SHUT_WR) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Connect to the host (CID 2) on `port`.
fn connect_host(port: u32) -> io::Result<File> {
    // SAFETY: plain syscall with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let address = libc::sockaddr_vm {
        svm_family: AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: HOST_CID,
        svm_zero: [0; 4],
    };
    // SAFETY: `address` is a valid sockaddr_vm and the length passed is its exact size.
    let connected = unsafe {
        libc::connect(
            fd,
            (&address as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if connected != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(File::from(socket))
}
