"""Base pretraining on Ray Train (2 gloo workers on the session's local Ray), bits per byte, the LR schedule."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import build_model, checkpoint_dir, find_last_step
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_tokenizer_dir
from conftest import assert_dashboard_finds, metric_values, wait_for_metrics
from ray_jobs import base_train

TINY_FLAGS = ["--depth", "2", "--head-dim", "32", "--max-seq-len", "128", "--device-batch-size", "4",
              "--total-batch-size", "1024", "--num-workers", "2", "--device", "cpu", "--cpus-per-worker", "1",
              "--data-actor-cpus", "0.5", "--eval-tokens", "2048", "--sample-every", "-1", "--log-every", "5",
              "--max-failures", "2"]


@pytest.fixture
def base_setup(ray_cluster, small_tokenizer):
    """The small tokenizer saved where the phase scripts look for it (this test's base dir)."""
    tokenizer, _ = small_tokenizer
    tokenizer.save(get_tokenizer_dir())
    return tokenizer


def run(flags):
    return base_train.main(base_train.parser.parse_args(TINY_FLAGS + flags))


def test_tiny_run_trains_and_checkpoints(base_setup, tmp_path):
    summary = run(["--num-iterations", "30", "--eval-every", "15", "--save-every", "5", "--keep-checkpoints", "2", "--tag", "t1"])
    assert summary["status"] == "finished" and summary["step"] == 30
    # the live metrics, as the node's Prometheus endpoint serves them (scraped at once: a finished worker's
    # series leave it ~15 s after it exits), agree with the run's summary
    run_tags = dict(phase="base", run="t1")
    samples = wait_for_metrics(lambda s: s if metric_values(s, "ray_nanochat_train_step", **run_tags) == [30.0] else None)
    assert metric_values(samples, "ray_nanochat_train_tokens_total", **run_tags, rank=0) == [30 * 1024]  # steps x batch
    assert metric_values(samples, "ray_nanochat_train_loss", **run_tags) == [pytest.approx(summary["final_loss"], rel=1e-6)]
    assert metric_values(samples, "ray_nanochat_train_val_metric", **run_tags) == [pytest.approx(summary["val_bpb"], rel=1e-6)]
    assert len(metric_values(samples, "ray_nanochat_train_step_seconds", **run_tags)) == 2  # one per rank
    assert sorted(metric_values(samples, "ray_nanochat_train_restarts_total", **run_tags)) in ([], [0.0])  # never restarted
    assert len(metric_values(samples, "ray_nanochat_data_tokens_per_s", **run_tags)) == 2
    assert_dashboard_finds(samples, "nanochat_train_")
    assert_dashboard_finds(samples, "nanochat_data_")
    losses = summary["curves"]["loss"]["y"]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns
    assert len(summary["curves"]["val_bpb"]["y"]) == 3 and summary["val_bpb"] < summary["curves"]["val_bpb"]["y"][0]
    ckpt = checkpoint_dir("base", "t1")
    assert find_last_step(ckpt) == 30
    assert sorted(d.name for d in ckpt.iterdir()) == ["step_000020", "step_000025", "step_000030"]  # 2 periodic + the final
    model, meta = build_model(ckpt, 30, "cpu", expect_tokenizer=base_setup.fingerprint())
    assert meta["step"] == 30 and len(meta["data_state"]) == 2  # every rank's own data position
    assert all(s["epoch"] == 0 and s["piece"] >= 0 and s["row"] > 0 for s in meta["data_state"])
    logits = model(torch.tensor([base_setup.encode("hello world", prepend="<|bos|>")]))
    assert torch.isfinite(logits).all()


def _parent_pid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _train_worker_pids():
    """This session's Ray Train worker processes: Ray names them after the actor class
    (ray::RayTrainWorker...), and they descend from this session's raylet (other Ray instances on the
    machine have their own). Under `uv run` the raylet starts each worker through a `uv` process, so
    the raylet is the grandparent there, the parent otherwise."""
    import ray
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"RayTrainWorker" not in cmdline:
            continue
        parent = _parent_pid(entry)
        if raylet in (parent, _parent_pid(parent)):
            pids.append(int(entry))
    return pids


def test_killed_worker_resumes_from_last_checkpoint(base_setup):
    # the previous test's workers may still be exiting: start once they are gone, so the only Train
    # workers seen below are this run's
    deadline = time.time() + 120
    while _train_worker_pids() and time.time() < deadline:
        time.sleep(0.5)
    result = {}
    thread = threading.Thread(target=lambda: result.update(summary=run(
        ["--num-iterations", "150", "--eval-every", "-1", "--save-every", "10", "--tag", "t2"])))
    thread.start()
    ckpt = checkpoint_dir("base", "t2")
    deadline = time.time() + 300
    while (find_last_step(ckpt) or 0) < 10:
        assert thread.is_alive() and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    pids = _train_worker_pids()
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)  # from outside, mid-run
    thread.join(timeout=600)
    summary = result["summary"]
    assert summary["status"] == "finished" and summary["step"] == 150
    starts = summary["starts"]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 10 and starts[1] % 10 == 0, starts  # continued, not restarted


def test_sigterm_checkpoints_and_stops_then_resume_finishes(base_setup, ray_cluster):
    # a spot node going away / `ray job stop`: the driver gets SIGTERM; the workers must write a
    # checkpoint at the step they reached and stop; --resume then continues from it
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    flags = TINY_FLAGS + ["--num-iterations", "60", "--eval-every", "-1", "--save-every", "1000", "--tag", "t4"]
    driver = subprocess.Popen([sys.executable, "ray_jobs/base_train.py", *flags], cwd=Path(__file__).parents[1], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not any("base step 10/60" in line for line in lines):
        assert driver.poll() is None and time.time() < deadline, "".join(lines[-30:])
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=300) == 0, "".join(lines[-30:])
    reader.join(timeout=10)
    summary = json.loads(next(line for line in reversed(lines) if line.startswith('{"status"')))  # Ray logs may follow
    assert summary["status"] == "stopped" and 10 <= summary["step"] < 60, summary
    assert find_last_step(checkpoint_dir("base", "t4")) == summary["step"]  # written at the stop, not periodic
    resumed = run(flags[len(TINY_FLAGS):] + ["--resume"])
    assert resumed["status"] == "finished" and resumed["step"] == 60 and resumed["starts"] == [0, summary["step"]]


def test_nan_loss_stops_with_the_step(base_setup):
    # an absurd learning rate overflows the weights (norms and the logit soft-cap tame merely large
    # ones); the run must stop, name the step, and keep the last good checkpoint
    with pytest.raises(RuntimeError, match=r"(loss is (nan|inf)|the weights are not finite) at step \d+"):
        run(["--num-iterations", "20", "--eval-every", "-1", "--save-every", "1", "--tag", "t3", "--embedding-lr", "1e30", "--unembedding-lr", "1e30"])
    ckpt = checkpoint_dir("base", "t3")
    last = find_last_step(ckpt)
    assert last is not None and last < 20
    model, _ = build_model(ckpt, last, "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bpb_equals_hand_computation():
    vocab = 5
    token_bytes = torch.tensor([1, 2, 3, 0, 4], dtype=torch.int32)  # id 3 is special: 0 bytes

    class Uniform(torch.nn.Module):  # every token has probability 1/vocab: loss ln(5) per target
        def forward(self, idx, targets, loss_reduction="mean"):
            logits = torch.zeros(*idx.shape, vocab)
            return torch.nn.functional.cross_entropy(logits.view(-1, vocab), targets.view(-1), ignore_index=-1,
                                                     reduction=loss_reduction).view(targets.shape)

    targets = torch.tensor([[0, 1, 3, 4], [2, -1, 1, 0]])
    batches = iter([(torch.zeros_like(targets), targets)])
    bpb = evaluate_bpb(Uniform(), batches, 1, token_bytes)
    counted = [0, 1, 4, 2, 1, 0]  # targets with bytes > 0 (the special id 3 and the ignored -1 are left out)
    expected = len(counted) * math.log(vocab) / (math.log(2) * sum(int(token_bytes[t]) for t in counted))
    assert bpb == pytest.approx(expected, rel=1e-6)  # the model computes in fp32


def test_lr_schedule():
    mult = [base_train.lr_multiplier(s, 100, 0.1, 0.2, 0.0) for s in range(101)]
    assert mult[0] == pytest.approx(0.1) and mult[9] == 1.0 and mult[50] == 1.0 and mult[80] == 1.0
    assert mult[90] == pytest.approx(0.5) and mult[100] == 0.0
    assert base_train.muon_momentum(0) == pytest.approx(0.85) and base_train.muon_momentum(300) == pytest.approx(0.95)
