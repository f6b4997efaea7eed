"""GSM8K: grade-school math word problems with worked solutions; generative, and the RL task.

Source: openai/grade-school-math (raw JSONL, fields "question" and "answer"); mirror: gsm8k/.
A solution marks each calculation as <<expression=result>> and ends with "#### <number>":

    Natalia sold 48/2 = <<48/2=24>>24 clips in May. ... #### 72

becomes the assistant parts: text "Natalia sold 48/2 = ", python "48/2", python_output "24",
text "24 clips in May. ... #### 72". The model learns to call the calculator tool; the tool's
output is forced into the stream at inference (and not trained on). Answers are scored on the
number after "####".
"""
import random
import re

from tasks.common import Task, assistant_text, load_conversations, task_data_files

SPLITS = ("train", "test")
URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
CALCULATION = re.compile(r"<<([^<>]*)>>")
ANSWER = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_answer(text):
    """The number after the first "####" in `text`, normalized ("1,200" -> "1200", "3.50" -> "3.5"),
    or None if there is none."""
    match = ANSWER.search(text)
    if match is None:
        return None
    number = match.group(1).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number == "-0" else number


def answer_matches(conversation, completion) -> bool:
    """True if the completion's "#### <number>" equals the reference answer's (commas, "$" and trailing
    decimal zeros ignored); False if the completion has none."""
    predicted = extract_answer(completion)
    return predicted is not None and predicted == extract_answer(assistant_text(conversation))


def solution_parts(answer: str) -> list:
    """A GSM8K solution as assistant parts: each <<expr=result>> becomes a python call and its output."""
    if extract_answer(answer) is None:
        raise ValueError("the answer has no '#### <number>' line")
    parts, pos = [], 0
    for match in CALCULATION.finditer(answer):
        expression, equals, result = match.group(1).rpartition("=")
        if not equals:
            raise ValueError(f"calculation <<{match.group(1)}>> has no '='")
        if match.start() > pos:
            parts.append({"type": "text", "text": answer[pos:match.start()]})
        parts.append({"type": "python", "text": expression})
        parts.append({"type": "python_output", "text": result})
        pos = match.end()
    parts.append({"type": "text", "text": answer[pos:]})
    return parts


def gsm8k_conversation(row):
    return {"messages": [
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": solution_parts(row["answer"])},
    ]}


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, split="test", **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {SPLITS}, got {split!r}")
        files = task_data_files(f"gsm8k/{split}.jsonl", URL.format(split=split))
        self.conversations = load_conversations(files, gsm8k_conversation)
        random.Random(42).shuffle(self.conversations)

    def evaluate(self, conversation, completion) -> bool:
        return answer_matches(conversation, completion)
