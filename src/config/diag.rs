//! Diagnostics: errors and warnings that name the file, line and column.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a file.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a place in the file.
    pub at: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.at {
            write!(f, ":{line}:{col}")?;
        }
        if self.severity == Severity::Warning {
            write!(f, ": warning")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A file being read, with the text needed to turn byte offsets into places.
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    /// Line and column (1-based, in characters) of a byte offset.
    pub fn place(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..floor_char_boundary(&self.text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Collects every problem of a load, so that one run reports them all.
#[derive(Default, Debug)]
pub struct Report {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Report {
    pub fn push(
        &mut self,
        severity: Severity,
        file: &Path,
        at: Option<(usize, usize)>,
        message: String,
    ) {
        let d = Diagnostic {
            severity,
            file: file.to_path_buf(),
            at,
            message,
        };
        match severity {
            Severity::Error => self.errors.push(d),
            Severity::Warning => self.warnings.push(d),
        }
    }

    pub fn error(&mut self, src: &Source, span: Range<usize>, message: impl Into<String>) {
        let at = Some(src.place(span.start));
        self.push(Severity::Error, &src.path, at, message.into());
    }

    pub fn warn(&mut self, src: &Source, span: Range<usize>, message: impl Into<String>) {
        let at = Some(src.place(span.start));
        self.push(Severity::Warning, &src.path, at, message.into());
    }

    /// A problem with a file as a whole (unreadable, for instance).
    pub fn file_error(&mut self, file: &Path, message: impl Into<String>) {
        self.push(Severity::Error, file, None, message.into());
    }
}

/// The outcome of a failed load: every error, and the warnings seen on the way.
#[derive(Debug)]
pub struct ConfigError {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_one_based() {
        let src = Source {
            path: "m.toml".into(),
            text: "a = 1\nbb = \"é x\"\n".into(),
        };
        assert_eq!(src.place(0), (1, 1));
        assert_eq!(src.place(6), (2, 1));
        assert_eq!(src.place(11), (2, 6));
    }
}
