"""Checkpoints: exact round trip, resharding optimizer state between world sizes, refusing bad files."""
import pytest
import torch

from multiproc import run_gloo
from nanochat.checkpoint import (CheckpointError, build_model, checkpoint_dir, find_last_step, load_meta,
                                 load_optimizers, load_model, save_checkpoint, step_dir)
from nanochat.gpt import GPTConfig, create_model

CONFIG = GPTConfig(sequence_len=16, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
TOKENIZER = "tok-sha256:abc123"
# distributed vs single-process training differ only by float rounding (gradient averaging order, the
# loss summed chunk by chunk)
RESHARD_ATOL = 1e-5


def batch(step, rank=0, world_size=1):
    """The step's batch of 4 rows; with several ranks, each takes its share (equal shares: the average of
    the ranks' mean losses is the mean loss of the whole batch)."""
    idx = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.sequence_len + 1), generator=torch.Generator().manual_seed(step))
    rows = idx.chunk(world_size)[rank]
    return rows[:, :-1], rows[:, 1:]


def train(model, optimizers, steps, rank=0, world_size=1):
    for step in steps:
        x, y = batch(step, rank, world_size)
        model(x, y).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def fresh(device="cpu"):
    torch.manual_seed(0)
    model = create_model(CONFIG, device)
    return model, model.setup_optimizers(ns_dtype=torch.float32)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def optimizer_tensors(optimizers):
    """Every optimizer state tensor, keyed by (optimizer, param index, name): comparable across layouts."""
    out = {}
    for i, opt in enumerate(optimizers):
        for j, p in enumerate(q for g in opt.param_groups for q in g["params"]):
            for k, v in opt.state.get(p, {}).items():
                out[i, j, k] = v.clone()
    return out


def test_round_trip_is_exact(tmp_path):
    model, optimizers = fresh()
    train(model, optimizers, range(3))
    ckpt = tmp_path / "base" / "d2"
    save_checkpoint(ckpt, 3, model, optimizers, meta={"loss": 1.5, "loader": {"shard": 2, "row": 17}, "phase": "base"},
                    tokenizer_fingerprint=TOKENIZER)
    assert find_last_step(ckpt) == 3
    loaded, meta = build_model(ckpt, 3, "cpu", phase="train", expect_config=CONFIG, expect_tokenizer=TOKENIZER)
    assert meta["loader"] == {"shard": 2, "row": 17} and meta["loss"] == 1.5 and meta["step"] == 3 and loaded.training
    x, _ = batch(99)
    assert torch.equal(loaded(x), model(x))
    loaded_opts = loaded.setup_optimizers(ns_dtype=torch.float32)
    load_optimizers(loaded_opts, ckpt, 3)
    # one more step from the loaded state = one more step from the live state, bit for bit
    train(model, optimizers, [3])
    train(loaded, loaded_opts, [3])
    assert all(torch.equal(a, b) for a, b in zip(params(loaded), params(model)))
    assert [g["lr"] for g in loaded_opts[0].param_groups] == [g["lr"] for g in optimizers[0].param_groups]


def test_latest_complete_checkpoint_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    model, _ = fresh()
    ckpt = checkpoint_dir("sft", "d2")
    for step in (5, 10):
        save_checkpoint(ckpt, step, model)
    step_dir(ckpt, 15).mkdir()  # a save killed before its meta.json: incomplete
    (step_dir(ckpt, 15) / "model.pt").write_bytes(b"partial")
    assert find_last_step(ckpt) == 10
    loaded, meta = load_model("sft", "cpu")
    assert meta["step"] == 10 and not loaded.training
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        build_model(ckpt, 15, "cpu")
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_optimizers(fresh()[1], ckpt, 10)


def test_damaged_files_are_rejected_by_name(tmp_path):
    model, optimizers = fresh()
    save_checkpoint(tmp_path, 1, model, optimizers)
    path = step_dir(tmp_path, 1) / "model.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"model\.pt is .*truncated"):
        build_model(tmp_path, 1, "cpu")
    path.write_bytes(b"\0" * len(data))  # same size, garbage
    with pytest.raises(CheckpointError, match=r"model\.pt is corrupt"):
        build_model(tmp_path, 1, "cpu")


def test_mismatched_config_or_tokenizer_is_refused(tmp_path):
    model, _ = fresh()
    save_checkpoint(tmp_path, 1, model, tokenizer_fingerprint=TOKENIZER)
    other = GPTConfig(**{**CONFIG.to_dict(), "n_layer": 3})
    with pytest.raises(CheckpointError, match=r"n_layer=2 \(expected 3\)"):
        build_model(tmp_path, 1, "cpu", expect_config=other)
    with pytest.raises(CheckpointError, match="tokenizer 'tok-sha256:abc123'.*'tok-sha256:zzz'"):
        build_model(tmp_path, 1, "cpu", expect_tokenizer="tok-sha256:zzz")


def two_rank_worker(rank, world_size, one_rank_ckpt, two_rank_ckpt, out):
    # (a) train 2 steps on 2 ranks (DistAdamW + DistMuon) and save: each rank writes its shard
    model, optimizers = fresh()
    assert [type(o).__name__ for o in optimizers] == ["DistAdamW", "DistMuon"]
    train(model, optimizers, range(2), rank, world_size)
    save_checkpoint(two_rank_ckpt, 2, model, optimizers)
    # (b) resume a 1-rank checkpoint (same 2 steps, single process) on 2 ranks
    model, _ = build_model(one_rank_ckpt, 2, "cpu", phase="train")
    optimizers = model.setup_optimizers(ns_dtype=torch.float32)
    load_optimizers(optimizers, one_rank_ckpt, 2)
    full = torch.load(step_dir(one_rank_ckpt, 2) / "optim_rank0.pt")["optimizers"]
    for (i, j, k), v in optimizer_tensors(optimizers).items():
        saved = full[i]["state"][j][k]
        if i == 0 and k != "step":  # DistAdamW keeps rows [rank * n, (rank + 1) * n) (padded) of each moment
            n = v.size(0)
            saved = torch.cat([saved, saved.new_zeros((2 * n - saved.size(0), *saved.shape[1:]))])[rank * n:(rank + 1) * n]
        assert torch.equal(v, saved), (i, j, k)
    owned = sum(len(g["params"][rank::world_size]) for g in optimizers[1].param_groups)
    assert len(optimizers[1].state) == owned  # DistMuon kept only its own momentum buffers
    train(model, optimizers, [2], rank, world_size)
    if rank == 0:
        torch.save(params(model), out)


def test_optimizer_state_reshards_between_world_sizes(tmp_path):
    # single-process reference: 2 steps, save (1 rank), then the 3rd step
    model, optimizers = fresh()
    train(model, optimizers, range(2))
    one_rank, two_rank = tmp_path / "one", tmp_path / "two"
    save_checkpoint(one_rank, 2, model, optimizers)
    reference_state = optimizer_tensors(optimizers)
    train(model, optimizers, [2])
    reference_step3 = params(model)

    run_gloo(two_rank_worker, 2, one_rank, two_rank, tmp_path / "resumed_on_2.pt")

    # 1 -> 2: resumed on 2 ranks, the 3rd step lands where the single process's did
    for got, want in zip(torch.load(tmp_path / "resumed_on_2.pt"), reference_step3):
        torch.testing.assert_close(got, want, atol=RESHARD_ATOL, rtol=RESHARD_ATOL)
    # 2 -> 1: the shards merge into the state the single process holds after the same 2 steps
    assert load_meta(two_rank, 2)["world_size"] == 2 and (step_dir(two_rank, 2) / "optim_rank1.pt").is_file()
    model, _ = build_model(two_rank, 2, "cpu", phase="train")
    optimizers = model.setup_optimizers(ns_dtype=torch.float32)
    load_optimizers(optimizers, two_rank, 2)
    merged = optimizer_tensors(optimizers)
    assert merged.keys() == reference_state.keys()
    for key, want in reference_state.items():
        torch.testing.assert_close(merged[key], want, atol=RESHARD_ATOL, rtol=RESHARD_ATOL)
    train(model, optimizers, [2])
    for got, want in zip(params(model), reference_step3):
        torch.testing.assert_close(got, want, atol=RESHARD_ATOL, rtol=RESHARD_ATOL)
