"""nanochat.dataloader: best-fit packing invariants and the plain distributed loader (split, resume)."""
import random

import numpy as np
import pytest
import torch

from nanochat.dataloader import BestFitPacker, _documents, pack_documents, tokenizing_distributed_data_loader
from pretrain_files import byte_tokenizer, make_pretrain_dir, row_segments, segment_doc_id

BOS = 256


def random_docs(rng, n, max_len):
    """Docs [BOS, id_hi, id_lo, random tokens...]: the first two tokens after BOS name the doc."""
    return [[BOS, i // 256, i % 256] + [rng.randrange(256) for _ in range(rng.randint(0, max_len))] for i in range(n)]


def check_packing(rows, docs, row_len, cropped):
    """Every row: row_len tokens, BOS first; each piece is a doc's prefix, whole unless it ends the row;
    no doc used twice; every input token is in a row, cropped, or in the leftover (< row_len)."""
    used = set()
    for row in rows:
        assert len(row) == row_len and row[0] == BOS
        segments = row_segments(list(row))
        for k, seg in enumerate(segments):
            if len(seg) < 3:  # a crop too short to carry the id: only allowed at the end of a row
                assert k == len(segments) - 1
                continue
            i = seg[1] * 256 + seg[2]
            assert i not in used
            used.add(i)
            assert seg == docs[i][: len(seg)]
            assert k == len(segments) - 1 or len(seg) == len(docs[i])
    total = sum(len(d) for d in docs)
    assert 0 <= total - len(rows) * row_len - cropped < row_len


@pytest.mark.parametrize("seed", range(6))
def test_pack_documents_invariants(seed):
    rng = random.Random(seed)
    row_len = rng.choice([9, 33, 129])
    docs = random_docs(rng, rng.randint(1, 300), max_len=rng.choice([4, row_len, 3 * row_len]))
    rows = pack_documents(docs, row_len)
    assert rows.dtype == np.int32 and rows.shape[1:] == (row_len,)
    check_packing(rows, docs, row_len, cropped=_cropped_total(docs, rows, row_len))


def _cropped_total(docs, rows, row_len):
    """What the packer reports as cropped, by running it again (pack_documents is deterministic)."""
    packer = BestFitPacker(row_len)
    for d in docs:
        packer.add(d)
    for _ in range(len(rows)):
        packer.pop_row()
    return packer.cropped_tokens


def test_best_fit_takes_the_largest_that_fits_then_crops_the_shortest():
    docs = [[BOS] * 1 + [1] * 4, [BOS, 2, 2], [BOS, 3], [BOS] + [4] * 6]  # lengths 5, 3, 2, 7
    rows = pack_documents(docs, 8)
    # row 1: the 7-long doc, then nothing fits 1 slot: the shortest (2) is cropped to 1
    # row 2: 5 + 3 fill it exactly
    assert rows.tolist() == [[BOS, 4, 4, 4, 4, 4, 4, BOS], [BOS, 1, 1, 1, 1, BOS, 2, 2]]


def test_streaming_packer_invariants():
    rng = random.Random(7)
    docs = random_docs(rng, 500, max_len=100)
    packer, rows = BestFitPacker(65), []
    for d in docs:  # the loader's refill policy: keep a few docs buffered
        packer.add(d)
        while len(packer) > 10 and packer.num_tokens >= 65:
            rows.append(packer.pop_row())
    while packer.num_tokens >= 65:
        rows.append(packer.pop_row())
    check_packing(rows, docs, 65, packer.cropped_tokens)


# ---- the loader -----------------------------------------------------------------------------------------


@pytest.fixture
def synthetic_mirror(tmp_path, monkeypatch):
    """2 training shards of 60 docs (row groups of 20) + a validation shard; a byte-level tokenizer."""
    _, docs = make_pretrain_dir(tmp_path, num_files=3, docs_per_file=60, max_len=200)
    monkeypatch.setenv("NANOCHAT_MIRROR", str(tmp_path))
    return docs, byte_tokenizer()


def loader(tokenizer, rank=0, world_size=1, split="train", resume_state=None, monkeypatch=None):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    return tokenizing_distributed_data_loader(4, 64, split, tokenizer, resume_state=resume_state,
                                             buffer_docs=8, tokenizer_batch=4)


def batch_doc_ids(batches):
    ids = []
    for inputs, targets, _ in batches:
        rows = torch.cat([inputs, targets[:, -1:]], dim=1)
        for row in rows.tolist():
            ids += [i for i in map(segment_doc_id, row_segments(row)) if i is not None]
    return ids


def take(it, n):
    return [next(it) for _ in range(n)]


def test_loader_batches(synthetic_mirror, monkeypatch):
    _, tokenizer = synthetic_mirror
    for split in ("train", "val"):
        inputs, targets, state = next(loader(tokenizer, split=split, monkeypatch=monkeypatch))
        assert inputs.shape == targets.shape == (4, 64) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert (inputs[:, 0] == BOS).all()
        assert set(state) == {"epoch", "row_group", "doc"}


def test_ranks_get_disjoint_documents(synthetic_mirror, monkeypatch):
    docs, tokenizer = synthetic_mirror
    state = {"epoch": 0, "row_group": 0, "doc": 0}
    per_rank = []
    for r in range(3):  # one epoch of documents per rank
        texts, gen = [], _documents("train", r, 3, state)
        for text, s in gen:
            if s["epoch"] > 0:
                break
            texts.append(text)
        per_rank.append(texts)
    assert [len(t) for t in per_rank] == [42, 42, 36]  # 6 row groups of 20: 7 + 7 + 6 each
    assert sorted(sum(per_rank, [])) == sorted(docs[i] for i in range(120))
    # and through the loader: the documents two ranks train on never overlap
    seen = [set(batch_doc_ids(take(loader(tokenizer, r, 2, monkeypatch=monkeypatch), 8))) for r in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_resume_continues_without_repeats(synthetic_mirror, monkeypatch):
    docs, tokenizer = synthetic_mirror
    first = take(loader(tokenizer, monkeypatch=monkeypatch), 6)
    state = first[-1][2]
    resumed = take(loader(tokenizer, resume_state=state, monkeypatch=monkeypatch), 6)
    before, after = batch_doc_ids(first), batch_doc_ids(resumed)
    assert not set(before) & set(after)  # no document seen twice
    # the documents taken before the checkpoint: 20 per row group; skipped = buffered at the checkpoint
    taken = set(range(state["row_group"] * 20 + state["doc"]))
    assert set(before) <= taken and not set(after) & taken
    assert len(taken - set(before)) <= 8 + 1  # the packer's buffer (+ a crop too short to identify)
    # resuming is deterministic
    again = take(loader(tokenizer, resume_state=state, monkeypatch=monkeypatch), 6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, again))


def test_loader_wraps_around_epochs(synthetic_mirror, monkeypatch):
    _, tokenizer = synthetic_mirror
    states = [s for _, _, s in take(loader(tokenizer, split="val", monkeypatch=monkeypatch), 60)]
    assert states[0]["epoch"] == 0 and states[-1]["epoch"] >= 1  # 60 docs of val: a few epochs in 60 batches


def test_tokenize_for_packing_encodes_only_what_rows_can_use(small_tokenizer, mirror_dir):
    from conftest import mirror_texts
    from nanochat.dataloader import tokenize_for_packing
    tokenizer, _ = small_tokenizer
    texts = mirror_texts(mirror_dir, 2_000_000, shard="shard_00001.parquet")
    row_len = 129
    docs = tokenize_for_packing(tokenizer, texts, row_len)
    cut = 0
    for text, doc in zip(texts, docs):
        full = tokenizer.encode(text, prepend="<|bos|>")
        assert doc[:row_len] == full[:row_len]  # the tokens a row can hold are exact
        if len(doc) < len(full):
            cut += 1
            assert len(doc) > row_len  # a cut document still looks longer than a row to the packer
    assert cut > len(texts) // 4  # most of these documents are longer than 4 * (129 + 64) characters
    assert tokenize_for_packing(tokenizer, texts[:50], row_len, num_threads=2) == docs[:50]
