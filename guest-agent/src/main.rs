//! The vmic guest agent.
fn main() {}
