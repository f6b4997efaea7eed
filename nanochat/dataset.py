"""The pretraining shards: FineWeb-Edu parquet files with a `text` column, one document per row.

Source: the Hugging Face dataset karpathy/fineweb-edu-100b-shuffle, files shard_00000.parquet ..
shard_01822.parquet (already shuffled). The last one, shard_01822, is the validation shard; every
other shard is training data. Downloads land in <base_dir>/base_data/.

With $NANOCHAT_MIRROR set, shards are read in place from <mirror>/pretrain/ (the mirror's last shard,
shard_00004, is its validation shard) and no network request is ever made.

    python -m nanochat.dataset -n 8      # download 8 training shards + the validation shard
"""
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import ArgumentParser, NanochatError, download_file, get_base_dir, get_mirror_dir

logger = logging.getLogger("nanochat.dataset")

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
BASE_URL_ENV = "NANOCHAT_PRETRAIN_URL"  # tests point this at a local HTTP server
NUM_SHARDS = 1823  # shard_00000 .. shard_01822
VAL_SHARD = 1822  # the dataset's last shard
MIRROR_VAL_SHARD = 4  # the mirror's last shard (see the mirror's MANIFEST.md)
SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")


class DataError(NanochatError, RuntimeError):
    """A shard that is missing, unreadable, or not in the expected format. The message names the file."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


# ---- where the shards are ----------------------------------------------------------------------------

def get_data_dir() -> Path:
    """Where downloaded shards live: <base_dir>/base_data."""
    path = get_base_dir() / "base_data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _shard_dir_and_val() -> tuple[Path, int]:
    mirror = get_mirror_dir()
    if mirror is not None:
        return mirror / "pretrain", MIRROR_VAL_SHARD
    return get_data_dir(), VAL_SHARD


def list_shard_paths(split: str) -> list[Path]:
    """"train": every available training shard, in index order (never the validation shard).
    "val": [the validation shard], which is fixed by name, not "whatever is last locally"."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    directory, val_index = _shard_dir_and_val()
    hint = "download shards with `python -m nanochat.dataset -n 8` or set NANOCHAT_MIRROR"
    if split == "val":
        path = directory / shard_name(val_index)
        if not path.is_file():
            raise DataError(f"validation shard {path} is missing ({hint})")
        return [path]
    indices = []
    if directory.is_dir():
        indices = sorted(int(m.group(1)) for m in map(SHARD_RE.match, os.listdir(directory)) if m)
    paths = [directory / shard_name(i) for i in indices if i != val_index]
    if not paths:
        raise DataError(f"no training shards (shard_XXXXX.parquet) in {directory} ({hint})")
    return paths


# ---- reading -----------------------------------------------------------------------------------------

def open_shard(path) -> pq.ParquetFile:
    """Open a shard, checking that it is readable parquet with a `text` column (reads the footer only)."""
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated or corrupt files
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
    return pf


def iter_row_groups(paths, start: int = 0, step: int = 1):
    """Yield (g, texts) for the row groups g = start, start+step, ... numbered globally across `paths`
    in order. Empty documents are dropped (and logged): they would pack into rows of a lone BOS."""
    g0 = 0  # global index of the current file's first row group
    for path in paths:
        pf = open_shard(path)
        n = pf.num_row_groups
        first = start if g0 <= start else start + -(-(g0 - start) // step) * step  # first g >= g0 on the stride
        for g in range(first, g0 + n, step):
            try:
                column = pf.read_row_group(g - g0, columns=["text"]).column("text")
            except Exception as e:
                raise DataError(f"{path}: row group {g - g0} is unreadable ({type(e).__name__}: {e})") from None
            texts = [t for t in column.to_pylist() if t]
            if len(texts) < len(column):
                logger.info("%s: skipped %d empty documents in row group %d", path, len(column) - len(texts), g - g0)
            yield g, texts
        g0 += n


def parquets_iter_batched(split: str, start: int = 0, step: int = 1):
    """Yield lists of document texts, one list per parquet row group of the split. Ranks take disjoint
    row groups with start=rank, step=world_size."""
    for _, texts in iter_row_groups(list_shard_paths(split), start, step):
        yield texts


# ---- downloading -------------------------------------------------------------------------------------

def download_shard(index: int, data_dir=None, base_url=None, retries: int = 5, backoff: float = 1.0,
                   timeout: float = 60.0, session=None) -> Path:
    """Download one shard (skipped if a valid copy is there). Bytes go to <name>.partial, which a retry
    or a later run continues with a Range request; it is renamed into place once it opens as parquet."""
    if get_mirror_dir() is not None:
        raise DataError("NANOCHAT_MIRROR is set: shards are read from the mirror and nothing is downloaded")
    data_dir = Path(data_dir or get_data_dir())
    base_url = (base_url or os.environ.get(BASE_URL_ENV) or BASE_URL).rstrip("/")
    name = shard_name(index)
    path = data_dir / name
    if path.exists():
        try:
            open_shard(path)
            return path
        except DataError as e:
            logger.warning("re-downloading %s: %s", name, e)
            path.unlink()
    return download_file(f"{base_url}/{name}", path, retries=retries, backoff=backoff, timeout=timeout, session=session,
                         verify=open_shard, error=DataError)


def download_shards(num_shards: int, workers: int = 8, data_dir=None, base_url=None, retries: int = 5,
                    backoff: float = 1.0, progress: bool = True) -> list[Path]:
    """Make the first `num_shards` training shards (-1: all) and the validation shard available, in
    parallel threads. With NANOCHAT_MIRROR set, returns the mirror's files and touches no network."""
    num_train = NUM_SHARDS - 1
    num_shards = num_train if num_shards < 0 else min(num_shards, num_train)
    if get_mirror_dir() is not None:
        train = list_shard_paths("train")
        if len(train) < num_shards:
            logger.warning("NANOCHAT_MIRROR has only %d training shards (%d asked for)", len(train), num_shards)
        return train[:num_shards] + list_shard_paths("val")
    import requests
    from tqdm import tqdm
    indices = list(range(num_shards)) + [VAL_SHARD]
    session = requests.Session()
    for scheme in ("https://", "http://"):
        session.mount(scheme, requests.adapters.HTTPAdapter(pool_maxsize=workers))
    paths, errors = {}, []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(indices), desc="shards", unit="shard", disable=not progress) as bar:
        futures = {pool.submit(download_shard, i, data_dir, base_url, retries, backoff, session=session): i
                   for i in indices}
        for future in as_completed(futures):
            try:
                paths[futures[future]] = future.result()
            except DataError as e:  # one bad shard does not stop the others; report them all at the end
                logger.error("%s", e)
                errors.append(str(e))
            bar.update(1)
    if errors:
        raise DataError(f"{len(errors)} of {len(indices)} shards failed:\n" + "\n".join(errors))
    return [paths[i] for i in indices]


def main():
    parser = ArgumentParser(description="Download FineWeb-Edu pretraining shards")
    parser.add_argument("-n", "--num-shards", type=int, default=8, help="training shards to download (-1: all 1822)")
    parser.add_argument("-w", "--workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--base-url", default=None, help=f"where the shards are (default ${BASE_URL_ENV} or {BASE_URL})")
    parser.add_argument("--retries", type=int, default=5)
    args = parser.parse_args()
    from nanochat.common import setup_logging
    setup_logging()
    from nanochat.common import one_line_errors
    with one_line_errors("nanochat.dataset"):
        paths = download_shards(args.num_shards, workers=args.workers, base_url=args.base_url, retries=args.retries)
    print(f"{len(paths)} shards ready in {paths[0].parent}")


if __name__ == "__main__":
    main()
