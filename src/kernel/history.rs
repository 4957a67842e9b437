//! Input history of a kernel session, answering `history_request`
//! (`tail`, `range`, `search` with IPython's glob patterns).
use serde_json::{json, Value};

use super::messages::HistoryRequest;

#[derive(Clone, Debug)]
struct Entry {
    line: u32,
    input: String,
    output: Option<String>,
}

/// Cells stored with `store_history`, numbered like their execution count.
#[derive(Default, Debug)]
pub struct History {
    entries: Vec<Entry>,
}

/// The session number in replies: one history per kernel process.
pub const SESSION: i64 = 1;

impl History {
    pub fn push(&mut self, line: u32, input: &str) {
        self.entries.push(Entry { line, input: input.to_string(), output: None });
    }

    /// The text/plain result of the latest entry, for `output=true` requests.
    pub fn set_output(&mut self, line: u32, output: &str) {
        if let Some(e) = self.entries.iter_mut().rev().find(|e| e.line == line) {
            e.output = Some(output.to_string());
        }
    }

    fn item(e: &Entry, output: bool) -> Value {
        if output {
            json!([SESSION, e.line, [e.input, e.output]])
        } else {
            json!([SESSION, e.line, e.input])
        }
    }

    /// The `history` list of a reply; an unknown access type gives none.
    pub fn query(&self, r: &HistoryRequest) -> Vec<Value> {
        let selected: Vec<&Entry> = match r.hist_access_type.as_str() {
            "tail" => {
                let n = if r.n == 0 { self.entries.len() } else { r.n };
                self.entries.iter().skip(self.entries.len().saturating_sub(n)).collect()
            }
            "range" => {
                if r.session != 0 && r.session != SESSION && r.session != -1 {
                    Vec::new()
                } else {
                    let stop = if r.stop <= 0 { i64::MAX } else { r.stop };
                    self.entries.iter().filter(|e| (e.line as i64) >= r.start && (e.line as i64) < stop).collect()
                }
            }
            "search" => {
                let pattern = if r.pattern.is_empty() { "*" } else { r.pattern.as_str() };
                let mut hits: Vec<&Entry> = Vec::new();
                for e in self.entries.iter().rev() {
                    if glob_match(pattern, &e.input) && !(r.unique && hits.iter().any(|h| h.input == e.input)) {
                        hits.push(e);
                    }
                    if r.n > 0 && hits.len() == r.n {
                        break;
                    }
                }
                hits.reverse();
                hits
            }
            _ => Vec::new(),
        };
        selected.into_iter().map(|e| Self::item(e, r.output)).collect()
    }
}

/// Shell-style glob: `*` any run, `?` one character; the whole text must match.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: &str) -> HistoryRequest {
        HistoryRequest {
            output: false,
            raw: true,
            hist_access_type: kind.into(),
            session: 0,
            start: 0,
            stop: 0,
            n: 0,
            pattern: String::new(),
            unique: false,
        }
    }

    #[test]
    fn tail_range_search() {
        let mut h = History::default();
        for (i, code) in ["let a = 1;", "a + 1", "let b = 2;", "a + 1"].iter().enumerate() {
            h.push(i as u32 + 1, code);
        }
        let mut r = req("tail");
        r.n = 2;
        assert_eq!(h.query(&r), vec![json!([1, 3, "let b = 2;"]), json!([1, 4, "a + 1"])]);
        let mut r = req("range");
        r.start = 2;
        r.stop = 4;
        assert_eq!(h.query(&r).len(), 2);
        let mut r = req("search");
        r.pattern = "let *".into();
        assert_eq!(h.query(&r).len(), 2);
        r.pattern = "a + ?".into();
        r.unique = true;
        assert_eq!(h.query(&r), vec![json!([1, 4, "a + 1"])]);
        h.set_output(4, "2");
        let mut r = req("tail");
        r.n = 1;
        r.output = true;
        assert_eq!(h.query(&r), vec![json!([1, 4, ["a + 1", "2"]])]);
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("a*c", "abbbc"));
        assert!(!glob_match("a*c", "abbb"));
        assert!(glob_match("?b*", "abz"));
    }
}
