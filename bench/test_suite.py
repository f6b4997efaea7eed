"""What the default test run (CI's: `pytest`, slow tests left out) costs on this machine: total wall time,
the outcome counts, and the 25 slowest tests. Run it in a fresh clone (the README's setup) to measure what CI
runs. Prints ONE JSON line.

    python bench/test_suite.py --out bench/results/test_suite_cpu-2core.json

The budget (the developers' guide): under 40 minutes on 2 cores, one end-to-end run of the tiny pipeline
included.
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import emit, machine_info  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--durations", type=int, default=25)
parser.add_argument("--budget-s", type=float, default=40 * 60)
parser.add_argument("--log", default=None, help="also keep pytest's whole output in this file")
parser.add_argument("--out", default=None)
args = parser.parse_args()


def main():
    info = machine_info()
    t0 = time.time()
    run = subprocess.run([sys.executable, "-m", "pytest", f"--durations={args.durations}", "-q", "-p", "no:warnings"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    wall = time.time() - t0
    out = run.stdout
    if args.log:
        Path(args.log).write_text(out + "\n--- stderr ---\n" + run.stderr)
    slowest = [{"seconds": float(s), "phase": phase, "test": test} for s, phase, test in
               re.findall(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)$", out, flags=re.M)]
    lines = out.strip().splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)), None)
    if summary is None:  # pytest never got to its summary: keep the end of what it said
        summary = "\n".join(lines[-5:] + run.stderr.strip().splitlines()[-15:])
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary)}
    emit({"bench": "test_suite", "wall_s": round(wall, 1), "budget_s": args.budget_s,
          "share_of_budget": round(wall / args.budget_s, 3), "exit_code": run.returncode, "counts": counts,
          "summary": summary, "slowest": slowest, "machine": info}, args.out)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
