//! banger-helper (work in progress).
