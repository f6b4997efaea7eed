"""Pretraining data on Ray: parquet shards -> tokenized, packed rows -> each Ray Train worker.

    driver:  pieces = pretrain_pieces(paths=None, seed=42)           # checks every shard, cuts the work
    worker:  for inputs, targets, state in packed_batches(pieces, B, T, tokenizer_dir, device, resume_state): ...
             for inputs, targets in val_batches(B, T, tokenizer_dir, device): ...   (take N steps)

A piece is up to `docs_per_piece` consecutive documents of one row group of one shard: the unit of work
and of resume. The driver lists them once, from the shards' parquet footers (every file checked, so a
missing or corrupt shard fails there, with its name), in file order or in an order of files shuffled by
`seed`. Rank r of W takes pieces r, r + W, r + 2W, ... Each worker streams its own pieces through its own
Ray Data pipeline: `from_items(pieces)` -> `map_batches(TokenizeAndPack)` on a pool of actors, which read a
piece's documents (one row-group read), encode them (BOS first, empty documents skipped; a long document
only as far as a row can use, nanochat.dataloader.tokenize_for_packing) and pack them best-fit into rows
of T+1 tokens (nanochat.dataloader.pack_documents), dropping the < T+1 tokens left over. Every row carries
its piece's index and its row number in the piece. Pipelines per worker (not one split by Ray Train) make
each worker's rows a function of the pieces alone, so a worker can start anywhere, on any world size.

Determinism: a piece's rows depend only on its documents, the tokenizer and T; with `preserve_order` the
worker sees its pieces in order. The number of actors, their CPUs and timing change nothing.

Resume: packed_batches yields state = {"epoch": e, "piece": i, "row": k}: this worker has consumed all
its pieces before its i-th, and rows 0 .. k-1 of that one. A resumed pipeline starts at piece i (nothing
before it is read or tokenized) and drops the first k rows of it: the rows then match an uninterrupted
run's, and at most one piece per worker (docs_per_piece documents) is tokenized twice. On another world
size, nanochat.dataloader.rank_resume_state maps the saved positions (approximately: nothing skipped).

One pass: a worker that has used all its pieces raises DataError; --allow-repeat starts another epoch of
the same pieces instead. The planner (ray_jobs/plan.py) checks before training that the shards hold enough.

Shard paths are resolved in the driver: on a multi-node cluster they must be on storage every node sees.
"""
import logging
import random
import time

import numpy as np
import ray

from nanochat.common import get_dist_info, setup_logging
from nanochat.dataloader import pack_documents, rows_to_batch, tokenize_for_packing, tokenizing_distributed_data_loader
from nanochat.dataset import DataError, list_shard_paths, open_shard
from nanochat.tokenizer import Tokenizer

logger = logging.getLogger("nanochat.data")

DOCS_PER_PIECE = 128  # at T=2048 on FineWeb-Edu about 40 rows (~1.5 d20 batches); packing keeps within 1% of 1024


def pretrain_pieces(paths=None, split="train", seed=None, docs_per_piece=DOCS_PER_PIECE):
    """[(path, row_group, first_doc, end_doc), ...]: the split's shards (or `paths`) cut into pieces, in
    file order, or with the files in an order shuffled by `seed`. Checks every file (DataError naming it)."""
    paths = [str(p) for p in (paths if paths is not None else list_shard_paths(split))]
    if not paths:
        raise DataError("no shard files given")
    if seed is not None:
        random.Random(seed).shuffle(paths)
    pieces = []
    for path in paths:
        meta = open_shard(path).metadata
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            pieces += [(path, group, start, min(start + docs_per_piece, rows)) for start in range(0, rows, docs_per_piece)]
    return pieces


class TokenizeAndPack:
    """Ray Data UDF (one per actor): a batch of pieces -> {"tokens": int32 rows (n, row_len), "piece", "row",
    "docs"}: each row's piece and row number in it, and the documents its piece tokenized (on every row)."""

    def __init__(self, tokenizer_dir: str, row_len: int):
        setup_logging()  # actors are fresh processes: without a handler, info logs would vanish
        self.tokenizer = Tokenizer.from_directory(tokenizer_dir)  # builds the tiktoken encoder, once
        self.row_len = row_len
        self.files = {}  # path -> ParquetFile: the footer is read once per actor

    def texts(self, path, group, start, end):
        import pyarrow.parquet as pq
        f = self.files.get(path) or self.files.setdefault(path, pq.ParquetFile(path))
        column = f.read_row_group(group, columns=["text"]).column("text").slice(start, end - start).to_pylist()
        return [t for t in column if t]

    def __call__(self, batch):
        out = {"tokens": [np.zeros((0, self.row_len), np.int32)], "piece": [], "row": [], "docs": []}
        for index, path, group, start, end in zip(batch["index"], batch["path"], batch["row_group"], batch["start"], batch["end"]):
            # one thread per actor: scale with more actors, not threads the scheduler does not know about
            docs = tokenize_for_packing(self.tokenizer, self.texts(path, int(group), int(start), int(end)), self.row_len)
            rows = pack_documents(docs, self.row_len)
            out["tokens"].append(rows)
            out["piece"].append(np.full(len(rows), index, dtype=np.int64))
            out["row"].append(np.arange(len(rows), dtype=np.int64))
            out["docs"].append(np.full(len(rows), len(docs), dtype=np.int64))
        return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}


def rank_pieces(pieces, rank: int, world: int):
    """This rank's pieces: r, r + W, r + 2W, ... (disjoint across ranks, every piece used once)."""
    return pieces[rank::world]


def build_rank_dataset(pieces, tokenizer_dir, seq_len: int, first_piece: int = 0, *, num_actors: int = 1,
                       actor_cpus: float = 1.0, actor_start_timeout_s: int = 600, name="pretrain") -> "ray.data.Dataset":
    """A Ray Dataset of this rank's packed rows, from its `first_piece`-th piece on, in order. If the actors
    cannot get their CPUs within actor_start_timeout_s, iterating raises instead of hanging."""
    items = [{"index": i, "path": p, "row_group": g, "start": s, "end": e} for i, (p, g, s, e) in enumerate(pieces) if i >= first_piece]
    if not items:
        raise DataError("no pieces of data left for this worker")
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block per piece: streams piece by piece
    ds = ds.map_batches(
        TokenizeAndPack,
        fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir), "row_len": seq_len + 1},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=actor_cpus,
    )
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False  # one pipeline per worker: their bars would flood the driver's log
    # an actor pool that cannot get its CPUs (e.g. Train workers took them) would wait silently forever:
    # fail with Ray's "Timed out while starting actors" instead
    ds.context.wait_for_min_actors_s = actor_start_timeout_s
    ds.set_name(name)  # the name shown in the dashboard's Data tab
    return ds


def _rebatch(blocks, B: int, state: dict, stats: dict):
    """Blocks of rows (with their piece and row ids) -> arrays of exactly B rows, skipping rows before
    `state`'s position and advancing it past each row handed out. stats["docs_tokenized"] counts the
    documents of the pieces received (one piece per block), "tokens_received" their tokens, "rows_buffered"
    the rows received and not handed out yet."""
    carry, carry_pos = None, None
    for block in blocks:
        rows, pieces, row_ids = block["tokens"], block["piece"], block["row"]
        stats["docs_tokenized"] += int(block["docs"][0]) if len(rows) else 0
        stats["tokens_received"] = stats.get("tokens_received", 0) + rows.size
        keep = (pieces > state["piece"]) | ((pieces == state["piece"]) & (row_ids >= state["row"]))
        rows, pieces, row_ids = rows[keep], pieces[keep], row_ids[keep]
        if carry is not None and len(carry):
            rows = np.concatenate([carry, rows])
            pieces, row_ids = np.concatenate([carry_pos[0], pieces]), np.concatenate([carry_pos[1], row_ids])
        full = len(rows) // B * B
        for i in range(0, full, B):
            state["piece"], state["row"] = int(pieces[i + B - 1]), int(row_ids[i + B - 1]) + 1
            stats["rows_buffered"] = len(rows) - i - B
            yield rows[i:i + B]
        carry, carry_pos = rows[full:], (pieces[full:], row_ids[full:])


def packed_batches(pieces, B: int, T: int, tokenizer_dir, device="cpu", resume_state=None, *, allow_repeat=False,
                   num_actors=1, actor_cpus=1.0, log_every: int = 100, stats=None, rank=None, world=None, metrics=None):
    """Yield (inputs, targets, state) forever: (B, T) int64 tensors on `device` from this worker's pieces
    (rank and world size default to torch.distributed's or the torchrun environment's). Pass a saved
    `state` back as `resume_state` to continue where it was taken. At the end of the pieces: DataError, or
    with allow_repeat the next epoch. `stats` (a dict), if given, is kept up to date: "first_piece" the
    pipeline started at, "docs_tokenized" by the pieces received, "docs_before_first_batch" of those.
    `metrics` (a RunMetrics), if given, gets the pool's tokens/s and the rows buffered ahead, each batch."""
    if rank is None or world is None:
        rank, world = get_dist_info()[1], get_dist_info()[3]
    mine = rank_pieces(pieces, rank, world)
    if not mine:
        raise DataError(f"{len(pieces)} pieces of data cannot be shared by {world} workers")
    state = {"epoch": 0, "piece": 0, "row": 0, **(resume_state or {})}
    stats = {} if stats is None else stats
    stats.update(docs_tokenized=0, first_piece=state["piece"], pieces_total=len(mine))
    while True:
        ds = build_rank_dataset(mine, tokenizer_dir, T, state["piece"], num_actors=num_actors, actor_cpus=actor_cpus,
                                name=f"pretrain_rank{rank}_epoch{state['epoch']}")
        t0, n, stats["tokens_received"] = time.time(), 0, 0
        blocks = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
        for rows in _rebatch(blocks, B, state, stats):
            stats.setdefault("docs_before_first_batch", stats["docs_tokenized"])
            if rows.shape[1] != T + 1:
                raise ValueError(f"dataset rows have {rows.shape[1]} tokens, expected T+1 = {T + 1}: seq_len differs")
            inputs, targets = rows_to_batch(rows, device)
            if metrics is not None:
                metrics.log(data_tokens_per_s=stats["tokens_received"] / (time.time() - t0),
                            data_rows_buffered=stats["rows_buffered"])
            yield inputs, targets, dict(state)
            n += 1
            if n % log_every == 0:
                logger.info("rank %d: epoch %d, piece %d/%d, %.0f tokens/s", rank, state["epoch"], state["piece"], len(mine),
                            n * B * T / (time.time() - t0))
        if n == 0:
            raise DataError(f"rank {rank}'s {len(mine)} pieces of pretraining data hold fewer than B={B} rows from its "
                            "position on: nothing to train on")
        if not allow_repeat:
            raise DataError(f"rank {rank} has used all its {len(mine)} pieces of pretraining data (one pass): download more "
                            "shards, train fewer steps, or pass --allow-repeat to start a second pass")
        state = {"epoch": state["epoch"] + 1, "piece": 0, "row": 0}
        logger.info("rank %d: starting data epoch %d (--allow-repeat)", rank, state["epoch"])


def val_batches(B: int, T: int, tokenizer_dir, device="cpu"):
    """Yield (inputs, targets) forever from this worker's part of the validation shard (each rank reads
    its own documents directly; the validation shard is small). The same batches every time it is
    called: evaluate on the first N."""
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    for inputs, targets, _ in tokenizing_distributed_data_loader(B, T, "val", tokenizer, device):
        yield inputs, targets
