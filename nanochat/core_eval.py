"""CORE: a base model's in-context learning score over the 22 tasks of the DCLM eval bundle.

The bundle (eval_bundle.zip) holds `core.yaml` (one entry per task: label, dataset_uri, num_fewshot,
icl_task_type, continuation_delimiter), `eval_meta_data.csv` (each task's random-guess accuracy, in
percent) and `eval_data/**.jsonl`. Every example is scored by the model's losses, no sampling:

  multiple_choice    {"query", "choices", "gold"}: one context, several continuations. The choice whose
                     continuation tokens have the lowest mean loss is the model's answer.
  schema             {"context_options", "continuation", "gold"}: several contexts, one continuation.
                     The context under which the continuation has the lowest mean loss is the answer.
  language_modeling  {"context", "continuation"}: right when the greedy (argmax) prediction of every
                     continuation token is that token.

A prompt is `num_fewshot` solved examples of the same task (drawn with a fixed seed, never the example
itself), each followed by a blank line, then the example: context + continuation_delimiter +
continuation. The candidates of one example go through the model as one batch. Accuracy is centered
on the task's random baseline, (acc - b) / (1 - b), so guessing scores 0 and a perfect model 1;
CORE is the mean of the centered accuracies.

Plain torch: under torch.distributed each rank scores examples rank::world_size and the counts are
summed with all_reduce. Never imports ray.
"""
import csv
import json
import logging
import os
import random
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanochat.common import get_base_dir, get_mirror_dir

logger = logging.getLogger("nanochat.core_eval")

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_ZIP = "eval_bundle.zip"
BUNDLE_DIR = "eval_bundle"  # the folder inside the zip, and its place under the base dir
FEWSHOT_SEED = 1234  # few-shot draws and --max-per-task subsets: the same for every run and rank
EXAMPLE_DELIMITER = "\n\n"
DEFAULT_CONTINUATION_DELIMITER = " "
# the fields a row of each task type must have, and their types
ROW_FIELDS = {
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "language_modeling": {"context": str, "continuation": str},
}


class CoreEvalError(ValueError):
    """A missing or corrupt eval bundle, or a malformed task file (named in the message)."""


# ---- the bundle on disk ------------------------------------------------------------------------------

def get_eval_bundle(download=None, base_dir=None) -> Path:
    """The unzipped bundle, <base>/eval_bundle/, unzipped on first use from $NANOCHAT_MIRROR/eval_bundle.zip
    when the mirror is set (no network), else from <base>/eval_bundle.zip, which `download(url, path)`
    fetches first when it is missing (nanochat itself makes no requests: the caller passes a downloader)."""
    base = Path(base_dir or get_base_dir())
    target = base / BUNDLE_DIR
    if target.is_dir():  # only ever appears whole: extract_bundle renames it into place
        return target
    mirror = get_mirror_dir()
    zip_path = (mirror or base) / BUNDLE_ZIP
    if not zip_path.is_file():
        if mirror is not None:
            raise CoreEvalError(f"{zip_path} is missing: the mirror ($NANOCHAT_MIRROR) has no eval bundle")
        if download is None:
            raise CoreEvalError(f"{zip_path} is missing: download {BUNDLE_URL} there")
        base.mkdir(parents=True, exist_ok=True)
        download(BUNDLE_URL, zip_path)
    try:
        return extract_bundle(zip_path, target)
    except CoreEvalError:
        if mirror is None and download is not None:
            zip_path.unlink(missing_ok=True)  # a damaged download: the next run fetches it again
            logger.warning("removed the damaged %s; the next run downloads it again", zip_path)
        raise


def extract_bundle(zip_path, target) -> Path:
    """Unzip the bundle's eval_bundle/ folder to `target` atomically: extract beside it, then rename."""
    zip_path, target = Path(zip_path), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(tmp)  # checks every member's CRC; names with .. or / are made safe
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise CoreEvalError(f"{zip_path} is corrupt or unreadable ({type(e).__name__}: {e})") from None
        inner = tmp / BUNDLE_DIR
        for name in ("core.yaml", "eval_meta_data.csv", "eval_data"):
            if not (inner / name).exists():
                raise CoreEvalError(f"{zip_path} is not an eval bundle: it has no {BUNDLE_DIR}/{name}")
        try:
            os.rename(inner, target)
        except OSError:
            if not target.is_dir():
                raise
            # another process (a second eval worker) unzipped it first: use theirs
        logger.info("unzipped %s to %s", zip_path, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_core_tasks(bundle_dir) -> list[dict]:
    """The tasks of core.yaml, each a dict: label, task_type, dataset_uri, num_fewshot,
    continuation_delimiter, random_baseline (percent, from eval_meta_data.csv), expected_rows (the CSV's
    #datapoints, informative only: it is wrong for arc_challenge)."""
    bundle_dir = Path(bundle_dir)
    yaml_path, csv_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for path in (yaml_path, csv_path):
        if not path.is_file():
            raise CoreEvalError(f"{path} is missing: the eval bundle in {bundle_dir} is incomplete")
    try:
        entries = yaml.safe_load(yaml_path.read_text())["icl_tasks"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise CoreEvalError(f"{yaml_path} is not a CORE task list ({type(e).__name__}: {e})") from None
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            meta = {row["Eval Task"]: row for row in csv.DictReader(f)}
    except (csv.Error, KeyError, UnicodeDecodeError) as e:
        raise CoreEvalError(f"{csv_path} is not readable ({type(e).__name__}: {e})") from None
    tasks = []
    for i, entry in enumerate(entries):
        try:
            label, task_type = entry["label"], entry["icl_task_type"]
            shots = entry.get("num_fewshot", [0])
            task = {
                "label": label,
                "task_type": task_type,
                "dataset_uri": entry["dataset_uri"],
                "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
                "continuation_delimiter": entry.get("continuation_delimiter", DEFAULT_CONTINUATION_DELIMITER),
                "random_baseline": float(meta[label]["Random baseline"]),
                "expected_rows": int(meta[label]["#datapoints"]),
            }
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CoreEvalError(f"{yaml_path}: task #{i} ({entry.get('label', '?') if isinstance(entry, dict) else entry!r}) "
                                f"is incomplete or has no row in {csv_path.name} ({type(e).__name__}: {e})") from None
        if task_type not in ROW_FIELDS:
            raise CoreEvalError(f"{yaml_path}: task {label} has unknown icl_task_type {task_type!r}")
        tasks.append(task)
    return tasks


def load_task_data(bundle_dir, task) -> list[dict]:
    """The examples of one task, every row checked against its task type (errors name file and line)."""
    path = Path(bundle_dir) / "eval_data" / task["dataset_uri"]
    if not path.is_file():
        raise CoreEvalError(f"{path} is missing: the eval bundle is incomplete (task {task['label']})")
    with open(path, encoding="utf-8") as f:
        rows = [parse_row(line, task["task_type"], f"{path}:{n}") for n, line in enumerate(f, 1) if line.strip()]
    if not rows:
        raise CoreEvalError(f"{path} holds no examples")
    return rows


def parse_row(line, task_type, where) -> dict:
    """One JSONL line as a row of this task type; anything else is an error naming `where` (file:line)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CoreEvalError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise CoreEvalError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field, kind in ROW_FIELDS[task_type].items():
        if not isinstance(row.get(field), kind) or isinstance(row.get(field), bool):
            raise CoreEvalError(f"{where}: {task_type} row needs {field!r} ({kind.__name__}), got {row.get(field)!r:.80}")
    options = row.get("choices", row.get("context_options"))
    if options is not None:
        if len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise CoreEvalError(f"{where}: needs at least 2 options, all strings, got {options!r:.80}")
        if not 0 <= row["gold"] < len(options):
            raise CoreEvalError(f"{where}: gold {row['gold']} is out of range for {len(options)} options")
    return row


# ---- prompts and tokens ------------------------------------------------------------------------------

def candidates(row, task_type):
    """(context, continuation) pairs the model chooses between, and the index of the right one."""
    if task_type == "multiple_choice":
        return [(row["query"], choice) for choice in row["choices"]], row["gold"]
    if task_type == "schema":
        return [(option, row["continuation"]) for option in row["context_options"]], row["gold"]
    return [(row["context"], row["continuation"])], 0


def join_context(context, delimiter):
    # a context that already ends in whitespace ("Answer: ") would double the delimiter's leading space
    if delimiter[:1].isspace():
        context = context.rstrip()
    return context + delimiter


def fewshot_indices(num_examples, index, num_fewshot, seed=FEWSHOT_SEED) -> list[int]:
    """num_fewshot distinct indices other than `index`, the same on every run and every rank."""
    rng = random.Random(seed + index)
    k = min(num_fewshot, num_examples - 1)
    return [j + (j >= index) for j in rng.sample(range(num_examples - 1), k)]  # skip over `index` itself


def render_example(data, index, task) -> tuple[list[tuple[str, str]], int]:
    """The prompts of example `index`: (context with few-shot prefix, continuation) pairs, and the gold index."""
    task_type, delimiter = task["task_type"], task["continuation_delimiter"]
    prefix = ""
    for j in fewshot_indices(len(data), index, task["num_fewshot"]):
        pairs, gold = candidates(data[j], task_type)
        context, continuation = pairs[gold]
        prefix += join_context(context, delimiter) + continuation + EXAMPLE_DELIMITER
    pairs, gold = candidates(data[index], task_type)
    return [(prefix + join_context(context, delimiter), continuation) for context, continuation in pairs], gold


def tokenize_pairs(tokenizer, pairs, max_len=None) -> list[tuple[list[int], int]]:
    """(ids, start) per pair: the ids of BOS + context + continuation, where ids[start:] is the continuation.

    The continuation starts where the tokens of the whole text first differ from those of the context
    alone: BPE may merge the context's trailing space into the continuation's first word, and that
    merged token belongs to the continuation. Longer than max_len: cropped from the left."""
    bos = tokenizer.get_bos_token_id()
    contexts = tokenizer.encode([context for context, _ in pairs], prepend=bos)
    fulls = tokenizer.encode([context + continuation for context, continuation in pairs], prepend=bos)
    out = []
    for ctx, ids in zip(contexts, fulls):
        start = 0
        while start < min(len(ctx), len(ids)) and ctx[start] == ids[start]:
            start += 1
        start = min(start, len(ids) - 1)  # an empty continuation still scores its last token
        if max_len is not None and len(ids) > max_len:
            cut = len(ids) - max_len
            ids, start = ids[cut:], max(1, start - cut)  # keep the continuation; the first token has no predictor
        out.append((ids, start))
    return out


# ---- scoring -----------------------------------------------------------------------------------------

@torch.inference_mode()
def score_rows(model, rows, task_type, gold, device) -> bool:
    """One forward over the (ids, start) rows of an example (padded on the right, which a causal model
    never sees); True when the model gets the example right."""
    width = max(len(ids) for ids, _ in rows)
    batch = torch.full((len(rows), width), rows[0][0][0], dtype=torch.long)
    for b, (ids, _) in enumerate(rows):
        batch[b, :len(ids)] = torch.tensor(ids)
    batch = batch.to(device)
    logits = model(batch)  # stays on the device: only the continuation positions are read below
    losses = []
    for b, (ids, start) in enumerate(rows):
        # the logits at position t predict token t + 1
        predicted, targets = logits[b, start - 1:len(ids) - 1].float(), batch[b, start:len(ids)]
        if task_type == "language_modeling":
            return bool((predicted.argmax(dim=-1) == targets).all())
        losses.append(F.cross_entropy(predicted, targets).item())  # mean over the continuation's tokens
    return min(range(len(losses)), key=losses.__getitem__) == gold  # ties go to the first


def model_max_len(model):
    """The model's context length (GPT.config.sequence_len), or None for models that do not say."""
    return getattr(getattr(model, "config", None), "sequence_len", None)


def example_indices(num_examples, max_per_task=-1, seed=FEWSHOT_SEED) -> list[int]:
    """The examples to score: all, or a fixed random subset of max_per_task (task files are often sorted
    by category, so the first N would not be representative)."""
    if max_per_task is None or max_per_task < 0 or max_per_task >= num_examples:
        return list(range(num_examples))
    return random.Random(seed).sample(range(num_examples), max_per_task)


def count_correct(model, tokenizer, data, task, device, indices) -> tuple[int, int]:
    """(right answers, examples) over data[i] for i in indices."""
    max_len = model_max_len(model)
    correct = 0
    for i in indices:
        pairs, gold = render_example(data, i, task)
        correct += score_rows(model, tokenize_pairs(tokenizer, pairs, max_len), task["task_type"], gold, device)
    return correct, len(indices)


def count_task(model, tokenizer, data, task, device, max_per_task=-1) -> tuple[int, int]:
    """(right answers, examples) on one task. Under torch.distributed every rank scores its share
    rank::world_size of the examples and every rank gets the totals."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    indices = example_indices(len(data), max_per_task)
    correct, n = count_correct(model, tokenizer, data, task, device, indices[rank::world])
    if world > 1:
        counts = torch.tensor([correct, n], dtype=torch.long, device=device)
        dist.all_reduce(counts)
        correct, n = counts.tolist()
    return correct, n


def evaluate_task(model, tokenizer, data, task_meta, device, max_per_task=-1) -> float:
    """Accuracy of the model on one task: a task dict of load_core_tasks and its rows (load_task_data)."""
    correct, n = count_task(model, tokenizer, data, task_meta, device, max_per_task)
    return correct / n


def centered_accuracy(accuracy, random_baseline) -> float:
    """0 at chance, 1 when perfect; random_baseline is in percent, as in eval_meta_data.csv."""
    chance = 0.01 * random_baseline
    return (accuracy - chance) / (1.0 - chance)


def summarize(counts, tasks) -> dict:
    """{"CORE": mean centered accuracy, "tasks": {label: {accuracy, centered, n}}} from {label: (correct, n)}."""
    results = {}
    for task in tasks:
        if task["label"] in counts:
            correct, n = counts[task["label"]]
            accuracy = correct / n if n else 0.0
            results[task["label"]] = {"accuracy": accuracy, "centered": centered_accuracy(accuracy, task["random_baseline"]), "n": n}
    core = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    return {"CORE": core, "tasks": results}


def evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=-1, labels=None) -> dict:
    """CORE of a model over the bundle's tasks (all, or those in `labels`), distributed-aware like
    evaluate_task. Returns summarize()'s dict."""
    tasks = [t for t in load_core_tasks(bundle_dir) if labels is None or t["label"] in labels]
    counts = {}
    for task in tasks:
        correct, n = count_task(model, tokenizer, load_task_data(bundle_dir, task), task, device, max_per_task)
        counts[task["label"]] = (correct, n)
        logger.info("%s: accuracy %.4f over %d examples", task["label"], correct / n, n)
    return summarize(counts, tasks)
