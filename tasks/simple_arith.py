"""SimpleArith: one-step arithmetic word problems in GSM8K's format, small enough for a tiny model.

    user:      Tom has 3 apples and buys 4 more. How many apples does Tom have now?
    assistant: Tom has 3+4 = <<3+4=7>>7 apples.
               #### 7

The solution is converted like a GSM8K one (tasks.gsm8k.solution_parts: the calculation becomes a
calculator call and its forced output) and scored the same way (the number after "####"), so the RL
phase runs on it unchanged: a tiny CPU model learns it in a few hundred SFT steps, where its GSM8K
rewards would all be zero. Example i of a split is drawn by an RNG seeded with (split, i): the same
on every run, and the train and test splits are different draws.
"""
import operator
import random

from tasks.common import Task
from tasks.gsm8k import answer_matches, solution_parts

SPLITS = ("train", "test")
NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe"]
ITEMS = ["apples", "pens", "cards", "books", "eggs", "coins", "shells", "stickers"]
# (question, solution, operator): {n} name, {i} item, {a} {b} operands, {e} the expression, {c} the result
PROBLEMS = [
    ("{n} has {a} {i} and buys {b} more. How many {i} does {n} have now?", "{n} has {e} = <<{e}={c}>>{c} {i}.", "+"),
    ("{n} has {a} {i} and finds {b} more. How many {i} does {n} have?", "{n} has {e} = <<{e}={c}>>{c} {i}.", "+"),
    ("{n} has {a} {i} and gives {b} away. How many {i} are left?", "{n} has {e} = <<{e}={c}>>{c} {i} left.", "-"),
    ("{n} has {a} {i} and loses {b} of them. How many {i} does {n} have left?", "{n} has {e} = <<{e}={c}>>{c} {i} left.", "-"),
    ("{n} buys {a} boxes with {b} {i} in each. How many {i} is that?", "That is {e} = <<{e}={c}>>{c} {i}.", "*"),
]
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class SimpleArith(Task):
    eval_type = "generative"

    def __init__(self, split="train", size=10_000, max_operand=20, **kwargs):
        """size: how many examples the split has (generated on demand, not stored)."""
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"SimpleArith split must be one of {SPLITS}, got {split!r}")
        self.split, self.size, self.max_operand = split, size, max_operand

    def num_examples(self):
        return self.size

    def get_example(self, index):
        if not 0 <= index < self.size:
            raise IndexError(f"SimpleArith has {self.size} examples, asked for {index}")
        rng = random.Random(f"SimpleArith-{self.split}-{index}")
        question, solution, op = rng.choice(PROBLEMS)
        top = 9 if op == "*" else self.max_operand  # products stay small
        a, b = rng.randint(2, top), rng.randint(1, top)
        if op == "-" and b > a:
            a, b = b, a
        expression = f"{a}{op}{b}"
        c = OPERATORS[op](a, b)
        fields = dict(n=rng.choice(NAMES), i=rng.choice(ITEMS), a=a, b=b, e=expression, c=c)
        answer = solution.format(**fields) + f"\n#### {c}"
        return {"messages": [
            {"role": "user", "content": question.format(**fields)},
            {"role": "assistant", "content": solution_parts(answer)},
        ]}

    def evaluate(self, conversation, completion) -> bool:
        return answer_matches(conversation, completion)
