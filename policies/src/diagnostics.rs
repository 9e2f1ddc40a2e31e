//! Diagnostics about policy files: where (file, line, column), what, and what
//! to do, rendered as plain text in the style of compiler messages.
//!
//! Cedar reports its parse and validation errors as `miette` diagnostics with
//! byte spans; [`Diagnostic::from_miette`] turns one into a [`Diagnostic`]
//! against the text of the file it came from.

use std::fmt;

/// What kind of problem a [`Diagnostic`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiagnosticKind {
    /// The text is not valid Cedar.
    Syntax,
    /// Valid Cedar that does not fit the Postern schema (unknown attribute,
    /// type mismatch, unknown action or entity type, …).
    Schema,
    /// Valid Cedar that Postern does not accept: a template, a duplicate
    /// policy id, or input beyond the size and nesting limits.
    Unsupported,
    /// Accepted, but probably not what the author meant (for example a policy
    /// that can never apply).
    Warning,
}

impl DiagnosticKind {
    fn label(self) -> &'static str {
        match self {
            DiagnosticKind::Syntax => "error[syntax]",
            DiagnosticKind::Schema => "error[schema]",
            DiagnosticKind::Unsupported => "error[unsupported]",
            DiagnosticKind::Warning => "warning",
        }
    }
}

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Kind of problem.
    pub kind: DiagnosticKind,
    /// The file, as it was named to the loader (`policies/teams.cedar`).
    pub file: String,
    /// Line, from 1; 0 when Cedar gave no position.
    pub line: usize,
    /// Column in characters, from 1; 0 when Cedar gave no position.
    pub column: usize,
    /// The policy it concerns, when known.
    pub policy: Option<String>,
    /// What is wrong.
    pub message: String,
    /// What was expected at that position, when the parser says so.
    pub expected: Option<String>,
    /// A suggestion, when there is one.
    pub help: Option<String>,
    /// The text of the line, for the excerpt (without the newline).
    pub source_line: String,
    /// Characters to underline from `column` (at least 1 when positioned).
    pub underline: usize,
}

impl Diagnostic {
    /// A diagnostic at byte `offset` (spanning `len` bytes) of `text`.
    pub(crate) fn at(
        kind: DiagnosticKind,
        file: &str,
        text: &str,
        offset: usize,
        len: usize,
        message: String,
    ) -> Self {
        let (line, column, source_line, underline) = locate(text, offset, len);
        Diagnostic {
            kind,
            file: file.to_owned(),
            line,
            column,
            policy: None,
            message,
            expected: None,
            help: None,
            source_line,
            underline,
        }
    }

    /// A diagnostic with no position in the file.
    pub(crate) fn whole_file(kind: DiagnosticKind, file: &str, message: String) -> Self {
        Diagnostic {
            kind,
            file: file.to_owned(),
            line: 0,
            column: 0,
            policy: None,
            message,
            expected: None,
            help: None,
            source_line: String::new(),
            underline: 0,
        }
    }

    /// Converts a Cedar (`miette`) diagnostic whose spans point into `text`.
    pub(crate) fn from_miette(
        kind: DiagnosticKind,
        file: &str,
        text: &str,
        d: &dyn miette::Diagnostic,
    ) -> Self {
        let message = d.to_string();
        let label = d.labels().and_then(|mut labels| labels.next());
        let mut out = match &label {
            Some(l) => Diagnostic::at(kind, file, text, l.offset(), l.len(), message),
            None => Diagnostic::whole_file(kind, file, message),
        };
        out.expected = label.and_then(|l| l.label().map(str::to_owned));
        out.help = d.help().map(|h| h.to_string());
        out
    }

    /// `file:line:column` (or just `file` without a position).
    pub fn location(&self) -> String {
        if self.line == 0 {
            self.file.clone()
        } else {
            format!("{}:{}:{}", self.file, self.line, self.column)
        }
    }

    /// Whether this is an error (anything but a warning).
    pub fn is_error(&self) -> bool {
        self.kind != DiagnosticKind::Warning
    }
}

/// 1-based line and character column of byte `offset` in `text`, the text of
/// that line, and how many characters of it a `len`-byte span covers.
fn locate(text: &str, offset: usize, len: usize) -> (usize, usize, String, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[..offset].matches('\n').count() + 1;
    let source_line = text[line_start..line_end].trim_end_matches('\r');
    let column = text[line_start..offset].chars().count() + 1;
    let mut span_end = offset.saturating_add(len).min(line_end);
    while !text.is_char_boundary(span_end) {
        span_end -= 1;
    }
    let underline = text[offset..span_end].chars().count().max(1);
    (line, column, source_line.to_owned(), underline)
}

/// Characters of untrusted text shown in an excerpt; longer lines are cut.
const EXCERPT_CHARS: usize = 200;

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.kind.label(),
            self.location(),
            self.message
        )?;
        if self.line > 0 {
            let number = self.line.to_string();
            let pad = " ".repeat(number.len());
            // Tabs would misalign the caret; show them as one space each.
            let shown: String = self
                .source_line
                .chars()
                .take(EXCERPT_CHARS)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            write!(f, "\n{pad} |\n{number} | {shown}")?;
            if self.column <= EXCERPT_CHARS {
                let width = self.underline.min(EXCERPT_CHARS + 1 - self.column).max(1);
                write!(
                    f,
                    "\n{pad} | {}{}",
                    " ".repeat(self.column - 1),
                    "^".repeat(width)
                )?;
                if let Some(expected) = &self.expected {
                    write!(f, " {expected}")?;
                }
            }
        } else if let Some(expected) = &self.expected {
            write!(f, "\n  = {expected}")?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  = help: {help}")?;
        }
        Ok(())
    }
}

/// Every problem found in a set of policy files, errors first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Number of errors (warnings excluded).
    pub fn error_count(&self) -> usize {
        self.0.iter().filter(|d| d.is_error()).count()
    }

    /// The diagnostics, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}\n")?;
        }
        let errors = self.error_count();
        let warnings = self.0.len() - errors;
        write!(
            f,
            "{errors} error{}, {warnings} warning{}",
            if errors == 1 { "" } else { "s" },
            if warnings == 1 { "" } else { "s" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_lines_columns_and_multibyte_text() {
        let text = "first\n  sécond line\r\nthird";
        let off = text.find("line").unwrap();
        let d = Diagnostic::at(
            DiagnosticKind::Syntax,
            "a.cedar",
            text,
            off,
            4,
            "bad".into(),
        );
        assert_eq!((d.line, d.column, d.underline), (2, 10, 4));
        assert_eq!(d.source_line, "  sécond line");
        assert_eq!(d.location(), "a.cedar:2:10");
        let shown = d.to_string();
        assert!(
            shown.contains("2 |   sécond line\n  |          ^^^^"),
            "{shown}"
        );
        // Offsets past the end or inside a character are clamped, not a panic.
        let d = Diagnostic::at(DiagnosticKind::Syntax, "a", text, 9999, 9999, "x".into());
        assert_eq!(d.line, 3);
        let inside = text.find('é').unwrap() + 1;
        let d = Diagnostic::at(DiagnosticKind::Syntax, "a", text, inside, 1, "x".into());
        assert_eq!((d.line, d.column), (2, 4));
        let d = Diagnostic::at(DiagnosticKind::Syntax, "a", "", 0, 0, "x".into());
        assert_eq!((d.line, d.column, d.underline), (1, 1, 1));
    }

    #[test]
    fn renders_help_expected_and_counts() {
        let mut d = Diagnostic::at(
            DiagnosticKind::Syntax,
            "p.cedar",
            "permit(principal, action, resource)",
            35,
            0,
            "unexpected end of input".into(),
        );
        d.expected = Some("expected `;`".into());
        d.help = Some("end every policy with `;`".into());
        let all = Diagnostics(vec![
            d,
            Diagnostic::whole_file(DiagnosticKind::Warning, "q.cedar", "odd".into()),
        ]);
        let text = all.to_string();
        assert!(text.contains("error[syntax]: p.cedar:1:36: unexpected end of input"));
        assert!(text.contains("^ expected `;`"));
        assert!(text.contains("= help: end every policy with `;`"));
        assert!(text.contains("warning: q.cedar: odd"));
        assert!(text.ends_with("1 error, 1 warning"));
        assert_eq!(all.error_count(), 1);
    }
}
