//! vmic: customize Linux disk images inside a throwaway QEMU builder VM.
//!
//! The shape follows the house style: `cli` (clap) → `config` (parse + validate) → settings →
//! plan → execution through a `session` with the guest agent over a `transport`.

pub mod accel;
pub mod accept;
pub mod boot;
pub mod build;
pub mod cache;
pub mod cli;
pub mod commands;
pub mod completions;
pub mod config;
pub mod console;
pub mod doctor;
pub mod format;
pub mod gather;
pub mod guest_image;
pub mod image;
pub mod inert;
pub mod inspect;
pub mod machine;
pub mod orphan;
pub mod plan;
pub mod preflight;
pub mod provenance;
pub mod proxy;
pub mod pxe;
pub mod qemu;
pub mod references;
pub mod report;
pub mod rundir;
pub mod sandbox;
pub mod secret;
pub mod session;
pub mod settings;
pub mod space;
pub mod transport;
pub mod upload;
pub mod vm;
