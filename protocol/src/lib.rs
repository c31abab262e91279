//! The wire contract between host and guest agent.
