"""AI2 ARC: grade-school science questions, multiple choice (3 to 5 choices, mostly 4).

Source: Hugging Face allenai/ai2_arc (parquet); mirror: arc/ARC-{Easy,Challenge}-{split}.jsonl, the
same rows. The dataset labels choices "A".."E" or "1".."5"; we always show them as A, B, C, ...
"""
import random

from tasks.common import MultipleChoiceTask, load_conversations, mc_conversation, task_data_files

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")
URL = "https://huggingface.co/datasets/allenai/ai2_arc/resolve/main/{subset}/{split}-00000-of-00001.parquet"


def arc_conversation(row):
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return mc_conversation(row["question"], texts, labels.index(row["answerKey"]), id=row["id"])


class ARC(MultipleChoiceTask):
    def __init__(self, subset="ARC-Easy", split="test", **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS or split not in SPLITS:
            raise ValueError(f"ARC subset must be one of {SUBSETS} and split one of {SPLITS}, got {subset!r}, {split!r}")
        files = task_data_files(f"arc/{subset}-{split}.jsonl", URL.format(subset=subset, split=split))
        self.conversations = load_conversations(files, arc_conversation)
        random.Random(42).shuffle(self.conversations)  # so that a prefix (stop=N) is a fair sample
