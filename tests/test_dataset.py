"""nanochat.dataset: shard listing, reading, bad files, and downloads against a local flaky HTTP server."""
import logging
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanochat import dataset
from nanochat.dataset import DataError, download_shard, download_shards, list_shard_paths, parquets_iter_batched
from pretrain_files import doc_text, make_pretrain_dir, write_shard

# ---- listing and reading -------------------------------------------------------------------------------


def test_mirror_layout_names_the_validation_shard(mirror_dir):
    train = list_shard_paths("train")
    assert [p.name for p in train] == [f"shard_0000{i}.parquet" for i in range(4)]
    assert list_shard_paths("val") == [mirror_dir / "pretrain" / "shard_00004.parquet"]


def test_downloaded_layout_never_uses_the_last_local_shard_as_validation(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOCHAT_MIRROR")
    data_dir = dataset.get_data_dir()
    for i in (0, 1, 2):
        write_shard(data_dir / dataset.shard_name(i), ["some text"])
    assert [p.name for p in list_shard_paths("train")] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    with pytest.raises(DataError, match="shard_01822.parquet"):
        list_shard_paths("val")
    write_shard(data_dir / "shard_01822.parquet", ["validation text"])
    (data_dir / "shard_00003.parquet.partial").write_bytes(b"half a download")
    assert list_shard_paths("val") == [data_dir / "shard_01822.parquet"]
    assert len(list_shard_paths("train")) == 3


def test_missing_shard_directory_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(tmp_path))  # a mirror without pretrain/
    with pytest.raises(DataError, match=str(tmp_path / "pretrain")):
        list_shard_paths("train")
    with pytest.raises(ValueError, match="split"):
        list_shard_paths("test")


def test_row_groups_strided_across_ranks(monkeypatch, tmp_path):
    _, docs = make_pretrain_dir(tmp_path, num_files=3, docs_per_file=50, row_group_size=20)  # 3 row groups per file
    monkeypatch.setenv("NANOCHAT_MIRROR", str(tmp_path))
    everything = [t for batch in parquets_iter_batched("train") for t in batch]
    assert everything == [docs[i] for i in range(100)]  # files 0 and 1, in order
    parts = [list(parquets_iter_batched("train", start=r, step=4)) for r in range(4)]
    assert [len(p) for p in parts] == [2, 2, 1, 1]  # 6 row groups round-robin
    assert sorted(t for p in parts for batch in p for t in batch) == sorted(everything)


def _with_one_shard(monkeypatch, tmp_path, writer):
    (tmp_path / "pretrain").mkdir()
    path = tmp_path / "pretrain" / "shard_00000.parquet"
    writer(path)
    write_shard(tmp_path / "pretrain" / "shard_00004.parquet", ["validation"])
    monkeypatch.setenv("NANOCHAT_MIRROR", str(tmp_path))
    return path


def test_truncated_parquet_names_the_file(monkeypatch, tmp_path, mirror_dir):
    good = (mirror_dir / "pretrain" / "shard_00000.parquet").read_bytes()
    path = _with_one_shard(monkeypatch, tmp_path, lambda p: p.write_bytes(good[: len(good) // 2]))
    with pytest.raises(DataError, match=str(path)):
        next(parquets_iter_batched("train"))


def test_corrupt_parquet_names_the_file(monkeypatch, tmp_path):
    path = _with_one_shard(monkeypatch, tmp_path, lambda p: p.write_bytes(b"PAR1 this is not parquet at all PAR1"))
    with pytest.raises(DataError, match=str(path)):
        next(parquets_iter_batched("train"))


def test_file_without_text_column_names_the_file(monkeypatch, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = _with_one_shard(monkeypatch, tmp_path, lambda p: pq.write_table(pa.table({"content": ["a", "b"]}), p))
    with pytest.raises(DataError, match=f"{path}.*no 'text' column"):
        next(parquets_iter_batched("train"))


def test_empty_documents_are_skipped_and_logged(monkeypatch, tmp_path, caplog):
    _with_one_shard(monkeypatch, tmp_path, lambda p: write_shard(p, ["one", "", "two", None, "three"], extra_columns=False))
    with caplog.at_level(logging.INFO, logger="nanochat.dataset"):
        assert list(parquets_iter_batched("train")) == [["one", "two", "three"]]
    assert "skipped 2 empty documents" in caplog.text


# ---- downloads against a local HTTP server -------------------------------------------------------------


class FlakyServer:
    """Serves files from a directory like the real source (GET /shard_XXXXX.parquet), honouring Range.
    `failures` is a list of what the next requests do instead of succeeding: 500, "drop" (send half the
    body, then close the connection) or "garbage" (a complete body that is not parquet)."""

    def __init__(self, root):
        self.root, self.failures, self.requests = root, [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                path = server.root / self.path.lstrip("/")
                failure = server.failures.pop(0) if server.failures else None
                if failure == 500:
                    return self.send_error(500)
                if not path.is_file():
                    return self.send_error(404)
                data = b"not parquet, just bytes " * 100 if failure == "garbage" else path.read_bytes()
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                if start >= len(data):
                    return self.send_error(416)
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                self.wfile.write(body[: len(body) // 2] if failure == "drop" else body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A source with shards 0, 1 and the validation shard 1822; NANOCHAT_MIRROR unset (downloads on)."""
    monkeypatch.delenv("NANOCHAT_MIRROR")
    root = tmp_path / "source"
    root.mkdir()
    rng = random.Random(0)
    for i in (0, 1, 1822):  # incompressible text: files of ~200 kB, a few download chunks each
        write_shard(root / dataset.shard_name(i), [doc_text(j, rng, 2000) for j in range(200)])
    srv = FlakyServer(root)
    yield srv
    srv.close()


def _download(server, index=0, **kw):
    return download_shard(index, base_url=server.url, backoff=0.01, timeout=5, **kw)


def test_download_retries_server_errors_and_dropped_connections(server):
    server.failures = [500, "drop", 500]
    path = _download(server)
    assert path.read_bytes() == (server.root / "shard_00000.parquet").read_bytes()
    assert path == dataset.get_data_dir() / "shard_00000.parquet"
    assert len(server.requests) == 4
    assert server.requests[3][1] is not None  # the attempt after the drop resumed with a Range request
    assert not list(path.parent.glob("*.partial"))


def test_download_resumes_a_partial_file_with_range(server):
    full = (server.root / "shard_00001.parquet").read_bytes()
    partial = dataset.get_data_dir() / "shard_00001.parquet.partial"
    partial.write_bytes(full[:1000])
    path = _download(server, 1)
    assert server.requests == [("/shard_00001.parquet", "bytes=1000-")]
    assert path.read_bytes() == full


def test_download_skips_valid_files_and_replaces_corrupt_ones(server):
    path = _download(server)
    assert _download(server) == path and len(server.requests) == 1  # already there: no request
    path.write_bytes(b"corrupted on disk")
    assert _download(server).read_bytes() == (server.root / "shard_00000.parquet").read_bytes()
    assert len(server.requests) == 2


def test_download_gives_up_with_a_clear_error(server):
    with pytest.raises(DataError, match="HTTP 404"):
        _download(server, 7)  # no such shard: not retried
    assert len(server.requests) == 1
    server.failures = ["garbage"] * 3
    with pytest.raises(DataError, match="3 attempts failed.*not a readable parquet"):
        _download(server, 0, retries=3)
    assert not list(dataset.get_data_dir().iterdir())  # nothing half-written left behind


def test_download_shards_fetches_train_and_validation_in_parallel(server, monkeypatch):
    monkeypatch.setenv(dataset.BASE_URL_ENV, server.url)
    server.failures = [500, 500]
    paths = download_shards(2, workers=3, backoff=0.01, progress=False)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    assert list_shard_paths("val") == [paths[-1]]
    assert list_shard_paths("train") == paths[:2]


def test_mirror_means_no_network(monkeypatch, mirror_dir):
    monkeypatch.setenv(dataset.BASE_URL_ENV, "http://127.0.0.1:9")  # would fail if anything were fetched
    paths = download_shards(2, progress=False)
    assert paths == [mirror_dir / "pretrain" / f"shard_0000{i}.parquet" for i in (0, 1, 4)]
    with pytest.raises(DataError, match="NANOCHAT_MIRROR"):
        download_shard(0)
