"""Benchmark the pretraining data path: tokens/s per CPU core from parquet shards to packed rows.

Ours: one worker's Ray Data pipeline of ray_jobs/data.py (pieces of row groups -> a pool of
tokenize+pack actors, each reading its pieces), consumed by the driver; tokens/s is wall-clock over the
whole run (start-up included) divided by every CPU given to Ray. Peer: one plain Python process doing the
same work over the same files (read a row group, tiktoken-encode each document, best-fit pack), per its
one core. Prints ONE JSON line.

    NANOCHAT_MIRROR=../shared/datasets python bench/data.py --out bench/results/data_cpu-2core.json

Without --tokenizer-dir, a tokenizer (--vocab-size) is trained on the first --tok-train-chars of
the first shard with nanochat.tokenizer (rustbpe).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import emit, machine_info  # noqa: E402
import ray_jobs  # noqa: E402,F401 (before ray: the Ray settings every phase runs with)
from ray_jobs.data import DOCS_PER_PIECE  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--tokenizer-dir", default=None, help="a saved nanochat tokenizer (default: train one)")
parser.add_argument("--vocab-size", type=int, default=8192, help="vocab of the tokenizer trained when none is given")
parser.add_argument("--tok-train-chars", type=int, default=20_000_000, help="characters to train that tokenizer on")
parser.add_argument("--num-shards", type=int, default=4, help="training shards to run over (from the start)")
parser.add_argument("--passes", type=int, default=6, help="times over those shards (amortizes Ray's start-up)")
parser.add_argument("--seq-len", type=int, default=2048)
parser.add_argument("--ray-cpus", type=float, default=os.cpu_count(), help="logical CPUs given to Ray (all counted)")
parser.add_argument("--num-actors", type=int, default=2, help="tokenize+pack actors")
parser.add_argument("--actor-cpus", type=float, default=1.0)
parser.add_argument("--docs-per-piece", type=int, default=DOCS_PER_PIECE, help="documents per piece (the pipeline's default)")
parser.add_argument("--repeats", type=int, default=1, help="runs of each, alternating; the best counts (noisy machines)")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")


def get_tokenizer_dir(args):
    from nanochat.dataset import parquets_iter_batched
    from nanochat.tokenizer import Tokenizer
    if args.tokenizer_dir:
        return args.tokenizer_dir

    def texts():
        total = 0
        for batch in parquets_iter_batched("train"):
            for text in batch:
                yield text
                total += len(text)
                if total >= args.tok_train_chars:
                    return

    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(texts(), args.vocab_size)
    directory = tokenizer.save(tempfile.mkdtemp(prefix="bench_tokenizer_"))
    print(f"trained a {args.vocab_size} tokenizer in {time.time() - t0:.1f}s", file=sys.stderr)
    return directory


def run_peer(paths, tokenizer_dir, seq_len):
    """One process, one core: the same read -> encode -> pack work as the pipeline's actors."""
    from nanochat.dataloader import pack_documents, tokenize_for_packing
    from nanochat.dataset import iter_row_groups
    from nanochat.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    t0, rows = time.time(), 0
    for _, texts in iter_row_groups(paths):
        rows += len(pack_documents(tokenize_for_packing(tokenizer, texts, seq_len + 1), seq_len + 1))
    return rows * (seq_len + 1), time.time() - t0


def run_ray(paths, tokenizer_dir, args):
    import ray
    from ray_jobs.data import build_rank_dataset, pretrain_pieces
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.time()
        pieces = pretrain_pieces(paths, docs_per_piece=args.docs_per_piece)
        ds = build_rank_dataset(pieces, tokenizer_dir, args.seq_len, num_actors=args.num_actors, actor_cpus=args.actor_cpus)
        rows, first = 0, None
        for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
            rows += len(block["tokens"])
            first = first or time.time()
        end = time.time()
    finally:
        ray.shutdown()
    return rows * (args.seq_len + 1), end - t0, first - t0


def main(args):
    from nanochat.dataset import list_shard_paths
    from nanochat.tokenizer import Tokenizer
    import pyarrow
    import tiktoken
    info = {**machine_info(), "tiktoken": tiktoken.__version__, "pyarrow": pyarrow.__version__}
    paths = list_shard_paths("train")[: args.num_shards] * args.passes
    tokenizer_dir = get_tokenizer_dir(args)
    peer_runs, ray_runs = [], []
    for _ in range(args.repeats):
        peer_runs.append(run_peer(paths, tokenizer_dir, args.seq_len))
        ray_runs.append(run_ray(paths, tokenizer_dir, args))
    peer_tokens, peer_s = min(peer_runs, key=lambda r: r[1])
    ray_tokens, ray_s, ray_startup_s = min(ray_runs, key=lambda r: r[1])
    ours = ray_tokens / ray_s / args.ray_cpus
    peer = peer_tokens / peer_s
    result = {
        "bench": "data", "what": "packed-row tokens/s per CPU core, parquet -> tokenize -> best-fit pack",
        "shards": [p.name for p in paths[: args.num_shards]], "passes": args.passes, "seq_len": args.seq_len, "vocab_size": Tokenizer.from_directory(tokenizer_dir).get_vocab_size(),
        "ray": {"tokens": ray_tokens, "wall_s": round(ray_s, 2), "first_rows_after_s": round(ray_startup_s, 2),
                "ray_cpus": args.ray_cpus, "num_actors": args.num_actors, "actor_cpus": args.actor_cpus,
                "docs_per_piece": args.docs_per_piece, "tokens_per_s_per_core": round(ours)},
        "peer_single_process": {"tokens": peer_tokens, "wall_s": round(peer_s, 2), "cores": 1, "tokens_per_s_per_core": round(peer)},
        "repeats": args.repeats, "ratio_ours_vs_peer": round(ours / peer, 3), "target_tokens_per_s_per_core": 500_000,
        "machine": info,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main(parser.parse_args())
