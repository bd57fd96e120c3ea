//! Showing progress and warning frames on stderr.
//!
//! On a terminal, [`TtyProgress`] keeps one live line with a spinner and the current stage and,
//! as each next stage begins, replaces it with a finished line (`  ✓ vmm_spawn  0.12s`).
//! Elsewhere, [`PlainSink`] prints warnings only, so logs and pipes stay clean.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::client::FrameSink;

/// ANSI styling, or none when colour is off (not a terminal, or `NO_COLOR` set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

impl Style {
    /// Colour unless `NO_COLOR` is set to a non-empty value (https://no-color.org).
    pub fn for_terminal(is_tty: bool, no_color: Option<&std::ffi::OsStr>) -> Style {
        Style {
            color: is_tty && no_color.is_none_or(|v| v.is_empty()),
        }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    pub fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }

    pub fn green(self, text: &str) -> String {
        self.paint("32", text)
    }

    pub fn red(self, text: &str) -> String {
        self.paint("31", text)
    }

    pub fn yellow(self, text: &str) -> String {
        self.paint("33", text)
    }
}

/// Formats a warning frame the same way on a terminal and off it.
pub fn warning_line(style: Style, message: &str) -> String {
    format!(
        "banger: {} {}",
        style.yellow("warning:"),
        crate::sanitize::terminal_safe(message)
    )
}

/// Warnings only.
pub struct PlainSink<'a> {
    pub err: &'a mut dyn Write,
}

impl std::fmt::Debug for PlainSink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainSink").finish_non_exhaustive()
    }
}

impl FrameSink for PlainSink<'_> {
    fn progress(&mut self, _stage: &str, _detail: Option<&str>) {}

    fn warning(&mut self, message: &str) {
        // stderr failing is not worth failing the operation over.
        let _ = writeln!(
            self.err,
            "{}",
            warning_line(Style { color: false }, message)
        );
    }
}

const SPINNER: &[char] = &['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// Live stage-by-stage progress for a terminal.
pub struct TtyProgress<'a> {
    err: &'a mut dyn Write,
    style: Style,
    current: Option<Stage>,
    frame: usize,
}

struct Stage {
    name: String,
    detail: Option<String>,
    started: Instant,
}

impl std::fmt::Debug for TtyProgress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtyProgress")
            .field("style", &self.style)
            .finish_non_exhaustive()
    }
}

impl<'a> TtyProgress<'a> {
    pub fn new(err: &'a mut dyn Write, style: Style) -> Self {
        TtyProgress {
            err,
            style,
            current: None,
            frame: 0,
        }
    }

    /// Erases the live line (carriage return + clear to end of line).
    fn clear(&mut self) {
        if self.current.is_some() {
            let _ = write!(self.err, "\r\x1b[2K");
        }
    }

    fn draw(&mut self) {
        let Some(stage) = &self.current else { return };
        let spin = SPINNER[self.frame % SPINNER.len()];
        let detail = stage
            .detail
            .as_deref()
            .map(|d| format!(" {}", self.style.dim(d)))
            .unwrap_or_default();
        let _ = write!(
            self.err,
            "  {spin} {}{detail}  {}",
            stage.name,
            self.style.dim(&secs(stage.started.elapsed()))
        );
        let _ = self.err.flush();
    }

    /// Replaces the live line with the finished line of the current stage.
    fn complete(&mut self, ok: bool) {
        self.clear();
        if let Some(stage) = self.current.take() {
            let mark = if ok {
                self.style.green("✓")
            } else {
                self.style.red("✗")
            };
            let _ = writeln!(
                self.err,
                "  {mark} {}  {}",
                stage.name,
                self.style.dim(&secs(stage.started.elapsed()))
            );
        }
        let _ = self.err.flush();
    }
}

impl FrameSink for TtyProgress<'_> {
    fn progress(&mut self, stage: &str, detail: Option<&str>) {
        self.complete(true);
        self.current = Some(Stage {
            name: crate::sanitize::terminal_safe(stage),
            detail: detail.map(crate::sanitize::terminal_safe),
            started: Instant::now(),
        });
        self.draw();
    }

    fn warning(&mut self, message: &str) {
        self.clear();
        let _ = writeln!(self.err, "{}", warning_line(self.style, message));
        self.draw();
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }

    fn tick(&mut self) -> bool {
        if self.current.is_some() {
            self.frame += 1;
            self.clear();
            self.draw();
        }
        true
    }

    fn finish(&mut self, ok: bool) {
        self.complete(ok);
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_disables_styling() {
        assert!(Style::for_terminal(true, None).color);
        assert!(!Style::for_terminal(true, Some("1".as_ref())).color);
        assert!(Style::for_terminal(true, Some("".as_ref())).color);
        assert!(!Style::for_terminal(false, None).color);
        assert_eq!(Style { color: false }.green("x"), "x");
        assert_eq!(Style { color: true }.green("x"), "\x1b[32mx\x1b[0m");
    }

    #[test]
    fn tty_progress_marks_each_finished_stage() {
        let mut out = Vec::new();
        {
            let mut p = TtyProgress::new(&mut out, Style { color: false });
            p.progress("allocate", None);
            assert!(p.tick());
            p.progress("vmm_spawn", Some("firecracker"));
            p.warning("slow disk");
            p.finish(false);
        }
        let text = String::from_utf8(out).unwrap();
        let done: Vec<&str> = text
            .split('\n')
            .map(|l| l.rsplit("\x1b[2K").next().unwrap())
            .filter(|l| !l.is_empty())
            .collect();
        assert!(done[0].starts_with("  ✓ allocate  0."), "{done:?}");
        assert_eq!(done[1], "banger: warning: slow disk");
        assert!(done[2].starts_with("  ✗ vmm_spawn  0."), "{done:?}");
        assert!(text.contains("⠙ allocate"), "spinner advanced: {text:?}");
        assert!(text.contains("vmm_spawn firecracker"), "{text:?}");
    }

    #[test]
    fn plain_sink_prints_only_warnings() {
        let mut out = Vec::new();
        {
            let mut p = PlainSink { err: &mut out };
            p.progress("allocate", None);
            p.warning("careful");
            p.finish(true);
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "banger: warning: careful\n"
        );
    }
}
