"""ray_jobs/data.py: the Ray Data pretraining pipeline (packing, split across workers, determinism, resume)."""
import threading

import numpy as np
import pytest

from nanochat.dataset import DataError
from pretrain_files import byte_tokenizer, make_pretrain_dir, row_segments, segment_doc_id, write_shard
from ray_jobs.data import build_pretrain_dataset, packed_batches, pretrain_data_config, val_batches

B, T = 4, 63


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 training shards of 80 docs + one with empty documents; a byte-level tokenizer on disk."""
    tmp_path = tmp_path_factory.mktemp("shards")
    pretrain, docs = make_pretrain_dir(tmp_path, num_files=4, docs_per_file=80, max_len=300)
    kept = {900: "000900|" + "kept " * 20, 901: "000901|" + "also kept " * 10}  # too long to be a batch's leftover
    with_empties = write_shard(tmp_path / "empties.parquet", ["", kept[900], None, kept[901]])
    docs.update(kept)
    paths = [pretrain / f"shard_0000{i}.parquet" for i in range(3)] + [with_empties]
    tok_dir = tmp_path / "tokenizer"
    byte_tokenizer(tok_dir)
    return paths, docs, tok_dir


def build(shards, **kw):
    paths, _, tok_dir = shards
    settings = dict(seq_len=T, docs_per_batch=32, num_actors=1, actor_cpus=0.5, read_cpus=0.25) | kw
    return build_pretrain_dataset(tok_dir, shard_paths=paths, **settings)


@pytest.fixture(scope="module")
def reference_rows(ray_cluster, shards):
    """Every row of the default pipeline, unsplit."""
    return all_rows(build(shards))


def all_rows(ds):
    return np.concatenate([b["tokens"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])


def consume(ds, num_batches, resume_state=None):
    """Split ds across 2 workers (as Train does) and take num_batches from each, concurrently (a
    streaming split is consumed in lockstep). Returns per worker [(rows (B, T+1), state), ...]."""
    splits = ds.streaming_split(2, equal=True)
    out = [[], []]

    def worker(w):
        it = packed_batches(splits[w], B, T, resume_state=resume_state)
        for _ in range(num_batches):
            inputs, targets, state = next(it)
            rows = np.concatenate([inputs.numpy(), targets.numpy()[:, -1:]], axis=1).astype(np.int32)
            out[w].append((rows, state))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(len(o) == num_batches for o in out), "a worker did not get its batches"
    return out


def test_rows_are_packed_documents_and_deterministic(shards, reference_rows):
    _, docs, _ = shards
    rows = reference_rows
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
    # the same rows, in the same order, whatever the size of the actor pool; another order with a seed
    assert np.array_equal(all_rows(build(shards, num_actors=2, actor_cpus=0.25)), rows)
    assert not np.array_equal(all_rows(build(shards, seed=1)), rows)


def test_workers_get_disjoint_rows_and_resume_exactly(shards, reference_rows):
    ds, rows = build(shards), reference_rows
    per_worker = len(rows) // 2 // B  # full batches each worker gets in one epoch
    run = consume(ds, per_worker)
    seen = [{r.tobytes() for rows_, _ in run[w] for r in rows_} for w in range(2)]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] <= {r.tobytes() for r in rows}
    assert len(rows) - len(seen[0] | seen[1]) <= 1 + 2 * (B - 1)  # equal split + each worker's partial batch
    # resume from a state taken mid-epoch: exactly the batches that followed it
    k = per_worker // 2
    resumed = consume(ds, per_worker - k, resume_state=run[0][k - 1][1])
    assert run[0][k - 1][1] == run[1][k - 1][1] == {"epoch": 0, "rows": k * B}
    for w in range(2):
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(run[w][k:], resumed[w]))


def test_bad_shard_fails_before_ray_runs(shards, tmp_path):
    paths, _, tok_dir = shards
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"truncated")
    with pytest.raises(DataError, match=str(bad)):
        build_pretrain_dataset(tok_dir, shard_paths=paths + [bad])


def test_actor_pool_without_cpus_fails_instead_of_hanging(ray_cluster, shards):
    import ray
    ds = build(shards, actor_cpus=64, actor_start_timeout_s=3)  # the test cluster has 4 CPUs
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


@pytest.mark.slow  # a Train run costs 15-20 s of start-up; the split itself is tested above
def test_torch_trainer_workers_get_disjoint_shards(ray_cluster, shards, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        import ray.train
        from ray_jobs.data import packed_batches
        it = packed_batches(ray.train.get_dataset_shard("train"), B, T)
        inputs = np.concatenate([next(it)[0].numpy() for _ in range(3)])
        np.save(f"{config['out']}/rank{ray.train.get_context().get_world_rank()}.npy", inputs)

    trainer = TorchTrainer(
        loop, train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="data_test", storage_path=str(tmp_path / "runs"),
                             failure_config=FailureConfig(max_failures=0, controller_failure_limit=0)),
        datasets={"train": build(shards)}, dataset_config=pretrain_data_config())
    trainer.fit()
    ranks = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    assert ranks[0].shape == (3 * B, T)
    assert not {r.tobytes() for r in ranks[0]} & {r.tobytes() for r in ranks[1]}
