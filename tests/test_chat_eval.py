"""Chat evaluation: ChatCORE, categorical answers restricted to the letters, pass@N, and a run over Ray
workers on a tiny checkpoint."""
import math

import pytest
import torch

from ray_jobs import chat_eval
from tasks.common import mc_conversation
from tiny_checkpoint import TAG, install, make_tiny_checkpoint


def test_chatcore_is_the_mean_of_centered_accuracies():
    accuracies = {"ARC-Easy": 0.625, "MMLU": 0.25, "GSM8K": 0.1, "HumanEval": 0.0}
    chance = {"ARC-Easy": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
    # (0.625 - 0.25) / 0.75 = 0.5; chance -> 0; 0.1; 0
    assert chat_eval.chatcore(accuracies, chance) == pytest.approx((0.5 + 0 + 0.1 + 0) / 4)
    assert chat_eval.chatcore({"MMLU": 1.0}, {"MMLU": 0.25}) == pytest.approx(1.0)
    assert chat_eval.chatcore({"MMLU": 0.0}, {"MMLU": 0.25}) == pytest.approx(-1 / 3)  # below chance is negative


class Scripted(torch.nn.Module):
    """Next-token logits fixed by a table, whatever the prompt: `scores` {token id: logit}, 0 elsewhere."""

    def __init__(self, vocab, scores):
        super().__init__()
        self.logits = torch.zeros(vocab)
        for token, value in scores.items():
            self.logits[token] = value

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1).clone()


def test_categorical_answer_is_always_one_of_the_letters(small_tokenizer):
    tokenizer = small_tokenizer[0]
    four = mc_conversation("Which is a mammal?", ["trout", "eagle", "whale", "frog"], 2)
    three = mc_conversation("Which is a gas?", ["iron", "neon", "salt"], 1)
    letter = {c: tokenizer.encode(c)[0] for c in "ABCD"}
    favourite = tokenizer.encode(" the")[0]  # what the model would say if asked freely
    model = Scripted(tokenizer.get_vocab_size(), {favourite: 100.0, letter["D"]: 9.0, letter["C"]: 5.0,
                                                  letter["B"]: 3.0, letter["A"]: 1.0})
    answers = chat_eval.categorical_answers(model, tokenizer, [four, three], context=128, batch_size=2)
    # four choices: D is the best letter; three choices (A-C): D is not offered, so C
    assert answers == ["D", "C"]
    model = Scripted(tokenizer.get_vocab_size(), {favourite: 100.0, letter["C"]: 2.0})
    assert chat_eval.categorical_answers(model, tokenizer, [four], context=16) == ["C"]  # prompt cut to its last 16 tokens
    assert chat_eval.categorical_answers(model, tokenizer, [four], context=16) == [four["messages"][-1]["content"]]


class ScriptedEngine:
    """Engine.generate_batch stand-in: returns the given completions (as token ids) for any prompt."""

    def __init__(self, tokenizer, completions):
        self.tokenizer, self.completions, self.calls = tokenizer, completions, []

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        self.calls.append(dict(prompt_len=len(tokens), num_samples=num_samples, max_tokens=max_tokens, temperature=temperature))
        return [self.tokenizer.encode(c) for c in self.completions[:num_samples]], None


class Exact:
    def evaluate(self, conversation, completion):
        return completion == "#### 42"


def test_generative_pass_at_n(small_tokenizer):
    tokenizer = small_tokenizer[0]
    problem = {"messages": [{"role": "user", "content": "What is 6 times 7? " * 30}, {"role": "assistant", "content": "#### 42"}]}
    engine = ScriptedEngine(tokenizer, ["#### 41", "#### 7", "#### 42", "#### 40"])
    assert chat_eval.generative_pass(engine, tokenizer, Exact(), problem, context=128, num_samples=3, max_new_tokens=512)
    assert engine.calls[-1]["num_samples"] == 3
    assert engine.calls[-1]["max_tokens"] == 64 and engine.calls[-1]["prompt_len"] == 64  # half the context for the answer
    assert not chat_eval.generative_pass(engine, tokenizer, Exact(), problem, context=128, num_samples=2)  # 42 is the 3rd sample
    engine = ScriptedEngine(tokenizer, ["#### 42"])
    assert chat_eval.generative_pass(engine, tokenizer, Exact(), problem, context=128, num_samples=1, max_new_tokens=8)
    assert engine.calls[-1]["max_tokens"] == 8 and engine.calls[-1]["prompt_len"] == 120


@pytest.fixture(scope="module")
def tiny_sft(small_tokenizer, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints"), "sft", small_tokenizer[0])


def test_chat_eval_over_ray_workers(ray_cluster, tiny_sft, small_tokenizer):
    install(tiny_sft, small_tokenizer[0])
    results = chat_eval.main(chat_eval.parser.parse_args([
        "--phase", "sft", "--max-problems", "4", "--num-workers", "2", "--device", "cpu", "--cpus-per-worker", "1",
        "--max-new-tokens", "8", "--num-samples", "2", "--temperature", "1.0"]))
    assert list(results) == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
    for name in chat_eval.TASK_NAMES:
        assert results[name] in (0.0, 0.25, 0.5, 0.75, 1.0), results  # 4 problems each
    assert -1 <= results["ChatCORE"] <= 1 and math.isfinite(results["ChatCORE"])


def test_chat_eval_names_what_is_missing(small_tokenizer):
    with pytest.raises(Exception, match=f"no complete checkpoint for phase rl with tag '{TAG}'"):
        chat_eval.main(chat_eval.parser.parse_args(["--phase", "rl", "--tag", TAG]))
    with pytest.raises(ValueError, match="unknown tasks"):
        chat_eval.main(chat_eval.parser.parse_args(["--tasks", "ARC-Easy,TriviaQA"]))
