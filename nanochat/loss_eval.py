"""Bits per byte: the validation loss measured in a tokenizer-independent unit.

Cross-entropy per token depends on the vocabulary (bigger tokens, bigger loss per token). Dividing
the total loss (in bits) by the number of UTF-8 bytes the target tokens stand for gives a number
that compares across tokenizers. Special tokens (0 bytes) and ignored targets (-1) are left out.

Which tokens are scored matters as much as how, so the project reports bpb on two sets of rows, over the
same number of tokens (steps x B x T), and labels them:

  packed     the validation rows as training sees them: documents packed best-fit into BOS-aligned rows
             of T+1 tokens, cropped where they do not fit (nanochat.dataloader). What base_train logs.
  nanochat   as nanochat's seed reports it (sequential_batches): the validation shard's documents in
             order, each with BOS in front, concatenated, and cut into consecutive batches of B*T+1
             tokens. Rows start mid-document and every document is scored whole, from its first token.
"""
import math

import torch
import torch.distributed as dist

from nanochat.common import get_dist_info

BPB_PACKED_DEFINITION = "bits per byte on the packed validation rows (best-fit, BOS-aligned, as training evaluates)"
BPB_NANOCHAT_DEFINITION = ("bits per byte as nanochat's seed reports it (validation documents in order, BOS before "
                           "each, cut into consecutive rows; specials count 0 bytes), over as many tokens as the packed one")


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


def sequential_batches(tokenizer, B: int, T: int, split: str = "val", device="cpu"):
    """Yield (inputs, targets), (B, T) int64, forever, the way nanochat's seed loader cuts a split: its
    documents in order (rank r of W takes row groups r, r + W, ...), each as BOS + its tokens, appended to
    one stream; each batch is the next B*T + 1 tokens of the stream, inputs the first B*T and targets the
    last B*T (so row b's inputs are stream[bT : bT + T] and its targets one further; the batch's last token
    is not used again). When the split runs out it starts over. (Empty documents are skipped, where the
    seed would add a lone BOS; the shards have none.)"""
    from nanochat.dataset import iter_row_groups, list_shard_paths
    _, rank, _, world = get_dist_info()
    bos, need = tokenizer.get_bos_token_id(), B * T + 1
    stream = []
    while True:
        for _, texts in iter_row_groups(list_shard_paths(split), start=rank, step=world):
            for ids in tokenizer.encode(texts, prepend=bos):
                stream.extend(ids)
            while len(stream) >= need:
                batch = torch.tensor(stream[:need], dtype=torch.long)
                del stream[:need]
                yield batch[:-1].view(B, T).to(device), batch[1:].view(B, T).to(device)
