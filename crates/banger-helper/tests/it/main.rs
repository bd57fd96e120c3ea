//! banger-helper's integration tests: the real server over a real socket in a temp dir.

mod cli;
mod common;
mod hostile;
mod real_net;
mod valid;
