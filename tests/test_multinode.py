"""Several Ray nodes on one machine: one ray.cluster_utils.Cluster for the module, its head holding no CPU
(so every task, actor and Train worker runs on another node); worker nodes added, killed, and passed on
from one test to the next (a node starts in seconds, but the suite is long). The
project's own scripts are the drivers, in their own processes (RAY_ADDRESS, attached to the head): this
process keeps the session's local Ray for the other modules. Killing a node SIGKILLs every one of its
processes at once (raylet, agents, workers, actors): a machine lost, not a process.

Placement is steered by logical CPUs (the machine has 2 real cores): a Train worker or replica of more than
1 CPU fits only a 2-CPU node and leaves no room there for the 0.5-CPU tokenizer and rollout actors, which
then fit only a 1-CPU node."""
import json
import os
import shutil
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
        """New worker nodes, one per logical CPU count given."""
        added = [self.cluster.add_node(num_cpus=n) for n in cpus]
        return added if len(added) > 1 else added[0]

    def use(self, *cpus):
        """Exactly these worker nodes (logical CPU counts) for a test: the idle ones an earlier test left (its
        drivers gone), new ones for the rest; any other is removed."""
        idle, picked = list(self.cluster.worker_nodes), []
        for n in cpus:
            node = next((x for x in idle if x._ray_params.num_cpus == n), None)
            picked.append(idle.pop(idle.index(node)) if node else None)
        self.remove(idle)
        picked = [node or self.add(n) for node, n in zip(picked, cpus)]
        return picked if len(picked) > 1 else picked[0]

    def kill(self, node):
        """Every process of the node at once: its raylet and all it started (agents, workers, actors)."""
        kill_tree(node.all_processes["raylet"][0].process.pid)
        self.cluster.remove_node(node, allow_graceful=False)  # reaps what this process started

    def remove(self, nodes):
        """Stop these nodes gracefully (the GCS learns at once, not after its health checks) and wait until it has."""
        gone = {node.node_id for node in nodes}
        for node in nodes:
            self.cluster.remove_node(node)
        wait_for(lambda: not any(n["Alive"] and n["NodeID"] in gone for n in self.cluster.global_state.node_table()), 60,
                 "the removed nodes to leave the cluster")

    def blind_node_id(self):
        return next((n["NodeID"] for n in self.cluster.global_state.node_table() if n["Alive"] and n["Resources"].get("blind")), None)

    def actors(self, class_part, alive=True):
        """{actor id: node id} of the actors whose class name contains class_part (alive only, or all ever)."""
        table = self.cluster.global_state.actor_table(None)
        return {a: info["Address"]["NodeID"] for a, info in table.items()
                if class_part in info["ActorClassName"] and (info["State"] == "ALIVE" or not alive)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray._private.utils import read_ray_address, write_ray_address
    from ray.cluster_utils import Cluster
    from ray.experimental import internal_kv
    previous = read_ray_address()  # Cluster records its address as the machine's current cluster: restored below
    # and its head points this process's internal-KV client at its own GCS: the session's Ray (Ray Data's
    # usage records, in later modules) would then talk to a GCS removed below and wait on it forever
    session_kv = internal_kv.internal_kv_get_gcs_client()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = Nodes(cluster)
    # a node that does not see one directory (test_a_run_refuses_storage_a_node_cannot_see); no CPU, so nothing
    # else is placed on it but 0-CPU tasks and actors
    nodes.blind_dir = tmp_path_factory.mktemp("not_on_every_node")
    nodes.blind = start_blind_node(cluster.address, nodes.blind_dir)
    try:
        wait_for(nodes.blind_node_id, 120, "the node in its own mount namespace")
        yield nodes
    finally:
        kill_tree(nodes.blind.pid)
        nodes.blind.wait()
        # not cluster.shutdown(): that also resets this process's GCS client, which the session's Ray uses
        for node in [*cluster.worker_nodes, cluster.head_node]:
            cluster.remove_node(node, allow_graceful=False)
        if previous:
            write_ray_address(previous)
        if session_kv is not None:
            internal_kv._initialize_internal_kv(session_kv)


def start_blind_node(address, directory):
    """A node whose processes see an empty file system at `directory`: `ray start` in its own mount namespace
    with a tmpfs mounted there, as a machine where the shared file system was not mounted sees a local dir."""
    command = f"mount -t tmpfs nanochat-not-shared {directory} && exec {RAY} start --address={address} --num-cpus=0 --include-log-monitor=False " \
              f"""--resources='{{"blind": 1}}' --block"""
    # a mount namespace needs CAP_SYS_ADMIN: as root one is, elsewhere a user namespace gives it
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return subprocess.Popen(["unshare", *userns, "--mount", "--propagation", "private", "sh", "-c", command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def nodes(cluster, request):
    """The module's cluster for one test. A test that failed may leave work behind: then its nodes go."""
    failed = request.session.testsfailed
    yield cluster
    if request.session.testsfailed > failed:
        cluster.remove(list(cluster.cluster.worker_nodes))


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
            if os.environ.get("MN_DEBUG_LOG"):
                Path(os.environ["MN_DEBUG_LOG"] + f"{self.process.pid}.log").write_text("".join(self.lines))
        except subprocess.TimeoutExpired:
            kill_tree(self.process.pid)
            raise AssertionError(f"the driver did not finish in {timeout} s:\n{self.tail()}")
        self.reader.join(timeout=10)
        return code

    def summary(self):
        return json.loads(next(line for line in reversed(self.lines) if line.startswith('{"status"')))


class Clock:
    """Prints what happened when (seconds since the test began): where a slow run spent its time."""

    def __init__(self):
        self.t0 = time.monotonic()

    def __call__(self, what):
        print(f"  {time.monotonic() - self.t0:6.1f} s  {what}", flush=True)


def wait_for(condition, timeout, what, driver=None):
    deadline = time.monotonic() + timeout
    while not condition():
        if driver is not None and not driver.alive():
            raise AssertionError(f"the driver exited while waiting for {what}:\n{driver.tail()}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s" + (f":\n{driver.tail()}" if driver else "")
        time.sleep(0.2)


def report_section(name):
    return json.loads((get_base_dir() / "report" / f"{name}.json").read_text())


# ---- elastic ranges: the flag, the plan, the trainer (no cluster) ----------------------------------------------

def test_num_workers_takes_a_count_or_a_range():
    from ray_jobs import base_train
    from ray_jobs.training import worker_range
    for flag, parsed in (("4", (4, 4)), ("2-8", (2, 8)), ("3-3", (3, 3))):
        assert worker_range(base_train.parser.parse_args(["--num-workers", flag])) == parsed
    assert base_train.parser.parse_args(["--num-workers", "4"]).min_workers is None  # a count: not elastic
    for bad in ("8-2", "0-4", "many", "2-"):
        with pytest.raises(SystemExit):
            base_train.parser.parse_args(["--num-workers", bad])


def test_plan_refuses_a_range_the_global_batch_does_not_divide_over():
    """--total-batch-size 1024 at T=128: 1024 / 128 = 8 rows per step, so device batch 4 splits over 1 or 2
    workers, not 3 (no batch does), and device batch 8 not over 2: refused before Ray Train starts."""
    from nanochat.gpt import GPTConfig
    from ray_jobs import base_train, chat_sft
    from ray_jobs.plan import PlanError, plan_phase
    config = GPTConfig(sequence_len=128, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)

    def plan(module, name, *flags):
        return plan_phase(name, module.parser.parse_args(["--device", "cpu", *flags]), config)
    flags = ["--total-batch-size", "1024", "--device-batch-size", "4"]
    assert plan(base_train, "base_train", *flags, "--num-workers", "1-2")["device_batch_size"] == 4
    with pytest.raises(PlanError, match=r"^base_train: --total-batch-size 1024 is not a multiple of T x workers = 128 x 3 for "
                                        r"any device batch: make it one \(every worker count of --num-workers 1-3\)$"):
        plan(base_train, "base_train", *flags, "--num-workers", "1-3")
    with pytest.raises(PlanError, match=r"8 x 128 x 3; device batches that divide it: 4, 2, 1$"):  # a count: as before
        plan(base_train, "base_train", "--total-batch-size", "1536", "--device-batch-size", "8", "--num-workers", "3")
    with pytest.raises(PlanError, match=r"8 x 128 x 2 \(every worker count of --num-workers 1-2\); device batches that "
                                        r"divide it: 4, 2, 1"):
        plan(base_train, "base_train", "--total-batch-size", "1024", "--device-batch-size", "8", "--num-workers", "1-2")
    # SFT counts examples: 12 per step split in 2 over 2 or 3 workers, not over 4
    assert plan(chat_sft, "chat_sft", "--examples-per-step", "12", "--device-batch-size", "2", "--num-workers", "2-3")
    with pytest.raises(PlanError, match=r"--examples-per-step 12 must be a multiple of device batch x workers = 2 x 4 "
                                        r"\(every worker count of --num-workers 2-4\); device batches that divide it: 1$"):
        plan(chat_sft, "chat_sft", "--examples-per-step", "12", "--device-batch-size", "2", "--num-workers", "2-4")


def test_an_elastic_range_makes_an_elastic_trainer(tmp_path):
    from ray_jobs import base_train
    from ray_jobs.training import build_trainer

    def scaling(*flags):
        args = base_train.parser.parse_args(["--device", "cpu", "--cpus-per-worker", "1", *flags])
        return build_trainer(base_train.train_loop, dict(vars(args), tag="t", storage=str(tmp_path)), "base").scaling_config
    elastic = scaling("--num-workers", "2-4", "--resize-check-s", "3")
    assert elastic.num_workers == (2, 4) and elastic.elasticity_enabled and elastic.elastic_resize_monitor_interval_s == 3
    fixed = scaling("--num-workers", "4")
    assert fixed.num_workers == 4 and not fixed.elasticity_enabled


# ---- base_train across nodes: elastic growth, then a node lost ---------------------------------------------

# 1.6 CPUs a worker: one torch thread each, and the 0.4 left on a 2-CPU node holds no 0.5-CPU tokenizer actor
BASE_FLAGS = ["--depth", "2", "--head-dim", "32", "--max-seq-len", "128", "--device-batch-size", "4",
              "--total-batch-size", "1024", "--device", "cpu", "--cpus-per-worker", "1.6", "--data-actor-cpus", "0.5",
              "--eval-every", "-1", "--sample-every", "-1", "--log-every", "1", "--max-failures", "3"]


def checkpoint_world(ckpt):
    """(step, workers that wrote it) of the last complete checkpoint, or (None, None)."""
    step = find_last_step(ckpt)
    return (step, load_meta(ckpt, step)["world_size"]) if step is not None else (None, None)


def test_base_train_grows_onto_a_new_node_then_survives_losing_one(nodes, small_tokenizer):
    """Elastic (1-2 workers) with room for one; a node added mid-run (Ray Train's view of the cluster refreshes
    every 20 s, which the step count covers): the run continues on 2 workers from its last checkpoint, same
    global batch (gradient accumulation 2 -> 1), its loss curve continuing. Then one of the two worker nodes is
    lost: the run finishes from its last complete checkpoint on a node added back."""
    clock = Clock()
    small_tokenizer[0].save(get_tokenizer_dir())
    data_node, first = nodes.use(1, 2)
    clock("data node and first worker node up")
    steps, save_every, batch = 100, 5, 1024
    driver = Driver(nodes, "ray_jobs/base_train.py", *BASE_FLAGS, "--num-workers", "1-2", "--resize-check-s", "2",
                    "--num-iterations", str(steps), "--save-every", str(save_every), "--tag", "mn")
    ckpt = checkpoint_dir("base", "mn")
    wait_for(lambda: checkpoint_world(ckpt)[1] == 1, 300, "checkpoint by 1 worker", driver)
    clock(f"step {find_last_step(ckpt)} checkpointed by 1 worker")
    second = nodes.add(2)
    clock("second worker node up")
    wait_for(lambda: checkpoint_world(ckpt)[1] == 2, 180, "checkpoint by 2 workers after a node was added", driver)
    clock(f"step {find_last_step(ckpt)} checkpointed by 2 workers")
    workers = nodes.actors("RayTrainWorker")
    assert sorted(workers.values()) == sorted([first.node_id, second.node_id]), workers  # a worker on each worker node
    readers = nodes.actors("TokenizeAndPack", alive=False)  # every tokenizer actor so far (a pipeline ends with its pieces)
    assert readers and set(readers.values()) == {data_node.node_id}, readers  # all on the third node

    last_before = find_last_step(ckpt)
    nodes.kill(second)
    clock(f"second worker node killed after step {last_before}'s checkpoint")
    nodes.add(2)  # a node added back
    clock("a node added back")
    assert driver.finish(timeout=600) == 0, driver.tail()
    summary = driver.summary()
    clock(f"finished; started at steps {summary['starts']} on {summary['start_workers']} workers")
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


# ---- Serve: a replica's node lost under load -----------------------------------------------------------------

SERVE_DRIVER = """
import json, sys
from ray import serve
from ray_jobs.common import init_ray
from serve_app.app import build_app
init_ray()
settings, port = json.loads(sys.argv[1]), int(sys.argv[2])
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})  # one machine: one port
serve.run(build_app(settings), name="nanochat")
print("serving", flush=True)
sys.stdin.readline()  # until the test is done
serve.shutdown()
"""


class Requests:
    """Clients sending short chat requests back to back, each recording (time it ended, answered or not)."""

    def __init__(self, url, clients=4):
        self.url, self.stop, self.results = url, threading.Event(), []
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def client(self, i):
        body = {"messages": [{"role": "user", "content": f"Client {i}: hello"}], "max_tokens": 8, "temperature": 0}
        while not self.stop.is_set():
            try:
                r = requests.post(f"{self.url}/v1/chat/completions", json=body, timeout=60)
                ok = r.status_code == 200 and bool(r.json()["choices"][0]["message"]["content"])
            except (requests.RequestException, ValueError, KeyError):
                ok = False
            self.results.append((time.monotonic(), ok))

    def failures(self):
        return [t for t, ok in self.results if not ok]

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()


def test_serve_keeps_answering_when_a_replica_node_is_lost(nodes, small_tokenizer):
    """Two engine replicas (2 CPUs each) on two worker nodes, the HTTP proxy on the head; one replica's node
    SIGKILLed under a steady stream of requests: failures only within a window after the kill (at most 30 s,
    measured), none after it."""
    from serve_app.random_model import save_random_checkpoint
    from test_serve import free_port, tiny_config
    tok, tok_dir = small_tokenizer
    base = get_base_dir()
    shutil.copytree(tok_dir, base / "tokenizer")
    save_random_checkpoint(checkpoint_dir("sft", "v1", base), tok, tiny_config(tok))
    clock = Clock()
    first, second = nodes.use(2, 2)
    clock("two worker nodes up")
    settings = {"checkpoint": "sft/v1", "base_dir": str(base), "replicas": 2, "cpus_per_replica": 2, "max_batch": 8,
                "timeout_s": 60, "ui": False}
    port = free_port()
    driver = Driver(nodes, "-c", SERVE_DRIVER, json.dumps(settings), str(port))
    wait_for(lambda: any(line.startswith("serving") for line in driver.lines), 300, "Serve app", driver)
    clock("serving")
    replicas = nodes.actors("NanochatEngine")
    assert sorted(replicas.values()) == sorted([first.node_id, second.node_id]), replicas
    load = Requests(f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: len(load.results) >= 20, 60, "20 answers before the kill")
        assert load.failures() == []
        clock(f"{len(load.results)} answers")
        nodes.kill(second)
        killed = time.monotonic()
        clock("a replica's node killed")
        def quiet():  # 12 s after the kill, 10 s and 10 answers after the last failure
            last = max(load.failures(), default=killed)
            return time.monotonic() > max(killed + 12, last + 10) and sum(t > last for t, _ in load.results) >= 10
        wait_for(quiet, 120, "10 s of answers after the last failure")
    finally:
        load.close()
        driver.process.stdin.write("done\n")
        driver.process.stdin.flush()
    failures = load.failures()
    window = max(failures, default=killed) - killed
    after = [ok for t, ok in load.results if t > killed + window]
    print(f"serve: {len(failures)} failed requests, all within {window:.1f} s of the kill; {len(after)} answered after")
    assert window <= 30, window
    assert len(after) >= 10 and all(after)
    assert driver.finish(timeout=120) == 0, driver.tail()


# ---- RL: the rollout actors' node lost ---------------------------------------------------------------------

def test_rl_replaces_rollout_actors_lost_with_their_node(nodes, small_tokenizer):
    """The trainer (2 CPUs) on one node, both rollout actors (0.5 CPU) on another, which dies: the actors are
    replaced on a node added back, get the current weights, and the steps complete."""
    from tiny_checkpoint import make_tiny_checkpoint
    tok = small_tokenizer[0]
    tok.save(get_tokenizer_dir())
    make_tiny_checkpoint(get_base_dir() / "checkpoints", "sft", tok)
    clock = Clock()
    _, actor_node = nodes.use(2, 1)
    clock("trainer and actor nodes up")
    driver = Driver(nodes, "ray_jobs/chat_rl.py", "--task", "simple-arith", "--num-workers", "1", "--cpus-per-worker", "2",
                    "--device", "cpu", "--rollout-actors", "2", "--actor-cpus", "0.5", "--num-steps", "2",
                    "--examples-per-step", "4", "--num-samples", "4", "--max-new-tokens", "16", "--device-batch-size", "16",
                    "--eval-every", "-1", "--max-failures", "1")
    wait_for(lambda: len(nodes.actors("RolloutActor")) == 2, 300, "2 rollout actors", driver)
    clock("2 rollout actors")
    assert set(nodes.actors("RolloutActor").values()) == {actor_node.node_id}
    nodes.kill(actor_node)
    clock("their node killed")
    replacement = nodes.add(1)
    clock("a node added back")
    assert driver.finish(timeout=300) == 0, driver.tail()
    clock("finished")
    summary = driver.summary()
    assert summary["status"] == "finished" and summary["step"] == 2, summary
    assert summary["actors_replaced"] == 2, summary
    assert summary["starts"] == [0], summary  # the trainer never restarted: only the actors were replaced
    ran_on = list(nodes.actors("RolloutActor", alive=False).values())
    assert ran_on.count(actor_node.node_id) == 2 and ran_on.count(replacement.node_id) == 2, ran_on


# ---- shared storage ------------------------------------------------------------------------------------------

def test_a_run_refuses_storage_a_node_cannot_see(nodes, small_tokenizer):
    """The blind node sees an empty tmpfs where the others see the storage: the run stops before training with
    one line naming the directory and the node."""
    small_tokenizer[0].save(get_tokenizer_dir())
    driver = Driver(nodes, "ray_jobs/base_train.py", *BASE_FLAGS, "--num-workers", "2", "--num-iterations", "2",
                    "--storage", str(nodes.blind_dir))
    assert driver.finish(timeout=120) == 1
    message = next((line for line in driver.lines if line.startswith("base_train: ")), driver.tail())  # Ray's logs around it
    assert message.startswith(f"base_train: {nodes.blind_dir} is not visible from 1 of the cluster's "), message
    assert f"(node {nodes.blind_node_id()[:8]})" in message
    assert list(nodes.blind_dir.iterdir()) == []  # the marker is gone, and no training run started
