"""Midtraining and SFT: the batch builders (masks, padding, packing, data positions; no Ray), then tiny
runs on 2 gloo workers of the session's Ray, from a tiny base checkpoint made once for the module."""
import argparse
import json

import pytest
import torch

from nanochat.checkpoint import CheckpointError, build_model, checkpoint_dir, find_last_step, save_checkpoint
from ray_jobs import chat_sft, mid_train
from ray_jobs.training import rank_conversations, resume_or_init
from tasks.common import Task, TaskDataError
from tiny_checkpoint import TAG, install, make_tiny_checkpoint

WORKER_FLAGS = ["--num-workers", "2", "--device", "cpu", "--cpus-per-worker", "1", "--max-failures", "1", "--log-every", "2"]


def conversation(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


class Conversations(Task):
    def __init__(self, conversations, **kwargs):
        super().__init__(**kwargs)
        self.conversations = conversations


class Bigram(torch.nn.Module):
    """Logits at position t depend on token t only: a change to one token moves the loss of the next target
    only, so the loss of a row shows exactly which targets it counts."""

    def __init__(self, vocab):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx, targets):
        logits = self.table(idx)
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


@pytest.fixture(scope="module")
def tiny_base(small_tokenizer, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints"), "base", small_tokenizer[0])


@pytest.fixture
def chat_setup(tiny_base, small_tokenizer):
    install(tiny_base, small_tokenizer[0])
    return small_tokenizer[0]


# ---- SFT rows: the loss is on the assistant's tokens only ---------------------------------------------

def test_sft_loss_ignores_user_tokens(small_tokenizer):
    tokenizer = small_tokenizer[0]
    ids, mask = tokenizer.render_conversation(conversation("What is the capital of France?", "Paris, of course."))
    pad = tokenizer.encode_special("<|assistant_end|>")
    model = Bigram(tokenizer.get_vocab_size())

    def loss(ids):
        return model(*chat_sft.sft_batch([(ids, mask)], pad)).item()

    user_end = ids.index(tokenizer.encode_special("<|user_end|>"))
    for position in (2, user_end - 1):  # a user token, and the user's last one (what predicts <|user_end|>)
        changed = list(ids)
        changed[position] = (changed[position] + 7) % 256
        assert loss(changed) == loss(ids)
    assistant = max(i for i, m in enumerate(mask) if m) - 1  # an assistant token before <|assistant_end|>
    changed = list(ids)
    changed[assistant] = (changed[assistant] + 7) % 256
    assert loss(changed) != loss(ids)  # the same kind of change where the loss looks does move it


def test_sft_batch_pads_and_masks_variable_length_rows(small_tokenizer):
    tokenizer = small_tokenizer[0]
    pad = tokenizer.encode_special("<|assistant_end|>")
    short = tokenizer.render_conversation(conversation("Hi", "Hello!"))
    long = tokenizer.render_conversation({"messages": [
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "}, {"type": "python", "text": "6*7"},
                                          {"type": "python_output", "text": "42"}, {"type": "text", "text": "It is 42."}]},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]})
    inputs, targets = chat_sft.sft_batch([short, long], pad)
    n_short, n_long = len(short[0]), len(long[0])
    assert inputs.shape == targets.shape == (2, n_long - 1) and inputs.dtype == targets.dtype == torch.long
    for row, (ids, mask) in enumerate([short, long]):
        n = len(ids)
        assert inputs[row, :n - 1].tolist() == ids[:-1]
        expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert targets[row, :n - 1].tolist() == expected
    assert (inputs[0, n_short - 1:] == pad).all() and (targets[0, n_short - 1:] == -1).all()  # padding: no loss
    trained = targets[1][targets[1] >= 0].tolist()
    assert tokenizer.encode_special("<|python_start|>") in trained and tokenizer.encode_special("<|assistant_end|>") in trained
    assert tokenizer.encode_special("<|output_start|>") not in trained  # the tool wrote it, not the model


def test_sft_batches_skip_untrainable_rows_and_resume(small_tokenizer):
    tokenizer = small_tokenizer[0]
    convs = [conversation(f"question {i} " * (40 if i == 2 else 1), f"answer {i}") for i in range(12)]
    task = Conversations(convs)
    T = 32  # conversation 2's user turn alone is longer: nothing of the assistant is left, so it is skipped
    batches = chat_sft.sft_batches(task, tokenizer, 2, T)
    first = [next(batches) for _ in range(3)]
    assert all(inputs.shape[1] <= T and (targets >= 0).any(dim=1).all() for inputs, targets, _ in first)
    assert [state["example"] for _, _, state in first] == [2, 5, 7]  # 0 1 | (2 skipped) 3 4 | 5 6: after each batch
    resumed = chat_sft.sft_batches(task, tokenizer, 2, T, state=first[1][2])
    inputs, targets, state = next(resumed)
    assert torch.equal(inputs, first[2][0]) and torch.equal(targets, first[2][1]) and state == first[2][2]


def test_rank_conversations_are_disjoint_shares_and_resume(monkeypatch):
    task = Conversations([conversation(f"q{i}", f"a{i}") for i in range(10)])
    monkeypatch.setenv("WORLD_SIZE", "3")
    shares = {}
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        it = rank_conversations(task)
        shares[rank] = [next(it)[0]["messages"][0]["content"] for _ in range(len(range(rank, 10, 3)))]
    assert shares == {0: ["q0", "q3", "q6", "q9"], 1: ["q1", "q4", "q7"], 2: ["q2", "q5", "q8"]}
    monkeypatch.setenv("RANK", "1")
    it = rank_conversations(task, {"epoch": 0, "example": 2})
    assert [(c["messages"][0]["content"], s) for c, s in (next(it), next(it))] == \
        [("q7", {"epoch": 0, "example": 3}), ("q1", {"epoch": 1, "example": 1})]


def test_mid_rows_are_packed_conversations(small_tokenizer):
    tokenizer = small_tokenizer[0]
    task = Conversations([conversation(f"Tell me about the number {i}.", f"The number {i} is a fine number.") for i in range(60)])
    T, bos = 64, tokenizer.get_bos_token_id()
    batches = mid_train.packed_conversation_batches(task, tokenizer, 4, T)
    inputs, targets, state = next(batches)
    assert inputs.shape == targets.shape == (4, T)
    assert (inputs[:, 0] == bos).all()  # every row starts at a conversation's start
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and (targets >= 0).all()  # loss on every token of the rows
    assert state["example"] > 0
    text = tokenizer.decode(inputs[0].tolist())
    assert "<|user_start|>Tell me about the number" in text and "<|assistant_start|>The number" in text


# ---- tiny runs on Ray -----------------------------------------------------------------------------------

def test_mid_then_sft_tiny_runs_write_checkpoints(ray_cluster, chat_setup):
    mid = mid_train.main(mid_train.parser.parse_args(WORKER_FLAGS + [
        "--task-limit", "4", "--val-examples", "16", "--eval-steps", "2", "--device-batch-size", "2",
        "--total-batch-size", "512", "--eval-every", "4", "--save-every", "4"]))
    assert mid["status"] == "finished" and mid["step"] == mid["num_iterations"] >= 4, mid  # -1: one pass over the mixture
    assert mid["source"].startswith("base") and mid["val_bpb"] > 0 and len(mid["curves"]["val_bpb"]["y"]) >= 2
    mid_dir = checkpoint_dir("mid", TAG)
    assert find_last_step(mid_dir) == mid["step"] and (mid_dir / "step_000004" / "meta.json").is_file()
    meta = json.loads((mid_dir / f"step_{mid['step']:06d}" / "meta.json").read_text())
    assert meta["phase"] == "mid" and len(meta["data_state"]) == 2 and all(s["example"] > 0 for s in meta["data_state"])

    sft = chat_sft.main(chat_sft.parser.parse_args(WORKER_FLAGS + [
        "--task-limit", "8", "--smoltalk-examples", "8", "--val-examples", "8", "--eval-steps", "2", "--device-batch-size", "2",
        "--examples-per-step", "8", "--eval-every", "-1", "--save-every", "2", "--num-iterations", "4"]))
    assert sft["status"] == "finished" and sft["step"] == 4 and sft["source"].startswith("mid"), sft  # mid exists: SFT starts there
    model, meta = build_model(checkpoint_dir("sft", TAG), 4, "cpu", expect_tokenizer=chat_setup.fingerprint())
    position = meta["data_state"][0]  # rank 0's (every rank's is saved)
    assert meta["phase"] == "sft" and position["epoch"] == 0 and position["example"] >= 8  # 4 steps x 8 / 2 workers, + rows skipped
    assert 0 < sft["tokens_trained"] < 4 * 8 * 128  # assistant tokens only


def test_resume_or_init_continues_a_checkpoint_else_starts_from_the_source(chat_setup, tmp_path):
    # what a restarted or --resume'd mid/sft worker does (the Ray runs above and tests/test_base_train.py go through it too)
    c = argparse.Namespace(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, init_lr_frac=0.5)
    source = checkpoint_dir("base", TAG)
    model, optimizers, step, meta = resume_or_init(tmp_path / "sft", "cpu", c, chat_setup,
                                                   lambda: build_model(source, 0, "cpu", phase="train")[0])
    assert step == 0 and meta == {} and optimizers[1].param_groups[0]["lr"] == pytest.approx(0.01)  # init_lr_frac applies
    inputs = torch.tensor([chat_setup.encode("hello there", prepend="<|bos|>")])
    model(inputs[:, :-1], inputs[:, 1:]).backward()
    for opt in optimizers:
        opt.step()
    save_checkpoint(tmp_path / "sft", 7, model, optimizers, {"data_state": {"epoch": 0, "example": 42}},
                    tokenizer_fingerprint=chat_setup.fingerprint())
    resumed, resumed_optimizers, step, meta = resume_or_init(tmp_path / "sft", "cpu", c, chat_setup,
                                                             lambda: pytest.fail("must resume, not start over"))
    assert step == 7 and meta["data_state"] == {"epoch": 0, "example": 42}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    assert resumed_optimizers[0].state_dict()["state"].keys() == optimizers[0].state_dict()["state"].keys() != set()


def test_bad_conversation_is_named_by_the_driver(ray_cluster, chat_setup, tmp_path):
    bad = tmp_path / "identity.jsonl"
    bad.write_text(json.dumps(conversation("hi", "hello")) + "\n" +
                   json.dumps({"messages": [{"role": "assistant", "content": "I speak first"}]}) + "\n")
    with pytest.raises(TaskDataError, match=rf"{bad}:2: .*role 'assistant', expected 'user'"):
        mid_train.main(mid_train.parser.parse_args(WORKER_FLAGS + ["--task-limit", "4", "--identity-file", str(bad)]))
    empty = tmp_path / "empty_turn.jsonl"
    empty.write_text(json.dumps(conversation("hi", "")) + "\n")
    with pytest.raises(TaskDataError, match=rf"{empty}:1: "):
        chat_sft.main(chat_sft.parser.parse_args(WORKER_FLAGS + ["--task-limit", "4", "--identity-file", str(empty)]))
    assert not checkpoint_dir("mid", TAG).exists() and not checkpoint_dir("sft", TAG).exists()


def test_sft_without_a_checkpoint_says_so(small_tokenizer):
    with pytest.raises(CheckpointError, match="no complete checkpoint for phase mid or base"):
        chat_sft.main(chat_sft.parser.parse_args(WORKER_FLAGS))


def test_bad_batch_settings_are_refused_by_the_driver(ray_cluster, chat_setup):  # the driver connects first
    with pytest.raises(ValueError, match=r"--total-batch-size 1000 is not a multiple of T x workers = 128 x 2 for any device batch"):
        mid_train.main(mid_train.parser.parse_args(WORKER_FLAGS + ["--device-batch-size", "2", "--total-batch-size", "1000"]))
    with pytest.raises(ValueError, match=r"--total-batch-size 1536 must be a multiple of device batch x T x workers = 4 x 128 x 2; "
                                         r"device batches that divide it: 6, 3, 2, 1$"):
        mid_train.main(mid_train.parser.parse_args(WORKER_FLAGS + ["--device-batch-size", "4", "--total-batch-size", "1536"]))
    with pytest.raises(ValueError, match=r"--examples-per-step 10 must be a multiple of device batch x workers = 2 x 2"):
        chat_sft.main(chat_sft.parser.parse_args(WORKER_FLAGS + ["--device-batch-size", "2", "--examples-per-step", "10"]))
