"""Ray tasks of a phase run in the driver's environment: the same Python (no per-cluster rebuild of
the project, also when the driver was started by `uv run`) and the run's files (base dir, mirror)."""
import os
import sys

from ray_jobs.common import run_task


def test_tasks_run_in_the_drivers_environment(ray_cluster):
    def environment():  # nested: shipped by value, not imported from the tests folder on the worker
        import os
        import sys
        return sys.executable, os.environ.get("NANOCHAT_BASE_DIR"), os.environ.get("NANOCHAT_MIRROR")

    executable, base_dir, mirror = run_task(environment, num_cpus=0.5)
    assert executable == sys.executable  # under `uv run`, Ray would otherwise use a fresh virtualenv
    assert base_dir == os.environ["NANOCHAT_BASE_DIR"] and mirror == os.environ["NANOCHAT_MIRROR"]


def test_relative_data_paths_reach_tasks_as_absolute(ray_cluster, mirror_dir, monkeypatch):
    # the README's `NANOCHAT_MIRROR=../shared/datasets`: Ray workers run in other directories
    monkeypatch.chdir(mirror_dir.parent)
    monkeypatch.setenv("NANOCHAT_MIRROR", mirror_dir.name)

    def mirror_seen():
        from nanochat.common import get_mirror_dir
        return str(get_mirror_dir())

    assert run_task(mirror_seen, num_cpus=0.5) == str(mirror_dir.resolve())
    from nanochat.dataset import list_shard_paths
    paths = list_shard_paths("train")  # the driver's list, handed to read tasks as it is
    monkeypatch.chdir("/")
    assert paths and all(p.is_file() for p in paths)
