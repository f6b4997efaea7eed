"""Every entry point, driven with a bad input of its kind, ends with one line naming the culprit (file, flag,
phase) and saying what to do: non-zero exit, no traceback, and (these all fail before Ray starts) fast."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain_files import byte_tokenizer, make_pretrain_dir

REPO = Path(__file__).resolve().parents[1]


def run(args, base_dir, mirror, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "NANOCHAT_"))}
    env.update(NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_MIRROR=str(mirror))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def one_line(result):
    """The message, after checking that it is the one thing the run printed to stderr."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A base dir with a tokenizer, one without, a mirror whose training shard is corrupt, an empty mirror."""
    root = tmp_path_factory.mktemp("entry")
    with_tokenizer = root / "with_tokenizer"
    byte_tokenizer(with_tokenizer / "tokenizer")
    corrupt = root / "corrupt_mirror"
    make_pretrain_dir(corrupt, num_files=2)
    (corrupt / "pretrain" / "shard_00000.parquet").write_bytes(b"PAR1 not really")
    empty = root / "empty_mirror"
    (empty / "pretrain").mkdir(parents=True)
    return {"with_tokenizer": with_tokenizer, "bare": root / "bare", "corrupt": corrupt, "empty": empty}


def test_missing_tokenizer(places, mirror_dir):
    message = one_line(run(["ray_jobs/base_train.py", "--preset", "tiny"], places["bare"], mirror_dir))
    assert message.startswith("base_train: tokenizer directory") and "tok_train.py" in message
    message = one_line(run(["ray_jobs/tok_eval.py"], places["bare"], mirror_dir))
    assert message.startswith("tok_eval: tokenizer directory") and "does not exist" in message


def test_corrupt_shard_and_missing_shards(places, mirror_dir):
    message = one_line(run(["ray_jobs/base_train.py", "--preset", "tiny"], places["with_tokenizer"], places["corrupt"]))
    assert message.startswith("base_train: ") and "shard_00000.parquet: not a readable parquet file" in message
    message = one_line(run(["ray_jobs/tok_train.py", "--max-chars", "1000"], places["bare"], places["empty"]))
    assert message.startswith("tok_train: no training shards") and "NANOCHAT_MIRROR" in message
    message = one_line(run(["ray_jobs/base_train.py", "--preset", "tiny"], places["with_tokenizer"], places["bare"] / "nowhere"))
    assert "NANOCHAT_MIRROR=" in message and "is not a directory" in message


def test_impossible_batch_arithmetic(places, mirror_dir):
    message = one_line(run(["ray_jobs/base_train.py", "--preset", "tiny", "--total-batch-size", "1000"], places["with_tokenizer"], mirror_dir))
    # no device batch splits 1000 tokens into rows of 256 on 2 workers: the message says so, not "try another batch"
    assert message == "base_train: --total-batch-size 1000 is not a multiple of T x workers = 256 x 2 for any device batch: make it one"


def test_missing_checkpoint(places, mirror_dir):
    message = one_line(run(["ray_jobs/chat_sft.py", "--preset", "tiny"], places["with_tokenizer"], mirror_dir))
    assert message.startswith("chat_sft: no complete checkpoint for phase mid or base") and "run the previous phase first" in message
    # the Serve app and the chat CLI: before any replica deploys (before Ray starts) / before loading
    message = one_line(run(["-m", "serve_app", "--checkpoint", "sft/nope"], places["with_tokenizer"], mirror_dir))
    assert message.startswith("serve_app: no complete checkpoint at ") and "sft/nope" in message
    message = one_line(run(["-m", "serve_app"], places["with_tokenizer"], mirror_dir))
    assert message.startswith("serve_app: no chat checkpoint (sft, mid or rl)"), message
    message = one_line(run(["-m", "serve_app", "--replicas", "two"], places["with_tokenizer"], mirror_dir))
    assert message.startswith("python -m serve_app: error: argument --replicas: invalid int value"), message


def test_resume_onto_a_checkpoint_of_another_tokenizer(places, mirror_dir, tmp_path):
    import torch  # noqa: F401
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.gpt import GPTConfig, create_model
    base = tmp_path / "base"
    byte_tokenizer(base / "tokenizer")
    config = GPTConfig.from_depth(4, 265, 256, head_dim=64)
    save_checkpoint(checkpoint_dir("base", "d4", base), 10, create_model(config, "cpu"), tokenizer_fingerprint="tok-sha256:other")
    message = one_line(run(["ray_jobs/base_train.py", "--preset", "tiny", "--resume"], base, mirror_dir))
    assert message.startswith("base_train: checkpoint ") and "tok-sha256:other" in message


def test_unknown_preset(places, mirror_dir):
    message = one_line(run(["ray_jobs/speedrun.py", "--preset", "d99"], places["bare"], mirror_dir))
    assert message.startswith("speedrun.py: error: argument --preset: invalid choice: 'd99'")
