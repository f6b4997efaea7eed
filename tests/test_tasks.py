"""tasks/: every task yields valid conversations that render with the right loss masks; scoring,
mixtures, slicing, data loading and bad-input errors. Reads the dataset mirror only."""
import json

import pytest

from nanochat.common import DownloadError, download_file
from nanochat.tokenizer import ConversationError, Tokenizer, validate_conversation
from tasks.arc import ARC, arc_conversation
from tasks.common import Task, TaskDataError, TaskMixture, TaskSequence, assistant_text, mc_conversation
from tasks.customjson import IDENTITY_CONVERSATIONS, CustomJSON
from tasks.gsm8k import GSM8K, extract_answer
from tasks.humaneval import HumanEval, extract_code
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

TASKS = {
    "arc-easy": lambda: ARC("ARC-Easy", "train"),
    "arc-challenge": lambda: ARC("ARC-Challenge", "test"),
    "mmlu": lambda: MMLU("test"),
    "mmlu-aux": lambda: MMLU("auxiliary_train"),
    "gsm8k": lambda: GSM8K("train"),
    "humaneval": lambda: HumanEval(),
    "smoltalk": lambda: SmolTalk("train"),
    "smoltalk-test": lambda: SmolTalk("test"),
    "spellingbee": lambda: SpellingBee(size=200, split="train"),
    "simplespelling": lambda: SimpleSpelling(size=200, split="test"),
    "identity": lambda: CustomJSON(),
}


@pytest.fixture(scope="session")
def tokenizer(request):
    import rustbpe
    if hasattr(rustbpe, "Tokenizer"):
        return request.getfixturevalue("small_tokenizer")[0]
    return Tokenizer({bytes([i]): i for i in range(256)})  # byte-level, until the rustbpe trainer lands


def check_rendering(tokenizer, conversation):
    """Every text of the conversation survives render + decode, and the mask is 0 on user turns and tool
    output, 1 on assistant text and tool calls."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=10**7)
    decoded = tokenizer.decode(ids)
    for message in conversation["messages"]:
        content = message["content"]
        for text in [content] if isinstance(content, str) else [part["text"] for part in content]:
            assert text in decoded
    special = {tokenizer.encode_special(name): name for name in tokenizer.get_special_tokens()}
    state = None
    for token, m in zip(ids, mask):
        name = special.get(token)
        if name in ("<|user_start|>", "<|assistant_start|>", "<|output_start|>"):
            state = name
            expected = 0
        elif name == "<|output_end|>":
            state, expected = "<|assistant_start|>", 0
        elif name in ("<|bos|>", "<|user_end|>"):
            expected = 0
        else:  # ordinary tokens, python delimiters, assistant_end: trained only inside an assistant turn
            expected = 1 if state == "<|assistant_start|>" else 0
        assert m == expected, f"token {token} ({name or tokenizer.decode([token])!r}) in {state}: mask {m}"
    assert 1 in mask  # there is an assistant answer to learn


@pytest.mark.parametrize("name", TASKS)
def test_task_conversations_render(name, tokenizer):
    task = TASKS[name]()
    assert len(task) == task.num_examples() > 0
    for i in (0, 1, 2, len(task) // 2, len(task) - 1):
        conversation = task[i]
        validate_conversation(conversation)
        assert conversation["messages"][-1]["role"] == "assistant"
        check_rendering(tokenizer, conversation)
        prompt = tokenizer.render_for_completion(conversation)
        assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>")
        if task.eval_type is not None and name != "humaneval":  # (the sandbox has its own test)
            assert task.evaluate(conversation, assistant_text(conversation))  # the reference answer passes


# ---- multiple choice ----------------------------------------------------------------------------------

def test_multiple_choice_renders_as_nanochat(mirror_dir):
    """`- {choice}={letter}` lines, letter after its choice with no space before it; the answer is the
    bare letter. Checked by hand on a made-up question, and against the raw rows of MMLU dev."""
    conversation = mc_conversation("Which is a gas?", ["ice", "steam", "rock"], 1)
    assert conversation["messages"] == [
        {"role": "user", "content": "Multiple Choice question: Which is a gas?\n- ice=A\n- steam=B\n- rock=C\n\n"
                                    "Respond only with the letter of the correct answer."},
        {"role": "assistant", "content": "B"}]
    assert conversation["letters"] == ["A", "B", "C"]
    raw = {row["question"]: row for row in map(json.loads, (mirror_dir / "mmlu" / "mmlu_dev.jsonl").read_text().splitlines())}
    task = MMLU("dev", subject="astronomy")
    assert task.eval_type == "categorical" and len(task) == 5
    for conversation in task:
        prompt = conversation["messages"][0]["content"]
        row = raw[prompt.split("\n- ")[0].removeprefix("Multiple Choice question: ")]
        lines = [f"- {c}={'ABCD'[i]}" for i, c in enumerate(row["choices"])]
        assert prompt == "\n".join([f"Multiple Choice question: {row['question']}"] + lines) + \
            "\n\nRespond only with the letter of the correct answer."  # no subject line, as in nanochat
        assert conversation["messages"][1]["content"] == "ABCD"[row["answer"]] and conversation["subject"] == "astronomy"


def test_multiple_choice_letters_and_evaluate():
    task = MMLU("dev", subject="astronomy")
    conversation = task[0]
    assert conversation["letters"] == ["A", "B", "C", "D"]
    answer = conversation["messages"][-1]["content"]
    assert task.evaluate(conversation, answer) and task.evaluate(conversation, f" {answer}.")
    assert not task.evaluate(conversation, next(letter for letter in conversation["letters"] if letter != answer))
    # ARC labels choices 1..4 in some rows; we always show letters
    row = {"id": "x", "question": "Pick three.", "choices": {"label": ["1", "2", "3"], "text": ["one", "two", "three"]}, "answerKey": "3"}
    conversation = arc_conversation(row)
    assert conversation["letters"] == ["A", "B", "C"] and conversation["messages"][-1]["content"] == "C"
    assert conversation["messages"][0]["content"] == ("Multiple Choice question: Pick three.\n- one=A\n- two=B\n- three=C\n\n"
                                                      "Respond only with the letter of the correct answer.")


def test_mmlu_auxiliary_substitute_does_not_overlap_test():
    test_prompts = {c["messages"][0]["content"] for c in MMLU("test").conversations}
    aux = MMLU("auxiliary_train")
    assert len(aux) == 1531 + 285 - 42  # minus the 42 questions MMLU repeats in test
    assert not test_prompts & {c["messages"][0]["content"] for c in aux}


# ---- GSM8K --------------------------------------------------------------------------------------------

def test_gsm8k_tool_calls_from_real_row():
    task = GSM8K("train")
    conversation = next(c for c in task.conversations if c["messages"][0]["content"].startswith("Natalia sold clips to 48"))
    assert conversation["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    assert task.reward(conversation, "She sold 24 in May, so 48 + 24 = 72.\n#### 72") == 1.0
    assert task.reward(conversation, "#### 71") == 0.0
    assert task.reward(conversation, "The answer is 72.") == 0.0  # no "####": no answer
    assert task.eval_type == "generative"


def test_gsm8k_extract_answer():
    assert extract_answer("so #### 1,200") == "1200"
    assert extract_answer("#### $3.50 dollars") == "3.5"
    assert extract_answer("####-7") == "-7"
    assert extract_answer("#### 10.0") == "10"
    assert extract_answer("#### 5 then #### 6") == "5"
    assert extract_answer("the answer is 5") is None
    task = GSM8K("test")
    conversation = next(c for c in task.conversations if extract_answer(c["messages"][1]["content"][-1]["text"]) == "1200")
    assert task.evaluate(conversation, "#### 1,200") and task.evaluate(conversation, "#### 1200.00")


# ---- HumanEval ----------------------------------------------------------------------------------------

def test_humaneval_canonical_solutions_pass_and_wrong_fails():
    task = HumanEval(timeout=2.0)
    for i in range(5):
        conversation = task[i]
        assert conversation["task_id"] == f"HumanEval/{i}"
        assert task.evaluate(conversation, conversation["messages"][-1]["content"]), conversation["task_id"]
    conversation = task[0]
    canonical_body = conversation["messages"][-1]["content"].removeprefix("```python\n" + conversation["prompt"]).removesuffix("```")
    assert task.evaluate(conversation, canonical_body)  # a raw body continuing the prompt
    wrong = "Sure:\n```python\ndef has_close_elements(numbers, threshold):\n    return False\n```\n"
    assert not task.evaluate(conversation, wrong)
    assert not task.evaluate(conversation, "```python\nwhile True: pass\n```")  # killed by the timeout
    # exiting with status 0 before the tests run is no pass
    assert not task.evaluate(conversation, "```python\nimport sys\nsys.exit(0)\n```")
    assert not task.evaluate(conversation, "```python\nimport os\nos._exit(0)\n```")


def test_extract_code():
    assert extract_code("```python\nx = 1\n```") == "x = 1\n"
    assert extract_code("text\n```\nx = 1\n```\nmore") == "x = 1\n"
    assert extract_code("x = 1") == "x = 1"
    assert extract_code("```python\nx = 1\n") == "x = 1\n"  # unclosed: to the end
    two = "```python\nimport os\n```\nthen\n```python\ndef f(a):\n    return a\n```"
    assert extract_code(two, "f") == "def f(a):\n    return a\n"


# ---- spelling -----------------------------------------------------------------------------------------

def test_spellingbee_is_deterministic_and_scored_on_the_count():
    a, b = SpellingBee(size=50, split="train"), SpellingBee(size=50, split="train")
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert [a[i] for i in range(10)] != SpellingBee(size=50, split="test")[:10]
    for conversation in a[:20]:
        parts = conversation["messages"][1]["content"]
        call, output = parts[1], parts[2]
        assert call["type"] == "python" and output["type"] == "python_output"
        assert str(eval(call["text"])) == output["text"]  # the tool call computes the stated count
        count = output["text"]
        assert a.evaluate(conversation, f"... #### {count}")
        assert not a.evaluate(conversation, f"#### {int(count) + 1}") and not a.evaluate(conversation, count)


def test_simple_spelling():
    task = SimpleSpelling(size=10)
    conversation = task[3]
    spelled = conversation["messages"][1]["content"]
    word = spelled.replace("-", "")
    assert word.isalpha() and word in conversation["messages"][0]["content"]
    assert task.evaluate(conversation, spelled) and task.evaluate(conversation, f"Sure: {spelled.upper()}.")
    assert not task.evaluate(conversation, spelled + "-s") and not task.evaluate(conversation, word)
    with pytest.raises(IndexError):
        task[10]


# ---- slicing, mixtures, sequences -----------------------------------------------------------------------

class Numbers(Task):
    def __init__(self, n, tag="n", **kwargs):
        super().__init__(**kwargs)
        self.conversations = [{"messages": [{"role": "user", "content": f"{tag}{i}"}, {"role": "assistant", "content": "ok"}]} for i in range(n)]


def ids(task):
    return [c["messages"][0]["content"] for c in task]


def test_slicing():
    assert ids(Numbers(10, start=2, stop=8, step=2)) == ["n2", "n4", "n6"]
    task = Numbers(10, start=5)
    assert len(task) == 5 and task.num_examples() == 10 and task[0] == task.get_example(5)
    assert ids(Numbers(10, stop=-7)) == ["n0", "n1", "n2"]
    assert task[-1]["messages"][0]["content"] == "n9"
    assert [c["messages"][0]["content"] for c in Numbers(10)[7:]] == ["n7", "n8", "n9"]
    with pytest.raises(IndexError):
        task[5]
    task[0]["messages"].clear()  # examples are copies: editing one does not change the task
    assert task[0]["messages"]
    assert len(GSM8K("test", stop=100)) == 100 and len(GSM8K("test", start=1300)) == 19


def test_mixture_is_deterministic_and_oversamples():
    a, b = Numbers(30, "a"), Numbers(10, "b")
    mixture = TaskMixture([a, b], seed=1)
    assert ids(mixture) == ids(TaskMixture([a, b], seed=1))
    assert ids(mixture) != ids(TaskMixture([a, b], seed=2))
    assert sorted(ids(mixture)) == sorted(ids(a) + ids(b))
    assert ids(mixture)[:10] != ids(a)[:10]  # shuffled
    oversampled = ids(TaskMixture([a, b, b], seed=1))
    assert len(oversampled) == 50
    assert all(oversampled.count(x) == 2 for x in ids(b)) and all(oversampled.count(x) == 1 for x in ids(a))
    assert len(TaskMixture([a, b], stop=7)) == 7


def test_sequence_keeps_order():
    sequence = TaskSequence([Numbers(3, "a"), Numbers(2, "b", start=1), Numbers(0)])
    assert ids(sequence) == ["a0", "a1", "a2", "b1"]
    assert ids(TaskSequence([Numbers(3, "a"), Numbers(2, "b")], start=2)) == ["a2", "b0", "b1"]


# ---- data files and bad input ----------------------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_custom_json_formats_and_malformed_rows(tmp_path):
    bare = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": [{"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}, {"type": "text", "text": "4"}]}]
    path = write_lines(tmp_path / "ok.jsonl", [GOOD, bare, ""])
    task = CustomJSON(path)
    assert len(task) == 2 and task[1] == {"messages": bare}
    bad_rows = {
        "not json": "{'messages': ",
        "roles": {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]},
        "empty turn": {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "hello"}]},
        "no messages": {"conversation": []},
        "bad part": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}],
    }
    for what, bad in bad_rows.items():
        path = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, bad, GOOD])
        with pytest.raises(TaskDataError, match=f"{path}:3: "):
            CustomJSON(path)
    with pytest.raises(TaskDataError, match=r"missing.jsonl does not exist: give a JSONL file"):
        CustomJSON(tmp_path / "missing.jsonl")


def test_malformed_mirror_row_names_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    path = write_lines(tmp_path / "gsm8k" / "test.jsonl", [
        {"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
        {"question": "2+2?", "solution": "#### 4"},
    ])
    monkeypatch.setenv("NANOCHAT_MIRROR", str(tmp_path))
    with pytest.raises(TaskDataError, match=f"{path}:2: missing field 'answer'"):
        GSM8K("test")
    write_lines(path, [{"question": "2+2?", "answer": "it is four"}])
    with pytest.raises(TaskDataError, match=f"{path}:1: .*####"):
        GSM8K("test")
    with pytest.raises(TaskDataError, match="not in the dataset mirror"):
        GSM8K("train")


def test_bad_conversations_are_rejected():
    with pytest.raises(ConversationError):
        validate_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]})
    with pytest.raises(ConversationError):
        validate_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})


def test_identity_conversations():
    task = CustomJSON(IDENTITY_CONVERSATIONS)
    assert 50 <= len(task) <= 100
    texts = [json.dumps(c) for c in task]
    assert len(set(texts)) == len(texts)
    assert sum("nanochat" in t for t in texts) > len(texts) // 3  # who the model is, said often


def test_mirror_means_no_network(monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("a network request was made with NANOCHAT_MIRROR set")
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests.Session, "request", no_network)
    for make in TASKS.values():
        make()


class FakeResponse:
    def __init__(self, status, body=b""):
        self.status_code, self.body, self.headers = status, body, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        import requests
        if self.status_code >= 400:
            raise requests.HTTPError(f"HTTP {self.status_code}")

    def iter_content(self, chunk_size):
        import requests
        yield self.body[:3]
        if self.body == b"broken":
            raise requests.ConnectionError("connection reset")
        yield self.body[3:]


def test_download_retries_and_writes_atomically(tmp_path, monkeypatch):
    import requests
    responses = [FakeResponse(503), FakeResponse(200, b"broken"), FakeResponse(200, b"hello world")]
    monkeypatch.setattr(requests, "get", lambda url, **kwargs: responses.pop(0))
    path = tmp_path / "sub" / "file.jsonl"
    assert download_file("https://example.com/file.jsonl", path, backoff=0) == path
    assert path.read_bytes() == b"hello world" and not responses
    assert [p.name for p in path.parent.iterdir()] == ["file.jsonl"]  # no temp files left behind
    assert download_file("https://example.com/file.jsonl", path) == path  # already there: no request

    monkeypatch.setattr(requests, "get", lambda url, **kwargs: FakeResponse(404))
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file("https://example.com/missing.jsonl", tmp_path / "missing.jsonl", backoff=0)
    monkeypatch.setattr(requests, "get", lambda url, **kwargs: FakeResponse(500))
    with pytest.raises(DownloadError, match="3 attempts failed"):
        download_file("https://example.com/flaky.jsonl", tmp_path / "flaky.jsonl", retries=3, backoff=0)
    assert not (tmp_path / "missing.jsonl").exists() and not (tmp_path / "flaky.jsonl").exists()


def test_downloads_go_to_task_data_without_mirror(monkeypatch, tmp_path):
    import requests
    row = {"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}
    urls = []

    def fake_get(url, **kwargs):
        urls.append(url)
        return FakeResponse(200, (json.dumps(row) + "\n").encode())
    monkeypatch.delenv("NANOCHAT_MIRROR")
    monkeypatch.setattr(requests, "get", fake_get)
    task = GSM8K("test")
    assert urls == ["https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl"]
    assert len(task) == 1 and task[0]["messages"][1]["content"][0] == {"type": "python", "text": "1+1"}
    from nanochat.common import get_base_dir
    assert (get_base_dir() / "task_data" / "raw.githubusercontent.com" / "openai" / "grade-school-math").is_dir()
    GSM8K("test")  # cached: no second request
    assert len(urls) == 1


def parquet_bytes(rows):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def test_hugging_face_parquet_sources(monkeypatch):
    """Without the mirror, ARC/MMLU/SmolTalk read the Hugging Face parquet exports (row formats as there)."""
    import requests
    arc_row = {"id": "q1", "question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}, "answerKey": "B"}
    mmlu_row = {"question": "2+2?", "subject": "", "choices": ["3", "4", "5", "6"], "answer": 1}
    chat = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    files = {
        "https://huggingface.co/datasets/allenai/ai2_arc/resolve/main/ARC-Challenge/validation-00000-of-00001.parquet": [arc_row],
        "https://huggingface.co/datasets/cais/mmlu/resolve/main/all/auxiliary_train-00000-of-00001.parquet": [{"train": mmlu_row}],
        **{f"https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/train-0000{i}-of-00004.parquet": [chat] * (i + 1) for i in range(4)},
    }
    monkeypatch.delenv("NANOCHAT_MIRROR")
    monkeypatch.setattr(requests, "get", lambda url, **kwargs: FakeResponse(200, parquet_bytes(files[url])) if url in files else FakeResponse(404))
    arc = ARC("ARC-Challenge", "validation")
    assert arc[0]["letters"] == ["A", "B", "C"] and arc[0]["messages"][1]["content"] == "B" and arc[0]["id"] == "q1"
    mmlu = MMLU("auxiliary_train")
    assert len(mmlu) == 1 and mmlu[0]["messages"][1]["content"] == "B" and "2+2?" in mmlu[0]["messages"][0]["content"]
    smoltalk = SmolTalk("train")
    assert len(smoltalk) == 1 + 2 + 3 + 4 and smoltalk[0] == chat
    with pytest.raises(TaskDataError, match="HTTP 404"):
        SmolTalk("test")


def test_unreadable_files_are_named(tmp_path):
    from tasks.common import read_rows
    for name in ("data.parquet", "data.jsonl.gz"):
        path = tmp_path / name
        path.write_bytes(b"<html>not found</html>")
        with pytest.raises(TaskDataError, match=f"{path}: unreadable"):
            list(read_rows(path))
