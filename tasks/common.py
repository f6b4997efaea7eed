"""Tasks: datasets as conversations, and how to score a model's answer to them.

A task is a sequence of conversations {"messages": [...]} (the format of nanochat.tokenizer), viewed
through a start/stop/step slice. TaskMixture shuffles several tasks together for training,
TaskSequence chains them for a curriculum. Tasks that can be scored say how, by `eval_type`:

  "categorical"  multiple choice, rendered as nanochat renders it (render_mc). The assistant's answer
                 is one letter of conversation["letters"] ("A", "B", ...). The evaluator renders the
                 prompt (tokenizer.render_for_completion), restricts the next-token logits to the ids
                 of those letters, and passes the most likely letter to evaluate().
  "generative"   the model samples a completion (text); evaluate() checks it.

evaluate(conversation, completion) -> bool; reward(conversation, completion) -> float in [0, 1] (RL).

Data files come from their public homes, downloaded once into <base_dir>/task_data/, or, when
$NANOCHAT_MIRROR is set, from the mirror only (no network request at all).
"""
import bisect
import copy
import gzip
import itertools
import json
import logging
import random
from pathlib import Path
from urllib.parse import urlparse

from nanochat.common import NanochatError, download_file, get_base_dir, get_mirror_dir
from nanochat.tokenizer import validate_conversation

logger = logging.getLogger("nanochat.tasks")


class TaskDataError(NanochatError, ValueError):
    """A task data file that is missing, cannot be downloaded, or has a malformed row (named in the message)."""


# ---- tasks --------------------------------------------------------------------------------------------

class Task:
    """Subclasses fill `self.conversations` (a list) or override num_examples() and get_example().

    start/stop/step slice the underlying examples like Python's range: len(task) and task[i] see the
    slice, num_examples() and get_example(i) do not."""

    eval_type = None  # "categorical", "generative", or None for training-only data

    def __init__(self, start=0, stop=None, step=1):
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index):
        return copy.deepcopy(self.conversations[index])  # callers may edit what they get

    def indices(self) -> range:
        return range(self.num_examples())[self.start:self.stop:self.step]

    def __len__(self):
        return len(self.indices())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get_example(j) for j in self.indices()[i]]
        return self.get_example(self.indices()[i])

    def __iter__(self):
        return (self.get_example(j) for j in self.indices())

    def evaluate(self, conversation, completion):
        raise NotImplementedError(f"{type(self).__name__} is training data only: it has no evaluate()")

    def reward(self, conversation, completion) -> float:
        """RL reward in [0, 1]: 1.0 when evaluate() accepts the completion."""
        return float(self.evaluate(conversation, completion))


class TaskMixture(Task):
    """Every example of every task, in one shuffled order fixed by `seed`. A task listed twice has each
    of its examples twice (oversampling)."""

    def __init__(self, tasks, seed=42, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.order = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.order)

    def num_examples(self):
        return len(self.order)

    def get_example(self, index):
        t, i = self.order[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """The tasks one after another, in order (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.ends = list(itertools.accumulate(len(task) for task in self.tasks))

    def num_examples(self):
        return self.ends[-1] if self.ends else 0

    def get_example(self, index):
        t = bisect.bisect_right(self.ends, index)
        return self.tasks[t][index - (self.ends[t - 1] if t else 0)]


# ---- multiple choice -----------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"


def render_mc(question, choices) -> str:
    """The user prompt of a multiple-choice question, rendered as nanochat renders it:

        Multiple Choice question: <question>
        - <choice>=A
        - <choice>=B

        Respond only with the letter of the correct answer.

    The letter comes after its choice (small models bind it better that way) with no space before it: the
    assistant answers with the bare letter, and " A" and "A" are different tokens."""
    lines = [f"Multiple Choice question: {question}"] + [f"- {choice}={letter}" for letter, choice in zip(LETTERS, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def mc_conversation(question, choices, answer_index, **extra):
    """A multiple-choice conversation: the assistant answers with a single letter, and the conversation
    carries "letters", the letters the evaluator restricts the model's choice to."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"expected 2 to {len(LETTERS)} choices, got {len(choices)}")
    if not 0 <= answer_index < len(choices):
        raise ValueError(f"answer index {answer_index} is not one of the {len(choices)} choices")
    letters = list(LETTERS[:len(choices)])
    messages = [
        {"role": "user", "content": render_mc(question, choices)},
        {"role": "assistant", "content": letters[answer_index]},
    ]
    return {"messages": messages, "letters": letters, **extra}


class MultipleChoiceTask(Task):
    """Base of ARC and MMLU: conversations made by mc_conversation()."""

    eval_type = "categorical"

    def evaluate(self, conversation, completion) -> bool:
        """True if `completion` is the answer letter (surrounding spaces and a trailing '.' are ignored)."""
        return completion.strip().rstrip(".") == conversation["messages"][-1]["content"]


def assistant_text(conversation) -> str:
    """The text parts of the conversation's last message (the reference answer of a generative task)."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] == "text")


# ---- data files -----------------------------------------------------------------------------------------

def task_data_files(mirror_name: str, urls) -> list[Path]:
    """Local paths of one split's data files. With $NANOCHAT_MIRROR set: [<mirror>/<mirror_name>], and
    no network request. Otherwise each of `urls` is downloaded once into <base_dir>/task_data/."""
    mirror = get_mirror_dir()
    if mirror is not None:
        path = mirror / mirror_name
        if not path.is_file():
            raise TaskDataError(f"{path} is not in the dataset mirror ($NANOCHAT_MIRROR)")
        return [path]
    urls = [urls] if isinstance(urls, str) else urls
    cache = get_base_dir() / "task_data"
    return [download_file(url, cache / (urlparse(url).netloc + urlparse(url).path), backoff=2.0, error=TaskDataError) for url in urls]


def read_rows(path, columns=None):
    """Yield (where, row) for every row of a .jsonl, .jsonl.gz or .parquet file; `where` names the file
    and the line (JSONL) or row (parquet), for error messages."""
    path = Path(path)
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, columns)
        return
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{path}:{lineno}: not valid JSON ({e})") from None
                yield f"{path}:{lineno}", row
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from e


def _parquet_rows(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        batches = pq.ParquetFile(path).iter_batches(columns=columns)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield f"{path}, row {n}", row
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from e


def _unreadable(path, e):
    # e.g. a download cut short, or an error page saved as data: deleting the file fetches it again
    return TaskDataError(f"{path}: unreadable ({type(e).__name__}: {e}); if it was downloaded, delete it to fetch it again")


def load_conversations(paths, convert, columns=None) -> list:
    """convert(row) -> conversation (or None to skip the row) for every row of the files, each
    validated. A bad row raises TaskDataError naming its file and line."""
    conversations = []
    for path in paths:
        for where, row in read_rows(path, columns):
            try:
                conversation = convert(row)
                if conversation is None:
                    continue
                validate_conversation(conversation)
            except KeyError as e:
                raise TaskDataError(f"{where}: missing field {e} in {str(row)[:200]}") from None
            except (TypeError, ValueError, IndexError, AttributeError) as e:
                raise TaskDataError(f"{where}: {e}") from e
            conversations.append(conversation)
    return conversations
