"""GPU memory of a training step, known before a GPU is rented: traced on fake tensors, checked on real ones.

What a worker's GPU holds at the peak of a training micro-step (one forward + backward of `batch` rows):
- static: the fp32 master weights, their fp32 gradients, and this rank's shard of the optimizer state
  (Adam's two moments for the embedding and head, Muon's momentum for the block matrices), from their shapes;
- saved: every tensor autograd keeps from the forward for the backward, MEASURED by running one real forward
  with the loss on fake tensors (FakeTensorMode: shapes and dtypes, no memory, no GPU) of the target device
  in the model's real precision, counting what the saved-tensor hooks see (each storage once; parameters
  are static, not saved). Attention is modelled as the flash kernel a GPU runs (it keeps q, k, v, the
  output and the log-sum-exp), not as the math fallback fake CUDA would trace (a (B, H, T, T) matrix);
- transient: what is allocated on top of those at the peak: the loss's working set at the end of the
  forward (a few (chunk rows, vocab) fp32 buffers: LOSS_BUFFERS of them), or the backward's own allocations
  while it runs (gradients of activations, a layer's temporaries: TRANSIENT_BLOCKS x one block's saved
  activations), whichever is larger. Both constants were measured on real CPU tensors with PyTorch's
  MemTracker (calibrate_transient), in the regime where each one sets the peak.

The eager path is traced: a torch.compile'd step saves less (fused elementwise ops), so the eager figure is
an upper bound for it. Not modelled: the CUDA context (the planner subtracts it), allocator fragmentation
(the planner's headroom), communication buffers (small next to the rest).

    from nanochat.memory import step_memory
    step_memory(GPTConfig.from_depth(20, 65536), batch=32, world_size=8, precision="bf16")  # bytes, by part
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from nanochat import gpt
from nanochat.gpt import GPT, GPTConfig
from nanochat.muon import group_by_shape

GiB = 2 ** 30
DRIVER_RESERVED_GIB = 1.0  # an "80 GB" H100 shows ~79.2 GiB usable; the driver and ECC keep the rest
CUDA_CONTEXT_GIB = 1.0  # PyTorch's CUDA context, cuBLAS workspaces and NCCL buffers on each GPU
HEADROOM = 0.10  # fragmentation of the caching allocator, kernels' workspaces: what the trace does not see
# What a step allocates on top of the saved activations at its peak, measured on real CPU tensors by
# `python -m nanochat.memory --calibrate` (calibrate_transient; its run: bench/results/memory_cpu-2core.json):
# the loss's working set, in (chunk rows x vocab) fp32 buffers, where it peaks (small models, big vocab);
LOSS_BUFFERS = 2.1
# the backward's own allocations, in units of one block's saved activations, where it peaks (big models).
TRANSIENT_BLOCKS = 1.15


class _FlashAttention(torch.autograd.Function):
    """Stand-in for the GPU's flash attention in a trace: the same output and the same saved tensors."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: traces are forward-only
        raise NotImplementedError


def _flash_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kwargs):
    if attn_mask is not None or not is_causal:  # not a training forward: trace the real thing
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kwargs)
    if enable_gqa:  # as the kernel sees them: every query head with its own keys and values
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _FlashAttention.apply(q, k, v)


@contextlib.contextmanager
def flash_attention_model():
    """Within: the model's attention is traced as the flash kernel (see _FlashAttention)."""
    real = gpt.scaled_dot_product_attention
    gpt.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        gpt.scaled_dot_product_attention = real


def _storage_key(t):
    return t.untyped_storage()._cdata


def trace_saved(config: GPTConfig, batch: int, precision="bf16", device="cuda", loss_chunk_rows=None):
    """Bytes autograd saves for the backward in one training forward (with the loss) of `batch` rows of
    config.sequence_len tokens, traced on fake `device` tensors. Returns {"total", "per_block" (the
    largest block's), "head" (final norm, head and loss), "largest": [(bytes, dtype, shape), ...]}."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    T = config.sequence_len
    with FakeTensorMode(), flash_attention_model():
        with torch.device(device):
            model = GPT(config)
        model.init_rotary()
        model.set_precision(precision)
        if loss_chunk_rows is not None:
            model.loss_chunk_rows = loss_chunk_rows
        static = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
        saved, owner = {}, {}
        current = ["embedding"]

        def pack(t):
            key = _storage_key(t)
            if key not in static and key not in saved:
                saved[key] = (t.untyped_storage().nbytes(), t.dtype, tuple(t.shape))
                owner[key] = current[0]
            return t
        hooks = [block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
                 for i, block in enumerate(model.transformer.h)]
        # after the last block: the final norm, the head and the loss
        hooks.append(model.transformer.h[-1].register_forward_hook(lambda m, a, o: current.__setitem__(0, "head")))
        idx = torch.zeros((batch, T), dtype=torch.long, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx)
        for h in hooks:
            h.remove()
    by_owner = {}
    for key, (nbytes, _, _) in saved.items():
        by_owner[owner[key]] = by_owner.get(owner[key], 0) + nbytes
    blocks = [v for k, v in by_owner.items() if isinstance(k, int)]
    return {"total": sum(by_owner.values()), "per_block": max(blocks, default=0), "head": by_owner.get("head", 0),
            "largest": sorted(saved.values(), key=lambda s: -s[0])[:5]}


def static_bytes(config: GPTConfig, world_size: int = 1):
    """Weights, gradients and this rank's optimizer state, from the shapes (fp32 throughout), for the
    optimizers of GPT.setup_optimizers: (Dist)AdamW for the embedding and head, (Dist)Muon for the rest.
    DistAdamW keeps 1/world of each moment (rows padded to divide); DistMuon keeps the momentum of the
    matrices this rank owns (every world-th of each same-shape group)."""
    with torch.device("meta"):
        model = GPT(config)
    params = sum(p.numel() for p in model.parameters()) * 4
    adam = 0
    for p in (model.lm_head.weight, model.transformer.wte.weight):
        rows = math.ceil(p.size(0) / world_size)
        adam += 2 * rows * p[0].numel() * 4
    muon = 0
    for group in group_by_shape(model.transformer.h.parameters()):
        owned = math.ceil(len(group["params"]) / world_size)  # rank 0 owns the most
        muon += owned * group["params"][0].numel() * 4
    matrices = sum(p.numel() for p in model.transformer.h.parameters()) * 4
    # the optimizer step's own temporaries: DistMuon's reduce-scatter input and all-gather output (a copy
    # of every matrix each), or single-process Muon's stacked update and its bf16 Newton-Schulz copies
    optimizer_step = 2 * matrices if world_size > 1 else matrices + matrices // 2
    return {"weights": params, "grads": params, "optimizer": adam + muon, "optimizer_step": optimizer_step}


def loss_working_set(config: GPTConfig, batch: int, loss_chunk_rows=None, buffers=LOSS_BUFFERS):
    """Bytes the chunked loss holds besides what it saves: `buffers` (chunk rows, vocab) fp32 tensors."""
    chunk = gpt.LOSS_CHUNK_ROWS if loss_chunk_rows is None else loss_chunk_rows
    rows = batch * config.sequence_len if chunk <= 0 else min(chunk, batch * config.sequence_len)
    return int(buffers * rows * config.vocab_size * 4)


def step_memory(config: GPTConfig, batch: int, world_size: int = 1, precision="bf16", device="cuda",
                transient_blocks=TRANSIENT_BLOCKS, loss_buffers=LOSS_BUFFERS, loss_chunk_rows=None):
    """The peak bytes of one training micro-step on a worker, by part. The peak is the larger of
    - the end of the forward / start of the backward: weights + optimizer state + every saved activation +
      the transient (the loss's working set or the backward's, whichever is larger), and
    - the optimizer step: weights + gradients + optimizer state + the step's temporaries."""
    s = static_bytes(config, world_size)
    traced = trace_saved(config, batch, precision, device, loss_chunk_rows)
    transient = max(int(transient_blocks * traced["per_block"]), loss_working_set(config, batch, loss_chunk_rows, loss_buffers))
    backward = s["weights"] + s["optimizer"] + traced["total"] + transient
    optimizer = s["weights"] + s["grads"] + s["optimizer"] + s["optimizer_step"]
    return {"peak": max(backward, optimizer), "at": "backward" if backward >= optimizer else "optimizer step",
            "weights": s["weights"], "grads": s["grads"], "optimizer": s["optimizer"], "saved": traced["total"],
            "saved_per_block": traced["per_block"], "saved_head": traced["head"], "transient": transient,
            "optimizer_step": s["optimizer_step"], "largest_saved": traced["largest"]}


def usable_bytes(gpu_memory_gb):
    """Memory a training step may plan to use on one GPU of this nominal size: the usable memory (less what
    the driver keeps), less the CUDA context, less the headroom."""
    return int((1 - HEADROOM) * (gpu_memory_gb - DRIVER_RESERVED_GIB - CUDA_CONTEXT_GIB) * GiB)


_traces = {}


def cached_step_memory(config, batch, world_size=1, precision="bf16", device="cuda"):
    """step_memory, remembered per (config, batch, world, precision, device): phases share a model."""
    key = (tuple(sorted(config.to_dict().items())), batch, world_size, precision, device)
    if key not in _traces:
        _traces[key] = step_memory(config, batch, world_size, precision, device)
    return _traces[key]


def largest_batch_that_fits(config, candidates, limit, world_size=1, precision="bf16", device="cuda"):
    """(batch, step_memory) for the largest of `candidates` whose traced peak is <= limit bytes, or None.
    The saved activations grow linearly with the batch, so traces at 1 and 2 rows rank the candidates;
    the one returned is traced itself."""
    one, two = (cached_step_memory(config, b, world_size, precision, device)["peak"] for b in (1, 2))
    for b in sorted(candidates, reverse=True):
        if one + (b - 1) * (two - one) <= limit:
            m = cached_step_memory(config, b, world_size, precision, device)
            if m["peak"] <= limit:
                return b, m
    return None


# ---- measuring on real tensors (CPU) ----------------------------------------------------------------------

def measure_peak_cpu(config: GPTConfig, batch: int, precision="fp32", steps: int = 2, seed: int = 0):
    """The peak bytes of real CPU tensors over a training step (forward, backward, optimizer step), in the
    steady state (the second step: optimizer state exists), as PyTorch's MemTracker counts them."""
    from torch.distributed._tools.mem_tracker import MemTracker
    torch.manual_seed(seed)
    model = gpt.create_model(config, "cpu", precision=precision)
    optimizers = model.setup_optimizers(ns_dtype=torch.bfloat16)  # as on the GPU the trace stands for
    idx = torch.randint(0, config.vocab_size, (batch, config.sequence_len))
    tracker = MemTracker()
    tracker.track_external(model, *optimizers)
    with tracker:
        for step in range(steps):
            model(idx, idx.roll(-1, dims=1)).backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            if step == 0:
                tracker.reset_mod_stats()  # the first step creates the optimizer state: measure the next
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


# (depth, batch, seq_len, vocab): small enough for real CPU tensors; the first two have the loss set the peak
# (big vocab), the last two the backward (tiny vocab, wide blocks)
CALIBRATION_SIZES = [(2, 8, 256, 4096), (4, 4, 512, 8192), (4, 16, 256, 256), (6, 8, 256, 128)]


def calibrate_transient(sizes=CALIBRATION_SIZES, precision="fp32"):
    """For each size: the measured CPU peak, the traced peak without any transient, and the transient the gap
    implies in both units: (chunk rows x vocab) fp32 buffers and blocks' saved activations. LOSS_BUFFERS is
    the largest of the first where the loss sets the peak; TRANSIENT_BLOCKS of the second where the backward does."""
    rows = []
    for depth, batch, seq_len, vocab in sizes:
        config = GPTConfig.from_depth(depth, vocab, seq_len, head_dim=64)
        measured = measure_peak_cpu(config, batch, precision)
        m = step_memory(config, batch, 1, precision, device="cpu", transient_blocks=0, loss_buffers=0)
        gap = measured - m["weights"] - m["optimizer"] - m["saved"]
        rows.append({"depth": depth, "batch": batch, "seq_len": seq_len, "vocab": vocab, "measured_bytes": measured,
                     "traced_bytes_without_transient": m["peak"], "saved_per_block": m["saved_per_block"],
                     "loss_buffers": round(gap / loss_working_set(config, batch, buffers=1), 3),
                     "transient_blocks": round(gap / m["saved_per_block"], 3)})
    return rows


if __name__ == "__main__":
    import argparse
    import json
    parser = argparse.ArgumentParser(description="training-step memory: trace, or calibrate on real CPU tensors")
    parser.add_argument("--calibrate", action="store_true", help="measure TRANSIENT_BLOCKS on real CPU tensors")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()
    if args.calibrate:
        for row in calibrate_transient():
            print(json.dumps(row))
    else:
        cfg = GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len)
        m = step_memory(cfg, args.batch, args.world_size, args.precision)
        print(json.dumps({k: (round(v / GiB, 3) if isinstance(v, int) else v) for k, v in m.items()}, default=str))
