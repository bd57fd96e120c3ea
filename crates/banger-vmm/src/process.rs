//! Process supervision helpers (to be written).

use std::path::Path;

/// The last `lines` lines of a text file, or an empty string if it cannot be read.
pub fn tail_file(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
