"""Shared test fixtures. One local Ray cluster per test session (Ray start-up is slow), started with
an explicit logical CPU count; every test that uses Ray declares its tasks', actors' and workers'
CPU shares so they fit in it."""
import os
from pathlib import Path

import pytest

import ray_jobs  # noqa: F401 (before ray is imported: Ray workers run in this environment, see ray_jobs/__init__.py)

REPO = Path(__file__).resolve().parent.parent
# the dataset mirror beside the checkout (../shared/datasets); tests never touch the network
DEFAULT_MIRROR = REPO.parent / "shared" / "datasets"
RAY_TEST_CPUS = 4  # logical CPUs: 2 train workers + room for data tasks/actors on a 2-core machine


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = _free_port()  # the session node's Prometheus endpoint (a fixed port, as a scraper would have)


@pytest.fixture(scope="session")
def mirror_dir():
    path = Path(os.environ.get("NANOCHAT_MIRROR", DEFAULT_MIRROR))
    if not (path / "MANIFEST.md").is_file():
        pytest.fail(f"dataset mirror not found at {path}: set NANOCHAT_MIRROR to the shared datasets folder")
    return path


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, mirror_dir, monkeypatch):
    """Every test writes under its own base dir and reads data from the mirror only."""
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror_dir))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path_factory.mktemp("base")))


@pytest.fixture(scope="session")
def ray_cluster(mirror_dir):
    """A local Ray cluster shared by the whole test session."""
    import ray
    env_vars = {
        "NANOCHAT_MIRROR": str(mirror_dir),
        # Ray Train's controller polls every 2 s by default: report() would cost ~2 s per call
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    }
    os.environ.update(env_vars)
    ray.init(address="local", num_cpus=RAY_TEST_CPUS, include_dashboard=False,  # always a new one: never a stale cluster file's
             runtime_env={"env_vars": env_vars},
             object_store_memory=1 << 30, log_to_driver=True, _metrics_export_port=METRICS_PORT,
             _system_config={"metrics_report_interval_ms": 1000})  # exported every second, not every 10
    yield ray
    ray.shutdown()


def mirror_texts(mirror_dir, max_chars, shard="shard_00000.parquet"):
    """Real documents from one mirror pretraining shard (read directly: no project code involved)."""
    import pyarrow.parquet as pq
    texts, total = [], 0
    for batch in pq.ParquetFile(Path(mirror_dir) / "pretrain" / shard).iter_batches(columns=["text"], batch_size=256):
        for text in batch.column("text").to_pylist():
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                return texts
    return texts


@pytest.fixture(scope="session")
def small_tokenizer(mirror_dir, tmp_path_factory):
    """A real tokenizer (vocab 1024) trained by rustbpe on ~300k characters of the mirror, saved to disk;
    returns (tokenizer, directory)."""
    from nanochat.tokenizer import Tokenizer
    tokenizer = Tokenizer.train_from_iterator(mirror_texts(mirror_dir, 300_000), vocab_size=1024)
    directory = tokenizer.save(tmp_path_factory.mktemp("tokenizer"))
    return tokenizer, directory


def scrape_metrics(port=None):
    """The node's Prometheus endpoint, parsed: [(sample name, labels, value)] of the project's metrics."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families
    text = requests.get(f"http://127.0.0.1:{port or METRICS_PORT}/metrics", timeout=10).text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name.startswith("ray_nanochat_")]


def wait_for_metrics(check, timeout_s=60):
    """Poll the scrape until check(samples) is truthy (Ray exports every second); returns its value."""
    import time
    deadline = time.time() + timeout_s
    while True:
        samples = scrape_metrics()
        found = check(samples)
        if found or time.time() > deadline:
            assert found, f"metrics never matched; seen: {sorted({name for name, _, _ in samples})}"
            return found
        time.sleep(1)


def metric_values(samples, name, **labels):
    """Values of the samples called `name` whose labels include `labels`."""
    return [v for n, l, v in samples if n == name and all(l.get(k) == str(x) for k, x in labels.items())]


DASHBOARD = REPO / "monitoring" / "grafana_nanochat.json"
EVENT_COUNTERS = {"nanochat_train_restarts_total", "nanochat_rl_rollouts_refused_total", "nanochat_rl_actors_replaced_total"}
GPU_ONLY = {"nanochat_train_mfu"}  # needs the GPU's peak FLOP/s: never reported on the CPU


def dashboard_metrics():
    """The project's metric names (without Ray's ray_ prefix) the Grafana dashboard's queries read."""
    import json
    import re
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    return {re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"ray_(nanochat_\w+)", e)}


def assert_dashboard_finds(samples, prefix):
    """Every dashboard metric starting with `prefix` is in the scrape (event counters only once they counted;
    on this CPU-only machine the GPU-only ones must be absent: no made-up MFU)."""
    import re
    scraped = {re.sub(r"^ray_|_(bucket|count|sum)$", "", name) for name, _, _ in samples}
    wanted = {m for m in dashboard_metrics() if m.startswith(prefix)}
    missing = wanted - EVENT_COUNTERS - GPU_ONLY - scraped
    assert not missing, f"the dashboard queries {sorted(missing)}, which the scrape does not have"
    assert not wanted & GPU_ONLY & scraped, "a GPU-only metric was reported on the CPU"
