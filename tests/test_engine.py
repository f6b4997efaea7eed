"""nanochat.engine: KV cache with per-row positions, Engine (one prompt, N samples), BatchDecoder
(continuous batching), tool use, bad input; and the chat CLI end to end."""
import io
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from nanochat import chat_cli
from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.common import get_base_dir
from nanochat.engine import BatchDecoder, Engine, KVCache, TextStream
from nanochat.gpt import GPTConfig, create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 64
KV_ATOL = 1e-4


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

def test_batch_decoder_ragged_and_mid_flight_match_alone(model, tok):
    ps = prompts(tok)
    want = {i: naive_greedy(model, tok, p, 12) for i, p in enumerate(ps)}
    decoder = BatchDecoder(model, tok, max_batch=4, max_seq_len=SEQ_LEN)
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


def test_batch_decoder_seeded_sampling_is_per_request(model, tok):
    p = prompts(tok)[1]
    alone = BatchDecoder(model, tok, max_batch=4)
    alone.add("x", p, max_tokens=8, temperature=1.0, seed=5)
    together = BatchDecoder(model, tok, max_batch=4)
    together.add("other", prompts(tok)[0], max_tokens=8, temperature=1.0, seed=6)
    together.add("x", p, max_tokens=8, temperature=1.0, seed=5)
    got = run_decoder(together)
    assert got["x"] == run_decoder(alone)["x"] and got["x"] != got["other"]


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
