"""bench/gpu_check.py, the one script run on a lent GPU: rehearsed here at a tiny size on the CPU (every
section's code path), and its prerequisite check refuses in one line before any device time is spent."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_rehearsal_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--device", "cpu", "--steps", "2", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    for section in ("train", "engine", "correctness"):
        assert "error" not in report[section], report[section]
    train = report["train"]["d2"]
    assert train["compiled"]["tokens_per_s"] > 0 and train["eager"]["batch"] == 4
    assert train["eager"]["planner_peak_gib"] > 0  # the planner's prediction is beside every measurement
    engine = report["engine"]
    for key in ("eager_batch1", "eager_batch4", "static_batch1", "static_batch4"):
        assert "error" not in engine[key] and engine[key]["tokens_per_s"] > 0, (key, engine[key])
    c = report["correctness"]
    assert c["bf16_vs_fp32"]["ok"] and c["greedy_cache_equals_full"] and c["muon_step_finite"] and c["chunked_loss"]["ok"]
    assert c["train_losses"][-1] < c["train_losses"][0] - 1  # measured after training, not at init
    summary = json.loads(run.stdout.strip().splitlines()[-1])  # the last line: the headline numbers
    assert summary["correctness"] == {"bf16_vs_fp32": True, "greedy_cache_equals_full": True, "muon_step_finite": True,
                                      "chunked_loss": True}


def test_a_skipped_section_is_recorded_and_a_missing_gpu_stops_at_once(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--device", "cpu", "--skip", "train,engine",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["train"] == {"skipped": True} and report["engine"] == {"skipped": True} and "bf16_vs_fp32" in report["correctness"]
    no_gpu = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path / "x.json")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    lines = no_gpu.stderr.strip().splitlines()
    assert no_gpu.returncode != 0 and len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU is visible"), no_gpu.stderr
    assert not (tmp_path / "x.json").exists()
