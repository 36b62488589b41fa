//! Matching log lines against many rules fast, with node-problem-detector's
//! semantics: a window of the last `bufferSize` lines joined by "\n", and a
//! rule matches when its pattern matches ending at the end of the newest line.
//!
//! Speed comes from not trying every rule on every line:
//! - each pattern's *necessary literal* (a string every match contains) goes
//!   into one Aho-Corasick automaton; a line that contains none of them can
//!   only match the few rules without such a literal;
//! - a pattern that cannot match "\n" (nearly all) is matched against the
//!   newest line alone instead of the joined window.

use std::collections::VecDeque;

use aho_corasick::AhoCorasick;
use regex::bytes::Regex;
use regex_syntax::hir::{Hir, HirKind, Look};

/// Shortest literal worth a prefilter entry.
const MIN_LITERAL: usize = 3;

/// One compiled rule.
#[derive(Debug)]
struct Compiled {
    /// `(?:pattern)\z`.
    regex: Regex,
    /// Needs the joined window (it can match "\n" or anchors at the start).
    window: bool,
}

/// A rule that matched the newest line: its index, and how many of the
/// newest lines the match covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub rule: usize,
    pub lines: usize,
}

/// Rules compiled for matching.
#[derive(Debug)]
pub struct Matcher {
    rules: Vec<Compiled>,
    prefilter: Option<AhoCorasick>,
    /// The same literals in leftmost-first form, which can use SIMD
    /// (Teddy) searching: used to reject lines that hold none of them.
    reject: Option<AhoCorasick>,
    /// For each prefilter literal, the rules that need it.
    literal_rules: Vec<Vec<usize>>,
    /// Rules without a necessary literal: tried on every line.
    always: Vec<usize>,
}

/// The last lines seen, as NPD's log buffer keeps them. Line buffers are
/// reused, so steady-state matching does not allocate.
#[derive(Debug)]
pub struct Window {
    lines: VecDeque<Vec<u8>>,
    cap: usize,
    joined: Vec<u8>,
}

impl Window {
    pub fn new(cap: usize) -> Window {
        Window {
            lines: VecDeque::with_capacity(cap.max(1)),
            cap: cap.max(1),
            joined: Vec::new(),
        }
    }

    /// Adds the newest line, dropping the oldest when full.
    pub fn push(&mut self, line: &[u8]) {
        let mut buf = if self.lines.len() == self.cap {
            self.lines.pop_front().unwrap_or_default()
        } else {
            Vec::new()
        };
        buf.clear();
        buf.extend_from_slice(line);
        self.lines.push_back(buf);
    }

    /// The newest `n` lines, oldest first.
    pub fn last(&self, n: usize) -> impl Iterator<Item = &[u8]> {
        let skip = self.lines.len().saturating_sub(n);
        self.lines.iter().skip(skip).map(Vec::as_slice)
    }

    /// Forgets every line (a new boot, a rotated file).
    pub fn clear(&mut self) {
        self.lines.clear();
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// The longest literal every match of `hir` must contain, if any.
fn necessary_literal(hir: &Hir) -> Option<Vec<u8>> {
    match hir.kind() {
        HirKind::Literal(l) => Some(l.0.to_vec()),
        HirKind::Capture(c) => necessary_literal(&c.sub),
        HirKind::Repetition(r) if r.min >= 1 => necessary_literal(&r.sub),
        HirKind::Concat(children) => {
            let mut best: Option<Vec<u8>> = None;
            let mut run: Vec<u8> = Vec::new();
            let consider = |cand: Vec<u8>, best: &mut Option<Vec<u8>>| {
                if best.as_ref().is_none_or(|b| cand.len() > b.len()) {
                    *best = Some(cand);
                }
            };
            for c in children {
                match c.kind() {
                    HirKind::Literal(l) => run.extend_from_slice(&l.0),
                    _ => {
                        if !run.is_empty() {
                            consider(std::mem::take(&mut run), &mut best);
                        }
                        if let Some(inner) = necessary_literal(c) {
                            consider(inner, &mut best);
                        }
                    }
                }
            }
            if !run.is_empty() {
                consider(run, &mut best);
            }
            best
        }
        _ => None,
    }
}

/// Whether `hir` can match a "\n" or anchors at a text or line start, so it
/// must see the joined window.
fn needs_window(hir: &Hir) -> bool {
    match hir.kind() {
        HirKind::Literal(l) => l.0.contains(&b'\n'),
        HirKind::Class(c) => match c {
            regex_syntax::hir::Class::Unicode(u) => u.ranges().iter().any(|r| r.start() <= '\n' && '\n' <= r.end()),
            regex_syntax::hir::Class::Bytes(b) => b.ranges().iter().any(|r| r.start() <= b'\n' && b'\n' <= r.end()),
        },
        HirKind::Look(l) => matches!(l, Look::Start | Look::StartLF | Look::StartCRLF),
        HirKind::Capture(c) => needs_window(&c.sub),
        HirKind::Repetition(r) => needs_window(&r.sub),
        HirKind::Concat(cs) | HirKind::Alternation(cs) => cs.iter().any(needs_window),
        HirKind::Empty => false,
    }
}

impl Matcher {
    /// Compiles patterns (Go RE2 syntax, which Rust's regex accepts for the
    /// patterns NPD uses). Errors carry the pattern's index.
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<Matcher, (usize, String)> {
        let mut rules = Vec::new();
        let mut literals: Vec<Vec<u8>> = Vec::new();
        let mut literal_rules: Vec<Vec<usize>> = Vec::new();
        let mut always = Vec::new();
        for (i, p) in patterns.into_iter().enumerate() {
            let hir = regex_syntax::parse(p).map_err(|e| (i, e.to_string()))?;
            let regex = Regex::new(&format!("(?:{p})\\z")).map_err(|e| (i, e.to_string()))?;
            // Spaces start or end many literals and appear in every line: a
            // prefilter keyed on them would stop everywhere.
            let lit = necessary_literal(&hir).map(|l| l.trim_ascii().to_vec());
            match lit.filter(|l| l.len() >= MIN_LITERAL) {
                Some(lit) => match literals.iter().position(|l| *l == lit) {
                    Some(j) => literal_rules[j].push(i),
                    None => {
                        literals.push(lit);
                        literal_rules.push(vec![i]);
                    }
                },
                None => always.push(i),
            }
            rules.push(Compiled {
                regex,
                window: needs_window(&hir),
            });
        }
        let (prefilter, reject) = if literals.is_empty() {
            (None, None)
        } else {
            let all = AhoCorasick::new(&literals).map_err(|e| (0, e.to_string()))?;
            let reject = AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostFirst)
                .build(&literals)
                .map_err(|e| (0, e.to_string()))?;
            (Some(all), Some(reject))
        };
        Ok(Matcher {
            rules,
            prefilter,
            reject,
            literal_rules,
            always,
        })
    }

    /// Whether some rule needs the joined window (otherwise callers need not
    /// keep one).
    pub fn needs_window(&self) -> bool {
        self.rules.iter().any(|r| r.window)
    }

    /// The rules that match ending at `newest`, in rule order. `w` holds the
    /// window with `newest` already pushed; it is needed only when
    /// [`Matcher::needs_window`]. `candidates` is scratch space.
    pub fn matches(&self, newest: &[u8], w: Option<&mut Window>, candidates: &mut Vec<usize>, out: &mut Vec<Hit>) {
        out.clear();
        candidates.clear();
        let newest = trim_ascii(newest);
        let windowed = w.is_some() && self.needs_window();
        if let (Some(ac), Some(reject)) = (&self.prefilter, &self.reject) {
            // Fast path: most lines hold none of the literals.
            if reject.is_match(newest) {
                for m in ac.find_overlapping_iter(newest) {
                    candidates.extend_from_slice(&self.literal_rules[m.pattern().as_usize()]);
                }
            }
        }
        candidates.extend_from_slice(&self.always);
        if windowed {
            // A window rule's literal may sit in an earlier line: always try them.
            for (i, r) in self.rules.iter().enumerate() {
                if r.window {
                    candidates.push(i);
                }
            }
        }
        if candidates.is_empty() {
            return;
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut joined: &[u8] = &[];
        if windowed && let Some(w) = w {
            let Window { lines, joined: buf, .. } = w;
            buf.clear();
            for (k, l) in lines.iter().enumerate() {
                if k > 0 {
                    buf.push(b'\n');
                }
                buf.extend_from_slice(l);
            }
            joined = trim_ascii(buf);
        }
        for &i in candidates.iter() {
            let r = &self.rules[i];
            if !r.window {
                if r.regex.is_match(newest) {
                    out.push(Hit { rule: i, lines: 1 });
                }
            } else if windowed && let Some(m) = r.regex.find(joined) {
                // Lines covered: one more than the newlines inside the match.
                let lines = 1 + joined[m.start()..m.end()].iter().filter(|&&b| b == b'\n').count();
                out.push(Hit { rule: i, lines });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(patterns: &[&str], lines: &[&str], cap: usize) -> Vec<Vec<Hit>> {
        let m = Matcher::new(patterns.iter().copied()).expect("compile");
        let mut w = Window::new(cap);
        let (mut c, mut out) = (Vec::new(), Vec::new());
        lines
            .iter()
            .map(|l| {
                w.push(l.as_bytes());
                m.matches(l.as_bytes(), Some(&mut w), &mut c, &mut out);
                out.clone()
            })
            .collect()
    }

    #[test]
    fn pattern_must_match_to_the_end_of_the_newest_line() {
        let hits = run(
            &["EXT4-fs error .*", "blocked for more than \\w+ seconds\\."],
            &[
                "EXT4-fs error (device sda1): bad",
                "ok line",
                "task x:1 blocked for more than 120 seconds.",
                "task x:1 blocked for more than 120 seconds. and more",
            ],
            10,
        );
        assert_eq!(hits[0], vec![Hit { rule: 0, lines: 1 }]);
        assert!(hits[1].is_empty());
        assert_eq!(hits[2], vec![Hit { rule: 1, lines: 1 }]);
        assert!(
            hits[3].is_empty(),
            "NPD anchors at the end: trailing text means no match"
        );
    }

    #[test]
    fn multi_line_patterns_span_the_window() {
        let hits = run(&["first\\nsecond"], &["first", "second", "second"], 3);
        assert!(hits[0].is_empty());
        assert_eq!(hits[1], vec![Hit { rule: 0, lines: 2 }]);
        assert!(hits[2].is_empty());
        // Not with a window of one line.
        let hits = run(&["first\\nsecond"], &["first", "second"], 1);
        assert!(hits[1].is_empty());
    }

    #[test]
    fn rules_without_a_literal_are_still_tried() {
        let hits = run(
            &["\\d+ errors?", "(?i)disk FAILED"],
            &["3 errors", "DISK failed", "fine"],
            1,
        );
        assert_eq!(hits[0], vec![Hit { rule: 0, lines: 1 }]);
        assert_eq!(hits[1], vec![Hit { rule: 1, lines: 1 }]);
        assert!(hits[2].is_empty());
    }

    #[test]
    fn necessary_literals_are_found_and_windows_detected() {
        let lit = |p: &str| {
            necessary_literal(&regex_syntax::parse(p).expect("parse")).map(|l| String::from_utf8(l).expect("utf8"))
        };
        assert_eq!(
            lit("Killed process \\d+ (.+) total-vm:\\d+kB").as_deref(),
            Some("Killed process ")
        );
        assert_eq!(
            lit("task [\\S ]+:\\w+ blocked for more than \\w+ seconds\\.").as_deref(),
            Some(" blocked for more than ")
        );
        assert_eq!(
            lit(".*\\[Hardware Error\\]: event severity: fatal$").as_deref(),
            Some("[Hardware Error]: event severity: fatal")
        );
        assert_eq!(lit("a|b"), None);
        let win = |p: &str| needs_window(&regex_syntax::parse(p).expect("parse"));
        assert!(!win("EXT4-fs error .*"));
        assert!(win("a\\sb"), "\\s matches a newline");
        assert!(win("^start"));
        assert!(win("x[^y]z"));
    }
}
