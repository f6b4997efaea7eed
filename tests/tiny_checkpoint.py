"""A tiny untrained GPT checkpoint (2 layers, width 64, context 128) for the chat-phase tests: made once
per test module, copied into each test's base dir (checkpoints are a few hundred KB)."""
import shutil

import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.common import get_base_dir
from nanochat.gpt import GPTConfig, create_model
from nanochat.tokenizer import get_tokenizer_dir

TAG = "tiny"


def make_tiny_checkpoint(root, phase, tokenizer, sequence_len=128):
    """<root>/<phase>/tiny/step_000000: a complete checkpoint of a fresh model (no optimizer state)."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = create_model(config, "cpu")
    save_checkpoint(root / phase / TAG, 0, model, meta={"phase": phase}, tokenizer_fingerprint=tokenizer.fingerprint())
    return root


def install(root, tokenizer):
    """Put the checkpoints under <root> and the tokenizer where the phase scripts look (this test's base dir)."""
    tokenizer.save(get_tokenizer_dir())
    shutil.copytree(root, get_base_dir() / "checkpoints", dirs_exist_ok=True)
