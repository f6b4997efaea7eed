"""RL step anatomy: samples/s of the rollout actors and the share of an RL step spent generating, updating
and syncing weights, measured on a small run of ray_jobs/chat_rl.py. Prints ONE JSON line.

    python bench/rl.py --out bench/results/rl_cpu-2core.json     # CPU: 2 gloo trainer workers + 2 actors
    python bench/rl.py --depth 20 --device cuda --num-workers 4 --rollout-actors 4 --examples-per-step 64

Self-contained: in a fresh base dir it trains a small tokenizer on simple-arith and GSM8K text, gives a
new model a few SFT steps on simple-arith (so that rewards vary and every step updates and syncs), then
runs --steps RL steps on Ray (a local Ray unless RAY_ADDRESS says otherwise). The first step after
start-up is not timed. samples/s = completions sampled / seconds of the rollout phase (dispatch, sampling,
rewards, the broadcast to the trainer ranks); shares are of generate + update + weight sync.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--depth", type=int, default=2, help="model depth (width = 64 x depth)")
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--vocab-size", type=int, default=2048)
parser.add_argument("--warmup-steps", type=int, default=80, help="SFT steps before RL (one process)")
parser.add_argument("--steps", type=int, default=12, help="RL steps (the first is not timed)")
parser.add_argument("--examples-per-step", type=int, default=8)
parser.add_argument("--num-samples", type=int, default=8)
parser.add_argument("--max-new-tokens", type=int, default=48)
parser.add_argument("--num-workers", type=int, default=2)
parser.add_argument("--rollout-actors", type=int, default=2)
parser.add_argument("--actor-cpus", type=float, default=0.5)
parser.add_argument("--device", default="cpu", help="cpu or cuda (trainer workers and actors)")
parser.add_argument("--base-dir", default=None, help="default: a fresh temporary directory")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")
args = parser.parse_args()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout
from bench.common import emit, machine_info  # noqa: E402
os.environ["NANOCHAT_BASE_DIR"] = args.base_dir or tempfile.mkdtemp(prefix="bench-rl-")
import torch  # noqa: E402

from nanochat.checkpoint import save_checkpoint  # noqa: E402
from nanochat.common import setup_logging  # noqa: E402
from nanochat.gpt import GPTConfig, create_model  # noqa: E402
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir  # noqa: E402
from ray_jobs import chat_rl  # noqa: E402
from ray_jobs.common import init_ray  # noqa: E402
from tasks.common import assistant_text  # noqa: E402
from tasks.gsm8k import GSM8K  # noqa: E402
from tasks.simple_arith import SimpleArith  # noqa: E402


def prepare(base_dir):
    """tokenizer + checkpoints/sft/bench: a new model after --warmup-steps SFT steps on simple-arith."""
    task = SimpleArith("train")
    texts = [c["messages"][0]["content"] + "\n" + assistant_text(c) for c in (task[i] for i in range(2000))]
    texts += [c["messages"][0]["content"] + "\n" + assistant_text(c) for c in GSM8K("train")]
    tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size)
    tokenizer.save(get_tokenizer_dir())
    torch.manual_seed(0)
    model = create_model(GPTConfig.from_depth(args.depth, tokenizer.get_vocab_size(), args.seq_len, head_dim=64), "cpu")
    chat_rl.supervised_warmup(model, tokenizer, task, args.warmup_steps)
    save_checkpoint(Path(base_dir) / "checkpoints" / "sft" / "bench", args.warmup_steps, model, meta={"phase": "sft"},
                    tokenizer_fingerprint=tokenizer.fingerprint())
    return model.config


def main():
    setup_logging()
    machine = machine_info()  # the load average before the run (emit adds the one after)
    t0 = time.time()
    config = prepare(os.environ["NANOCHAT_BASE_DIR"])
    warmup_s = time.time() - t0
    init_ray(num_cpus=max(4, os.cpu_count()))
    flags = ["--task", "simple-arith", "--source-tag", "bench", "--num-steps", str(args.steps),
             "--examples-per-step", str(args.examples_per_step), "--num-samples", str(args.num_samples),
             "--max-new-tokens", str(args.max_new_tokens), "--num-workers", str(args.num_workers),
             "--rollout-actors", str(args.rollout_actors), "--actor-cpus", str(args.actor_cpus), "--device", args.device,
             "--top-k", "0", "--init-lr-frac", "0.2", "--embedding-lr", "0.01", "--eval-every", "-1", "--save-every", "-1",
             "--device-batch-size", "32", "--max-failures", "0"]
    summary = chat_rl.main(chat_rl.parser.parse_args(flags))
    timing = summary["timing"]
    timed = max(1, summary["step"] - 1)
    result = {
        "bench": "rl", "model": config.to_dict(),
        "settings": {k: getattr(args, k) for k in ("steps", "examples_per_step", "num_samples", "max_new_tokens",
                                                    "num_workers", "rollout_actors", "actor_cpus", "device", "warmup_steps")},
        "samples_per_s": summary["samples_per_s"],
        "s_per_step": round((timing["generate_s"] + timing["update_s"] + timing["sync_s"]) / timed, 3),
        **{k: timing[k] for k in ("generate_share", "update_share", "sync_share")},
        **{k: round(timing[k] / timed, 3) for k in ("generate_s", "update_s", "sync_s")},  # per step
        "samples_per_step": args.examples_per_step * args.num_samples,
        "mean_reward_first": summary["results"]["mean_reward_first"], "mean_reward_last": summary["results"]["mean_reward_last"],
        "sft_warmup_s": round(warmup_s, 1), "rl_wall_s": summary["wall_seconds"],
        "machine": {**machine, "device": args.device},
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
