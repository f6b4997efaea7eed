"""cluster.yaml validates against Ray's autoscaler config schema (offline, no cloud calls)."""
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config  # private: Ray is pinned

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_is_valid():
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)
    assert config["available_node_types"]["head"]["node_config"]["InstanceType"] == "p5.48xlarge"
    # the setup installs the project the README's way
    assert any("uv sync --locked" in c for c in config["setup_commands"])


def test_schema_catches_mistakes():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["head"]["min_workers"] = "many"  # wrong type
    with pytest.raises(Exception):
        validate_config(prepare_config(config))


def test_every_node_starts_ray_from_the_project_environment():
    """A job's `python` is the first on the PATH of the raylet that runs it, and the uploaded working dir has
    no .venv: every node's `ray start` must run with the project's environment activated."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert len(starts) == 1, starts
        assert ". .venv/bin/activate && " in starts[0].split("ray start")[0], starts[0]
