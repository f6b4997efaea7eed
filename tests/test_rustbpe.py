"""rustbpe (the Rust BPE trainer) against tests/bpe_reference.py, the pure-Python oracle: same
merges on several corpora, same encoding, same chunks as the `regex` module, same result on any
thread count, and clear Python errors on bad input."""

import hashlib
import inspect
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

import bpe_reference as ref
import rustbpe

PATTERN = rustbpe.DEFAULT_PATTERN
GPT4_PATTERN = PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}")  # the other pattern with a fast path

# -----------------------------------------------------------------------------
# corpora (deterministic: fixed seeds, stdlib text)

WORDS = ("naïve café Ωμέγα λόγος Привет мир こんにちは 世界 中文字符 العربية हिन्दी 한국어 "
         "ſtraße Kelvin K Ångström e\u0301te 😀 👍🏽 👨\u200d👩\u200d👧 🇫🇷 ❤\ufe0f it's WE'LL they'Re I'M").split()


def english():
    import argparse, collections, json as json_mod, logging, statistics
    return [m.__doc__ for m in (argparse, collections, textwrap, json_mod, logging, statistics)]


def code():
    import json.decoder
    return [inspect.getsource(textwrap), inspect.getsource(json.decoder)]


def mixed_unicode(seed=0, n=300):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) + rng.choice([".", "!", "\n", ""])
            for _ in range(n)]


def whitespace_runs(seed=1, n=200):
    rng = random.Random(seed)
    spaces = [" ", "\t", "\n", "\r\n", "\u00a0", "\u3000"]
    return ["".join(rng.choice(["word", "x", "the", "(", "1"]) + rng.choice(spaces) * rng.randint(1, 60)
                    for _ in range(rng.randint(1, 10))) for _ in range(n)]


def digits(seed=2, n=300):
    rng = random.Random(seed)
    forms = [lambda: str(rng.randint(0, 10**rng.randint(1, 12))), lambda: f"{rng.random() * 1000:.4f}",
             lambda: f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
             lambda: "".join(rng.choice("٠١٢٣٤٥٦٧٨٩１２３½²Ⅻ") for _ in range(rng.randint(1, 6)))]
    return [" ".join(rng.choice(forms)() for _ in range(rng.randint(1, 20))) for _ in range(n)]


CORPORA = {"english": english, "code": code, "mixed_unicode": mixed_unicode,
           "whitespace_runs": whitespace_runs, "digits": digits}


def trained(texts, vocab_size, **kwargs):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


# -----------------------------------------------------------------------------
# training


@pytest.mark.parametrize("corpus", CORPORA)
def test_merges_equal_reference(corpus):
    texts = CORPORA[corpus]()
    tok = trained(texts, 256 + 150)
    expected = ref.train(texts, 256 + 150, PATTERN)
    assert tok.get_mergeable_ranks() == ref.mergeable_ranks(expected)
    assert tok.vocab_size == 256 + len(expected) == 256 + 150


def test_custom_pattern_equals_reference():
    pattern = r"[a-z]+|\s+|[^a-z\s]+"  # goes through fancy-regex, not the fast splitter
    texts = english()
    tok = trained(texts, 256 + 100, pattern=pattern)
    assert tok.get_pattern() == pattern
    assert tok.get_mergeable_ranks() == ref.mergeable_ranks(ref.train(texts, 256 + 100, pattern))


def test_training_stops_when_pairs_run_out():
    for vocab_size in (1000, 10**12):
        tok = trained(["abab"], vocab_size)
        assert tok.get_mergeable_ranks()[256:] == [(b"ab", 256), (b"abab", 257)]
        assert tok.vocab_size == 258


def test_ties_go_to_smallest_pair():
    # ' a', 'ab' and 'ba' all occur twice: ' a' = (32, 97) is the smallest pair
    tok = trained(["ba ab ba ab"], 258)
    assert tok.get_mergeable_ranks()[256:] == [(b" a", 256), (b"ba", 257)]


def test_buffering_and_iterables_do_not_change_merges():
    texts = mixed_unicode(n=100)
    expected = trained(texts, 400).get_mergeable_ranks()
    assert trained(texts, 400, buffer_size=1).get_mergeable_ranks() == expected
    assert trained((t for t in texts), 400, buffer_size=7).get_mergeable_ranks() == expected
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(texts, 400)  # a list, not an iterator
    assert tok.get_mergeable_ranks() == expected


RANKS_SCRIPT = """
import hashlib, json, sys, rustbpe
texts = json.load(sys.stdin)
tok = rustbpe.Tokenizer()
tok.train_from_iterator(iter(texts), 256 + 1500, buffer_size=64)
print(hashlib.sha256(repr(tok.get_mergeable_ranks()).encode()).hexdigest())
"""


def test_same_merges_on_any_thread_count():
    texts = english() + code() + mixed_unicode(n=2000) + whitespace_runs() + digits(n=2000)
    random.Random(3).shuffle(texts)
    digests = set()
    for threads in ("1", "4"):
        env = {**os.environ, "RAYON_NUM_THREADS": threads}
        out = subprocess.run([sys.executable, "-c", RANKS_SCRIPT], input=json.dumps(texts), env=env,
                             capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    in_process = trained(texts, 256 + 1500).get_mergeable_ranks()
    digests.add(hashlib.sha256(repr(in_process).encode()).hexdigest())
    assert len(digests) == 1

# -----------------------------------------------------------------------------
# encoding


def random_text(rng, n):
    pool = list("abcXYZ 'sdtlvre\n\r\t0123456789.,!?()") + WORDS
    text = [rng.choice(pool) for _ in range(n)]
    text += [chr(rng.randrange(0x20, 0x110000)) for _ in range(n // 4)]  # anywhere in Unicode
    rng.shuffle(text)
    return "".join(c for c in "".join(text) if not 0xD800 <= ord(c) <= 0xDFFF)  # no surrogates


def test_encode_equals_reference_and_round_trips():
    texts = mixed_unicode() + digits() + english()
    tok = trained(texts, 256 + 300)
    ref_merges = ref.train(texts, 256 + 300, PATTERN)
    assert tok.get_mergeable_ranks() == ref.mergeable_ranks(ref_merges)
    vocab = {i: token for token, i in tok.get_mergeable_ranks()}
    rng = random.Random(4)
    samples = [random_text(rng, rng.randint(0, 80)) for _ in range(150)] + texts[:20] + ["", " ", "\n\n"]
    for text in samples:
        ids = tok.encode(text)
        assert ids == ref.encode(text, ref_merges, PATTERN), text
        assert b"".join(vocab[i] for i in ids) == text.encode("utf-8")


def test_untrained_tokenizer_encodes_bytes():
    tok = rustbpe.Tokenizer()
    assert tok.vocab_size == 256
    assert tok.get_pattern() == PATTERN
    assert tok.get_mergeable_ranks() == [(bytes([b]), b) for b in range(256)]
    assert tok.encode("hé 😀") == list("hé 😀".encode("utf-8"))

# -----------------------------------------------------------------------------
# splitting: the fast splitter (default patterns) and fancy-regex (others) vs the `regex` module

SPLIT_POOL = list("'sdmtlvreSDMTLVREſK \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u3000\u200b"
                  "0123456789٣Ⅻ½²aZéßΩжא中ー\u0301!?.,;:-_()[]\"@#$%^&*+=<>/\\|~`😀👍🏽\ufe0f\u200d")
BLOCKS = [(0x20, 0x250), (0x370, 0x530), (0x590, 0x700), (0x900, 0x980), (0x2000, 0x2070),
          (0x2190, 0x2300), (0x3000, 0x3100), (0x4E00, 0x4F00), (0xAC00, 0xAD00), (0x1F300, 0x1F650)]


def split_samples(seed, count):
    rng = random.Random(seed)
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.8:
                chars.append(rng.choice(SPLIT_POOL))
            else:  # long-assigned blocks, so the two libraries' Unicode versions agree
                lo, hi = rng.choice(BLOCKS)
                chars.append(chr(rng.randrange(lo, hi)))
        yield "".join(chars)


# (custom patterns compile a fancy-regex per call, so they get fewer samples)
@pytest.mark.parametrize("pattern, count", [(PATTERN, 4000), (GPT4_PATTERN, 4000),
                                            (r"[\p{L}\p{N}]+|\s+|[^\p{L}\p{N}\s]+", 200),
                                            (r"\p{L}+|\p{N}|\s+(?!\S)|.", 500)])
def test_split_equals_regex_module(pattern, count):
    for text in split_samples(5, count):
        assert rustbpe.split_text(text, pattern) == ref.split(text, pattern), repr(text)


def test_split_examples():
    assert rustbpe.split_text("Hello world, it's 12345!\n\n  ok  ") == \
        ["Hello", " world", ",", " it", "'s", " ", "12", "34", "5", "!\n\n", " ", " ok", "  "]

# -----------------------------------------------------------------------------
# errors: clear Python exceptions, never a panic


def test_empty_input_is_a_value_error():
    with pytest.raises(ValueError, match="no training text"):
        trained([], 300)
    with pytest.raises(ValueError, match="no training text"):
        trained(["", ""], 300)


def test_vocab_size_below_256_is_a_value_error():
    with pytest.raises(ValueError, match="at least 256"):
        trained(["hello"], 255)


def test_non_str_item_is_a_type_error_naming_index_and_type():
    with pytest.raises(TypeError, match=r"item 2 is bytes"):
        trained(["a", "b", b"c"], 300)
    with pytest.raises(TypeError, match=r"item 0 is int"):
        trained([1], 300)


def test_lone_surrogate_is_a_value_error_naming_index():
    with pytest.raises(ValueError, match=r"item 1 .*UTF-8"):
        trained(["ok", "bad \ud800 text"], 300)


def test_invalid_pattern_is_a_value_error():
    with pytest.raises(ValueError, match="invalid pattern"):
        trained(["hello"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="invalid pattern"):
        rustbpe.split_text("x", "[")


def test_iterator_errors_propagate_and_failed_training_keeps_the_old_state():
    def broken():
        yield "some text"
        raise RuntimeError("boom")

    tok = trained(["abab"], 300)
    before = tok.get_mergeable_ranks()
    with pytest.raises(RuntimeError, match="boom"):
        tok.train_from_iterator(broken(), 300)
    with pytest.raises(ValueError):
        tok.train_from_iterator(["x"], 300, pattern="(")
    assert tok.get_mergeable_ranks() == before and tok.get_pattern() == PATTERN


def test_progress_is_reported_on_stderr(capsys):
    trained(["hello world"] * 10, 260)
    err = capsys.readouterr().err
    assert "rustbpe: counted 10 texts" in err and "rustbpe: done: 4 merges" in err
