//! The vmic guest agent: PID 1 of the builder VM, or a plain server for tests.
//!
//! As PID 1 ([`init`]) it prepares the machine, forks the server and powers the VM off when the
//! server ends, however it ends. Otherwise it serves directly on the channel named by its
//! arguments (`--stdio` is what host-side tests use).

mod build;
mod channel;
mod context;
mod cpio;
mod customize;
mod disk;
mod disks;
mod dracut_install;
mod exec;
mod files;
// The fuzz targets' entry functions for the pipeline's parsers: their corpora replay here.
#[cfg(test)]
#[path = "../../fuzz/src/agent_targets.rs"]
mod fuzz_targets;
mod image;
mod init;
mod inspect;
mod inventory;
mod iso;
mod ldd;
mod memory;
mod modules;
mod pipeline;
mod relay;
mod rootfs;
mod scratch;
mod server;
mod token;

use std::process::ExitCode;

use channel::ChannelSpec;

/// Print one line to the console (stderr; `/dev/console` when PID 1). Never to stdout, which
/// is the channel in `--stdio` mode.
macro_rules! console {
    ($($arg:tt)*) => {
        eprintln!("vmic-agent: {}", format_args!($($arg)*))
    };
}
pub(crate) use console;

const USAGE: &str = "\
usage: vmic-agent                 as PID 1 (the builder VM's /init): init, then serve
       vmic-agent --stdio         serve over stdin/stdout
       vmic-agent --serial        serve on the virtio-serial port org.vmic.agent.0
       vmic-agent --vsock [PORT]  serve on vsock (default port 1024)
       vmic-agent --cmdline       serve on the channel named by vmic.* keys in /proc/cmdline";

fn main() -> ExitCode {
    // Copied into an image's chroot as dracut's `ldd` (see `ldd`) and linked there as the
    // `dracut-install` wrapper (see `dracut_install`).
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_default();
    let name = std::path::Path::new(&program).file_name();
    if name == Some(std::ffi::OsStr::new(ldd::LDD_NAME)) {
        return ldd::main(args.collect());
    }
    if name == Some(std::ffi::OsStr::new(dracut_install::WRAPPER_NAME)) {
        return dracut_install::main(args.collect());
    }
    server::install_panic_hook();
    if std::process::id() == 1 {
        init::run();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let spec = match parse_args(&args) {
        Ok(spec) => spec,
        Err(message) => {
            eprintln!("vmic-agent: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match server::run(spec, Vec::new()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            console!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Arguments of the non-PID-1 mode.
fn parse_args(args: &[String]) -> Result<ChannelSpec, String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["--stdio"] => Ok(ChannelSpec::Stdio),
        ["--serial"] => Ok(ChannelSpec::Serial),
        ["--vsock"] => Ok(ChannelSpec::Vsock {
            port: vmic_protocol::AGENT_VSOCK_PORT,
        }),
        ["--vsock", port] => port
            .parse()
            .map(|port| ChannelSpec::Vsock { port })
            .map_err(|_| format!("invalid vsock port {port:?}")),
        ["--cmdline"] => {
            let cmdline = std::fs::read_to_string("/proc/cmdline")
                .map_err(|error| format!("cannot read /proc/cmdline: {error}"))?;
            Ok(init::parse_cmdline(&cmdline).settings.channel)
        }
        ["--help" | "-h"] => Err("help requested".into()),
        [] => Err("not PID 1: name a channel".into()),
        _ => Err(format!("unexpected arguments {args:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_the_channel() {
        let parse =
            |args: &[&str]| parse_args(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        assert_eq!(parse(&["--stdio"]), Ok(ChannelSpec::Stdio));
        assert_eq!(parse(&["--serial"]), Ok(ChannelSpec::Serial));
        assert_eq!(parse(&["--vsock"]), Ok(ChannelSpec::Vsock { port: 1024 }));
        assert_eq!(
            parse(&["--vsock", "5000"]),
            Ok(ChannelSpec::Vsock { port: 5000 })
        );
        assert!(parse(&["--vsock", "x"]).is_err());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }
}
