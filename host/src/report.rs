//! The only place that prints to people: logging setup, error rendering, progress.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::cli::{GlobalArgs, LogFormat};

/// Why a command failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad command line or config: nothing was started (exit 2).
    Usage(anyhow::Error),
    /// The config file has errors, all listed (exit 2).
    Config(crate::config::ConfigErrors),
    /// The build or VM failed (exit 1).
    Build(anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) | Failure::Config(_) => 2,
            Failure::Build(_) => 1,
        }
    }
}

/// An error with advice on what to do about it, rendered as a `hint:` line.
#[derive(Debug)]
pub struct Hinted {
    pub message: String,
    pub hint: String,
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Hinted {}

/// Build an error that carries a hint.
pub fn hinted(message: impl Into<String>, hint: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Hinted {
        message: message.into(),
        hint: hint.into(),
    })
}

/// Render `error: …`, `caused by: …` lines and `hint: …` lines (uv style) to a string.
pub fn render_error(error: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut hints = Vec::new();
    for (index, cause) in error.chain().enumerate() {
        let prefix = if index == 0 { "error" } else { "caused by" };
        let text = cause.to_string();
        // Multi-line causes (guest console tails, tool stderr) keep their lines, indented.
        let mut lines = text.lines();
        out.push_str(&format!("{prefix}: {}\n", lines.next().unwrap_or("")));
        for line in lines {
            out.push_str(&format!("  {line}\n"));
        }
        if let Some(hinted) = cause.downcast_ref::<Hinted>() {
            hints.push(hinted.hint.clone());
        }
    }
    for hint in hints {
        out.push_str(&format!("hint: {hint}\n"));
    }
    out
}

pub fn print_failure(failure: &Failure) {
    let text = match failure {
        Failure::Usage(error) | Failure::Build(error) => render_error(error),
        Failure::Config(errors) => errors.to_string(),
    };
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes());
    if !text.ends_with('\n') {
        let _ = stderr.write_all(b"\n");
    }
}

/// Keeps the log file writer alive for the life of the program.
pub struct LoggingGuard;

/// Set up tracing: text or JSON on stderr, and JSON lines to `--log-file` when given.
pub fn init_logging(global: &GlobalArgs) -> anyhow::Result<LoggingGuard> {
    let filter = || {
        EnvFilter::try_from_env("VMIC_LOG")
            .unwrap_or_else(|_| EnvFilter::new(format!("vmic={0},{0}", global.log_level)))
    };
    let stderr_layer = match global.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .without_time()
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
    };
    let file_layer = match &global.log_file {
        Some(path) => {
            let file = fs_err::File::create(path)?;
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(Mutex::new(file.into_parts().0))
                    .with_filter(filter())
                    .boxed(),
            )
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr_layer)
        .with(file_layer)
        .try_init()?;
    Ok(LoggingGuard)
}

/// Whether progress bars should be drawn (a TTY on stderr and text logs).
pub fn interactive(global: &GlobalArgs) -> bool {
    global.log_format == LogFormat::Text && std::io::stderr().is_terminal()
}

/// A step's wall time for `--timestamp-file`: the host's own steps and the guest's
/// ([`vmic_protocol::Step::title`]) by name.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTime {
    pub step: String,
    pub seconds: f64,
}

/// Where the pipeline reports to people: step progress (an indicatif spinner per step on a TTY,
/// structured log lines otherwise), events (notes and warnings, through `tracing` so that JSON
/// logs and `--log-file` carry them, drawn above the spinner instead of through it), and each
/// step's wall time for `--timestamp-file`. Library code reports here and never prints. Clones
/// share one display, so background tasks (the guest's log, the proxy) report through it too.
#[derive(Clone)]
pub struct Reporter {
    state: Arc<Mutex<State>>,
}

struct State {
    bar: Option<indicatif::ProgressBar>,
    current: Option<(String, Instant)>,
    steps: Vec<StepTime>,
    started: Instant,
}

/// Whose words a line is: vmic's own, or the guest's (logged under `vmic::guest`, made inert
/// by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Vmic,
    Guest,
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reporter")
            .field("interactive", &self.state().bar.is_some())
            .finish()
    }
}

impl Reporter {
    pub fn new(interactive: bool) -> Reporter {
        let bar = interactive.then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {prefix:>12.cyan.bold} {msg} [{elapsed}]",
                )
                .expect("static template is valid"),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        Reporter {
            state: Arc::new(Mutex::new(State {
                bar,
                current: None,
                steps: Vec::new(),
                started: Instant::now(),
            })),
        }
    }

    /// Log lines only, no spinner: for callers with no terminal of their own (tests, tools).
    pub fn plain() -> Reporter {
        Reporter::new(false)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while reporting leaves nothing half-written that matters: carry on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Run `emit` with the spinner out of the way.
    fn above_bar(&self, emit: impl FnOnce()) {
        let bar = self.state().bar.clone();
        match bar {
            Some(bar) => bar.suspend(emit),
            None => emit(),
        }
    }

    /// Something the user should know (a cache hit, the VM's accelerator).
    pub fn note(&self, source: Source, message: impl fmt::Display) {
        self.above_bar(|| match source {
            Source::Vmic => tracing::info!("{message}"),
            Source::Guest => tracing::info!(target: "vmic::guest", "{message}"),
        });
    }

    /// Something the user should act on or may regret (a plain-text password, a refused
    /// connection, a cache that could not store).
    pub fn warn(&self, source: Source, message: impl fmt::Display) {
        self.above_bar(|| match source {
            Source::Vmic => tracing::warn!("{message}"),
            Source::Guest => tracing::warn!(target: "vmic::guest", "{message}"),
        });
    }

    /// An error the guest reported (its own words, already made inert).
    pub fn guest_error(&self, message: impl fmt::Display) {
        self.above_bar(|| tracing::error!(target: "vmic::guest", "{message}"));
    }

    /// Start `step` (ends the previous one).
    pub fn step(&self, step: &str, message: &str) {
        self.finish_step();
        self.above_bar(|| tracing::info!(step, "{message}"));
        let mut state = self.state();
        if let Some(bar) = &state.bar {
            bar.set_prefix(step.to_string());
            bar.set_message(message.to_string());
            bar.reset_elapsed();
        }
        state.current = Some((step.to_string(), Instant::now()));
    }

    /// The step running now, if any (named in a timeout's error).
    pub fn current_step(&self) -> Option<String> {
        self.state().current.as_ref().map(|(step, _)| step.clone())
    }

    /// Progress within the current step.
    pub fn update(&self, done: u64, total: u64) {
        if let Some(bar) = &self.state().bar {
            if total > 0 {
                bar.set_message(format!("{done}/{total}"));
            }
        }
    }

    /// Record a step timed elsewhere (the guest's).
    pub fn record(&self, step: vmic_protocol::StepTime) {
        self.state().steps.push(StepTime {
            step: step.step.title().to_string(),
            seconds: step.seconds,
        });
    }

    pub fn finish_step(&self) {
        let mut state = self.state();
        if let Some((step, started)) = state.current.take() {
            let seconds = started.elapsed().as_secs_f64();
            if let Some(bar) = &state.bar {
                bar.println(format!("{step:>14} done in {seconds:.1} s"));
            }
            tracing::debug!(step, seconds, "step finished");
            state.steps.push(StepTime { step, seconds });
        }
    }

    /// End the display; returns the total wall time.
    pub fn finish(&self) -> f64 {
        self.finish_step();
        let mut state = self.state();
        if let Some(bar) = state.bar.take() {
            bar.finish_and_clear();
        }
        state.started.elapsed().as_secs_f64()
    }

    /// The steps timed so far, in order.
    pub fn steps(&self) -> Vec<StepTime> {
        self.state().steps.clone()
    }

    /// Write the per-step wall times as JSON.
    pub fn write_timestamps(&self, path: &std::path::Path, total: f64) -> anyhow::Result<()> {
        let steps: Vec<serde_json::Value> = self
            .steps()
            .iter()
            .map(|step| serde_json::json!({ "step": step.step, "seconds": step.seconds }))
            .collect();
        let document = serde_json::json!({ "steps": steps, "totalSeconds": total });
        fs_err::write(path, serde_json::to_vec_pretty(&document)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_report_to_one_display_and_steps_are_timed_in_order() {
        let reporter = Reporter::plain();
        let background = reporter.clone();
        reporter.step("Preparing", "disks");
        assert_eq!(background.current_step().as_deref(), Some("Preparing"));
        background.step("Booting", "builder VM");
        reporter.record(vmic_protocol::StepTime {
            step: vmic_protocol::Step::MakeInitrdAndSquashfs,
            seconds: 2.5,
        });
        background.note(Source::Guest, "a guest line");
        let total = reporter.finish();
        assert_eq!(reporter.current_step(), None, "finish ends the step");
        let steps: Vec<String> = background.steps().into_iter().map(|s| s.step).collect();
        assert_eq!(
            steps,
            [
                "Preparing".to_string(),
                vmic_protocol::Step::MakeInitrdAndSquashfs
                    .title()
                    .to_string(),
                "Booting".to_string()
            ]
        );
        assert!(background.steps()[0].seconds <= total);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("times.json");
        reporter.write_timestamps(&path, total).expect("write");
        let written: serde_json::Value =
            serde_json::from_slice(&fs_err::read(&path).expect("read")).expect("json");
        assert_eq!(written["steps"][2]["step"], "Booting");
        assert_eq!(written["steps"][1]["seconds"], 2.5);
    }
}
