"""Training-step memory, without a GPU: the traced peak of a d20 micro-step (B=32, T=2048, vocab 65536, bf16,
8 workers) with the lean (chunked) loss against the plain loss as the peer, and the trace checked against
real CPU tensors (PyTorch's MemTracker) at small sizes, where the transient constants were calibrated.
Prints ONE JSON line.

    python bench/memory.py [--depth 20] [--batch 32] [--out bench/results/memory_cpu-2core.json]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import emit, machine_info  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--depth", type=int, default=20)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--seq-len", type=int, default=2048)
parser.add_argument("--vocab-size", type=int, default=65536)
parser.add_argument("--world-size", type=int, default=8)
parser.add_argument("--skip-calibration", action="store_true", help="only the d20 trace (the calibration takes minutes)")
parser.add_argument("--out", default=None)


def main(args):
    import torch
    from nanochat.gpt import GPTConfig
    from nanochat.memory import GiB, LOSS_BUFFERS, TRANSIENT_BLOCKS, calibrate_transient, step_memory
    info = machine_info()
    torch.set_num_threads(1)
    config = GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len)
    t0 = time.time()
    lean = step_memory(config, args.batch, args.world_size, "bf16")
    plain = step_memory(config, args.batch, args.world_size, "bf16", loss_chunk_rows=0)
    trace_s = time.time() - t0
    gib = lambda m: {k: round(v / GiB, 2) for k, v in m.items() if isinstance(v, int)}  # noqa: E731
    result = {"bench": "memory", "depth": args.depth, "batch": args.batch, "seq_len": args.seq_len, "vocab_size": args.vocab_size,
              "world_size": args.world_size, "precision": "bf16", "lean_loss_gib": gib(lean), "plain_loss_gib": gib(plain),
              "peak_saved_by_lean_loss_gib": round((plain["peak"] - lean["peak"]) / GiB, 2), "trace_seconds": round(trace_s, 1),
              "constants": {"LOSS_BUFFERS": LOSS_BUFFERS, "TRANSIENT_BLOCKS": TRANSIENT_BLOCKS}}
    if not args.skip_calibration:
        rows = calibrate_transient()
        for row, (depth, batch, seq_len, vocab) in zip(rows, [(r["depth"], r["batch"], r["seq_len"], r["vocab"]) for r in rows]):
            planned = step_memory(GPTConfig.from_depth(depth, vocab, seq_len, head_dim=64), batch, 1, "fp32", device="cpu")["peak"]
            row["planned_bytes"] = planned
            row["planned_vs_measured"] = round(planned / row["measured_bytes"], 3)
        result["calibration"] = rows
    result["machine"] = info
    emit(result, args.out)


if __name__ == "__main__":
    main(parser.parse_args())
