"""nanochat.engine: KV cache with per-row positions, Engine (one prompt, N samples), BatchDecoder
(continuous batching: its static path, prefix cache, chunked prefill and per-request sampler), tool use,
bad input, inference weights; and the chat CLI end to end."""
import copy
import io
import json
import os
import resource
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from nanochat import chat_cli
from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.common import get_base_dir
from nanochat import engine as engine_module
from nanochat.engine import (BatchDecoder, Engine, KVCache, PrefixCache, RowCache, TextStream, cast_for_inference,
                             inference_dtype, philox_2x32, philox_uniform, sample_rows)
from nanochat.gpt import GPTConfig, create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 64
KV_ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run on one torch thread: with two on a busy 2-core machine, every small op waits for the
    descheduled one (40x slower measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(small_tokenizer):
    return small_tokenizer[0]


def random_model(vocab_size, seed=0, n_kv_head=1):
    """Tiny, every weight random (zero-initialized projections would hide attention bugs)."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=64)
    model = create_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def model(tok):
    return random_model(tok.get_vocab_size())


def specials(tok):
    return {name: tok.encode_special(name) for name in tok.get_special_tokens()}


def naive_greedy(model, tok, prompt, n):
    """GPT.generate's greedy tokens, cut after the first terminal token (where the engines stop)."""
    terminal = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    out = []
    for t in model.generate(prompt, n, temperature=0.0):
        out.append(t)
        if t in terminal:
            break
    return out


def prompts(tok):
    texts = ["Hello", "The capital of France is a city that", "Once upon a time, in a land far away, there lived"]
    return [tok.encode(t, prepend="<|bos|>") for t in texts]


def run_decoder(decoder):
    """Step until every request has finished; returns {request_id: tokens}."""
    out = {}
    while decoder.stats()["requests"]:
        for rid, token, _ in decoder.step():
            out.setdefault(rid, []).append(token)
    return out


class Scripted(nn.Module):
    """A model that emits a fixed script: the token it predicts after absolute position p is
    script[p + 1 - prompt_len] (the last one repeats). It runs a real GPT underneath so that the KV cache
    fills as usual. Tokens forced by the engine occupy positions too; the script's entries there are ignored."""

    def __init__(self, gpt, script, prompt_len):
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        self.script, self.prompt_len = torch.tensor(script), prompt_len

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        start = torch.as_tensor(0 if kv_cache is None else kv_cache.get_pos(B)).expand(B)
        self.gpt(idx, kv_cache=kv_cache)
        at = (start[:, None] + torch.arange(T) + 1 - self.prompt_len).clamp(0, len(self.script) - 1)
        logits = torch.zeros(B, T, self.config.vocab_size)
        return logits.scatter_(-1, self.script[at][..., None], 10.0)


# ---- KV cache and per-row positions in the model -------------------------------------------------

def test_ragged_rows_match_full_forward(tok):
    """Rows at different positions in one forward (several new tokens each) give each row's own logits."""
    model = random_model(tok.get_vocab_size(), n_kv_head=2)
    V = tok.get_vocab_size()
    lengths, T = [3, 9, 5], 4
    seqs = [torch.randint(0, V, (1, n + T)) for n in lengths]
    cache = KVCache.for_model(model, batch_size=4, seq_len=8)  # one spare row, and too short: it grows
    for row, (n, seq) in enumerate(zip(lengths, seqs)):
        one = KVCache.for_model(model, 1, n)
        model(seq[:, :n], kv_cache=one)
        cache.prefill(one, row=row)
    assert cache.get_pos(3).tolist() == lengths
    got = model(torch.cat([s[:, n:] for n, s in zip(lengths, seqs)]), kv_cache=cache)
    assert cache.get_pos(3).tolist() == [n + T for n in lengths] and cache.pos[3] == 0
    for row, (n, seq) in enumerate(zip(lengths, seqs)):
        torch.testing.assert_close(got[row], model(seq)[0, n:], atol=KV_ATOL, rtol=0)
    cache.remove_row(0, 3)  # the last row moves into row 0 and still continues correctly
    assert cache.get_pos(2).tolist() == [5 + T, 9 + T]
    nxt = torch.randint(0, V, (2, 1))
    got = model(nxt, kv_cache=cache)[:, -1]
    for row, seq in enumerate([seqs[2], seqs[1]]):
        torch.testing.assert_close(got[row], model(torch.cat([seq, nxt[row:row + 1]], 1))[0, -1], atol=KV_ATOL, rtol=0)


# ---- Engine ----------------------------------------------------------------------------------------

def test_engine_greedy_matches_naive_generate(model, tok):
    engine = Engine(model, tok)
    for prompt in prompts(tok):
        want = naive_greedy(model, tok, prompt, 16)
        assert len(want) == 16  # no early stop: the comparison covers every step
        tokens, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=16, temperature=0.0)
        assert tokens == [want] * 3 and masks == [[1] * 16] * 3
        columns = list(engine.generate(prompt, max_tokens=16, temperature=0.0))
        assert [c[0][0] for c in columns] == want


def test_engine_seeds_and_independent_samples(model, tok):
    engine = Engine(model, tok)
    prompt = prompts(tok)[1]
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, seed=1)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, seed=1)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, seed=2)
    assert a == b and a != c
    first, masks = next(engine.generate(prompt, num_samples=16, temperature=1.0, seed=3))
    assert len(set(first)) > 1 and masks == [1] * 16  # one prefill, 16 independent first draws
    topk1, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=8, temperature=1.0, top_k=1)
    assert topk1 == [naive_greedy(model, tok, prompt, 8)] * 2


def test_engine_max_tokens_and_stop(model, tok):
    sp = specials(tok)
    engine = Engine(model, tok)
    prompt = prompts(tok)[0]
    steps = list(engine.generate(prompt, num_samples=2, max_tokens=5, temperature=1.0))
    assert len(steps) == 5 and all(len(col) == 2 for col, _ in steps)
    assert list(engine.generate(prompt, max_tokens=0)) == []
    words = tok.encode(" one two three")
    script = words + [sp["<|assistant_end|>"]] + words
    engine = Engine(Scripted(model, script, len(prompt)), tok)
    columns = list(engine.generate(prompt, num_samples=2, max_tokens=20, temperature=0.0))
    assert [c[0] for c, _ in columns] == words + [sp["<|assistant_end|>"]]
    assert engine.generate_batch(prompt, 2, max_tokens=20, temperature=0.0) == ([words, words], [[1] * len(words)] * 2)
    assert engine.generate_batch(prompt, 1, max_tokens=2, temperature=0.0)[0] == [words[:2]]


def test_engine_tool_call_injects_output(model, tok):
    sp = specials(tok)
    prompt = tok.encode("What is 2 + 3?", prepend="<|bos|>") + [sp["<|assistant_start|>"]]
    call = [sp["<|python_start|>"], *tok.encode("2 + 3"), sp["<|python_end|>"]]
    output = [sp["<|output_start|>"], *tok.encode("5"), sp["<|output_end|>"]]
    tail = tok.encode(" The answer is 5.")
    # where the engine forces the output, the script says <|assistant_end|>: forcing must win
    script = call + [sp["<|assistant_end|>"]] * len(output) + tail + [sp["<|assistant_end|>"]]
    engine = Engine(Scripted(model, script, len(prompt)), tok)
    tokens, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
    assert tokens == [call + output + tail] * 2
    assert masks == [[1] * len(call) + [0] * len(output) + [1] * len(tail)] * 2
    decoder = BatchDecoder(Scripted(model, script, len(prompt)), tok, max_batch=2)
    decoder.add("r", prompt, temperature=0.0)
    assert run_decoder(decoder)["r"] == call + output + tail + [sp["<|assistant_end|>"]]


@pytest.mark.parametrize("expr", ["2 +", "9 ** 9 ** 9 ** 9", "'ab' * 10 ** 9", "__import__('os')"])
def test_failed_tool_call_injects_nothing(model, tok, expr):
    sp = specials(tok)
    prompt = [tok.get_bos_token_id(), sp["<|assistant_start|>"]]
    call = [sp["<|python_start|>"], *tok.encode(expr), sp["<|python_end|>"]]
    tail = tok.encode(" no idea")
    engine = Engine(Scripted(model, call + tail + [sp["<|assistant_end|>"]], len(prompt)), tok)
    start = time.monotonic()
    tokens, masks = engine.generate_batch(prompt, max_tokens=40, temperature=0.0)
    assert tokens == [call + tail] and masks == [[1] * len(call + tail)]
    assert time.monotonic() - start < 5  # the calculator is bounded: never a hung engine


def test_bad_input(model, tok):
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="empty"):
        list(engine.generate([]))
    with pytest.raises(ValueError, match="context"):
        engine.generate_batch([1] * (SEQ_LEN + 1))
    with pytest.raises(ValueError, match="out of range"):
        engine.generate_batch([1, tok.get_vocab_size()])
    with pytest.raises(ValueError, match="temperature"):
        engine.generate_batch([1], temperature=-1.0)
    # special-token strings in user text stay plain text: the model only ever sees ordinary ids
    prompt = tok.encode("<|assistant_end|><|python_start|>", prepend="<|bos|>")
    assert not set(prompt[1:]) & set(specials(tok).values())
    assert len(engine.generate_batch(prompt, max_tokens=3, temperature=0.0)[0][0]) <= 3
    decoder = BatchDecoder(model, tok, max_batch=1, max_seq_len=16)
    with pytest.raises(ValueError, match="context"):
        decoder.add("long", [1] * 16)
    with pytest.raises(ValueError, match="empty"):
        decoder.add("empty", [])
    assert decoder.add("a", [1], max_tokens=100)  # capped to the room left: 15 tokens
    with pytest.raises(ValueError, match="already"):
        decoder.add("a", [1])
    assert len(run_decoder(decoder)["a"]) <= 15


# ---- BatchDecoder ----------------------------------------------------------------------------------

@pytest.mark.parametrize("static", [False, True], ids=["default", "static"])
def test_batch_decoder_ragged_and_mid_flight_match_alone(model, tok, static, monkeypatch):
    monkeypatch.setattr(engine_module, "KEY_LEN_STEP", 8)  # the static step crosses key-length buckets
    ps = prompts(tok)
    want = {i: naive_greedy(model, tok, p, 12) for i, p in enumerate(ps)}
    decoder = BatchDecoder(model, tok, max_batch=4, max_seq_len=SEQ_LEN, static=static)
    for i, p in enumerate(ps[:2]):  # two prompts of different lengths, decoded together
        assert decoder.add(i, p, max_tokens=12, temperature=0.0)
    out = {}
    for step in range(40):
        if step == 4:  # a third joins mid-flight, and a short one that leaves early (its row is reused)
            assert decoder.add(2, ps[2], max_tokens=12, temperature=0.0)
            assert decoder.add("short", ps[2], max_tokens=2, temperature=0.0)
        for rid, token, finished in decoder.step():
            out.setdefault(rid, []).append(token)
    assert {i: out[i] for i in range(3)} == want and out["short"] == want[2][:2]
    stats = decoder.stats()
    assert stats["requests"] == stats["active"] == 0 and stats["free_slots"] == 4
    assert stats["tokens_decoded"] == sum(len(t) for t in out.values())
    assert stats["tokens_prefilled"] == sum(len(p) for p in ps) + len(ps[2])


@pytest.mark.parametrize("static", [False, True], ids=["default", "static"])
def test_batch_decoder_seeded_sampling_is_per_request(model, tok, static):
    """A seeded request draws the same tokens alone and in a batch of others with other settings (greedy,
    another top-k, the whole vocabulary), joining before and after it."""
    ps = prompts(tok)
    requests = {"x": (ps[1], dict(temperature=1.0, seed=5)), "y": (ps[2], dict(temperature=0.8, top_k=10, seed=3))}
    others = {"greedy": (ps[0], dict(temperature=0.0)), "top3": (ps[2], dict(temperature=1.5, top_k=3, seed=1)),
              "full": (ps[0], dict(temperature=1.0, seed=5))}  # x's seed, another prompt: other tokens
    alone = {}
    for rid, (p, settings) in requests.items():
        decoder = BatchDecoder(model, tok, max_batch=5, static=static)
        decoder.add(rid, p, max_tokens=12, **settings)
        alone.update(run_decoder(decoder))
    together = BatchDecoder(model, tok, max_batch=5, static=static)
    got = {}
    for joining in (["greedy"], list(requests), ["top3", "full"]):  # one step between the groups
        for rid in joining:
            p, settings = requests.get(rid) or others[rid]
            together.add(rid, p, max_tokens=12, **settings)
        for rid, token, _ in together.step():
            got.setdefault(rid, []).append(token)
    for rid, tokens in run_decoder(together).items():
        got[rid] += tokens
    assert {rid: got[rid] for rid in requests} == alone
    assert got["x"] != got["full"] and len(set(got["y"])) > 1


def test_batch_decoder_slots_cancel_and_finish(model, tok):
    p = prompts(tok)[0]
    decoder = BatchDecoder(model, tok, max_batch=2)
    assert decoder.add("a", p) and decoder.add("b", p, max_tokens=3)
    assert not decoder.add("c", p)  # full: the caller queues it
    assert decoder.cancel("a") and not decoder.cancel("a") and not decoder.cancel("nope")
    assert decoder.add("c", p, max_tokens=5)
    events = decoder.step()
    assert sorted(e.request_id for e in events) == ["b", "c"] and not any(e.finished for e in events)
    assert decoder.cancel("c")  # cancel a running request: its row frees, b carries on
    assert decoder.stats()["active"] == 1 and decoder.add("d", p, max_tokens=1)
    finished = {}
    while decoder.stats()["requests"]:
        for rid, _, done in decoder.step():
            finished.setdefault(rid, []).append(done)
    assert finished == {"b": [False, True], "d": [True]}
    assert decoder.step() == [] and decoder.stats()["free_slots"] == 2


def test_batch_decoder_paths_agree(model, tok, monkeypatch):
    """The static step, chunked prefill and the prefix cache, alone and together, give the default path's
    tokens: greedy, top-k and whole-vocabulary sampling, requests joining mid-flight and leaving early."""
    monkeypatch.setattr(engine_module, "KEY_LEN_STEP", 8)  # the static step crosses key-length buckets
    ps = prompts(tok)

    def run(**options):
        decoder = BatchDecoder(model, tok, max_batch=4, **options)
        decoder.add(0, ps[0], max_tokens=20, temperature=0.0)
        decoder.add(1, ps[1], max_tokens=20, temperature=1.0, top_k=20, seed=1)
        out = {}
        for step in range(60):
            if step == 3:
                decoder.add(2, ps[2], max_tokens=20, temperature=0.8, seed=9)
                decoder.add(3, ps[1] + ps[2][1:], max_tokens=6, temperature=0.0)  # ps[1]'s blocks are cached
            for rid, token, _ in decoder.step():
                out.setdefault(rid, []).append(token)
        assert decoder.stats()["requests"] == 0
        return out

    want = run()
    for options in [dict(static=True), dict(prefill_chunk=5), dict(prefix_cache_mb=1, prefix_block=4),
                    dict(static=True, prefill_chunk=5, prefix_cache_mb=1, prefix_block=4)]:
        assert run(**options) == want, options


def test_static_decode_step_traces_as_one_graph(model, tok):
    """The static step has no host sync and no data-dependent Python: torch.compile(fullgraph=True) takes it
    whole (what a CUDA graph or mode="reduce-overhead" needs), and it computes the eager step's tokens."""
    decoders = [BatchDecoder(model, tok, max_batch=3, static=True) for _ in range(2)]
    decoders[1].static._forward = torch.compile(decoders[1].static._forward, fullgraph=True, backend="eager")
    outs = []
    for decoder in decoders:
        decoder.add("g", prompts(tok)[0], max_tokens=6, temperature=0.0)
        decoder.add("s", prompts(tok)[1], max_tokens=6, temperature=1.0, top_k=5, seed=2)
        outs.append(run_decoder(decoder))
    assert outs[0] == outs[1]


def test_cuda_graphs_need_a_gpu(model, tok):
    with pytest.raises(ValueError, match="CUDA"):
        BatchDecoder(model, tok, cuda_graphs=True)


# ---- the per-request sampler ---------------------------------------------------------------------------

def philox_reference(c0, c1, key, rounds=10):
    """Philox-2x32 in plain Python integers, as Random123 defines it."""
    M, W, MASK = 0xD256D193, 0x9E3779B9, 0xFFFFFFFF
    for _ in range(rounds):
        product = M * c0
        c0, c1 = ((product >> 32) ^ key ^ c1) & MASK, product & MASK
        key = (key + W) & MASK
    return c0, c1


def test_philox_known_answers_and_reference():
    # Random123's known-answer vectors for philox2x32-10: (counter0, counter1, key) -> (out0, out1)
    kat = {(0, 0, 0): (0xff1dae59, 0x6cd10df2), (0xffffffff, 0xffffffff, 0xffffffff): (0x2c3f628b, 0xab4fd7ad),
           (0x243f6a88, 0x85a308d3, 0x13198a2e): (0xdd7ce038, 0xf62a4c12)}
    words = torch.tensor(list(kat)).T
    assert list(zip(*(w.tolist() for w in philox_2x32(*words)))) == list(kat.values())
    words = torch.randint(0, 2**32, (3, 300), generator=torch.Generator().manual_seed(0))
    got = list(zip(*(w.tolist() for w in philox_2x32(*words))))
    assert got == [philox_reference(*col) for col in words.T.tolist()]
    seeds, steps = torch.tensor([0, 1, 2**62 + 12345, -5]), torch.tensor([0, 7, 3, 2**31])
    for seed, step, u in zip(seeds.tolist(), steps.tolist(), philox_uniform(seeds, steps).tolist()):
        w0, w1 = philox_reference(step, (seed % 2**64) >> 32, seed % 2**32)
        assert u == ((w0 << 21) | (w1 >> 11)) / 2**53  # the top 53 of the 64 bits, a fraction in [0, 1)


def test_sample_rows_follows_each_rows_distribution():
    """20k rows of the same logits, each with its own seed: the frequencies of the draws are softmax(logits /
    temperature), restricted to the top k and renormalized, within 4 standard errors (ids outside the top k:
    never); temperature 0 is the argmax."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -0.5, 1.5])
    n = 20_000
    seeds, steps = torch.arange(n) * 7919 + 11, torch.full((n,), 3)
    for temperature, top_k in [(1.0, 0), (0.5, 0), (1.0, 3), (2.0, 5)]:
        probs = torch.softmax(logits / temperature, -1)
        if top_k:
            probs = torch.zeros_like(probs).scatter_(0, logits.topk(top_k).indices, probs[logits.topk(top_k).indices])
            probs /= probs.sum()
        ids = sample_rows(logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_k), seeds, steps,
                          top_k, top_k == 0)
        freq = torch.bincount(ids, minlength=len(logits)) / n
        assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt()).all(), (temperature, top_k, freq, probs)
    zeros = torch.zeros(4, dtype=torch.long)
    assert sample_rows(logits.expand(4, -1), torch.zeros(4), zeros, zeros, zeros, 0, False).tolist() == [5] * 4


def test_sample_rows_one_row_never_depends_on_the_others():
    """Each row alone (its own bounds) draws what it draws in a batch of rows with other settings."""
    g = torch.Generator().manual_seed(0)
    n, vocab = 24, 200
    logits = 3 * torch.randn(n, vocab, generator=g)
    temperature = torch.tensor([0.0, 0.7, 1.3] * 8)
    top_k = torch.tensor([0, 1, 5, 20, 0, 150] * 4)
    seeds, steps = torch.randint(0, 2**62, (n,), generator=g), torch.randint(0, 1000, (n,), generator=g)
    batch = sample_rows(logits, temperature, top_k, seeds, steps, 150, True).tolist()
    for i in range(n):
        sampling = temperature[i] > 0
        k_max, full = (int(top_k[i]), bool(top_k[i] == 0)) if sampling else (0, False)
        rows = slice(i, i + 1)
        alone = sample_rows(logits[rows], temperature[rows], top_k[rows], seeds[rows], steps[rows], k_max, full)
        assert alone.item() == batch[i]
    assert len(set(batch)) > n // 2


# ---- prefix cache and chunked prefill ------------------------------------------------------------------

def test_prefix_blocks_give_the_full_prefills_logits(model, tok):
    """Keys/values stored in the pool and copied into a new prompt's cache (a row of a batch cache, as the
    decoder prefills): the rest of that prompt gets the logits of prefilling it whole."""
    V = tok.get_vocab_size()
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, V, (23,), generator=g)
    b = torch.cat([a[:13], torch.randint(0, V, (6,), generator=g)])
    pool = PrefixCache(1 << 20, block_size=4)
    one = KVCache.for_model(model, 1, len(a))
    model(a[None], kv_cache=one)
    pool.store(a.tolist(), one.kv[:, :, 0])
    found = pool.match(b.tolist(), len(b) - 1)
    assert len(found) == 3  # 13 tokens shared: 3 full blocks of 4
    full = model(b[None])[0]
    row = RowCache(KVCache.for_model(model, 3, 32), 1)
    row.load(pool, found)
    assert row.get_pos() == 12
    # a prefill asks for the last position's logits only
    torch.testing.assert_close(model(b[None, 12:], kv_cache=row)[0], full[-1:], atol=KV_ATOL, rtol=0)
    assert row.get_pos() == len(b) and torch.equal(row.cache.kv[:, :, 0], torch.zeros_like(row.cache.kv[:, :, 0]))
    whole = KVCache.for_model(model, 1, len(b))
    model(b[None], kv_cache=whole)
    torch.testing.assert_close(row.kv()[:, :, :, :len(b)], whole.kv[:, :, 0], atol=KV_ATOL, rtol=0)


def copied(pool, found, n):
    kv = torch.zeros_like(pool.blocks[:, :, :, 0, :1]).expand(-1, -1, -1, n, -1).clone()
    pool.copy_into(found, kv)
    return kv


def test_prefix_cache_evicts_least_recently_used_leaves_first(model):
    """Hand-worked LRU: a pool of 4 blocks (2 tokens each) holds chain A = a0 a1 a2; chain B shares a0 and
    adds b1 b2. b2 needs room: the least recently used block is A's leaf a2, never the shared a0. A chain
    longer than the pool keeps its first blocks."""
    cfg = model.config
    L, H, D = cfg.n_layer, cfg.n_kv_head, cfg.n_embd // cfg.n_head
    block_bytes = L * 2 * H * 2 * D * 4
    pool = PrefixCache(4 * block_bytes, block_size=2)
    g = torch.Generator().manual_seed(0)
    kv_a, kv_b = torch.randn(L, 2, H, 6, D, generator=g), torch.randn(L, 2, H, 6, D, generator=g)
    kv_b[:, :, :, :2] = kv_a[:, :, :, :2]
    A, B = [1, 2, 3, 4, 5, 6], [1, 2, 7, 8, 9, 10]
    pool.store(A, kv_a)
    pool.store(B, kv_b)
    assert pool.counts["evictions"] == 1
    assert len(pool.match(A, 6)) == 2 and len(pool.match(B, 6)) == 3
    assert torch.equal(copied(pool, pool.match(B, 6), 6), kv_b)
    C = list(range(20, 30))  # 5 blocks into a pool of 4: everything else goes, C's first 4 blocks stay
    kv_c = torch.randn(L, 2, H, 10, D, generator=g)
    pool.store(C, kv_c)
    assert len(pool.match(C, 10)) == 4 and pool.match(A, 6) == [] and pool.match(B, 6) == []
    assert torch.equal(copied(pool, pool.match(C, 10), 8), kv_c[:, :, :, :8])
    stats = pool.stats()
    assert stats["blocks"] == stats["capacity_blocks"] == 4 and stats["evictions"] == 1 + 4


@pytest.mark.parametrize("pool_blocks", [1000, 3], ids=["roomy", "evicting"])
def test_prefix_cache_chats_match_the_uncached_path(model, tok, pool_blocks):
    """Two chats of three turns, interleaved, each turn sending the whole history (the previous prompt +
    reply + a new user turn) to a greedy and a seeded request: the same tokens with the cache as without,
    in a roomy pool (tokens saved hand-worked from the block size) and in one so small it keeps evicting."""
    cfg = model.config
    block_bytes = cfg.n_layer * 2 * cfg.n_kv_head * 4 * (cfg.n_embd // cfg.n_head) * 4
    plain = BatchDecoder(model, tok, max_batch=2)
    cached = BatchDecoder(model, tok, max_batch=2, prefix_cache_mb=pool_blocks * block_bytes / 2**20, prefix_block=4)
    histories = {d: {chat: list(p) for chat, p in zip("ab", prompts(tok)[1:])} for d in (plain, cached)}
    outs, saved = {plain: [], cached: []}, 0
    for turn in range(3):
        for chat in "ab":
            for d in (plain, cached):
                history = histories[d][chat]
                d.add("greedy", history, max_tokens=6, temperature=0.0)
                d.add("seeded", history, max_tokens=6, temperature=1.0, seed=turn)
                out = run_decoder(d)
                assert len(out["greedy"]) == 6  # no early stop: the counts below rely on it
                outs[d].append(out)
                if d is cached:
                    if turn > 0:  # greedy: the previous turn is cached, all but its reply's last token
                        saved += (len(history) - len(tok.encode(f" turn {turn}")) - 1) // 4 * 4
                    saved += (len(history) - 1) // 4 * 4  # seeded: the prompt greedy just prefilled (RL's N samples)
                history += out["greedy"] + tok.encode(f" turn {turn + 1}")
    assert outs[cached] == outs[plain]
    stats = cached.stats()["prefix_cache"]
    if pool_blocks == 1000:
        assert stats["tokens_saved"] == saved and stats["evictions"] == 0
        assert stats["lookups"] == 12 and stats["hits"] == 10  # every lookup but the two first greedy ones
    else:
        assert stats["evictions"] > 0 and stats["blocks"] <= 3


def test_prefix_cache_misses_after_new_weights(tok):
    """Weights loaded into the model in place: the pool is emptied, the hit counter does not move, and the
    tokens are the new model's."""
    model, other = random_model(tok.get_vocab_size(), seed=0), random_model(tok.get_vocab_size(), seed=1)
    decoder = BatchDecoder(model, tok, max_batch=2, prefix_cache_mb=1, prefix_block=4)
    p = prompts(tok)[2]
    for rid in ("first", "again"):
        decoder.add(rid, p, max_tokens=8, temperature=0.0)
        assert run_decoder(decoder)[rid] == naive_greedy(model, tok, p, 8)
    assert decoder.stats()["prefix_cache"]["hits"] == 1
    with torch.no_grad():
        model.load_state_dict(other.state_dict())
    decoder.add("new", p, max_tokens=8, temperature=0.0)
    assert run_decoder(decoder)["new"] == naive_greedy(other, tok, p, 8)
    stats = decoder.stats()["prefix_cache"]
    assert stats["hits"] == 1 and stats["lookups"] == 3


def test_chunked_prefill_keeps_the_batch_decoding(model, tok):
    """A 50-token prompt with prefill_chunk 10 loads over 5 steps (ceil(50 / 10)), while the running requests
    get a token in every one of them; its tokens are those of prefilling it whole."""
    a, b = tok.encode("Hi", prepend="<|bos|>"), tok.encode("Hello there", prepend="<|bos|>")
    assert len(a) + len(b) <= 10  # both fit in the first step's chunk
    long = tok.encode("many words " * 40, prepend="<|bos|>")[:50]
    decoder = BatchDecoder(model, tok, max_batch=3, prefill_chunk=10)
    decoder.add("a", a, max_tokens=20, temperature=0.0)
    decoder.add("b", b, max_tokens=20, temperature=0.0)
    assert sorted(e.request_id for e in decoder.step()) == ["a", "b"]
    decoder.add("long", long, max_tokens=6, temperature=0.0)
    steps = [decoder.step() for _ in range(5)]
    assert [sorted(e.request_id for e in events) for events in steps] == [["a", "b"]] * 4 + [["a", "b", "long"]]
    assert decoder.stats()["tokens_prefilled"] == len(a) + len(b) + 50
    first = [e.token for e in steps[-1] if e.request_id == "long"]
    assert first + run_decoder(decoder)["long"] == naive_greedy(model, tok, long, 6)
    with pytest.raises(ValueError, match="prefill_chunk"):
        BatchDecoder(model, tok, prefill_chunk=0)


def test_idle_decoder_prefills_whole_prompts(model, tok):
    """With nobody decoding there is nobody to stall: prompts arriving at an idle decoder are prefilled whole
    in one step whatever prefill_chunk (each samples its first token in it), and a newcomer is chunked
    again once they decode; the tokens are those of prefilling them alone."""
    ps = prompts(tok)
    assert len(ps[1]) > 4 and len(ps[2]) > 4
    decoder = BatchDecoder(model, tok, max_batch=3, prefill_chunk=4)
    decoder.add(1, ps[1], max_tokens=10, temperature=0.0)
    decoder.add(2, ps[2], max_tokens=10, temperature=0.0)
    first = decoder.step()
    assert [e.request_id for e in first] == [1, 2]
    assert decoder.stats()["tokens_prefilled"] == len(ps[1]) + len(ps[2])
    decoder.add(0, ps[2], max_tokens=3, temperature=0.0)  # 1 and 2 decode: 4 tokens per step
    steps = [decoder.step() for _ in range(-(-len(ps[2]) // 4))]
    assert [0 in [e.request_id for e in events] for events in steps] == [False] * (len(steps) - 1) + [True]
    out = {rid: [e.token for e in first + sum(steps, []) if e.request_id == rid] for rid in (0, 1, 2)}
    for rid, tokens in run_decoder(decoder).items():
        out[rid] += tokens
    assert out == {0: naive_greedy(model, tok, ps[2], 3), 1: naive_greedy(model, tok, ps[1], 10),
                   2: naive_greedy(model, tok, ps[2], 10)}


FREED_MEMORY_PROBE = """
import ctypes, json, resource
from nanochat.engine import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def faults(rounds=4, size=8 * 2**20):  # per round, three 8 MB blocks written then freed: a step's temporaries
    out = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        blocks = [libc.malloc(size) for _ in range(3)]
        for b in blocks:
            ctypes.memset(b, 1, size)
        for b in blocks:
            libc.free(b)
        out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    return out
print(json.dumps([faults(), keep_freed_memory(), faults()]))
"""


def test_keep_freed_memory_stops_refaulting_a_steps_temporaries(model, tok, monkeypatch):
    """In a fresh process, glibc's defaults hand three freed 8 MB blocks back to the kernel every round (each
    round faults its 24 MB in again: 6,144 pages of 4 KiB); after keep_freed_memory, rounds after the first
    reuse them (no fault). A CPU BatchDecoder calls it."""
    out = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    before, tuned, after = json.loads(out)
    pages = 3 * 8 * 2**20 // resource.getpagesize()
    assert tuned and min(before) > 0.9 * pages and after[1:] == [0] * (len(after) - 1), (before, after)
    calls = []
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: calls.append(1))
    BatchDecoder(model, tok, max_batch=1)
    assert calls == [1]


# ---- inference weights ---------------------------------------------------------------------------------

def test_inference_weights_are_bf16_on_gpus_only(model, tok):
    assert inference_dtype("cpu") == torch.float32
    assert inference_dtype("cuda", gpu_supports_bf16=True) == torch.bfloat16
    assert inference_dtype("cuda", gpu_supports_bf16=False) == torch.float16  # T4, V100
    assert inference_dtype("cuda", "fp32", gpu_supports_bf16=True) == torch.float32  # --precision wins
    half = cast_for_inference(copy.deepcopy(model), torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.rotary_cos.dtype == torch.float32
    x = torch.tensor([prompts(tok)[2]])
    full_logits, half_logits = model(x), half(x)
    assert half_logits.dtype == torch.float32
    torch.testing.assert_close(half_logits, full_logits, atol=0.05, rtol=0.05)

# ---- streaming text and the chat CLI -----------------------------------------------------------------

def test_text_stream_never_splits_characters(tok):
    text = "héllo wörld — 你好, 🙂!"
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens end mid-character: nothing printed for them yet


def test_chat_cli_prompt_mode(small_tokenizer, model):
    tok, _ = small_tokenizer
    tok.save(get_base_dir() / "tokenizer")
    save_checkpoint(checkpoint_dir("sft", "tiny"), 3, model, meta={"phase": "sft"}, tokenizer_fingerprint=tok.fingerprint())
    cmd = [sys.executable, "-m", "nanochat.chat_cli", "--prompt", "Hi there <|assistant_end|>", "--max-tokens", "8",
           "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) > 0


def test_chat_keeps_history_and_truncates_from_the_left(model, tok):
    chat = chat_cli.Chat(Engine(model, tok), max_tokens=6, temperature=0.0, top_k=None, seed=0)
    out = io.StringIO()
    chat.answer("Hi", out)
    first_turn = list(chat.tokens)
    assert first_turn[0] == tok.get_bos_token_id() and first_turn[-1] == tok.encode_special("<|assistant_end|>")
    chat.answer("And then?", out)
    assert chat.tokens[:len(first_turn)] == first_turn  # the history is kept
    chat.answer("word " * 200, out)  # far longer than the 64-token context: the oldest tokens go, BOS stays
    assert chat.tokens[0] == tok.get_bos_token_id() and len(chat.tokens) <= SEQ_LEN + 1
    chat.clear()
    assert chat.tokens == [tok.get_bos_token_id()]


def test_chat_cli_refuses_empty_prompt(capsys):
    assert chat_cli.main(["--prompt", "  "]) == 2 and "empty" in capsys.readouterr().err
