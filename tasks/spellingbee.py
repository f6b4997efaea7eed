"""Synthetic tasks on the letters of English words, which a BPE model cannot see directly.

SpellingBee: "How many r are in strawberry?" The assistant spells the word, counting as it goes,
checks with the python tool ('strawberry'.count('r')) and ends with "#### 3".
SimpleSpelling: "Spell strawberry" -> "s-t-r-a-w-b-e-r-r-y".

Words come from dwyl/english-words' words_alpha.txt (mirror: words/words_alpha.txt). Example i of a
split is drawn by an RNG seeded with (task, split, i): the same on every run and machine, and the
train and test splits use different draws (a word may still occur in both).
"""
import functools
import random
import re

from tasks.common import Task, assistant_text, task_data_files
from tasks.gsm8k import answer_matches

URL = "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt"
SPLITS = ("train", "test")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@functools.lru_cache(maxsize=4)
def _load_words(path) -> tuple:
    with open(path, encoding="utf-8") as f:
        words = tuple(w for w in (line.strip().lower() for line in f) if len(w) >= 3 and w.isascii() and w.isalpha())
    if not words:
        raise ValueError(f"{path}: no words")
    return words


def load_words() -> tuple:
    """The English word list: lowercase ASCII words of 3 letters or more."""
    return _load_words(task_data_files("words/words_alpha.txt", URL)[0])


class _WordTask(Task):
    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        """size: how many examples the split has (they are generated, not stored)."""
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__} split must be one of {SPLITS}, got {split!r}")
        self.size, self.split = size, split
        self.words = load_words()

    def num_examples(self):
        return self.size

    def get_example(self, index):
        if not 0 <= index < self.size:
            raise IndexError(f"{type(self).__name__} has {self.size} examples, asked for {index}")
        return self.make(random.Random(f"{type(self).__name__}-{self.split}-{index}"))


COUNT_QUESTIONS = [
    "How many {l} are in {w}?",
    "How many times does the letter {l} appear in the word {w}?",
    "How many {l}'s are there in \"{w}\"?",
    "Count the letter '{l}' in '{w}'.",
    "In the word {w}, how many times does {l} occur?",
    "how many {l} in {w}",
    "Can you count how many {l}s the word \"{w}\" has?",
    "What is the number of '{l}' letters in {w}?",
    "Tell me how often the letter {l} shows up in {w}.",
    "{w}: how many {l}?",
]


class SpellingBee(_WordTask):
    def make(self, rng):
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(ALPHABET)  # sometimes absent: count 0
        shown = letter.upper() if rng.random() < 0.2 else letter
        question = rng.choice(COUNT_QUESTIONS).format(l=shown, w=word)
        count, spelled = 0, []
        for ch in word:
            if ch == letter:
                count += 1
                spelled.append(f"{ch} ({count})")
            else:
                spelled.append(ch)
        plural = "" if count == 1 else "s"
        parts = [
            {"type": "text", "text": f"Let me spell \"{word}\" and count the {letter}'s:\n{', '.join(spelled)}\n"
                                     f"That makes {count}. Let me check with Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nThe letter '{letter}' appears {count} time{plural} in \"{word}\".\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation, completion) -> bool:
        """True if the completion's "#### <number>" is the right count."""
        return answer_matches(conversation, completion)


SPELL_QUESTIONS = [
    "Spell {w}",
    "How do you spell \"{w}\"?",
    "Spell the word {w} letter by letter.",
    "spell {w} for me",
    "Can you spell out '{w}'?",
    "What are the letters of {w}, in order?",
]


class SimpleSpelling(_WordTask):
    def make(self, rng):
        word = rng.choice(self.words)
        question = rng.choice(SPELL_QUESTIONS).format(w=word)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "-".join(word)}]}

    def evaluate(self, conversation, completion) -> bool:
        """True if the completion contains the exact dash-separated spelling (and not a longer one)."""
        reference = assistant_text(conversation)
        return re.search(rf"(?<![a-z-]){re.escape(reference)}(?![a-z-])", completion.lower()) is not None
