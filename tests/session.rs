//! Host session ↔ the real agent binary over stdio pipes: the protocol logic without QEMU.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use vmic::report::Reporter;
use vmic::session::Session;
use vmic::transport::Connection;
use vmic_protocol::{Event, ExecRequest, Request, Stream};

fn agent_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "vmic-guest-agent",
            "--bin",
            "vmic-agent",
        ])
        .current_dir(&root)
        .status()
        .expect("cargo build of the agent");
    assert!(status.success());
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("debug").join("vmic-agent")
}

async fn session() -> (Session, tokio::process::Child) {
    let mut child = tokio::process::Command::new(agent_binary())
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn agent");
    let connection = Connection {
        reader: Box::pin(child.stdout.take().expect("stdout")),
        writer: Box::pin(child.stdin.take().expect("stdin")),
    };
    let session = Session::handshake(connection, "test-token", Reporter::plain())
        .await
        .expect("handshake");
    (session, child)
}

#[tokio::test]
async fn exec_transfer_cancel_and_guest_errors() {
    let (session, mut child) = session().await;
    assert_eq!(
        session.hello().protocol_version,
        vmic_protocol::PROTOCOL_VERSION
    );

    let mut request = ExecRequest::new(["sh", "-c", "echo one; echo two >&2; exit 4"]);
    request.stream_output = true;
    let mut seen = Vec::new();
    let result = session
        .exec(request, |stream, data| seen.push((stream, data.to_vec())))
        .await
        .expect("exec");
    assert_eq!(result.code, 4);
    assert!(seen.contains(&(Stream::Stdout, b"one\n".to_vec())));
    assert!(seen.contains(&(Stream::Stderr, b"two\n".to_vec())));

    // A guest failure arrives with the guest's context chain.
    let error = session
        .run(&["/nonexistent/tool", "--flag"])
        .await
        .expect_err("missing");
    let rendered = vmic::report::render_error(&error);
    assert!(rendered.contains("/nonexistent/tool"), "{rendered}");
    assert!(rendered.contains("caused by:"), "{rendered}");

    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("in.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs_err::write(&source, &data).expect("write");
    let remote = dir.path().join("remote.bin");
    session
        .put_file(&source, remote.to_str().expect("utf-8"), 0o640)
        .await
        .expect("put");
    let back = dir.path().join("back.bin");
    session
        .get_file(remote.to_str().expect("utf-8"), &back)
        .await
        .expect("get");
    assert_eq!(fs_err::read(&back).expect("read"), data);
    let missing = session
        .get_file("/nonexistent/file", &dir.path().join("x"))
        .await;
    assert!(missing.is_err());

    // Cancel once the command says it runs (its first line of output), not after a delay.
    let mut request = ExecRequest::new(["sh", "-c", "echo running; exec sleep 30"]);
    request.stream_output = true;
    let mut handle = session.start(Request::Exec(request)).await.expect("start");
    loop {
        match handle.next_event().await.expect("the command runs") {
            Event::Output { data, .. } if data == b"running\n" => break,
            _ => {}
        }
    }
    let started = Instant::now();
    handle.cancel().await.expect("cancel");
    let error = handle.finish(|_| {}).await.expect_err("cancelled");
    assert!(format!("{error:#}").contains(vmic_protocol::CANCELLED));
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(handle);

    // The agent dies under a running request: the host reports the lost agent.
    let mut handle = session
        .start(Request::Exec(ExecRequest::new(["sleep", "30"])))
        .await
        .expect("start");
    child.start_kill().expect("kill agent");
    let error = handle
        .finish_within(Duration::from_secs(10), |_| {})
        .await
        .expect_err("agent died");
    assert!(
        format!("{error:#}").contains("lost the builder VM's agent"),
        "{error:#}"
    );
}
