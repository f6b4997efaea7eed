"""CORE and ChatCORE of the same checkpoints scored by the previous code and by the current one (nanochat's
definitions). Prints ONE JSON line.

    NANOCHAT_MIRROR=../shared/datasets python bench/eval_definitions.py --source /scratch/speedrun-base \
        --previous-rev 3b31deb --out bench/results/eval_definitions_tiny_cpu-2core.json

--source is the base dir of a finished speedrun (its tokenizer/ and checkpoints/). For each peer, in turn,
the tokenizer and the base and --phase checkpoints are copied into a fresh scratch base dir and the peer's
own scripts score them, each in a subprocess with its own local Ray:
- previous:  `git archive --previous-rev` unpacked in a temp dir, run with PYTHONPATH pointing at it;
- current:   this checkout.
Commands (the tiny speedrun's eval settings by default): `ray_jobs/base_eval.py --max-per-task N` and
`ray_jobs/chat_eval.py --phase sft --preset tiny`. The record keeps every task's number of both peers.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--source", required=True, help="base dir of a finished (tiny) speedrun: tokenizer/ and checkpoints/")
parser.add_argument("--previous-rev", required=True, help="git revision of the previous scorers")
parser.add_argument("--phase", default="sft", help="the chat checkpoint to score with chat_eval")
parser.add_argument("--max-per-task", type=int, default=16, help="base_eval's --max-per-task (the tiny speedrun's: 16)")
parser.add_argument("--chat-flags", default="--preset tiny", help="chat_eval's flags besides --phase (the tiny speedrun's)")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")
args = parser.parse_args()

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import emit, machine_info  # noqa: E402


def run_script(code_dir, base_dir, script, flags):
    """One phase script of `code_dir` on the checkpoints under base_dir; returns (its JSON line, seconds)."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": str(code_dir), "RAY_ADDRESS": "local",
           "RAY_raylet_start_wait_time_s": os.environ.get("RAY_raylet_start_wait_time_s", "300")}  # a busy machine starts Ray slowly
    for attempt in range(3):  # a Ray that could not start in time (a busy shared machine) gets another go
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(code_dir / "ray_jobs" / script), *flags], cwd=code_dir, env=env,
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1]), round(time.time() - t0, 1)
        if "timed out during startup" not in proc.stderr:
            break
    raise SystemExit(f"{script} of {code_dir} failed:\n{proc.stderr[-3000:]}")


def score(code_dir):
    base = Path(tempfile.mkdtemp(prefix="eval-definitions-"))
    shutil.copytree(Path(args.source) / "tokenizer", base / "tokenizer")
    for phase in ("base", args.phase):
        shutil.copytree(Path(args.source) / "checkpoints" / phase, base / "checkpoints" / phase)
    core, core_s = run_script(code_dir, base, "base_eval.py", ["--max-per-task", str(args.max_per_task)])
    with open(core["csv"], newline="") as f:
        tasks = {row["task"]: float(row["centered"]) for row in csv.DictReader(f) if row["task"] != "CORE"}
    chat, chat_s = run_script(code_dir, base, "chat_eval.py", ["--phase", args.phase, *args.chat_flags.split()])
    out = {"CORE": core["CORE"], "core_centered": tasks, "base_eval_seconds": core_s,
           "chat": {k: v for k, v in chat.items() if isinstance(v, (int, float, dict))}, "chat_eval_seconds": chat_s}
    out.update({k: core[k] for k in ("val_bpb_packed", "val_bpb_nanochat", "bpb_tokens") if k in core})
    shutil.rmtree(base, ignore_errors=True)
    return out


def main():
    machine = machine_info()
    previous = Path(tempfile.mkdtemp(prefix="eval-previous-"))
    archive = subprocess.run(["git", "archive", args.previous_rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(previous)], input=archive, check=True)
    current_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    results = {"previous": score(previous), "current": score(REPO)}
    shutil.rmtree(previous, ignore_errors=True)
    result = {
        "bench": "eval_definitions",  # the source dir is a scratch path: named, not spelled out
        "command": " ".join(["python", "bench/eval_definitions.py"] + sys.argv[1:]).replace(args.source, "<speedrun base dir>"),
        "previous_rev": args.previous_rev, "current_rev": current_rev, "phase": args.phase,
        "base_eval_flags": f"--max-per-task {args.max_per_task}", "chat_eval_flags": f"--phase {args.phase} {args.chat_flags}",
        **results,
        "machine": machine,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
