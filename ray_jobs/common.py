"""Ray glue shared by the phase scripts: connecting to (or starting) Ray, running a phase function
as a Ray task with the project's environment, phase completion markers for resumable pipelines, and the
script entry every phase uses. The training phases' own glue is in ray_jobs/training.py."""
import json
import logging
import os
import time
import uuid
from pathlib import Path

from nanochat.common import NanochatError, atomic_write_text, get_base_dir

logger = logging.getLogger("nanochat.ray")

# environment every Ray task/worker of a run needs to see the same files as the driver
PROJECT_ENV_VARS = ("NANOCHAT_BASE_DIR", "NANOCHAT_MIRROR", "NANOCHAT_PRETRAIN_URL")


def project_env() -> dict:
    env = {k: os.environ[k] for k in PROJECT_ENV_VARS if os.environ.get(k)}
    env.setdefault("NANOCHAT_BASE_DIR", str(get_base_dir()))
    for key in ("NANOCHAT_BASE_DIR", "NANOCHAT_MIRROR"):  # workers start in other directories: no relative paths
        if key in env:
            env[key] = os.path.abspath(os.path.expanduser(env[key]))
    # Ray Train's controller polls its workers every 2 s by default, which makes every report() cost ~2 s
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"))
    return env


def init_ray(num_cpus=None):
    """Attach to a running cluster (RAY_ADDRESS, or the latest local `ray start --head`), else start a
    local Ray with an explicit logical CPU count (RAY_ADDRESS=local always starts a fresh one).
    Returns the cluster's resources."""
    import ray
    if not ray.is_initialized():
        # under `ray job submit` the job's runtime env already sets some of these: Ray refuses to merge
        # two values for one variable, so leave those to the job
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars", {})
        env = {"env_vars": {k: v for k, v in project_env().items() if k not in job_env}}
        address = os.environ.get("RAY_ADDRESS") or "auto"
        try:
            if address == "local":
                raise ConnectionError("a fresh local Ray was asked for")
            ray.init(address=address, runtime_env=env)
            logger.info("connected to the running Ray cluster")
        except ConnectionError:
            # at least 4 logical CPUs: on a small machine, 2 train workers at 1 CPU each must leave
            # room for the data pipeline's read tasks and tokenizer actor, or it waits forever
            num_cpus = num_cpus or max(4, os.cpu_count())
            ray.init(address="local", num_cpus=num_cpus, runtime_env=env)
            logger.info("started a local Ray with %s logical CPUs", num_cpus)
    return ray.cluster_resources()


class StorageError(NanochatError, ValueError):
    """A directory a multi-node run shares (checkpoints, the base dir) is not the same on every node."""


def _read_markers(paths):
    """On one node: the text of each marker file, or None where this node does not see it."""
    import ray
    texts = []
    for path in paths:
        try:
            texts.append(Path(path).read_text())
        except OSError:
            texts.append(None)
    return ray.get_runtime_context().get_node_id(), texts


def check_shared_storage(*directories, timeout_s=300):
    """Refuse (StorageError) a run on several nodes whose `directories` are not the same files on every
    node: the driver writes a fresh marker into each, a task pinned to every alive node reads them back.
    A node that does not answer within timeout_s counts as blind; one that is gone meanwhile is left out.
    On one node there is nothing to check. Nodes that join later (autoscaling) are not checked here:
    cluster.yaml mounts the storage on every node it starts."""
    import ray
    from ray.exceptions import TaskUnschedulableError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    t0 = time.time()
    token = uuid.uuid4().hex
    markers = [Path(d).resolve() / f".nanochat-storage-check-{token}" for d in dict.fromkeys(map(str, directories))]
    for marker in markers:
        atomic_write_text(marker, token)
    read = ray.remote(_read_markers)
    refs = {read.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(list(map(str, markers))): n for n in nodes}
    seen = {}  # node id -> the markers' texts as that node read them
    try:
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                node_id, texts = ray.get(ref)
                seen[node_id] = texts
            except TaskUnschedulableError:  # the node left the cluster since it was listed
                nodes.remove(refs[ref])
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
    for i, marker in enumerate(markers):
        blind = [n for n in nodes if (seen.get(n["NodeID"]) or [None] * len(markers))[i] != token]
        if blind:
            names = ", ".join(f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]}"
                              f"{'' if n['NodeID'] in seen else ', no answer'})" for n in blind)
            raise StorageError(f"{marker.parent} is not visible from {len(blind)} of the cluster's {len(nodes)} nodes: {names}. "
                               "A multi-node run needs its checkpoints and base dir on storage every node mounts at the same "
                               "path (--storage, $NANOCHAT_BASE_DIR; cluster.yaml mounts a shared file system at /mnt/nanochat)")
    logger.info("every one of the %d nodes sees %s (checked in %.1fs)", len(nodes), ", ".join(str(m.parent) for m in markers),
                time.time() - t0)


def _with_env(env, fn, *args, **kwargs):
    os.environ.update(env)
    return fn(*args, **kwargs)


def submit_task(fn, *args, num_cpus=1, num_gpus=0, name=None, max_retries=1, **kwargs):
    """Start fn(*args, **kwargs) as a Ray task with the driver's project environment (retried up to
    max_retries times when its worker dies); returns its ObjectRef."""
    import ray
    task = ray.remote(_with_env).options(num_cpus=num_cpus, num_gpus=num_gpus, name=name or fn.__name__, max_retries=max_retries)
    return task.remote(project_env(), fn, *args, **kwargs)


def run_task(fn, *args, num_cpus=1, num_gpus=0, name=None, **kwargs):
    """Run fn(*args, **kwargs) as a Ray task with the driver's project environment; return its result."""
    import ray
    return ray.get(submit_task(fn, *args, num_cpus=num_cpus, num_gpus=num_gpus, name=name, **kwargs))


class PhaseLog:
    """Completion markers of a pipeline run: <dir>/<phase>.done holds the phase's result, written
    (atomically) only after the phase's own outputs are complete. A re-run skips marked phases.
    on_complete(phase, result), e.g. the report's log, runs before the marker is written: a crash in
    between re-runs the phase rather than leaving it done but missing from the report."""

    def __init__(self, directory, on_complete=None):
        self.directory = Path(directory)
        self.on_complete = on_complete

    def done(self, phase) -> dict | None:
        path = self.directory / f"{phase}.done"
        return json.loads(path.read_text()) if path.is_file() else None

    def mark(self, phase, result: dict):
        atomic_write_text(self.directory / f"{phase}.done", json.dumps(result, default=str))

    def run(self, phase, fn, *args, **kwargs):
        """fn() unless the phase is already marked done; returns (result, skipped)."""
        previous = self.done(phase)
        if previous is not None:
            logger.info("phase %s: already complete, skipped", phase)
            return previous, True
        logger.info("phase %s: starting", phase)
        t0 = time.time()
        result = dict(fn(*args, **kwargs) or {})
        result.setdefault("wall_seconds", round(time.time() - t0, 2))
        if self.on_complete is not None:
            self.on_complete(phase, result)
        self.mark(phase, result)
        logger.info("phase %s: done in %.1fs", phase, result["wall_seconds"])
        return result, False


# ---- script entry points --------------------------------------------------------------------------------

def run_phase_script(main, parser, section, report_section):
    """`python ray_jobs/<phase>.py ...`: run main(args), log the report section, print the summary as JSON.
    Bad input (a malformed data row, a missing or mismatched checkpoint, impossible settings: a
    NanochatError, raised here or in a Ray worker) ends with one line naming it, not a traceback."""
    from nanochat.common import one_line_errors
    from nanochat.report import get_report
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    args = parser.parse_args()
    t0 = time.time()
    with one_line_errors(section):
        summary = main(args)
    get_report().log(section, {"wall_seconds": round(time.time() - t0, 1), **report_section(summary, args)})
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, default=str))
