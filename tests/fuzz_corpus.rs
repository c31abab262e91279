//! Replays the fuzz corpora of the host's parsers (the agent's frames, the config loader) as
//! ordinary tests on stable: the same entry functions the fuzz targets call (`fuzz/`).

#[path = "../fuzz/src/host_targets.rs"]
mod host_targets;
