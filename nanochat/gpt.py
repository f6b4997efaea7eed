"""The GPT model: a decoder-only Transformer sized by one dial, depth.

Choices (each one is a small, well-tested idea; together they make a strong small model):
- rotary position embeddings (no learned positions), so the model can run past its training length;
- RMSNorm without learnable weights: pre-norm in each block, after the token embedding and before the head;
- QK-norm (queries and keys RMS-normed per head), which keeps attention logits tame without a tuned scale;
- ReLU^2 MLP with 4x expansion; no biases anywhere; untied embedding and head;
- grouped-query attention (n_kv_head <= n_head) to shrink the KV cache at inference;
- logits soft-capped at 15 in fp32; vocab padded to a multiple of 64 for fast matmuls (padded ids are cropped);
- precision is explicit, not autocast: weights are kept in fp32 (the master copy the optimizers update) and
  every matmul runs in the model's compute dtype (bf16 on GPUs, fp16 on older GPUs, fp32 on the CPU);
  norms, softcap and the loss run in fp32, the residual stream stays fp32. Being explicit makes the
  precision visible to a trace on fake tensors (the planner), which autocast is not without a GPU;
- the training loss never materializes the (B, T, vocab) logits: the head, softcap and cross-entropy run
  in row chunks that compute their gradients on the way (softcap_cross_entropy).

Build on the meta device, move to a real one, then initialize once:
    model = create_model(config, device)   # = meta build + to_empty + init_weights
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import get_dist_info
from nanochat.precision import PRECISIONS, resolve_precision

SOFTCAP = 15.0
VOCAB_PAD = 64
LOSS_CHUNK_ROWS = 1024  # rows of logits alive at once in the training loss: 1024 x 65536 fp32 = 256 MiB


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280

    @classmethod
    def from_depth(cls, depth, vocab_size, sequence_len=2048, head_dim=128, aspect_ratio=64, n_kv_head=None):
        """The one dial: width = aspect_ratio * depth; heads of about `head_dim` channels.
        When head_dim does not divide the width, take the head count nearest width/head_dim that does."""
        n_embd = aspect_ratio * depth
        target = max(1, round(n_embd / head_dim))
        n_head = min((h for h in range(1, n_embd + 1) if n_embd % h == 0), key=lambda h: (abs(h - target), h))
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)

    def to_dict(self):
        return asdict(self)

    @property
    def padded_vocab_size(self):
        return -(-self.vocab_size // VOCAB_PAD) * VOCAB_PAD


def norm(x):
    # RMSNorm with no learnable weight: one less thing to tune, and it costs nothing in quality here.
    return F.rms_norm(x, (x.size(-1),))


# attention goes through this name, so that a memory trace (nanochat.memory) can model the GPU's flash kernel
scaled_dot_product_attention = F.scaled_dot_product_attention


def apply_rotary(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + d/2]) by position-dependent angles. x: (B, T, H, D)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CastedLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose matmul runs in `compute_dtype` (None: the
    weight's own dtype): the fp32 master weight is cast on the fly, the input too."""
    compute_dtype = None

    def forward(self, x):
        dtype = self.compute_dtype or self.weight.dtype
        return F.linear(x.to(dtype), self.weight.to(dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = CastedLinear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = CastedLinear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = CastedLinear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = CastedLinear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache, attn_mask=None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        Tq = T
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # now all keys so far: (B, Hkv, Tk, D)
        Tk = k.size(2)
        if attn_mask is not None:
            mask, causal = attn_mask, False  # rows at different positions: GPT.forward built a per-row mask
        elif Tq == Tk:
            mask, causal = None, True  # plain training / prefill from an empty cache
        elif Tq == 1:
            mask, causal = None, False  # one new token sees everything cached
        else:
            # Tq new tokens after Tk - Tq cached ones: query i may see keys 0 .. (Tk - Tq) + i.
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            causal = False
        gqa = self.n_kv_head != self.n_head
        y = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = CastedLinear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = CastedLinear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class _ReluSquared(torch.autograd.Function):
    """relu(x)^2 that keeps only its output for the backward: d/dx = 2 relu(x) = 2 sqrt(output). The output
    is saved anyway (the next matmul's input), so the MLP keeps one (B, T, 4C) tensor instead of two: a
    fifth of a block's activations. sqrt(round(r^2)) is r to the output dtype's precision."""

    @staticmethod
    def forward(ctx, x):
        out = F.relu(x).square()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * 2 * out.sqrt()


def relu_squared(x):
    return _ReluSquared.apply(x)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, attn_mask=None):
        # cast the normed input once: q, k and v (c_fc alone in the MLP) share one low-precision copy
        dtype = self.mlp.c_fc.compute_dtype or x.dtype
        x = x + self.attn(norm(x).to(dtype), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(norm(x).to(dtype))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = CastedLinear(config.n_embd, config.padded_vocab_size, bias=False)
        # Rotary tables are derived data (not saved in checkpoints); init_weights fills them.
        self.register_buffer("rotary_cos", torch.empty(0), persistent=False)
        self.register_buffer("rotary_sin", torch.empty(0), persistent=False)
        self.compute_dtype = None  # set_precision(); None: the weights' dtype
        self.loss_chunk_rows = LOSS_CHUNK_ROWS  # 0: the plain loss, materializing every logit

    def set_precision(self, precision):
        """Run every matmul in this dtype ("bf16", "fp16", "fp32" or a torch dtype); the weights keep theirs."""
        dtype = PRECISIONS[precision] if isinstance(precision, str) else precision
        self.compute_dtype = dtype
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.compute_dtype = dtype
        return self

    @torch.no_grad()
    def init_weights(self):
        """All initialization in one place, run after `to_empty(device=...)`."""
        cfg = self.config
        torch.nn.init.normal_(self.transformer.wte.weight, std=1.0)  # a norm follows, so scale is free
        torch.nn.init.normal_(self.lm_head.weight, std=0.001)  # start near uniform predictions
        bound = 3 ** 0.5 * cfg.n_embd ** -0.5  # uniform with std 1/sqrt(fan_in)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                torch.nn.init.uniform_(lin.weight, -bound, bound)
            # Output projections start at zero: every block begins as the identity on the residual stream.
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        self.init_rotary()

    def init_rotary(self, length=None, base=10000.0):
        """(Re)compute the rotary tables; by default for 10x the training length, room for generation."""
        length = length or 10 * self.config.sequence_len
        head_dim = self.config.n_embd // self.config.n_head
        device = self.lm_head.weight.device
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        self.rotary_cos = freqs.cos()[None, :, None, :]  # (1, T, 1, D/2): broadcasts over batch and heads
        self.rotary_sin = freqs.sin()[None, :, None, :]

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """idx: (B, T) token ids. Returns logits (B, T, vocab_size) in fp32, or the loss when targets
        (B, T) are given (ignore index -1; reduction "mean", "sum" or "none" -> (B, T))."""
        B, T = idx.size()
        # tokens already cached = rotary offset of the first new token: an int when every row holds the
        # same number (training, prefill, lockstep sampling), else a (B,) tensor, one per row (on the CPU; on
        # the device for a static-shape cache)
        T0 = 0 if kv_cache is None else kv_cache.get_pos(B)
        # keys attention sees: up to the furthest row's end, or the length a static-shape cache fixes (its
        # positions stay on the device, unread: no host sync, so the step can be captured as a CUDA graph)
        end = getattr(kv_cache, "key_len", None) or (T0 if isinstance(T0, int) else int(T0.max())) + T
        if end > self.rotary_cos.size(1):  # generation ran past the tables: grow them (rare)
            self.init_rotary(2 * end)
        attn_mask = None
        if isinstance(T0, int):
            cos, sin = self.rotary_cos[:, T0:T0 + T], self.rotary_sin[:, T0:T0 + T]
        else:
            # Rows at different positions (continuous batching): each row gathers its own rotary angles, and
            # new token t of row b sees keys 0 .. T0[b] + t only; the cache slots past a row's end hold
            # another row's stale keys or nothing.
            positions = (T0[:, None] + torch.arange(T, device=T0.device)).to(idx.device)  # (B, T)
            cos, sin = self.rotary_cos[0, positions], self.rotary_sin[0, positions]  # (B, T, 1, D/2)
            attn_mask = (torch.arange(end, device=idx.device) <= positions[..., None])[:, None]  # (B, 1, T, end)
        x = norm(self.transformer.wte(idx))  # the residual stream stays in the weights' dtype (fp32 in training)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache, attn_mask)
        x = norm(x)
        if targets is None:
            if getattr(kv_cache, "last_logits_only", False):  # a prefill samples from its last position only
                x = x[:, -1:]
            logits = self.lm_head(x)[..., :self.config.vocab_size].float()  # padded ids are never predicted
            return SOFTCAP * torch.tanh(logits / SOFTCAP)
        dtype = self.compute_dtype or self.lm_head.weight.dtype
        loss = softcap_cross_entropy(x.reshape(B * T, -1).to(dtype), self.lm_head.weight, targets.reshape(-1),
                                     self.config.vocab_size, loss_reduction, self.loss_chunk_rows)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def num_params(self):
        """Parameter counts by group: embedding, head, transformer blocks, total."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "lm_head": self.lm_head.weight.numel(),
            "blocks": sum(p.numel() for p in self.transformer.h.parameters()),
        }
        counts["total"] = sum(counts.values())
        return counts

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward): 6 per weight that multiplies (the embedding is a
        lookup, so it is left out) plus the attention scores/values: 12 * layers * heads * head_dim * seq."""
        cfg = self.config
        n = self.num_params()
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * (n["total"] - n["wte"]) + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         adam_betas=(0.8, 0.95), muon_momentum=0.95, ns_dtype=None):
        """AdamW for the embedding and the head (lr scaled by (n_embd/768)^-0.5: wider models want smaller
        steps there), Muon for every 2-D matrix in the blocks. Distributed versions when torch.distributed
        is initialized with more than one rank: they also average the gradients, so no DDP wrapper is used.
        Muon's Newton-Schulz runs in `ns_dtype`, by default bf16 on GPUs (tensor cores) and fp32 on the CPU:
        CPUs without native bf16 emulate its matmuls (33x slower than fp32 on a 2-core AVX2 EPYC).
        Returns [adamw, muon]; every param group carries `initial_lr` for schedulers."""
        from nanochat.adamw import DistAdamW
        from nanochat.muon import DistMuon, Muon
        matrix_params = list(self.transformer.h.parameters())
        if ns_dtype is None:
            ns_dtype = torch.bfloat16 if matrix_params[0].device.type == "cuda" else torch.float32
        assert all(p.ndim == 2 for p in matrix_params)
        assert len(matrix_params) + 2 == len(list(self.parameters())), "every parameter needs an optimizer"
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            {"params": [self.lm_head.weight], "lr": unembedding_lr * scale},
            {"params": [self.transformer.wte.weight], "lr": embedding_lr * scale},
        ]
        adam_kwargs = dict(betas=tuple(adam_betas), eps=1e-10, weight_decay=weight_decay)
        world_size = get_dist_info()[3]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and world_size > 1
        if distributed:
            adamw = DistAdamW(adam_groups, **adam_kwargs)
            muon = DistMuon(matrix_params, lr=matrix_lr, momentum=muon_momentum, ns_dtype=ns_dtype)
        else:
            fused = self.lm_head.weight.device.type in ("cuda", "cpu")  # one kernel: ~10x faster on CPU too
            adamw = torch.optim.AdamW(adam_groups, fused=fused, **adam_kwargs)
            muon = Muon(matrix_params, lr=matrix_lr, momentum=muon_momentum, ns_dtype=ns_dtype)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive reference sampler: re-runs the whole sequence for every new token (no KV cache).
        Yields token ids one at a time. temperature 0 means greedy."""
        assert isinstance(tokens, list)
        device = self.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            next_id = sample_next_token(logits, rng, temperature, top_k)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()


def softcap_cross_entropy(h, weight, targets, vocab_size, reduction="mean", chunk_rows=LOSS_CHUNK_ROWS):
    """Cross-entropy of softcapped logits, SOFTCAP * tanh(h @ weight[:vocab_size].T / SOFTCAP) in fp32, against
    targets (-1: ignored). h: (N, C) in the compute dtype; weight: the head's (padded_vocab, C) parameter.
    reduction "mean" (over non-ignored targets), "sum" or "none" ((N,) losses, 0 where ignored).

    chunk_rows > 0: the rows go through in chunks of chunk_rows, and when gradients are wanted each chunk's
    gradients for h and the weight are computed right there, from its probabilities, so that no (N, vocab)
    tensor ever exists and backward only scales the stored gradients. The math is the plain path's (up to
    summation order); chunk_rows 0 is the plain path (every logit materialized, autograd does the rest)."""
    grad_wanted = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if chunk_rows <= 0 or (reduction == "none" and grad_wanted):  # per-row grads need the autograd graph
        logits = F.linear(h, weight[:vocab_size].to(h.dtype)).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)
    return _chunked_softcap_cross_entropy(h, weight, targets, vocab_size, reduction, chunk_rows)


@torch.compiler.disable  # a loop of big matmuls: nothing to fuse, and unrolling it would only slow compiling
def _chunked_softcap_cross_entropy(h, weight, targets, vocab_size, reduction, chunk_rows):
    return _ChunkedSoftcapCE.apply(h, weight, targets, vocab_size, reduction, chunk_rows)


class _ChunkedSoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, reduction, chunk_rows):
        w = weight[:vocab_size].to(h.dtype)
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = targets >= 0
        # d loss / d row loss: 1 / (non-ignored targets) for the mean, 1 for the sum (a tensor: no host sync)
        scale = 1.0 / valid.sum() if reduction == "mean" else torch.ones((), device=h.device)
        losses = torch.zeros(h.size(0), dtype=torch.float32, device=h.device)
        if grads:
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            hc, tc, vc = h[rows], targets[rows].clamp(min=0)[:, None], valid[rows]
            # two (n, vocab) fp32 buffers at a time: tanh of the scaled logits, and their exponentials. The
            # softcap bounds the logits to +-15, so exp cannot overflow and needs no max subtracted
            capped = F.linear(hc, w).float().div_(SOFTCAP).tanh_()
            g = (capped * SOFTCAP).exp_()
            sumexp = g.sum(dim=-1)
            losses[rows] = torch.where(vc, sumexp.log() - SOFTCAP * capped.gather(1, tc)[:, 0], 0.0)
            if grads:
                # d loss / d logit = softmax - onehot(target); through the softcap, times 1 - tanh^2
                g.div_(sumexp[:, None])
                g.scatter_add_(1, tc, -torch.ones_like(tc, dtype=g.dtype))
                g.mul_(capped.square_().neg_().add_(1)).mul_((vc * scale)[:, None])
                capped = None  # freed before g's low-precision copy is made
                g = g.to(h.dtype)
                grad_h[rows] = g @ w
                grad_w[:vocab_size] += (hc.T @ g).float().T  # (C, vocab): no transposed copy of g
            del g, capped  # before the next chunk allocates its own
        if grads:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        if reduction == "none":
            return losses
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """One id per row from logits (B, V): greedy at temperature 0, else from softmax(logits / temperature)
    restricted to the top_k most likely ids when top_k is given. Returns (B, 1)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        choice = torch.multinomial(F.softmax(vals / temperature, dim=-1), 1, generator=rng)
        return idx.gather(-1, choice)
    return torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng)


def create_model(config: GPTConfig, device, precision=None) -> GPT:
    """Build on the meta device (no memory, no wasted init), allocate on `device`, initialize once; matmuls in
    `precision` (default: resolve_precision's auto for the device)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model.set_precision(resolve_precision(precision, torch.device(device).type))
