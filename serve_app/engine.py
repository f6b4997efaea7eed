"""The engine deployment: each replica holds one chat model and decodes every request it is given in one
continuously batched loop (serve_app/scheduler.py). Replicas are reached through a Serve handle, by the
HTTP ingress and the Gradio page alike: `generate` streams one answer; `info` and `stats` are control
calls the ingress sends to every replica at once (handle.broadcast); so is `reload` (a checkpoint roll-out,
`python -m serve_app --reload ...`); `pid` is for tests that kill a replica.

A checkpoint is named by a directory: a step directory (…/step_000123), a tag directory (its last
step), a path relative to <base>/checkpoints (e.g. "sft/d20"), or a directory written by nanochat.export
(which brings its own tokenizer); none means the latest chat checkpoint (sft, else mid, else rl), as in the
chat CLI (nanochat.checkpoint.load_for_inference).
"""
import asyncio
import os
import random
import time

import torch
from ray import serve

from nanochat.checkpoint import CheckpointError, load_for_inference
from nanochat.common import autodetect_device_type
from nanochat.engine import TextStream
from nanochat.tokenizer import ConversationError
from ray_jobs.metrics import record
from serve_app.scheduler import RequestTimeout, Scheduler

GAUGE_EVERY_S = 1.0  # the replica's queue, slot and cache gauges are read from the scheduler this often


@serve.deployment(name="NanochatEngine")
class EngineReplica:
    def __init__(self, checkpoint=None, base_dir=None, tokenizer_dir=None, max_batch=32, max_seq_len=None,
                 timeout_s=300.0, device=None, prefill_chunk=None, prefix_cache_mb=0, cuda_graphs=False):
        if base_dir:  # the replica may run on another node, in another process: same files as the driver
            os.environ["NANOCHAT_BASE_DIR"] = str(base_dir)
        self.base_dir, self.tokenizer_dir, self.timeout_s = base_dir, tokenizer_dir, timeout_s
        self.device = torch.device(device or autodetect_device_type())
        self.tokenizer = None
        model, self.tokenizer, self.checkpoint = self._load(checkpoint)
        specials = self.tokenizer.special_ids
        self.specials = set(specials.values())
        self.terminal = {specials["<|assistant_end|>"], specials["<|bos|>"]}
        self.call_start, self.call_end = specials["<|python_start|>"], specials["<|python_end|>"]
        self.scheduler = Scheduler(model, self.tokenizer, max_batch, max_seq_len, prefill_chunk=prefill_chunk,
                                   prefix_cache_mb=prefix_cache_mb, cuda_graphs=cuda_graphs)
        self.reload_lock = asyncio.Lock()
        self.replica = _replica_name()
        self.gauges = None  # the task refreshing the gauges, started with the first request (needs the event loop)

    def _load(self, spec):
        model, tokenizer, meta = load_for_inference(spec, self.device, self.base_dir, self.tokenizer_dir)
        if self.tokenizer is not None and tokenizer.fingerprint() != self.tokenizer.fingerprint():  # a reload
            raise CheckpointError(f"{meta['path']} comes with tokenizer {tokenizer.fingerprint()}, but the "
                                  f"replicas run {self.tokenizer.fingerprint()}: deploy it as a new app instead")
        return model, tokenizer, {"path": meta["path"], "step": meta["step"], "model_config": meta["model_config"],
                                  "loaded_at": time.time()}

    async def generate(self, request):
        """Stream one chat completion. request: {"messages": [...] (already validated by the ingress),
        "max_tokens", "temperature", "top_k", "seed"}. Yields, in order: {"prompt_tokens": n} once the
        prompt is accepted (or {"error": message, "status": http status} and nothing else), then
        {"text": piece} as complete characters arrive (special tokens and the calculator's input are not shown,
        its result is), then
        {"finish_reason": "stop" | "length", "completion_tokens": n} — or {"error", "status"} on a timeout.
        Metrics: time to first token, the request's mean time per output token and its tokens (once each)."""
        t_start = time.perf_counter()
        if self.gauges is None:
            self.gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())
        try:
            conversation = {"messages": [*request["messages"], {"role": "assistant", "content": ""}]}
            prompt = self.tokenizer.render_for_completion(conversation)
            seed = request.get("seed")
            tokens = self.scheduler.generate(
                prompt, request.get("max_tokens"), request.get("temperature", 1.0), request.get("top_k"),
                random.getrandbits(62) if seed is None else seed, self.timeout_s)
            first = await anext(tokens, None)  # raises ValueError for a prompt that does not fit
        except (ConversationError, ValueError) as e:
            yield {"error": str(e), "status": 400}
            return
        except RequestTimeout as e:
            yield {"error": str(e), "status": 504}
            return
        t_first = time.perf_counter()
        record("nanochat_serve_ttft_seconds", t_first - t_start, replica=self.replica)
        yield {"prompt_tokens": len(prompt)}
        text, count, finish = TextStream(self.tokenizer), 0, "length"
        in_call = False  # inside <|python_start|> ... <|python_end|>: the model's calculator input
        try:
            chunk = first
            while chunk is not None:
                pieces = []
                for token in chunk:
                    if token in self.terminal:
                        finish = "stop"
                        break
                    count += 1
                    if token == self.call_start or token == self.call_end:
                        in_call = token == self.call_start
                    # the answer's text: no tool-call markers nor the expression, but the tool's result
                    elif token not in self.specials and not in_call:
                        pieces.append(text.push(token))
                if "".join(pieces):
                    yield {"text": "".join(pieces)}
                chunk = await anext(tokens, None)
        except RequestTimeout as e:
            yield {"error": str(e), "status": 504}
            return
        finally:
            await tokens.aclose()  # a client that went away: the scheduler frees its slot
            record("nanochat_serve_tokens_total", count, replica=self.replica)
            if count > 1:
                record("nanochat_serve_time_per_output_token_seconds", (time.perf_counter() - t_first) / (count - 1),
                       replica=self.replica)
        tail = text.flush()
        if tail:
            yield {"text": tail}
        yield {"finish_reason": finish, "completion_tokens": count}

    async def reload(self, checkpoint=None):
        """Load another checkpoint (same tokenizer) and serve new requests with it; running requests finish
        on the old weights, so nobody fails. Returns info()."""
        async with self.reload_lock:
            model, _, loaded = await asyncio.to_thread(self._load, checkpoint)
            self.scheduler.reload(model)
            self.checkpoint = loaded
        return self.info()

    async def _refresh_gauges(self):
        while True:
            stats = self.scheduler.stats()
            for name, value in (("queue_depth", stats["queue_depth"]), ("active_slots", stats["active"]),
                                ("kv_slots_used", stats["active"] + stats["prefill_waiting"]),
                                ("prefix_cache_hit_rate", stats["prefix_cache_hit_rate"])):
                record(f"nanochat_serve_{name}", value, replica=self.replica)
            await asyncio.sleep(GAUGE_EVERY_S)

    def info(self):
        return {"ready": True, "pid": os.getpid(), "device": str(self.device), "checkpoint": self.checkpoint}

    def stats(self):
        return {**self.scheduler.stats(), "pid": os.getpid(), "checkpoint": self.checkpoint["path"],
                "step": self.checkpoint["step"]}

    def pid(self):
        return os.getpid()


def _replica_name():
    """This replica's id in Serve (its metrics' tag), or the process id outside Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a Serve replica (a test building the class directly)
        return f"pid{os.getpid()}"
