//! BPE training: count the regex chunks of the corpus, then merge the most frequent pair of
//! token ids again and again.
//!
//! Merging keeps, for every pair, its count and the words that contain it, so one merge only
//! touches the words holding that pair and updates pair counts by deltas. A max-heap ordered by
//! (count, smallest pair) picks the next merge; its entries go stale as counts drop and are
//! fixed when popped (lazy invalidation).
//!
//! Determinism: counts are sums of integers and the heap order is a total order on
//! (count, pair), so the merges never depend on hash-map iteration order, the order of words or
//! how rayon schedules the counting.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::split::Splitter;

/// A pair of token ids packed as `left << 32 | right`: cheap to hash, and comparing two keys
/// compares (left, right) lexicographically, which is the tie-break rule.
pub type PairKey = u64;

#[inline]
pub fn pair_key(left: u32, right: u32) -> PairKey {
    (left as u64) << 32 | right as u64
}

#[inline]
pub fn unpack(key: PairKey) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

/// How many times each distinct chunk occurs in the corpus.
#[derive(Default)]
pub struct ChunkCounts {
    pub counts: FxHashMap<Box<str>, u64>,
}

impl ChunkCounts {
    /// Splits and counts a buffer of texts in parallel: each rayon task counts a slice of the
    /// texts into its own map (keys borrow from the texts), then the maps are folded in here.
    pub fn add_texts(&mut self, splitter: &Splitter, texts: &[String]) -> Result<(), String> {
        let parts = 4 * rayon::current_num_threads();
        let part_len = texts.len().div_ceil(parts).max(1);
        let partial: Vec<Result<FxHashMap<&str, u64>, String>> = texts
            .par_chunks(part_len)
            .map(|part| {
                let mut local = FxHashMap::default();
                for text in part {
                    splitter.for_each_chunk(text, |chunk| *local.entry(chunk).or_insert(0) += 1)?;
                }
                Ok(local)
            })
            .collect();
        for local in partial {
            for (chunk, n) in local? {
                match self.counts.get_mut(chunk) {
                    Some(total) => *total += n,
                    None => {
                        self.counts.insert(chunk.into(), n);
                    }
                }
            }
        }
        Ok(())
    }

    /// The chunks as words of byte ids with their counts. Chunks of one byte are dropped:
    /// they hold no pair.
    pub fn into_words(self) -> (Vec<Vec<u32>>, Vec<i64>) {
        self.counts
            .into_iter()
            .filter(|(chunk, _)| chunk.len() > 1)
            .map(|(chunk, n)| (chunk.bytes().map(u32::from).collect(), n as i64))
            .unzip()
    }
}

/// Merges every occurrence of `pair` in `word` (left to right, non-overlapping) into `new_id`, and reports how the word's pair counts change through
/// `delta(pair, +1 or -1)`. Only pairs around each occurrence change:
///   x a b y  ->  x N y   loses (x,a) (a,b) (b,y), gains (x,N) (N,y)
/// With back-to-back occurrences (`a b a b`) the pair between them, (b,a), is handled once, as
/// the left side of the second occurrence, where the new left neighbour is N itself.
pub fn merge_word(word: &mut Vec<u32>, pair: (u32, u32), new_id: u32, mut delta: impl FnMut(PairKey, i64)) {
    let (a, b) = pair;
    let n = word.len();
    let (mut read, mut write) = (0, 0);
    let mut prev_original = 0; // the token before `read` in the original word
    while read < n {
        let token = word[read];
        if token == a && read + 1 < n && word[read + 1] == b {
            delta(pair_key(a, b), -1);
            if write > 0 {
                delta(pair_key(prev_original, a), -1);
                delta(pair_key(word[write - 1], new_id), 1);
            }
            let next_is_occurrence = read + 3 < n && word[read + 2] == a && word[read + 3] == b;
            if read + 2 < n && !next_is_occurrence {
                delta(pair_key(b, word[read + 2]), -1);
                delta(pair_key(new_id, word[read + 2]), 1);
            }
            word[write] = new_id;
            prev_original = b;
            read += 2;
        } else {
            word[write] = token;
            prev_original = token;
            read += 1;
        }
        write += 1;
    }
    word.truncate(write);
}

/// The merge phase. `words` are chunks as token ids, `counts[i]` how often word i occurs.
/// Returns the merges in order (merge i creates id 256 + i), at most `num_merges`, fewer if the
/// words run out of pairs. `progress(merges_done)` is called after every merge; an error from
/// it stops training (used for Ctrl-C).
pub fn train_merges<E>(
    mut words: Vec<Vec<u32>>,
    counts: Vec<i64>,
    num_merges: usize,
    mut progress: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<(u32, u32)>, E> {
    // Pair counts and, for each pair, the (sorted, deduplicated) indices of words that hold
    // it. A word stays listed after a merge takes the pair out of it; merging it again is a
    // no-op, which is cheaper than keeping the lists exact.
    let mut pair_counts: FxHashMap<PairKey, i64> = FxHashMap::default();
    let mut where_pair: FxHashMap<PairKey, Vec<u32>> = FxHashMap::default();
    for (i, word) in words.iter().enumerate() {
        for w in word.windows(2) {
            let key = pair_key(w[0], w[1]);
            *pair_counts.entry(key).or_insert(0) += counts[i];
            let list = where_pair.entry(key).or_default();
            if list.last() != Some(&(i as u32)) {
                list.push(i as u32);
            }
        }
    }
    let mut heap: BinaryHeap<(i64, Reverse<PairKey>)> =
        pair_counts.iter().map(|(&key, &count)| (count, Reverse(key))).collect();

    let mut merges = Vec::new(); // (not with_capacity: num_merges may be far more than the text allows)
    let mut deltas: FxHashMap<PairKey, i64> = FxHashMap::default();
    while merges.len() < num_merges {
        let Some((count, Reverse(key))) = heap.pop() else { break };
        // Counts only ever drop for pairs already in the heap (new pairs always contain the new
        // id), so a stale entry overestimates: re-push it with its true count.
        let current = pair_counts.get(&key).copied().unwrap_or(0);
        if current != count {
            if current > 0 {
                heap.push((current, Reverse(key)));
            }
            continue;
        }
        let pair = unpack(key);
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);

        // The merged pair can never come back (new pairs contain new_id), so its list goes.
        let word_ids = where_pair.remove(&key).unwrap_or_default();
        deltas.clear();
        for &wi in &word_ids {
            let n = counts[wi as usize];
            merge_word(&mut words[wi as usize], pair, new_id, |k, d| {
                *deltas.entry(k).or_insert(0) += d * n;
                if d > 0 {
                    // lists of new pairs are built here in increasing word order: no duplicates
                    let list = where_pair.entry(k).or_default();
                    if list.last() != Some(&wi) {
                        list.push(wi);
                    }
                }
            });
        }
        for (&k, &d) in &deltas {
            let c = pair_counts.entry(k).or_insert(0);
            *c += d;
            if *c <= 0 {
                pair_counts.remove(&k);
                where_pair.remove(&k);
            } else if d > 0 {
                heap.push((*c, Reverse(k))); // a new pair
            }
        }
        progress(merges.len())?;
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    fn all_pairs(word: &[u32]) -> FxHashMap<PairKey, i64> {
        let mut m = FxHashMap::default();
        for w in word.windows(2) {
            *m.entry(pair_key(w[0], w[1])).or_insert(0) += 1;
        }
        m
    }

    /// Plain left-to-right merge, the definition.
    fn merge_simple(word: &[u32], pair: (u32, u32), new_id: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < word.len() {
            if i + 1 < word.len() && (word[i], word[i + 1]) == pair {
                out.push(new_id);
                i += 2;
            } else {
                out.push(word[i]);
                i += 1;
            }
        }
        out
    }

    #[test]
    fn merge_word_deltas_equal_a_full_recount() {
        let mut rng = Rng::new(7);
        for _ in 0..20_000 {
            // tiny alphabet: lots of repeats, back-to-back and overlapping occurrences
            let word: Vec<u32> = (0..rng.below(12)).map(|_| rng.below(3) as u32).collect();
            let pair = (rng.below(3) as u32, rng.below(3) as u32);
            let mut merged = word.clone();
            let mut deltas = FxHashMap::default();
            merge_word(&mut merged, pair, 99, |k, d| *deltas.entry(k).or_insert(0) += d);
            assert_eq!(merged, merge_simple(&word, pair, 99));
            let mut expected = all_pairs(&merged);
            for (k, n) in all_pairs(&word) {
                *expected.entry(k).or_insert(0) -= n;
            }
            expected.retain(|_, d| *d != 0);
            deltas.retain(|_, d| *d != 0);
            assert_eq!(deltas, expected, "word {word:?} pair {pair:?}");
        }
    }

    /// Slow trainer: recount every pair before each merge.
    fn train_simple(mut words: Vec<Vec<u32>>, counts: &[i64], num_merges: usize) -> Vec<(u32, u32)> {
        let mut merges = Vec::new();
        while merges.len() < num_merges {
            let mut pc: FxHashMap<PairKey, i64> = FxHashMap::default();
            for (w, &n) in words.iter().zip(counts) {
                for (k, c) in all_pairs(w) {
                    *pc.entry(k).or_insert(0) += c * n;
                }
            }
            // max count, then smallest pair
            let Some((&k, _)) = pc.iter().max_by_key(|&(&k, &c)| (c, Reverse(k))) else { break };
            let new_id = 256 + merges.len() as u32;
            for w in words.iter_mut() {
                *w = merge_simple(w, unpack(k), new_id);
            }
            merges.push(unpack(k));
        }
        merges
    }

    #[test]
    fn train_merges_equals_full_recount() {
        let mut rng = Rng::new(42);
        for round in 0..30 {
            let alphabet = 2 + round % 5;
            let words: Vec<Vec<u32>> =
                (0..50).map(|_| (0..2 + rng.below(15)).map(|_| 97 + rng.below(alphabet) as u32).collect()).collect();
            let counts: Vec<i64> = (0..50).map(|_| 1 + rng.below(5) as i64).collect();
            let fast = train_merges(words.clone(), counts.clone(), 200, |_| Ok::<(), ()>(())).unwrap();
            assert_eq!(fast, train_simple(words, &counts, 200), "round {round}");
        }
    }

    #[test]
    fn ties_go_to_the_smallest_pair_and_training_stops_when_pairs_run_out() {
        // (b,a) and (a,b) both occur twice: (97,98) wins; then only "ba"->... remain
        let words = vec![vec![98, 97], vec![97, 98], vec![98, 97], vec![97, 98]];
        let merges = train_merges(words, vec![1; 4], 10, |_| Ok::<(), ()>(())).unwrap();
        assert_eq!(merges, vec![(97, 98), (98, 97)]);
    }

    #[test]
    fn progress_error_stops_training() {
        let words = vec![vec![1, 2, 3, 4, 5]];
        let r = train_merges(words, vec![1], 10, |done| if done == 2 { Err(done) } else { Ok(()) });
        assert_eq!(r, Err(2));
    }

    #[test]
    fn chunk_counts_do_not_depend_on_buffering() {
        let splitter = Splitter::new(crate::split::DEFAULT_PATTERN).unwrap();
        let texts: Vec<String> = (0..100).map(|i| format!("text {i} has words, words {}", i % 7)).collect();
        let mut once = ChunkCounts::default();
        once.add_texts(&splitter, &texts).unwrap();
        let mut in_pieces = ChunkCounts::default();
        for piece in texts.chunks(7) {
            in_pieces.add_texts(&splitter, piece).unwrap();
        }
        assert_eq!(once.counts, in_pieces.counts);
        assert_eq!(once.counts[" words"], 200);
        assert_eq!(once.counts[","], 100);
    }
}
