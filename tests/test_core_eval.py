"""CORE, pinned to nanochat's definition by hand-checked cases (choices sharing their first tokens, a
number after a space, schema suffixes, few-shot draws, the order and subset of examples, cropping), an
independent per-example reference on real tasks, the real bundle from the mirror, bad bundles and task
files, distributed counts, and base_eval over Ray equal to the in-process CORE in every count."""
import csv
import json
import math
import random
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multiproc import run_gloo
from nanochat.checkpoint import checkpoint_dir, save_checkpoint
from nanochat.core_eval import (BUNDLE_URL, CoreEvalError, centered_accuracy, count_correct, crop, evaluate_core,
                                evaluate_task, fewshot_indices, get_eval_bundle, load_core_tasks, load_task_data,
                                render_prompts, score_examples, shard_indices, summarize, task_examples, tokenize_prompts)
from nanochat.gpt import GPTConfig, create_model
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir

MC = {"label": "mc", "task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " ", "random_baseline": 25.0}
SCHEMA = {"label": "schema", "task_type": "schema", "num_fewshot": 0, "continuation_delimiter": " ", "random_baseline": 50.0}
LM = {"label": "lm", "task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " ", "random_baseline": 0.0}


class Table(torch.nn.Module):
    """A scripted model: after the prefix `p` (a tuple of ids, BOS included) its logits are
    table[p] ({token: logit}), 0 for every other token; after any prefix not in the table, all 0
    (uniform). So the loss of a target is computable by hand: log(sum of exp(logits)) - its logit."""

    def __init__(self, table, vocab_size, max_seq_len=None):
        super().__init__()
        self.table, self.vocab_size = table, vocab_size
        if max_seq_len is not None:
            self.max_seq_len = max_seq_len
        self.batches = []  # the shape of every forward, to check batching and cropping

    def forward(self, idx):
        B, T = idx.shape
        self.batches.append((B, T))
        assert T <= getattr(self, "max_seq_len", T), "the prompt was not cropped"
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                for token, value in self.table.get(tuple(row[:t + 1]), {}).items():
                    logits[b, t, token] = value
        return logits


def oracle(sequences, vocab_size, **kwargs):
    """A Table that, after any prefix of one of `sequences`, puts (almost) all probability on its next token."""
    return Table({tuple(s[:t]): {s[t]: 30.0} for s in sequences for t in range(1, len(s))}, vocab_size, **kwargs)


def table_losses(table, seq, start, vocab_size):
    """Hand formula: the loss of each token seq[t], t >= start, under Table(table): log-sum-exp of the
    logits at position t - 1 minus the target's logit."""
    out = []
    for t in range(start, len(seq)):
        entry = table.get(tuple(seq[:t]), {})
        lse = math.log(sum(math.exp(v) for v in entry.values()) + vocab_size - len(entry))
        out.append(lse - entry.get(seq[t], 0.0))
    return out


def logit_for_loss(loss, vocab_size):
    """The logit z that gives a target this loss when every other logit is 0: exp(z) / (exp(z) + V - 1) = exp(-loss)."""
    return math.log((vocab_size - 1) / (math.exp(loss) - 1))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Scoring is many small ops: on a busy 2-core machine one thread is several times faster than two
    (the counts do not depend on it; base_eval's workers run one thread each too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tok(small_tokenizer):
    return small_tokenizer[0]


def ids(tok, text):
    return tok.encode(text, prepend=tok.get_bos_token_id())


def right(model, tok, row, task):
    correct, n = count_correct(model, tok, [row], task, "cpu", [0])
    assert n == 1
    return bool(correct)


# ---- the scored tokens of each format, by hand ----------------------------------------------------------

def test_multiple_choice_scores_only_the_tokens_after_the_choices_common_prefix(tok):
    V = tok.get_vocab_size()
    row = {"query": "The house was painted", "choices": ["a dark shade of red", "a dark shade of light blue"], "gold": 0}
    prompts, gold = render_prompts([row], 0, MC)
    assert prompts == ["The house was painted a dark shade of red", "The house was painted a dark shade of light blue"] and gold == 0
    red, blue = ids(tok, prompts[0]), ids(tok, prompts[1])
    # by hand: the choices share " a dark shade of"; BPE splits before " red" and " light" (a space starts a word)
    shared = ids(tok, "The house was painted a dark shade of")
    assert red[:len(shared)] == blue[:len(shared)] == shared and red[len(shared)] != blue[len(shared)]
    assert tokenize_prompts(tok, prompts, "multiple_choice") == [(red, len(shared)), (blue, len(shared))]
    assert tok.decode(red[len(shared):]) == " red" and tok.decode(blue[len(shared):]) == " light blue"
    # a model: red's first own token at logit 3 (the position both choices share), its others nearly free;
    # blue's own tokens after the first at a logit c chosen so that blue's mean is red's + 0.2
    n_red, n_blue = len(red) - len(shared), len(blue) - len(shared)
    table = {tuple(shared): {red[len(shared)]: 3.0}}
    table.update({tuple(red[:t]): {red[t]: 30.0} for t in range(len(shared) + 1, len(red))})
    red_mean = sum(table_losses(table, red, len(shared), V)) / n_red
    first_blue = table_losses(table, blue, len(shared), V)[0]
    c = logit_for_loss((n_blue * (red_mean + 0.2) - first_blue) / (n_blue - 1), V)
    table.update({tuple(blue[:t]): {blue[t]: c} for t in range(len(shared) + 1, len(blue))})
    blue_mean = sum(table_losses(table, blue, len(shared), V)) / n_blue
    assert blue_mean == pytest.approx(red_mean + 0.2)  # so nanochat's definition picks red, the gold answer
    # averaging in the tokens the choices share (uniform: log V each) would pick blue instead
    start = len(ids(tok, "The house was painted"))
    old = [sum(table_losses(table, seq, start, V)) / (len(seq) - start) for seq in (red, blue)]
    assert old[0] > old[1]
    model = Table(table, V)
    assert right(model, tok, row, MC) and not right(model, tok, {**row, "gold": 1}, MC)
    assert model.batches[-1][0] == 2  # both choices in one forward


def test_multiple_choice_with_a_choice_that_is_a_token_prefix_of_another(tok):
    """The shorter choice has no scored tokens: mean loss nan, which Python's min (nanochat's) never picks
    unless it comes first, when it wins. Either way the answer is choice 0, whatever the model says."""
    for choices in (["one two", "one two three"], ["one two three", "one two"]):
        row = {"query": "Count:", "choices": choices, "gold": 0}
        rows = tokenize_prompts(tok, render_prompts([row], 0, MC)[0], "multiple_choice")
        short = ids(tok, "Count: one two")
        assert [start for _, start in rows] == [len(short), len(short)]
        for favored in choices:
            model = oracle([ids(tok, "Count: " + favored)], tok.get_vocab_size())
            assert right(model, tok, row, MC) and not right(model, tok, {**row, "gold": 1}, MC), (choices, favored)


def test_language_modeling_number_after_a_space(tok):
    """The prompt without the continuation is stripped: the delimiter's space belongs to the continuation,
    so " 8" is scored as two tokens, " " and "8", and a model must predict the space too."""
    row = {"context": "The number of legs of a spider is ", "continuation": "8"}  # trailing space: stripped
    prompts, gold = render_prompts([row], 0, LM)
    assert prompts == ["The number of legs of a spider is", "The number of legs of a spider is 8"] and gold == 0
    full, start = ids(tok, prompts[1]), len(ids(tok, "The number of legs of a spider is"))
    assert tokenize_prompts(tok, prompts, "language_modeling") == [(full, start)]
    assert [tok.decode([t]) for t in full[start:]] == [" ", "8"]  # by hand: GPT-4 split puts no space before digits
    V = tok.get_vocab_size()
    assert right(oracle([full], V), tok, row, LM)
    after_space = {tuple(full[:start + 1]): {full[start + 1]: 30.0}}  # knows "8" once the space is there ...
    assert not right(Table(after_space, V), tok, row, LM)  # ... but not the space itself: wrong
    not_the_eight = {tuple(full[:start]): {full[start]: 30.0}}
    assert not right(Table(not_the_eight, V), tok, row, LM)
    # another delimiter: its trailing space moves into the continuation the same way
    prompts, _ = render_prompts([{"context": " Who wrote Hamlet?", "continuation": "Shakespeare"}], 0, {**LM, "continuation_delimiter": "\nAnswer: "})
    assert prompts == ["Who wrote Hamlet?\nAnswer:", "Who wrote Hamlet?\nAnswer: Shakespeare"]


def test_schema_scores_the_options_common_suffix(tok):
    row = {"context_options": ["Alice gave Bob the book because she", "Bob gave Alice the book because she"],
           "continuation": "was kind.", "gold": 0}
    prompts, gold = render_prompts([row], 0, SCHEMA)
    assert prompts == ["Alice gave Bob the book because she was kind.", "Bob gave Alice the book because she was kind."]
    first, second = ids(tok, prompts[0]), ids(tok, prompts[1])
    # by hand: the options end alike, so the common suffix reaches back into them, to " the"
    suffix = tok.encode(" the book because she was kind.")
    assert first[-len(suffix):] == second[-len(suffix):] == suffix and first[-len(suffix) - 1] != second[-len(suffix) - 1]
    assert tokenize_prompts(tok, prompts, "schema") == [(first, len(first) - len(suffix)), (second, len(second) - len(suffix))]
    V = tok.get_vocab_size()
    for favored, gold_right in ((first, True), (second, False)):
        model = oracle([favored], V)
        assert right(model, tok, row, SCHEMA) == gold_right
        assert model.batches == [(2, max(len(first), len(second)))]


def test_ties_go_to_the_first_candidate(tok):
    row = {"query": "Pick:", "choices": ["left", "right"], "gold": 0}
    assert right(Table({}, tok.get_vocab_size()), tok, row, MC)  # uniform model: equal mean losses
    assert not right(Table({}, tok.get_vocab_size()), tok, {**row, "gold": 1}, MC)


# ---- order, subsets and few-shot draws -------------------------------------------------------------------

def test_examples_are_shuffled_with_seed_1337_before_the_subset():
    rows = [{"id": i} for i in range(10)]
    # random.Random(1337).shuffle(list(range(10))) is [0, 3, 7, 2, 1, 6, 4, 5, 8, 9]
    assert [r["id"] for r in task_examples(rows)] == [0, 3, 7, 2, 1, 6, 4, 5, 8, 9]
    assert [r["id"] for r in task_examples(rows, 4)] == [0, 3, 7, 2]
    assert [r["id"] for r in rows] == list(range(10))  # the caller's list is left alone
    order = list(range(500))
    random.Random(1337).shuffle(order)
    assert [r["id"] for r in task_examples([{"id": i} for i in range(500)], 20)] == order[:20]


def test_fewshot_draws_for_a_given_index():
    # random.Random(1234 + i).sample(the other indices, k), worked out once and pinned
    assert fewshot_indices(10, 3, 3) == [2, 7, 9]
    assert fewshot_indices(10, 0, 3) == [8, 2, 1]
    assert fewshot_indices(5, 2, 2) == [4, 3]
    assert fewshot_indices(4, 1, 2) == [3, 2]
    for i in range(30):
        assert fewshot_indices(30, i, 10) == random.Random(1234 + i).sample([j for j in range(30) if j != i], 10)
    assert fewshot_indices(4, 1, 10) == random.Random(1235).sample([0, 2, 3], 3)  # fewer others than shots: all of them


def test_fewshot_prompts_render_as_nanochat():
    """Each shot is its context, the delimiter, its gold continuation and a blank line, in draw order."""
    lm = [{"context": f"  Fact {i}: item{i} is ", "continuation": f"value{i}"} for i in range(5)]
    prompts, _ = render_prompts(lm, 2, {**LM, "num_fewshot": 2})  # shots of index 2: [4, 3]
    assert prompts == ["Fact 4: item4 is value4\n\nFact 3: item3 is value3\n\nFact 2: item2 is",
                       "Fact 4: item4 is value4\n\nFact 3: item3 is value3\n\nFact 2: item2 is value2"]
    mc = [{"query": f"Q{i}", "choices": [f"wrong{i}", f"right{i}"], "gold": 1} for i in range(4)]
    prompts, gold = render_prompts(mc, 1, {**MC, "num_fewshot": 2, "continuation_delimiter": "\nAnswer: "})  # shots [3, 2]
    assert gold == 1 and prompts == ["Q3\nAnswer: right3\n\nQ2\nAnswer: right2\n\nQ1\nAnswer: wrong1",
                                     "Q3\nAnswer: right3\n\nQ2\nAnswer: right2\n\nQ1\nAnswer: right1"]
    schema = [{"context_options": [f"bad{i}", f"good{i}"], "continuation": f"end{i}", "gold": 1} for i in range(4)]
    prompts, _ = render_prompts(schema, 1, {**SCHEMA, "num_fewshot": 2})
    assert prompts == ["good3 end3\n\ngood2 end2\n\nbad1 end1", "good3 end3\n\ngood2 end2\n\ngood1 end1"]


# ---- length, batching, an independent reference ------------------------------------------------------------

def test_cropping_only_for_a_model_that_declares_a_hard_context(tok):
    context = " ".join(f"word{i}" for i in range(200)) + " and the answer is"
    row = {"context": context, "continuation": "forty two"}
    full = ids(tok, context + " forty two")
    scored = len(full) - len(ids(tok, context))
    (cropped, start), = crop(tokenize_prompts(tok, render_prompts([row], 0, LM)[0], "language_modeling"), 16)
    assert cropped == full[-16:] and cropped[start:] == full[-scored:]
    model = oracle([full[-16:]], tok.get_vocab_size(), max_seq_len=16)
    assert right(model, tok, row, LM) and model.batches == [(1, 16)]
    # a model with no max_seq_len (our GPT, like nanochat's) gets the whole prompt
    model = oracle([full], tok.get_vocab_size())
    assert right(model, tok, row, LM) and model.batches == [(1, len(full))]


def reference_correct(model, tok, data, task, i):
    """nanochat's definition written out again, independently and without batching: one forward per prompt."""
    item, d, k = data[i], task["continuation_delimiter"], task["num_fewshot"]
    shots = [data[j] for j in random.Random(1234 + i).sample([j for j in range(len(data)) if j != i], k)]
    kind = task["task_type"]
    if kind == "multiple_choice":
        prefix = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        seqs = [ids(tok, prefix + item["query"] + d + c) for c in item["choices"]]
        n = 0
        while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
            n += 1
        spans = [(n, len(s)) for s in seqs]
    elif kind == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        seqs = [ids(tok, prefix + o + d + item["continuation"]) for o in item["context_options"]]
        n = 0
        while all(len(s) > n for s in seqs) and len({s[-1 - n] for s in seqs}) == 1:
            n += 1
        spans = [(len(s) - n, len(s)) for s in seqs]
    else:
        prefix = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
        base = prefix + item["context"].strip() + d
        seqs = [ids(tok, base + item["continuation"])]
        spans = [(len(ids(tok, base.strip())), len(seqs[0]))]
    mean_losses, all_argmax = [], []
    for s, (a, b) in zip(seqs, spans):
        with torch.no_grad():
            logits = model(torch.tensor([s]))[0]
        target = torch.tensor(s[a:b])
        mean_losses.append(F.cross_entropy(logits[a - 1:b - 1], target).item())
        all_argmax.append(bool((logits[a - 1:b - 1].argmax(-1) == target).all()))
    if kind == "language_modeling":
        return all_argmax[0]
    return mean_losses.index(min(mean_losses)) == item.get("gold")


def test_batched_scoring_equals_an_unbatched_reference_on_real_tasks(tok):
    torch.manual_seed(0)
    model = create_model(GPTConfig.from_depth(2, tok.get_vocab_size(), 64, head_dim=32), "cpu").eval()
    bundle = get_eval_bundle()
    tasks = {t["label"]: t for t in load_core_tasks(bundle)}
    # the 3 types, 0-shot and few-shot (3 shots instead of 10: 10 need 11 examples and long prompts, slow here)
    for label, shots in (("copa", 0), ("commonsense_qa", 3), ("winograd", 0), ("lambada_openai", 0), ("bigbench_qa_wikidata", 3)):
        task = {**tasks[label], "num_fewshot": shots}
        data = task_examples(load_task_data(bundle, task), 6)
        expected = [reference_correct(model, tok, data, task, i) for i in range(len(data))]
        examples = []
        for i in range(len(data)):
            prompts, gold = render_prompts(data, i, task)
            examples.append((tokenize_prompts(tok, prompts, task["task_type"]), gold))
        # one example per forward, all in one; MC prefixes through a KV cache (10-shot prompts) or not
        for batch_tokens, shared_prefix_min in ((1, 10**9), (10**6, 10**9), (10**6, 1)):
            assert score_examples(model, examples, task["task_type"], "cpu", batch_tokens, shared_prefix_min) == expected, \
                (label, batch_tokens, shared_prefix_min)
        assert count_correct(model, tok, data, task, "cpu", range(len(data))) == (sum(expected), len(data))


def test_chunks_are_dealt_to_workers_whole():
    assert shard_indices(20, 0, 1) == list(range(20))
    assert shard_indices(20, 0, 2) == list(range(8)) + list(range(16, 20)) and shard_indices(20, 1, 2) == list(range(8, 16))
    assert shard_indices(5, 1, 2, offset=1) == list(range(5)) and shard_indices(5, 0, 2, offset=1) == []
    for world in (1, 2, 3):
        shards = [shard_indices(37, w, world, offset=2) for w in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(37))


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
    assert result["tasks"]["a"] == {"accuracy": 0.625, "centered": pytest.approx(0.5), "n": 8, "correct": 5}
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

def _questions(tok):
    data = [{"query": f"Question {i}:", "choices": ["yes", "no"], "gold": i % 2} for i in range(21)]
    # the model favors the gold answer of examples 0-14 and the other answer of 15-20: 15 of 21 right
    favored = [ids(tok, f"Question {i}: {'yes' if (i % 2 == 0) == (i < 15) else 'no'}") for i in range(21)]
    return data, oracle(favored, tok.get_vocab_size())


def _two_rank_task(rank, world_size, tokenizer_dir):
    tok = Tokenizer.from_directory(tokenizer_dir)
    data, model = _questions(tok)
    assert count_correct(model, tok, data, MC, "cpu", range(21)) == (15, 21)
    from nanochat.core_eval import count_task
    assert count_task(model, tok, data, MC, "cpu") == (15, 21)
    assert sum(b for b, _ in model.batches) == 2 * 21 + 2 * len(shard_indices(21, rank, world_size))  # then only its share


def test_count_task_splits_chunks_over_ranks_and_sums(small_tokenizer):
    tok, tokenizer_dir = small_tokenizer
    data, model = _questions(tok)
    assert evaluate_task(model, tok, data, MC, "cpu") == pytest.approx(15 / 21)  # over the shuffled order: the same count
    order = list(range(21))
    random.Random(1337).shuffle(order)  # the 5 examples scored are the first 5 of this order
    assert evaluate_task(model, tok, data, MC, "cpu", max_per_task=5) == pytest.approx(sum(i < 15 for i in order[:5]) / 5)
    run_gloo(_two_rank_task, 2, str(tokenizer_dir))


# ---- base_eval over Ray ------------------------------------------------------------------------------

def test_base_eval_over_ray_equals_in_process(ray_cluster, small_tokenizer):
    """Two Ray workers give the in-process evaluate_core's counts exactly, task by task, and the bits per
    byte computed in process on the same rows (packed, and nanochat's way) over the same tokens."""
    from nanochat.loss_eval import evaluate_bpb, sequential_batches
    from nanochat.tokenizer import get_token_bytes
    from ray_jobs import base_eval
    from ray_jobs.data import val_batches
    tok, _ = small_tokenizer
    tok.save(get_tokenizer_dir())
    torch.manual_seed(0)
    model = create_model(GPTConfig.from_depth(2, tok.get_vocab_size(), 128, head_dim=32), "cpu").eval()
    save_checkpoint(checkpoint_dir("base", "tiny"), 7, model, meta={"phase": "base"}, tokenizer_fingerprint=tok.fingerprint())
    args = base_eval.parser.parse_args(["--max-per-task", "4", "--num-workers", "2", "--device", "cpu", "--cpus-per-worker", "1",
                                        "--eval-tokens", "2048", "--device-batch-size", "2"])
    result = base_eval.main(args)
    local = evaluate_core(model, tok, get_eval_bundle(), "cpu", max_per_task=4)
    assert result["tag"] == "tiny" and result["step"] == 7 and len(result["tasks"]) == 22
    assert {k: (r["correct"], r["n"]) for k, r in result["tasks"].items()} == {k: (r["correct"], r["n"]) for k, r in local["tasks"].items()}
    assert result["CORE"] == local["CORE"]
    steps = 2048 // (2 * 128)
    token_bytes = get_token_bytes()
    assert result["bpb_tokens"] == steps * 2 * 128
    assert result["val_bpb_packed"] == pytest.approx(evaluate_bpb(model, val_batches(2, 128, get_tokenizer_dir()), steps, token_bytes), rel=1e-6)
    assert result["val_bpb_nanochat"] == pytest.approx(evaluate_bpb(model, sequential_batches(tok, 2, 128), steps, token_bytes), rel=1e-6)
    assert result["val_bpb_packed"] != result["val_bpb_nanochat"]  # different rows: two numbers, both reported
    with open(result["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert Path(result["csv"]).name == "core_tiny_000007.csv"
    assert len(rows) == 23 and [r["task"] for r in rows[:22]] == list(result["tasks"]) and rows[22]["task"] == "CORE"
    assert [int(r["correct"]) for r in rows[:22]] == [r["correct"] for r in local["tasks"].values()] and int(rows[22]["n"]) == 88
    assert float(rows[22]["centered"]) == pytest.approx(local["CORE"], abs=1e-6)
    section = base_eval.report_section(result, args)
    assert section["results"]["CORE"] == result["CORE"] and section["results"]["val_bpb_nanochat"] == result["val_bpb_nanochat"]
    assert set(section["definitions"]) == {"CORE", "val_bpb_packed", "val_bpb_nanochat"}


def test_base_eval_names_unknown_tasks(small_tokenizer):
    from ray_jobs import base_eval
    tok, _ = small_tokenizer
    tok.save(get_tokenizer_dir())
    model = create_model(GPTConfig.from_depth(2, tok.get_vocab_size(), 64, head_dim=32), "cpu")
    save_checkpoint(checkpoint_dir("base", "tiny"), 1, model, meta={"phase": "base"}, tokenizer_fingerprint=tok.fingerprint())
    with pytest.raises(ValueError, match=r"--tasks: unknown task\(s\) \['mmlu'\]"):
        base_eval.main(base_eval.parser.parse_args(["--tasks", "copa,mmlu"]))


# ---- bits per byte, nanochat's rows -----------------------------------------------------------------------

def test_sequential_batches_cut_the_document_stream_as_nanochats_seed(tmp_path, monkeypatch):
    from itertools import islice

    from nanochat.loss_eval import sequential_batches
    from pretrain_files import byte_tokenizer, make_pretrain_dir
    _, docs = make_pretrain_dir(tmp_path, num_files=2, docs_per_file=30, row_group_size=10)
    monkeypatch.setenv("NANOCHAT_MIRROR", str(tmp_path))
    tok = byte_tokenizer()
    val_docs = [docs[i] for i in range(30, 60)]  # the last file is the validation shard, row groups of 10 docs
    B, T = 3, 16

    def expected(texts, n):  # by hand: BOS (256) + bytes of each document, one stream, windows of B*T + 1
        stream = [t for text in texts for t in [256] + list(text.encode())]
        return [(stream[k * (B * T + 1):(k + 1) * (B * T + 1) - 1], stream[k * (B * T + 1) + 1:(k + 1) * (B * T + 1)]) for k in range(n)]

    got = [(x.reshape(-1).tolist(), y.reshape(-1).tolist()) for x, y in islice(sequential_batches(tok, B, T), 40)]
    assert got[:20] == expected(val_docs, 20)
    assert got[0][0][T] == got[0][1][T - 1]  # row 1 starts where row 0's targets end: consecutive rows
    # rank 1 of 2 reads row groups 1, 3, ...: here the second, docs 40-49
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = [(x.reshape(-1).tolist(), y.reshape(-1).tolist()) for x, y in islice(sequential_batches(tok, B, T), 5)]
    assert got == expected(val_docs[10:20], 5)
