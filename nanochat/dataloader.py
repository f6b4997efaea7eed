"""Packing tokenized documents into training rows, and a plain (no Ray) distributed data loader.

Rows are T+1 tokens (inputs = row[:-1], targets = row[1:]). Every document is prefixed with BOS and
every row starts at a document's start, so every row starts with BOS. Documents are packed best-fit:
the largest buffered document that still fits the row goes in next; when none fits, the shortest one
is cropped to fill the row exactly (the cropped tail is dropped). No padding anywhere.

The loader here is for torchrun, notebooks and benchmarks; under Ray the same packer runs inside the
Ray Data pipeline of ray_jobs/data.py.

Resume state of `tokenizing_distributed_data_loader`: {"epoch": e, "row_group": g, "doc": d}, the
position just after the last document taken into the packer. Documents still buffered when a
checkpoint is written are dropped on resume (never seen, never repeated). Each rank has its own
state: save them all (rank r resumes from its own); rank 0's alone is close for every rank, but then
other ranks may repeat or skip a few documents.
"""
import bisect
import logging

import numpy as np

from nanochat.common import get_dist_info
from nanochat.dataset import iter_row_groups, list_shard_paths

logger = logging.getLogger("nanochat.dataloader")


class BestFitPacker:
    """A buffer of documents (token sequences, each starting with BOS) that rows are cut from."""

    def __init__(self, row_len: int):
        self.row_len = row_len
        self._lens = []  # lengths of the buffered docs, ascending (bisect finds the best fit)
        self._docs = []  # the docs, in the same order as _lens
        self.num_tokens = 0  # tokens buffered
        self.cropped_tokens = 0  # tokens dropped by cropping (a waste statistic)

    def __len__(self):
        return len(self._docs)

    def add(self, doc):
        n = len(doc)
        if n == 0:
            return
        i = bisect.bisect_right(self._lens, n)
        self._lens.insert(i, n)
        self._docs.insert(i, doc)
        self.num_tokens += n

    def pop_row(self, out=None) -> np.ndarray:
        """Cut one row of exactly row_len tokens. The caller keeps >= row_len tokens buffered."""
        if self.num_tokens < self.row_len:
            raise ValueError(f"need {self.row_len} buffered tokens for a row, have {self.num_tokens}")
        row = np.empty(self.row_len, dtype=np.int32) if out is None else out
        pos = 0
        while pos < self.row_len:
            room = self.row_len - pos
            i = bisect.bisect_right(self._lens, room) - 1  # the largest doc that fits
            if i < 0:
                i = 0  # none fits: crop the shortest
            n = self._lens.pop(i)
            doc = self._docs.pop(i)
            self.num_tokens -= n
            take = min(n, room)
            self.cropped_tokens += n - take
            row[pos:pos + take] = doc[:take]
            pos += take
        return row


def pack_documents(docs, row_len: int) -> np.ndarray:
    """Pack a finite list of documents into full rows, shape (rows, row_len), int32, until fewer than
    row_len tokens are left; those are dropped."""
    packer = BestFitPacker(row_len)
    for doc in docs:
        packer.add(doc)
    rows = np.empty((packer.num_tokens // row_len, row_len), dtype=np.int32)  # at most; cropping wastes some
    n = 0
    while packer.num_tokens >= row_len:
        packer.pop_row(out=rows[n])
        n += 1
    return rows[:n]


def tokenize_for_packing(tokenizer, texts, row_len: int, num_threads: int = 1):
    """BOS + token ids of each text, ready for a packer of rows of row_len tokens.

    A document contributes at most its first row_len tokens to the rows (it fits whole, or it is
    cropped), so long texts are cut before encoding, the costly part: a text is encoded from a prefix
    of about 4 characters per token needed, doubled until it gives row_len + 64 tokens. The slack
    keeps the cut (which may split a word) away from the tokens used. Such documents come out
    shorter than they are, but still longer than a row, which is all the packer looks at."""
    bos = tokenizer.get_bos_token_id()
    need = row_len + 64
    heads = [t[: 4 * need] for t in texts]  # a no-op (no copy) for the many texts shorter than that
    if num_threads > 1:
        docs = tokenizer.encode(heads, prepend=bos, num_threads=num_threads)
    else:  # tiktoken's batch call would start a thread pool for nothing
        docs = [tokenizer.encode(h, prepend=bos) for h in heads]
    for i, text in enumerate(texts):
        budget = 4 * need
        while len(docs[i]) < need and budget < len(text):  # more than 4 characters per token: cut later
            budget *= 2
            docs[i] = tokenizer.encode(text[:budget], prepend=bos)
    return docs


def rank_resume_state(saved, index_key, rank=None, world=None):
    """This rank's data position from a checkpoint's `data_state`: a list with every rank's position (rank
    order), or one dict that every rank shares. Each rank r of W takes the units (shard pieces, examples)
    r, r + W, r + 2W, ...; its state {"epoch": e, index_key: i, ...} says it reached its own i-th unit.
    - Saved by as many ranks as now: rank r's own state, exactly.
    - Saved by W' ranks: every old rank's next unit has global index i * W' + r'; all units before the
      smallest of those were consumed. Each new rank starts at its first unit at or after it (row 0): no
      unit is skipped, at most a few are seen twice."""
    if rank is None or world is None:
        rank, world = get_dist_info()[1], get_dist_info()[3]
    if saved is None or isinstance(saved, dict):
        return dict(saved) if saved else None
    saved = [s for s in saved if s is not None]
    if not saved:
        return None
    if len(saved) == world:
        return dict(saved[rank])
    epoch = min(s["epoch"] for s in saved)
    old_world = len(saved)
    frontier = min(s[index_key] * old_world + r for r, s in enumerate(saved) if s["epoch"] == epoch)
    return {"epoch": epoch, index_key: max(0, -(-(frontier - rank) // world))}


def rows_to_batch(rows: np.ndarray, device="cpu"):
    """(B, T+1) token rows -> (inputs, targets), int64 (B, T) tensors on `device`."""
    import torch  # here, not at the top: Ray's tokenizer actors import this module for the packer alone,
    # and importing torch would add seconds to every actor's start
    batch = torch.from_numpy(np.ascontiguousarray(rows)).to(torch.long)
    if torch.device(device).type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def _documents(split, rank, world_size, state):
    """Yield (text, state after it) for this rank's documents, forever (epoch after epoch).
    Every rank reads every row group and takes the docs at positions rank, rank+W, ... in each one:
    balanced across ranks however few row groups there are (the validation shard is small)."""
    paths = list_shard_paths(split)
    epoch, start_g, start_d = state["epoch"], state["row_group"], state["doc"]
    while True:
        taken = 0
        for g, texts in iter_row_groups(paths, start=start_g):
            first = start_d if g == start_g else 0
            first += (rank - first) % world_size  # the first doc at or after `first` that is ours
            for d in range(first, len(texts), world_size):
                taken += 1
                yield texts[d], {"epoch": epoch, "row_group": g, "doc": d + 1}
        if taken == 0 and start_g == 0 and start_d == 0:
            raise ValueError(f"split {split!r} has no documents for rank {rank} of {world_size} ({paths[0].parent})")
        epoch, start_g, start_d = epoch + 1, 0, 0
        logger.info("%s data: starting epoch %d (rank %d)", split, epoch, rank)


def tokenizing_distributed_data_loader(B: int, T: int, split: str, tokenizer, device="cpu", resume_state=None,
                                       buffer_docs: int = 1000, tokenizer_batch: int = 128):
    """Yield (inputs, targets, state) forever: (B, T) int64 batches packed best-fit from this rank's
    documents (rank and world size from torch.distributed or the torchrun environment). `state` is a
    small dict; pass it back as `resume_state` to continue after the last document consumed."""
    _, rank, _, world_size = get_dist_info()
    state = dict(resume_state or {"epoch": 0, "row_group": 0, "doc": 0})
    packer = BestFitPacker(T + 1)
    docs = _documents(split, rank, world_size, state)
    rows = np.empty((B, T + 1), dtype=np.int32)
    pending = []  # (tokens, state after that doc), tokenized but not yet in the packer
    while True:
        for r in range(B):
            # refill first: best fit is only as good as the choice the buffer offers
            while len(packer) < buffer_docs or packer.num_tokens < T + 1:
                if not pending:
                    chunk = [next(docs) for _ in range(tokenizer_batch)]
                    ids = tokenize_for_packing(tokenizer, [text for text, _ in chunk], T + 1, num_threads=4)
                    pending = list(zip(ids, (s for _, s in chunk)))[::-1]
                doc, state = pending.pop()
                packer.add(doc)
            packer.pop_row(out=rows[r])
        inputs, targets = rows_to_batch(rows, device)
        yield inputs, targets, dict(state)
