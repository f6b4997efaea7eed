"""Inference helpers. KVCache: the key/value cache that GPT.forward reads and writes.

KV cache protocol (what GPT.forward relies on):
- `get_pos()` is the number of tokens already in the cache: the rotary offset of the next token fed in.
- each attention layer calls `insert_kv(layer_idx, k, v)` with its new keys/values (B, n_kv_head, T_new,
  head_dim) and gets back all keys/values so far, (B, n_kv_head, pos + T_new, head_dim);
- the position advances once the last layer has inserted, so every layer of one forward sees the same offset.
Feeding T_new > 1 tokens at a non-zero offset works (chunked prefill, or appending a forced sequence):
the model masks each new query to the cached keys plus the new keys at or before it.

Positions are shared by the batch: every row holds the same number of tokens, which is what sampling
several continuations of one prompt needs (prefill once at batch 1, `prefill()` into a batch-N cache,
decode in lockstep). Per-row positions (rows of different lengths, continuous batching) would turn `pos`
into a (B,) tensor: the model would then gather rotary rows per batch row and build a (B, 1, T_new, T_k)
mask hiding each row's unused slots; `insert_kv` would scatter at per-row offsets. Nothing else changes.
"""
import torch


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, 2, B, n_kv_head, T, head_dim).
    Storage is allocated on the first insert, with the device and dtype of the keys the model produces
    (bf16 under autocast on GPU, fp32 on CPU), and grows when a sequence outgrows it."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):
        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv = None
        self.pos = 0

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        cfg = model.config
        return cls(batch_size, cfg.n_kv_head, seq_len, cfg.n_embd // cfg.n_head, cfg.n_layer)

    def reset(self):
        self.pos = 0

    def get_pos(self):
        return self.pos

    def _ensure_capacity(self, length, like):
        if self.kv is None:
            self.kv = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
        capacity = self.kv.size(4)
        if length > capacity:
            # grow to the next multiple of 1024 above twice what is needed now: few reallocations
            new_capacity = -(-max(length, 2 * capacity) // 1024) * 1024
            extra = list(self.kv.shape)
            extra[4] = new_capacity - capacity
            self.kv = torch.cat([self.kv, self.kv.new_zeros(extra)], dim=4)
            self.shape = tuple(self.kv.shape)

    def insert_kv(self, layer_idx, k, v):
        B, H, T_new, D = k.size()
        start, end = self.pos, self.pos + T_new
        self._ensure_capacity(end, k)
        self.kv[layer_idx, 0, :, :, start:end] = k
        self.kv[layer_idx, 1, :, :, start:end] = v
        if layer_idx == self.kv.size(0) - 1:  # last layer: the whole forward has written these tokens
            self.pos = end
        return self.kv[layer_idx, 0, :, :, :end], self.kv[layer_idx, 1, :, :, :end]

    def prefill(self, other):
        """Copy a batch-1 cache (a prompt prefilled once) into every row of this batch-N cache."""
        assert other.kv is not None, "the source cache is empty"
        L, _, B, H, _, D = self.shape
        oL, _, oB, oH, _, oD = other.kv.shape
        assert (L, H, D) == (oL, oH, oD), f"caches differ in layers/heads/head_dim: {self.shape} vs {other.kv.shape}"
        assert oB in (1, B), f"can only prefill from batch 1 (or the same batch), got {oB}"
        self._ensure_capacity(other.pos, other.kv)
        self.kv[:, :, :, :, :other.pos] = other.kv[:, :, :, :, :other.pos]  # broadcasts batch 1 -> B
        self.pos = other.pos
