"""SmolTalk: general multi-turn conversations for midtraining and SFT (training data only).

Source: Hugging Face HuggingFaceTB/smol-smoltalk (parquet, "messages" column): train ~460k rows in 4
files, test ~24k rows.

The dataset mirror has no SmolTalk. With $NANOCHAT_MIRROR set we use its stand-in,
conversations/gpteacher.jsonl (14,131 conversations in the same row format), which has no test
split: every HELDOUT_EVERY-th row (rows 0, 20, 40, ...: 707 conversations) is "test", the rest "train".
"""
import logging
import random

from nanochat.common import get_mirror_dir
from tasks.common import Task, load_conversations, task_data_files

logger = logging.getLogger("nanochat.tasks")

SPLITS = ("train", "test")
URL = "https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/{name}.parquet"
FILES = {"train": [f"train-0000{i}-of-00004" for i in range(4)], "test": ["test-00000-of-00001"]}
MIRROR_FILE = "conversations/gpteacher.jsonl"
HELDOUT_EVERY = 20


def smoltalk_conversation(row):
    return {"messages": row["messages"]}


class SmolTalk(Task):
    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {SPLITS}, got {split!r}")
        files = task_data_files(MIRROR_FILE, [URL.format(name=name) for name in FILES[split]])
        conversations = load_conversations(files, smoltalk_conversation, columns=["messages"])
        if get_mirror_dir() is not None:
            logger.info("SmolTalk %s: using the mirror's stand-in %s", split, MIRROR_FILE)
            heldout = split == "test"
            conversations = [c for i, c in enumerate(conversations) if (i % HELDOUT_EVERY == 0) == heldout]
        random.Random(42).shuffle(conversations)
        self.conversations = conversations
