"""nanochat.tokenizer: tiktoken round trips, special tokens as plain text, chat masks, save/load, errors."""
import json
import random

import pytest

from nanochat.tokenizer import SPECIAL_TOKENS, ConversationError, Tokenizer, TokenizerError, get_token_bytes


def random_unicode(rng, n):
    """Strings mixing ASCII, accents, CJK, emoji (incl. ZWJ sequences), combining marks, digits, whitespace."""
    pools = [
        "abcdefghijklmnopqrstuvwxyz ABCXYZ", "0123456789", " \t\n\r\n   ", "éèçñüßøå", "東京大学中文한국어日本語",
        "😀🎉👍🏽👨‍👩‍👧🇫🇷", "\u0301\u0308\u200d\ufeff", ".,;:!?'\"()[]{}<>|/\\@#$%^&*-_=+~`", "Ωπσжщ",
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def test_encode_decode_round_trip_arbitrary_unicode(small_tokenizer):
    tok, _ = small_tokenizer
    rng = random.Random(0)
    for _ in range(300):
        text = random_unicode(rng, rng.randint(0, 200))
        ids = tok.encode(text)
        assert all(0 <= i < tok.get_vocab_size() for i in ids)
        assert tok.decode(ids) == text
    # batch form gives the same as one by one
    texts = [random_unicode(rng, 50) for _ in range(20)]
    assert tok.encode(texts) == [tok.encode(t) for t in texts]


def test_trained_merges_compress(small_tokenizer):
    tok, _ = small_tokenizer
    text = "The history of the United States is the story of its people and their government."
    assert len(tok.encode(text)) < len(text.encode()) / 2  # merges learned from English text


def test_vocab_layout(small_tokenizer):
    tok, _ = small_tokenizer
    assert tok.get_vocab_size() == 1024
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(1024 - len(SPECIAL_TOKENS), 1024))
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>")
    assert tok.encode("hi", prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"))[::len(tok.encode("hi")) + 1] == [
        tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")]


def test_special_token_strings_in_text_are_plain_text(small_tokenizer):
    tok, _ = small_tokenizer
    special_ids = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    text = "look: " + "".join(SPECIAL_TOKENS) + " <|endoftext|>"
    ids = tok.encode(text)
    assert not special_ids & set(ids)
    assert tok.decode(ids) == text
    conv = {"messages": [{"role": "user", "content": "<|assistant_start|>hi<|assistant_end|>"},
                         {"role": "assistant", "content": "<|python_start|>1+1<|python_end|>"}]}
    ids, mask = tok.render_conversation(conv)
    structural = [i for i in ids if i in special_ids]
    sp = tok.encode_special
    assert structural == [sp("<|bos|>"), sp("<|user_start|>"), sp("<|user_end|>"), sp("<|assistant_start|>"), sp("<|assistant_end|>")]


def test_render_conversation_masks(small_tokenizer):
    tok, _ = small_tokenizer
    sp, enc = tok.encode_special, tok.encode
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "6*7"},
            {"type": "python_output", "text": "42"},
            {"type": "text", "text": "It is 42."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    expected = [
        ([sp("<|bos|>"), sp("<|user_start|>")], 0),
        (enc("Be brief.\n\nWhat is 6*7?"), 0),  # system merged into the first user turn
        ([sp("<|user_end|>"), sp("<|assistant_start|>")], 0),
        (enc("Let me compute. "), 1),
        ([sp("<|python_start|>")] + enc("6*7") + [sp("<|python_end|>")], 1),
        ([sp("<|output_start|>")] + enc("42") + [sp("<|output_end|>")], 0),
        (enc("It is 42."), 1),
        ([sp("<|assistant_end|>")], 1),
        ([sp("<|user_start|>")] + enc("Thanks") + [sp("<|user_end|>"), sp("<|assistant_start|>")], 0),
        (enc("You're welcome."), 1),
        ([sp("<|assistant_end|>")], 1),
    ]
    exp_ids = [i for ids, _ in expected for i in ids]
    exp_mask = [m for ids, m in expected for _ in ids]
    ids, mask = tok.render_conversation(conv)
    assert ids == exp_ids
    assert mask == exp_mask
    # truncation keeps the prefix
    ids5, mask5 = tok.render_conversation(conv, max_tokens=5)
    assert (ids5, mask5) == (exp_ids[:5], exp_mask[:5])


def test_render_for_completion(small_tokenizer):
    tok, _ = small_tokenizer
    conv = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    ids = tok.render_for_completion(conv)
    full, _ = tok.render_conversation(conv)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert full[:len(ids)] == ids and len(full) == len(ids) + len(tok.encode("4")) + 1
    with pytest.raises(ConversationError, match="last message"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize("messages, match", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "user", "content": "  "}], "message 0: content is empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "message 1: content is empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "part 0"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user"}], "'role' and 'content'"),
])
def test_bad_conversations(small_tokenizer, messages, match):
    tok, _ = small_tokenizer
    with pytest.raises(ConversationError, match=match):
        tok.render_conversation({"messages": messages})


def test_save_load_round_trip(small_tokenizer, tmp_path):
    tok, directory = small_tokenizer
    loaded = Tokenizer.from_directory(directory)
    text = "Round trip: naïve café 東京 😀 1234567"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    token_bytes = get_token_bytes(directory)
    assert token_bytes.shape == (tok.get_vocab_size(),)
    assert token_bytes[tok.get_bos_token_id()] == 0 and token_bytes[ord("a")] == 1
    assert int(token_bytes[tok.encode("the")[0]]) == len(tok.decode([tok.encode("the")[0]]).encode())
    # the files are plain text: no pickle anywhere
    for path in directory.iterdir():
        path.read_text(encoding="utf-8")


def test_train_errors():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 265"):
        Tokenizer.train_from_iterator(["hello"], vocab_size=260)
    with pytest.raises(ValueError, match="(?i)empty|no text"):
        Tokenizer.train_from_iterator([], vocab_size=300)
    with pytest.raises(ValueError, match="(?i)index 1|item 1|text 1"):
        Tokenizer.train_from_iterator(["ok", "bad \ud800 surrogate"], vocab_size=300)
    with pytest.raises(TypeError, match="1"):
        Tokenizer.train_from_iterator(["ok", b"bytes"], vocab_size=300)


def test_load_errors(small_tokenizer, tmp_path):
    tok, _ = small_tokenizer
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_directory(tmp_path / "nope")
    good = tok.save(tmp_path / "tok")
    (good / "ranks.tiktoken").write_text((good / "ranks.tiktoken").read_text()[:-100])  # truncated
    with pytest.raises(TokenizerError, match="corrupt or truncated"):
        Tokenizer.from_directory(good)
    (good / "ranks.tiktoken").unlink()
    with pytest.raises(TokenizerError, match="ranks.tiktoken is missing"):
        Tokenizer.from_directory(good)
    other = tok.save(tmp_path / "tok2")
    (other / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.from_directory(other)
    meta = json.loads(json.dumps({"format_version": 99}))
    (other / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match="format_version"):
        Tokenizer.from_directory(other)
