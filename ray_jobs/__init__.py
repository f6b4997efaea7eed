"""The Ray side of nanochat: one script per pipeline phase, the speedrun driver that chains them, the
planner (plan.py), and their shared glue (common.py: the cluster; training.py: the training phases)."""
import os

# A driver started by `uv run` (the README's commands) would make Ray 2.60 start every worker through
# `uv run` in an uploaded copy of the project: a fresh virtualenv per cluster, the Rust extension
# compiled again, minutes before the first task runs. Workers of a local Ray share the driver's
# environment as it is; cluster nodes get theirs from cluster.yaml. Set before `ray` is imported (Ray
# reads it then); an explicit value from the user wins.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
