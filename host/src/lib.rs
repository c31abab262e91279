//! vmic: customize Linux disk images inside a throwaway QEMU builder VM.
//!
//! The shape follows the house style: `cli` (clap) → `config` (parse + validate) → settings →
//! plan → execution through a `session` with the guest agent over a `transport`.

pub mod accel;
pub mod boot;
pub mod build;
pub mod cli;
pub mod commands;
pub mod config;
pub mod doctor;
pub mod guest_image;
pub mod image;
pub mod plan;
pub mod provenance;
pub mod qemu;
pub mod report;
pub mod session;
pub mod transport;
pub mod vm;
