"""Small utilities shared by every part of nanochat: paths, atomic writes, logging, distributed info.

Plain Python + torch; never imports ray (the core library must work under torchrun or in a notebook).
"""
import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("nanochat")


# ---- errors the user can act on ------------------------------------------------------------------------

class NanochatError(Exception):
    """Bad input, data, files or settings: the message names the culprit (file, flag, phase) and says what to
    do. Every entry point prints it as one line and exits non-zero (one_line_errors); anything else is a bug
    and keeps its traceback."""


class SettingsError(NanochatError, ValueError):
    """Flags that cannot work together (batch arithmetic, a context too short for the asked generation, ...)."""


def find_nanochat_error(e):
    """The NanochatError behind `e`: itself, or one a Ray worker raised (Ray wraps a task's exception, the
    original being its `cause`; Ray Train's WorkerGroupError holds each rank's in `worker_failures`), else None."""
    todo, seen = [e], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, NanochatError):
            return e
        seen.add(id(e))
        todo += [getattr(e, "cause", None), e.__cause__, *getattr(e, "worker_failures", {}).values()]
    return None


@contextlib.contextmanager
def one_line_errors(name):
    """Around an entry point's work: a NanochatError (raised here or in a Ray worker) ends the program with
    "<name>: <message>" as its one line on stderr and exit status 1."""
    try:
        yield
    except Exception as e:
        found = find_nanochat_error(e)
        if found is None:
            raise
        message = str(found).splitlines()[0] if str(found) else type(found).__name__
        sys.exit(message if message.startswith(f"{name}:") else f"{name}: {message}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the flag ("prog: error: ..."), not usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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
    path = Path(base).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_mirror_dir() -> Path | None:
    """$NANOCHAT_MIRROR points every data source at a local directory laid out like the dataset
    mirror's MANIFEST.md (pretrain/, gsm8k/, mmlu/, arc/, ...). When set, no network request is made."""
    mirror = os.environ.get("NANOCHAT_MIRROR")
    if not mirror:
        return None
    path = Path(mirror).expanduser().absolute()  # paths handed to Ray tasks must not depend on their cwd
    if not path.is_dir():
        raise SettingsError(f"NANOCHAT_MIRROR={mirror!r} is not a directory: point it at the dataset mirror, or unset it")
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


# ---- downloads -----------------------------------------------------------------------------------------

DOWNLOAD_CHUNK_BYTES = 1 << 16  # a dropped connection loses at most the chunk being read


class DownloadError(NanochatError, RuntimeError):
    """A download that failed for good; the message names the URL and the last error."""


class _HTTPStatus(Exception):
    def __init__(self, status, url):
        super().__init__(f"HTTP {status} for {url}")
        self.status = status


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _fetch(get, url: str, partial: Path, timeout: float):
    """Download `url` into `partial`, continuing from its current size with an HTTP Range request."""
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing left to fetch: the partial file is complete (verified next)
            return
        if r.status_code >= 400:
            raise _HTTPStatus(r.status_code, url)
        resumed = r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        expected = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        written = 0
        with open(partial, "ab" if resumed else "wb") as f:  # a 200 means the server ignored Range: start over
            for chunk in r.iter_content(chunk_size=DOWNLOAD_CHUNK_BYTES):
                f.write(chunk)
                written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and written != expected:
            raise ConnectionError(f"{url}: connection closed after {written} of {expected} bytes")


def download_file(url: str, path, retries: int = 5, backoff: float = 1.0, timeout: float = 60.0, session=None,
                  verify=None, error=DownloadError) -> Path:
    """Download `url` to `path` unless it is there: the one downloader of every data source. Bytes go to
    <path>.partial, which a retry (or a later run) continues with a Range request, and which is renamed
    into place only when complete and, with `verify(partial)`, valid: `path` is never half a file.
    Server errors (5xx, 408, 429) and dropped connections are retried with exponential back-off; other
    HTTP errors fail at once; a complete but invalid file (verify raises `error`) is fetched anew.
    Failures raise `error` naming the URL."""
    import requests
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    get = session.get if session is not None else requests.get
    last_error = None
    for attempt in range(retries):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            logger.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs", url, attempt, retries, last_error, delay)
            time.sleep(delay)
        try:
            _fetch(get, url, partial, timeout)
            if verify is not None:
                verify(partial)
        except _HTTPStatus as e:
            if not _retryable(e.status):
                raise error(f"cannot download {url}: HTTP {e.status}") from None
            last_error = e
            continue
        except error as e:  # complete but invalid: the partial bytes are worthless, start over
            partial.unlink(missing_ok=True)
            last_error = e
            continue
        except (requests.RequestException, OSError) as e:  # keep the partial file: the next try resumes it
            last_error = e
            continue
        os.replace(partial, path)
        logger.info("downloaded %s to %s", url, path)
        return path
    raise error(f"cannot download {url}: {retries} attempts failed, last error: {last_error}")


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


# dense bf16 tensor-core peak FLOP/s (no sparsity) and HBM bandwidth in bytes/s, by a substring of the GPU's
# name: the denominators of MFU and MBU (memory-bandwidth utilization); first match wins ("H100 PCIe" before
# "H100", which means the SXM part)
GPU_SPECS = {"H200": (989e12, 4.8e12), "H100 PCIe": (756e12, 2.0e12), "H100": (989e12, 3.35e12),
             "B200": (2250e12, 8.0e12), "A100": (312e12, 2.0e12), "L40S": (362e12, 0.864e12), "A10G": (125e12, 0.6e12)}


def gpu_specs(name: str):
    """(peak bf16 FLOP/s, HBM bytes/s) of the GPU called `name` (torch.cuda.get_device_name), or (None, None)."""
    for key, specs in GPU_SPECS.items():
        if key in name:
            return specs
    return None, None
