"""Continuous batching from asyncio: many concurrent requests share one BatchDecoder.

One background task loops: admit waiting requests into free slots, run one decode step for every
running request (in a worker thread, so the event loop keeps accepting and streaming), hand each
request its new tokens, drop cancelled requests. A request joins the running batch at the next step
and leaves it the step it finishes; when every slot is taken it waits in a FIFO queue (memory stays
bounded: the KV cache is preallocated for max_batch x max_seq_len).

`reload(model)` swaps in new weights without failing anyone: new requests go to a fresh decoder on the
new model while the old decoder finishes the requests it already holds, then is dropped. The fresh decoder
starts with an empty prefix cache: nothing the old weights computed is reused.

Plain asyncio + torch: no Ray here (the Serve deployment in serve_app/engine.py wraps it).
"""
import asyncio
import itertools
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

from nanochat.engine import BatchDecoder, check_prompt, check_sampling


class RequestTimeout(Exception):
    """The request ran out of time (waiting for a slot counts too)."""


class _Pending:
    def __init__(self, request_id, prompt, max_tokens, temperature, top_k, seed):
        self.request_id, self.prompt, self.max_tokens = request_id, prompt, max_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.out = []  # token ids not yet taken by the consumer
        self.end = None  # True once the last token is in `out`, or the exception that ended the request
        self.ready = asyncio.Event()  # set when `out` or `end` changed

    def put(self, token=None, end=None):
        if token is not None:
            self.out.append(token)
        if end is not None:
            self.end = end
        self.ready.set()


def _step_all(decoders):
    return [event for decoder in decoders for event in decoder.step()]


PREFIX_COUNTERS = ("lookups", "hits", "tokens_looked_up", "tokens_saved")


class Scheduler:
    def __init__(self, model, tokenizer, max_batch=32, max_seq_len=None, window_s=10.0, **decoder_options):
        """decoder_options: BatchDecoder's prefill_chunk, prefix_cache_mb, prefix_block, static, cuda_graphs."""
        self.tokenizer = tokenizer
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.decoder_options = decoder_options
        self.decoder = self._new_decoder(model)  # new requests go here
        self.retired = Counter()  # prefix-cache counters of the decoders dropped so far (reloads, failures)
        self.draining = []  # decoders of replaced models, finishing what they hold
        self.queue = deque()  # _Pending not admitted yet: every slot was taken
        self.live = {}  # request_id -> _Pending, queued or admitted
        self.owner = {}  # request_id -> the decoder running it
        self.to_cancel = set()  # admitted requests to drop between steps (never during one)
        self.ids = itertools.count()
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="decode")  # one thread: steps never overlap
        self.task = None
        self.window_s = window_s
        self.recent = deque()  # (time, tokens) of the steps within the last window_s
        self.counts = dict(requests=0, finished=0, cancelled=0, timed_out=0, failed=0, tokens=0, steps=0,
                           max_active=0, busy_s=0.0)

    @property
    def max_context(self):
        return self.decoder.max_seq_len

    # ---- the request side ---------------------------------------------------------------------------

    async def generate(self, prompt, max_tokens=None, temperature=1.0, top_k=None, seed=42, timeout_s=None):
        """Async generator of token-id lists (each holds every token that arrived since the previous one),
        ending after the request's last token (terminal token included). ValueError for a bad prompt or
        sampling settings, RequestTimeout after timeout_s seconds in all. Closing the generator early (the
        client went away) cancels the request and frees its slot."""
        prompt = check_prompt(prompt, self.decoder.model.config.vocab_size, self.max_context - 1)
        check_sampling(temperature, top_k)
        if max_tokens is not None and max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        req = _Pending(next(self.ids), prompt, max_tokens, temperature, top_k, seed)
        self.counts["requests"] += 1
        self.live[req.request_id] = req
        self.queue.append(req)
        self._ensure_running()
        self.wakeup.set()
        try:
            while req.end is None or req.out:
                remaining = None if deadline is None else deadline - time.monotonic()
                try:
                    await asyncio.wait_for(req.ready.wait(), remaining)
                except asyncio.TimeoutError:
                    self.counts["timed_out"] += 1
                    self._cancel(req)
                    raise RequestTimeout(f"request timed out after {timeout_s:g} s") from None
                req.ready.clear()
                if isinstance(req.end, Exception):
                    raise req.end
                if req.out:  # everything since the last wakeup in one piece, not one message per token
                    tokens, req.out = req.out, []
                    yield tokens
            self.counts["finished"] += 1
        finally:
            if req.end is None and self._cancel(req):  # the consumer left early (client gone): free the slot
                self.counts["cancelled"] += 1

    def _cancel(self, req):
        """Forget a request; its slot frees before the next step. False if it was no longer live."""
        if self.live.pop(req.request_id, None) is None:
            return False
        if req in self.queue:
            self.queue.remove(req)
        else:
            self.to_cancel.add(req.request_id)
        return True

    # ---- the loop ------------------------------------------------------------------------------------

    def _ensure_running(self):
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())

    def _admit(self):
        while self.queue:
            req = self.queue[0]
            settings = (req.max_tokens, req.temperature, req.top_k, req.seed)
            try:
                if not self.decoder.add(req.request_id, req.prompt, *settings):
                    return  # every slot taken: wait for some to finish
            except Exception as e:  # checked in generate(), so not expected: fail this one, never stop the loop
                self.live.pop(req.request_id, None)
                req.put(end=e)
            else:
                self.owner[req.request_id] = self.decoder
            self.queue.popleft()

    def _apply_cancels(self):
        for request_id in self.to_cancel:
            decoder = self.owner.pop(request_id, None)
            if decoder is not None:
                decoder.cancel(request_id)
        self.to_cancel.clear()

    def _busy_decoders(self):
        return [d for d in (*self.draining, self.decoder) if d.stats()["requests"]]

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._apply_cancels()
                self._admit()
            except Exception as e:  # the loop must outlive any error, or every later request would wait forever
                self._fail_all(e)
                continue
            decoders = self._busy_decoders()
            for d in self.draining:
                if d not in decoders:
                    self._retire(d)
            self.draining = [d for d in self.draining if d in decoders]
            if not decoders:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            t0 = time.monotonic()
            try:
                events = await loop.run_in_executor(self.executor, _step_all, decoders)
            except Exception as e:  # a failed step poisons its batch: fail those requests, keep serving
                self._fail_all(e)
                continue
            self._record(t0, time.monotonic(), len(events))
            for request_id, token, finished in events:
                req = self.live.get(request_id)
                if req is None:  # cancelled while the step ran: its slot is freed by _apply_cancels
                    continue
                req.put(token, end=True if finished else None)
                if finished:
                    del self.live[request_id]
                    self.owner.pop(request_id, None)

    def _record(self, t0, now, tokens):
        c = self.counts
        c["steps"] += 1
        c["tokens"] += tokens
        c["busy_s"] += now - t0
        c["max_active"] = max(c["max_active"], tokens)
        self.recent.append((now, tokens))
        while self.recent and self.recent[0][0] < now - self.window_s:
            self.recent.popleft()

    def _fail_all(self, error):
        for req in list(self.live.values()):
            if req.request_id in self.owner:
                req.put(end=RuntimeError(f"decode step failed: {type(error).__name__}: {error}"))
                del self.live[req.request_id]
                self.counts["failed"] += 1
        # the decoders' state is unknown after a failure: start clean (queued requests stay queued)
        for d in (*self.draining, self.decoder):
            self._retire(d)
        self.decoder = self._new_decoder(self.decoder.model)
        self.draining, self.owner = [], {}
        self.to_cancel.clear()

    # ---- model swap and stats ----------------------------------------------------------------------------

    def _new_decoder(self, model):
        return BatchDecoder(model, self.tokenizer, self.max_batch, self.max_seq_len, **self.decoder_options)

    def _retire(self, decoder):
        """A decoder is dropped: keep its prefix-cache counters in the totals."""
        if decoder.pool:
            self.retired.update({k: decoder.pool.counts[k] for k in PREFIX_COUNTERS})

    def reload(self, model):
        """Serve new requests with `model` from now on; requests already running finish on the old one."""
        if self.decoder.stats()["requests"]:
            self.draining.append(self.decoder)
        else:
            self._retire(self.decoder)
        self.decoder = self._new_decoder(model)

    def stats(self):
        c = self.counts
        now = time.monotonic()
        recent = [n for t, n in self.recent if t >= now - self.window_s]
        decoders = [*self.draining, self.decoder]
        active = sum(d.stats()["active"] for d in decoders)
        kv = [d.cache.kv for d in decoders if d.cache.kv is not None]  # allocated at the first request
        prefix = self.retired.copy()
        for d in decoders:
            if d.pool:
                prefix.update({k: d.pool.counts[k] for k in PREFIX_COUNTERS})
        pools = [d.pool.blocks for d in decoders if d.pool and d.pool.blocks is not None]
        return {
            "requests_total": c["requests"], "requests_finished": c["finished"],
            "requests_cancelled": c["cancelled"], "requests_timed_out": c["timed_out"],
            "requests_failed": c["failed"], "in_flight": len(self.live),
            "queue_depth": len(self.queue), "active": active, "max_active": c["max_active"],
            "max_batch": self.max_batch, "max_seq_len": self.max_context,
            "steps": c["steps"], "tokens_generated": c["tokens"],
            "mean_batch": round(c["tokens"] / c["steps"], 2) if c["steps"] else 0.0,
            "tokens_per_s": round(sum(recent) / self.window_s, 2),
            "tokens_per_busy_s": round(c["tokens"] / c["busy_s"], 2) if c["busy_s"] else 0.0,
            "kv_cache_mb": round(sum(t.numel() * t.element_size() for t in kv) / 2**20, 1),
            "draining_decoders": len(self.draining),
            "prefill_waiting": sum(d.stats()["waiting"] for d in decoders),
            # prefix cache: hit rate = prompt tokens copied from the pool / prompt tokens looked up
            "prefix_cache_lookups": prefix["lookups"], "prefix_cache_hits": prefix["hits"],
            "prefix_cache_prompt_tokens": prefix["tokens_looked_up"],
            "prefix_cache_tokens_saved": prefix["tokens_saved"],
            "prefix_cache_hit_rate": round(prefix["tokens_saved"] / prefix["tokens_looked_up"], 4)
            if prefix["tokens_looked_up"] else 0.0,
            "prefix_cache_mb": round(sum(t.numel() * t.element_size() for t in pools) / 2**20, 1),
        }
