"""Wall time of the README's main command from a fresh clone: `git clone`, then the README's first
command word for word (install with uv, run ray_jobs/speedrun.py: the tiny preset without a GPU), with
NANOCHAT_MIRROR pointing at the dataset mirror. Prints ONE JSON line: setup and speedrun seconds, each
phase's wall time (from the run's phase markers), the report's path, and the target (15 min on 2 cores).

    python bench/speedrun_fresh_clone.py --mirror ../shared/datasets --out bench/results/speedrun_tiny_cpu-2core.json

uv's download cache is whatever the machine has (a new user's first install also downloads the
wheels); the project's own build (the Rust extension) always happens, in the fresh clone.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import emit, machine_info  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--repo", default=str(REPO), help="what to clone (default: this checkout)")
parser.add_argument("--mirror", required=True, help="the dataset mirror (NANOCHAT_MIRROR)")
parser.add_argument("--workdir", default=None, help="where to clone (default: a new temp dir)")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")
TARGET_S = 15 * 60


def readme_main_command(readme: Path) -> str:
    """The README's first command: the first non-comment line of its first bash block."""
    block = re.search(r"```bash\n(.*?)```", readme.read_text(), re.S).group(1)
    return next(line for line in block.splitlines() if line.strip() and not line.startswith("#"))


def main(args):
    info = machine_info()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="speedrun_clone_"))
    clone = work / "main"
    subprocess.run(["git", "clone", "-q", args.repo, str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    command = readme_main_command(clone / "README.md")
    setup, run = command.split(" && uv run ", 1)  # timed apart: the install, then the job
    base_dir = work / "base"
    env = {**os.environ, "NANOCHAT_MIRROR": str(Path(args.mirror).resolve()), "NANOCHAT_BASE_DIR": str(base_dir)}
    for key in ("VIRTUAL_ENV", "RAY_ADDRESS"):  # as a new user's shell: no active venv, no cluster
        env.pop(key, None)
    t0 = time.time()
    subprocess.run(setup, shell=True, cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t1 = time.time()
    with open(work / "speedrun.log", "w") as log:
        rc = subprocess.run("uv run " + run, shell=True, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    t2 = time.time()
    phases = {}
    for marker in sorted((base_dir / "runs" / "speedrun" / "phases").glob("*.done"), key=lambda p: p.stat().st_mtime):
        phases[marker.stem] = json.loads(marker.read_text()).get("wall_seconds")
    result = {"bench": "speedrun_fresh_clone", "command": command, "commit": commit, "returncode": rc,
              "setup_seconds": round(t1 - t0, 1), "speedrun_seconds": round(t2 - t1, 1), "total_seconds": round(t2 - t0, 1),
              "target_speedrun_seconds": TARGET_S, "phase_seconds": phases,
              "report": str(base_dir / "runs" / "speedrun" / "report" / "report.md"), "log": str(work / "speedrun.log"),
              "machine": info}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main(parser.parse_args())
