"""Training precision: which dtype the matmuls run in, and loss scaling where that dtype is fp16.

    --precision auto|bf16|fp16|fp32   (or $NANOCHAT_PRECISION; the flag wins)

auto is bf16 on GPUs that support it (Ampere and later: H100, A100, ...), fp16 on older GPUs (T4, V100),
fp32 on the CPU. The weights stay fp32 either way (the optimizers update that master copy); the model
casts them per matmul (nanochat.gpt.CastedLinear). fp16's narrow range underflows small gradients, so
fp16 training multiplies the loss by a large scale and divides the gradients back (LossScaler).
"""
import os

import torch
import torch.distributed as dist

from nanochat.common import SettingsError

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISION_ENV = "NANOCHAT_PRECISION"


def resolve_precision(name=None, device_type="cpu", gpu_supports_bf16=None) -> str:
    """--precision (else $NANOCHAT_PRECISION, else "auto") -> "bf16" | "fp16" | "fp32" for this device."""
    name = name or os.environ.get(PRECISION_ENV) or "auto"
    if name != "auto":
        if name not in PRECISIONS:
            raise SettingsError(f"precision must be auto, bf16, fp16 or fp32, got {name!r} (--precision or ${PRECISION_ENV})")
        return name
    if device_type != "cuda":
        return "fp32"
    if gpu_supports_bf16 is None:
        gpu_supports_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if gpu_supports_bf16 else "fp16"


def inference_dtype(device, precision=None, gpu_supports_bf16=None) -> torch.dtype:
    """The dtype evaluation and serving hold the weights in: the precision their matmuls run in
    (resolve_precision: bf16 on GPUs that have it, fp16 on older ones, fp32 on the CPU). A decode step reads
    every weight once; fp32 weights would be read and cast on every forward (3x the bytes of bf16 ones)."""
    return PRECISIONS[resolve_precision(precision, torch.device(device).type, gpu_supports_bf16)]


class LossScaler:
    """Dynamic loss scaling for fp16 (a no-op otherwise): backward runs on loss x scale; before the optimizer
    steps, unscale() divides the gradients back and checks them. A step whose gradients overflowed is
    skipped and the scale halves; after `growth_interval` good steps it doubles. The overflow check is
    all-reduced, so every rank skips the same steps (a rank stepping alone would desynchronize the weights).
    Its state (scale, good steps) goes into checkpoints with the loop's."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.enabled, self.scale, self.growth_interval, self.good_steps = enabled, init_scale, growth_interval, 0
        self.skipped = 0

    def scale_loss(self, loss):
        return loss * self.scale if self.enabled else loss

    def unscale(self, params) -> bool:
        """Divide the gradients by the scale; False (and the scale halved) when any is inf or NaN on any rank."""
        if not self.enabled:
            return True
        grads = [p.grad for p in params if p.grad is not None]
        found_inf = torch.zeros(1, device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.full((1,), 1.0 / self.scale, device=found_inf.device))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        if found_inf.item() > 0:
            self.scale, self.good_steps = self.scale / 2, 0
            self.skipped += 1
            return False
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2
        return True

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state):
        self.scale, self.good_steps, self.skipped = state["scale"], state["good_steps"], state.get("skipped", 0)
