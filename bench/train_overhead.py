"""Ray Train's cost: the same optimizer steps (ray_jobs.training.optimizer_step, what every phase's
TrainLoop runs) at the same settings, in this process ("bare") and inside a one-worker TorchTrainer
("torchtrainer"): steady-state tokens/s of each. Prints ONE JSON line.

    python bench/train_overhead.py --out bench/results/train_overhead_cpu-2core.json   # CPU, tiny base model

The sides alternate (bare, trainer, bare, trainer, ...) so machine noise falls on both; per side, the
median step time over the timed steps of all its rounds (the first --warmup steps of each round are
dropped: allocator and thread-pool warm-up). Both sides set the same torch thread count, and the worker
is given that many CPUs. The batches are fixed random tokens made in the loop (no data pipeline: this
measures the trainer, not Ray Data; bench/data.py measures that).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--depth", type=int, default=4, help="model depth (the tiny preset's)")
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--batch", type=int, default=8, help="rows per micro-step")
parser.add_argument("--grad-accum", type=int, default=2, help="micro-steps per optimizer step (tiny: 4096 tokens/step)")
parser.add_argument("--vocab-size", type=int, default=8192)
parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round")
parser.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating")
parser.add_argument("--threads", type=int, default=2, help="torch threads (and the worker's CPUs)")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import ray_jobs  # noqa: E402,F401 (before ray: the Ray settings every phase runs with)
from bench.common import emit, machine_info  # noqa: E402


def timed_steps(config):
    """Build the model and optimizers, run warmup + steps optimizer steps, return the timed step times."""
    import itertools

    import torch

    from nanochat.gpt import GPTConfig, create_model
    from ray_jobs.training import muon_momentum, optimizer_step
    c = argparse.Namespace(**config)
    torch.set_num_threads(c.threads)
    torch.manual_seed(0)
    device = torch.device(c.device)
    model = create_model(GPTConfig.from_depth(c.depth, c.vocab_size, c.seq_len, head_dim=c.head_dim), device)
    optimizers = model.setup_optimizers()
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, c.vocab_size, (c.batch, c.seq_len + 1), generator=generator).to(device) for _ in range(4)]
    batches = itertools.cycle([(r[:, :-1], r[:, 1:]) for r in rows])
    times = []
    for step in range(c.warmup + c.steps):
        t0 = time.perf_counter()
        loss_sum, _ = optimizer_step(model, optimizers, lambda: next(batches), c.grad_accum, 1.0, muon_momentum(step))
        loss_sum.item()  # the host sync the real loop does every step
        times.append(time.perf_counter() - t0)
    return {"step_seconds": times[c.warmup:], "torch_threads": torch.get_num_threads(), "pid": os.getpid()}


def run_in_trainer(config, storage):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    use_gpu = config["device"] == "cuda"
    trainer = TorchTrainer(timed_steps, train_loop_config=config,
                           torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                           scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker={"CPU": config["threads"]}),
                           run_config=RunConfig(name=f"train-overhead-{time.time_ns()}", storage_path=storage))
    return trainer.fit().return_value  # rank 0's return value


def main(args):
    import tempfile

    import ray

    from ray_jobs.common import init_ray
    config = {k: v for k, v in vars(args).items() if k != "out"}
    info = machine_info()
    # a fresh local Ray as the phases start it (same settings); the worker gets --threads CPUs. Ray runs
    # workers at nice 15: on a machine shared with other work they would lose CPU the bare loop (nice 0)
    # keeps, which measures the neighbours, not Ray Train; so both sides at the same priority
    os.environ["RAY_ADDRESS"] = "local"
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray(num_cpus=args.threads)
    storage = tempfile.mkdtemp(prefix="train_overhead_")
    sides = {"bare": [], "torchtrainer": []}
    threads = {}
    for _ in range(args.rounds):
        for side in sides:
            out = timed_steps(config) if side == "bare" else run_in_trainer(config, storage)
            sides[side] += out["step_seconds"]
            threads[side] = out["torch_threads"]
    ray.shutdown()
    tokens_per_step = args.batch * args.seq_len * args.grad_accum
    rates = {side: tokens_per_step / statistics.median(times) for side, times in sides.items()}
    result = {"bench": "train_overhead", "settings": config, "tokens_per_step": tokens_per_step,
              "tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
              "median_step_s": {k: round(statistics.median(v), 4) for k, v in sides.items()},
              "timed_steps": {k: len(v) for k, v in sides.items()}, "torch_threads": threads,
              "ray_train_overhead_pct": round(100 * (1 - rates["torchtrainer"] / rates["bare"]), 2),
              "target_pct": 3.0, "machine": info}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main(parser.parse_args())
