"""CORE: a base model's in-context learning score over the 22 tasks of the DCLM eval bundle, computed
exactly as nanochat computes it (DCLM's definition as nanochat implements it), so that the number reads
against nanochat's published ones: GPT-2 0.2565, nanochat d20 0.2219.

The bundle (eval_bundle.zip) holds `core.yaml` (one entry per task: label, dataset_uri, num_fewshot,
icl_task_type, continuation_delimiter, default " "), `eval_meta_data.csv` (each task's "Random baseline"
accuracy, in percent) and `eval_data/**.jsonl`. Row formats:

  multiple_choice    {"query", "choices", "gold"}      one context, several continuations
  schema             {"context_options", "continuation", "gold"}   several contexts, one continuation
  language_modeling  {"context", "continuation"}

The definition, step by step (d = the task's continuation delimiter):

  1. Order. A task's rows are shuffled with random.Random(1337); --max-per-task N keeps the first N of
     that order. "The examples" below are this (cropped) list, and i an index into it.
  2. Few-shot. Example i is preceded by k = num_fewshot solved examples, indices
     random.Random(1234 + i).sample([j for j in range(n) if j != i], k), in that order, each rendered
     as its context + d + its gold continuation + "\n\n". (The separator is a blank line: nanochat's
     Jinja template puts one after every shot. With fewer than k other examples, which only a tiny
     --max-per-task gives, all of them are used where nanochat would stop with an error.)
  3. Prompts (P = the few-shot prefix):
       multiple_choice: one per choice, P + query + d + choice; few-shot contexts are the queries.
       schema: one per context option, P + option + d + continuation; few-shot contexts are the gold options.
       language_modeling: with = P + context.strip() + d + continuation, without = (P + context.strip()
         + d).strip(); few-shot contexts are stripped too. The second strip moves the delimiter's
         trailing space into the continuation: " 42" is scored as " " and "42" (when BPE splits them so).
  4. Tokens: BOS + the prompt, encoded whole. The scored tokens are
       multiple_choice: those after the longest prefix common to the token sequences of all choices;
       schema: the longest suffix common to the token sequences of all options;
       language_modeling: those of `with` past the tokens of `without`.
  5. Length. A model that declares a hard context (a `max_seq_len` attribute, as nanochat's wrapper of
     GPT-2 does at 1024) gets longer sequences cropped from the left, the scored span moving with them.
     Our GPT, like nanochat's, declares none (its rotary tables grow), so its prompts go in whole;
     `max_len` overrides.
  6. Decision. multiple_choice and schema: the candidate with the lowest mean cross-entropy over its
     scored tokens is the answer, right when it is gold; ties go to the first, and a candidate with no
     scored tokens (a choice whose tokens are a prefix of another's: piqa has a few) has mean loss nan,
     which is never picked unless it is the first candidate, which then wins (Python's min, as nanochat
     uses it). language_modeling: right when the argmax prediction of every scored token is that token.
  7. Score. Per task, accuracy centered on the random baseline b (percent): (acc - 0.01 b) / (1 - 0.01 b),
     0 at chance and 1 when perfect. CORE is the mean of the 22 centered accuracies.

Batching (not part of the definition: right padding is invisible to a causal model, and a KV cache
computes the same attention). The examples are cut into chunks of CHUNK_EXAMPLES consecutive indices. A
multiple-choice example whose choices share at least SHARED_PREFIX_MIN tokens (the few-shot ones) sends
that prefix through the model once, into a KV cache that every choice continues from: the 22 tasks hold
~2.3x fewer tokens that way. On a GPU the other examples of a chunk go through in as few right-padded
forwards of at most BATCH_TOKENS tokens as fit; on the CPU each goes alone (in bench/core_eval.py padded
batches of several examples were slower there, by 1.2x to 4x on a shared 2-core machine: the work on the
whole (rows, width, vocab) logits is memory-bound). A worker takes whole chunks, so every row is computed the same way however many workers
share the task.

Plain torch: under torch.distributed each rank scores its chunks and the counts are summed with
all_reduce. Never imports ray.
"""
import csv
import json
import inspect
import logging
import math
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


# ---- the definition: order, few-shot draws, prompts, scored tokens -----------------------------------

SHUFFLE_SEED = 1337  # the order of a task's examples, before --max-per-task takes the first N
FEWSHOT_SEED = 1234  # example i draws its shots with random.Random(FEWSHOT_SEED + i)
EXAMPLE_DELIMITER = "\n\n"  # after every few-shot example
CHUNK_EXAMPLES = 8  # consecutive examples scored together (and the unit of work split over workers)
BATCH_TOKENS = 8192  # on a GPU, at most this many (padded) tokens per forward
SHARED_PREFIX_MIN = 256  # choices sharing this many tokens: the prefix goes through the model once
CORE_DEFINITION = ("nanochat's CORE (DCLM's 22 tasks as nanochat scores them: examples shuffled with seed 1337, "
                   "few-shot draws Random(1234+i), choices scored past their common token prefix, mean of "
                   "accuracies centered on each task's random baseline); compare with GPT-2 0.2565, nanochat d20 0.2219")


def task_examples(rows, max_per_task=-1) -> list:
    """The examples of a task as CORE sees them: shuffled with random.Random(SHUFFLE_SEED), then the first
    max_per_task (all when max_per_task < 0). Few-shot draws index this list."""
    rows = list(rows)
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows if max_per_task is None or max_per_task < 0 else rows[:max_per_task]


def fewshot_indices(num_examples, index, num_fewshot) -> list[int]:
    """random.Random(FEWSHOT_SEED + index).sample of the other indices: num_fewshot of them (or all the
    others when there are fewer)."""
    others = [j for j in range(num_examples) if j != index]
    return random.Random(FEWSHOT_SEED + index).sample(others, min(num_fewshot, len(others)))


def solved(row, task_type) -> tuple[str, str]:
    """(context, gold continuation) of a row shown as a few-shot example."""
    if task_type == "multiple_choice":
        return row["query"], row["choices"][row["gold"]]
    if task_type == "schema":
        return row["context_options"][row["gold"]], row["continuation"]
    return row["context"].strip(), row["continuation"]


def render_prompts(data, index, task) -> tuple[list[str], int]:
    """The prompts of example `index` and its gold index. multiple_choice: one per choice; schema: one
    per context option; language_modeling: [without, with] the continuation (gold 0)."""
    task_type, delimiter = task["task_type"], task["continuation_delimiter"]
    shots = [solved(data[j], task_type) for j in fewshot_indices(len(data), index, task["num_fewshot"])]
    prefix = "".join(context + delimiter + continuation + EXAMPLE_DELIMITER for context, continuation in shots)
    row = data[index]
    if task_type == "multiple_choice":
        return [prefix + row["query"] + delimiter + choice for choice in row["choices"]], row["gold"]
    if task_type == "schema":
        return [prefix + option + delimiter + row["continuation"] for option in row["context_options"]], row["gold"]
    without = prefix + row["context"].strip() + delimiter
    return [without.strip(), without + row["continuation"]], 0


def common_length(sequences, from_end=False) -> int:
    """Length of the longest prefix (or suffix) that all the token sequences share."""
    n = 0
    for column in zip(*(reversed(s) if from_end else s for s in sequences)):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def tokenize_prompts(tokenizer, prompts, task_type) -> list[tuple[list[int], int]]:
    """(ids, start) per row to score: BOS + prompt, where ids[start:] are the scored tokens.
    language_modeling gives one row (the prompt with the continuation)."""
    seqs = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    if task_type == "multiple_choice":
        start = common_length(seqs)
        return [(ids, start) for ids in seqs]
    if task_type == "schema":
        suffix = common_length(seqs, from_end=True)
        return [(ids, len(ids) - suffix) for ids in seqs]
    without, with_continuation = seqs
    if with_continuation[:len(without)] != without:
        logger.warning("the prompt without its continuation is not a token prefix of the prompt with it: %r",
                       prompts[1][-80:])
    return [(with_continuation, len(without))]


def crop(rows, max_len) -> list[tuple[list[int], int]]:
    """Rows longer than max_len lose their first tokens; the scored span keeps its tokens (it starts at 1
    at the earliest: position 0 has no prediction)."""
    if max_len is None:
        return rows
    return [(ids[-max_len:], max(1, start - (len(ids) - max_len))) if len(ids) > max_len else (ids, start)
            for ids, start in rows]


# ---- scoring -----------------------------------------------------------------------------------------

def score_logits(logits, scored) -> tuple[list[float], list[bool]]:
    """scored[b] = (first, targets): logits[b, first + j] predicts targets[j]. Per row: the mean
    cross-entropy of its targets (nan when it has none, as in nanochat) and whether every one of them is
    the argmax prediction."""
    device = logits.device
    row_of = [b for b, (_, targets) in enumerate(scored) for _ in targets]
    pos_of = [first + j for first, targets in scored for j in range(len(targets))]
    row_of, pos_of = torch.tensor(row_of, dtype=torch.long, device=device), torch.tensor(pos_of, dtype=torch.long, device=device)
    targets = torch.tensor([t for _, ts in scored for t in ts], dtype=torch.long, device=device)
    picked = logits[row_of, pos_of].float()
    per_row = torch.zeros(3, len(scored), dtype=torch.float64, device=device)  # token count, loss sum, wrong argmax
    per_row[0].index_add_(0, row_of, torch.ones_like(targets, dtype=torch.float64))
    per_row[1].index_add_(0, row_of, F.cross_entropy(picked, targets, reduction="none").double())
    per_row[2].index_add_(0, row_of, (picked.argmax(dim=-1) != targets).double())
    counts, loss_sums, wrong = per_row.tolist()
    return [s / c if c else math.nan for s, c in zip(loss_sums, counts)], [w == 0 for w in wrong]


def right_padded(sequences, device):
    """(len, width) int64 batch, padded on the right with the first token (a causal model never sees it)."""
    batch = torch.full((len(sequences), max(map(len, sequences))), sequences[0][0], dtype=torch.long)
    for b, ids in enumerate(sequences):
        batch[b, :len(ids)] = torch.tensor(ids)
    return batch.to(device)


@torch.inference_mode()
def forward_rows(model, rows, device) -> tuple[list[float], list[bool]]:
    """Score (ids, start) rows in one right-padded forward (score_logits' results)."""
    logits = model(right_padded([ids for ids, _ in rows], device))
    return score_logits(logits, [(start - 1, ids[start:]) for ids, start in rows])


@torch.inference_mode()
def forward_shared_prefix(model, rows, device) -> tuple[list[float], list[bool]]:
    """The same results for rows that share their first start - 1 tokens (a multiple-choice example): the
    prefix goes through the model once into a KV cache, which every row then continues from, in one
    forward over the rest. The few-shot prefix is most of such a prompt: this is what makes CORE cheap."""
    from nanochat.engine import KVCache
    start = rows[0][1]
    prefix = KVCache.for_model(model, 1, start - 1)
    model(torch.tensor([rows[0][0][:start - 1]], device=device), kv_cache=prefix)
    cache = KVCache.for_model(model, len(rows), max(len(ids) for ids, _ in rows))
    cache.prefill(prefix)
    logits = model(right_padded([ids[start - 1:] for ids, _ in rows], device), kv_cache=cache)
    return score_logits(logits, [(0, ids[start:]) for ids, _ in rows])


def shares_prefix(model, rows, min_tokens=SHARED_PREFIX_MIN) -> bool:
    """Whether forward_shared_prefix is worth it for these rows: they share (uncropped) at least
    min_tokens tokens before the scored ones, and the model's forward takes a KV cache."""
    start = rows[0][1]
    return (start - 1 >= min_tokens and len(rows) > 1 and all(s == start and ids[:start] == rows[0][0][:start] for ids, s in rows)
            and "kv_cache" in inspect.signature(model.forward).parameters)


def is_right(task_type, gold, mean_losses, all_right) -> bool:
    """language_modeling: every scored token predicted. Otherwise the lowest mean loss wins, with the
    semantics of Python's min as nanochat uses it: ties go to the first, a nan is never picked unless it
    is the first candidate, which then wins."""
    if task_type == "language_modeling":
        return all_right[0]
    return min(range(len(mean_losses)), key=mean_losses.__getitem__) == gold


def score_examples(model, examples, task_type, device, batch_tokens=BATCH_TOKENS, shared_prefix_min=SHARED_PREFIX_MIN) -> list[bool]:
    """examples: (rows, gold) each. An example whose rows share a long prefix (shares_prefix) is scored
    alone, prefix first; the others go through the model in order, in as few right-padded forwards of at
    most batch_tokens tokens as fit (an example is never split; a bigger one goes alone)."""
    scores, batches, rows, width = {}, [], 0, 0
    for k, (ex_rows, _) in enumerate(examples):
        if shares_prefix(model, ex_rows, shared_prefix_min):
            scores[k] = forward_shared_prefix(model, ex_rows, device)
            continue
        ex_width = max(len(ids) for ids, _ in ex_rows)
        if batches and (rows + len(ex_rows)) * max(width, ex_width) <= batch_tokens:
            batches[-1].append(k)
            rows, width = rows + len(ex_rows), max(width, ex_width)
        else:
            batches.append([k])
            rows, width = len(ex_rows), ex_width
    for batch in batches:
        mean_losses, all_right = forward_rows(model, [row for k in batch for row in examples[k][0]], device)
        for k in batch:
            n = len(examples[k][0])
            scores[k], mean_losses, all_right = (mean_losses[:n], all_right[:n]), mean_losses[n:], all_right[n:]
    return [is_right(task_type, gold, *scores[k]) for k, (_, gold) in enumerate(examples)]


def model_max_len(model):
    """The hard context limit a model declares (nanochat's convention: a `max_seq_len` attribute), or None."""
    return getattr(model, "max_seq_len", None)


def shard_indices(num_examples, shard=0, num_shards=1, offset=0, chunk=CHUNK_EXAMPLES) -> list[int]:
    """The examples a worker scores: chunk c (examples c*chunk .. c*chunk + chunk - 1) belongs to worker
    (c + offset) % num_shards. Callers pass each task's position as the offset, so that small tasks of
    one chunk do not all land on worker 0."""
    return [i for i in range(num_examples) if (i // chunk + offset) % num_shards == shard]


def default_batch_tokens(device) -> int:
    """Padded tokens per forward: BATCH_TOKENS on a GPU, one example at a time on the CPU (see the module docstring)."""
    return BATCH_TOKENS if torch.device(device).type == "cuda" else 1


def count_correct(model, tokenizer, data, task, device, indices, max_len=None, batch_tokens=None,
                  shared_prefix_min=SHARED_PREFIX_MIN) -> tuple[int, int]:
    """(right answers, examples) over data[i] for i in indices (data: task_examples()), scored chunk by
    chunk (see the module docstring: batching never changes a result). max_len: see model_max_len."""
    max_len = max_len if max_len is not None else model_max_len(model)
    task_type, indices = task["task_type"], list(indices)
    correct = 0
    chunks = {}
    for i in indices:
        chunks.setdefault(i // CHUNK_EXAMPLES, []).append(i)
    for members in chunks.values():
        examples = []
        for i in members:
            prompts, gold = render_prompts(data, i, task)
            examples.append((crop(tokenize_prompts(tokenizer, prompts, task_type), max_len), gold))
        correct += sum(score_examples(model, examples, task_type, device, batch_tokens or default_batch_tokens(device),
                                      shared_prefix_min))
    return correct, len(indices)


def count_task(model, tokenizer, data, task, device, offset=0, max_len=None) -> tuple[int, int]:
    """(right answers, examples) over all of data (task_examples() of one task). Under torch.distributed
    every rank scores its chunks (shard_indices) and every rank gets the totals."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    correct, n = count_correct(model, tokenizer, data, task, device, shard_indices(len(data), rank, world, offset), max_len)
    if world > 1:
        counts = torch.tensor([correct, n], dtype=torch.long, device=device)
        dist.all_reduce(counts)
        correct, n = counts.tolist()
    return correct, n


def evaluate_task(model, tokenizer, data, task_meta, device, max_per_task=-1) -> float:
    """Accuracy of the model on one task: a task dict of load_core_tasks and its rows (load_task_data)."""
    correct, n = count_task(model, tokenizer, task_examples(data, max_per_task), task_meta, device)
    return correct / n


def centered_accuracy(accuracy, random_baseline) -> float:
    """0 at chance, 1 when perfect; random_baseline is in percent, as in eval_meta_data.csv."""
    chance = 0.01 * random_baseline
    return (accuracy - chance) / (1.0 - chance)


def summarize(counts, tasks) -> dict:
    """{"CORE": mean centered accuracy, "tasks": {label: {accuracy, centered, n, correct}}} from
    {label: (correct, n)}."""
    results = {}
    for task in tasks:
        if task["label"] in counts:
            correct, n = counts[task["label"]]
            accuracy = correct / n if n else 0.0
            results[task["label"]] = {"accuracy": accuracy, "centered": centered_accuracy(accuracy, task["random_baseline"]),
                                      "n": n, "correct": correct}
    core = sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
    return {"CORE": core, "tasks": results}


def core_tasks(bundle_dir, labels=None) -> list[dict]:
    """The bundle's tasks in core.yaml order: all, or those in `labels`."""
    return [t for t in load_core_tasks(bundle_dir) if labels is None or t["label"] in labels]


def evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=-1, labels=None, max_len=None) -> dict:
    """CORE of a model over the bundle's tasks (all, or those in `labels`), distributed-aware like
    count_task. Returns summarize()'s dict."""
    tasks = core_tasks(bundle_dir, labels)
    counts = {}
    for position, task in enumerate(tasks):
        data = task_examples(load_task_data(bundle_dir, task), max_per_task)
        counts[task["label"]] = count_task(model, tokenizer, data, task, device, offset=position, max_len=max_len)
        logger.info("%s: accuracy %.4f over %d examples", task["label"], counts[task["label"]][0] / len(data), len(data))
    return summarize(counts, tasks)
