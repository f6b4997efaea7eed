"""Inference: the KV caches, the Engine (one prompt, N samples) and the BatchDecoder (many requests that
join and leave a running batch: continuous batching, driven by the serving layer), with its prefix cache,
chunked prefill, per-request sampler and a static-shape decode step that CUDA graphs can capture.

KV cache protocol (what GPT.forward relies on), for a forward of B rows and T new tokens per row:
- `get_pos(B)` is the number of tokens already cached in each of the cache's first B rows, which is the
  rotary offset of each row's next token: an int when all B rows hold the same number (a prefill, N
  samples in lockstep: plain slices, no mask), else a (B,) tensor, one per row (on the CPU for KVCache,
  on the model's device for StaticKVCache);
- each attention layer calls `insert_kv(layer_idx, k, v)` with its new keys/values (B, n_kv_head, T,
  head_dim), written at each row's own offset, and gets back the keys/values of positions 0 .. end - 1 of
  those rows, where end is max(pos) + T, or the cache's `key_len` when it has one (StaticKVCache: a length
  the caller fixes, so that no shape depends on the positions). Past a row's own end these slots hold
  stale keys (or zeros), so when rows differ the model masks them out: new token t of row b sees keys
  0 .. pos[b] + t;
- positions advance once the last layer has inserted, so every layer of one forward sees the same offsets;
- a cache with `last_logits_only` set gets logits for the last position only, (B, 1, vocab): a prefill
  samples from nothing else, and the head over every prompt position is most of a small model's prefill.
A forward of B rows uses the cache's first B rows: a KVCache decoder keeps its live rows packed at the top
(`remove_row` moves the last live row into a freed one) and forwards only those; a StaticKVCache is always
forwarded whole (fixed slots; free ones compute filler nobody reads).

Tool use: when a sequence emits <|python_start|>, its tokens up to <|python_end|> are evaluated by the
calculator, and <|output_start|> result <|output_end|> is forced into that sequence one token per step
(mask 0: the tool wrote them, not the model) before it samples again. A failed evaluation injects nothing.
Every token appended to a sequence, sampled or forced, counts toward max_tokens.
"""
import codecs
import ctypes
import hashlib
import operator
from array import array
from collections import OrderedDict, deque
from typing import NamedTuple

import torch

from nanochat.calculator import evaluate
from nanochat.gpt import sample_next_token
from nanochat.precision import inference_dtype

KEY_LEN_STEP = 256  # a static decode step reads keys up to the longest row, rounded up to this: few graphs
# glibc malloc settings for a CPU decoder (mallopt's parameter numbers, then the values): see keep_freed_memory
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc takes (half its 64 MiB heap): blocks below come from the heap
TRIM_THRESHOLD = 256 * 2**20  # free memory at a heap's top kept, not handed back to the kernel
_malloc_tuned = None


def keep_freed_memory():
    """Have glibc's malloc keep and reuse the memory a decode step frees, once per process (True when it took).
    By default it maps blocks above a threshold afresh at every allocation, and hands free memory at a heap's
    top back to the kernel past another (both thresholds move with what the process did before), so a step's
    temporaries (B x vocab logits: 8 MB at 32 rows and a 65k vocabulary) could come back as fresh pages to
    fault in one by one at every step: measured 5,800 minor faults per 32-row step, 40% more CPU time per
    step, on one decoder and not another in the same process (bench/serve_engine's clients scenario).
    Process-wide; no-op where there is no mallopt (not glibc)."""
    global _malloc_tuned
    if _malloc_tuned is None:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        _malloc_tuned = bool(mallopt and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                             and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _malloc_tuned


def cast_for_inference(model, dtype=None):
    """Hold the model's weights in `dtype` (default: inference_dtype of their device), in place; the rotary
    tables are rebuilt in fp32 (positions need the precision); the matmuls run in `dtype` too. Returns the
    model, in eval mode."""
    dtype = dtype or inference_dtype(_device(model))
    model.to(dtype=dtype)
    model.init_rotary()
    model.set_precision(dtype)
    return model.eval()


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, 2, B, n_kv_head, T, head_dim), plus the
    number of tokens each row holds. Storage is allocated on the first insert, with the device and dtype
    of the keys the model produces (bf16 under autocast on GPU, fp32 on CPU), and grows when a sequence
    outgrows it. Positions live on the CPU: the host decides what each row is fed, so reading them never
    waits on the GPU. last_logits_only: see the protocol above (for prefills)."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, last_logits_only=False):
        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.last_logits_only = last_logits_only
        self.kv = None
        self.pos = torch.zeros(batch_size, dtype=torch.long)  # tokens cached, per row
        self._write = None  # where this forward's new keys go, worked out by layer 0 for every layer

    @classmethod
    def for_model(cls, model, batch_size, seq_len, last_logits_only=False):
        cfg = model.config
        return cls(batch_size, cfg.n_kv_head, seq_len, cfg.n_embd // cfg.n_head, cfg.n_layer, last_logits_only)

    def reset(self):
        self.pos.zero_()

    def get_pos(self, rows=None):
        """Tokens cached in the first `rows` rows (default: all): an int when they agree, else a (rows,) tensor."""
        pos = self.pos[:rows]
        first = int(pos[0])
        return first if bool((pos == first).all()) else pos.clone()

    def reserve(self, length, like):
        """Storage for at least `length` positions (allocated with the dtype and device of `like`)."""
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
        B, H, T, D = k.size()
        if layer_idx == 0:
            pos = self.get_pos(B)
            if isinstance(pos, int):  # rows in lockstep: one slice
                self._write = (pos, pos + T)
            else:  # each row at its own offset: scatter through (row, position) index pairs
                rows = torch.arange(B, device=k.device)[:, None]
                cols = (pos[:, None] + torch.arange(T)).to(k.device)
                self._write = ((rows, cols), int(pos.max()) + T)
            self.reserve(self._write[1], k)
        where, end = self._write
        for i, new in enumerate((k, v)):
            if isinstance(where, int):
                self.kv[layer_idx, i, :B, :, where:end] = new
            else:  # advanced indices around a slice put their dims first: the values go in as (B, T, H, D)
                self.kv[layer_idx, i][where[0], :, where[1]] = new.transpose(1, 2)
        if layer_idx == self.kv.size(0) - 1:  # last layer: the whole forward has written these tokens
            self.pos[:B] += T
        return self.kv[layer_idx, 0, :B, :, :end], self.kv[layer_idx, 1, :B, :, :end]

    def prefill(self, other, row=None):
        """Copy a batch-1 cache (a prompt prefilled once) into every row of this cache, or into `row` only
        (a request joining a running batch); the rows copied into then hold exactly the other's tokens."""
        assert other.kv is not None, "the source cache is empty"
        n = other.get_pos()
        assert isinstance(n, int), "the source cache's rows hold different numbers of tokens"
        L, _, B, H, _, D = self.shape
        oL, _, oB, oH, _, oD = other.kv.shape
        assert (L, H, D) == (oL, oH, oD), f"caches differ in layers/heads/head_dim: {self.shape} vs {other.kv.shape}"
        assert oB == 1 or (row is None and oB == B), f"can only prefill from batch 1 (or the same batch), got {oB}"
        self.reserve(n, other.kv)
        rows = slice(None) if row is None else slice(row, row + 1)
        self.kv[:, :, rows, :, :n] = other.kv[:, :, :, :, :n]  # broadcasts batch 1 -> B
        self.pos[rows] = n

    def remove_row(self, row, rows):
        """Free `row` among the first `rows` live rows: the last live row moves into it (keys and values
        copied), so the live rows stay packed at 0 .. rows - 2."""
        last = rows - 1
        if row != last:
            n = int(self.pos[last])
            self.kv[:, :, row, :, :n] = self.kv[:, :, last, :, :n]
            self.pos[row] = n
        self.pos[last] = 0


class StaticKVCache:
    """A KV cache of fixed shapes, for a decode step captured once and replayed (CUDA graphs): batch_size
    slots of seq_len positions, allocated at the first write (with the dtype and device of the keys) and
    never grown. Positions and the mask of slots in use (`active`) live on the device and are written by the
    caller; so is `key_len`, how many positions attention reads (the caller knows every row's length
    without reading the device). A free slot sits at the last position, which no token of a request ever
    occupies (a request ends before its sequence fills the cache): its filler overwrites nothing, not even a
    prompt being prefilled into that slot between steps."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device):
        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv = None
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.active = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.key_len = seq_len
        self._index = None  # where this forward's new keys go, worked out by layer 0 for every layer

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        cfg = model.config
        return cls(batch_size, cfg.n_kv_head, seq_len, cfg.n_embd // cfg.n_head, cfg.n_layer, _device(model))

    def get_pos(self, rows=None):
        assert rows in (None, self.shape[2]), f"a static cache forwards all its {self.shape[2]} slots, not {rows}"
        return self.pos

    def reserve(self, length, like):
        assert length <= self.shape[4], f"{length} positions do not fit a static cache of {self.shape[4]}"
        if self.kv is None:
            self.kv = torch.zeros(self.shape, dtype=like.dtype, device=like.device)

    def insert_kv(self, layer_idx, k, v):
        B, H, T, D = k.size()
        if layer_idx == 0:
            self.reserve(0, k)
            cols = self.pos[:, None] + torch.arange(T, device=k.device)  # (B, T), on the device
            self._index = cols[:, None, :, None].expand(B, H, T, D)
        self.kv[layer_idx, 0].scatter_(2, self._index, k)
        self.kv[layer_idx, 1].scatter_(2, self._index, v)
        if layer_idx == self.kv.size(0) - 1:
            self.pos.add_(self.active * T)
        return self.kv[layer_idx, 0, :, :, :self.key_len], self.kv[layer_idx, 1, :, :, :self.key_len]



class RowCache:
    """One row of a batch cache (KVCache or StaticKVCache) seen as a batch-1 cache at its own position (the
    protocol above): a prompt is prefilled, and its cached prefix copied, straight into the row its request
    then decodes from. A prefill samples from its last position only (last_logits_only)."""
    last_logits_only = True

    def __init__(self, cache, row):
        self.cache, self.row, self.pos = cache, row, 0

    def get_pos(self, rows=None):
        return self.pos

    def kv(self):
        """This row's keys and values: (n_layer, 2, n_kv_head, positions, head_dim)."""
        return self.cache.kv[:, :, self.row]

    def insert_kv(self, layer_idx, k, v):
        end = self.pos + k.size(2)
        self.cache.reserve(end, k)
        kv = self.cache.kv[layer_idx, :, self.row:self.row + 1]  # (2, 1, n_kv_head, positions, head_dim)
        kv[0, :, :, self.pos:end] = k
        kv[1, :, :, self.pos:end] = v
        if layer_idx == self.cache.kv.size(0) - 1:
            self.pos = end
        return kv[0, :, :, :end], kv[1, :, :, :end]

    def load(self, pool, found):
        """Start from those PrefixCache blocks: the row then holds their tokens."""
        self.pos = len(found) * pool.block_size
        self.cache.reserve(self.pos, pool.blocks)
        pool.copy_into(found, self.kv())


class PrefixCache:
    """Keys and values of recent sequences, for the prompts that start the same way (the previous turn of a
    chat, a shared system prompt, N samples of one problem, few-shot prefixes): blocks of `block_size`
    tokens, each found by a hash of every token up to its end (chained, so a block is only ever reached
    through the blocks before it), in a pool of at most `max_bytes` where the least recently used block
    goes first. A chain is touched from its last block back to its first, so a block is always more recent
    than its descendants and eviction takes leaves first: it never strands a chain. Hits are copied out into
    the request's own cache, never shared, so eviction cannot touch a running request.

    Counters: lookups (prompts looked up), hits (prompts that found at least one block), tokens_looked_up
    (their tokens), tokens_saved (prompt tokens copied from the pool instead of prefilled), evictions;
    hit_rate = tokens_saved / tokens_looked_up."""

    def __init__(self, max_bytes, block_size=16):
        self.max_bytes, self.block_size = int(max_bytes), block_size
        # (n_layer, 2, n_kv_head, num_blocks, block_size, head_dim), at the first store: the cache's layout
        # with positions cut into blocks, so the blocks of a hit gather into one sequence with no reshuffle
        self.blocks = None
        self.index = OrderedDict()  # chained hash -> block number, least recently used first
        self.free = []
        self.counts = dict(lookups=0, hits=0, tokens_looked_up=0, tokens_saved=0, evictions=0)

    def _keys(self, tokens, n_blocks):
        keys, key, bs = [], b"", self.block_size
        for i in range(n_blocks):
            key = hashlib.blake2b(key + array("q", tokens[i * bs:(i + 1) * bs]).tobytes(), digest_size=16).digest()
            keys.append(key)
        return keys

    def _touch(self, keys):
        for key in reversed(keys):  # the first block last: ancestors stay more recent than their descendants
            self.index.move_to_end(key)

    def match(self, tokens, limit):
        """Block numbers of the longest cached prefix of tokens[:limit], in order (covering len * block_size
        tokens); counts the lookup."""
        keys = self._keys(tokens, limit // self.block_size) if self.blocks is not None else []
        found = []
        for key in keys:
            if key not in self.index:
                break
            found.append(self.index[key])
        self._touch(keys[:len(found)])
        c = self.counts
        c["lookups"] += 1
        c["hits"] += bool(found)
        c["tokens_looked_up"] += len(tokens)
        c["tokens_saved"] += len(found) * self.block_size
        return found

    def copy_into(self, found, kv):
        """Copy those blocks, as one sequence, to the start of kv (n_layer, 2, n_kv_head, positions, head_dim):
        one pass, a slice per run of consecutive block numbers (a chain's blocks mostly are)."""
        runs = []  # [first block number, count]
        for b in found:
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1][1] += 1
            else:
                runs.append([b, 1])
        bs, start = self.block_size, 0
        for first, count in runs:
            kv[:, :, :, start * bs:(start + count) * bs] = self.blocks[:, :, :, first:first + count].flatten(3, 4)
            start += count

    def store(self, tokens, kv):
        """Keep the full blocks of `tokens`, whose keys and values are kv[:, :, :, :len(tokens)] (kv:
        (n_layer, 2, n_kv_head, >= len(tokens), head_dim)); blocks already here are only touched."""
        L, _, H, _, D = kv.shape
        bs = self.block_size
        if self.blocks is None:
            block_bytes = L * 2 * H * bs * D * kv.element_size()
            self.blocks = kv.new_empty((L, 2, H, self.max_bytes // block_bytes, bs, D))
            self.free = list(range(self.blocks.size(3)))[::-1]
        keys = self._keys(tokens, min(len(tokens) // bs, self.blocks.size(3)))
        chain = set(keys)
        self._touch([key for key in keys if key in self.index])  # this chain's blocks are the last to go
        new = []  # (block index in the sequence, block number in the pool)
        for i, key in enumerate(keys):
            if key in self.index:
                continue
            if not self.free:
                oldest = next(iter(self.index))
                if oldest in chain:  # the pool holds nothing but this chain: keep its first blocks
                    keys = keys[:i]
                    break
                self.free.append(self.index.pop(oldest))
                self.counts["evictions"] += 1
            self.index[key] = self.free.pop()
            new.append((i, self.index[key]))
        if new:
            sequence = kv[:, :, :, :len(keys) * bs].unflatten(3, (len(keys), bs))  # (L, 2, H, blocks, block, D)
            where, slots = (torch.tensor(x, device=kv.device) for x in zip(*new))
            self.blocks[:, :, :, slots] = sequence[:, :, :, where]
        self._touch(keys)

    def clear(self):
        self.index.clear()
        if self.blocks is not None:
            self.free = list(range(self.blocks.size(3)))[::-1]

    def stats(self):
        c = self.counts
        capacity = 0 if self.blocks is None else self.blocks.size(3)
        mb = 0.0 if self.blocks is None else self.blocks.numel() * self.blocks.element_size() / 2**20
        return {**c, "hit_rate": round(c["tokens_saved"] / c["tokens_looked_up"], 4) if c["tokens_looked_up"] else 0.0,
                "blocks": len(self.index), "capacity_blocks": capacity, "block_size": self.block_size,
                "mb": round(mb, 1), "max_mb": round(self.max_bytes / 2**20, 1)}


# ---- per-request sampling in one batched op ------------------------------------------------------------
# Philox-2x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC11), a counter-based RNG:
# random numbers are a pure function of (key, counter), so each request draws from its own stream
# (key: its seed, counter: its step) with no generator state, in one vectorized op for the whole batch.
PHILOX_M, PHILOX_W, MASK32 = 0xD256D193, 0x9E3779B9, 0xFFFFFFFF


def philox_2x32(c0, c1, key, rounds=10):
    """Philox-2x32 on int64 tensors holding 32-bit words (elementwise). The 32x32-bit product needs 64 bits:
    it wraps in int64 (two's complement), and its words are read back with shifts and masks."""
    for _ in range(rounds):
        product = c0 * PHILOX_M
        c0, c1 = ((product >> 32) & MASK32) ^ key ^ c1, product & MASK32
        key = (key + PHILOX_W) & MASK32
    return c0, c1


def philox_uniform(seeds, steps):
    """One float64 in [0, 1) per row from (seed, step), int64 tensors: counter (step, seed's high word),
    key the seed's low word; the 53 top bits of the two output words make the fraction."""
    c0, c1 = philox_2x32(steps & MASK32, (seeds >> 32) & MASK32, seeds & MASK32)
    return ((c0 << 21) | (c1 >> 11)).double() * 2.0 ** -53


def _inverse_cdf(weights, u):
    """Per row, the first index whose running sum of weights passes u times the row's total (fp64 sums:
    the tail of 65k small probabilities keeps its mass)."""
    cdf = weights.double().cumsum(-1)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0].clamp_(max=weights.size(-1) - 1)


def sample_rows(logits, temperature, top_k, seeds, steps, k_max, full):
    """One id per row of logits (B, V), each row by its own settings (tensors of B): temperature 0 is
    greedy (argmax); otherwise a draw from softmax(logits / temperature), restricted to the row's top_k most
    likely ids when top_k > 0 (0: the whole vocabulary). The draw inverts the row's cumulative distribution
    at one uniform from philox_uniform(seed, step), so a row's token depends on its own logits, seed and step
    only, never on the other rows. k_max (at least the largest top_k of a sampling row, 0 if none has one)
    and full (whether some sampling row uses the whole vocabulary) are plain ints: every shape is fixed by
    them, with no host sync, so the step can be captured as a CUDA graph."""
    ids = logits.argmax(dim=-1)
    sampling = temperature > 0
    if not (k_max or full):
        return ids
    u = philox_uniform(seeds, steps)
    t = torch.where(sampling, temperature, 1.0)[:, None]
    if k_max:
        vals, idx = logits.topk(k_max, dim=-1)  # sorted, largest first
        keep = torch.arange(k_max, device=logits.device) < top_k[:, None]
        pick = _inverse_cdf(torch.where(keep, ((vals - vals[:, :1]) / t).exp(), 0.0), u)
        pick = torch.minimum(pick, (top_k - 1).clamp(min=0))  # never past the row's own k, even at u -> 1
        ids = torch.where(sampling & (top_k > 0), idx.gather(-1, pick[:, None])[:, 0], ids)
    if full:
        weights = ((logits - logits.max(dim=-1, keepdim=True).values) / t).exp()
        ids = torch.where(sampling & (top_k == 0), _inverse_cdf(weights, u), ids)
    return ids


class _Tools:
    """The special tokens that steer generation, and the calculator tool behind <|python_start|>."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        sp = tokenizer.encode_special
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.terminal = {sp("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def run(self, expr_ids):
        """The tokens to force after a tool call: its result wrapped in output tokens, or none if it failed."""
        result = evaluate(self.tokenizer.decode(expr_ids))
        if result is None:
            return []
        return [self.output_start, *self.tokenizer.encode(result), self.output_end]


class _Row:
    """One sequence being generated: tool-output tokens waiting to be forced in, an open python block."""

    def __init__(self, tools):
        self.tools = tools
        self.forced = deque()
        self.expr = None  # token ids since <|python_start|> while a tool call is open
        self.last = None  # the last token appended: what the model is fed next
        self.done = False  # emitted <|assistant_end|> or <|bos|>

    def next_token(self, sampled):
        """Append the next token: a queued forced one (mask 0) if any, else `sampled` (mask 1)."""
        token, mask = (self.forced.popleft(), 0) if self.forced else (sampled, 1)
        tools = self.tools
        if token in tools.terminal:
            self.done = True
        elif token == tools.python_start:
            self.expr = []
        elif self.expr is not None:
            if token == tools.python_end:
                self.forced.extend(tools.run(self.expr))
                self.expr = None
            else:
                self.expr.append(token)
        self.last = token
        return token, mask


def _device(model):
    return next(model.parameters()).device


def check_prompt(tokens, vocab_size, max_len):
    """A prompt as a list of ints, or ValueError saying what is wrong with it."""
    try:
        tokens = [operator.index(t) for t in tokens]
    except TypeError:
        raise ValueError("the prompt must be a list of token ids (ints)") from None
    if not tokens:
        raise ValueError("the prompt is empty: it needs at least one token (e.g. <|bos|>)")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
    if len(tokens) > max_len:
        raise ValueError(f"the prompt has {len(tokens)} tokens; at most {max_len} fit in the context: "
                         f"truncate it first (e.g. from the left, keeping <|bos|>)")
    return tokens


def check_sampling(temperature, top_k):
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not (isinstance(top_k, int) and top_k > 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")


class Engine:
    """Samples N continuations of one prompt together: the prompt is prefilled once (batch 1), its KV cache
    copied into N rows, and the rows decoded in lockstep (same position, so no attention mask)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.tools = _Tools(tokenizer)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yields, per step, (tokens, masks): N token ids, one per sample, and N masks (1 = sampled by the
        model, 0 = forced by the tool). Each sample's first token is drawn independently from the prompt's
        last logits. A sample ends at <|assistant_end|> or <|bos|> (that token is yielded); after that its
        column entries are filler (the same terminal token, mask 0). Stops when every sample has ended or
        after max_tokens steps (default: until the model's context, sequence_len, is full). temperature 0
        is greedy. Raises ValueError for an empty prompt or one longer than the context."""
        model, cfg = self.model, self.model.config
        prompt = check_prompt(tokens, cfg.vocab_size, cfg.sequence_len)
        check_sampling(temperature, top_k)
        max_tokens = cfg.sequence_len - len(prompt) if max_tokens is None else max_tokens
        if max_tokens <= 0:
            return
        device = _device(model)
        rng = torch.Generator(device=device).manual_seed(seed)
        length = len(prompt) + (max_tokens if num_samples == 1 else 0)
        cache = KVCache.for_model(model, 1, length, last_logits_only=True)
        logits = model(torch.tensor([prompt], device=device), kv_cache=cache)[:, -1].expand(num_samples, -1)
        if num_samples > 1:
            shared, cache = cache, KVCache.for_model(model, num_samples, len(prompt) + max_tokens)
            cache.prefill(shared)
        rows = [_Row(self.tools) for _ in range(num_samples)]
        column = []  # the tokens of the previous step, one per row: the next step's input
        for step in range(max_tokens):
            if step > 0:
                logits = model(torch.tensor(column, device=device)[:, None], kv_cache=cache)[:, -1]
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = [], []
            for row, s in zip(rows, sampled):
                token, mask = (row.last, 0) if row.done else row.next_token(s)
                column.append(token)
                masks.append(mask)
            yield column, masks
            if all(row.done for row in rows):
                return

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """All samples at once: (token_lists, masks), one list per sample, holding its completion only:
        no prompt, and no terminal token (<|assistant_end|> / <|bos|>), which was never part of the answer."""
        token_lists = [[] for _ in range(num_samples)]
        masks = [[] for _ in range(num_samples)]
        ended = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if ended[i] or token in self.tools.terminal:
                    ended[i] = True
                    continue
                token_lists[i].append(token)
                masks[i].append(mask)
        return token_lists, masks


class _Request(_Row):
    def __init__(self, tools, request_id, prompt, max_tokens, temperature, top_k, seed):
        super().__init__(tools)
        self.request_id, self.prompt, self.max_tokens = request_id, prompt, max_tokens
        self.temperature, self.top_k = temperature, top_k  # top_k 0: the whole vocabulary
        self.seed = (seed + 2**63) % 2**64 - 2**63  # any int, as the int64 its sampler's key is made of
        self.tokens = list(prompt)  # every token so far (the prompt, then each one appended)
        self.cached = 0  # tokens whose keys and values are in a cache (all but the last once it decodes)
        self.generated = 0  # tokens appended, sampled or forced: also the step of its sampling stream
        self.prefill_cache = None  # its own batch-1 cache while the prompt is prefilled
        self.weights = None  # the model's weights version when its prefill began (see BatchDecoder._weights)
        self.slot = None  # its slot in the static path


class Event(NamedTuple):
    """One token of one request from BatchDecoder.step(); `finished` marks its last."""
    request_id: object
    token: int
    finished: bool


def _settings(reqs, device):
    """The sampling settings of these requests as tensors, in their order: temperature, top_k, seed, step."""
    temperature = torch.tensor([r.temperature for r in reqs], dtype=torch.float32)
    ints = torch.tensor([[r.top_k, r.seed, r.generated] for r in reqs], dtype=torch.long)
    return temperature.to(device), *ints.to(device).unbind(1)


def _top_k_bound(reqs, vocab_size, bucket=False):
    """(k_max, full) for sample_rows over these requests; bucketed k_max (a power of two) keeps the static
    path's variants few."""
    sampling = [r for r in reqs if r.temperature > 0]
    k_max = max((r.top_k for r in sampling), default=0)
    if bucket and k_max:
        k_max = min(1 << (k_max - 1).bit_length(), vocab_size)
    return k_max, any(r.top_k == 0 for r in sampling)


class _StaticDecode:
    """The decode step at fixed shapes (BatchDecoder's static path): one slot per request, from its prefill
    to its end, in a StaticKVCache; the tokens to feed and every slot's position and sampling settings live
    in device buffers; one step is the model's forward of every slot + sample_rows + advancing the buffers,
    all on the device. The host only reads the sampled ids back, and writes the buffers on the steps after
    a request joined or left or a tool forced a token. With cuda_graphs, each variant of the step (keys read,
    rounded up to KEY_LEN_STEP; top-k bound) is captured once and replayed."""

    def __init__(self, model, max_batch, max_seq_len, cuda_graphs):
        self.model, self.cuda_graphs = model, cuda_graphs
        self.vocab_size = model.config.vocab_size
        self.cache = StaticKVCache.for_model(model, max_batch, max_seq_len)
        device = self.cache.pos.device
        # one buffer, one copy when the host writes: tokens to feed, positions, active, steps, top_k, seeds
        self.state = torch.zeros(6, max_batch, dtype=torch.long, device=device)
        self.tokens, self.cache.pos, self.cache.active, self.steps, self.top_k, self.seeds = self.state.unbind(0)
        self.temperature = torch.zeros(max_batch, device=device)
        self.slots = [None] * max_batch  # the request holding each slot, prefilling or decoding
        self.decoding = set()  # the slots decoding
        self.dirty = False  # the buffers lag the requests: written before the next step
        self.longest = 0  # tokens cached in the fullest slot, known on the host
        self.bound = (0, False)  # sample_rows' (k_max, full) for the slots' settings
        self.graphs = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def reserve(self, req):
        """A slot for a request about to prefill its prompt (into the slot, between decode steps)."""
        req.slot = self.slots.index(None)
        self.slots[req.slot] = req
        return req.slot

    def join(self, req):
        self.decoding.add(req.slot)
        self.dirty = True

    def leave(self, req):
        self.slots[req.slot] = None
        self.decoding.discard(req.slot)
        self.dirty = True

    def _live(self):
        return [self.slots[slot] for slot in sorted(self.decoding)]

    def _write_buffers(self):
        live = self._live()
        scratch = self.cache.shape[4] - 1  # where a free or prefilling slot's filler goes
        free = (0, scratch, 0, 0, 0, 0)
        rows = [(r.last, r.cached, 1, r.generated, r.top_k, r.seed) if slot in self.decoding else free
                for slot, r in enumerate(self.slots)]
        self.state.copy_(torch.tensor(rows, dtype=torch.long).T)
        self.temperature.copy_(torch.tensor([r.temperature if slot in self.decoding else 0.0
                                             for slot, r in enumerate(self.slots)]))
        self.longest = max((r.cached for r in live), default=0)
        self.bound = _top_k_bound(live, self.vocab_size, bucket=True)
        self.dirty = False

    def _forward(self, key_len, k_max, full):
        self.cache.key_len = key_len
        logits = self.model(self.tokens[:, None], kv_cache=self.cache)[:, -1]
        ids = sample_rows(logits, self.temperature, self.top_k, self.seeds, self.steps, k_max, full)
        self.tokens.copy_(ids)  # what each slot is fed next, unless the host overrides it
        self.steps.add_(self.cache.active)

    def _replay(self, variant):
        graph = self.graphs.get(variant)
        if graph is None:
            saved = self.state.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # one eager run first: lazy initialisation, library workspaces
                self._forward(*variant)
            torch.cuda.current_stream().wait_stream(side)
            self.state.copy_(saved)  # undo its step (the keys it wrote are rewritten by the real one)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a checkpoint may be loading in another thread while this one captures
            with torch.cuda.graph(graph, pool=self.graph_pool, capture_error_mode="thread_local"):
                self._forward(*variant)
            self.graphs[variant] = graph
        graph.replay()

    def step(self):
        """Feed every decoding request its last token; returns [(request, sampled id)]."""
        live = self._live()
        if not live:
            return []
        if self.dirty:
            self._write_buffers()
        key_len = min(self.cache.shape[4], -(-(self.longest + 1) // KEY_LEN_STEP) * KEY_LEN_STEP)
        variant = (key_len, *self.bound)
        if self.cuda_graphs:
            self._replay(variant)
        else:
            self._forward(*variant)
        sampled = self.tokens.tolist()
        self.longest += 1
        return [(r, sampled[r.slot]) for r in live]


class BatchDecoder:
    """A slot-based batched decoder for continuous batching (plain torch; the serving layer drives it).

        decoder = BatchDecoder(model, tokenizer, max_batch=32, prefill_chunk=128, prefix_cache_mb=512)
        decoder.add("a", prompt_ids, max_tokens=256, temperature=0.7)   # False when every slot is busy
        while decoder.stats()["requests"]:
            for request_id, token, finished in decoder.step(): ...

    Each step, every running request is fed its last token in one batched forward, its row at its own
    position; then prompts that arrived are prefilled, in arrival order, each in its own batch-1 cache and at
    most `prefill_chunk` tokens per step in all (None: whole prompts at once), so a long prompt loads over
    several steps while the others keep decoding; a step in which nobody decodes has nobody to stall, and
    prefills whole prompts. A prompt whose prefill completes samples its first token and its keys/values are
    copied into a free row. A step may return no event while a long prompt loads.

    Prefix cache (prefix_cache_mb > 0): every prefilled prompt, and every finished sequence, leaves its
    keys/values in a PrefixCache pool of that size (blocks of prefix_block tokens, least recently used out
    first); a prompt that starts with cached blocks copies them and prefills only the rest. When the model's
    weights change in place, the pool is emptied: nothing computed by other weights is reused.

    Sampling: each request draws from its own counter-based stream (Philox, keyed by its seed, counted by
    its step: sample_rows), all rows in one batched op, so its tokens do not depend on who else is in the
    batch. (Until this sampler, each request had a torch.Generator and drew with multinomial; a seed now
    gives other tokens than it did then. Greedy decoding is unchanged.)

    static=True: the decode step at fixed shapes (_StaticDecode: fixed slots, device-side positions and
    settings, no host work per step but reading the sampled ids), the same tokens as the default path;
    cuda_graphs=True (CUDA only) also captures it as CUDA graphs. Meant for GPUs, where launching kernels
    costs more than a small batch's compute; on the CPU it only costs (every slot computes, busy or not).

    A request ends at <|assistant_end|> / <|bos|> (the terminal token is reported, finished=True), after
    max_tokens, or when prompt + completion reach max_seq_len; its slot frees at once. KV memory is
    preallocated for max_batch x max_seq_len, so "full" means every slot is taken."""

    def __init__(self, model, tokenizer, max_batch=32, max_seq_len=None, prefill_chunk=None, prefix_cache_mb=0,
                 prefix_block=16, static=False, cuda_graphs=False):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens (or None), got {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or model.config.sequence_len
        self.device = _device(model)
        if self.device.type == "cpu":  # the step's temporaries are host memory: keep them mapped between steps
            keep_freed_memory()
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on a CUDA device, it is on {self.device} "
                             f"(static=True runs the same static-shape step without graphs)")
        self.tools = _Tools(tokenizer)
        self.prefill_chunk = prefill_chunk
        self.pool = PrefixCache(prefix_cache_mb * 2**20, prefix_block) if prefix_cache_mb > 0 else None
        self._weights = self._weights_version()
        self.static = _StaticDecode(model, max_batch, self.max_seq_len, cuda_graphs) if static or cuda_graphs else None
        self.cache = self.static.cache if self.static else KVCache.for_model(model, max_batch, self.max_seq_len)
        self.requests = {}  # request_id -> _Request: prefilling or decoding
        self.pending = deque()  # prompts not fully prefilled yet, in arrival order
        self.rows = []  # default path: the request in each cache row, rows 0 .. len - 1
        self.steps = self.tokens_decoded = self.tokens_prefilled = 0

    def add(self, request_id, prompt_ids, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Queue a request for the next step. False when every slot is taken (the caller keeps it and
        retries after some finish). ValueError for a bad prompt (empty, ids out of range, no room left
        for one token in max_seq_len), bad sampling settings, or a request_id already in use."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already running")
        vocab_size = self.model.config.vocab_size
        prompt = check_prompt(prompt_ids, vocab_size, self.max_seq_len - 1)
        check_sampling(temperature, top_k)
        if len(self.requests) >= self.max_batch:
            return False
        room = self.max_seq_len - len(prompt)
        max_tokens = room if max_tokens is None else min(max_tokens, room)
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        top_k = min(top_k, vocab_size) if top_k else 0
        req = _Request(self.tools, request_id, prompt, max_tokens, temperature, top_k, operator.index(seed))
        self.requests[request_id] = req
        self.pending.append(req)
        return True

    @torch.inference_mode()  # freeing keeps its KV in the prefix pool: an in-place write on inference tensors
    def cancel(self, request_id):
        """Drop a request and free its slot; False if it is unknown (never added, or already finished)."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req in self.pending:
            self.pending.remove(req)
            del self.requests[request_id]
            if req.slot is not None:  # its static slot, reserved for the prefill
                self.static.leave(req)
        else:
            self._free(req)
        return True

    # ---- the prefix cache ------------------------------------------------------------------------------

    def _weights_version(self):
        # in-place writes (load_state_dict, an optimizer step) bump a tensor's version counter
        return [(p.data_ptr(), p._version) for p in self.model.parameters()]

    def _current_weights(self):
        """The weights' version, as one object per version: a new one (and an empty pool) when they changed."""
        version = self._weights_version()
        if version != self._weights:
            self._weights = version
            if self.pool:
                self.pool.clear()
        return self._weights

    def _start_prefill(self, req, budget, joining):
        """Where the prompt is prefilled: straight into the row it will decode from when it can (its static
        slot; the next free row when the rest fits this step's budget: `joining` others complete before it),
        else a batch-1 cache of its own (a long prompt, over steps in which rows move); the prefix cache's
        hit is copied in first."""
        found = []
        if self.pool:
            req.weights = self._current_weights()
            found = self.pool.match(req.prompt, len(req.prompt) - 1)  # the last token is fed: its logits
        rest = len(req.prompt) - len(found) * (self.pool.block_size if self.pool else 0)
        if self.static:
            req.prefill_cache = RowCache(self.cache, self.static.reserve(req))
        elif rest <= budget:
            req.prefill_cache = RowCache(self.cache, len(self.rows) + joining)
        else:
            req.prefill_cache = RowCache(KVCache.for_model(self.model, 1, len(req.prompt)), 0)
        if found:
            req.prefill_cache.load(self.pool, found)

    def _keep(self, req, tokens, kv):
        """Leave this request's keys/values in the pool, unless other weights computed some of them."""
        if self.pool and req.weights is self._current_weights():
            self.pool.store(tokens, kv)

    # ---- one step ------------------------------------------------------------------------------------

    def _decode(self):
        """Feed every decoding request its last token: [(request, sampled id)]."""
        if self.static:
            decoded = self.static.step()
        elif self.rows:
            last = torch.tensor([[r.last] for r in self.rows], device=self.device)
            decoded = list(zip(self.rows, self._sample(self.rows, self.model(last, kv_cache=self.cache)[:, -1])))
        else:
            decoded = []
        for req, _ in decoded:
            req.cached += 1
        return decoded

    def _prefill(self, decoding):
        """Prefill arrived prompts within this step's budget: [(request, its last logits)] of those done.
        `decoding`: whether some request decoded in this step; if none did, nobody waits for the prefill, and
        prompts are prefilled whole (an idle decoder takes a burst of arrivals in one step, not chunk by chunk)."""
        budget = self.prefill_chunk if self.prefill_chunk and decoding else float("inf")
        done = []
        while self.pending and budget > 0:
            req = self.pending[0]
            if req.prefill_cache is None:
                self._start_prefill(req, budget, len(done))
            target = req.prefill_cache
            n = int(min(len(req.prompt) - target.pos, budget))
            chunk = torch.tensor([req.prompt[target.pos:target.pos + n]], device=self.device)
            logits = self.model(chunk, kv_cache=target)[:, -1]
            req.cached = target.pos
            budget -= n
            self.tokens_prefilled += n
            if req.cached < len(req.prompt):
                break
            self.pending.popleft()
            self._keep(req, req.prompt, target.kv())
            done.append((req, logits))
        return done

    def _join(self, req):
        """A request whose prompt is cached starts decoding (in this step's order: it takes the next row)."""
        target, n = req.prefill_cache, len(req.prompt)
        if self.static:
            self.static.join(req)
        else:
            row = len(self.rows)
            if target.cache is not self.cache:  # prefilled over several steps in its own cache: copy it in
                self.cache.reserve(n, target.cache.kv)
                self.cache.kv[:, :, row, :, :n] = target.kv()[:, :, :, :n]
            assert target.cache is not self.cache or target.row == row
            self.cache.pos[row] = n
            self.rows.append(req)
        req.prefill_cache = None

    def _free(self, req):
        del self.requests[req.request_id]
        if self.static:
            self._keep(req, req.tokens[:req.cached], self.cache.kv[:, :, req.slot])
            self.static.leave(req)
            return
        row = self.rows.index(req)
        self._keep(req, req.tokens[:req.cached], self.cache.kv[:, :, row])
        self.cache.remove_row(row, len(self.rows))
        self.rows[row] = self.rows[-1]
        self.rows.pop()

    def _sample(self, reqs, logits):
        return sample_rows(logits, *_settings(reqs, self.device), *_top_k_bound(reqs, logits.size(-1))).tolist()

    @torch.inference_mode()
    def step(self):
        """One decode step: a list of Event(request_id, token, finished), one per request decoding or whose
        prompt finished prefilling in this step."""
        if not self.requests:
            return []
        decoded = self._decode()
        joined = self._prefill(bool(decoded))
        if joined:
            reqs = [req for req, _ in joined]
            decoded += zip(reqs, self._sample(reqs, torch.cat([logits for _, logits in joined])))
            for req in reqs:
                self._join(req)
        events = []
        for req, sampled in decoded:
            token, _ = req.next_token(sampled)
            req.tokens.append(token)
            req.generated += 1
            if self.static and token != sampled:  # a tool's token: the device's next input is stale
                self.static.dirty = True
            events.append(Event(req.request_id, token, req.done or req.generated >= req.max_tokens))
            if events[-1].finished:
                self._free(req)
        self.steps += 1
        self.tokens_decoded += len(events)
        return events

    def stats(self):
        decoding = len(self.requests) - len(self.pending)
        stats = {"requests": len(self.requests), "active": decoding, "waiting": len(self.pending),
                 "free_slots": self.max_batch - len(self.requests), "max_batch": self.max_batch,
                 "max_seq_len": self.max_seq_len, "steps": self.steps, "tokens_decoded": self.tokens_decoded,
                 "tokens_prefilled": self.tokens_prefilled}
        if self.pool:
            stats["prefix_cache"] = self.pool.stats()
        return stats


class TextStream:
    """Token ids in, text out, never half a character: a token can end in the middle of a UTF-8 sequence,
    whose bytes are held back until the token that completes it arrives."""

    def __init__(self, tokenizer):
        self.token_bytes = tokenizer.enc.decode_single_token_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self.decoder.decode(self.token_bytes(token_id))

    def flush(self):
        """Whatever is held back, at the end of a stream (an unfinished character becomes U+FFFD)."""
        return self.decoder.decode(b"", final=True)
