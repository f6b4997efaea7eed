"""Pretraining data on Ray: parquet shards -> tokenized, packed rows -> Ray Train workers.

    driver:  train_ds = build_pretrain_dataset(tokenizer_dir, split="train", seq_len=T)
             TorchTrainer(loop, datasets={"train": train_ds}, dataset_config=pretrain_data_config(), ...)
    worker:  shard = ray.train.get_dataset_shard("train")
             for inputs, targets, state in packed_batches(shard, B, T, device, resume_state): ...
             for inputs, targets in val_batches(B, T, tokenizer_dir, device): ...   (take N steps)

The pipeline: `read_parquet(shards).select_columns(["text"])` streams the files (read tasks, never the
whole set in memory) into a pool of `TokenizeAndPack` actors. Each actor builds its tiktoken encoder
once; each call takes a batch of `docs_per_batch` documents, encodes them (BOS first, empty documents
skipped) and packs them best-fit into rows of T+1 tokens (nanochat.dataloader.pack_documents), dropping
the < T+1 tokens left over. Train splits the rows across workers (`streaming_split(n, equal=True)`):
disjoint, and equally many rows per worker, so every rank gets the same number of batches.

Determinism: a batch's rows depend only on its documents; each file is read by one task, so batch
boundaries depend only on the files; and with `preserve_order` (set on the dataset here and by
`pretrain_data_config()`) batches are packed and split in file order. So the rows each worker sees
are a function of (shard files, seed, tokenizer, seq_len, docs_per_batch, worker count); the number
of actors, CPUs and timing do not change them.

Long documents: a document contributes at most T+1 tokens to a row, so only a prefix of a long text
is encoded (nanochat.dataloader.tokenize_for_packing): on the mirror this halves tokenizing work.

Resume: `packed_batches` yields state = {"epoch": e, "rows": r}, the rows this worker has consumed
in epoch e. Ranks step in lockstep, so the state is the same on every rank: save rank 0's in the
checkpoint. On resume, the pipeline replays the epoch from its start and each worker drops its first
r rows: no row seen twice and none skipped, when nothing above changed. (Replaying costs the
pipeline's time for the skipped rows; with another worker count the split differs and the
position is only approximate.)

Shard paths are resolved in the driver: on a multi-node cluster they must be on storage every node
sees (a shared file system, or the same files on every node).
"""
import logging
import random
import time

import numpy as np
import ray

from nanochat.common import get_dist_info, setup_logging
from nanochat.dataloader import pack_documents, rows_to_batch, tokenize_for_packing, tokenizing_distributed_data_loader
from nanochat.dataset import list_shard_paths, open_shard
from nanochat.tokenizer import Tokenizer

logger = logging.getLogger("nanochat.data")


class TokenizeAndPack:
    """Ray Data UDF (one per actor): a batch of documents -> {"tokens": int32 rows (n, row_len)}."""

    def __init__(self, tokenizer_dir: str, row_len: int):
        setup_logging()  # actors are fresh processes: without a handler, info logs would vanish
        self.tokenizer = Tokenizer.from_directory(tokenizer_dir)  # builds the tiktoken encoder, once
        self.row_len = row_len

    def __call__(self, batch):
        column = batch.column("text").to_pylist()
        texts = [t for t in column if t]
        if len(texts) < len(column):
            logger.info("skipped %d empty documents", len(column) - len(texts))
        # one thread per actor: scale with more actors, not threads the scheduler does not know about
        docs = tokenize_for_packing(self.tokenizer, texts, self.row_len)
        return {"tokens": pack_documents(docs, self.row_len)}


def build_pretrain_dataset(tokenizer_dir, split: str = "train", seq_len: int = 2048, *, shard_paths=None,
                           seed: int | None = None, docs_per_batch: int = 1024, num_actors: int = 1,
                           actor_cpus: float = 1.0, read_cpus: float = 0.25,
                           actor_start_timeout_s: int = 600) -> "ray.data.Dataset":
    """A Ray Dataset of packed rows {"tokens": int32[seq_len + 1]} from the split's shards (or
    `shard_paths`), in file order, or in an order shuffled by `seed`. Checks every file up front, so a
    missing, corrupt or text-less shard fails here with its name instead of deep inside a read task.
    Size the actor pool so reads keep CPUs: with 2 CPUs, 2 actors at num_cpus=1 starve the reads; if
    the actors cannot start within actor_start_timeout_s, iterating raises instead of hanging."""
    paths = [str(p) for p in (shard_paths if shard_paths is not None else list_shard_paths(split))]
    if not paths:
        raise ValueError("no shard files given")
    for path in paths:
        open_shard(path)
    if seed is not None:
        random.Random(seed).shuffle(paths)
    # Ray 2.60's default parquet reader (datasource V2) lists files by starting 32 footer-reading
    # actors on every execution (every epoch): ~30 s on a small machine. The V1 reader reads the
    # footers once, here (and samples two files with Ray tasks to size its reads).
    ctx = ray.data.DataContext.get_current()
    use_v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        # one read task per file: block (hence batch) boundaries depend on the files alone, not on the
        # parallelism Ray would pick for the cluster at hand
        ds = ray.data.read_parquet(paths, num_cpus=read_cpus, override_num_blocks=len(paths)).select_columns(["text"])
    finally:
        ctx.use_datasource_v2 = use_v2
    ds = ds.map_batches(
        TokenizeAndPack,
        fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir), "row_len": seq_len + 1},
        batch_size=docs_per_batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=actor_cpus,
    )
    ds.context.execution_options.preserve_order = True
    # an actor pool that cannot get its CPUs (e.g. Train workers took them) would wait silently forever:
    # fail with Ray's "Timed out while starting actors" instead
    ds.context.wait_for_min_actors_s = actor_start_timeout_s
    ds.set_name(f"pretrain_{split}")  # the name shown in the dashboard's Data tab
    return ds


def pretrain_data_config():
    """TorchTrainer(dataset_config=...): Train replaces each dataset's execution options with the
    driver's defaults, which do not preserve order; without order the split is not deterministic."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig
    return DataConfig(execution_options=ExecutionOptions(preserve_order=True))


def _rebatch(blocks, B: int, skip: int):
    """Blocks of rows -> arrays of exactly B rows, after dropping the first `skip` rows."""
    carry = None
    for rows in blocks:
        if skip:
            dropped = min(skip, len(rows))
            rows, skip = rows[dropped:], skip - dropped
        if carry is not None and len(carry):
            rows = np.concatenate([carry, rows])
        full = len(rows) // B * B
        for i in range(0, full, B):
            yield rows[i:i + B]
        carry = rows[full:]


def packed_batches(shard, B: int, T: int, device="cpu", resume_state=None, log_every: int = 100):
    """Yield (inputs, targets, state) forever, epoch after epoch: (B, T) int64 tensors on `device`
    from this worker's dataset shard (a Ray DataIterator of build_pretrain_dataset rows). Pass a saved
    `state` back as `resume_state` to continue where it was taken."""
    rank = get_dist_info()[1]
    state = dict(resume_state or {"epoch": 0, "rows": 0})
    while True:
        blocks = (b["tokens"] for b in shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
        t0, n0 = time.time(), state["rows"]
        for rows in _rebatch(blocks, B, skip=state["rows"]):
            if rows.shape[1] != T + 1:
                raise ValueError(f"dataset rows have {rows.shape[1]} tokens, expected T+1 = {T + 1}: seq_len differs")
            state["rows"] += B
            inputs, targets = rows_to_batch(rows, device)
            yield inputs, targets, dict(state)
            if (state["rows"] - n0) % (log_every * B) == 0:
                rate = (state["rows"] - n0) * T / (time.time() - t0)
                logger.info("rank %d: epoch %d, %d rows, %.0f tokens/s", rank, state["epoch"], state["rows"], rate)
        if state["rows"] < B:
            raise RuntimeError(f"the dataset shard of rank {rank} has fewer than B={B} rows: nothing to train on")
        state = {"epoch": state["epoch"] + 1, "rows": 0}
        logger.info("rank %d: starting data epoch %d", rank, state["epoch"])


def val_batches(B: int, T: int, tokenizer_dir, device="cpu"):
    """Yield (inputs, targets) forever from this worker's part of the validation shard (each rank reads
    its own documents directly; the validation shard is small). The same batches every time it is
    called: evaluate on the first N."""
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    for inputs, targets, _ in tokenizing_distributed_data_loader(B, T, "val", tokenizer, device):
        yield inputs, targets
