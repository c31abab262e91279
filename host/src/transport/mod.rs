//! Host-guest channels.
