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


def save_memorized_chat_checkpoint(ckpt_dir, tokenizer, config, conversations, steps=200, seed=0):
    """A tiny chat model *trained* (AdamW, the SFT loss mask: assistant text, tool calls and
    <|assistant_end|>; never tool outputs) until it answers each conversation's first user turn with its
    assistant turn, special tokens included. Saved as an sft checkpoint under ckpt_dir; returns the model."""
    torch.manual_seed(seed)
    model = create_model(config, "cpu")
    rows = [tokenizer.render_conversation(c) for c in conversations]
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), -1)
    for r, (ids, mask) in enumerate(rows):
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        inputs[r, :len(ids) - 1] = ids[:-1]
        targets[r, :len(ids) - 1] = torch.where(mask[1:] == 1, ids[1:], -1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    save_checkpoint(ckpt_dir, steps, model, meta={"phase": "sft", "memorized": len(conversations)},
                    tokenizer_fingerprint=tokenizer.fingerprint())
    return model.eval()
