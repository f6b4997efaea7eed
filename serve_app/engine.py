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
from serve_app.scheduler import RequestTimeout, Scheduler


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
        self.scheduler = Scheduler(model, self.tokenizer, max_batch, max_seq_len, prefill_chunk=prefill_chunk,
                                   prefix_cache_mb=prefix_cache_mb, cuda_graphs=cuda_graphs)
        self.reload_lock = asyncio.Lock()

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
        {"text": piece} as complete characters arrive (special tokens are not shown), then
        {"finish_reason": "stop" | "length", "completion_tokens": n} — or {"error", "status"} on a timeout."""
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
        yield {"prompt_tokens": len(prompt)}
        text, count, finish = TextStream(self.tokenizer), 0, "length"
        try:
            chunk = first
            while chunk is not None:
                pieces = []
                for token in chunk:
                    if token in self.terminal:
                        finish = "stop"
                        break
                    count += 1
                    if token not in self.specials:  # tool-call markers are not part of the text
                        pieces.append(text.push(token))
                if "".join(pieces):
                    yield {"text": "".join(pieces)}
                chunk = await anext(tokens, None)
        except RequestTimeout as e:
            yield {"error": str(e), "status": 504}
            return
        finally:
            await tokens.aclose()  # a client that went away: the scheduler frees its slot
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

    def info(self):
        return {"ready": True, "pid": os.getpid(), "device": str(self.device), "checkpoint": self.checkpoint}

    def stats(self):
        return {**self.scheduler.stats(), "pid": os.getpid(), "checkpoint": self.checkpoint["path"],
                "step": self.checkpoint["step"]}

    def pid(self):
        return os.getpid()
