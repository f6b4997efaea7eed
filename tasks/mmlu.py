"""MMLU: multiple-choice questions (4 choices) on 57 subjects, from high-school to professional level.

Source: Hugging Face cais/mmlu, config "all" (parquet). Splits: "auxiliary_train" (~100k questions
from other multiple-choice datasets, for training), "dev" (5 per subject), "validation", "test".

The dataset mirror has no auxiliary_train. With $NANOCHAT_MIRROR set, "auxiliary_train" is
validation + dev instead, minus the 42 questions that MMLU itself repeats in its test split
(1,774 questions): a small stand-in that never overlaps test. Do not evaluate on validation or
dev after training on it.
"""
import logging
import random

from nanochat.common import get_mirror_dir
from tasks.common import MultipleChoiceTask, load_conversations, mc_conversation, read_rows, task_data_files

logger = logging.getLogger("nanochat.tasks")

SPLITS = ("auxiliary_train", "dev", "validation", "test")
URL = "https://huggingface.co/datasets/cais/mmlu/resolve/main/all/{split}-00000-of-00001.parquet"
MIRROR_AUX_SUBSTITUTE = ("validation", "dev")


def mmlu_conversation(row):
    if "question" not in row and isinstance(row.get("train"), dict):
        row = row["train"]  # some exports of auxiliary_train nest each row under "train"
    # the subject stays out of the prompt, as in nanochat's rendering
    return mc_conversation(row["question"], row["choices"], int(row["answer"]), subject=row.get("subject") or "")


def _files(split):
    return task_data_files(f"mmlu/mmlu_{split}.jsonl", URL.format(split=split))


class MMLU(MultipleChoiceTask):
    def __init__(self, split="test", subject=None, **kwargs):
        """subject: one of the 57 subject names (e.g. "college_physics"), or None for all."""
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"MMLU split must be one of {SPLITS}, got {split!r}")
        splits = [split]
        if split == "auxiliary_train" and get_mirror_dir() is not None:
            splits = list(MIRROR_AUX_SUBSTITUTE)
            logger.warning("the dataset mirror has no MMLU auxiliary_train: using %s instead", " + ".join(splits))
        held_out = set()  # MMLU repeats some test questions in validation/dev: keep them out of a training stand-in
        if splits != [split]:
            held_out = {row["question"] for path in _files("test") for _, row in read_rows(path)}

        def convert(row):
            return None if row.get("question") in held_out else mmlu_conversation(row)
        conversations = load_conversations([f for s in splits for f in _files(s)], convert)
        if subject is not None:
            conversations = [c for c in conversations if c["subject"] == subject]
            if not conversations:
                raise ValueError(f"MMLU {split} has no questions with subject {subject!r}")
        random.Random(42).shuffle(conversations)  # the files are sorted by subject: mix them
        self.conversations = conversations
