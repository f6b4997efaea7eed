"""Small utilities shared by every part of nanochat: paths, atomic writes, logging, distributed info.

Plain Python + torch; never imports ray (the core library must work under torchrun or in a notebook).
"""
import contextlib
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger("nanochat")


def setup_logging(level=logging.INFO):
    """Configure the root "nanochat" logger once (idempotent), so library modules can log freely."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False  # Ray (and others) put handlers on the root logger: print once
    logger.setLevel(level)
    return logger


def get_base_dir() -> Path:
    """Everything a run writes lives under $NANOCHAT_BASE_DIR (default ~/.cache/nanochat)."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_mirror_dir() -> Path | None:
    """$NANOCHAT_MIRROR points every data source at a local directory laid out like the dataset
    mirror's MANIFEST.md (pretrain/, gsm8k/, mmlu/, arc/, ...). When set, no network request is made."""
    mirror = os.environ.get("NANOCHAT_MIRROR")
    if not mirror:
        return None
    path = Path(mirror).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"NANOCHAT_MIRROR={mirror!r} is not a directory")
    return path


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write to a temp file beside `path`, fsync, then rename over it: a reader never sees half a file,
    and a crash mid-write leaves the old file (or nothing) in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes):
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str):
    with atomic_write(path, "w") as f:
        f.write(text)


def get_dist_info():
    """(is_distributed, rank, local_rank, world_size), from torch.distributed if it is initialized,
    else from the torchrun-style environment variables (Ray Train sets these too)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return world_size > 1, int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), world_size


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if get_dist_info()[1] == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device_type() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
