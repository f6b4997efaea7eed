"""Conversations from a local JSONL file (training data only): one conversation per line, either
{"messages": [...]} or a bare list of messages. Every line is validated when the file loads; a bad
one raises TaskDataError naming the file and line.

IDENTITY_CONVERSATIONS is the model's own identity data (who nanochat is), kept in this package.
"""
from pathlib import Path

from tasks.common import Task, TaskDataError, load_conversations

IDENTITY_CONVERSATIONS = Path(__file__).with_name("identity_conversations.jsonl")


def custom_conversation(row):
    if isinstance(row, list):
        return {"messages": row}
    if isinstance(row, dict) and "messages" in row:
        return {"messages": row["messages"]}
    raise ValueError("expected {\"messages\": [...]} or a list of messages")


class CustomJSON(Task):
    def __init__(self, path=IDENTITY_CONVERSATIONS, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        if not self.path.is_file():
            raise TaskDataError(f"conversations file {self.path} does not exist: give a JSONL file of conversations")
        self.conversations = load_conversations([self.path], custom_conversation)
