//! Diagnostics: an error (or a warning) with the byte span of the offending
//! text, a message saying what is wrong and a hint saying what to do about it.

use std::fmt;
use std::ops::Range;

/// A byte range in the spec text.
pub type Span = Range<usize>;

/// Whether a diagnostic stops the spec from compiling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Severity {
    /// The spec is rejected.
    #[default]
    Error,
    /// The spec compiles, but probably does not do what was meant.
    Warning,
}

impl Severity {
    /// `error` or `warning`, as rustc prints it.
    pub fn label(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One error or warning in a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Whether this is an error or a warning.
    pub severity: Severity,
    /// Byte range of the offending text in the spec source.
    pub span: Span,
    /// What is wrong, in one sentence.
    pub message: String,
    /// What to do about it, in one sentence (may be empty).
    pub help: String,
}

impl Diagnostic {
    /// An error.
    pub fn new(span: Span, message: impl Into<String>, help: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            span,
            message: message.into(),
            help: help.into(),
        }
    }

    /// A warning: the spec still compiles.
    pub fn warning(span: Span, message: impl Into<String>, help: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::new(span, message, help)
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The message and the hint as one line, as `compile_error!` shows it.
    pub fn text(&self) -> String {
        if self.help.is_empty() {
            self.message.clone()
        } else {
            format!("{}; {}", self.message, self.help)
        }
    }

    /// Renders the diagnostic the way rustc does: `error: ...` or
    /// `warning: ...`, `path:line:col`, the source line and a caret under the
    /// offending text.
    pub fn render(&self, path: &str, source: &str) -> String {
        let (line, col) = line_col(source, self.span.start);
        let line_text = source.lines().nth(line - 1).unwrap_or("");
        let width = source[self.span.start.min(source.len())..self.span.end.min(source.len())]
            .lines()
            .next()
            .map(|s| s.chars().count())
            .unwrap_or(0)
            .max(1);
        let gutter = format!("{line}").len();
        let mut out = format!("{}: {}\n", self.severity.label(), self.message);
        out += &format!("{:gutter$}--> {path}:{line}:{col}\n", "");
        out += &format!("{:gutter$} |\n", "");
        out += &format!("{line} | {line_text}\n");
        out += &format!(
            "{:gutter$} | {}{}\n",
            "",
            " ".repeat(col - 1),
            "^".repeat(width)
        );
        if !self.help.is_empty() {
            out += &format!("{:gutter$} = help: {}\n", "", self.help);
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl std::error::Error for Diagnostic {}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..floor_char_boundary(source, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let src = "ab\ncd\nef";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 4), (2, 2));
        assert_eq!(line_col(src, 6), (3, 1));
    }

    #[test]
    fn render_points_a_caret_at_the_span() {
        let src = "X {\n  step { q = 1; }\n}";
        let d = Diagnostic::new(13..14, "unknown name `q`", "declare it");
        let r = d.render("x.agr", src);
        assert!(r.contains("--> x.agr:2:10"), "{r}");
        assert!(r.contains("2 |   step { q = 1; }"), "{r}");
        assert!(r.contains("  |          ^\n"), "{r}");
        assert!(r.contains("= help: declare it"), "{r}");
        assert!(r.starts_with("error: unknown name `q`\n"), "{r}");
    }

    #[test]
    fn a_warning_renders_as_a_warning() {
        let src = "X {\n  hyper { k = 1 }\n  step { p = p; }\n}";
        let d = Diagnostic::warning(14..15, "`k` is never used", "remove it");
        assert!(!d.is_error());
        let r = d.render("x.agr", src);
        assert!(r.starts_with("warning: `k` is never used\n"), "{r}");
        assert!(r.contains("--> x.agr:2:11"), "{r}");
        assert!(r.contains("  |           ^\n"), "{r}");
    }
}
