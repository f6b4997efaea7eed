"""CORE: scoring of the three task formats with a scripted model, few-shot prompts, centering, the real
bundle from the mirror, bad bundles and task files, distributed counts, and base_eval over Ray."""
import csv
import json
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from multiproc import run_gloo
from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.core_eval import (BUNDLE_URL, CoreEvalError, centered_accuracy, count_correct, evaluate_core,
                                evaluate_task, fewshot_indices, get_eval_bundle, load_core_tasks, load_task_data,
                                render_example, summarize, tokenize_pairs)
from nanochat.gpt import GPTConfig, create_model
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir

MC = {"label": "mc", "task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " ", "random_baseline": 25.0}
SCHEMA = {"label": "schema", "task_type": "schema", "num_fewshot": 0, "continuation_delimiter": " ", "random_baseline": 50.0}
LM = {"label": "lm", "task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " ", "random_baseline": 0.0}


class Oracle(torch.nn.Module):
    """A scripted model: after any prefix of one of `sequences` it puts (almost) all probability on that
    sequence's next token; anywhere else its prediction is uniform. So a continuation that follows a
    favored sequence has loss ~0 and the greedy prediction of each of its tokens is right."""

    def __init__(self, sequences, vocab_size, sequence_len=None):
        super().__init__()
        self.vocab_size = vocab_size
        self.next = {tuple(s[:t]): s[t] for s in sequences for t in range(1, len(s))}
        if sequence_len is not None:
            self.config = type("Config", (), {"sequence_len": sequence_len})()
        self.batches = []  # the shape of every forward, to check batching and cropping

    def forward(self, idx):
        B, T = idx.shape
        self.batches.append((B, T))
        assert not hasattr(self, "config") or T <= self.config.sequence_len, "the prompt was not cropped"
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                token = self.next.get(tuple(row[:t + 1]))
                if token is not None:
                    logits[b, t, token] = 30.0
        return logits


@pytest.fixture
def tok(small_tokenizer):
    return small_tokenizer[0]


def ids(tok, text):
    return tok.encode(text, prepend=tok.get_bos_token_id())


def right(model, tok, row, task):
    correct, n = count_correct(model, tok, [row], task, "cpu", [0])
    assert n == 1
    return bool(correct)


# ---- scoring each format -----------------------------------------------------------------------------

def test_multiple_choice_picks_the_lowest_loss_choice(tok):
    row = {"query": "Question: Which city is the capital of France?\nAnswer:", "choices": ["Berlin", "Paris", "the city of Rome"], "gold": 1}
    for favored, choice in enumerate(row["choices"]):
        model = Oracle([ids(tok, row["query"] + " " + choice)], tok.get_vocab_size())
        assert right(model, tok, row, MC) == (favored == row["gold"]), choice
        assert model.batches == [(3, model.batches[0][1])]  # the three choices in one forward
    # choices sharing their first words: still the favored one, by its later tokens
    row = {"query": "The house was painted", "choices": ["a dark shade of red", "a dark shade of blue"], "gold": 1}
    assert right(Oracle([ids(tok, "The house was painted a dark shade of blue")], tok.get_vocab_size()), tok, row, MC)
    assert not right(Oracle([ids(tok, "The house was painted a dark shade of red")], tok.get_vocab_size()), tok, row, MC)


def test_multiple_choice_delimiter_and_trailing_space(tok):
    """A query ending in "Answer: " with delimiter " " must not become "Answer:  X" (two spaces)."""
    row = {"query": "Which letter comes first?\nA. x\nB. y\nAnswer: ", "choices": ["A", "B"], "gold": 0}
    model = Oracle([ids(tok, "Which letter comes first?\nA. x\nB. y\nAnswer: A")], tok.get_vocab_size())
    assert right(model, tok, row, MC)
    task = {**MC, "continuation_delimiter": "\nAnswer: "}
    row = {"query": "Question: Is the sky blue?", "choices": ["no", "yes"], "gold": 1}
    assert right(Oracle([ids(tok, "Question: Is the sky blue?\nAnswer: yes")], tok.get_vocab_size()), tok, row, task)


def test_schema_picks_the_context_under_which_the_continuation_is_likeliest(tok):
    row = {"context_options": ["The trophy did not fit in the suitcase because the trophy",
                               "The trophy did not fit in the suitcase because the suitcase"],
           "continuation": "was too big.", "gold": 0}
    for favored, option in enumerate(row["context_options"]):
        model = Oracle([ids(tok, option + " " + row["continuation"])], tok.get_vocab_size())
        assert right(model, tok, row, SCHEMA) == (favored == row["gold"])
        assert len(model.batches) == 1 and model.batches[0][0] == 2


def test_language_modeling_needs_every_continuation_token(tok):
    row = {"context": "The capital of France is", "continuation": "Paris, the city of light"}
    full = ids(tok, "The capital of France is Paris, the city of light")
    start = len(ids(tok, "The capital of France is"))
    assert len(full) - start >= 4 and full[:start] == ids(tok, "The capital of France is")
    assert right(Oracle([full], tok.get_vocab_size()), tok, row, LM)
    wrong_last = full[:-1] + [(full[-1] + 1) % tok.get_vocab_size()]
    assert not right(Oracle([wrong_last], tok.get_vocab_size()), tok, row, LM)
    assert not right(Oracle([full[:start + 2]], tok.get_vocab_size()), tok, row, LM)  # only the first tokens
    assert not right(Oracle([], tok.get_vocab_size()), tok, row, LM)


def test_long_prompts_are_cropped_from_the_left_keeping_the_continuation(tok):
    context = " ".join(f"word{i}" for i in range(200)) + " and the answer is"
    row = {"context": context, "continuation": "forty two"}
    full = ids(tok, context + " forty two")
    continuation = len(full) - len(ids(tok, context))
    (cropped, start), = tokenize_pairs(tok, render_example([row], 0, LM)[0], max_len=16)
    assert cropped == full[-16:] and cropped[start:] == full[-continuation:]
    model = Oracle([full[-16:]], tok.get_vocab_size(), sequence_len=16)
    assert right(model, tok, row, LM) and model.batches == [(1, 16)]


# ---- few-shot prompts --------------------------------------------------------------------------------

def test_fewshot_prompts_never_hold_the_example_and_are_deterministic():
    data = [{"context": f"Fact {i}: item{i} is", "continuation": f"value{i}"} for i in range(30)]
    task = {**LM, "num_fewshot": 5}
    prompts = set()
    for i in range(len(data)):
        shots = fewshot_indices(len(data), i, 5)
        assert len(set(shots)) == 5 and i not in shots and all(0 <= j < 30 for j in shots)
        assert shots == fewshot_indices(len(data), i, 5)
        (context, continuation), = render_example(data, i, task)[0]
        assert render_example(data, i, task)[0] == [(context, continuation)]  # the same every time
        assert continuation == f"value{i}" and context.endswith(f"Fact {i}: item{i} is ")
        assert context.count(f"item{i} ") == 1 and f"value{i}\n" not in context  # never its own answer
        solved = context.split("\n\n")[:-1]
        assert solved == [f"Fact {j}: item{j} is value{j}" for j in shots]
        prompts.add(tuple(shots))
    assert len(prompts) > 20  # examples get different shots
    assert len(fewshot_indices(3, 1, 10)) == 2  # fewer examples than shots: all the others
    # multiple choice shots show the gold answer; schema shots the gold context
    mc = [{"query": f"Q{i}", "choices": [f"wrong{i}", f"right{i}"], "gold": 1} for i in range(4)]
    pairs, gold = render_example(mc, 0, {**MC, "num_fewshot": 3})
    assert gold == 1 and [c for _, c in pairs] == ["wrong0", "right0"]
    assert all(f"Q{j} right{j}\n\n" in pairs[0][0] for j in (1, 2, 3)) and "wrong1" not in pairs[0][0]
    schema = [{"context_options": [f"bad{i}", f"good{i}"], "continuation": f"end{i}", "gold": 1} for i in range(3)]
    pairs, _ = render_example(schema, 2, {**SCHEMA, "num_fewshot": 2})
    assert pairs == [("good0 end0\n\ngood1 end1\n\nbad2 ", "end2"), ("good0 end0\n\ngood1 end1\n\ngood2 ", "end2")] or \
        pairs == [("good1 end1\n\ngood0 end0\n\nbad2 ", "end2"), ("good1 end1\n\ngood0 end0\n\ngood2 ", "end2")]


# ---- centering and the CORE mean ---------------------------------------------------------------------

def test_centered_accuracy_and_core_mean():
    assert centered_accuracy(0.25, 25) == pytest.approx(0.0)
    assert centered_accuracy(1.0, 25) == pytest.approx(1.0)
    assert centered_accuracy(0.625, 25) == pytest.approx(0.5)
    assert centered_accuracy(0.5, 50) == pytest.approx(0.0)
    assert centered_accuracy(0.3, 0) == pytest.approx(0.3)
    assert centered_accuracy(0.0, 50) == pytest.approx(-1.0)
    tasks = [{"label": "a", "random_baseline": 25.0}, {"label": "b", "random_baseline": 50.0}, {"label": "c", "random_baseline": 0.0}]
    result = summarize({"a": (5, 8), "b": (3, 4), "c": (1, 10)}, tasks)
    assert result["tasks"]["a"] == {"accuracy": 0.625, "centered": pytest.approx(0.5), "n": 8}
    assert result["tasks"]["b"]["centered"] == pytest.approx(0.5) and result["tasks"]["c"]["centered"] == pytest.approx(0.1)
    assert result["CORE"] == pytest.approx((0.5 + 0.5 + 0.1) / 3)


# ---- the real bundle ---------------------------------------------------------------------------------

TASK_TYPES = {"multiple_choice": 11, "language_modeling": 9, "schema": 2}


def test_real_bundle_from_the_mirror(tmp_path):
    bundle = get_eval_bundle()
    assert bundle.parent == Path(get_tokenizer_dir()).parent and (bundle / "core.yaml").is_file()
    assert get_eval_bundle() == bundle and not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]
    tasks = load_core_tasks(bundle)
    assert len(tasks) == 22 and len({t["label"] for t in tasks}) == 22
    assert {k: sum(t["task_type"] == k for t in tasks) for k in TASK_TYPES} == TASK_TYPES
    by_label = {t["label"]: t for t in tasks}
    assert by_label["jeopardy"]["num_fewshot"] == 10 and by_label["jeopardy"]["continuation_delimiter"] == "\nAnswer: "
    assert by_label["copa"]["num_fewshot"] == 0 and by_label["copa"]["continuation_delimiter"] == " "
    # baselines are percentages
    assert by_label["hellaswag"]["random_baseline"] == 25 and by_label["bigbench_language_identification"]["random_baseline"] == 9.1
    assert by_label["boolq"]["random_baseline"] == 62 and by_label["squad"]["random_baseline"] == 0
    for task in tasks:
        rows = len(load_task_data(bundle, task))
        # eval_meta_data.csv says 2376 for arc_challenge (a copy of arc_easy's count); the file has 1172
        assert rows == (1172 if task["label"] == "arc_challenge" else task["expected_rows"]), task["label"]


def test_core_of_a_random_model_in_process(tok):
    """evaluate_core end to end on two real tasks: a random model scores near chance."""
    torch.manual_seed(0)
    model = create_model(GPTConfig.from_depth(2, tok.get_vocab_size(), 64, head_dim=32), "cpu").eval()
    result = evaluate_core(model, tok, get_eval_bundle(), "cpu", max_per_task=6, labels={"copa", "lambada_openai"})
    assert set(result["tasks"]) == {"copa", "lambada_openai"} and all(r["n"] == 6 for r in result["tasks"].values())
    assert result["tasks"]["lambada_openai"]["accuracy"] == 0.0 and -1 <= result["CORE"] <= 1


# ---- bad input ---------------------------------------------------------------------------------------

def test_missing_or_corrupt_bundle_is_named(tmp_path, monkeypatch, mirror_dir):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("NANOCHAT_MIRROR", str(mirror))
    with pytest.raises(CoreEvalError, match=f"{mirror / 'eval_bundle.zip'} is missing"):
        get_eval_bundle(base_dir=tmp_path / "b1")
    (mirror / "eval_bundle.zip").write_bytes(b"<html>Access denied</html>")
    with pytest.raises(CoreEvalError, match=f"{mirror / 'eval_bundle.zip'} is corrupt"):
        get_eval_bundle(base_dir=tmp_path / "b2")
    with zipfile.ZipFile(mirror / "eval_bundle.zip", "w") as z:
        z.writestr("something/else.txt", "hello")
    with pytest.raises(CoreEvalError, match="not an eval bundle: it has no eval_bundle/core.yaml"):
        get_eval_bundle(base_dir=tmp_path / "b3")
    assert not (tmp_path / "b3" / "eval_bundle").exists() and list((tmp_path / "b3").iterdir()) == []  # no half bundle

    # no mirror: the downloader fetches <base>/eval_bundle.zip; a damaged download is removed
    monkeypatch.delenv("NANOCHAT_MIRROR")
    calls = []

    def bad_download(url, path):
        calls.append(url)
        Path(path).write_bytes(b"truncated")

    with pytest.raises(CoreEvalError, match="corrupt"):
        get_eval_bundle(download=bad_download, base_dir=tmp_path / "b4")
    assert calls == [BUNDLE_URL] and not (tmp_path / "b4" / "eval_bundle.zip").exists()
    with pytest.raises(CoreEvalError, match=f"download {BUNDLE_URL}"):
        get_eval_bundle(base_dir=tmp_path / "b5")
    bundle = get_eval_bundle(download=lambda url, path: shutil.copy(mirror_dir / "eval_bundle.zip", path), base_dir=tmp_path / "b6")
    assert (bundle / "eval_data").is_dir()


def write_bundle(root, lines, task_type="multiple_choice", label="t1", csv_label="t1"):
    (root / "eval_data").mkdir(parents=True)
    (root / "core.yaml").write_text(f"icl_tasks:\n- label: {label}\n  dataset_uri: t1.jsonl\n  num_fewshot: [1]\n  icl_task_type: {task_type}\n")
    (root / "eval_meta_data.csv").write_text(f"Eval Task,#datapoints,Random baseline\n{csv_label},3,25\n")
    (root / "eval_data" / "t1.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_malformed_task_rows_name_file_and_line(tmp_path):
    good = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0})
    cases = {
        "not json": ("{not json", ":2: not valid JSON"),
        "no gold": (json.dumps({"query": "q", "choices": ["a", "b"]}), ":2: multiple_choice row needs 'gold'"),
        "gold out of range": (json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}), ":2: gold 2 is out of range"),
        "one choice": (json.dumps({"query": "q", "choices": ["a"], "gold": 0}), ":2: needs at least 2 options"),
        "list row": ("[1, 2]", ":2: expected a JSON object"),
    }
    for i, (name, (line, message)) in enumerate(cases.items()):
        bundle = write_bundle(tmp_path / str(i), [good, line, good])
        task, = load_core_tasks(bundle)
        with pytest.raises(CoreEvalError, match=message) as err:
            load_task_data(bundle, task)
        assert str(bundle / "eval_data" / "t1.jsonl") in str(err.value), name
    bundle = write_bundle(tmp_path / "schema", [json.dumps({"context_options": ["a", "b"], "continuation": 3, "gold": 0})], "schema")
    with pytest.raises(CoreEvalError, match=r"t1.jsonl:1: schema row needs 'continuation'"):
        load_task_data(bundle, load_core_tasks(bundle)[0])
    with pytest.raises(CoreEvalError, match="unknown icl_task_type 'generation'"):
        load_core_tasks(write_bundle(tmp_path / "type", [good], "generation"))
    with pytest.raises(CoreEvalError, match="has no row in eval_meta_data.csv"):
        load_core_tasks(write_bundle(tmp_path / "csv", [good], csv_label="other"))
    (tmp_path / "csv" / "core.yaml").unlink()
    with pytest.raises(CoreEvalError, match="core.yaml is missing"):
        load_core_tasks(tmp_path / "csv")
    bundle = write_bundle(tmp_path / "ok", [good, good])
    task, = load_core_tasks(bundle)
    assert task == {"label": "t1", "task_type": "multiple_choice", "dataset_uri": "t1.jsonl", "num_fewshot": 1,
                    "continuation_delimiter": " ", "random_baseline": 25.0, "expected_rows": 3}
    (bundle / "eval_data" / "t1.jsonl").unlink()
    with pytest.raises(CoreEvalError, match="t1.jsonl is missing"):
        load_task_data(bundle, task)


# ---- distributed -------------------------------------------------------------------------------------

def _two_rank_task(rank, world_size, tokenizer_dir):
    tok = Tokenizer.from_directory(tokenizer_dir)
    data = [{"query": f"Question {i}:", "choices": ["yes", "no"], "gold": i % 2} for i in range(7)]
    # the model favors the gold answer of examples 0-4 and the other answer of 5 and 6: 5 of 7 right
    favored = [ids(tok, f"Question {i}: {'yes' if (i % 2 == 0) == (i < 5) else 'no'}") for i in range(7)]
    model = Oracle(favored, tok.get_vocab_size())
    assert evaluate_task(model, tok, data, MC, "cpu") == pytest.approx(5 / 7)
    assert sum(b for b, _ in model.batches) == 2 * len(range(rank, 7, world_size))  # this rank's share only


def test_evaluate_task_splits_examples_over_ranks_and_sums(small_tokenizer):
    tok, tokenizer_dir = small_tokenizer
    data = [{"query": f"Question {i}:", "choices": ["yes", "no"], "gold": i % 2} for i in range(7)]
    favored = [ids(tok, f"Question {i}: {'yes' if (i % 2 == 0) == (i < 5) else 'no'}") for i in range(7)]
    assert evaluate_task(Oracle(favored, tok.get_vocab_size()), tok, data, MC, "cpu") == pytest.approx(5 / 7)
    assert evaluate_task(Oracle(favored, tok.get_vocab_size()), tok, data, MC, "cpu", max_per_task=3) in (0, 1 / 3, 2 / 3, 1)
    run_gloo(_two_rank_task, 2, str(tokenizer_dir))


# ---- base_eval over Ray ------------------------------------------------------------------------------

def test_base_eval_over_ray_workers(ray_cluster, small_tokenizer):
    from ray_jobs import base_eval
    tok, _ = small_tokenizer
    tok.save(get_tokenizer_dir())
    torch.manual_seed(0)
    model = create_model(GPTConfig.from_depth(2, tok.get_vocab_size(), 128, head_dim=32), "cpu")
    save_checkpoint(checkpoint_dir("base", "tiny"), 7, model, meta={"phase": "base"}, tokenizer_fingerprint=tok.fingerprint())
    args = base_eval.parser.parse_args(["--max-per-task", "4", "--num-workers", "2", "--device", "cpu", "--cpus-per-worker", "1"])
    result = base_eval.main(args)
    assert result["tag"] == "tiny" and result["step"] == 7 and math.isfinite(result["CORE"]) and -1 <= result["CORE"] <= 1
    assert len(result["tasks"]) == 22 and all(r["n"] == 4 for r in result["tasks"].values())
    with open(result["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert Path(result["csv"]).name == "core_tiny_000007.csv"
    assert len(rows) == 23 and [r["task"] for r in rows[:22]] == list(result["tasks"]) and rows[22]["task"] == "CORE"
    assert all(int(r["n"]) == 4 for r in rows[:22]) and int(rows[22]["n"]) == 88
    assert float(rows[22]["centered"]) == pytest.approx(sum(float(r["centered"]) for r in rows[:22]) / 22, abs=1e-5)
    section = base_eval.report_section(result, args)
    assert section["results"]["CORE"] == result["CORE"] and len(section["results"]) == 23
