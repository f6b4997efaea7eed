"""The training and chat phases end to end on the tiny preset, in one Ray session: base_train -> mid_train
-> chat_sft -> chat_eval of mid and of sft. Prints one JSON line: each phase's wall time and main numbers,
and the chat evaluation tables (a tiny model on CPU: near chance is expected; every number is measured).

    NANOCHAT_MIRROR=../shared/datasets NANOCHAT_BASE_DIR=<empty dir> RAY_ADDRESS=local \\
        python bench/chat_phases.py --out bench/results/chat_phases_cpu-2core.json

A tokenizer is trained first when the base dir has none (not counted in the phases' times).
Extra flags after `--` go to every phase's parser, e.g. `-- --num-workers 2`.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import emit, machine_info  # noqa: E402

parser = argparse.ArgumentParser(description="tiny base -> mid -> sft -> chat_eval, timed")
parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer trained when the base dir has none")
parser.add_argument("--tok-max-chars", type=int, default=20_000_000)
parser.add_argument("--skip-base", action="store_true", help="reuse the base checkpoint already in the base dir")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")


def timed(results, name, fn):
    t0 = time.time()
    out = fn()
    results[name] = {"wall_seconds": round(time.time() - t0, 1), "loadavg_1m_end": round(os.getloadavg()[0], 2), **out}
    print(f"{name}: {results[name]['wall_seconds']}s", file=sys.stderr, flush=True)
    return out


def training_numbers(summary):
    from nanochat.common import get_base_dir
    keys = ("status", "step", "num_iterations", "final_loss", "val_bpb", "tokens_trained", "train_seconds", "num_conversations", "source")
    numbers = {k: summary[k] for k in keys if k in summary}
    if "source" in numbers:  # relative to the base dir: no machine's path in the record
        numbers["source"] = numbers["source"].replace(f"{get_base_dir()}/", "")
    return numbers


def main(args, extra):
    from nanochat.tokenizer import get_tokenizer_dir
    from ray_jobs import base_train, chat_eval, chat_sft, mid_train, tok_train
    from ray_jobs.common import init_ray

    def flags(module, *more):
        return module.parser.parse_args(["--preset", "tiny", *more, *extra])

    if not any(get_tokenizer_dir().glob("*")):
        tok_train.main(tok_train.parser.parse_args(["--max-chars", str(args.tok_max_chars), "--vocab-size", str(args.vocab_size)]))
    resources = init_ray()
    machine = {**machine_info(), "ray_cpus": resources.get("CPU")}
    phases = {}
    if not args.skip_base:
        timed(phases, "base_train", lambda: training_numbers(base_train.main(flags(base_train))))
    timed(phases, "mid_train", lambda: training_numbers(mid_train.main(flags(mid_train))))
    timed(phases, "chat_eval_mid", lambda: {"results": chat_eval.main(flags(chat_eval, "--phase", "mid"))})
    timed(phases, "chat_sft", lambda: training_numbers(chat_sft.main(flags(chat_sft))))
    timed(phases, "chat_eval_sft", lambda: {"results": chat_eval.main(flags(chat_eval, "--phase", "sft"))})
    return {
        "bench": "chat_phases", "preset": "tiny", "extra_flags": extra,
        "settings": {"base_train": base_train.TINY, "mid_train": mid_train.TINY, "chat_sft": chat_sft.TINY, "chat_eval": chat_eval.TINY},
        "phases": phases,
        "chat_eval": {stage: phases[f"chat_eval_{stage}"]["results"] for stage in ("mid", "sft")},
        "machine": machine,
    }


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args = parser.parse_args(own)
    emit(main(args, extra), args.out)
