//! VM end-to-end tests.
