"""The GPT model: shapes, losses, padded vocab, learning, KV cache equivalence, sampling, sizing."""
import math

import pytest
import torch

from nanochat import gpt, precision
from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, create_model

VOCAB = 100  # pads to 128: the padded ids must never show up
KV_ATOL = 1e-4  # cached vs full forward in fp32: same math, different matmul shapes/reduction order


def tiny_config(**kw):
    return GPTConfig(**{**dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64), **kw})


def random_model(seed=0, **kw):
    """A tiny model with every weight random: the zero-initialized projections would hide attention bugs."""
    torch.manual_seed(seed)
    model = create_model(tiny_config(**kw), "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_forward_shapes_and_losses():
    model = random_model()
    assert model.lm_head.weight.shape[0] == 128 and model.config.padded_vocab_size == 128
    idx = torch.randint(0, VOCAB, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft cap
    targets = torch.randint(0, VOCAB, (3, 10))
    targets[0, :4] = -1  # ignored positions
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 10) and (per_token[0, :4] == 0).all() and (per_token[0, 4:] > 0).all()
    mean, total = model(idx, targets), model(idx, targets, loss_reduction="sum")
    torch.testing.assert_close(total, per_token.sum())
    torch.testing.assert_close(mean, per_token.sum() / 26)  # 30 positions minus 4 ignored
    ref = torch.nn.functional.cross_entropy(logits[targets != -1], targets[targets != -1])
    torch.testing.assert_close(mean, ref)


def test_init_is_complete_and_deterministic():
    a, b = (create_model(tiny_config(), "cpu") for _ in range(2))
    for p in a.parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all()
    assert (a.transformer.h[0].attn.c_proj.weight == 0).all() and (a.transformer.h[1].mlp.c_proj.weight == 0).all()
    torch.manual_seed(1)
    c = create_model(tiny_config(), "cpu")
    torch.manual_seed(1)
    d = create_model(tiny_config(), "cpu")
    assert all(torch.equal(x, y) for x, y in zip(c.parameters(), d.parameters()))
    assert not torch.equal(a.transformer.wte.weight, b.transformer.wte.weight)


def test_newton_schulz_runs_in_bf16_on_gpus_and_fp32_on_the_cpu():
    from torch._subclasses.fake_tensor import FakeTensorMode
    assert create_model(tiny_config(), "cpu").setup_optimizers()[1].ns_dtype == torch.float32
    with FakeTensorMode(), torch.device("cuda"):  # a CUDA model without a GPU
        assert GPT(tiny_config()).setup_optimizers()[1].ns_dtype == torch.bfloat16
    assert create_model(tiny_config(), "cpu").setup_optimizers(ns_dtype=torch.bfloat16)[1].ns_dtype == torch.bfloat16


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = create_model(tiny_config(n_layer=1), "cpu")
    optimizers = model.setup_optimizers(ns_dtype=torch.float32)
    assert [type(o).__name__ for o in optimizers] == ["AdamW", "Muon"]
    assert all("initial_lr" in g for o in optimizers for g in o.param_groups)
    idx = torch.randint(0, VOCAB, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    first = None
    for _ in range(30):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert abs(first - math.log(VOCAB)) < 0.1  # starts near uniform
    assert loss.item() < 0.1, loss.item()  # and memorizes the batch


@pytest.mark.parametrize("chunks", [[1] * 20, [5, 1, 7, 7], [20]])
def test_kv_cache_matches_full_forward(chunks):
    model = random_model()  # GQA: 4 query heads share 2 kv heads
    idx = torch.randint(0, VOCAB, (2, sum(chunks)))
    full = model(idx)
    cache = KVCache.for_model(model, batch_size=2, seq_len=4)  # too small on purpose: it must grow
    outs, start = [], 0
    for n in chunks:
        outs.append(model(idx[:, start:start + n], kv_cache=cache))
        start += n
    assert cache.get_pos() == idx.size(1) and cache.kv.size(4) >= idx.size(1)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=KV_ATOL, rtol=0)


def test_bf16_precision_path():
    """The GPU path (bf16 matmuls on fp32 master weights), exercised on CPU: bf16 activations and KV cache,
    fp32 logits, loss and gradients."""
    model = random_model()
    idx = torch.randint(0, VOCAB, (2, 12))
    fp32_logits = model(idx)
    model.set_precision("bf16")
    logits = model(idx)
    assert logits.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    cache = KVCache.for_model(model, batch_size=2, seq_len=12)
    cached = torch.cat([model(idx[:, :5], kv_cache=cache), model(idx[:, 5:], kv_cache=cache)], dim=1)
    assert cache.kv.dtype == torch.bfloat16
    torch.testing.assert_close(cached, logits, atol=0.1, rtol=0)  # bf16: ~2-3 significant digits
    diff = (logits - fp32_logits).abs().max()
    assert 0 < diff < 0.1  # it really ran in bf16, and close to fp32
    model.train()
    model(idx, idx).backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_resolve_precision(monkeypatch):
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    assert precision.resolve_precision(None, "cpu") == "fp32"
    assert precision.resolve_precision("auto", "cuda", gpu_supports_bf16=True) == "bf16"
    assert precision.resolve_precision("auto", "cuda", gpu_supports_bf16=False) == "fp16"  # T4, V100
    assert precision.resolve_precision("fp16", "cpu") == "fp16"  # explicit wins
    monkeypatch.setenv(precision.PRECISION_ENV, "bf16")
    assert precision.resolve_precision(None, "cpu") == "bf16"
    with pytest.raises(ValueError, match="NANOCHAT_PRECISION"):
        precision.resolve_precision("fp8", "cpu")


def plain_softcap_loss(h, weight, targets, vocab, reduction):
    """The head + softcap + cross-entropy written out with nothing chunked: every logit materialized."""
    logits = (h.float() @ weight[:vocab].float().T)
    logits = 15.0 * torch.tanh(logits / 15.0)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_equals_plain_loss_and_gradients(reduction):
    torch.manual_seed(0)
    vocab, padded = 300, 320
    h = torch.randn(37, 24, requires_grad=True)  # 37 rows: the last chunk of 8 is partial
    weight = torch.randn(padded, 24) * 0.7  # logits large enough for the softcap to bend them
    weight.requires_grad_(True)
    targets = torch.randint(0, vocab, (37,))
    targets[[0, 5, 36]] = -1
    want = plain_softcap_loss(h, weight, targets, vocab, reduction)
    want_grads = torch.autograd.grad(want, (h, weight))
    got = gpt.softcap_cross_entropy(h, weight, targets, vocab, reduction, chunk_rows=8)
    got_grads = torch.autograd.grad(got, (h, weight))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert (got_grads[1][vocab:] == 0).all()  # padded rows of the head get no gradient
    with torch.no_grad():  # per-row losses, as the bits-per-byte evaluation takes them
        none = gpt.softcap_cross_entropy(h, weight, targets, vocab, "none", chunk_rows=8)
    torch.testing.assert_close(none, plain_softcap_loss(h, weight, targets, vocab, "none"), rtol=1e-5, atol=1e-5)


def test_model_loss_is_the_same_chunked_or_plain():
    """The whole model: the chunked loss (default) and the plain one give the same loss and gradients."""
    model = random_model().train()
    idx = torch.randint(0, VOCAB, (2, 32))
    targets = idx.roll(-1, dims=1)
    results = []
    for chunk in (0, 5):
        model.loss_chunk_rows = chunk
        model.zero_grad()
        loss = model(idx, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_relu_squared_gradient():
    x = torch.randn(50, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(gpt.relu_squared(x).sum(), x)
    torch.testing.assert_close(gx, 2 * x.detach().clamp(min=0))


def test_kv_cache_prefill_into_batch():
    model = random_model()
    prompt = torch.randint(0, VOCAB, (1, 9))
    one = KVCache.for_model(model, batch_size=1, seq_len=16)
    model(prompt, kv_cache=one)
    many = KVCache.for_model(model, batch_size=3, seq_len=16)
    many.prefill(one)
    assert many.get_pos() == 9
    nxt = torch.randint(0, VOCAB, (3, 1))  # each row continues differently
    got = model(nxt, kv_cache=many)[:, -1]
    want = model(torch.cat([prompt.expand(3, -1), nxt], dim=1))[:, -1]
    torch.testing.assert_close(got, want, atol=KV_ATOL, rtol=0)


def test_generate_greedy_and_seeded_sampling():
    model = random_model()
    prompt = [1, 2, 3]
    greedy = list(model.generate(prompt, 6, temperature=0.0))
    ids = list(prompt)
    for _ in range(6):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert greedy == ids[3:]
    assert list(model.generate(prompt, 6, temperature=1.0, top_k=1)) == greedy
    a = list(model.generate(prompt, 12, temperature=1.0, seed=7))
    assert a == list(model.generate(prompt, 12, temperature=1.0, seed=7))
    assert a != list(model.generate(prompt, 12, temperature=1.0, seed=8))


def test_padded_vocab_ids_are_never_produced():
    model = random_model()
    with torch.no_grad():  # make the padding rows of the head win any argmax if they were not dropped
        model.lm_head.weight[VOCAB:] = 100 * model.transformer.wte.weight[:1].sign()
    assert model(torch.tensor([[1, 2]])).shape[-1] == VOCAB
    assert all(t < VOCAB for t in model.generate([1, 2], 10, temperature=0.0))
    assert all(t < VOCAB for t in model.generate([1, 2], 10, temperature=2.0))


def test_config_from_depth_and_counts():
    cfg = GPTConfig.from_depth(20, vocab_size=65536)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_layer) == (1280, 10, 10, 20)
    for depth in (1, 3, 5, 7):  # widths that 128 does not divide still give whole heads
        c = GPTConfig.from_depth(depth, vocab_size=50, head_dim=128)
        assert c.n_embd == 64 * depth and c.n_embd % c.n_head == 0
    tiny = GPTConfig.from_depth(4, vocab_size=VOCAB, sequence_len=64, head_dim=32, n_kv_head=2)
    assert (tiny.n_embd, tiny.n_head, tiny.n_kv_head) == (256, 8, 2)
    with torch.device("meta"):
        model = GPT(tiny)
    n = model.num_params()
    assert n["total"] == sum(p.numel() for p in model.parameters())
    assert n["wte"] == n["lm_head"] == 128 * 256
    d, kv = 256, 2 * 32  # per layer: q, proj (d x d), k, v (d x kv), MLP 2 x 4 d^2
    assert n["blocks"] == 4 * (2 * d * d + 2 * d * kv + 8 * d * d)
    assert model.estimate_flops() == 6 * (n["blocks"] + n["lm_head"]) + 12 * 4 * 8 * 32 * 64
