"""A chat checkpoint with random weights: for the serving tests, the serving benchmark, and trying the app
without training a model first."""
import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import create_model


def save_random_checkpoint(ckpt_dir, tokenizer, config, seed=0, step=0):
    """Save a model of `config` with every weight random (none left at its zero init) under ckpt_dir.
    The special tokens' output rows are zero, so their logit is 0 while the best of the other ids is
    almost surely higher: greedy decoding never ends early nor calls the tool, and every answer runs to
    max_tokens (fixed lengths for tests and benchmarks). Returns the step directory."""
    torch.manual_seed(seed)
    model = create_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.lm_head.weight[sorted(tokenizer.special_ids.values())] = 0.0
    return save_checkpoint(ckpt_dir, step, model, meta={"phase": "sft", "random": True},
                           tokenizer_fingerprint=tokenizer.fingerprint())
