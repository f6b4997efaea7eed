"""Chat evaluation: ChatCORE, categorical answers restricted to the letters, pass@N, and a run over Ray
workers on a tiny checkpoint."""

import pytest
import torch

from ray_jobs import chat_eval
from tasks.common import mc_conversation
from tiny_checkpoint import TAG, install, make_tiny_checkpoint


def test_chatcore_is_nanochats_five_task_mean():
    accuracies = {"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 0.4, "GSM8K": 0.1, "HumanEval": 0.05, "SpellingBee": 0.9}
    # by hand: (0.625 - 0.25) / 0.75 = 0.5; 0; (0.4 - 0.25) / 0.75 = 0.2; 0.1; 0.05; SpellingBee left out
    assert chat_eval.chatcore(accuracies) == pytest.approx((0.5 + 0 + 0.2 + 0.1 + 0.05) / 5)
    assert chat_eval.chatcore({**accuracies, "SpellingBee": 0.0}) == chat_eval.chatcore(accuracies)
    assert chat_eval.chatcore({t: 0.25 if t in ("ARC-Easy", "ARC-Challenge", "MMLU") else 0.0 for t in accuracies}) == 0.0
    assert chat_eval.chatcore({t: 1.0 for t in accuracies}) == pytest.approx(1.0)
    assert chat_eval.chatcore({**accuracies, "MMLU": 0.0}) == pytest.approx((0.5 + 0 - 1 / 3 + 0.1 + 0.05) / 5)  # below chance
    assert chat_eval.chatcore({t: a for t, a in accuracies.items() if t != "HumanEval"}) is None  # needs all five


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


def test_chat_eval_over_ray_equals_in_process(ray_cluster, tiny_sft, small_tokenizer):
    """Two Ray workers pass exactly the problems one in-process evaluate_share passes, task by task."""
    install(tiny_sft, small_tokenizer[0])
    args = chat_eval.parser.parse_args([
        "--phase", "sft", "--max-problems", "6", "--num-workers", "2", "--device", "cpu", "--cpus-per-worker", "1",
        "--max-new-tokens", "8", "--num-samples", "2", "--temperature", "1.0"])
    results = chat_eval.main(args)
    assert list(results) == chat_eval.TASK_NAMES + ["ChatCORE", "passed", "problems"]
    tasks = {name: chat_eval.load_task(name, 6) for name in chat_eval.TASK_NAMES}
    threads = torch.get_num_threads()
    try:
        local = chat_eval.evaluate_share(chat_eval.worker_spec(args, tiny_sft / "sft" / TAG), tasks, 0, 1)
    finally:
        torch.set_num_threads(threads)
    assert results["passed"] == {name: sum(passed) for name, passed in local.items()}
    assert results["problems"] == {name: 6 for name in chat_eval.TASK_NAMES}
    assert all(results[name] == sum(local[name]) / 6 for name in chat_eval.TASK_NAMES)
    assert results["ChatCORE"] == chat_eval.chatcore({name: sum(local[name]) / 6 for name in chat_eval.TASK_NAMES})
    section = chat_eval.report_section(results, args)
    assert section["results"]["ChatCORE"] == results["ChatCORE"] and "SpellingBee" in section["definitions"]["ChatCORE"]


def test_chat_eval_names_what_is_missing(small_tokenizer):
    with pytest.raises(Exception, match=f"no complete checkpoint for phase rl with tag '{TAG}'"):
        chat_eval.main(chat_eval.parser.parse_args(["--phase", "rl", "--tag", TAG]))
    with pytest.raises(ValueError, match="unknown tasks"):
        chat_eval.main(chat_eval.parser.parse_args(["--tasks", "ARC-Easy,TriviaQA"]))
