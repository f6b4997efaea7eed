"""Several Ray nodes on one machine: one ray.cluster_utils.Cluster for the module, its head holding no CPU
(so every task, actor and Train worker runs on another node), nodes added and killed by the tests. The
project's own scripts are the drivers, in their own processes (RAY_ADDRESS, attached to the head): this
process keeps the session's local Ray for the other modules. Killing a node SIGKILLs every one of its
processes at once (raylet, agents, workers, actors): a machine lost, not a process.

Placement is steered by logical CPUs (the machine has 2 real cores): a 2-CPU Train worker or replica fits
only a 2-CPU node; the 0.5-CPU tokenizer and rollout actors then fit only a 1-CPU node."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from nanochat.checkpoint import checkpoint_dir, find_last_step, load_meta
from nanochat.common import get_base_dir
from nanochat.tokenizer import get_tokenizer_dir

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def process_tree(pid):
    """pid and every process descended from it."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(pid):
    """SIGKILL a process and all its descendants at once (listed first: orphans would be re-parented)."""
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Nodes:
    """The module's cluster: add nodes with logical CPUs, kill them, see which node each actor is on."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.address = cluster.address

    def add(self, *cpus):
        """One node per CPU count given, started together."""
        added = [self.cluster.add_node(num_cpus=n, wait=False) for n in cpus]
        for node in added:
            self.cluster._wait_for_node(node)
        return added if len(added) > 1 else added[0]

    def kill(self, node):
        """Every process of the node at once: its raylet and all it started (agents, workers, actors)."""
        kill_tree(node.all_processes["raylet"][0].process.pid)
        self.cluster.remove_node(node, allow_graceful=False)  # reaps what this process started

    def remove_all(self):
        for node in list(self.cluster.worker_nodes):
            self.kill(node)

    def actors(self, class_part, alive=True):
        """{actor id: node id} of the actors whose class name contains class_part (alive only, or all ever)."""
        table = self.cluster.global_state.actor_table(None)
        return {a: info["Address"]["NodeID"] for a, info in table.items()
                if class_part in info["ActorClassName"] and (info["State"] == "ALIVE" or not alive)}


@pytest.fixture(scope="module")
def nodes():
    from ray._private.utils import read_ray_address, write_ray_address
    from ray.cluster_utils import Cluster
    previous = read_ray_address()  # Cluster records its address as the machine's current cluster: restored below
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield Nodes(cluster)
    # not cluster.shutdown(): that also resets this process's GCS client, which the session's Ray uses
    for node in [*cluster.worker_nodes, cluster.head_node]:
        cluster.remove_node(node, allow_graceful=False)
    if previous:
        write_ray_address(previous)


class Driver:
    """A script run as its own driver process on the cluster (attached to the head); its output kept."""

    def __init__(self, nodes, *argv):
        env = {**os.environ, "RAY_ADDRESS": nodes.address}
        self.process = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def alive(self):
        return self.process.poll() is None

    def tail(self, n=60):
        return "".join(line for line in self.lines[-n:] if "Did not detect any changes" not in line)

    def finish(self, timeout):
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.process.pid)
            raise AssertionError(f"the driver did not finish in {timeout} s:\n{self.tail()}")
        self.reader.join(timeout=10)
        return code

    def summary(self):
        return json.loads(next(line for line in reversed(self.lines) if line.startswith('{"status"')))


def wait_for(condition, timeout, what, driver=None):
    deadline = time.monotonic() + timeout
    while not condition():
        if driver is not None and not driver.alive():
            raise AssertionError(f"the driver exited while waiting for {what}:\n{driver.tail()}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s" + (f":\n{driver.tail()}" if driver else "")
        time.sleep(0.2)


def report_section(name):
    return json.loads((get_base_dir() / "report" / f"{name}.json").read_text())


# ---- base_train across nodes: elastic growth, then a node lost ---------------------------------------------

BASE_FLAGS = ["--depth", "2", "--head-dim", "32", "--max-seq-len", "128", "--device-batch-size", "4",
              "--total-batch-size", "1024", "--device", "cpu", "--cpus-per-worker", "2", "--data-actor-cpus", "0.5",
              "--eval-every", "-1", "--sample-every", "-1", "--log-every", "1", "--max-failures", "3"]


def checkpoint_world(ckpt):
    """(step, workers that wrote it) of the last complete checkpoint, or (None, None)."""
    step = find_last_step(ckpt)
    return (step, load_meta(ckpt, step)["world_size"]) if step is not None else (None, None)


def test_base_train_grows_onto_a_new_node_then_survives_losing_one(nodes, small_tokenizer):
    """Elastic (1-2 workers) with room for one; a node added mid-run: the run continues on 2 workers from its
    last checkpoint, same global batch (gradient accumulation 2 -> 1), its loss curve continuing. Then one of
    the two worker nodes is lost: the run finishes from its last complete checkpoint on a node added back."""
    small_tokenizer[0].save(get_tokenizer_dir())
    data_node, first = nodes.add(1, 2)
    steps, save_every, batch = 150, 5, 1024
    driver = Driver(nodes, "ray_jobs/base_train.py", *BASE_FLAGS, "--num-workers", "1-2", "--resize-check-s", "2",
                    "--num-iterations", str(steps), "--save-every", str(save_every), "--tag", "mn")
    ckpt = checkpoint_dir("base", "mn")
    wait_for(lambda: checkpoint_world(ckpt)[1] == 1, 300, "checkpoint by 1 worker", driver)
    second = nodes.add(2)
    wait_for(lambda: checkpoint_world(ckpt)[1] == 2, 180, "checkpoint by 2 workers after a node was added", driver)
    workers = nodes.actors("RayTrainWorker")
    assert sorted(workers.values()) == sorted([first.node_id, second.node_id]), workers  # a worker on each worker node
    readers = nodes.actors("TokenizeAndPack", alive=False)  # every tokenizer actor so far (a pipeline ends with its pieces)
    assert readers and set(readers.values()) == {data_node.node_id}, readers  # all on the third node

    last_before = find_last_step(ckpt)
    nodes.kill(second)
    nodes.add(2)  # a node added back
    assert driver.finish(timeout=600) == 0, driver.tail()
    summary = driver.summary()
    assert summary["status"] == "finished" and summary["step"] == steps, summary
    starts, workers_at = summary["starts"], summary["start_workers"]
    assert workers_at == [1, 2, 2], summary  # started on 1, grew to 2, lost a node, back on 2
    assert starts[0] == 0 and 0 < starts[1] < starts[2] and all(s % save_every == 0 for s in starts), starts
    # the node was lost after step `last_before`'s checkpoint: the run went on from it (or from the next one,
    # had it completed in the instant before the kill): at most one checkpoint interval redone
    assert last_before <= starts[2] <= last_before + save_every, (last_before, starts)
    # every step trained on the same global batch, whether 1 worker x 2 micro-steps or 2 workers x 1
    assert summary["tokens_trained"] == steps * batch, summary

    section = report_section("base_train")
    assert section["settings"]["num_workers"] == "1-2"
    assert section["results"]["restarts"] == f"step {starts[1]} on 2 workers; step {starts[2]} on 2 workers"
    loss = section["curves"]["loss"]
    assert loss["x"] == list(range(1, steps + 1)), loss["x"]  # each step once: resumed, never started over
    y = loss["y"]
    for s in starts[1:]:  # continuing where it stopped: no jump back toward the untrained loss (ln 1024 = 6.9)
        assert max(y[s:s + save_every]) < y[s - 1] + 0.1, (s, y[s - 5:s + 5])
    assert y[-1] < y[0] - 1.0, (y[0], y[-1])
    nodes.remove_all()
