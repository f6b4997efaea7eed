//! Splitting text into regex chunks before BPE.
//!
//! Any pattern works through fancy-regex. The default pattern (GPT-4's, with `\p{N}{1,2}` or the
//! original `\p{N}{1,3}`) gets a hand-written matcher that walks the text once instead of running
//! a backtracking regex VM. It must give exactly the chunks fancy-regex gives; the differential
//! tests at the bottom (and tests/test_rustbpe.py) check that on random and adversarial strings.

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

/// GPT-4's split pattern with numbers in groups of at most two digits (nanochat's choice).
pub const DEFAULT_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
/// The original GPT-4 pattern (numbers in groups of up to three), the PyPI wheel's default.
pub const GPT4_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub enum Splitter {
    Fast(FastSplitter),
    Regex(fancy_regex::Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        let max_digits = match pattern {
            DEFAULT_PATTERN => 2,
            GPT4_PATTERN => 3,
            _ => {
                let re = fancy_regex::Regex::new(pattern).map_err(|e| e.to_string())?;
                return Ok(Splitter::Regex(re));
            }
        };
        Ok(Splitter::Fast(FastSplitter { tables: tables(), max_digits }))
    }

    /// Calls `f` on each non-empty chunk of `text`, in order. Errors only come from fancy-regex
    /// (e.g. its backtrack limit on a pathological custom pattern).
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Fast(fast) => {
                let mut i = 0;
                while i < text.len() {
                    let end = fast.chunk_end(text, i);
                    f(&text[i..end]);
                    i = end;
                }
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| e.to_string())?;
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
            }
        }
        Ok(())
    }

    pub fn chunks<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, String> {
        let mut out = Vec::new();
        self.for_each_chunk(text, |c| out.push(c))?;
        Ok(out)
    }
}

// Character classes as the regex crate (and so fancy-regex) sees them.
const OTHER: u8 = 0;
const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
const SPACE: u8 = 3; // \s (Unicode White_Space), \r and \n included

type Ranges = Vec<(char, char)>;

pub struct Tables {
    class: Vec<u8>, // one entry per code point, 0..=0x10FFFF
    // `(?i:...)` sets for the contractions, e.g. `s` also matches `S` and U+017F (long s).
    sdmt: Ranges,
    l: Ranges,
    v: Ranges,
    r: Ranges,
    e: Ranges,
}

/// Ranges of a one-class regex, taken from regex-syntax itself so that our tables use the very
/// Unicode version and case folding that fancy-regex uses.
fn class_ranges(class_regex: &str) -> Ranges {
    let hir = regex_syntax::Parser::new().parse(class_regex).expect("valid class regex");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c.ranges().iter().map(|r| (r.start(), r.end())).collect(),
        other => panic!("{class_regex} is not a Unicode class: {other:?}"),
    }
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut class = vec![OTHER; 0x110000];
        for (re, value) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in class_ranges(re) {
                class[lo as usize..=hi as usize].fill(value);
            }
        }
        Tables {
            class,
            sdmt: class_ranges("(?i)[sdmt]"),
            l: class_ranges("(?i)[l]"),
            v: class_ranges("(?i)[v]"),
            r: class_ranges("(?i)[r]"),
            e: class_ranges("(?i)[e]"),
        }
    })
}

fn in_ranges(c: char, ranges: &Ranges) -> bool {
    ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi)
}

pub struct FastSplitter {
    tables: &'static Tables,
    max_digits: usize,
}

impl FastSplitter {
    /// The char starting at byte `i` of `s` (which must be < s.len()) and its length in bytes.
    #[inline]
    fn char_at(s: &str, i: usize) -> (char, usize) {
        let b = s.as_bytes()[i];
        if b < 0x80 {
            return (b as char, 1);
        }
        let c = s[i..].chars().next().unwrap();
        (c, c.len_utf8())
    }

    #[inline]
    fn class(&self, c: char) -> u8 {
        self.tables.class[c as usize]
    }

    /// Class of the char at byte `i`, or None at the end of the text.
    #[inline]
    fn class_at(&self, s: &str, i: usize) -> Option<u8> {
        (i < s.len()).then(|| self.class(Self::char_at(s, i).0))
    }

    /// Byte index just past the run of chars of class `class` starting at `i`.
    #[inline]
    fn run_end(&self, s: &str, mut i: usize, class: u8) -> usize {
        while i < s.len() {
            let (c, len) = Self::char_at(s, i);
            if self.class(c) != class {
                break;
            }
            i += len;
        }
        i
    }

    /// `(?i:[sdmt]|ll|ve|re)` right after an apostrophe at `i - 1`.
    fn contraction_end(&self, s: &str, i: usize) -> Option<usize> {
        let t = self.tables;
        if i >= s.len() {
            return None;
        }
        let (c1, len1) = Self::char_at(s, i);
        if in_ranges(c1, &t.sdmt) {
            return Some(i + len1);
        }
        if i + len1 >= s.len() {
            return None;
        }
        let (c2, len2) = Self::char_at(s, i + len1);
        let two = (in_ranges(c1, &t.l) && in_ranges(c2, &t.l))
            || (in_ranges(c1, &t.v) && in_ranges(c2, &t.e))
            || (in_ranges(c1, &t.r) && in_ranges(c2, &t.e));
        two.then_some(i + len1 + len2)
    }

    /// End (byte index) of the chunk that the pattern matches at byte `i`. Every position
    /// matches one of the alternatives, so chunks tile the text. The alternatives are tried in
    /// the pattern's order, as a backtracking regex would.
    fn chunk_end(&self, s: &str, i: usize) -> usize {
        let (c, len) = Self::char_at(s, i);
        let next = i + len;
        let class = self.class(c);
        // '(?i:[sdmt]|ll|ve|re)
        if c == '\'' {
            if let Some(end) = self.contraction_end(s, next) {
                return end;
            }
        }
        // [^\r\n\p{L}\p{N}]?+\p{L}+ : letters, optionally led by one char that is not a newline,
        // letter or number (the `?+` is possessive, but giving the char back could not help).
        if class == LETTER {
            return self.run_end(s, next, LETTER);
        }
        if class != NUMBER && c != '\r' && c != '\n' && self.class_at(s, next) == Some(LETTER) {
            return self.run_end(s, next, LETTER);
        }
        // \p{N}{1,max}
        if class == NUMBER {
            let mut end = next;
            for _ in 1..self.max_digits {
                if self.class_at(s, end) != Some(NUMBER) {
                    break;
                }
                end += Self::char_at(s, end).1;
            }
            return end;
        }
        // ` ?[^\s\p{L}\p{N}]++[\r\n]*` : punctuation and symbols, optionally after one space,
        // then any newlines.
        let start = if c == ' ' { next } else { i };
        if self.class_at(s, start) == Some(OTHER) {
            let mut end = self.run_end(s, start, OTHER);
            while end < s.len() && matches!(s.as_bytes()[end], b'\r' | b'\n') {
                end += 1;
            }
            return end;
        }
        // Only whitespace is left. Scan the whole run once for the three last alternatives.
        debug_assert_eq!(class, SPACE);
        let (mut end, mut last_start, mut after_newline) = (i, i, None);
        while end < s.len() {
            let (c, len) = Self::char_at(s, end);
            if self.class(c) != SPACE {
                break;
            }
            if c == '\r' || c == '\n' {
                after_newline = Some(end + len);
            }
            last_start = end;
            end += len;
        }
        // \s*[\r\n] : backtracking stops at the run's last newline.
        if let Some(e) = after_newline {
            return e;
        }
        // \s+(?!\S) : the run up to its end of text, else all but its last char (which leaves
        // that char to lead the next word). Must keep at least one char.
        if end == s.len() || last_start == i {
            return end; // (the second case is `\s+`: a lone space before a non-space)
        }
        last_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    /// Characters that stress each alternative: apostrophes and contraction letters (ſ is a
    /// case-insensitive `s`, K the Kelvin sign), every kind of whitespace, digits of several
    /// scripts (Nd, Nl, No), letters, marks, symbols and emoji.
    const TRICKY: &str = "'sdmtlvreSDMTLVREſK \t\n\r\u{b}\u{c}\u{85}\u{a0}\u{1680}\u{2000}\u{2028}\u{2029}\u{202f}\u{3000}\u{200b}0123456789٣߂Ⅻ½²①aZéßΩжא中日本ー\u{301}\u{93f}!?.,;:-_()[]{}\"@#$%^&*+=<>/\\|~`😀👍🏽\u{fe0f}\u{200d}";

    fn random_string(rng: &mut Rng, tricky: &[char]) -> String {
        let len = rng.below(40);
        (0..len)
            .map(|_| match rng.below(10) {
                0..=6 => tricky[rng.below(tricky.len())],
                7 => (0x20 + rng.below(0x5f)) as u8 as char,
                // any code point that is a char (surrogates are not)
                _ => loop {
                    if let Some(c) = char::from_u32(rng.below(0x110000) as u32) {
                        break c;
                    }
                },
            })
            .collect()
    }

    /// The fast splitter and fancy-regex, for both default patterns.
    fn splitter_pairs() -> Vec<(Splitter, Splitter)> {
        [DEFAULT_PATTERN, GPT4_PATTERN]
            .iter()
            .map(|p| {
                let fast = Splitter::new(p).unwrap();
                assert!(matches!(fast, Splitter::Fast(_)));
                (fast, Splitter::Regex(fancy_regex::Regex::new(p).unwrap()))
            })
            .collect()
    }

    fn assert_same_chunks(pairs: &[(Splitter, Splitter)], text: &str) {
        for (fast, slow) in pairs {
            assert_eq!(fast.chunks(text).unwrap(), slow.chunks(text).unwrap(), "text {text:?}");
        }
    }

    #[test]
    fn fast_splitter_matches_fancy_regex_on_examples() {
        let examples = [
            "",
            "Hello world! It's 2024, we'LL see'S   \n\n  x",
            "  leading spaces and trailing   ",
            "a\r\n\r\n b\t\tc \u{a0}d",
            "12345 6789٣٣٣ ½½½ x1y22z333",
            "'abc 'll 'LL 'ſ 'Ve 're' ' '",
            "!!!\n\n?? ...\r\n  ;;\n",
            "emoji 😀😀 👍🏽 family 👨\u{200d}👩\u{200d}👧",
            "   \n   ",
            " ",
            "\n",
            "x  ",
            "def f(x):\n    return x**2  # comment\n\n\n",
        ];
        let pairs = splitter_pairs();
        for text in examples {
            assert_same_chunks(&pairs, text);
        }
    }

    #[test]
    fn fast_splitter_matches_fancy_regex_on_random_strings() {
        let tricky: Vec<char> = TRICKY.chars().collect();
        let pairs = splitter_pairs();
        let mut rng = Rng::new(1234);
        for _ in 0..50_000 {
            assert_same_chunks(&pairs, &random_string(&mut rng, &tricky));
        }
    }

    #[test]
    fn custom_patterns_go_through_fancy_regex() {
        let s = Splitter::new(r"\w+|\s+").unwrap();
        assert!(matches!(s, Splitter::Regex(_)));
        assert_eq!(s.chunks("ab cd!").unwrap(), vec!["ab", " ", "cd"]);
        // empty matches are dropped
        assert_eq!(Splitter::new("a*").unwrap().chunks("baa").unwrap(), vec!["aa"]);
        assert!(Splitter::new("(").is_err());
    }
}
