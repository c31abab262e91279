//! The agent binary in `--stdio` mode, driven as a child process like a host-side test would.

use std::io::{BufReader, BufWriter};
use std::process::{Command, Stdio};

use vmic_protocol::{
    read_message, write_message, GuestMessage, HostHello, HostMessage, Request, Response,
    PROTOCOL_VERSION,
};

#[test]
fn stdio_session_hello_ping_and_kill() {
    let mut agent = Command::new(env!("CARGO_BIN_EXE_vmic-agent"))
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("agent starts");
    let mut from_agent = BufReader::new(agent.stdout.take().expect("piped"));
    let mut to_agent = BufWriter::new(agent.stdin.take().expect("piped"));

    let hello: GuestMessage = read_message(&mut from_agent).expect("read").expect("hello");
    assert!(matches!(hello, GuestMessage::Hello(ref h) if h.protocol_version == PROTOCOL_VERSION));
    write_message(
        &mut to_agent,
        &HostMessage::Hello(HostHello {
            protocol_version: PROTOCOL_VERSION,
            host_version: "test".into(),
            token: String::new(),
        }),
    )
    .expect("write");
    write_message(
        &mut to_agent,
        &HostMessage::Request {
            id: 1,
            request: Request::Ping,
        },
    )
    .expect("write");
    let pong: GuestMessage = read_message(&mut from_agent).expect("read").expect("pong");
    assert_eq!(
        pong,
        GuestMessage::Response {
            id: 1,
            result: Ok(Response::Pong)
        }
    );

    // A killed agent is a closed channel: a clean end of stream, not a hang.
    agent.kill().expect("kill");
    agent.wait().expect("reaped");
    assert!(read_message::<GuestMessage>(&mut from_agent)
        .expect("clean eof")
        .is_none());
}
