//! Text from a guest (console output, errors quoting it) or from the daemon, made safe to put
//! on a terminal: escape sequences (colours, cursor moves, title and clipboard OSCs) and every
//! other control character are removed, except newline and tab. A carriage return goes too: it
//! could overwrite what banger printed on the same line.

/// `s` without terminal escape sequences and control characters other than `\n` and `\t`.
pub fn terminal_safe(s: &str) -> String {
    // anstream parses the escape sequences (CSI, OSC, DCS, ...); it keeps whitespace controls
    // and UTF-8 C1 characters (U+0080..U+009F, such as the one-character CSI), dropped here.
    anstream::adapter::strip_str(s)
        .to_string()
        .chars()
        .filter(|&c| c == '\n' || c == '\t' || !c.is_control())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_controls_are_stripped_newlines_and_tabs_kept() {
        let hostile = "boot ok\r\n\x1b[2J\x1b[H\x1b]0;pwned title\x07\x1b]52;c;ZXZpbA==\x1b\\red \x1b[31mtext\x1b[0m\tend\n\u{9b}31mC1\x08\x7f\x00bell\x07\n";
        let clean = terminal_safe(hostile);
        assert_eq!(clean, "boot ok\nred text\tend\n31mC1bell\n");
        assert!(
            !clean
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t')
        );
        assert_eq!(terminal_safe("plain\ttext\n"), "plain\ttext\n");
    }
}
