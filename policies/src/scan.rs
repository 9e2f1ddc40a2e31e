//! A lexical pre-check of policy text, run before Cedar's parser.
//!
//! Cedar's parser, validator and evaluator recurse over the syntax tree. The
//! parser has no guard: about two hundred nested parentheses overflow a
//! 2 MiB thread stack, which aborts the process (not a panic; nothing can
//! catch it). The validator and evaluator do have a guard, but it turns a deep
//! expression into a "recursion limit reached" error — at evaluation, that
//! error makes every decision a deny — and where it trips depends on the
//! stack of the calling thread (measured: about 450 chained operators on a
//! 2 MiB stack).
//!
//! So this scan refuses, before Cedar sees it, text nested deeper than
//! [`MAX_NESTING_DEPTH`] brackets, and any policy with more than
//! [`MAX_POLICY_OPERATORS`] operators or [`MAX_POLICY_TOKENS`] tokens. The
//! syntax tree's depth is at most the number of operators plus the nesting,
//! so whatever is accepted parses, validates and evaluates on an ordinary
//! 2 MiB thread with room to spare (a test checks the worst case).

use crate::diagnostics::{Diagnostic, DiagnosticKind};

/// Deepest nesting of `(`, `[` and `{` accepted in a policy file.
pub const MAX_NESTING_DEPTH: usize = 32;

/// Most operators accepted in one policy: `.` (attribute access and method
/// call), `!`, `-`, `+`, `*`, comparisons, `&&`, `||`, `in`, `has`, `like`,
/// `is` and `if`. A rule such as `context.source_ip.isInRange(ip("…")) ||`
/// uses three, so one policy can list about 80 address ranges; split longer
/// lists across several permit policies.
pub const MAX_POLICY_OPERATORS: usize = 256;

/// Most tokens accepted in one policy (a word, a number, a string literal or
/// a punctuation character each count as one), which bounds flat lists such
/// as long sets of names.
pub const MAX_POLICY_TOKENS: usize = 4096;

const KEYWORD_OPERATORS: &[&[u8]] = &[b"in", b"has", b"like", b"is", b"if"];
const TWO_CHAR_OPERATORS: &[&[u8]] = &[b"&&", b"||", b"==", b"!=", b"<=", b">="];

fn limit_error(file: &str, text: &str, at: usize, message: String, help: &str) -> Box<Diagnostic> {
    let mut d = Diagnostic::at(DiagnosticKind::Unsupported, file, text, at, 1, message);
    d.help = Some(help.to_owned());
    Box::new(d)
}

/// Checks `text` against the nesting and size limits. Returns the first
/// violation, positioned in `file`.
pub(crate) fn check(file: &str, text: &str) -> Result<(), Box<Diagnostic>> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    let mut tokens = 0usize;
    let mut operators = 0usize;
    let mut policy_start = 0usize;
    while i < bytes.len() {
        let start = i;
        let mut operator = false;
        match bytes[i] {
            b if b.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                i = bytes[i..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |n| i + n);
                continue;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b if b.is_ascii_alphanumeric() || b == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                operator = KEYWORD_OPERATORS.contains(&&bytes[start..i]);
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING_DEPTH {
                    return Err(limit_error(
                        file,
                        text,
                        start,
                        format!("brackets nested more than {MAX_NESTING_DEPTH} deep"),
                        "simplify the expression, or split it into several policies",
                    ));
                }
                i += 1;
            }
            b')' | b']' | b'}' => {
                // An unbalanced closer is Cedar's to report.
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b';' if depth == 0 => {
                tokens = 0;
                operators = 0;
                i += 1;
                policy_start = i;
                continue;
            }
            b'.' | b'!' | b'-' | b'+' | b'*' | b'<' | b'>' | b'=' | b'&' | b'|' => {
                operator = true;
                let pair = bytes.get(i..i + 2);
                i += if pair.is_some_and(|p| TWO_CHAR_OPERATORS.contains(&p)) {
                    2
                } else {
                    1
                };
            }
            _ => i += 1,
        }
        tokens += 1;
        operators += usize::from(operator);
        if tokens > MAX_POLICY_TOKENS || operators > MAX_POLICY_OPERATORS {
            let what = if operators > MAX_POLICY_OPERATORS {
                format!("{MAX_POLICY_OPERATORS} operators")
            } else {
                format!("{MAX_POLICY_TOKENS} tokens")
            };
            return Err(limit_error(
                file,
                text,
                skip_space_and_comments(text, policy_start),
                format!("this policy has more than {what}"),
                "split it into several policies",
            ));
        }
    }
    Ok(())
}

/// Offset of the first token at or after `from`.
fn skip_space_and_comments(text: &str, mut from: usize) -> usize {
    loop {
        let rest = &text[from.min(text.len())..];
        let trimmed = rest.trim_start();
        from += rest.len() - trimmed.len();
        if trimmed.starts_with("//") {
            from += trimmed.find('\n').unwrap_or(trimmed.len());
        } else {
            return from;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_policies_pass() {
        let text = r#"
            // a comment with ((((( and "quotes
            @id("x") permit(principal, action, resource)
            when { context has source_ip && [1, [2, {a: "(((("}] ] != [] };
        "#;
        assert!(check("a.cedar", text).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_where_it_happens() {
        let text = format!(
            "permit(principal, action, resource)\nwhen {{ {}true{} }};",
            "(".repeat(100),
            ")".repeat(100)
        );
        let d = check("deep.cedar", &text).unwrap_err();
        assert_eq!(d.line, 2);
        assert_eq!(d.column, 8 + MAX_NESTING_DEPTH - 1);
        assert!(d.message.contains("nested"));
    }

    #[test]
    fn operators_are_counted_once_each() {
        let policy = |body: &str| format!("permit(principal, action, resource) when {{ {body} }};");
        // 3 operators per term: `.`, `==`, `||` (the last term has no `||`).
        let terms = MAX_POLICY_OPERATORS / 3;
        let ok = vec!["context.weekday == 1"; terms].join(" || ");
        assert!(check("ok.cedar", &policy(&ok)).is_ok());
        let over = vec!["context.weekday == 1"; terms + 1].join(" || ");
        let d = check("over.cedar", &policy(&over)).unwrap_err();
        assert!(
            d.message.contains("more than 256 operators"),
            "{}",
            d.message
        );
        // Keywords count; words that merely contain them do not.
        let words = vec!["principal has team"; MAX_POLICY_OPERATORS].join(" && ");
        assert!(check("kw.cedar", &policy(&words)).is_err());
        let names = vec!["\"in has like is if\""; 1000].join(", ");
        assert!(check("s.cedar", &policy(&format!("[{names}] != [\"x\"]"))).is_ok());
    }

    #[test]
    fn long_policies_are_refused_but_many_short_ones_are_fine() {
        let many = "permit(principal, action, resource) when { true };\n".repeat(2000);
        assert!(check("many.cedar", &many).is_ok());
        let long = format!(
            "permit(principal, action, resource);\n// note\npermit(principal, action, resource) when {{ [{}] != [] }};",
            "1, ".repeat(MAX_POLICY_TOKENS)
        );
        let d = check("long.cedar", &long).unwrap_err();
        assert_eq!((d.line, d.column), (3, 1));
        assert!(d.message.contains("4096 tokens"), "{}", d.message);
    }

    #[test]
    fn unterminated_strings_and_stray_closers_do_not_panic() {
        for text in [
            "\"",
            "\"\\",
            "))))",
            "permit(\"abc",
            "//",
            "é(",
            ";;;",
            "&",
            "=",
            "|",
        ] {
            assert!(check("odd.cedar", text).is_ok(), "{text:?}");
        }
    }
}
