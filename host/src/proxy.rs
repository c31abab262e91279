//! The builder VM's only way out: an HTTP/HTTPS proxy run by vmic on the host.
//!
//! The guest (untrusted: the image's maintainer scripts run in it) asks for `CONNECT host:port`
//! (https) or `GET http://host/…` (http). The proxy resolves the name itself, refuses every
//! address of the host's own or its network's (loopback, link-local and cloud metadata,
//! private ranges unless opted in, multicast, reserved), and connects to the exact address it
//! checked, so a DNS answer that changes between check and use changes nothing. The host-name
//! allowlist (the repos in use) narrows it further; the address filter is the real boundary.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::Semaphore;

/// Most connections served at once; more wait for a free slot (apt opens a few per host).
pub const MAX_CONNECTIONS: usize = 32;
/// Largest request head (request line + headers) read from the guest.
pub const MAX_HEAD_LEN: usize = 16 * 1024;
/// Time for the guest to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Time to resolve and connect to the destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// A relayed connection with no byte in either direction for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a destination address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The host's own loopback (what QEMU's 10.0.2.2 maps to).
    Loopback,
    /// Link-local, where cloud metadata services live (169.254.169.254, fe80::/10).
    LinkLocal,
    /// A private network (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7): needs the opt-in.
    Private,
    Multicast,
    /// Unspecified, "this network" (0/8), broadcast, or reserved for special use.
    Special,
}

impl Refusal {
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::Loopback => "a loopback address",
            Refusal::LinkLocal => "a link-local or metadata address",
            Refusal::Private => "a private network address (allow with --allow-private-network)",
            Refusal::Multicast => "a multicast address",
            Refusal::Special => "an unspecified, broadcast or reserved address",
        }
    }
}

/// What the proxy lets the guest reach.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `--allow-private-network`: private ranges (a private mirror) are allowed.
    pub private: bool,
    /// The repo hosts in use (lower case); `None` when they are not known.
    pub hosts: Option<BTreeSet<String>>,
    /// Loopback destinations allowed: only for tests of the proxy itself, never from the CLI.
    pub(crate) loopback: bool,
}

impl Policy {
    /// The verdict on one resolved address.
    pub fn check(&self, address: IpAddr) -> Result<(), Refusal> {
        match classify(address) {
            Some(Refusal::Private) if self.private => Ok(()),
            Some(Refusal::Loopback) if self.loopback => Ok(()),
            Some(refusal) => Err(refusal),
            None => Ok(()),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        self.hosts
            .as_ref()
            .is_none_or(|hosts| hosts.contains(&host.to_ascii_lowercase()))
    }
}

/// The class of `address` that is refused by default, or `None` for a public address.
pub fn classify(address: IpAddr) -> Option<Refusal> {
    match address {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(address: Ipv4Addr) -> Option<Refusal> {
    let [a, b, c, _] = address.octets();
    if address.is_loopback() {
        Some(Refusal::Loopback)
    } else if address.is_link_local() {
        Some(Refusal::LinkLocal)
    } else if address.is_private() || (a == 100 && (64..128).contains(&b)) {
        Some(Refusal::Private)
    } else if address.is_multicast() {
        Some(Refusal::Multicast)
    } else if a == 0
        || a >= 240
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (18..20).contains(&b))
    {
        // 0/8, 240/4 + broadcast, IETF protocol assignments, benchmarking.
        Some(Refusal::Special)
    } else {
        None
    }
}

fn classify_v6(address: Ipv6Addr) -> Option<Refusal> {
    let segments = address.segments();
    // Addresses that carry an IPv4 address are judged by it: mapped (::ffff:a.b.c.d),
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) would otherwise reach 127.0.0.1 by another name.
    if let Some(v4) = address.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [_, _, _, _, _, _, high, low] = segments;
        return classify_v4(Ipv4Addr::from((u32::from(high) << 16) | u32::from(low)));
    }
    if segments[0] == 0x2002 {
        return classify_v4(Ipv4Addr::from(
            (u32::from(segments[1]) << 16) | u32::from(segments[2]),
        ));
    }
    if address.is_loopback() {
        Some(Refusal::Loopback)
    } else if address.is_unspecified() || segments[..6] == [0; 6] {
        // ::, and the deprecated IPv4-compatible ::a.b.c.d.
        Some(Refusal::Special)
    } else if segments[0] & 0xffc0 == 0xfe80 || segments[0] & 0xffc0 == 0xfec0 {
        // Link-local, and the deprecated site-local.
        Some(Refusal::LinkLocal)
    } else if segments[0] & 0xfe00 == 0xfc00 {
        Some(Refusal::Private)
    } else if address.is_multicast() {
        Some(Refusal::Multicast)
    } else {
        None
    }
}

/// Where the guest's connections arrive.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Serve until the task is dropped or aborted (the VM's life).
pub async fn serve(listener: Listener, policy: Policy, reporter: crate::report::Reporter) {
    let policy = Arc::new(policy);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted: std::io::Result<Box<dyn Stream>> = match &listener {
            Listener::Unix(listener) => listener
                .accept()
                .await
                .map(|(stream, _)| Box::new(stream) as Box<dyn Stream>),
            Listener::Tcp(listener) => listener
                .accept()
                .await
                .map(|(stream, _)| Box::new(stream) as Box<dyn Stream>),
        };
        let client = match accepted {
            Ok(client) => client,
            Err(error) => {
                tracing::debug!("proxy: accept failed: {error}");
                continue;
            }
        };
        let (policy, reporter) = (policy.clone(), reporter.clone());
        tokio::spawn(async move {
            if let Err(error) = handle(client, &policy, &reporter).await {
                tracing::debug!("proxy: {error}");
            }
            drop(permit);
        });
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A refused or malformed request: answered with `status` and `reason`, then closed.
#[derive(Debug, thiserror::Error)]
#[error("refused {target}: {reason}")]
pub struct ProxyRefusal {
    pub status: u16,
    pub target: String,
    pub reason: String,
}

fn refuse(status: u16, target: &str, reason: impl Into<String>) -> ProxyRefusal {
    ProxyRefusal {
        status,
        target: crate::inert::inert_line(target).into_owned(),
        reason: reason.into(),
    }
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// `CONNECT` tunnels; anything else is a plain http request to forward.
    connect: bool,
    host: String,
    port: u16,
    /// What goes upstream for plain http: the head in origin form, `Connection: close`.
    upstream: Vec<u8>,
}

async fn handle(
    mut client: impl AsyncRead + AsyncWrite + Unpin,
    policy: &Policy,
    reporter: &crate::report::Reporter,
) -> anyhow::Result<()> {
    let (head, rest) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(read)) => read,
        Ok(Err(error)) => return Err(error),
        Err(_) => anyhow::bail!("no request head within {HEAD_TIMEOUT:?}"),
    };
    let outcome = match parse_head(&head) {
        Ok(parsed) => connect(&parsed, policy)
            .await
            .map(|upstream| (parsed, upstream)),
        Err(refusal) => Err(refusal),
    };
    let (parsed, mut upstream) = match outcome {
        Ok(done) => done,
        Err(refusal) => {
            reporter.warn(
                crate::report::Source::Vmic,
                format_args!(
                    "the builder VM's proxy refused {}: {}",
                    refusal.target, refusal.reason
                ),
            );
            let reply = format!(
                "HTTP/1.1 {} vmic refused\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nvmic: {}\n",
                refusal.status, refusal.reason
            );
            let _ = client.write_all(reply.as_bytes()).await;
            return Err(refusal.into());
        }
    };
    if parsed.connect {
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
    } else {
        upstream.write_all(&parsed.upstream).await?;
    }
    upstream.write_all(&rest).await?;
    relay(&mut client, &mut upstream, IDLE_TIMEOUT).await
}

/// Read up to the blank line that ends the head; returns it and any bytes read past it.
async fn read_head(client: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = find(&buffer, b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            return Ok((buffer, rest));
        }
        if buffer.len() > MAX_HEAD_LEN {
            anyhow::bail!("request head larger than {MAX_HEAD_LEN} bytes");
        }
        let read = client.read(&mut chunk).await?;
        if read == 0 {
            anyhow::bail!("the client closed before the end of its request head");
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn parse_head(head: &[u8]) -> Result<Head, ProxyRefusal> {
    let text =
        std::str::from_utf8(head).map_err(|_| refuse(400, "?", "request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(400, request_line, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(refuse(400, request_line, "only HTTP/1.x is proxied"));
    }
    if method == "CONNECT" {
        let (host, port) = split_authority(target, None)
            .ok_or_else(|| refuse(400, target, "CONNECT needs host:port"))?;
        return Ok(Head {
            connect: true,
            host,
            port,
            upstream: Vec::new(),
        });
    }
    let rest = target.strip_prefix("http://").ok_or_else(|| {
        refuse(
            400,
            target,
            "only absolute http:// URIs and CONNECT are proxied",
        )
    })?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(refuse(400, target, "user info in the URI is not proxied"));
    }
    let (host, port) = split_authority(authority, Some(80))
        .ok_or_else(|| refuse(400, target, "bad host in URI"))?;
    let mut upstream = format!("{method} {path} {version}\r\n");
    for line in lines.filter(|line| !line.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim();
        // Hop-by-hop and proxy headers stay here; one request per connection keeps the
        // destination of every byte the one that was checked.
        if [
            "connection",
            "proxy-connection",
            "proxy-authorization",
            "keep-alive",
        ]
        .iter()
        .any(|hop| name.eq_ignore_ascii_case(hop))
        {
            continue;
        }
        upstream.push_str(line);
        upstream.push_str("\r\n");
    }
    upstream.push_str("Connection: close\r\n\r\n");
    Ok(Head {
        connect: false,
        host,
        port,
        upstream: upstream.into_bytes(),
    })
}

/// `host:port`, `[v6]:port`, or `host` with `default_port`.
fn split_authority(authority: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return None,
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(port) => port.parse().ok().filter(|&port| port != 0)?,
        None => default_port?,
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    valid.then(|| (host.to_ascii_lowercase(), port))
}

/// Resolve on the host, check every candidate, connect to the first allowed one.
async fn connect(head: &Head, policy: &Policy) -> Result<TcpStream, ProxyRefusal> {
    let target = format!("{}:{}", head.host, head.port);
    if !policy.host_allowed(&head.host) {
        return Err(refuse(
            403,
            &target,
            "not a host of the package repositories in use",
        ));
    }
    let attempt = async {
        let candidates: Vec<SocketAddr> = match head.host.parse::<IpAddr>() {
            Ok(address) => vec![SocketAddr::new(address, head.port)],
            Err(_) => tokio::net::lookup_host((head.host.as_str(), head.port))
                .await
                .map_err(|error| refuse(502, &target, format!("cannot resolve: {error}")))?
                .collect(),
        };
        let mut refused = None;
        for candidate in candidates {
            match policy.check(candidate.ip()) {
                Ok(()) => {
                    return TcpStream::connect(candidate)
                        .await
                        .map_err(|error| refuse(502, &target, format!("cannot connect: {error}")));
                }
                Err(refusal) => refused = Some((candidate, refusal)),
            }
        }
        Err(match refused {
            Some((address, refusal)) => refuse(
                403,
                &target,
                format!("{} is {}", address.ip(), refusal.describe()),
            ),
            None => refuse(502, &target, "the name has no address"),
        })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(refuse(504, &target, "timed out connecting")))
}

/// Copy both ways until both sides are done or neither sent a byte for `idle`.
async fn relay(
    client: &mut (impl AsyncRead + AsyncWrite + Unpin),
    upstream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    idle: Duration,
) -> anyhow::Result<()> {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_upstream = vec![0u8; 64 * 1024];
    let (mut client_done, mut upstream_done) = (false, false);
    while !(client_done && upstream_done) {
        tokio::select! {
            read = client_read.read(&mut from_client), if !client_done => match read? {
                0 => {
                    client_done = true;
                    let _ = upstream_write.shutdown().await;
                }
                n => upstream_write.write_all(&from_client[..n]).await?,
            },
            read = upstream_read.read(&mut from_upstream), if !upstream_done => match read? {
                0 => {
                    upstream_done = true;
                    let _ = client_write.shutdown().await;
                }
                n => client_write.write_all(&from_upstream[..n]).await?,
            },
            () = tokio::time::sleep(idle) => anyhow::bail!("idle for {idle:?}: closed"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_the_host_and_its_networks_are_refused() {
        let cases: &[(&str, Option<Refusal>)] = &[
            ("151.101.2.132", None),
            ("2a04:4e42::644", None),
            ("127.0.0.1", Some(Refusal::Loopback)),
            ("127.8.9.10", Some(Refusal::Loopback)),
            ("::1", Some(Refusal::Loopback)),
            ("::ffff:127.0.0.1", Some(Refusal::Loopback)),
            ("64:ff9b::7f00:1", Some(Refusal::Loopback)),
            ("2002:7f00:1::", Some(Refusal::Loopback)),
            ("169.254.169.254", Some(Refusal::LinkLocal)),
            ("fe80::1", Some(Refusal::LinkLocal)),
            ("fd00:ec2::254", Some(Refusal::Private)),
            ("10.0.2.2", Some(Refusal::Private)),
            ("172.16.0.1", Some(Refusal::Private)),
            ("172.31.255.255", Some(Refusal::Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Refusal::Private)),
            ("100.64.0.1", Some(Refusal::Private)),
            ("::ffff:10.1.2.3", Some(Refusal::Private)),
            ("224.0.0.1", Some(Refusal::Multicast)),
            ("ff02::1", Some(Refusal::Multicast)),
            ("0.0.0.0", Some(Refusal::Special)),
            ("0.1.2.3", Some(Refusal::Special)),
            ("::", Some(Refusal::Special)),
            ("::127.0.0.1", Some(Refusal::Special)),
            ("255.255.255.255", Some(Refusal::Special)),
            ("240.0.0.1", Some(Refusal::Special)),
        ];
        for (address, expected) in cases {
            let parsed: IpAddr = address.parse().expect("test address parses");
            assert_eq!(classify(parsed), *expected, "{address}");
        }
    }

    #[test]
    fn the_opt_in_allows_private_networks_and_nothing_else() {
        let open = Policy {
            private: true,
            ..Policy::default()
        };
        let closed = Policy::default();
        let private: IpAddr = "192.168.7.7".parse().expect("parses");
        assert_eq!(closed.check(private), Err(Refusal::Private));
        assert_eq!(open.check(private), Ok(()));
        for address in ["127.0.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.1"] {
            let address: IpAddr = address.parse().expect("parses");
            assert!(open.check(address).is_err(), "{address}");
        }
    }

    #[test]
    fn request_heads_are_parsed_strictly() {
        let head = parse_head(
            b"GET http://Deb.Debian.org/debian/dists/x HTTP/1.1\r\nHost: deb.debian.org\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nUser-Agent: apt\r\n\r\n",
        )
        .expect("a plain GET parses");
        assert_eq!(
            (head.host.as_str(), head.port, head.connect),
            ("deb.debian.org", 80, false)
        );
        assert_eq!(
            String::from_utf8(head.upstream).expect("text"),
            "GET /debian/dists/x HTTP/1.1\r\nHost: deb.debian.org\r\nUser-Agent: apt\r\nConnection: close\r\n\r\n"
        );
        let head = parse_head(b"CONNECT [2a04:4e42::644]:443 HTTP/1.1\r\n\r\n").expect("CONNECT");
        assert_eq!(
            (head.host.as_str(), head.port, head.connect),
            ("2a04:4e42::644", 443, true)
        );
        for bad in [
            &b"GET /relative HTTP/1.1\r\n\r\n"[..],
            b"GET ftp://host/ HTTP/1.1\r\n\r\n",
            b"GET http://user@host/ HTTP/1.1\r\n\r\n",
            b"CONNECT host HTTP/1.1\r\n\r\n",
            b"CONNECT host:0 HTTP/1.1\r\n\r\n",
            b"CONNECT host:99999 HTTP/1.1\r\n\r\n",
            b"CONNECT ho st:443 HTTP/1.1\r\n\r\n",
            b"CONNECT h\x1bst:443 HTTP/1.1\r\n\r\n",
            b"GET http://host/ HTTP/2\r\n\r\n",
            b"GET http://host/ HTTP/1.1 extra\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// A listener on the host's loopback that records whether anything connected.
    async fn witness() -> (SocketAddr, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind witness");
        let address = listener.local_addr().expect("address");
        let counter = tokio::spawn(async move {
            let mut count = 0;
            while let Ok(Ok((mut stream, _))) =
                tokio::time::timeout(Duration::from_millis(300), listener.accept()).await
            {
                count += 1;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
                    .await;
            }
            count
        });
        (address, counter)
    }

    async fn proxy(policy: Policy) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("address");
        (
            address,
            tokio::spawn(serve(
                Listener::Tcp(listener),
                policy,
                crate::report::Reporter::plain(),
            )),
        )
    }

    async fn ask(proxy: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(proxy)
            .await
            .expect("connect to the proxy");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
        String::from_utf8_lossy(&reply).into_owned()
    }

    #[tokio::test]
    async fn the_hosts_loopback_is_not_reachable_through_the_proxy() {
        let (witness_address, witness) = witness().await;
        let (proxy_address, server) = proxy(Policy::default()).await;
        let port = witness_address.port();
        for request in [
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n"),
            format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n"),
            format!("GET http://localhost:{port}/ HTTP/1.1\r\n\r\n"),
            format!("CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1\r\n\r\n"),
            format!("CONNECT 0.0.0.0:{port} HTTP/1.1\r\n\r\n"),
        ] {
            let reply = ask(proxy_address, &request).await;
            assert!(
                reply.starts_with("HTTP/1.1 403 "),
                "{request:?} -> {reply:?}"
            );
            assert!(!reply.contains("secret"), "{reply}");
        }
        server.abort();
        assert_eq!(
            witness.await.expect("witness"),
            0,
            "nothing reached the listener"
        );
    }

    #[tokio::test]
    async fn allowed_destinations_are_relayed_both_ways() {
        let (witness_address, witness) = witness().await;
        let policy = Policy {
            loopback: true,
            ..Policy::default()
        };
        let (proxy_address, server) = proxy(policy).await;
        let port = witness_address.port();
        let reply = ask(
            proxy_address,
            &format!("GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: a\r\n\r\n"),
        )
        .await;
        assert!(reply.ends_with("\r\n\r\nsecret"), "{reply:?}");
        let reply = ask(
            proxy_address,
            &format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(
            reply.starts_with("HTTP/1.1 200 Connection established\r\n\r\n"),
            "{reply:?}"
        );
        assert!(reply.ends_with("secret"), "{reply:?}");
        server.abort();
        assert_eq!(witness.await.expect("witness"), 2);
    }

    #[tokio::test]
    async fn hosts_outside_the_allowlist_are_refused_before_resolving() {
        let policy = Policy {
            hosts: Some(BTreeSet::from(["deb.debian.org".to_string()])),
            loopback: true,
            ..Policy::default()
        };
        let (proxy_address, server) = proxy(policy).await;
        let reply = ask(proxy_address, "CONNECT localhost:9 HTTP/1.1\r\n\r\n").await;
        assert!(
            reply.contains("not a host of the package repositories"),
            "{reply}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn an_endless_head_is_cut_off() {
        let (proxy_address, server) = proxy(Policy::default()).await;
        let mut stream = TcpStream::connect(proxy_address).await.expect("connect");
        let line = vec![b'a'; 4096];
        let mut sent = 0;
        // The proxy stops reading and closes after MAX_HEAD_LEN bytes without an end.
        while sent < 4 * MAX_HEAD_LEN {
            if stream.write_all(&line).await.is_err() {
                break;
            }
            sent += line.len();
        }
        let mut reply = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
        assert!(read.is_ok(), "the proxy closed the connection");
        server.abort();
    }

    #[tokio::test]
    async fn an_idle_relay_is_closed() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let (mut c, _d) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        let result = relay(&mut a, &mut c, Duration::from_millis(200)).await;
        assert!(result.is_err(), "an idle relay ends with an error");
        assert!(started.elapsed() < Duration::from_secs(2));
        let _ = b.write_all(b"late").await;
    }
}
