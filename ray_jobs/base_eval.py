"""Evaluation of a base checkpoint, spread over Ray tasks: CORE, and bits per byte on the validation shard.

    python ray_jobs/base_eval.py                          # the latest base checkpoint, every example
    python ray_jobs/base_eval.py --max-per-task 100       # a quick estimate (the first 100 of each shuffled task)
    python ray_jobs/base_eval.py --tag d20 --step 21400 --num-workers 8

CORE is nanochat's (see nanochat/core_eval.py for the definition, step by step). Each of --num-workers
Ray tasks (one GPU each on GPU clusters, --cpus-per-worker CPUs otherwise) loads the checkpoint and
scores its chunks of every task (core_eval.shard_indices), so a big task spreads over all workers; the
driver sums the counts. Rows are batched by chunk, so the counts are the same for any number of workers
and equal to an in-process evaluate_core. A worker that dies is retried (max_retries); there is no
process group to rebuild.

Bits per byte, one more Ray task, twice over the same number of tokens (nanochat/loss_eval.py): on the
packed validation rows (what training evaluates) and as nanochat's seed reports it (documents in order,
consecutive rows). --device-batch-size and --eval-tokens default to the checkpoint's training settings.

Output: <base>/eval/core_<tag>_<step>.csv (task, accuracy, centered, correct, n; last row the CORE mean)
and, run as a script, the report's base_eval section.
"""
from nanochat.common import ArgumentParser, SettingsError
import csv
import time

parser = ArgumentParser(description="CORE and bits per byte of a base model checkpoint")
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest base tag)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the tag's last)")
parser.add_argument("--max-per-task", type=int, default=-1, help="examples per task (-1: all): the first N after CORE's shuffle")
parser.add_argument("--tasks", default=None, help="comma-separated task labels (default: all 22 of core.yaml)")
parser.add_argument("--max-len", type=int, default=None,
                    help="crop CORE prompts to their last N tokens (default: none, as nanochat scores its own models)")
parser.add_argument("--eval-tokens", type=int, default=None, help="tokens per bpb evaluation (default: the training run's; 0: no bpb)")
parser.add_argument("--device-batch-size", type=int, default=None, help="rows per bpb forward (default: the training run's)")
parser.add_argument("--num-workers", type=int, default=None, help="Ray tasks (default: the cluster's GPUs, or 2 on CPU)")
parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: GPUs if the cluster has them")
parser.add_argument("--cpus-per-worker", type=float, default=None, help="default: 1 on CPU runs, 8 on GPU runs")

DEFAULT_EVAL_TOKENS = 20 * 524288  # base_train's default


def _load(tag, step, device_type, threads):
    import torch

    from nanochat.checkpoint import load_model
    from nanochat.tokenizer import get_tokenizer

    torch.set_num_threads(max(1, threads))  # workers share the machine: no oversubscription
    device = torch.device("cuda" if device_type == "cuda" else "cpu")
    tokenizer = get_tokenizer()
    model, _ = load_model("base", device, tag=tag, step=step, expect_tokenizer=tokenizer.fingerprint())
    return model, tokenizer, device


def eval_shard(tag, step, shard, num_shards, max_per_task, labels, device_type, threads, max_len=None):
    """One worker: (correct, n) per task label over its chunks of every task."""
    from nanochat.core_eval import core_tasks, count_correct, get_eval_bundle, load_task_data, shard_indices, task_examples
    from tasks.common import download_file

    model, tokenizer, device = _load(tag, step, device_type, threads)
    bundle = get_eval_bundle(download=download_file)  # already there unless this node sees other disks
    counts = {}
    for position, task in enumerate(core_tasks(bundle, labels)):
        data = task_examples(load_task_data(bundle, task), max_per_task)
        indices = shard_indices(len(data), shard, num_shards, offset=position)
        counts[task["label"]] = count_correct(model, tokenizer, data, task, device, indices, max_len)
    return counts


def eval_bpb(tag, step, eval_tokens, batch_size, device_type, threads):
    """Bits per byte on the validation shard, packed and nanochat's way, over the same steps x B x T tokens."""
    from nanochat.loss_eval import evaluate_bpb, sequential_batches
    from nanochat.tokenizer import get_token_bytes, get_tokenizer_dir
    from ray_jobs.data import val_batches

    model, tokenizer, device = _load(tag, step, device_type, threads)
    T = model.config.sequence_len
    steps = max(1, eval_tokens // (batch_size * T))
    token_bytes = get_token_bytes(device=device)
    return {
        "val_bpb_packed": evaluate_bpb(model, val_batches(batch_size, T, get_tokenizer_dir(), device), steps, token_bytes),
        "val_bpb_nanochat": evaluate_bpb(model, sequential_batches(tokenizer, batch_size, T, "val", device), steps, token_bytes),
        "bpb_tokens": steps * batch_size * T,
    }


def main(args):
    import ray

    from nanochat.checkpoint import CheckpointError, checkpoint_dir, find_last_step, find_latest_tag, load_meta
    from nanochat.common import atomic_write, get_base_dir, setup_logging
    from nanochat.core_eval import core_tasks, get_eval_bundle, load_core_tasks, summarize
    from ray_jobs.common import init_ray, submit_task
    from tasks.common import download_file

    log = setup_logging()
    t0 = time.time()
    # pin the checkpoint here, so every worker scores the same one even while training writes more
    tag = args.tag or find_latest_tag("base")
    if tag is None:
        raise CheckpointError(f"no complete base checkpoint under {get_base_dir() / 'checkpoints' / 'base'}")
    step = args.step if args.step is not None else find_last_step(checkpoint_dir("base", tag))
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {checkpoint_dir('base', tag)}")
    trained = load_meta(checkpoint_dir("base", tag), step).get("settings", {})
    eval_tokens = args.eval_tokens if args.eval_tokens is not None else trained.get("eval_tokens", DEFAULT_EVAL_TOKENS)
    batch_size = args.device_batch_size or trained.get("device_batch_size", 32)
    bundle = get_eval_bundle(download=download_file)  # fetch once here, not in every worker
    labels = None
    if args.tasks:
        labels = [label.strip() for label in args.tasks.split(",") if label.strip()]
        unknown = sorted(set(labels) - {t["label"] for t in load_core_tasks(bundle)})
        if unknown:
            raise SettingsError(f"--tasks: unknown task(s) {unknown}; core.yaml has {[t['label'] for t in load_core_tasks(bundle)]}")
    tasks = core_tasks(bundle, labels)

    resources = init_ray()
    device = args.device if args.device != "auto" else ("cuda" if resources.get("GPU", 0) >= 1 else "cpu")
    num_workers = args.num_workers or max(1, int(resources.get("GPU", 0)) if device == "cuda" else 2)
    cpus = args.cpus_per_worker or (8 if device == "cuda" else 1)
    log.info("CORE eval of base/%s step %d: %d workers on %s, %s examples per task", tag, step, num_workers,
             device, "all" if args.max_per_task < 0 else args.max_per_task)
    resources_per_task = dict(num_cpus=cpus, num_gpus=1 if device == "cuda" else 0, max_retries=2)
    refs = [submit_task(eval_shard, tag, step, shard, num_workers, args.max_per_task, labels, device, int(cpus), args.max_len,
                        name="core_eval_shard", **resources_per_task) for shard in range(num_workers)]
    bpb_ref = submit_task(eval_bpb, tag, step, eval_tokens, batch_size, device, int(cpus), name="bpb_eval",
                          **resources_per_task) if eval_tokens > 0 else None
    counts = {}
    for shard_counts in ray.get(refs):
        for label, (correct, n) in shard_counts.items():
            total = counts.get(label, (0, 0))
            counts[label] = (total[0] + correct, total[1] + n)
    result = summarize(counts, tasks)
    bpb = ray.get(bpb_ref) if bpb_ref is not None else {}

    out = get_base_dir() / "eval" / f"core_{tag}_{step:06d}.csv"
    with atomic_write(out, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "accuracy", "centered", "correct", "n"])
        for label, r in result["tasks"].items():
            writer.writerow([label, f"{r['accuracy']:.6f}", f"{r['centered']:.6f}", r["correct"], r["n"]])
        writer.writerow(["CORE", "", f"{result['CORE']:.6f}", sum(r["correct"] for r in result["tasks"].values()),
                         sum(r["n"] for r in result["tasks"].values())])
    for label, r in result["tasks"].items():
        log.info("%-34s accuracy %.4f  centered %+.4f  (%d/%d)", label, r["accuracy"], r["centered"], r["correct"], r["n"])
    log.info("CORE %.4f; written to %s", result["CORE"], out)
    if bpb:
        log.info("val bpb over %d tokens: %.4f packed, %.4f as nanochat", bpb["bpb_tokens"], bpb["val_bpb_packed"], bpb["val_bpb_nanochat"])
    return {**result, **bpb, "tag": tag, "step": step, "csv": str(out), "num_workers": num_workers, "device": device,
            "wall_seconds": round(time.time() - t0, 1)}


def report_section(result, args):
    """The report card's base_eval section: CORE, every task's centered accuracy, both bpb numbers, and
    which definition each follows."""
    from nanochat.core_eval import CORE_DEFINITION
    from nanochat.loss_eval import BPB_NANOCHAT_DEFINITION, BPB_PACKED_DEFINITION
    bpb = {k: result[k] for k in ("val_bpb_packed", "val_bpb_nanochat", "bpb_tokens") if k in result}
    return {
        "settings": {"tag": result["tag"], "step": result["step"], "max_per_task": args.max_per_task, "max_len": args.max_len,
                     "num_workers": result["num_workers"], "device": result["device"]},
        "results": {"CORE": result["CORE"], **bpb, **{label: round(r["centered"], 4) for label, r in result["tasks"].items()}},
        "definitions": {"CORE": CORE_DEFINITION + " (per task: centered accuracy)", "val_bpb_packed": BPB_PACKED_DEFINITION,
                        "val_bpb_nanochat": BPB_NANOCHAT_DEFINITION},
        "wall_seconds": result["wall_seconds"],
    }


if __name__ == "__main__":
    from ray_jobs.common import run_phase_script
    run_phase_script(main, parser, "base_eval", report_section)
