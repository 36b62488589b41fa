//! Matching log lines against many rules fast, with node-problem-detector's
//! semantics to the letter (pkg/systemlogmonitor/log_buffer.go):
//! - the text a rule sees is the whole buffer: all `bufferSize` slots, oldest
//!   first, joined by "\n", empty slots included, nothing trimmed;
//! - a rule is compiled as NPD compiles it, the pattern followed by `\z`
//!   (not grouped: in a top-level alternation `a|b` only `b` is anchored);
//! - a rule "can match only the last line" exactly when NPD says so (the
//!   anchor covers every branch, and the pattern can neither match "\n" nor
//!   anchor at a start); such a rule is matched against the newest line
//!   alone, which gives the same answer as the whole buffer;
//! - the lines a match covers are counted as NPD counts them.
//!
//! Perl classes (`\d`, `\w`, `\s`, `\b`) are ASCII, as in Go's RE2.
//!
//! Speed comes from not trying every rule on every line: each pattern's
//! *necessary literal* (a string every match contains) goes into one
//! Aho-Corasick automaton. A last-line rule is tried only when the newest
//! line holds its literal; a buffer rule only while some line in the buffer
//! does (a count per literal is kept as lines enter and leave).

use std::collections::VecDeque;

use aho_corasick::AhoCorasick;
use regex::bytes::{Regex, RegexBuilder};
use regex_syntax::hir::{Class, Hir, HirKind, Look};

/// Shortest literal worth a prefilter entry.
const MIN_LITERAL: usize = 3;

/// One compiled rule.
#[derive(Debug)]
struct Compiled {
    /// `pattern\z`, as NPD compiles it.
    regex: Regex,
    /// NPD's `lastLineOnly`: matching the newest line alone is exact.
    last_line_only: bool,
    /// Index of the rule's necessary literal in the prefilter.
    literal: Option<usize>,
}

/// A rule that matched: its index, and how many of the newest lines the
/// match covers (NPD's matched logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub rule: usize,
    pub lines: usize,
}

/// Rules compiled for matching.
#[derive(Debug)]
pub struct Matcher {
    rules: Vec<Compiled>,
    /// Every literal, overlapping: which literals a line holds.
    prefilter: Option<AhoCorasick>,
    /// The same literals in leftmost-first form, which can use SIMD
    /// (Teddy) searching: used to reject lines that hold none of them.
    reject: Option<AhoCorasick>,
    /// Whether any rule needs the buffer (otherwise only the newest line is
    /// looked at, and no buffer is kept).
    buffered: bool,
    /// Literals some buffer rule needs (their counts decide its candidacy).
    buffer_literals: Vec<usize>,
    /// Last-line rules by literal, and those without one.
    last_by_literal: Vec<Vec<usize>>,
    last_always: Vec<usize>,
    /// Buffer rules by literal, and those without one.
    buffer_by_literal: Vec<Vec<usize>>,
    buffer_always: Vec<usize>,
}

/// NPD's log buffer: `cap` slots, each empty until a line fills it. Line
/// buffers are reused, so steady-state matching does not allocate.
#[derive(Debug)]
pub struct Window {
    /// Oldest first; always `cap` slots.
    slots: VecDeque<Slot>,
    /// Lines pushed since the last clear (slots filled).
    filled: usize,
    joined: Vec<u8>,
    joined_ok: bool,
    /// For each prefilter literal, how many slots hold it.
    literal_counts: Vec<u32>,
}

#[derive(Debug, Default)]
struct Slot {
    line: Vec<u8>,
    literals: Vec<usize>,
}

impl Window {
    pub fn new(cap: usize) -> Window {
        let cap = cap.max(1);
        Window {
            slots: (0..cap).map(|_| Slot::default()).collect(),
            filled: 0,
            joined: Vec::new(),
            joined_ok: false,
            literal_counts: Vec::new(),
        }
    }

    /// Adds the newest line (with the prefilter literals it holds), dropping
    /// the oldest.
    fn push(&mut self, line: &[u8], literals: &[usize]) {
        let mut slot = self.slots.pop_front().unwrap_or_default();
        for &l in &slot.literals {
            if let Some(c) = self.literal_counts.get_mut(l) {
                *c = c.saturating_sub(1);
            }
        }
        slot.line.clear();
        slot.line.extend_from_slice(line);
        slot.literals.clear();
        slot.literals.extend_from_slice(literals);
        for &l in literals {
            if self.literal_counts.len() <= l {
                self.literal_counts.resize(l + 1, 0);
            }
            self.literal_counts[l] += 1;
        }
        self.slots.push_back(slot);
        self.filled = (self.filled + 1).min(self.slots.len());
        self.joined_ok = false;
    }

    /// The newest `n` lines, oldest first.
    pub fn last(&self, n: usize) -> impl Iterator<Item = &[u8]> {
        let skip = self.slots.len().saturating_sub(n.min(self.filled));
        self.slots.iter().skip(skip).map(|s| s.line.as_slice())
    }

    /// Forgets every line (a new boot, a rotated file): NPD's fresh buffer.
    pub fn clear(&mut self) {
        for s in self.slots.iter_mut() {
            s.line.clear();
            s.literals.clear();
        }
        self.literal_counts.iter_mut().for_each(|c| *c = 0);
        self.filled = 0;
        self.joined_ok = false;
    }

    /// NPD's buffer string: every slot, oldest first, joined by "\n".
    fn joined(&mut self) -> &[u8] {
        if !self.joined_ok {
            self.joined.clear();
            for (k, s) in self.slots.iter().enumerate() {
                if k > 0 {
                    self.joined.push(b'\n');
                }
                self.joined.extend_from_slice(&s.line);
            }
            self.joined_ok = true;
        }
        &self.joined
    }

    /// How many of the newest lines a match starting at `start` of the
    /// buffer string covers, counted as NPD's `Match` counts them.
    fn covered(&self, joined_len: usize, start: usize) -> usize {
        // NPD: s = len(log) - loc[0] - 1, then lines are taken from the
        // newest while filled, adding len+1 each, until the total exceeds s.
        let s = joined_len as i64 - start as i64 - 1;
        let mut total = 0i64;
        let mut n = 0;
        for slot in self.slots.iter().rev().take(self.filled) {
            n += 1;
            total += slot.line.len() as i64 + 1;
            if total > s {
                break;
            }
        }
        n
    }
}

/// The parser NPD's patterns need: Go's RE2 has ASCII Perl classes and
/// matches bytes of any encoding.
fn parse(p: &str) -> Result<Hir, String> {
    let ascii = regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .build()
        .parse(p);
    match ascii {
        Ok(h) => Ok(h),
        Err(_) => regex_syntax::ParserBuilder::new()
            .utf8(false)
            .build()
            .parse(p)
            .map_err(|e| e.to_string()),
    }
}

/// Compiles as NPD does (`pattern\z`); a pattern that needs Unicode classes
/// (`\pL`) is compiled with them.
fn compile(p: &str) -> Result<Regex, String> {
    let anchored = format!("{p}\\z");
    RegexBuilder::new(&anchored)
        .unicode(false)
        .build()
        .or_else(|_| RegexBuilder::new(&anchored).build())
        .map_err(|e| e.to_string())
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

/// NPD's `isLastLineOnly`: the pattern accepts no newline and has no start
/// (or multi-line end) anchor.
fn last_line_only(hir: &Hir) -> bool {
    match hir.kind() {
        HirKind::Literal(l) => !l.0.contains(&b'\n'),
        HirKind::Class(c) => !match c {
            Class::Unicode(u) => u.ranges().iter().any(|r| r.start() <= '\n' && '\n' <= r.end()),
            Class::Bytes(b) => b.ranges().iter().any(|r| r.start() <= b'\n' && b'\n' <= r.end()),
        },
        HirKind::Look(l) => !matches!(
            l,
            Look::Start | Look::StartLF | Look::StartCRLF | Look::EndLF | Look::EndCRLF
        ),
        HirKind::Capture(c) => last_line_only(&c.sub),
        HirKind::Repetition(r) => last_line_only(&r.sub),
        HirKind::Concat(cs) | HirKind::Alternation(cs) => cs.iter().all(last_line_only),
        HirKind::Empty => true,
    }
}

/// Whether NPD treats `p` as a last-line rule: `p\z` must mean `(?:p)\z`
/// (equal trees), and the pattern must pass [`last_line_only`].
fn is_last_line_rule(p: &str) -> bool {
    match (parse(&format!("{p}\\z")), parse(&format!("(?:{p})\\z"))) {
        (Ok(plain), Ok(grouped)) => plain == grouped && last_line_only(&plain),
        _ => false,
    }
}

impl Matcher {
    /// Compiles patterns (Go RE2 syntax, which Rust's regex accepts for the
    /// patterns NPD uses). Errors carry the pattern's index.
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<Matcher, (usize, String)> {
        let mut rules = Vec::new();
        let mut literals: Vec<Vec<u8>> = Vec::new();
        for (i, p) in patterns.into_iter().enumerate() {
            let hir = parse(p).map_err(|e| (i, e))?;
            let regex = compile(p).map_err(|e| (i, e))?;
            let last = is_last_line_rule(p);
            // Spaces start or end many literals and appear in every line: a
            // prefilter keyed on them would stop everywhere. A literal that
            // holds a newline spans lines, so no single line holds it.
            let lit = necessary_literal(&hir)
                .map(|l| l.trim_ascii().to_vec())
                .filter(|l| l.len() >= MIN_LITERAL && !l.contains(&b'\n'));
            let literal = lit.map(|lit| match literals.iter().position(|l| *l == lit) {
                Some(j) => j,
                None => {
                    literals.push(lit);
                    literals.len() - 1
                }
            });
            rules.push(Compiled {
                regex,
                last_line_only: last,
                literal,
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
        let mut m = Matcher {
            prefilter,
            reject,
            buffered: rules.iter().any(|r| !r.last_line_only),
            buffer_literals: Vec::new(),
            last_by_literal: vec![Vec::new(); literals.len()],
            last_always: Vec::new(),
            buffer_by_literal: vec![Vec::new(); literals.len()],
            buffer_always: Vec::new(),
            rules: Vec::new(),
        };
        for (i, r) in rules.iter().enumerate() {
            match (r.last_line_only, r.literal) {
                (true, Some(l)) => m.last_by_literal[l].push(i),
                (true, None) => m.last_always.push(i),
                (false, Some(l)) => m.buffer_by_literal[l].push(i),
                (false, None) => m.buffer_always.push(i),
            }
        }
        m.buffer_literals = (0..literals.len())
            .filter(|&l| !m.buffer_by_literal[l].is_empty())
            .collect();
        m.rules = rules;
        Ok(m)
    }

    /// Pushes `newest` into `w` and finds the rules that match, in rule
    /// order. `candidates` and `found` are scratch space.
    pub fn push_and_match(
        &self,
        newest: &[u8],
        w: &mut Window,
        candidates: &mut Vec<usize>,
        found: &mut Vec<usize>,
        out: &mut Vec<Hit>,
    ) {
        out.clear();
        candidates.clear();
        found.clear();
        if let (Some(ac), Some(reject)) = (&self.prefilter, &self.reject)
            && reject.is_match(newest)
        {
            // Fast path: most lines hold none of the literals.
            for m in ac.find_overlapping_iter(newest) {
                found.push(m.pattern().as_usize());
            }
            found.sort_unstable();
            found.dedup();
        }
        if self.buffered {
            w.push(newest, found);
        }
        for &l in found.iter() {
            candidates.extend_from_slice(&self.last_by_literal[l]);
        }
        candidates.extend_from_slice(&self.last_always);
        if self.buffered {
            for &l in &self.buffer_literals {
                if w.literal_counts.get(l).is_some_and(|&c| c > 0) {
                    candidates.extend_from_slice(&self.buffer_by_literal[l]);
                }
            }
            candidates.extend_from_slice(&self.buffer_always);
        }
        if candidates.is_empty() {
            return;
        }
        candidates.sort_unstable();
        candidates.dedup();
        for &i in candidates.iter() {
            let r = &self.rules[i];
            if r.last_line_only {
                if r.regex.is_match(newest) {
                    out.push(Hit { rule: i, lines: 1 });
                }
            } else {
                let joined = w.joined();
                if let Some(m) = r.regex.find(joined) {
                    let (len, start) = (joined.len(), m.start());
                    out.push(Hit {
                        rule: i,
                        lines: w.covered(len, start),
                    });
                }
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
        let (mut c, mut f, mut out) = (Vec::new(), Vec::new(), Vec::new());
        lines
            .iter()
            .map(|l| {
                m.push_and_match(l.as_bytes(), &mut w, &mut c, &mut f, &mut out);
                out.clone()
            })
            .collect()
    }

    /// NPD's own algorithm, written plainly: the joined buffer, `p\z`, the
    /// reverse count. The reference every optimisation must agree with.
    fn npd(patterns: &[&str], lines: &[&str], cap: usize) -> Vec<Vec<Hit>> {
        let regs: Vec<Regex> = patterns.iter().map(|p| compile(p).expect("compile")).collect();
        let mut msgs: Vec<String> = vec![String::new(); cap];
        let mut current = 0usize;
        let mut filled = vec![false; cap];
        lines
            .iter()
            .map(|l| {
                msgs[current % cap] = l.to_string();
                filled[current % cap] = true;
                current += 1;
                let head = current % cap;
                let order: Vec<usize> = (head..cap).chain(0..head).collect();
                let log = order.iter().map(|&i| msgs[i].as_str()).collect::<Vec<_>>().join("\n");
                let mut hits = Vec::new();
                for (ri, re) in regs.iter().enumerate() {
                    let Some(m) = re.find(log.as_bytes()) else { continue };
                    let s = log.len() as i64 - m.start() as i64 - 1;
                    let (mut total, mut n) = (0i64, 0);
                    let mut i = current + cap - 1;
                    while i >= current && filled[i % cap] {
                        n += 1;
                        total += msgs[i % cap].len() as i64 + 1;
                        if total > s {
                            break;
                        }
                        i -= 1;
                    }
                    hits.push(Hit { rule: ri, lines: n });
                }
                hits
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
    fn a_rule_that_could_span_lines_is_tried_whatever_the_window() {
        // Issue 12 item 2: with one slot these were never tried.
        for p in [
            "disk\\s+failed",
            "disk [^x]*failed",
            "(?s)disk.*failed",
            "(?m)^disk failed",
        ] {
            let hits = run(&[p], &["ok", "disk failed"], 1);
            assert_eq!(hits[1], vec![Hit { rule: 0, lines: 1 }], "{p}");
        }
        // `^` is the start of the whole buffer: with ten slots (nine of them
        // joined before the newest line) it cannot match one line.
        assert!(run(&["^disk failed"], &["disk failed"], 10)[0].is_empty());
        assert_eq!(run(&["^disk failed"], &["disk failed"], 1)[0].len(), 1);
        // `\s` spans the newline between two lines.
        let hits = run(&["disk\\s+failed"], &["my disk", "failed"], 10);
        assert_eq!(hits[1], vec![Hit { rule: 0, lines: 2 }]);
    }

    #[test]
    fn top_level_alternation_anchors_only_the_last_branch_as_npd_does() {
        // `a|b\z`: the first branch matches anywhere in the buffer, so it
        // keeps matching while its line is among the last ten.
        let hits = run(&["alpha|beta"], &["alpha", "x", "y"], 10);
        assert_eq!(hits[0], vec![Hit { rule: 0, lines: 1 }]);
        assert_eq!(hits[1], vec![Hit { rule: 0, lines: 2 }]);
        assert_eq!(hits[2], vec![Hit { rule: 0, lines: 3 }]);
        // Grouped, both are anchored.
        let hits = run(&["(alpha|beta)"], &["alpha", "x"], 10);
        assert_eq!(hits[0].len(), 1);
        assert!(hits[1].is_empty());
        assert!(is_last_line_rule("(alpha|beta)"));
        assert!(!is_last_line_rule("alpha|beta"));
    }

    #[test]
    fn an_empty_pattern_matches_every_line_as_in_npd() {
        let hits = run(&[""], &["a", "", "b"], 10);
        assert!(hits.iter().all(|h| h == &vec![Hit { rule: 0, lines: 1 }]), "{hits:?}");
    }

    #[test]
    fn perl_classes_are_ascii_as_in_go() {
        // Arabic-Indic digits and a no-break space are not \d and \s in RE2.
        let hits = run(&["error \\d+", "a\\sb"], &["error ٣", "a\u{a0}b", "error 3"], 1);
        assert!(hits[0].is_empty() && hits[1].is_empty());
        assert_eq!(hits[2], vec![Hit { rule: 0, lines: 1 }]);
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
    fn the_fast_paths_agree_with_npds_plain_algorithm() {
        // Patterns of every kind: last-line rules with and without literals,
        // buffer rules with literals in an earlier line, alternations,
        // anchors, an empty pattern; lines with literals in odd places.
        let patterns = [
            "Killed process \\d+ .*",
            "first\\nsecond",
            "disk\\s+failed",
            "alpha|beta",
            "^start",
            "(?m)^begin.*",
            "x[^y]+z",
            "",
            "(?s)one.*two",
            "BUG: .*",
        ];
        let words = [
            "Killed process 1 (a)",
            "first",
            "second",
            "disk",
            "failed",
            "alpha",
            "beta",
            "start",
            "begin here",
            "x",
            "z",
            "xaz",
            "one",
            "two",
            "BUG: oops",
            "",
            "  spaced  ",
            "y",
        ];
        // A deterministic pseudo-random sequence of lines.
        let mut seed = 12345u64;
        let lines: Vec<String> = (0..400)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let a = words[(seed >> 33) as usize % words.len()];
                let b = words[(seed >> 13) as usize % words.len()];
                if seed.is_multiple_of(3) {
                    format!("{a} {b}")
                } else {
                    a.to_string()
                }
            })
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        for cap in [1, 2, 3, 10] {
            assert_eq!(
                run(&patterns, &lines, cap),
                npd(&patterns, &lines, cap),
                "bufferSize {cap}"
            );
        }
    }

    // The patterns, lines and verdicts below are node-problem-detector's own
    // (pkg/systemlogmonitor/log_buffer_equivalence_test.go and
    // log_buffer_test.go, Apache-2.0, see tests/fixtures/npd/LICENSE), so
    // nodekeeper is held to the tests NPD holds itself to.
    const NPD_PATTERNS: &[&str] = &[
        r"Killed process \d+ (.+) total-vm:\d+kB, anon-rss:\d+kB, file-rss:\d+kB.*",
        r"task [\S ]+:\w+ blocked for more than \w+ seconds\.",
        r"unregister_netdevice: waiting for \w+ to become free. Usage count = \d+",
        r"BUG: unable to handle kernel NULL pointer dereference at .*",
        r"EXT4-fs error .*",
        r"XFS .* Shutting down filesystem.?",
        r".*\[Hardware Error\]: event severity: fatal$",
        r#"Error syncing pod .*skipping.*failed to "StartContainer".*"#,
        r"(?s)first.*second",
        r"^only line",
        r"(?m)^line \w+$",
        "alpha\nbeta",
        r"alpha[\s\S]*beta",
        r"alpha[\x00-\x7f]+beta",
        r"\Aalpha",
        r"alpha|beta",
        r"abort|abandon",
        r"alpha|",
        r"\balpha\b",
        r"alpha$",
        r"a*",
        r"",
        r"(alpha|beta) gamma",
        r"[^x]+",
    ];
    const NPD_LINES: &[&str] = &[
        "alpha gamma",
        "beta gamma",
        "abort now",
        "only line",
        "first",
        "second",
        "line one",
        "line two",
        "alpha",
        "beta",
        "task docker:1234 blocked for more than 120 seconds.",
        "EXT4-fs error (device sda1): ext4_find_entry:1455: inode #2",
        "mce: [Hardware Error]: event severity: fatal",
        "Killed process 1234 (mysqld) total-vm:100kB, anon-rss:20kB, file-rss:3kB",
        "",
        "trailing\nembedded newline",
    ];

    #[test]
    fn npds_equivalence_cases_give_npds_answers() {
        let mut seed = 1u64;
        let mut next = |n: usize| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n.max(1)
        };
        for cap in [1, 2, 3, 5, 10] {
            for _ in 0..100 {
                let lines: Vec<&str> = (0..next(cap * 2 + 1) + 1)
                    .map(|_| NPD_LINES[next(NPD_LINES.len())])
                    .collect();
                assert_eq!(
                    run(NPD_PATTERNS, &lines, cap),
                    npd(NPD_PATTERNS, &lines, cap),
                    "bufferSize {cap}: {lines:?}"
                );
            }
        }
    }

    #[test]
    fn npds_last_line_verdicts_hold() {
        for (p, want) in [
            ("EXT4-fs error .*", true),
            (r"task \S+ blocked", true),
            ("alpha$", true),
            (r"\balpha\b", true),
            ("[^x]+", false),
            (r"[^x\n]+", true),
            ("(alpha|beta)+ gamma", true),
            ("(?s)alpha.*beta", false),
            ("^alpha", false),
            (r"\Aalpha", false),
            ("(?m)^alpha$", false),
            ("alpha\nbeta", false),
            (r"alpha[\s\S]*beta", false),
            (r"alpha[\x00-\x7f]beta", false),
            (r"alpha[\n]beta", false),
            (r"alpha(beta|\n)", false),
            (r"alpha{1,3}[\t-\r]beta", false),
            ("alpha|beta", false),
            ("abort|abandon", false),
            ("a|", false),
            ("(alpha|beta) gamma", true),
        ] {
            assert_eq!(is_last_line_rule(p), want, "{p:?}");
        }
        // NPD's reported repro: the first branch matches an older line.
        let hits = run(
            &["oom-kill|Out of memory"],
            &["kernel: oom-kill:constraint=CONSTRAINT_NONE", "kubelet: node ready"],
            2,
        );
        assert_eq!(hits[1], vec![Hit { rule: 0, lines: 2 }]);
        // log_buffer_test.go's TestMatch, buffer of four.
        let two = run(&["a1", "b1", "b2", r"\w{2}", "a1\nb2", "a1b2"], &["a1", "b2"], 4);
        assert_eq!(
            two[1],
            vec![
                Hit { rule: 2, lines: 1 },
                Hit { rule: 3, lines: 1 },
                Hit { rule: 4, lines: 2 }
            ]
        );
        let full = run(
            &["(?s)a1.+", r"[a-z]\d\n[a-z]\d", r"[a-z]\d"],
            &["a1", "b2", "c3", "d4", "e5"],
            4,
        );
        assert_eq!(full[4], vec![Hit { rule: 1, lines: 2 }, Hit { rule: 2, lines: 1 }]);
    }

    #[test]
    fn necessary_literals_are_found_and_last_line_rules_detected() {
        let lit = |p: &str| necessary_literal(&parse(p).expect("parse")).map(|l| String::from_utf8(l).expect("utf8"));
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
        assert!(is_last_line_rule("EXT4-fs error .*"));
        assert!(is_last_line_rule(".*severity: fatal$"));
        assert!(!is_last_line_rule("a\\sb"), "\\s matches a newline");
        assert!(!is_last_line_rule("^start"));
        assert!(!is_last_line_rule("x[^y]z"));
        assert!(!is_last_line_rule("(?m)x$"));
    }
}
