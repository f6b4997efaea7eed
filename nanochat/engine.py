"""Inference: the KV cache, the Engine (one prompt, N samples) and the BatchDecoder (many requests that
join and leave a running batch: continuous batching, driven by the serving layer).

KV cache protocol (what GPT.forward relies on), for a forward of B rows and T new tokens per row:
- `get_pos(B)` is the number of tokens already cached in each of the cache's first B rows, which is the
  rotary offset of each row's next token: an int when all B rows hold the same number (a prefill, N
  samples in lockstep: plain slices, no mask), else a (B,) CPU tensor, one per row;
- each attention layer calls `insert_kv(layer_idx, k, v)` with its new keys/values (B, n_kv_head, T,
  head_dim), written at each row's own offset, and gets back the keys/values of positions
  0 .. max(pos) + T - 1 of those rows. Past a row's own end these slots hold stale keys (or zeros), so
  when rows differ the model masks them out: new token t of row b sees keys 0 .. pos[b] + t;
- positions advance once the last layer has inserted, so every layer of one forward sees the same offsets.
A forward of B rows always uses the cache's first B rows: a decoder keeps its live rows packed at the top
(`remove_row` moves the last live row into a freed one) and forwards only those.

Tool use: when a sequence emits <|python_start|>, its tokens up to <|python_end|> are evaluated by the
calculator, and <|output_start|> result <|output_end|> is forced into that sequence one token per step
(mask 0: the tool wrote them, not the model) before it samples again. A failed evaluation injects nothing.
Every token appended to a sequence, sampled or forced, counts toward max_tokens.
"""
import codecs
import operator
from collections import deque
from typing import NamedTuple

import torch

from nanochat.calculator import evaluate
from nanochat.gpt import sample_next_token


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, 2, B, n_kv_head, T, head_dim), plus the
    number of tokens each row holds. Storage is allocated on the first insert, with the device and dtype
    of the keys the model produces (bf16 under autocast on GPU, fp32 on CPU), and grows when a sequence
    outgrows it. Positions live on the CPU: the host decides what each row is fed, so reading them never
    waits on the GPU."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):
        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv = None
        self.pos = torch.zeros(batch_size, dtype=torch.long)  # tokens cached, per row
        self._write = None  # where this forward's new keys go, worked out by layer 0 for every layer

    @classmethod
    def for_model(cls, model, batch_size, seq_len):
        cfg = model.config
        return cls(batch_size, cfg.n_kv_head, seq_len, cfg.n_embd // cfg.n_head, cfg.n_layer)

    def reset(self):
        self.pos.zero_()

    def get_pos(self, rows=None):
        """Tokens cached in the first `rows` rows (default: all): an int when they agree, else a (rows,) tensor."""
        pos = self.pos[:rows]
        first = int(pos[0])
        return first if bool((pos == first).all()) else pos.clone()

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
        B, H, T, D = k.size()
        if layer_idx == 0:
            pos = self.get_pos(B)
            if isinstance(pos, int):  # rows in lockstep: one slice
                self._write = (pos, pos + T)
            else:  # each row at its own offset: scatter through (row, position) index pairs
                rows = torch.arange(B, device=k.device)[:, None]
                cols = (pos[:, None] + torch.arange(T)).to(k.device)
                self._write = ((rows, cols), int(pos.max()) + T)
            self._ensure_capacity(self._write[1], k)
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
        self._ensure_capacity(n, other.kv)
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
        cache = KVCache.for_model(model, 1, len(prompt) + (max_tokens if num_samples == 1 else 0))
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
    def __init__(self, tools, request_id, prompt, max_tokens, temperature, top_k, seed, device):
        super().__init__(tools)
        self.request_id, self.prompt, self.max_tokens = request_id, prompt, max_tokens
        self.temperature, self.top_k = temperature, top_k
        self.rng = torch.Generator(device=device).manual_seed(seed)
        self.generated = 0


class Event(NamedTuple):
    """One token of one request from BatchDecoder.step(); `finished` marks its last."""
    request_id: object
    token: int
    finished: bool


class BatchDecoder:
    """A slot-based batched decoder for continuous batching (plain torch; the serving layer drives it).

        decoder = BatchDecoder(model, tokenizer, max_batch=32)
        decoder.add("a", prompt_ids, max_tokens=256, temperature=0.7)   # False when every slot is busy
        while decoder.stats()["requests"]:
            for request_id, token, finished in decoder.step(): ...

    Each step, requests added since the last step are prefilled (one forward each, batch 1) and their KV
    copied into the next free rows of one shared cache; every running request is fed its last token in one
    batched forward, its rows at their own positions. Each request samples with its own seeded generator,
    so its tokens do not depend on who else is in the batch. A request ends at <|assistant_end|> /
    <|bos|> (the terminal token is reported, finished=True), after max_tokens, or when prompt + completion
    reach max_seq_len; its slot frees at once. KV memory is preallocated for max_batch x max_seq_len, so
    "full" means every slot is taken."""

    def __init__(self, model, tokenizer, max_batch=32, max_seq_len=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or model.config.sequence_len
        self.device = _device(model)
        self.tools = _Tools(tokenizer)
        self.cache = KVCache.for_model(model, max_batch, self.max_seq_len)
        self.requests = {}  # request_id -> _Request, running or waiting
        self.running = []  # _Request per cache row, rows 0 .. len - 1
        self.waiting = []  # added, not prefilled yet
        self.steps = self.tokens_decoded = self.tokens_prefilled = 0

    def add(self, request_id, prompt_ids, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Queue a request for the next step. False when every slot is taken (the caller keeps it and
        retries after some finish). ValueError for a bad prompt (empty, ids out of range, no room left
        for one token in max_seq_len), bad sampling settings, or a request_id already in use."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already running")
        prompt = check_prompt(prompt_ids, self.model.config.vocab_size, self.max_seq_len - 1)
        check_sampling(temperature, top_k)
        if len(self.requests) >= self.max_batch:
            return False
        room = self.max_seq_len - len(prompt)
        max_tokens = room if max_tokens is None else min(max_tokens, room)
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        req = _Request(self.tools, request_id, prompt, max_tokens, temperature, top_k, seed, self.device)
        self.requests[request_id] = req
        self.waiting.append(req)
        return True

    def cancel(self, request_id):
        """Drop a request and free its slot; False if it is unknown (never added, or already finished)."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req in self.waiting:
            self.waiting.remove(req)
            del self.requests[request_id]
        else:
            self._free(self.running.index(req))
        return True

    def _free(self, row):
        self.cache.remove_row(row, len(self.running))
        req = self.running[row]
        self.running[row] = self.running[-1]
        self.running.pop()
        del self.requests[req.request_id]

    @torch.inference_mode()
    def step(self):
        """One decode step for every request: a list of Event(request_id, token, finished), one each."""
        if not self.requests:
            return []
        model, device = self.model, self.device
        logits = []
        if self.running:
            last = torch.tensor([[req.last] for req in self.running], device=device)
            logits.append(model(last, kv_cache=self.cache)[:, -1])
        for req in self.waiting:
            one = KVCache.for_model(model, 1, len(req.prompt))
            logits.append(model(torch.tensor([req.prompt], device=device), kv_cache=one)[:, -1])
            self.cache.prefill(one, row=len(self.running))
            self.running.append(req)
            self.tokens_prefilled += len(req.prompt)
        self.waiting = []
        sampled = self._sample(torch.cat(logits))
        events, finished = [], []
        for row, (req, s) in enumerate(zip(self.running, sampled)):
            token, _ = req.next_token(s)
            req.generated += 1
            events.append(Event(req.request_id, token, req.done or req.generated >= req.max_tokens))
            if events[-1].finished:
                finished.append(row)
        for row in reversed(finished):  # from the bottom: the row moved into a freed one is never freed later
            self._free(row)
        self.steps += 1
        self.tokens_decoded += len(events)
        return events

    def _sample(self, logits):
        """Greedy for every row in one argmax; rows with a temperature then draw from their own generator."""
        ids = logits.argmax(dim=-1, keepdim=True)
        for i, req in enumerate(self.running):
            if req.temperature > 0:
                ids[i] = sample_next_token(logits[i:i + 1], req.rng, req.temperature, req.top_k)[0]
        return ids[:, 0].tolist()

    def stats(self):
        return {"requests": len(self.requests), "active": len(self.running), "waiting": len(self.waiting),
                "free_slots": self.max_batch - len(self.requests), "max_batch": self.max_batch,
                "max_seq_len": self.max_seq_len, "steps": self.steps, "tokens_decoded": self.tokens_decoded,
                "tokens_prefilled": self.tokens_prefilled}


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
