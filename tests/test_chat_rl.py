"""RL: rewards, advantages and the policy-gradient loss on hand-made samples (no Ray); the weight sync to
rollout actors; tiny RL runs on the session's Ray (2 gloo trainer workers at 1 CPU + 2 rollout actors at
0.5 CPU: 3 of its 4 logical CPUs), from a tiny model SFT'd for a few seconds on simple-arith problems."""
import os
import shutil
import signal
import threading
import time

import pytest
import torch

from nanochat.checkpoint import find_last_step, load_meta, save_checkpoint
from nanochat.common import get_base_dir
from nanochat.gpt import GPTConfig, create_model
from nanochat.tokenizer import get_tokenizer_dir
from conftest import assert_dashboard_finds, metric_values, wait_for_metrics
from ray_jobs import chat_rl
from tasks.common import assistant_text
from tasks.simple_arith import SimpleArith


class Bigram(torch.nn.Module):
    """Logits at position t depend on token t only: the gradient of a table row shows exactly which
    (input -> target) pairs the loss counts."""

    def __init__(self, vocab=64):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx, targets, loss_reduction="mean"):
        logits = self.table(idx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss


# ---- rewards, advantages, the loss --------------------------------------------------------------------

def test_simple_arith_is_gsm8k_shaped_and_rewarded():
    task = SimpleArith("train")
    conversation = task[3]
    parts = conversation["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]  # a calculator call, like GSM8K
    answer = assistant_text(conversation)
    assert "####" in answer
    assert task.reward(conversation, answer) == 1.0
    assert task.reward(conversation, answer.replace("####", "")) == 0.0  # no final answer line
    assert task.reward(conversation, "#### 1000") == 0.0
    assert task[3] == SimpleArith("train")[3] and task[3] != SimpleArith("test")[3]  # deterministic, splits differ


def test_group_advantages_and_pass_at_k():
    assert chat_rl.group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert chat_rl.group_advantages([1.0, 1.0]) == [0.0, 0.0]  # no signal when every sample is alike
    assert chat_rl.group_advantages([0.0, 0.0, 0.0, 1.0]) == [-0.25, -0.25, -0.25, 0.75]
    groups = [{"rewards": [0.0, 1.0]}, {"rewards": [0.0, 0.0]}, {"rewards": [1.0, 1.0]}, {"rewards": [0.0, 0.0]}]
    assert chat_rl.pass_at_k(groups) == 0.5


def test_pg_loss_counts_only_sampled_tokens_normalized_per_token():
    pad = 63
    # sample A: prompt 1 2 3, completion 10 11 12 13 where 11 12 were forced by the calculator (mask 0)
    # sample B: prompt 1 2, completion 20
    groups = [{"prompt": [1, 2, 3], "tokens": [[10, 11, 12, 13], [14]], "masks": [[1, 0, 0, 1], [1]], "rewards": [1.0, 0.0]},
              {"prompt": [1, 2], "tokens": [[20], [21]], "masks": [[1], [1]], "rewards": [0.0, 0.0]}]
    samples = chat_rl.rl_samples(groups)
    assert [s[3] for s in samples] == [0.5, -0.5, 0.0, 0.0]
    assert chat_rl.sampled_tokens(samples) == 2 + 1 + 1 + 1  # mask-1 tokens of every sample of the step
    inputs, targets, advantages = chat_rl.rl_batch([samples[0], samples[2]], pad)
    assert inputs.tolist() == [[1, 2, 3, 10, 11, 12], [1, 2, pad, pad, pad, pad]]
    # targets only where a sampled token is predicted: not the prompt, not the forced 11 12, not the padding
    assert targets.tolist() == [[-1, -1, 10, -1, -1, 13], [-1, 20, -1, -1, -1, -1]]
    assert advantages.tolist() == [0.5, 0.0]

    model = Bigram()
    inputs, targets, advantages = chat_rl.rl_batch(samples, pad)
    loss = chat_rl.pg_loss(model, inputs, targets, advantages, num_tokens=5)
    loss.backward()
    logp = torch.log_softmax(model.table.weight.detach(), dim=-1)
    # token-level normalization: the sum over all sampled tokens / their number, not a mean of per-sample means
    expected = (0.5 * -(logp[3, 10] + logp[12, 13]) - 0.5 * -logp[3, 14]) / 5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grad_rows = model.table.weight.grad.abs().sum(dim=1)
    assert grad_rows[3] > 0 and grad_rows[12] > 0  # they predict sampled tokens with nonzero advantage
    for row in (1, 10, 11):  # 1 -> 2 is prompt; 10 -> 11 and 11 -> 12 predict the forced tool output
        assert grad_rows[row] == 0
    # a better-than-average sample's tokens become more likely after a step against the loss
    with torch.no_grad():
        model.table.weight -= 1.0 * model.table.weight.grad
    assert torch.log_softmax(model.table.weight, -1)[3, 10] > logp[3, 10]


def test_state_checksum_sees_any_change():
    model = Bigram()
    before = chat_rl.state_checksum(model.state_dict())
    assert chat_rl.state_checksum(Bigram().state_dict()) == before
    with torch.no_grad():
        model.table.weight[5, 7] += 1e-6
    assert chat_rl.state_checksum(model.state_dict()) != before


def test_report_section_from_a_summary():
    args = chat_rl.parser.parse_args(["--preset", "tiny"])
    args = chat_rl.apply_preset(chat_rl.parser, args, chat_rl.TINY)
    summary = {"status": "finished", "step": 2, "results": {"SimpleArith pass@k": 0.5, "k": 4, "mean_reward_first": 0.1,
                                                            "mean_reward_last": 0.3},
               "curves": {"reward": {"x": [1, 2], "y": [0.1, 0.3]}, "pass@k": {"x": [0, 2], "y": [0.25, 0.5]}, "loss": {"x": [], "y": []}},
               "timing": {"generate_s": 3.0, "update_s": 1.0, "sync_s": 0.0, "generate_share": 0.75, "update_share": 0.25,
                          "sync_share": 0.0}, "samples_per_s": 20.0, "wall_seconds": 9.0, "checkpoint_dir": "x"}
    section = chat_rl.report_section(summary, args)
    assert section["settings"]["task"] == "simple-arith" and section["settings"]["rollout_actors"] == 2
    assert section["results"]["SimpleArith pass@k"] == 0.5 and section["results"]["generate_share"] == 0.75
    assert section["curves"]["reward"]["y"] == [0.1, 0.3] and section["curves"]["pass@k"]["ylabel"] == "pass@4"
    assert section["gpu_hours"] == 0


# ---- a tiny SFT'd model for the Ray tests ----------------------------------------------------------------

def tiny_config(tokenizer):
    return GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


@pytest.fixture(scope="module")
def tiny_sft(small_tokenizer, tmp_path_factory):
    """checkpoints/sft/tiny/step_000070: a 2-layer model fine-tuned (plain torch, one process) on 70 batches of
    simple-arith conversations: it has the format and answers about half of the problems right at
    temperature 1, which leaves RL room to improve."""
    tokenizer = small_tokenizer[0]
    torch.manual_seed(0)
    steps, threads = 70, torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core box, two threads wait on each other at every op
    try:
        model = chat_rl.supervised_warmup(create_model(tiny_config(tokenizer), "cpu"), tokenizer, SimpleArith("train"), steps)
    finally:
        torch.set_num_threads(threads)
    root = tmp_path_factory.mktemp("checkpoints")
    save_checkpoint(root / "sft" / "tiny", steps, model, meta={"phase": "sft"}, tokenizer_fingerprint=tokenizer.fingerprint())
    return root


@pytest.fixture
def rl_setup(tiny_sft, small_tokenizer):
    """The tokenizer and the SFT checkpoint where the phase scripts look (this test's base dir)."""
    small_tokenizer[0].save(get_tokenizer_dir())
    shutil.copytree(tiny_sft, get_base_dir() / "checkpoints", dirs_exist_ok=True)
    return small_tokenizer[0]


def rl_args(*extra):
    flags = ["--task", "simple-arith", "--num-workers", "2", "--device", "cpu", "--cpus-per-worker", "1",
             "--rollout-actors", "2", "--actor-cpus", "0.5", "--max-failures", "1", "--max-new-tokens", "40",
             "--examples-per-step", "8", "--num-samples", "8", "--device-batch-size", "32", "--top-k", "0",
             "--init-lr-frac", "0.2", "--embedding-lr", "0.01", "--warmdown-ratio", "0", "--eval-examples", "16",
             "--eval-samples", "4"]
    return chat_rl.parser.parse_args(flags + list(extra))


def test_bad_settings_stop_the_driver_before_ray_starts(rl_setup):
    with pytest.raises(ValueError, match="max-new-tokens"):
        chat_rl.main(rl_args("--max-new-tokens", "128"))  # the tiny model's whole context
    with pytest.raises(ValueError, match="examples-per-step"):
        chat_rl.main(rl_args("--examples-per-step", "1"))  # 2 workers


# ---- weight sync -----------------------------------------------------------------------------------------

def test_weight_sync_reaches_every_actor_and_stale_rollouts_are_refused(ray_cluster, small_tokenizer, tmp_path):
    tokenizer, tokenizer_dir = small_tokenizer
    torch.manual_seed(0)
    model = create_model(tiny_config(tokenizer), "cpu")
    tasks = ray_cluster.put({"train": SimpleArith("train", stop=8), "test": SimpleArith("test", stop=8)})
    pool = chat_rl.RolloutPool(2, model.config.to_dict(), str(tokenizer_dir), tasks, num_cpus=0.5, name=f"sync-test-{os.getpid()}")
    try:
        pool.sync(model, 0)
        first = chat_rl.state_checksum(model.state_dict())
        assert pool.checksums() == [(0, first), (0, first)]
        with torch.no_grad():  # an "update"
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        pool.sync(model, 1)
        second = chat_rl.state_checksum(model.state_dict())
        assert second != first
        assert pool.checksums() == [(1, second), (1, second)]  # every actor has the trainer's weights, version 1

        groups, _ = pool.rollout("train", [0, 1, 2], [7, 8, 9], num_samples=2, max_tokens=4, temperature=1.0, top_k=None)
        assert [g["index"] for g in groups] == [0, 1, 2] and all(len(g["rewards"]) == 2 for g in groups)
        assert all(len(t) <= 4 for g in groups for t in g["tokens"])
        # the trainer moved on to version 2 without telling the actors: their version-1 samples are refused,
        # the actors re-synced, and the rollout repeated with the current version
        pool.version = 2
        again, _ = pool.rollout("train", [0, 1, 2], [7, 8, 9], num_samples=2, max_tokens=4, temperature=1.0, top_k=None)
        assert pool.refused == 2
        assert [v for v, _ in pool.checksums()] == [2, 2]
        assert again == groups  # same weights and seeds: the same samples
    finally:
        pool.shutdown()


# ---- a tiny RL run on Ray ---------------------------------------------------------------------------------

class ActorKiller(threading.Thread):
    """SIGKILLs one rollout actor's process from outside (found by name; its pid from the actor) once the
    actors sample with weights of version >= `version`: the run must replace it and go on."""

    def __init__(self, ray, version):
        super().__init__(daemon=True)
        self.ray, self.version, self.killed = ray, version, None

    def run(self):
        deadline = time.time() + 600
        while time.time() < deadline:
            for entry in self.ray.util.list_named_actors(all_namespaces=True):
                if not entry["name"].startswith("rollout-"):
                    continue
                try:
                    actor = self.ray.get_actor(entry["name"], namespace=entry["namespace"])
                    info = self.ray.get(actor.info.remote(), timeout=60)
                except Exception:  # gone meanwhile (the run ended), or busy past the timeout: look again
                    continue
                if info["version"] is not None and info["version"] >= self.version:
                    os.kill(info["pid"], signal.SIGKILL)
                    self.killed = info
                    return
            time.sleep(0.5)


def test_tiny_rl_run_raises_the_reward_replaces_a_killed_actor_and_resumes(ray_cluster, rl_setup):
    # 32 training problems, 8 per step: every 4 steps the same problems come back, so the first and the
    # last 4 steps compare the same problems (sampling noise only, not the problems' difficulty)
    steps = 24
    killer = ActorKiller(ray_cluster, version=6)
    killer.start()
    summary = chat_rl.main(rl_args("--train-examples", "32", "--num-steps", str(steps), "--eval-every", "12", "--save-every", "12"))
    killer.join(timeout=5)
    assert summary["status"] == "finished" and summary["step"] == steps
    # the live metrics, scraped at once (a finished worker's series leave the endpoint ~15 s after it exits),
    # agree with the summary: the last reward, the last pass@k, the actor replaced
    tags = dict(phase="rl", run="tiny", rank=0)
    samples = wait_for_metrics(lambda s: s if steps in metric_values(s, "ray_nanochat_train_step", **tags) else None)
    assert metric_values(samples, "ray_nanochat_rl_mean_reward", **tags) == [pytest.approx(summary["curves"]["reward"]["y"][-1], abs=1e-5)]
    assert metric_values(samples, "ray_nanochat_rl_pass_at_k", **tags, k=4) == [pytest.approx(summary["results"]["SimpleArith pass@k"])]
    assert sum(metric_values(samples, "ray_nanochat_rl_actors_replaced_total", **tags)) == summary["actors_replaced"] == 1
    assert_dashboard_finds(samples, "nanochat_rl_")
    # the killed actor was replaced, loaded the current weights, and sampled its share of the batch again
    assert killer.killed is not None, "no rollout actor was killed"
    assert summary["actors_replaced"] == 1 and summary["rollouts_refused"] == 0

    rewards = summary["curves"]["reward"]["y"]
    assert len(rewards) == steps
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert 0 < first < 0.9, rewards  # the SFT model gets some right, not all
    assert last > first + 0.03, rewards
    assert summary["results"]["mean_reward_last"] > summary["results"]["mean_reward_first"]

    results = summary["results"]
    assert 0 <= results["SimpleArith pass@k"] <= 1 and results["k"] == 4
    assert summary["curves"]["pass@k"]["x"] == [0, 12, 24]
    assert summary["samples_per_s"] > 0
    assert set(summary["timing"]) >= {"generate_share", "update_share", "sync_share"}
    ckpt_dir = get_base_dir() / "checkpoints" / "rl" / "tiny"
    assert find_last_step(ckpt_dir) == steps and (ckpt_dir / "step_000012").is_dir()

    # --resume continues from the last checkpoint: its step, data position and curves
    resumed = chat_rl.main(rl_args("--train-examples", "32", "--num-steps", str(steps + 1), "--eval-every", "-1", "--resume"))
    assert resumed["status"] == "finished" and resumed["step"] == steps + 1 and resumed["starts"] == [0, steps]
    assert resumed["curves"]["reward"]["y"][:steps] == rewards and len(resumed["curves"]["reward"]["y"]) == steps + 1
    assert load_meta(ckpt_dir, steps + 1)["data_state"] == [{"example": 8 * (steps + 1)}] * 2  # every rank's: the same
    # the resumed run's live metrics: its step, one restart (the --resume)
    samples = wait_for_metrics(lambda s: s if steps + 1 in metric_values(s, "ray_nanochat_train_step", **tags) else None)
    assert sum(metric_values(samples, "ray_nanochat_train_restarts_total", **tags)) == 1
