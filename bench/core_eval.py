"""CORE evaluation speed: examples/s over the 22 tasks of the eval bundle, as base_eval scores them vs one
example per forward vs the previous implementation. Prints ONE JSON line.

    NANOCHAT_MIRROR=../shared/datasets python bench/core_eval.py --threads 1 --previous-rev 3b31deb \
        --out bench/results/core_eval_cpu-2core.json

Peers, in one process, on one random-weight model (speed does not depend on the weights) and the same
examples (the first --max-per-task of each task after CORE's shuffle), all scoring nanochat's definition
except `previous`:
- default:      count_correct as base_eval runs it on this device: multiple-choice prefixes of 256+ shared
                tokens through a KV cache once; on the CPU every other example in a forward of its own;
- batched:      the same, the other examples of an 8-example chunk in padded forwards of <= BATCH_TOKENS
                (what a GPU runs);
- unshared:     batched without the shared prefixes (every choice's whole prompt in the padded batches);
- per_example:  one forward per example, every choice's whole prompt: how the previous code ran;
- previous:     (--previous-rev) nanochat/core_eval.py of that git revision, loaded beside the current one:
                one forward per example, its own (older) prompts and subsets, prompts cropped to the
                model's context (--seq-len): less work per example than nanochat's uncropped prompts.
The peers of the current code must get the same count (batching never changes a result): checked.
Each peer runs --repeats times, interleaved, and the fastest run counts (shared machines are noisy).
The tokenizer: --tokenizer-dir, or one trained here on the mirror's first shard (vocab --vocab-size).
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--depth", type=int, default=4, help="model depth (the tiny speedrun's: 4)")
parser.add_argument("--seq-len", type=int, default=256, help="the model's training context (the tiny speedrun's: 256)")
parser.add_argument("--vocab-size", type=int, default=8192, help="vocab of the tokenizer trained here (the tiny speedrun's)")
parser.add_argument("--tokenizer-dir", default=None, help="use this saved tokenizer instead of training one")
parser.add_argument("--max-per-task", type=int, default=16, help="examples per task (the tiny speedrun's: 16)")
parser.add_argument("--repeats", type=int, default=2, help="runs of every peer (the fastest counts)")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--previous-rev", default=None, help="git revision whose core_eval.py is the 'previous' peer")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")
args = parser.parse_args()

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a bare checkout, no install needed
from bench.common import emit, machine_info  # noqa: E402
import torch  # noqa: E402

from nanochat import core_eval  # noqa: E402
from nanochat.gpt import GPTConfig, create_model  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402


def tokenizer():
    if args.tokenizer_dir:
        return Tokenizer.from_directory(args.tokenizer_dir)
    import pyarrow.parquet as pq
    from nanochat.common import get_mirror_dir
    texts = pq.read_table(get_mirror_dir() / "pretrain" / "shard_00000.parquet", columns=["text"]).column("text").to_pylist()
    return Tokenizer.train_from_iterator(texts[:2000], args.vocab_size)


def previous_module(rev):
    source = subprocess.run(["git", "show", f"{rev}:nanochat/core_eval.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "previous_core_eval.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("previous_core_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    tok = tokenizer()
    torch.manual_seed(0)
    model = create_model(GPTConfig.from_depth(args.depth, tok.get_vocab_size(), args.seq_len, head_dim=64), "cpu").eval()
    bundle = core_eval.get_eval_bundle()
    tasks = core_eval.load_core_tasks(bundle)
    rows = {t["label"]: core_eval.load_task_data(bundle, t) for t in tasks}
    current = [(t, core_eval.task_examples(rows[t["label"]], args.max_per_task)) for t in tasks]
    num_examples = sum(len(data) for _, data in current)

    def run_current(batch_tokens, shared_prefix_min):
        return sum(core_eval.count_correct(model, tok, data, t, "cpu", range(len(data)), None, batch_tokens, shared_prefix_min)[0]
                   for t, data in current)
    never = 10**9  # no prefix is that long: no sharing
    peers = {"default": lambda: run_current(None, core_eval.SHARED_PREFIX_MIN),
             "batched": lambda: run_current(core_eval.BATCH_TOKENS, core_eval.SHARED_PREFIX_MIN),
             "unshared": lambda: run_current(core_eval.BATCH_TOKENS, never), "per_example": lambda: run_current(1, never)}
    if args.previous_rev:
        old = previous_module(args.previous_rev)

        def run_previous():  # its own subset and prompts: the same number of examples per task
            return sum(old.count_correct(model, tok, rows[t["label"]], t, "cpu", old.example_indices(len(rows[t["label"]]), args.max_per_task))[0]
                       for t in tasks)
        peers["previous"] = run_previous
    seconds, correct = {name: [] for name in peers}, {}
    for _ in range(args.repeats):
        for name, run in peers.items():
            t0 = time.perf_counter()
            correct[name] = run()
            seconds[name].append(round(time.perf_counter() - t0, 2))
    if len({correct[name] for name in ("default", "batched", "unshared", "per_example")}) != 1:
        raise SystemExit(f"batching changed a result: {correct} right answers")
    best = {name: min(s) for name, s in seconds.items()}
    result = {
        "bench": "core_eval",  # a scratch tokenizer dir is named, not spelled out
        "command": " ".join(["python", "bench/core_eval.py"] + sys.argv[1:]).replace(args.tokenizer_dir or "\0", "<tokenizer dir>"),
        "depth": args.depth, "seq_len": args.seq_len, "vocab_size": tok.get_vocab_size(), "max_per_task": args.max_per_task,
        "tasks": len(tasks), "examples": num_examples, "chunk_examples": core_eval.CHUNK_EXAMPLES, "batch_tokens": core_eval.BATCH_TOKENS,
        "shared_prefix_min": core_eval.SHARED_PREFIX_MIN,
        "previous_rev": args.previous_rev, "repeats": args.repeats, "seconds_all": seconds, "correct": correct,
        **{f"{name}_examples_per_s": round(num_examples / s, 2) for name, s in best.items()},
        **{f"speedup_vs_{name}": round(s / best["default"], 2) for name, s in best.items() if name != "default"},
        "machine": {**machine, "torch_threads": torch.get_num_threads()},
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
