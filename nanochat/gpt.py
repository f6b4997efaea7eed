"""The GPT model: a decoder-only Transformer sized by one dial, depth.

Choices (each one is a small, well-tested idea; together they make a strong small model):
- rotary position embeddings (no learned positions), so the model can run past its training length;
- RMSNorm without learnable weights: pre-norm in each block, after the token embedding and before the head;
- QK-norm (queries and keys RMS-normed per head), which keeps attention logits tame without a tuned scale;
- ReLU^2 MLP with 4x expansion; no biases anywhere; untied embedding and head;
- grouped-query attention (n_kv_head <= n_head) to shrink the KV cache at inference;
- logits soft-capped at 15 in fp32; vocab padded to a multiple of 64 for fast matmuls (padded ids are cropped).

Build on the meta device, move to a real one, then initialize once:
    model = create_model(config, device)   # = meta build + to_empty + init_weights
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import get_dist_info

SOFTCAP = 15.0
VOCAB_PAD = 64


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


def apply_rotary(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + d/2]) by position-dependent angles. x: (B, T, H, D)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


@torch.compiler.assume_constant_result  # lets torch.compile treat it as a constant (no graph break)
def cuda_supports_bf16():
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def autocast_for(device):
    """bf16 autocast on GPUs that support it (tensor cores), plain fp32 elsewhere (CPU)."""
    use_bf16 = device.type == "cuda" and cuda_supports_bf16()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache, attn_mask=None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)
        # autocast may run the norm in fp32: bring q, k back to v's dtype (bf16 on GPU) so that attention
        # and the KV cache stay in one dtype
        q, k = q.to(v.dtype), k.to(v.dtype)
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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, attn_mask=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Rotary tables are derived data (not saved in checkpoints); init_weights fills them.
        self.register_buffer("rotary_cos", torch.empty(0), persistent=False)
        self.register_buffer("rotary_sin", torch.empty(0), persistent=False)

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
        with autocast_for(idx.device):
            x = norm(self.transformer.wte(idx))
            for block in self.transformer.h:
                x = block(x, cos, sin, kv_cache, attn_mask)
            if getattr(kv_cache, "last_logits_only", False):  # a prefill samples from its last position only
                x = x[:, -1:]
            logits = self.lm_head(norm(x))
        logits = logits[..., :self.config.vocab_size].float()  # padded ids are never predicted
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
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
                         adam_betas=(0.8, 0.95), muon_momentum=0.95, ns_dtype=torch.bfloat16):
        """AdamW for the embedding and the head (lr scaled by (n_embd/768)^-0.5: wider models want smaller
        steps there), Muon for every 2-D matrix in the blocks. Distributed versions when torch.distributed
        is initialized with more than one rank: they also average the gradients, so no DDP wrapper is used.
        Returns [adamw, muon]; every param group carries `initial_lr` for schedulers."""
        from nanochat.adamw import DistAdamW
        from nanochat.muon import DistMuon, Muon
        matrix_params = list(self.transformer.h.parameters())
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


def create_model(config: GPTConfig, device) -> GPT:
    """Build on the meta device (no memory, no wasted init), allocate on `device`, initialize once."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
