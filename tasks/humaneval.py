"""HumanEval: 164 Python functions to write from a signature and docstring; generative.

Source: openai/human-eval's data/HumanEval.jsonl.gz; mirror: humaneval/HumanEval.jsonl.gz.
The user message is the problem's prompt; the reference answer is prompt + canonical solution in a
fenced code block. A completion passes if the code in it (the first ``` block that defines the
entry point, else the first block, else the raw text) passes the problem's tests in the sandbox
of nanochat.execution.
"""
import re

from tasks.common import Task, load_conversations, task_data_files

URL = "https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz"
FENCED = re.compile(r"```[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)  # an unclosed block runs to the end
PASS_MARKER = "__humaneval_tests_passed__"


def extract_code(completion: str, entry_point: str = None) -> str:
    blocks = FENCED.findall(completion)
    if not blocks:
        return completion
    for block in blocks:
        if entry_point and re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", block):
            return block
    return blocks[0]


def humaneval_conversation(row):
    solution = row["prompt"] + row["canonical_solution"]
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"```python\n{solution}```"},
        ],
        "task_id": row["task_id"], "prompt": row["prompt"], "entry_point": row["entry_point"], "test": row["test"],
    }


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, timeout=5.0, **kwargs):
        """timeout: seconds each completion's tests may run."""
        super().__init__(**kwargs)
        self.timeout = timeout
        self.conversations = load_conversations(task_data_files("humaneval/HumanEval.jsonl.gz", URL), humaneval_conversation)

    def program(self, conversation, completion) -> str:
        """What runs in the sandbox: the prompt (its imports and helper functions), the completion's code
        (a whole function, or just the body that continues the prompt), the tests, check(entry_point)."""
        return "\n".join([
            conversation["prompt"],
            extract_code(completion, conversation["entry_point"]),
            conversation["test"],
            f"check({conversation['entry_point']})",
            f"print({PASS_MARKER!r})",
            "",
        ])

    def evaluate(self, conversation, completion) -> bool:
        from nanochat.execution import execute_code  # the sandbox; only needed when scoring
        result = execute_code(self.program(conversation, completion), timeout=self.timeout)
        # the marker prints only after check() returned: code that calls sys.exit(0) early gains nothing
        return result.success and result.stdout.rstrip().endswith(PASS_MARKER)
