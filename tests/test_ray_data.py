"""ray_jobs/data.py: the Ray Data pretraining pipeline (pieces, packing, per-rank shares, determinism,
resume that seeks instead of replaying, one pass)."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from nanochat.dataloader import rank_resume_state
from nanochat.dataset import DataError
from pretrain_files import byte_tokenizer, make_pretrain_dir, row_segments, segment_doc_id, write_shard
from ray_jobs.data import build_rank_dataset, packed_batches, pretrain_pieces, rank_pieces, val_batches

B, T = 4, 63
DOCS_PER_PIECE = 8  # small pieces: a piece is about a batch or two of rows here


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 training shards of 80 docs + one with empty documents; a byte-level tokenizer on disk."""
    tmp_path = tmp_path_factory.mktemp("shards")
    pretrain, docs = make_pretrain_dir(tmp_path, num_files=4, docs_per_file=80, max_len=300)
    kept = {900: "000900|" + "kept " * 20, 901: "000901|" + "also kept " * 10}
    with_empties = write_shard(tmp_path / "empties.parquet", ["", kept[900], None, kept[901]])
    docs.update(kept)
    paths = [pretrain / f"shard_0000{i}.parquet" for i in range(3)] + [with_empties]
    tok_dir = tmp_path / "tokenizer"
    byte_tokenizer(tok_dir)
    return paths, docs, tok_dir


def all_rows(pieces, tok_dir, **kw):
    ds = build_rank_dataset(pieces, tok_dir, T, num_actors=kw.pop("num_actors", 1), actor_cpus=kw.pop("actor_cpus", 0.5), **kw)
    return np.concatenate([b["tokens"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])


def batches(pieces, tok_dir, rank, world, n, resume_state=None, stats=None, **kw):
    it = packed_batches(pieces, B, T, tok_dir, resume_state=resume_state, rank=rank, world=world, num_actors=1,
                        actor_cpus=0.5, stats=stats, **kw)
    out = []
    for _ in range(n):
        inputs, targets, state = next(it)
        out.append((np.concatenate([inputs.numpy(), targets.numpy()[:, -1:]], axis=1).astype(np.int32), state))
    return out


def doc_ids(rows):
    return {segment_doc_id(seg) for row in rows.tolist() for seg in row_segments(row)} - {None}


def test_pieces_cover_every_document_once(shards):
    paths, _, _ = shards
    pieces = pretrain_pieces(paths, docs_per_piece=DOCS_PER_PIECE)
    covered = [(p, g, d) for p, g, start, end in pieces for d in range(start, end)]
    expected = [(str(p), g, d) for p in paths for g in range(pq.ParquetFile(p).num_row_groups)
                for d in range(pq.ParquetFile(p).metadata.row_group(g).num_rows)]
    assert covered == expected  # in file order, each document once
    assert all(end - start <= DOCS_PER_PIECE for _, _, start, end in pieces)
    shuffled = pretrain_pieces(paths, seed=1, docs_per_piece=DOCS_PER_PIECE)
    assert sorted(shuffled) == sorted(pieces) and shuffled != pieces  # files in another order
    shares = [rank_pieces(pieces, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(pieces) and shares[1][0] == pieces[1] and shares[1][1] == pieces[4]


def test_rows_are_packed_documents_and_deterministic(ray_cluster, shards):
    paths, docs, tok_dir = shards
    pieces = pretrain_pieces(paths, docs_per_piece=DOCS_PER_PIECE)
    rows = all_rows(pieces, tok_dir)
    assert rows.shape[1] == T + 1 and len(rows) > 50
    used = set()
    for row in rows.tolist():
        for seg in row_segments(row):  # starts with BOS, every piece is a document prefix, none twice
            i = segment_doc_id(seg)
            if i is not None:
                assert bytes(seg[1:]).decode() == docs[i][: len(seg) - 1]
                assert i not in used
                used.add(i)
    assert {900, 901} <= used  # the empty documents around them were skipped
    # the same rows, in the same order, whatever the size of the actor pool
    assert np.array_equal(all_rows(pieces, tok_dir, num_actors=2, actor_cpus=0.25), rows)


def test_ranks_get_disjoint_rows_and_a_late_resume_seeks(ray_cluster, shards):
    paths, _, tok_dir = shards
    pieces = pretrain_pieces(paths, docs_per_piece=DOCS_PER_PIECE)
    n = 24  # most of each rank's share (~15 pieces of ~2 batches)
    run = [batches(pieces, tok_dir, r, 2, n) for r in range(2)]
    seen = [doc_ids(np.concatenate([rows for rows, _ in run[r]])) for r in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank its own documents
    # resume rank 1 late, from the state after batch k: exactly the batches that followed, and the pipeline
    # starts at the saved piece: nothing before it is read, at most the rest of that piece is tokenized again
    k = 20
    saved = [run[0][k - 1][1], run[1][k - 1][1]]
    state = rank_resume_state(saved, "piece", rank=1, world=2)
    assert state == saved[1] and state["piece"] > 0
    stats = {}
    resumed = batches(pieces, tok_dir, 1, 2, n - k, resume_state=state, stats=stats)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(run[1][k:], resumed))
    assert stats["first_piece"] == state["piece"]
    docs_per_batch = len(doc_ids(np.concatenate([rows for rows, _ in run[1]]))) / n
    assert stats["docs_before_first_batch"] <= 2 * docs_per_batch + DOCS_PER_PIECE  # vs every document before it, replayed
    uninterrupted_docs = sum(end - start for _, _, start, end in rank_pieces(pieces, 1, 2)[:state["piece"]])
    assert uninterrupted_docs > 3 * stats["docs_before_first_batch"]  # what replaying the epoch would have tokenized


def test_one_pass_unless_repeat_is_allowed(ray_cluster, shards):
    paths, _, tok_dir = shards
    pieces = pretrain_pieces(paths[2:3], docs_per_piece=80)  # one shard, one piece per row group: a few batches
    one_pass = len(all_rows(pieces, tok_dir)) // B
    with pytest.raises(DataError, match="--allow-repeat"):
        batches(pieces, tok_dir, 0, 1, one_pass + 1)
    repeated = batches(pieces, tok_dir, 0, 1, one_pass + 1, allow_repeat=True)
    assert repeated[one_pass - 1][1]["epoch"] == 0 and repeated[one_pass][1]["epoch"] == 1
    with pytest.raises(DataError, match="fewer than B=4 rows"):  # 2 short documents: no batch, even repeated
        batches(pretrain_pieces(paths[3:]), tok_dir, 0, 1, 1, allow_repeat=True)


def test_resume_state_on_another_world_size():
    # 2 ranks saved: rank 0 was at its piece 5 (global 10), rank 1 at its piece 4 (global 9)
    saved = [{"epoch": 0, "piece": 5, "row": 3}, {"epoch": 0, "piece": 4, "row": 1}]
    # on 3 ranks, each starts at its first piece at or after global 9: rank 0 -> 9 (its 3rd), 1 -> 10, 2 -> 11
    assert [rank_resume_state(saved, "piece", r, 3) for r in range(3)] == [{"epoch": 0, "piece": 3}] * 3
    assert rank_resume_state(saved, "piece", 0, 1) == {"epoch": 0, "piece": 9}  # 1 rank: from global 9 on
    assert rank_resume_state({"epoch": 1, "example": 7}, "example", 0, 4) == {"epoch": 1, "example": 7}  # shared dict


def test_bad_shard_fails_before_ray_runs(shards, tmp_path):
    paths, _, _ = shards
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"truncated")
    with pytest.raises(DataError, match=str(bad)):
        pretrain_pieces(paths + [bad])


def test_actor_pool_without_cpus_fails_instead_of_hanging(ray_cluster, shards):
    import ray
    paths, _, tok_dir = shards
    ds = build_rank_dataset(pretrain_pieces(paths), tok_dir, T, actor_cpus=64, actor_start_timeout_s=3)  # the cluster has 4
    with pytest.raises(ray.exceptions.GetTimeoutError, match="starting actors"):
        ds.take(1)


def test_val_batches_read_this_ranks_part_of_the_validation_shard(tmp_path, monkeypatch):
    make_pretrain_dir(tmp_path, num_files=2, docs_per_file=40)
    monkeypatch.setenv("NANOCHAT_MIRROR", str(tmp_path))
    tok_dir = tmp_path / "tokenizer"
    byte_tokenizer(tok_dir)
    firsts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        inputs, targets = next(val_batches(B, T, tok_dir))
        assert inputs.shape == (B, T) and (inputs[:, 0] == 256).all()
        firsts.append(inputs)
    assert not np.array_equal(firsts[0].numpy(), firsts[1].numpy())
