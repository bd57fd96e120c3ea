//! banger-helper's integration tests: the real server over a real socket in a temp dir.

mod cancel;
mod cli;
mod common;
mod hostile;
mod real_net;
mod valid;
