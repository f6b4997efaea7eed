"""How long a d20-sized checkpoint takes to write: what `ray job stop` must wait for (RAY_JOB_STOP_WAIT_TIME_S).

Ours: nanochat.checkpoint.save_checkpoint of a depth-20 model (fp32 weights) with the whole optimizer state
(Adam moments of the embedding and head, Muon momentum of the blocks) in one process: every byte the 8 ranks
of a d20 run write together at a checkpoint, written here by one. Peer: the same number of bytes written raw
(one file, fsync'd) to the same directory: the disk's own speed. Prints ONE JSON line.

    python bench/checkpoint_save.py --dir /tmp/ckpt_bench [--depth 20] [--out bench/results/...]

Needs ~2x the checkpoint in RAM (~10 GiB at d20) and the checkpoint's size in free disk.
"""
import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import emit, machine_info  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--dir", required=True, help="where to write (the disk checkpoints would go to)")
parser.add_argument("--depth", type=int, default=20)
parser.add_argument("--vocab-size", type=int, default=65536)
parser.add_argument("--repeats", type=int, default=2)
parser.add_argument("--out", default=None)


def model_with_optimizer_state(depth, vocab_size):
    """A depth-`depth` model and its two optimizers holding full state (as after a step), without a step:
    the state tensors are allocated directly (zeros), shaped as the optimizers make them."""
    import torch
    from nanochat.gpt import GPTConfig, create_model
    model = create_model(GPTConfig.from_depth(depth, vocab_size), "cpu")
    adamw, muon = model.setup_optimizers()
    for group in adamw.param_groups:
        for p in group["params"]:
            adamw.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    for group in muon.param_groups:
        for p in group["params"]:
            muon.state[p] = {"momentum_buffer": torch.zeros_like(p)}
    return model, [adamw, muon]


def main(args):
    from nanochat.checkpoint import save_checkpoint
    info = machine_info()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    model, optimizers = model_with_optimizer_state(args.depth, args.vocab_size)
    ours, peer, size = [], [], 0
    for i in range(args.repeats):
        t0 = time.perf_counter()
        out = save_checkpoint(root / "ckpt", i, model, optimizers, {"bench": True})
        ours.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in out.iterdir())
        shutil.rmtree(out)
        chunk = os.urandom(1 << 24)
        t0 = time.perf_counter()
        with open(root / "raw.bin", "wb") as f:
            for _ in range(size // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        peer.append(time.perf_counter() - t0)
        (root / "raw.bin").unlink()
    emit({"bench": "checkpoint_save", "depth": args.depth, "vocab_size": args.vocab_size, "bytes": size,
          "save_checkpoint_s": [round(t, 2) for t in ours], "raw_write_s": [round(t, 2) for t in peer],
          "save_gb_per_s": round(size / min(ours) / 1e9, 3), "raw_gb_per_s": round(size / min(peer) / 1e9, 3),
          "machine": info}, args.out)


if __name__ == "__main__":
    main(parser.parse_args())
