//! Faults end to end (issue 14): a build that hangs ends at `--timeout` with its step named; a
//! vmic killed with SIGKILL takes QEMU with it, a second vmic on the same build directory is
//! refused while the first runs, and the next run cleans up after the dead one and succeeds;
//! an image whose /etc/fstab links to /proc/kmsg fails at once, naming the link.
//! Every wait here is on an event (a line on vmic's stderr, a process leaving /proc).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_no_partial, customize_args, customize_to, sha256_of, test_image, work_dir};

fn minimal_qcow2() -> PathBuf {
    test_image("x86_64", "minimal", false).join("disk.qcow2")
}

/// A config whose postCustomization script says it started, then never ends.
fn hanging_config(dir: &Path) -> PathBuf {
    let config = dir.join("hang.yaml");
    std::fs::write(
        &config,
        "scripts:\n  postCustomization:\n  - name: hang\n    content: |\n      echo VMIC-HANG-STARTED\n      exec sleep infinity\n",
    )
    .expect("config");
    config
}

/// PIDs of live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // A zombie has already let go of everything; its parent just has not reaped it yet.
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

/// Waits until no live process mentions `needle` (the kernel's own teardown), at most `limit`.
fn wait_until_gone(needle: &str, limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_hung_script_ends_at_the_timeout_with_its_step_named() {
    let work = work_dir();
    let build_dir = work.path().join("build");
    let output = work.path().join("out.qcow2");
    let config = hanging_config(work.path());
    let run = customize_to(
        "qcow2",
        &minimal_qcow2(),
        &config,
        &output,
        Some(&build_dir),
        &["--timeout", "60s"],
    );
    // vmic's own run time: waiting for the VM lock held by the other test does not count.
    let seconds = run.seconds;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("running script hang"),
        "the script ran: {}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("the build timed out after 1m during step \"Customizing\""),
        "{}",
        run.stderr
    );
    assert!(seconds < 120.0, "ended in {seconds:.1} s");
    assert!(!output.exists());
    assert_no_partial(&output);
    // Nothing of the run is left: no run dir, no QEMU on its disks.
    let left: Vec<_> = std::fs::read_dir(&build_dir)
        .expect("build dir")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("run-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let build = build_dir.to_string_lossy().into_owned();
    assert_eq!(
        wait_until_gone(&build, Duration::from_secs(10)),
        Vec::<u32>::new()
    );
}

#[test]
fn sigkill_mid_build_leaves_nothing_running_and_the_next_run_cleans_up() {
    let work = work_dir();
    let build_dir = work.path().join("build");
    let output = work.path().join("out.qcow2");
    let input = minimal_qcow2();
    let before = sha256_of(&input);
    let _vm = common::vm_alone();
    let mut first = Command::new(assert_cmd::cargo::cargo_bin("vmic"))
        .args(customize_args(
            &input,
            hanging_config(work.path()),
            &build_dir,
            &output,
            "qcow2",
        ))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("vmic");
    let first_pid = first.id();
    // Wait for the script to be running inside the builder VM: the build is in full swing.
    let mut stderr = BufReader::new(first.stderr.take().expect("stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let read = stderr.read_line(&mut line).expect("read vmic's stderr");
        assert!(read > 0, "vmic ended before the script ran:\n{seen}");
        seen.push_str(&line);
        // The agent's log line as it starts the script (its own output is not streamed).
        if line.contains("running script hang") {
            break;
        }
    }
    let run_dir = build_dir.join(format!("run-{first_pid}"));
    assert!(run_dir.is_dir(), "the run's private dir exists");
    let partial = output.with_file_name(".out.qcow2.vmic-partial");
    assert!(partial.exists(), "the partial output exists while building");

    // A second vmic on the same build directory is refused at once, naming the first.
    let second_started = Instant::now();
    let second = common::vmic()
        .args(customize_args(
            &input,
            hanging_config(work.path()),
            &build_dir,
            work.path().join("other.qcow2"),
            "qcow2",
        ))
        .output()
        .expect("second vmic");
    let second_stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{second_stderr}");
    assert!(
        second_stderr.contains(&format!("is in use by vmic pid {first_pid}")),
        "{second_stderr}"
    );
    assert!(second_started.elapsed() < Duration::from_secs(30));
    assert!(run_dir.is_dir(), "the first run is untouched");

    // SIGKILL: no chance to clean up; QEMU and the vsock daemon must die with vmic.
    // SAFETY: kill(2) on the child we spawned; no memory is shared.
    assert_eq!(unsafe { libc::kill(first_pid as i32, libc::SIGKILL) }, 0);
    let status = first.wait().expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let run = run_dir.to_string_lossy().into_owned();
    assert_eq!(
        wait_until_gone(&run, Duration::from_secs(20)),
        Vec::<u32>::new(),
        "processes of the killed run still running"
    );
    assert!(
        run_dir.exists() && partial.exists(),
        "SIGKILL left its files"
    );
    drop(_vm);

    // The next run in the same build directory removes them and succeeds.
    let config = work.path().join("hostname.yaml");
    std::fs::write(&config, "os:\n  hostname: after-sigkill\n").expect("config");
    let rerun = customize_to("qcow2", &input, &config, &output, Some(&build_dir), &[]);
    assert_eq!(rerun.code, Some(0), "{}", rerun.stderr);
    assert!(
        rerun.stderr.contains("left by a vmic run that ended"),
        "{}",
        rerun.stderr
    );
    assert!(!run_dir.exists(), "the dead run's files are gone");
    assert!(output.is_file());
    assert_no_partial(&output);
    let leftovers: Vec<_> = std::fs::read_dir(&build_dir)
        .expect("build dir")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name != ".vmic.lock")
        .collect();
    assert!(leftovers.is_empty(), "left in the build dir: {leftovers:?}");
    assert_eq!(sha256_of(&input), before, "the input is unchanged");
}

/// An image whose /etc/fstab links to /proc/kmsg: a reader that followed the link in the
/// builder VM would block on the kernel log forever. vmic resolves it inside the image and fails
/// at once, naming the file and the link; input unchanged, no output.
#[test]
fn an_image_whose_fstab_links_to_proc_kmsg_fails_at_once() {
    let work = work_dir();
    let hostile = work.path().join("kmsg-fstab.qcow2");
    let config = work.path().join("kmsg.yaml");
    std::fs::write(
        &config,
        "scripts:\n  postCustomization:\n  - name: kmsg-fstab\n    content: ln -sf /proc/kmsg /etc/fstab\n",
    )
    .expect("config");
    let made = customize_to("qcow2", &minimal_qcow2(), &config, &hostile, None, &[]);
    assert_eq!(made.code, Some(0), "{}", made.stderr);

    let before = sha256_of(&hostile);
    let plain = work.path().join("plain.yaml");
    std::fs::write(&plain, "os:\n  hostname: never-built\n").expect("config");
    let iso = work.path().join("never.iso");
    let refused = customize_to("iso", &hostile, &plain, &iso, None, &[]);
    eprintln!(
        "hostile image made in {:.0} s, refused in {:.0} s",
        made.seconds, refused.seconds
    );
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("/etc/fstab is a link to /proc/kmsg"),
        "{}",
        refused.stderr
    );
    // At once: the boot and the partition probe, not the 4 h default timeout.
    assert!(
        refused.seconds < 300.0,
        "ended after {:.0} s",
        refused.seconds
    );
    assert!(!iso.exists());
    assert_no_partial(&iso);
    assert_eq!(sha256_of(&hostile), before, "the input is unchanged");
}

/// SIGTERM while qemu-img writes the output: vmic ends within 2 s, qemu-img with it, and
/// nothing partial is left. qemu-img here is a wrapper that hangs in `convert` (the real
/// conversion of the test disk takes ~2 s, too short to hit reliably); every other qemu-img
/// call reaches the real one.
#[test]
fn sigterm_during_the_copy_out_ends_within_two_seconds_with_nothing_left() {
    let work = work_dir();
    let real = std::env::split_paths(&std::env::var_os("PATH").expect("PATH"))
        .map(|dir| dir.join("qemu-img"))
        .find(|path| path.is_file())
        .expect("qemu-img on PATH");
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    let pid_file = work.path().join("convert.pid");
    let wrapper = bin.join("qemu-img");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = convert ]; then echo $$ > {0}.new; mv {0}.new {0}; exec sleep 600; fi\nexec {1} \"$@\"\n",
            pid_file.display(),
            real.display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut path = vec![bin.clone()];
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").expect("PATH"),
    ));
    let config = work.path().join("hostname.yaml");
    std::fs::write(&config, "os:\n  hostname: never-written\n").expect("config");
    let input = minimal_qcow2();
    let before = sha256_of(&input);
    let output = work.path().join("out.qcow2");
    let build_dir = work.path().join("build");
    let _vm = common::vm_alone();
    let mut vmic = Command::new(assert_cmd::cargo::cargo_bin("vmic"))
        .env("VMIC_NO_CACHE", "1")
        .env("PATH", std::env::join_paths(path).expect("PATH"))
        .args(customize_args(
            &input, &config, &build_dir, &output, "qcow2",
        ))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("vmic");
    // The copy-out runs once the wrapper says it was called to convert.
    let mut stderr = BufReader::new(vmic.stderr.take().expect("stderr"));
    let mut seen = String::new();
    while !seen.contains("Converting") {
        let mut line = String::new();
        let read = stderr.read_line(&mut line).expect("read vmic's stderr");
        assert!(read > 0, "vmic ended before the copy-out:\n{seen}");
        seen.push_str(&line);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let convert_pid: i32 = loop {
        if let Ok(text) = std::fs::read_to_string(&pid_file) {
            break text.trim().parse().expect("a pid");
        }
        assert!(Instant::now() < deadline, "qemu-img convert never started");
        std::thread::sleep(Duration::from_millis(10));
    };

    let sent = Instant::now();
    // SAFETY: kill(2) on the child we spawned; no memory is shared.
    assert_eq!(unsafe { libc::kill(vmic.id() as i32, libc::SIGTERM) }, 0);
    let status = vmic.wait().expect("wait");
    let took = sent.elapsed();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).expect("stderr");
    assert!(took < Duration::from_secs(2), "vmic took {took:?} to stop");
    assert_eq!(status.code(), Some(1), "{seen}{rest}");
    assert!(rest.contains("interrupted"), "{rest}");
    // Killed when vmic dropped it; the kernel's teardown may take a moment more.
    let gone_by = Instant::now() + Duration::from_secs(1);
    while running(convert_pid) && Instant::now() < gone_by {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !running(convert_pid),
        "qemu-img convert (pid {convert_pid}) still runs"
    );
    assert!(!output.exists());
    assert_no_partial(&output);
    assert!(
        std::fs::read_dir(&build_dir)
            .expect("build dir")
            .flatten()
            .all(|entry| entry.file_name() == ".vmic.lock"),
        "the run's files are removed"
    );
    assert_eq!(sha256_of(&input), before, "the input is unchanged");
}

/// Whether `pid` is a live process (a zombie has stopped running).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}
