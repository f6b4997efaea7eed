"""The one script to run on a lent GPU: plain PyTorch and nanochat/ (Ray does not travel there). One JSON out.

    python bench/gpu_check.py --out $OUT/gpu_check.json                   # ~5 minutes on one H100/H200
    python bench/gpu_check.py --skip train,engine --out $OUT/rerun.json   # a rerun: only what failed
    python bench/gpu_check.py --tiny --device cpu --out /tmp/rehearsal.json   # the CPU rehearsal (a test runs it)

It first checks that everything it needs imports and that the GPU is there, and exits with one line when
not (no device minute lost to a typo). Then the sections, in order; each can be skipped with --skip, an
error in one (out of memory included) is recorded in its entry and the next one runs, and the JSON is
rewritten after every section (a run killed at its time limit keeps what finished). Compiled kernels are
cached under --cache-dir (TORCHINDUCTOR_CACHE_DIR), kept between sections and between runs on one machine.
- train: a d20 training step (B=32 rows of T=2048, vocab 65536, bf16, torch.compile'd; the batch the
  planner picks for an 80 GB GPU if that differs): tokens/s, MFU and peak memory next to the planner's
  prediction (nanochat.memory, traced for this one GPU's optimizer state); then eager at the planner's
  eager batch. MFU = estimate_flops() (6 per matmul weight + 12 * layers * heads * head_dim * T, no causal
  halving, as nanochat counts) * tokens/s / 989e12 (dense bf16 peak of an H100 SXM or H200): comparable
  with nanochat's logs (~41% at d12, 46% at d18, 44% at d26 on H100s). --depths 12,26 adds other depths.
- engine: d20 with random weights held in bf16: prefill tokens/s of a 512-token prompt, and decode tokens/s
  at batch 1 and with 32 ragged requests (BatchDecoder), eager and on the static-shape (CUDA-graph) path,
  each as MBU: the bytes a decode step must read (the bf16 weights bar the embedding table, plus the KV of
  the positions filled so far) / step time / the GPU's HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s).
- correctness: after a few training steps (not at init, where every loss is ln(vocab)), the bf16 loss
  within 2% of fp32's on the same batch and the gradient norm within 5%; greedy decoding with the KV cache
  equal to the full forward for 64 tokens; a Muon step finite; the chunked loss equal to the plain one.
"""
import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a bare checkout: no install needed

parser = argparse.ArgumentParser(description="measure the core on one GPU: training MFU and memory, decode bandwidth, correctness")
parser.add_argument("--out", required=True, help="the JSON file to write")
parser.add_argument("--skip", default="", help="comma-separated sections to skip: train, engine, correctness")
parser.add_argument("--depths", default="", help="more training depths besides 20, e.g. 12,26")
parser.add_argument("--device", default="cuda", help="cuda; cpu only for the --tiny rehearsal")
parser.add_argument("--tiny", action="store_true", help="tiny sizes everywhere: a rehearsal of every code path (CPU is fine)")
parser.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
parser.add_argument("--cache-dir", default=str(REPO / ".cache" / "inductor"), help="compiled kernels, kept between runs")
SECTIONS = ("train", "engine", "correctness")


def check_prerequisites(args):
    """One line and exit 2 when something this script needs is missing; the environment otherwise."""
    problems = []
    try:
        import torch
    except ImportError as e:
        sys.exit(f"gpu_check: cannot import torch ({e}): install PyTorch first")
    for module in ("nanochat.gpt", "nanochat.engine", "nanochat.memory", "torch._subclasses.fake_tensor"):
        try:
            __import__(module)
        except Exception as e:  # a missing package or a syntax error in the checkout: say which, stop
            problems.append(f"cannot import {module} ({type(e).__name__}: {e})")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible (torch.cuda.is_available() is False): run on the GPU machine, or --tiny --device cpu")
    bad = [s for s in args.skip.split(",") if s and s not in SECTIONS]
    if bad:
        problems.append(f"--skip {','.join(bad)}: sections are {', '.join(SECTIONS)}")
    if problems:
        sys.exit("gpu_check: " + "; ".join(problems))
    from nanochat.common import gpu_specs
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": args.device,
           "cuda": torch.version.cuda, "tiny": args.tiny}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), sm=f"{props.major}.{props.minor}")
        env["peak_flops"], env["hbm_bytes_per_s"] = gpu_specs(props.name)
    return env


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory():
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---- train ---------------------------------------------------------------------------------------------

def train_sizes(args):
    """(depth, seq_len, vocab, 8-GPU run's batch candidates) per configuration."""
    if args.tiny:
        return [(2, 64, 512)]
    return [(d, 2048, 65536) for d in [20] + [int(x) for x in args.depths.split(",") if x]]


def planned_batch(config, device_type):
    """The device batch the planner picks for an 80 GB GPU in an 8-GPU run (from the eager trace, which bounds
    the compiled step from above), at most 32 (a d20 run's 524288 tokens per step over 8 GPUs)."""
    from nanochat.memory import largest_batch_that_fits, usable_bytes
    candidates = [b for b in (32, 16, 8, 4, 2, 1)]
    fit = largest_batch_that_fits(config, candidates, usable_bytes(80), world_size=8, precision="bf16", device=device_type)
    return fit[0] if fit else 1


def time_training(config, batch, device, compile_model, steps, peak_flops):
    """A training step (forward, backward, both optimizers) at `batch` rows: median time, tokens/s, MFU,
    peak memory; the first steps (compilation) are warm-up and not timed."""
    import torch
    from nanochat.gpt import create_model
    from nanochat.memory import step_memory
    free_memory()
    torch.manual_seed(0)
    model = create_model(config, device, precision="bf16")
    optimizers = model.setup_optimizers()
    forward = torch.compile(model, dynamic=False) if compile_model else model
    x = torch.randint(0, config.vocab_size, (batch, config.sequence_len), device=device)
    y = x.roll(-1, dims=1)

    def step():
        loss = forward(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]
    tokens_per_s = batch * config.sequence_len / dt
    out = {"batch": batch, "compiled": compile_model, "step_ms": round(1000 * dt, 2), "tokens_per_s": round(tokens_per_s),
           "warmup_s": round(warmup_s, 1), "loss": round(loss.item(), 4), "flops_per_token": model.estimate_flops()}
    if peak_flops:
        out["mfu"] = round(model.estimate_flops() * tokens_per_s / peak_flops, 4)
    predicted = step_memory(config, batch, 1, "bf16", device="cuda")["peak"]
    out["planner_peak_gib"] = round(predicted / 2**30, 2)
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["peak_vs_planner"] = round(torch.cuda.max_memory_allocated(device) / predicted, 3)
    del model, optimizers, forward
    return out


def section_train(args, env):
    import torch
    from nanochat.gpt import GPTConfig
    device = torch.device(args.device)
    results = {}
    for depth, seq_len, vocab in train_sizes(args):
        config = GPTConfig.from_depth(depth, vocab, seq_len)
        batch = planned_batch(config, device.type) if not args.tiny else 4  # 32 at d20
        entry = {"config": config.to_dict(), "planner_batch_80gb": batch}
        for name, b, compile_model in (("compiled", batch, True), ("eager", batch, False)):
            try:
                entry[name] = time_training(config, b, device, compile_model and not args.tiny, args.steps, env.get("peak_flops"))
            except torch.cuda.OutOfMemoryError as e:
                entry[name] = {"batch": b, "error": f"out of memory: {str(e).splitlines()[0]}"}
            free_memory()
        results[f"d{depth}"] = entry
    return results


# ---- engine --------------------------------------------------------------------------------------------

class RandomIdTokenizer:
    """What the engine asks of a tokenizer, with special ids outside the vocabulary: random weights never
    stop a request early, so every decode step is counted."""

    def __init__(self, vocab_size):
        from nanochat.tokenizer import SPECIAL_TOKENS
        self.special = {name: vocab_size + 1 + i for i, name in enumerate(SPECIAL_TOKENS)}

    def encode_special(self, name):
        return self.special[name]

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def decode(self, ids):
        return ""

    def encode(self, text, prepend=None, append=None):
        return []


def decode_bytes(model, rows, positions):
    """Bytes one decode step must read: the weights as held (the embedding table aside: it is indexed, not
    read whole) plus the keys and values of every position cached so far in each row."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "wte" not in name)
    kv_per_position = 2 * cfg.n_layer * cfg.n_kv_head * (cfg.n_embd // cfg.n_head) * next(model.parameters()).element_size()
    return weights + kv_per_position * sum(positions)


def section_engine(args, env):
    import torch
    from nanochat.engine import BatchDecoder
    from nanochat.gpt import GPTConfig, create_model
    device = torch.device(args.device)
    depth, vocab, prompt_len, new_tokens = (2, 512, 32, 16) if args.tiny else (20, 65536, 512, 128)
    config = GPTConfig.from_depth(depth, vocab, 2048 if not args.tiny else 128)
    free_memory()
    torch.manual_seed(0)
    model = create_model(config, device).eval()
    if device.type == "cuda":
        model.to(torch.bfloat16)  # inference holds bf16 weights: a third of fp32's bytes per step
    tokenizer = RandomIdTokenizer(vocab)
    hbm = env.get("hbm_bytes_per_s")
    results = {"config": config.to_dict(), "weights_dtype": str(next(model.parameters()).dtype)}
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        prompt = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)
        model(prompt)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            model(prompt)
        sync(device)
        results["prefill_tokens_per_s"] = round(3 * prompt_len / (time.perf_counter() - t0))
    for name, static in (("eager", False), ("static", True)):
        for batch in (1, 32) if not args.tiny else (1, 4):
            key = f"{name}_batch{batch}"
            try:
                decoder = make_decoder(model, tokenizer, batch, static)
            except TypeError as e:  # an engine without the static path: say so, measure the rest
                results[key] = {"error": f"not available: {e}"}
                continue
            lengths = [prompt_len] if batch == 1 else [prompt_len // 2 + (i * prompt_len) // batch for i in range(batch)]  # ragged
            for i, n in enumerate(lengths):
                decoder.add(i, torch.randint(0, vocab, (n,), generator=g).tolist(), max_tokens=new_tokens, temperature=0.0)
            decoder.step()  # prefill (and, on the static path, capture)
            decoder.step()
            sync(device)
            steps, t0 = 0, time.perf_counter()
            while decoder.stats()["requests"]:
                decoder.step()
                steps += 1
            sync(device)
            dt = (time.perf_counter() - t0) / max(1, steps)
            avg_positions = [n + 2 + steps / 2 for n in lengths]
            entry = {"step_ms": round(1000 * dt, 3), "tokens_per_s": round(batch / dt), "steps": steps}
            if hbm:
                entry["mbu"] = round(decode_bytes(model, batch, avg_positions) / dt / hbm, 4)
            results[key] = entry
    del model
    return results


def make_decoder(model, tokenizer, batch, static):
    from nanochat.engine import BatchDecoder
    if not static:
        return BatchDecoder(model, tokenizer, max_batch=batch)
    return BatchDecoder(model, tokenizer, max_batch=batch, static=True)


# ---- correctness ---------------------------------------------------------------------------------------

def section_correctness(args, env):
    import torch
    from nanochat.engine import KVCache
    from nanochat.gpt import GPTConfig, create_model, softcap_cross_entropy
    device = torch.device(args.device)
    depth, vocab, T, B = (2, 512, 64, 4) if args.tiny else (12, 65536, 1024, 8)
    config = GPTConfig.from_depth(depth, vocab, T)
    free_memory()
    torch.manual_seed(0)
    model = create_model(config, device, precision="bf16")
    optimizers = model.setup_optimizers()
    g = torch.Generator().manual_seed(2)
    # a learnable sequence (a few repeating patterns), so a few steps move the loss well off ln(vocab)
    pattern = torch.randint(0, vocab, (B, 64), generator=g)
    x = pattern.repeat(1, T // 64 + 1)[:, :T].to(device)
    y = pattern.repeat(1, T // 64 + 1)[:, 1:T + 1].to(device)
    out = {"config": config.to_dict()}
    losses = []
    for _ in range(8):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    out["train_losses"] = [round(v, 4) for v in losses]
    out["muon_step_finite"] = all(torch.isfinite(p).all().item() for p in model.parameters())

    def loss_and_grad_norm(precision):
        model.set_precision(precision)
        model.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters())).item()
        model.zero_grad(set_to_none=True)
        return loss.item(), norm
    (l16, n16), (l32, n32) = loss_and_grad_norm("bf16"), loss_and_grad_norm("fp32")
    out["bf16_vs_fp32"] = {"loss_bf16": round(l16, 5), "loss_fp32": round(l32, 5), "loss_rel": round(abs(l16 - l32) / l32, 5),
                           "grad_norm_bf16": round(n16, 5), "grad_norm_fp32": round(n32, 5), "grad_norm_rel": round(abs(n16 - n32) / n32, 5)}
    out["bf16_vs_fp32"]["ok"] = out["bf16_vs_fp32"]["loss_rel"] < 0.02 and out["bf16_vs_fp32"]["grad_norm_rel"] < 0.05
    # greedy decoding through the KV cache equals the full forward's argmax, token by token
    model.set_precision("bf16" if device.type == "cuda" else "fp32")
    model.eval()
    with torch.inference_mode():
        ids = x[:1, :16].clone()
        cache = KVCache.for_model(model, 1, 16 + 64)
        logits = model(ids, kv_cache=cache)[:, -1]
        cached, full = [], ids.clone()
        for _ in range(64):
            nxt = logits.argmax(-1, keepdim=True)
            cached.append(nxt.item())
            logits = model(nxt, kv_cache=cache)[:, -1]
        for _ in range(64):
            full = torch.cat([full, model(full)[:, -1].argmax(-1, keepdim=True)], dim=1)
        out["greedy_cache_equals_full"] = cached == full[0, 16:].tolist()
        out["greedy_agree_tokens"] = next((i for i, (a, b) in enumerate(zip(cached, full[0, 16:].tolist())) if a != b), 64)
    # the chunked loss against the plain one, on the trained head, with gradients
    h = torch.randn(4096 if not args.tiny else 256, config.n_embd, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = model.lm_head.weight.detach().clone().requires_grad_(True)
    t = torch.randint(0, vocab, (h.size(0),), device=device)
    results = []
    for chunk in (0, 1024 if not args.tiny else 64):
        loss = softcap_cross_entropy(h, w, t, vocab, "mean", chunk_rows=chunk)
        results.append((loss.item(), *torch.autograd.grad(loss, (h, w))))
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    out["chunked_loss"] = {"loss_plain": round(results[0][0], 6), "loss_chunked": round(results[1][0], 6),
                           "grad_h_rel": round(rel(results[1][1], results[0][1]), 6), "grad_w_rel": round(rel(results[1][2], results[0][2]), 6)}
    out["chunked_loss"]["ok"] = abs(results[0][0] - results[1][0]) < 1e-3 * abs(results[0][0]) and out["chunked_loss"]["grad_w_rel"] < 1e-2
    del model, optimizers
    return out


# ---- main ----------------------------------------------------------------------------------------------

def main(args):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", args.cache_dir)
    env = check_prerequisites(args)
    import torch
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = {"bench": "gpu_check", "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]), "environment": env}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    for name, section in (("train", section_train), ("engine", section_engine), ("correctness", section_correctness)):
        if name in skip:
            report[name] = {"skipped": True}
            continue
        t0 = time.time()
        try:
            report[name] = section(args, env)
        except Exception as e:  # recorded; the next section still runs
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=5)}
        report[name]["section_seconds"] = round(time.time() - t0, 1)
        free_memory()
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"gpu_check: {name} done in {report[name]['section_seconds']} s", flush=True)
    print(json.dumps(summary(report)))
    return report


def summary(report):
    """The headline numbers, one line: what the README's table shows."""
    s = {}
    for depth, entry in (report.get("train") or {}).items():
        if isinstance(entry, dict):
            for mode in ("compiled", "eager"):
                m = entry.get(mode) or {}
                if "mfu" in m or "tokens_per_s" in m:
                    s[f"{depth}_{mode}"] = {k: m.get(k) for k in ("batch", "tokens_per_s", "mfu", "peak_gib", "planner_peak_gib")}
    engine = report.get("engine") or {}
    s["engine"] = {k: v for k, v in engine.items() if k.startswith(("eager", "static", "prefill"))}
    c = report.get("correctness") or {}
    s["correctness"] = {k: (c[k].get("ok") if isinstance(c.get(k), dict) else c.get(k))
                        for k in ("bf16_vs_fp32", "greedy_cache_equals_full", "muon_step_finite", "chunked_loss") if k in c}
    return s


if __name__ == "__main__":
    main(parser.parse_args())
