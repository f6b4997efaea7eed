"""A slow, obviously-correct byte-level BPE trainer: the oracle that tests/test_rustbpe.py holds
the Rust crate to. No cleverness: recount every pair before every merge.

Rules (the same as rustbpe's):
- text is split into chunks with the pattern (the `regex` module, which knows \\p{L} and
  possessive quantifiers); pairs never cross chunks;
- each merge takes the most frequent pair; ties go to the smallest (left id, right id);
- merge i creates id 256 + i and replaces the pair left to right, without overlaps.
"""

import collections

import regex


def split(text, pattern):
    return [m.group() for m in regex.finditer(pattern, text) if m.group()]


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)


def train(texts, vocab_size, pattern):
    """Returns the merges: a list of (left id, right id), at most vocab_size - 256."""
    words = collections.Counter(tuple(chunk.encode("utf-8")) for text in texts for chunk in split(text, pattern))
    merges = []
    while 256 + len(merges) < vocab_size:
        pair_counts = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        new_id = 256 + len(merges)
        merges.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            merged[merge(word, best, new_id)] += count
        words = merged
    return merges


def mergeable_ranks(merges):
    """[(token bytes, id)] for the 256 bytes, then each merge."""
    tokens = [bytes([b]) for b in range(256)]
    for left, right in merges:
        tokens.append(tokens[left] + tokens[right])
    return [(token, i) for i, token in enumerate(tokens)]


def encode(text, merges, pattern):
    """Apply every merge, in order, to every chunk."""
    ids = []
    for chunk in split(text, pattern):
        word = tuple(chunk.encode("utf-8"))
        for i, pair in enumerate(merges):
            if len(word) < 2:
                break
            word = merge(word, pair, 256 + i)
        ids.extend(word)
    return ids
