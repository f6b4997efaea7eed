"""What the training metrics cost per optimizer step: the exact updates TrainLoop makes each step (rank 0's
eight, RunMetrics.log into ray.util.metrics, in a Ray worker) timed against a real training step of the
tiny model on this machine (forward, backward, optimizer; the peer). Prints ONE JSON line.

    python bench/metrics_cost.py --out bench/results/metrics_cost_cpu-2core.json

Serving's cost is measured end to end by bench/serve.py (peer continuous_no_metrics).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import emit, machine_info  # noqa: E402
import ray_jobs  # noqa: E402,F401 (before ray)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=2000, help="metric updates timed (one step's worth each)")
parser.add_argument("--train-steps", type=int, default=10, help="training steps timed (the tiny preset's shape)")
parser.add_argument("--out", default=None)
args = parser.parse_args()


def metric_updates(n):
    """Seconds per step of rank 0's metric updates, in a Ray worker (where they are recorded)."""
    from ray_jobs.metrics import RunMetrics
    metrics = RunMetrics("base", "bench", 0)
    t0 = time.perf_counter()
    for step in range(n):
        metrics.log(step, train_step_seconds=0.1, train_data_wait_seconds=0.001, train_loss=3.0, train_lr_mult=1.0,
                    train_tokens_per_s=1e4, train_mfu=None, train_step=step, train_tokens_total=1024)
        metrics.log(data_tokens_per_s=1e5, data_rows_buffered=8)  # the data pipeline's, once per batch
    return (time.perf_counter() - t0) / n


def train_step_seconds(steps):
    """A tiny-preset training step (depth 2, 4 x 128 tokens, 2 micro-steps), forward to optimizer, on the CPU."""
    import torch
    from nanochat.gpt import GPTConfig, create_model
    torch.manual_seed(0)
    model = create_model(GPTConfig(sequence_len=128, vocab_size=8192, n_layer=2, n_head=1, n_kv_head=1, n_embd=128), "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 8192, (4, 128))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        for _ in range(2):
            model(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def main():
    import ray
    info = machine_info()
    ray.init(num_cpus=2, include_dashboard=False, address="local")
    per_step = ray.get(ray.remote(num_cpus=1)(metric_updates).remote(args.steps))
    ray.shutdown()
    step = train_step_seconds(args.train_steps)
    emit({"bench": "metrics_cost", "settings": vars(args), "metric_updates_per_step_us": round(per_step * 1e6, 1),
          "peer_tiny_train_step_ms": round(step * 1e3, 2), "metrics_share_of_step": round(per_step / step, 5),
          "machine": info}, args.out)


if __name__ == "__main__":
    main()
