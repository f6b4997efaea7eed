"""Training-step throughput: tokens/s (and MFU on GPU) of forward + backward + optimizer step for one
model size, eager and/or torch.compile'd. Prints ONE JSON line.

    python bench/train_step.py --depth 4 --seq-len 512 --batch 4 --compile both      # CPU, both modes
    python bench/train_step.py --depth 20 --seq-len 2048 --batch 32 --compile 1      # one H100: MFU

Needs torch only (no ray): runs standalone on a GPU box from a checkout. With --compile both, eager is
the peer measured in the same process, step for step in alternation; reported times are medians. The
ratio is the number to trust on a noisy machine.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 x depth)")
parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
parser.add_argument("--batch", type=int, default=4, help="rows per forward/backward (micro-batch)")
parser.add_argument("--grad-accum", type=int, default=1, help="forward/backwards per optimizer step (real runs use"
                    " several: the optimizer's cost is then shared by more tokens)")
parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size (the real tokenizer's)")
parser.add_argument("--head-dim", type=int, default=128, help="target head dimension")
parser.add_argument("--steps", type=int, default=10, help="timed steps")
parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
parser.add_argument("--compile", choices=["0", "1", "both"], default="both", help="torch.compile the model")
parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
parser.add_argument("--peak-flops", type=float, default=None, help="peak bf16 FLOP/s for MFU (default: by GPU name)")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")
args = parser.parse_args()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout, no install needed
from bench.common import emit, machine_info  # noqa: E402
import torch  # noqa: E402

from nanochat.common import autodetect_device_type, gpu_specs  # noqa: E402
from nanochat.gpt import GPTConfig, create_model  # noqa: E402



def machine(device):
    return {**machine_info(), "device": device.type, "torch_threads": torch.get_num_threads()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One model + optimizers, eager or compiled, stepping on a fixed random batch."""

    def __init__(self, config, device, compiled):
        torch.manual_seed(0)
        self.device = device
        self.model = create_model(config, device)
        self.optimizers = self.model.setup_optimizers()
        self.step_model = torch.compile(self.model, dynamic=False) if compiled else self.model
        self.x, self.y = (torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device) for _ in range(2))
        self.times = []

    def step(self):
        t0 = time.perf_counter()
        for _ in range(args.grad_accum):
            loss = self.step_model(self.x, self.y)
            (loss / args.grad_accum).backward()
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        sync(self.device)
        self.loss = loss.item()
        return time.perf_counter() - t0

    def result(self, warmup_s):
        dt = statistics.median(self.times)
        tokens_per_s = args.grad_accum * args.batch * args.seq_len / dt
        result = {"step_ms": round(dt * 1000, 2), "step_ms_min": round(min(self.times) * 1000, 2),
                  "tokens_per_s": round(tokens_per_s, 1), "warmup_s": round(warmup_s, 2), "loss": round(self.loss, 4)}
        peak = args.peak_flops or (gpu_specs(torch.cuda.get_device_name(self.device))[0] if self.device.type == "cuda" else None)
        if peak:
            result["mfu"] = round(self.model.estimate_flops() * tokens_per_s / peak, 4)
        return result


def main():
    device = torch.device(autodetect_device_type() if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # any fp32 matmul left outside autocast
    config = GPTConfig.from_depth(args.depth, args.vocab_size, sequence_len=args.seq_len, head_dim=args.head_dim)
    modes = {"0": [False], "1": [True], "both": [False, True]}[args.compile]
    out = {"bench": "train_step", "depth": args.depth, "seq_len": args.seq_len, "batch": args.batch,
           "grad_accum": args.grad_accum,
           "vocab_size": args.vocab_size, "config": config.to_dict(), "steps": args.steps}
    runners = {("compiled" if c else "eager"): Runner(config, device, c) for c in modes}
    warmup_s = {}
    for name, runner in runners.items():
        warmup_s[name] = sum(runner.step() for _ in range(args.warmup))
    for _ in range(args.steps):  # alternate the modes step by step: load drifts hit both alike
        for runner in runners.values():
            runner.times.append(runner.step())
    for name, runner in runners.items():
        out[name] = runner.result(warmup_s[name])
    model = next(iter(runners.values())).model
    out["num_params"] = model.num_params()
    out["flops_per_token"] = model.estimate_flops()
    if len(modes) == 2:
        out["compile_speedup"] = round(out["compiled"]["tokens_per_s"] / out["eager"]["tokens_per_s"], 3)
    if device.type == "cuda":  # peak of the whole process (all modes' models together)
        out["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out["machine"] = machine(device)
    emit(out, args.out)


if __name__ == "__main__":
    main()
