"""End to end, the README's way: a local head started with the lines of the README's "On a cluster" section
(from the activated environment, RAY_JOB_STOP_WAIT_TIME_S raised), the README's `ray job submit --working-dir .
-- python ray_jobs/speedrun.py` command. Stopped with `ray job stop` while pretraining writes checkpoints slower
than Ray's default stop window; submitted again, it resumes pretraining from the checkpoint written at the
stop; its driver killed (SIGKILL) after a phase has finished, submitted again: the last run skips the
finished phases and leaves every checkpoint and a complete report.md."""
import json
import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
VENV_BIN = str(Path(sys.executable).parent)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# another Ray on this machine (the test session's own) holds the default ports: pick free ones
DASHBOARD_PORT = free_port()
SLOW_CHECKPOINT_S = 6  # twice Ray's default stop window: a stop checkpoint only survives a raised one


def _ray(*args, env, timeout=120):
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


def readme_local_cluster():
    """The commands of the README's local-cluster block (activate, start the head, submit), comments dropped."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## On a cluster"):]
    block = next(b for b in section.split("```bash")[1:] if "ray start --head" in b).split("```")[0]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def stop_wait_s(start_line):
    """The stop window the README's head line sets (RAY_JOB_STOP_WAIT_TIME_S=...)."""
    return int(start_line.split("RAY_JOB_STOP_WAIT_TIME_S=")[1].split()[0])


@pytest.fixture
def head_node(tmp_path, mirror_dir):
    """The README's head, as a new shell would start it: the project's environment not yet on PATH, then
    activated by the README's line. Its environment (base dir, mirror) is every job's. Yields (env for the
    `ray` CLI, the README's submit line, the stop window)."""
    activate, start, submit_line, _ = readme_local_cluster()
    env = {**os.environ, "NANOCHAT_MIRROR": str(mirror_dir), "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
           "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != VENV_BIN)}
    for var in ("RAY_ADDRESS", "VIRTUAL_ENV"):
        env.pop(var, None)
    # its own session dir (never confused with the test session's Ray), short: unix socket paths are <= 107 bytes;
    # and free ports: other Rays on this machine hold the default ones
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    ports = [f"--{name}={free_port()}" for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port")]
    command = f"{activate} && {start} --dashboard-port={DASHBOARD_PORT} {' '.join(ports)} --temp-dir={temp_dir} --disable-usage-stats"
    started = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    yield {**env, "RAY_ADDRESS": f"http://127.0.0.1:{DASHBOARD_PORT}"}, f"{activate} && {submit_line}", stop_wait_s(start)
    # `ray stop` would also stop the test session's own Ray: kill only this head's processes (their
    # command lines name its temp dir); its workers exit with their raylet
    for pid in pids_matching(str(temp_dir).encode()):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head_node, wait=True, submission_id=None, extra_env=None):
    """The README's submit command, as written, in a shell in the checkout (RAY_ADDRESS points the CLI at this
    head's dashboard, the README's default port being taken here); added only: `--no-wait` for a run to be
    stopped or killed, its submission id, and an environment variable for the slow-storage fault injection."""
    env, command, _ = head_node
    options = (["--no-wait"] if not wait else []) + (["--submission-id", submission_id] if submission_id else [])
    if extra_env:
        options += ["--runtime-env-json", shlex.quote(json.dumps({"env_vars": extra_env}))]
    command = command.replace("ray job submit", " ".join(["ray job submit", *options]))
    deadline = time.time() + 180
    while True:  # right after `ray start` the job agent may not be up yet
        result = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if "No available agent to submit job" not in result.stderr or time.time() > deadline:
            return result
        time.sleep(3)


def pids_matching(needle: bytes, unless: bytes = b"\x00\x00"):
    pids = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if needle in cmdline and unless not in cmdline and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids


def driver_pids(base_dir):
    """The speedrun drivers of this test's jobs only: their environment names this test's base dir."""
    mine = f"NANOCHAT_BASE_DIR={base_dir}".encode()
    pids = []
    for pid in pids_matching(b"ray_jobs/speedrun.py", unless=b"job\x00submit"):
        try:
            if mine in Path(f"/proc/{pid}/environ").read_bytes().split(b"\x00"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def job_status(head_node, submission_id):
    out = _ray("job", "status", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", submission_id, env=head_node[0])
    return out.stdout + out.stderr


def test_speedrun_stops_resumes_and_survives_a_killed_driver(head_node, tmp_path):
    from nanochat.checkpoint import SLOW_WRITE_ENV, find_last_step, load_meta
    base_dir = tmp_path / "base"
    phases = base_dir / "runs" / "speedrun" / "phases"
    ckpt = base_dir / "checkpoints" / "base" / "d2"
    # 1) `ray job stop` during pretraining, whose checkpoints take longer than Ray's default stop window
    first = submit(head_node, wait=False, submission_id="speedrun-stop", extra_env={SLOW_WRITE_ENV: str(SLOW_CHECKPOINT_S)})
    assert first.returncode == 0, first.stdout + first.stderr
    deadline, polls = time.time() + 900, 0
    while not (ckpt / "step_000010").is_dir():  # the first periodic checkpoint is being written: stop now
        polls += 1
        assert time.time() < deadline, "base_train never checkpointed"
        if polls % 50 == 0:  # the CLI costs a second of CPU: ask it now and then
            assert "FAILED" not in job_status(head_node, "speedrun-stop"), job_status(head_node, "speedrun-stop")
        time.sleep(0.2)
    stopped = _ray("job", "stop", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", "speedrun-stop", env=head_node[0], timeout=head_node[2] + 60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    while "was stopped" not in job_status(head_node, "speedrun-stop"):  # Ray's words for STOPPED
        assert time.time() < deadline, job_status(head_node, "speedrun-stop")
        time.sleep(3)
    stop_step = find_last_step(ckpt)
    meta = load_meta(ckpt, stop_step)  # complete: every file there, whole
    assert 10 < stop_step < 20 and meta["step"] == stop_step, stop_step  # written at the stop, not a periodic one
    assert not (phases / "base_train.done").exists()
    logs = _ray("job", "logs", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", "speedrun-stop", env=head_node[0]).stdout
    assert "stopped at step" in logs and "run the same command again to resume" in logs, logs[-3000:]

    # 2) submitted again: pretraining resumes from the stop checkpoint; its driver is then killed between phases
    second = submit(head_node, wait=False)
    assert second.returncode == 0, second.stdout + second.stderr
    deadline = time.time() + 900
    while not (phases / "base_train.done").exists():
        assert time.time() < deadline, "base_train never finished"
        time.sleep(1)
    for pid in driver_pids(base_dir):
        os.kill(pid, signal.SIGKILL)  # the driver dies between phases, from outside
    done_before = sorted(p.stem for p in phases.glob("*.done"))
    assert "base_train" in done_before and "chat_eval_rl" not in done_before
    starts = json.loads((phases / "base_train.done").read_text())["results"]["starts"]
    assert starts == [0, stop_step], starts  # continued from the stop checkpoint, not from scratch

    # 3) submitted again: the finished phases are skipped, the rest completes
    third = submit(head_node)
    out = third.stdout + third.stderr
    assert third.returncode == 0, out[-5000:]
    for phase in done_before:
        assert f"phase {phase}: already complete, skipped" in out
    for phase in ("base", "mid", "sft", "rl"):
        assert list((base_dir / "checkpoints" / phase).glob("*/step_*/meta.json")), f"no {phase} checkpoint"
    report = (base_dir / "runs" / "speedrun" / "report" / "report.md").read_text()
    summary = report[report.index("## Summary"):report.index("##", report.index("## Summary") + 5)]
    assert "| CORE |" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "metric" not in line]
    filled = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in rows}
    assert filled["CORE"][0] != "-"
    for metric in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"):
        assert all(v != "-" for v in filled[metric][1:]), (metric, filled[metric])
    assert "![base_train loss](plots/base_train_loss.png)" in report


def test_a_phase_stopped_on_request_is_not_marked_done(tmp_path):
    """SIGTERM stops a Train phase with status "stopped" (tests/test_base_train.py): the speedrun must
    exit without its marker, so the next run resumes it instead of moving on from half a model."""
    import argparse
    from types import SimpleNamespace

    from nanochat.report import Report
    from ray_jobs.common import PhaseLog
    from ray_jobs.speedrun import run_script_phase
    calls = []
    parser = argparse.ArgumentParser()
    parser.add_argument("--resume", action="store_true")

    def main(args):
        calls.append(args.resume)
        return {"status": "stopped" if len(calls) == 1 else "finished", "step": 35}
    script = SimpleNamespace(parser=parser, main=main, report_section=lambda summary, args: {"results": summary})
    report = Report(tmp_path / "report")
    phases = PhaseLog(tmp_path / "phases", on_complete=report.log)
    with pytest.raises(SystemExit, match="base_train stopped at step 35 .* run the same command again to resume"):
        run_script_phase(phases, "base_train", script, [], resumable=True)
    assert phases.done("base_train") is None and not (tmp_path / "report" / "base_train.json").exists()
    assert run_script_phase(phases, "base_train", script, [], resumable=True)["results"]["status"] == "finished"
    assert phases.done("base_train") is not None and calls == [True, True]
    # the report section is written before the marker: a driver killed right after a phase's marker
    # appears (as the end-to-end test does) cannot lose the section
    assert (tmp_path / "report" / "base_train.json").stat().st_mtime_ns <= (tmp_path / "phases" / "base_train.done").stat().st_mtime_ns
