"""Checkpoints for every phase: model weights, per-rank optimizer shards and JSON metadata.

Layout: <base>/checkpoints/<phase>/<tag>/step_000123/
    model.pt           model state dict (torch file, loaded with weights_only=True: loading runs no code)
    optim_rank{r}.pt   rank r's optimizer state dicts, one per optimizer, in the order they were passed
    meta.json          written LAST, by rank 0, after every rank has written: its presence marks the
                       checkpoint complete. It records the format version, step, model config, tokenizer
                       fingerprint, the saving world size and optimizer classes (the shard layout), the size
                       of every file (to catch truncation), plus whatever the caller passes (loss,
                       data-loader position, phase, ...).
Every file is written atomically (temp file + rename), so a killed run never leaves a half file in place.

Optimizer shards saved by N ranks load on M ranks: the N shards are merged into the state a
single-process optimizer would hold, then each rank keeps its own slice (see DistAdamW / DistMuon).
"""
import json
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat.adamw import DistAdamW
from nanochat.common import NanochatError, atomic_write, atomic_write_text, get_base_dir, get_dist_info, logger
from nanochat.gpt import GPT, GPTConfig
from nanochat.muon import DistMuon
from nanochat.precision import PRECISIONS, resolve_precision

FORMAT_VERSION = 1
SLOW_WRITE_ENV = "NANOCHAT_CHECKPOINT_DELAY_S"  # seconds every save takes longer, as on slow shared storage
META = "meta.json"
MODEL = "model.pt"
# param-group keys that describe an optimizer's implementation, not training state: never restored
IMPL_KEYS = {"params", "fused", "foreach", "capturable", "differentiable"}
CHAT_PHASES = ("sft", "mid", "rl")  # where the latest chat checkpoint is looked for, in this order


class CheckpointError(NanochatError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or not the one the caller expects."""


def checkpoint_dir(phase, tag, base_dir=None) -> Path:
    """<base>/checkpoints/<phase>/<tag>, e.g. phase "base" / "mid" / "sft" / "rl", tag "d20"."""
    return Path(base_dir or get_base_dir()) / "checkpoints" / phase / tag


def step_dir(ckpt_dir, step) -> Path:
    return Path(ckpt_dir) / f"step_{step:06d}"


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module; save the original's keys


def _save_torch(path, obj):
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path).stat().st_size


def save_checkpoint(ckpt_dir, step, model, optimizers=None, meta=None, tokenizer_fingerprint=None):
    """Save one checkpoint; call on every rank (collective when distributed). Rank 0 writes the model and
    meta.json, every rank writes its optimizer shard. `meta`: anything JSON-able the caller wants back
    (loss, data-loader position, phase, ...). Returns the step directory."""
    _, rank, _, world = get_dist_info()
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    out = step_dir(ckpt_dir, step)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / META).unlink(missing_ok=True)  # re-saving a step: it is incomplete until the new meta lands
    sizes = {}
    if rank == 0:
        sizes[MODEL] = _save_torch(out / MODEL, _unwrap(model).state_dict())
    if optimizers:
        name = f"optim_rank{rank}.pt"
        sizes[name] = _save_torch(out / name, {"optimizers": [opt.state_dict() for opt in optimizers]})
    delay = float(os.environ.get(SLOW_WRITE_ENV, 0))  # fault injection: storage this slow (tests of `ray job stop`)
    if delay:
        time.sleep(delay)
    if distributed:  # wait for every rank's files (and learn their sizes) before marking complete
        gathered = [None] * world
        dist.all_gather_object(gathered, sizes)
        sizes = {k: v for s in gathered for k, v in s.items()}
    if rank == 0:
        record = dict(meta or {})
        record.update({
            "format_version": FORMAT_VERSION,
            "step": step,
            "model_config": _unwrap(model).config.to_dict(),
            "tokenizer": tokenizer_fingerprint,
            "world_size": world if optimizers else None,
            "optimizers": [type(opt).__name__ for opt in optimizers or []],
            "files": sizes,
        })
        atomic_write_text(out / META, json.dumps(record, indent=2, sort_keys=True))
    if distributed:
        dist.barrier()  # nobody returns (and, say, deletes or reloads) before the checkpoint is complete
    return out


def find_last_step(ckpt_dir):
    """The largest step with a complete checkpoint (meta.json present) in ckpt_dir, or None."""
    steps = [int(m.group(1)) for d in Path(ckpt_dir).glob("step_*")
             if (m := re.fullmatch(r"step_(\d+)", d.name)) and (d / META).is_file()]
    return max(steps, default=None)


def find_latest_tag(phase, base_dir=None):
    """The tag under checkpoints/<phase>/ whose newest complete checkpoint was written last, or None."""
    latest = {}
    for tag_dir in (Path(base_dir or get_base_dir()) / "checkpoints" / phase).glob("*"):
        step = find_last_step(tag_dir)
        if step is not None:
            latest[tag_dir.name] = (step_dir(tag_dir, step) / META).stat().st_mtime
    return max(latest, key=latest.get, default=None)


def load_meta(ckpt_dir, step):
    """The metadata of a complete checkpoint, after checking that every file it lists is whole."""
    d = step_dir(ckpt_dir, step)
    path = d / META
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: no complete checkpoint at step {step} in {ckpt_dir}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta['format_version']} is newer than this code's "
                              f"({FORMAT_VERSION}); update nanochat to load it")
    for name, size in meta["files"].items():
        f = d / name
        actual = f.stat().st_size if f.is_file() else None
        if actual != size:
            what = "missing" if actual is None else f"{actual} bytes, expected {size} (truncated or overwritten)"
            raise CheckpointError(f"checkpoint file {f} is {what}")
    return meta


def _load_torch(path, map_location):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's errors for a bad file are deep and cryptic: name the file instead
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {type(e).__name__}: {e}") from None


def check_meta(meta, expect_config=None, expect_tokenizer=None, where=""):
    """Refuse a checkpoint saved for another model shape or tokenizer, saying what differs."""
    if expect_config is not None:
        want = expect_config.to_dict() if isinstance(expect_config, GPTConfig) else dict(expect_config)
        got = meta["model_config"]
        diffs = [f"{k}={got.get(k)} (expected {v})" for k, v in want.items() if got.get(k) != v]
        if diffs:
            raise CheckpointError(f"checkpoint {where} has a different model config: {', '.join(diffs)}")
    if expect_tokenizer is not None and meta.get("tokenizer") != expect_tokenizer:
        raise CheckpointError(f"checkpoint {where} was trained with tokenizer {meta.get('tokenizer')!r}, "
                              f"but the tokenizer in use is {expect_tokenizer!r}")


def load_model_state(ckpt_dir, step, device="cpu"):
    """(model state dict, meta) of a complete checkpoint, without building a model."""
    meta = load_meta(ckpt_dir, step)
    return _load_torch(step_dir(ckpt_dir, step) / MODEL, map_location=device), meta


def build_model(ckpt_dir, step, device, phase="eval", expect_config=None, expect_tokenizer=None, precision=None):
    """Rebuild the model saved at `step` on `device`, ready for phase "train" (model.train()) or "eval"
    (model.eval()), its matmuls in `precision` (default: auto for the device, see precision.resolve_precision).
    For "eval" the weights are held in that precision too (bf16 on GPUs: inference reads each weight once per
    step); for "train" they stay fp32, the optimizers' master copy. Returns (model, meta). Raises
    CheckpointError on a mismatch or a damaged file."""
    assert phase in ("train", "eval"), f"phase is 'train' or 'eval', got {phase!r}"
    meta = load_meta(ckpt_dir, step)
    check_meta(meta, expect_config, expect_tokenizer, where=str(step_dir(ckpt_dir, step)))  # before reading the weights
    state = _load_torch(step_dir(ckpt_dir, step) / MODEL, map_location=device)
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    model.to_empty(device=device)
    precision = resolve_precision(precision, torch.device(device).type)
    if phase == "eval":
        model.to(dtype=PRECISIONS[precision])
    model.init_rotary()  # derived tables are not in the checkpoint (built in fp32)
    model.load_state_dict(state)  # copies (and casts) the saved weights in
    model.set_precision(precision)
    model.train(phase == "train")
    return model, meta


def load_model(phase, device, mode="eval", tag=None, step=None, base_dir=None, **expect):
    """Convenience: the model of checkpoints/<phase>/<tag>/ at `step` (defaults: the latest tag and step)."""
    tag = tag or find_latest_tag(phase, base_dir)
    if tag is None:
        raise CheckpointError(f"no complete checkpoint under {Path(base_dir or get_base_dir()) / 'checkpoints' / phase}")
    d = checkpoint_dir(phase, tag, base_dir)
    step = find_last_step(d) if step is None else step
    logger.info("loading %s step %s", d, step)
    return build_model(d, step, device, phase=mode, **expect)


def spec_path(spec, base_dir=None) -> Path:
    """A checkpoint spec's directory: the path itself if it exists (or is absolute), else under <base>/checkpoints."""
    path = Path(spec)
    return path if path.is_absolute() or path.exists() else Path(base_dir or get_base_dir()) / "checkpoints" / path


def resolve_checkpoint(spec=None, base_dir=None):
    """(checkpoint dir, step) for a checkpoint spec: a step directory (.../step_000123), a tag directory (its
    last step), or a path relative to <base>/checkpoints (e.g. "sft/d20"); None means the latest chat
    checkpoint (sft, else mid, else rl)."""
    root = Path(base_dir or get_base_dir()) / "checkpoints"
    if spec is None:
        phase = next((p for p in CHAT_PHASES if find_latest_tag(p, base_dir) is not None), None)
        if phase is None:
            raise CheckpointError(f"no chat checkpoint (sft, mid or rl) under {root}: train one, or pass one")
        spec = root / phase / find_latest_tag(phase, base_dir)
    path = spec_path(spec, base_dir)
    if (path / META).is_file() and path.name.startswith("step_"):
        return path.parent, int(path.name.removeprefix("step_"))
    step = find_last_step(path)
    if step is None:
        raise CheckpointError(f"no complete checkpoint at {path}")
    return path, step


def check_for_inference(spec=None, base_dir=None, tokenizer_dir=None):
    """What load_for_inference would refuse, found without reading the weights (a server's driver checks it
    before deploying): the checkpoint is complete, the tokenizer there, and the one it was trained with.
    CheckpointError or TokenizerError; returns the checkpoint's path."""
    from nanochat import export
    from nanochat.tokenizer import get_tokenizer
    path = None if spec is None else spec_path(spec, base_dir)
    if path is not None and export.is_exported_dir(path) and tokenizer_dir is None:
        return path  # it brings its own tokenizer
    path, step = resolve_checkpoint(spec, base_dir)
    meta = load_meta(path, step)
    tokenizer = get_tokenizer(tokenizer_dir or Path(base_dir or get_base_dir()) / "tokenizer")
    if meta.get("tokenizer") and meta["tokenizer"] != tokenizer.fingerprint():
        raise CheckpointError(f"{path} step {step} was trained with tokenizer {meta['tokenizer']}, but the tokenizer "
                              f"in use is {tokenizer.fingerprint()}")
    return path


def load_for_inference(spec=None, device="cpu", base_dir=None, tokenizer_dir=None):
    """(model in eval mode, tokenizer, meta) for a checkpoint spec (see resolve_checkpoint) or a directory
    written by nanochat.export, which carries its own tokenizer. Refuses a checkpoint trained with another
    tokenizer than the one it would be run with."""
    from nanochat import export  # imports this module
    from nanochat.tokenizer import get_tokenizer
    path = None if spec is None else spec_path(spec, base_dir)
    if path is not None and export.is_exported_dir(path):
        model, tokenizer, meta = export.load_exported(path, device)
        where = str(path)
    else:
        path, step = resolve_checkpoint(spec, base_dir)
        model, meta = build_model(path, step, device, phase="eval")
        tokenizer, where = None, f"{path} step {step}"
    trained_with = meta.get("tokenizer")
    if tokenizer is None or tokenizer_dir is not None:
        tokenizer = get_tokenizer(tokenizer_dir)
    if trained_with and trained_with != tokenizer.fingerprint():
        raise CheckpointError(f"{where} was trained with tokenizer {trained_with}, but the tokenizer in use "
                              f"is {tokenizer.fingerprint()}")
    return model, tokenizer, {**meta, "path": str(path)}


def _restore_groups(opt, saved_groups, where):
    """The optimizer's own param groups, with the saved training hyperparameters (lr, betas, momentum,
    initial_lr, ...) put back; implementation flags (fused, foreach, ...) stay the current optimizer's."""
    current = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in current] != [len(g["params"]) for g in saved_groups]:
        raise CheckpointError(f"{where}: optimizer param groups differ from the checkpoint's")
    return [{**cur, **{k: v for k, v in saved.items() if k in cur and k not in IMPL_KEYS}}
            for cur, saved in zip(current, saved_groups)]


def load_optimizers(optimizers, ckpt_dir, step):
    """Restore optimizer state saved by any number of ranks into these optimizers (this rank's share).
    Returns the checkpoint's meta."""
    _, rank, _, world = get_dist_info()
    meta = load_meta(ckpt_dir, step)
    d = step_dir(ckpt_dir, step)
    saved_classes = meta["optimizers"]
    if not saved_classes:
        raise CheckpointError(f"{d} holds no optimizer state (saved for inference only)")
    if len(saved_classes) != len(optimizers):
        raise CheckpointError(f"{d} holds state for {len(saved_classes)} optimizers, got {len(optimizers)}")
    same_layout = meta["world_size"] == world and saved_classes == [type(o).__name__ for o in optimizers]
    ranks = [rank] if same_layout else range(meta["world_size"])
    shards = [_load_torch(d / f"optim_rank{r}.pt", map_location="cpu")["optimizers"] for r in ranks]
    for i, (opt, saved_class) in enumerate(zip(optimizers, saved_classes)):
        if same_layout:
            opt.load_state_dict({**shards[0][i], "param_groups": _restore_groups(opt, shards[0][i]["param_groups"], d)})
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        per_rank = [s[i] for s in shards]
        # merge N shards into the single-process layout, then let the optimizer take its own slice
        merge = {"DistAdamW": DistAdamW.merge_shards, "DistMuon": DistMuon.merge_shards}.get(saved_class)
        full = merge(per_rank, params) if merge else per_rank[0]
        full = {**full, "param_groups": _restore_groups(opt, full["param_groups"], d)}
        getattr(opt, "load_full_state_dict", opt.load_state_dict)(full)
    return meta
