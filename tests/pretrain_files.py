"""Small synthetic pretraining shards for the data tests: documents "<id>|<letters>" whose id can be read
back from the bytes of a packed row (the tests use a byte-level tokenizer: one token per byte)."""
import random

import pyarrow as pa
import pyarrow.parquet as pq

ID_LEN = 7  # "000123|"


def doc_text(i: int, rng: random.Random, max_len: int = 300) -> str:
    return f"{i:06d}|" + "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, max_len)))


def write_shard(path, texts, row_group_size=20, extra_columns=True):
    table = pa.table({"text": texts, "doc_id": [str(i) for i in range(len(texts))]} if extra_columns else {"text": texts})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_pretrain_dir(root, num_files=3, docs_per_file=60, seed=0, max_len=300, row_group_size=20):
    """root/pretrain/ in the mirror layout: training shards shard_00000.. and the validation shard
    shard_00004 (the last file). Returns (pretrain dir, {doc id: text})."""
    assert 2 <= num_files <= 5
    rng = random.Random(seed)
    pretrain = root / "pretrain"
    pretrain.mkdir(parents=True)
    docs = {}
    for f in range(num_files):
        texts = [doc_text(f * docs_per_file + j, rng, max_len) for j in range(docs_per_file)]
        docs.update((f * docs_per_file + j, t) for j, t in enumerate(texts))
        index = 4 if f == num_files - 1 else f
        write_shard(pretrain / f"shard_{index:05d}.parquet", texts, row_group_size)
    return pretrain, docs


def byte_tokenizer(directory=None):
    """A 256-byte vocabulary (+ the special tokens): token id = byte value, BOS = 256."""
    from nanochat.tokenizer import Tokenizer
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    if directory is not None:
        tokenizer.save(directory)
    return tokenizer


def row_segments(row, bos=256):
    """Split a packed row into its documents' token lists (each starts with BOS)."""
    starts = [i for i, t in enumerate(row) if t == bos]
    assert starts and starts[0] == 0, "a row must start with BOS"
    return [list(row[a:b]) for a, b in zip(starts, starts[1:] + [len(row)])]


def segment_doc_id(segment):
    """The document id in a segment (BOS + "000123|..."), or None when it was cropped before the id."""
    if len(segment) < 1 + ID_LEN:
        return None
    return int(bytes(segment[1:ID_LEN]).decode())
