"""Training precision: fp16 loss scaling that skips overflowing steps on every rank together, and the
compiled training forward equal to the eager one (the chunked loss and ReLU^2 are custom autograd functions)."""
import argparse

import torch

from multiproc import run_gloo
from nanochat.gpt import GPTConfig, create_model
from nanochat.precision import LossScaler
from ray_jobs.training import compiled, optimizer_step

CONFIG = GPTConfig.from_depth(2, 100, 16, head_dim=32)


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return iter([(x, x.roll(-1, 1)) for x in (torch.randint(0, 100, (2, 16), generator=g) for _ in range(n))])


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_fp16_loss_scaling_skips_an_overflowing_step_and_recovers():
    torch.manual_seed(0)
    model = create_model(CONFIG, "cpu", precision="fp16")
    optimizers = model.setup_optimizers(ns_dtype=torch.float32)
    data = batches()
    before = params(model)
    scaler = LossScaler(True, init_scale=2.0 ** 126)  # the scaled loss overflows: every gradient is inf
    optimizer_step(model, optimizers, lambda: next(data), 1, 1.0, 0.9, scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))  # skipped: nothing moved
    assert scaler.scale == 2.0 ** 125 and scaler.skipped == 1 and all(p.grad is None for p in model.parameters())
    scaler = LossScaler(True, init_scale=2.0 ** 10, growth_interval=1)
    optimizer_step(model, optimizers, lambda: next(data), 1, 1.0, 0.9, scaler=scaler)
    after = params(model)
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(before, after))
    assert scaler.scale == 2.0 ** 11 and scaler.skipped == 0  # a good step, and the scale grew


def _overflow_on_one_rank(rank, world_size, out):
    scaler = LossScaler(True, init_scale=1.0)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf") if rank == 1 else 2.0, 3.0])  # only rank 1 overflowed
    torch.save({"ok": scaler.unscale([p]), "scale": scaler.scale}, f"{out}.{rank}")


def test_an_overflow_on_one_rank_skips_the_step_on_all(tmp_path):
    run_gloo(_overflow_on_one_rank, 2, str(tmp_path / "r"))
    results = [torch.load(tmp_path / f"r.{rank}") for rank in range(2)]
    assert results == [{"ok": False, "scale": 0.5}] * 2  # rank 0's own gradients were fine: it skips anyway


def test_compiled_forward_equals_eager():
    torch.manual_seed(0)
    model = create_model(CONFIG, "cpu")
    x, y = next(batches())
    eager_loss = model(x, y)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fast = torch.compile(model, dynamic=False, backend="aot_eager")  # the training forward's path, without codegen
    loss = fast(x, y)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(eager_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)


def test_compile_defaults_to_on_for_gpus_only():
    model = create_model(CONFIG, "cpu")
    for flag, device, wrapped in [(None, "cpu", False), (None, "cuda", True), (True, "cpu", True), (False, "cuda", False)]:
        forward = compiled(model, argparse.Namespace(compile=flag), torch.device(device))
        assert (forward is not model) == wrapped, (flag, device)
