"""Bits per byte: the validation loss measured in a tokenizer-independent unit.

Cross-entropy per token depends on the vocabulary (bigger tokens, bigger loss per token). Dividing
the total loss (in bits) by the number of UTF-8 bytes the target tokens stand for gives a number
that compares across tokenizers. Special tokens (0 bytes) and ignored targets (-1) are left out.
"""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte of `model` over `steps` batches (inputs, targets) from the iterator `batches`.
    token_bytes[i] = bytes of token id i (0 for specials). Sums over every rank when distributed,
    so each rank passes its own disjoint batches."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        inputs, targets = next(batches)[:2]
        loss = model(inputs, targets, loss_reduction="none").reshape(-1)  # nats per target, 0 where ignored
        targets = targets.reshape(-1)
        nbytes = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        total_nats += (loss.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum().double()
    if dist.is_available() and dist.is_initialized():
        totals = torch.stack([total_nats, total_bytes])
        dist.all_reduce(totals)
        total_nats, total_bytes = totals[0], totals[1]
    if total_bytes.item() == 0:
        raise ValueError("no target bytes to evaluate: every target is special or ignored")
    return total_nats.item() / (math.log(2) * total_bytes.item())
