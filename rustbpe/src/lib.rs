//! rustbpe: BPE tokenizer training for nanochat, as a Python module.
//!
//! ```python
//! tok = rustbpe.Tokenizer()
//! tok.train_from_iterator(texts, vocab_size=65536)   # vocab_size counts the 256 byte tokens
//! ranks = tok.get_mergeable_ranks()                   # [(token_bytes, id)], ids 0..vocab_size
//! ```
//! Progress goes to Python's `sys.stderr` as lines starting with `rustbpe:`.

use std::time::Instant;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rustc_hash::FxHashMap;

pub mod split;
#[cfg(test)]
mod test_rng;
pub mod train;

use split::{Splitter, DEFAULT_PATTERN};
use train::{merge_word, pair_key, train_merges, ChunkCounts, PairKey};

/// A byte-level BPE tokenizer: a split pattern plus merges. Before training it has no merges
/// and encodes text as raw bytes with the default pattern.
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    /// merges[i] = (left, right) pair merged into id 256 + i
    merges: Vec<(u32, u32)>,
    /// pair -> id it merges into (its rank)
    ranks: FxHashMap<PairKey, u32>,
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        let splitter = Splitter::new(DEFAULT_PATTERN).expect("default pattern compiles");
        Tokenizer { pattern: DEFAULT_PATTERN.to_string(), splitter, merges: Vec::new(), ranks: FxHashMap::default() }
    }

    /// Train on the texts of `iterator` (any iterable of str) up to `vocab_size` tokens, the
    /// 256 byte tokens included (fewer if the text runs out of pairs). Texts are read in
    /// buffers of `buffer_size`; each buffer is split and counted in parallel with the GIL
    /// released. `pattern` defaults to GPT-4's split pattern with `\p{N}{1,2}`. Training
    /// replaces any previous merges and pattern; on error the tokenizer is left unchanged.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the 256 byte tokens are always in the vocabulary), got {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!("buffer_size must be at least 1, got {buffer_size}")));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = make_splitter(&pattern)?;

        let mut log = Progress::new();
        let counts = count_chunks(py, iterator, &splitter, buffer_size as usize, &mut log)?;
        let num_merges = (vocab_size - 256) as usize;
        let (words, word_counts) = py.detach(|| counts.into_words());
        log.say(py, &format!("merging: {num_merges} merges over {} distinct chunks", words.len()));
        let merges =
            py.detach(|| train_merges(words, word_counts, num_merges, |done| log.merge_tick(done, num_merges)))?;
        log.say(
            py,
            &format!("done: {} merges, vocab_size {}, {:.1}s in all", merges.len(), 256 + merges.len(), log.elapsed()),
        );

        self.ranks = merges.iter().enumerate().map(|(i, &(a, b))| (pair_key(a, b), 256 + i as u32)).collect();
        self.merges = merges;
        self.pattern = pattern;
        self.splitter = splitter;
        Ok(())
    }

    /// The split pattern (the default one until training sets another).
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// Every token as (bytes, id): the 256 single bytes, then one token per merge. The id is the
    /// rank, ready for `tiktoken.Encoding(mergeable_ranks=dict(...))`.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.token_bytes().iter().enumerate().map(|(id, bytes)| (PyBytes::new(py, bytes), id as u32)).collect()
    }

    /// Encode text: split with the pattern, then apply the merges to each chunk by rank.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.detach(|| {
            let mut ids = Vec::with_capacity(text.len() / 3);
            self.splitter.for_each_chunk(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut ids))?;
            Ok(ids)
        })
        .map_err(split_error)
    }

    /// Number of tokens: 256 bytes + merges.
    #[getter]
    fn vocab_size(&self) -> usize {
        256 + self.merges.len()
    }
}

impl Tokenizer {
    fn token_bytes(&self) -> Vec<Vec<u8>> {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &self.merges {
            let token = [tokens[a as usize].as_slice(), tokens[b as usize].as_slice()].concat();
            tokens.push(token);
        }
        tokens
    }

    /// Applying the merges in rank order is the same as repeatedly merging the lowest-ranked
    /// pair present (a merge can only create pairs of higher rank), which skips absent merges.
    fn encode_chunk(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut word: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        loop {
            let best = word.windows(2).filter_map(|w| self.ranks.get(&pair_key(w[0], w[1]))).min();
            let Some(&new_id) = best else { break };
            merge_word(&mut word, self.merges[new_id as usize - 256], new_id, |_, _| {});
        }
        out.extend_from_slice(&word);
    }
}

fn make_splitter(pattern: &str) -> PyResult<Splitter> {
    Splitter::new(pattern).map_err(|e| PyValueError::new_err(format!("invalid pattern {pattern:?}: {e}")))
}

/// Splitting only fails inside fancy-regex (e.g. its backtrack limit, on a custom pattern).
fn split_error(e: String) -> PyErr {
    PyValueError::new_err(format!("splitting failed: {e}"))
}

/// Reads the iterator into buffers and counts each buffer's chunks with the GIL released.
fn count_chunks(
    py: Python<'_>,
    iterator: &Bound<'_, PyAny>,
    splitter: &Splitter,
    buffer_size: usize,
    log: &mut Progress,
) -> PyResult<ChunkCounts> {
    let mut counts = ChunkCounts::default();
    let mut buffer: Vec<String> = Vec::with_capacity(buffer_size.min(1 << 16));
    let (mut n_texts, mut n_bytes) = (0usize, 0usize);
    let mut flush = |py: Python<'_>, buffer: &mut Vec<String>| -> PyResult<()> {
        py.detach(|| counts.add_texts(splitter, buffer)).map_err(split_error)?;
        buffer.clear();
        py.check_signals()
    };
    log.say(py, "counting chunks");
    for (index, item) in iterator.try_iter()?.enumerate() {
        let item = item?;
        let text = item.cast::<PyString>().map_err(|_| {
            let type_name = item.get_type().name().map(|n| n.to_string()).unwrap_or_default();
            PyTypeError::new_err(format!("training texts must be str, but item {index} is {type_name}"))
        })?;
        let text = text
            .to_str()
            .map_err(|_| PyValueError::new_err(format!("item {index} is not valid UTF-8 (it has a lone surrogate)")))?;
        n_texts += 1;
        n_bytes += text.len();
        buffer.push(text.to_owned());
        if buffer.len() == buffer_size {
            flush(py, &mut buffer)?;
            log.every_few_seconds(py, || format!("counted {n_texts} texts, {:.1} MB", n_bytes as f64 / 1e6));
        }
    }
    flush(py, &mut buffer)?;
    if n_bytes == 0 {
        let what = if n_texts == 0 { "no texts".to_string() } else { format!("{n_texts} empty texts") };
        return Err(PyValueError::new_err(format!("no training text: the iterator gave {what}")));
    }
    log.say(
        py,
        &format!(
            "counted {n_texts} texts, {:.1} MB, {} distinct chunks in {:.1}s",
            n_bytes as f64 / 1e6,
            counts.counts.len(),
            log.elapsed()
        ),
    );
    Ok(counts)
}

/// Progress lines on Python's sys.stderr (seen by default, in notebooks and in Ray's worker
/// logs), at most one every few seconds so long runs are not silent and short ones stay quiet.
struct Progress {
    start: Instant,
    last: Instant,
    last_percent: usize,
}

const SECONDS_BETWEEN_LINES: f64 = 5.0;

impl Progress {
    fn new() -> Self {
        Progress { start: Instant::now(), last: Instant::now(), last_percent: 0 }
    }

    fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn say(&mut self, py: Python<'_>, msg: &str) {
        self.last = Instant::now();
        // Best effort: sys.stderr may be None (pythonw) or closed.
        let _ = py.import("sys").and_then(|sys| sys.getattr("stderr")).and_then(|stderr| {
            stderr.call_method1("write", (format!("rustbpe: {msg}\n"),))?;
            stderr.call_method0("flush")
        });
    }

    fn every_few_seconds(&mut self, py: Python<'_>, msg: impl FnOnce() -> String) {
        if self.last.elapsed().as_secs_f64() >= SECONDS_BETWEEN_LINES {
            self.say(py, &msg());
        }
    }

    /// Called after each merge with the GIL released: now and then takes the GIL to report
    /// (on each new percent, rate-limited) and to let Ctrl-C stop training.
    fn merge_tick(&mut self, done: usize, total: usize) -> PyResult<()> {
        if !done.is_multiple_of(64) {
            return Ok(());
        }
        Python::attach(|py| {
            let percent = done * 100 / total;
            if percent > self.last_percent {
                self.last_percent = percent;
                let elapsed = self.elapsed();
                self.every_few_seconds(py, || format!("merge {done}/{total} ({percent}%), {elapsed:.1}s"));
            }
            py.check_signals()
        })
    }
}

/// The chunks that `pattern` (default: DEFAULT_PATTERN) cuts `text` into, exactly as training
/// sees them. For tests and debugging.
#[pyfunction]
#[pyo3(signature = (text, pattern=None))]
fn split_text(text: &str, pattern: Option<&str>) -> PyResult<Vec<String>> {
    let pattern = pattern.unwrap_or(DEFAULT_PATTERN);
    let chunks = make_splitter(pattern)?.chunks(text).map_err(split_error)?;
    Ok(chunks.into_iter().map(String::from).collect())
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    Ok(())
}
