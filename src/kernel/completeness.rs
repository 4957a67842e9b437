//! `is_complete` for Rust cells: a small lexer that tracks brackets,
//! strings, character literals and comments. A cell is *incomplete* when a
//! bracket, string or block comment is still open (the front end then waits
//! for more lines), *invalid* when a closing bracket has no opener or does
//! not match it, and *complete* otherwise. Magic (`%`) and evcxr command
//! (`:`) cells are single lines and always complete.

use super::messages::CompletenessStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    Complete,
    /// Open brackets, to size the indent the front end suggests.
    Incomplete { depth: usize },
    Invalid,
}

impl Completeness {
    pub fn status(self) -> CompletenessStatus {
        match self {
            Completeness::Complete => CompletenessStatus::Complete,
            Completeness::Incomplete { .. } => CompletenessStatus::Incomplete,
            Completeness::Invalid => CompletenessStatus::Invalid,
        }
    }

    pub fn indent(self) -> Option<String> {
        match self {
            Completeness::Incomplete { depth } => Some("    ".repeat(depth.max(1))),
            _ => None,
        }
    }
}

/// Classifies a cell.
///
/// ```
/// use deepscope::kernel::completeness::{check, Completeness};
/// assert_eq!(check("let x = 1;"), Completeness::Complete);
/// assert_eq!(check("fn f() {"), Completeness::Incomplete { depth: 1 });
/// assert_eq!(check("}"), Completeness::Invalid);
/// ```
pub fn check(code: &str) -> Completeness {
    let trimmed = code.trim_start();
    if trimmed.starts_with('%') || trimmed.starts_with(':') {
        return Completeness::Complete;
    }
    let chars: Vec<char> = code.chars().collect();
    let mut stack: Vec<char> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '/' if next == Some('/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '/' if next == Some('*') => {
                // Block comments nest in Rust.
                let mut depth = 1;
                i += 2;
                while depth > 0 {
                    match (chars.get(i), chars.get(i + 1)) {
                        (None, _) => return Completeness::Incomplete { depth: stack.len() },
                        (Some('/'), Some('*')) => {
                            depth += 1;
                            i += 2;
                        }
                        (Some('*'), Some('/')) => {
                            depth -= 1;
                            i += 2;
                        }
                        _ => i += 1,
                    }
                }
                continue;
            }
            'r' | 'b' if is_raw_string_start(&chars, i) => match skip_raw_string(&chars, i) {
                Some(end) => {
                    i = end;
                    continue;
                }
                None => return Completeness::Incomplete { depth: stack.len() },
            },
            '"' => match skip_string(&chars, i + 1) {
                Some(end) => {
                    i = end;
                    continue;
                }
                None => return Completeness::Incomplete { depth: stack.len() },
            },
            '\'' => {
                i = skip_char_or_lifetime(&chars, i);
                continue;
            }
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(open) {
                    return Completeness::Invalid;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if stack.is_empty() {
        Completeness::Complete
    } else {
        Completeness::Incomplete { depth: stack.len() }
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `r"`, `r#"`, `br"`, `br#"` not preceded by an identifier character.
fn is_raw_string_start(chars: &[char], i: usize) -> bool {
    if i > 0 && is_ident_char(chars[i - 1]) {
        return false;
    }
    let mut j = i;
    if chars[j] == 'b' {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return false;
    }
    j += 1;
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    chars.get(j) == Some(&'"')
}

fn skip_raw_string(chars: &[char], i: usize) -> Option<usize> {
    let mut j = i;
    if chars[j] == 'b' {
        j += 1;
    }
    j += 1; // 'r'
    let mut hashes = 0;
    while chars.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    j += 1; // opening quote
    while j < chars.len() {
        if chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    None
}

/// From just after an opening `"`: the index after the closing quote.
fn skip_string(chars: &[char], mut j: usize) -> Option<usize> {
    while j < chars.len() {
        match chars[j] {
            '\\' => j += 2,
            '"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// `'a'`, `'\n'`, `'\u{1F600}'` are characters; `'a` is a lifetime or label.
fn skip_char_or_lifetime(chars: &[char], i: usize) -> usize {
    match (chars.get(i + 1), chars.get(i + 2)) {
        (Some('\\'), _) => {
            let mut j = i + 2;
            while j < chars.len() && chars[j] != '\'' && chars[j] != '\n' {
                j += 1;
            }
            j + 1
        }
        (Some(_), Some('\'')) => i + 3,
        _ => i + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        for ok in ["let x = 1;", "1 + 1", "fn f() { g(\"}\") }", "let c = '{';", "fn f<'a>(x: &'a str) {}",
            "// {\nlet x = 2;", "/* { /* } */ */ 3", "let s = r#\"(\"#;", ":vars", "%trace In the beginning (", "let b = b'[';"]
        {
            assert_eq!(check(ok), Completeness::Complete, "{ok}");
        }
        for open in ["fn f() {", "let v = vec![1,", "let s = \"abc", "/* open", "let s = r#\"x\"", "foo(bar(1)"] {
            assert!(matches!(check(open), Completeness::Incomplete { .. }), "{open}");
        }
        for bad in ["}", "let x = 1; )", "foo(]", "vec![1, 2)"] {
            assert_eq!(check(bad), Completeness::Invalid, "{bad}");
        }
        assert_eq!(check("fn f() { if x {").indent().as_deref(), Some("        "));
    }

    #[test]
    fn never_panics_on_odd_input() {
        for s in ["'", "\\", "r#", "b", "\"\\", "'\\", "/*/", "r###\"", "'\\u{"] {
            let _ = check(s);
        }
    }
}
