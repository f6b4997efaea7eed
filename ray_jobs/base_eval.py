"""CORE evaluation of a base checkpoint, spread over Ray tasks.

    python ray_jobs/base_eval.py                          # the latest base checkpoint, every example
    python ray_jobs/base_eval.py --max-per-task 100       # a quick estimate
    python ray_jobs/base_eval.py --tag d20 --step 21400 --num-workers 8

Each of --num-workers Ray tasks (one GPU each on GPU clusters, --cpus-per-worker CPUs otherwise)
loads the checkpoint and scores examples shard::num_workers of every task, so a big task spreads
over all workers; the driver sums the counts. A worker that dies is retried (max_retries); there is
no process group to rebuild. Output: <base>/eval/core_<tag>_<step>.csv (task, accuracy, centered,
n; last row the CORE mean) and, run as a script, the report's base_eval section.
"""
import argparse
import csv
import json
import time

parser = argparse.ArgumentParser(description="CORE evaluation of a base model checkpoint")
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest base tag)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the tag's last)")
parser.add_argument("--max-per-task", type=int, default=-1, help="examples per task (-1: all); a fixed random subset")
parser.add_argument("--tasks", default=None, help="comma-separated task labels (default: all 22 of core.yaml)")
parser.add_argument("--num-workers", type=int, default=None, help="Ray tasks (default: the cluster's GPUs, or 2 on CPU)")
parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: GPUs if the cluster has them")
parser.add_argument("--cpus-per-worker", type=float, default=None, help="default: 1 on CPU runs, 8 on GPU runs")


def eval_shard(tag, step, shard, num_shards, max_per_task, labels, device_type, threads):
    """One worker: (correct, n) per task label over examples shard::num_shards of every task."""
    import torch

    from nanochat.checkpoint import load_model
    from nanochat.core_eval import count_correct, example_indices, get_eval_bundle, load_core_tasks, load_task_data
    from nanochat.tokenizer import get_tokenizer
    from tasks.common import download_file

    torch.set_num_threads(max(1, threads))  # workers share the machine: no oversubscription
    device = torch.device("cuda" if device_type == "cuda" else "cpu")
    tokenizer = get_tokenizer()
    model, _ = load_model("base", device, tag=tag, step=step, expect_tokenizer=tokenizer.fingerprint())
    bundle = get_eval_bundle(download=download_file)  # already there unless this node sees other disks
    counts = {}
    for task in load_core_tasks(bundle):
        if labels is None or task["label"] in labels:
            data = load_task_data(bundle, task)
            indices = example_indices(len(data), max_per_task)[shard::num_shards]
            counts[task["label"]] = count_correct(model, tokenizer, data, task, device, indices)
    return counts


def main(args):
    import ray

    from nanochat.checkpoint import CheckpointError, checkpoint_dir, find_last_step, find_latest_tag
    from nanochat.common import atomic_write, get_base_dir, setup_logging
    from nanochat.core_eval import get_eval_bundle, load_core_tasks, summarize
    from ray_jobs.common import init_ray, submit_task
    from tasks.common import download_file

    log = setup_logging()
    t0 = time.time()
    resources = init_ray()
    # pin the checkpoint here, so every worker scores the same one even while training writes more
    tag = args.tag or find_latest_tag("base")
    if tag is None:
        raise CheckpointError(f"no complete base checkpoint under {get_base_dir() / 'checkpoints' / 'base'}")
    step = args.step if args.step is not None else find_last_step(checkpoint_dir("base", tag))
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {checkpoint_dir('base', tag)}")
    bundle = get_eval_bundle(download=download_file)  # fetch once here, not in every worker
    tasks = load_core_tasks(bundle)
    labels = None
    if args.tasks:
        labels = [label.strip() for label in args.tasks.split(",") if label.strip()]
        unknown = sorted(set(labels) - {t["label"] for t in tasks})
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; core.yaml has {[t['label'] for t in tasks]}")

    device = args.device if args.device != "auto" else ("cuda" if resources.get("GPU", 0) >= 1 else "cpu")
    num_workers = args.num_workers or max(1, int(resources.get("GPU", 0)) if device == "cuda" else 2)
    cpus = args.cpus_per_worker or (8 if device == "cuda" else 1)
    log.info("CORE eval of base/%s step %d: %d workers on %s, %s examples per task", tag, step, num_workers,
             device, "all" if args.max_per_task < 0 else args.max_per_task)
    refs = [submit_task(eval_shard, tag, step, shard, num_workers, args.max_per_task, labels, device, int(cpus),
                        num_cpus=cpus, num_gpus=1 if device == "cuda" else 0, max_retries=2, name="core_eval_shard")
            for shard in range(num_workers)]
    counts = {}
    for shard_counts in ray.get(refs):
        for label, (correct, n) in shard_counts.items():
            total = counts.get(label, (0, 0))
            counts[label] = (total[0] + correct, total[1] + n)
    result = summarize(counts, tasks)

    out = get_base_dir() / "eval" / f"core_{tag}_{step:06d}.csv"
    with atomic_write(out, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "accuracy", "centered", "n"])
        for label, r in result["tasks"].items():
            writer.writerow([label, f"{r['accuracy']:.6f}", f"{r['centered']:.6f}", r["n"]])
        writer.writerow(["CORE", "", f"{result['CORE']:.6f}", sum(r["n"] for r in result["tasks"].values())])
    for label, r in result["tasks"].items():
        log.info("%-34s accuracy %.4f  centered %+.4f  (n=%d)", label, r["accuracy"], r["centered"], r["n"])
    log.info("CORE %.4f; written to %s", result["CORE"], out)
    return {**result, "tag": tag, "step": step, "csv": str(out), "num_workers": num_workers, "device": device,
            "wall_seconds": round(time.time() - t0, 1)}


def report_section(result, args):
    """The report card's base_eval section: CORE and every task's centered accuracy."""
    return {
        "settings": {"tag": result["tag"], "step": result["step"], "max_per_task": args.max_per_task,
                     "num_workers": result["num_workers"], "device": result["device"]},
        "results": {"CORE": result["CORE"], **{label: round(r["centered"], 4) for label, r in result["tasks"].items()}},
        "wall_seconds": result["wall_seconds"],
    }


if __name__ == "__main__":
    args = parser.parse_args()
    result = main(args)
    from nanochat.report import get_report
    get_report().log("base_eval", report_section(result, args))
    print(json.dumps({"CORE": result["CORE"], "csv": result["csv"]}))
