"""The tiny base pretraining run (ray_jobs/base_train.py --preset tiny, the real path: TorchTrainer,
Ray Data streaming, checkpoints) on 1 worker and on 2 workers sharing the same CPUs: wall time and
steady-state tokens/s of each. Prints ONE JSON line.

    NANOCHAT_MIRROR=../shared/datasets NANOCHAT_BASE_DIR=/tmp/bench_base RAY_ADDRESS=local \\
        python bench/base_train.py --out bench/results/base_train_tiny_cpu-2core.json

Every worker count gets --cpus CPUs in all (1 worker: all of them as torch threads; 2 workers: half
each), so the comparison is one process using the cores against data parallelism over them. Steady
state: the tokens of every step but the first over the time of those steps (the run's train_seconds).
A tokenizer is trained first when the base dir has none (not counted).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import emit, machine_info  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated")
parser.add_argument("--cpus", type=int, default=2, help="CPUs shared by the workers of each run")
parser.add_argument("--num-iterations", type=int, default=None, help="steps per run (default: the tiny preset's)")
parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer trained when the base dir has none")
parser.add_argument("--tok-max-chars", type=int, default=20_000_000)
parser.add_argument("--out", default=None, help="also write the JSON line to this file")


def main(args):
    from nanochat.tokenizer import get_tokenizer_dir
    from ray_jobs import base_train, tok_train
    from ray_jobs.common import init_ray

    if not any(get_tokenizer_dir().glob("*")):
        tok_train.main(tok_train.parser.parse_args(["--max-chars", str(args.tok_max_chars), "--vocab-size", str(args.vocab_size)]))
    info = machine_info()
    info["ray_cpus"] = init_ray().get("CPU")
    runs = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        flags = ["--preset", "tiny", "--num-workers", str(workers), "--cpus-per-worker", str(args.cpus / workers),
                 "--tag", f"bench-w{workers}-{time.time_ns()}"]
        if args.num_iterations:
            flags += ["--num-iterations", str(args.num_iterations)]
        t0 = time.time()
        summary = base_train.main(base_train.parser.parse_args(flags))
        wall = time.time() - t0
        steps = summary["step"]
        tokens_per_step = summary["tokens_trained"] / steps
        runs[f"{workers}_worker{'s' if workers > 1 else ''}"] = {
            "workers": workers, "cpus_per_worker": args.cpus / workers, "steps": steps, "tokens_per_step": tokens_per_step,
            "wall_seconds": round(wall, 1), "train_seconds": round(summary["train_seconds"], 1),
            "steady_tokens_per_s": round((steps - 1) * tokens_per_step / summary["train_seconds"], 1),
            "final_loss": round(summary["final_loss"], 4), "val_bpb": summary["val_bpb"]}
        print(f"{workers} worker(s): {runs[list(runs)[-1]]}", file=sys.stderr, flush=True)
    result = {"bench": "base_train", "preset": "tiny", "settings": base_train.TINY, "runs": runs, "machine": info}
    emit(result, args.out)


if __name__ == "__main__":
    main(parser.parse_args())
