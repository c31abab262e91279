//! Entry functions of the fuzz targets, one per untrusted-input parser.
//!
//! Each checks the parser's promises (no panic, bounded output, round trips, idempotence), so
//! a fuzzer finds wrong answers as well as crashes. The same files are compiled into the
//! workspace's tests (`#[path]`), which replay every corpus input on stable.

// The agent is a binary crate: its pure pipeline is compiled in here from its source file.
#[allow(dead_code)]
#[path = "../../guest-agent/src/pipeline/mod.rs"]
mod pipeline;

pub mod agent_targets;
pub mod host_targets;
