"""nanochat.export: a tiny GPT trained here (a few steps on mirror text) exported to the Hugging Face format and
checked against transformers itself: logits, greedy generation, the tokenizer and chat template ids; then the
directory back in our code (round trip, chat CLI, the Serve replica), and what must be refused."""
import asyncio
import json
import shutil

import pytest
import torch
import torch.nn as nn

from conftest import mirror_texts
from nanochat import chat_cli, export
from nanochat.checkpoint import CheckpointError, checkpoint_dir, load_for_inference, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, create_model
from nanochat.tokenizer import Tokenizer

STEPS = 40
# vocab 1000 (not the shared small_tokenizer's 1024): our GPT pads it to 1024 rows, which the export must drop
CONFIG = GPTConfig(sequence_len=128, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)  # GQA: 2 q per kv
ATOL = 1e-4

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 * 7? Reply after <|assistant_start|>, please."},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute it: "},
        {"type": "python", "text": "12 * 7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": " so it is 84."},
    ]},
    {"role": "user", "content": "And <|python_start|>1+1<|python_end|> in words?"},
    {"role": "assistant", "content": "Two."},
    {"role": "user", "content": "Thanks! Ünïcödé 🙂 too"},
]


@pytest.fixture(scope="module")
def tok(mirror_dir):
    return Tokenizer.train_from_iterator(mirror_texts(mirror_dir, 300_000), vocab_size=CONFIG.vocab_size)


@pytest.fixture(scope="module")
def trained(tok, mirror_dir, tmp_path_factory):
    """(model, base dir): STEPS AdamW steps on real text, saved as checkpoints/sft/tiny with the tokenizer."""
    torch.manual_seed(0)
    model = create_model(CONFIG, "cpu")
    ids = [i for text in mirror_texts(mirror_dir, 200_000, shard="shard_00001.parquet")
           for i in tok.encode(text, prepend="<|bos|>")]
    rows = torch.tensor(ids[:len(ids) // 65 * 65]).view(-1, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(STEPS):
        batch = rows[torch.randint(len(rows), (8,))]
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    base = tmp_path_factory.mktemp("export_base")
    tok.save(base / "tokenizer")
    save_checkpoint(checkpoint_dir("sft", "tiny", base), STEPS, model, meta={"phase": "sft"},
                    tokenizer_fingerprint=tok.fingerprint())
    return model, base


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, base = trained
    out = tmp_path_factory.mktemp("hf") / "nanochat-tiny"
    assert export.main(["--checkpoint", "sft/tiny", "--out", str(out), "--base-dir", str(base)]) == 0
    return out


def load_transformers(directory):
    """transformers' model, loaded strictly: any missing, unexpected or mis-shaped tensor is an error (plain
    from_pretrained would initialize a missing one at random and only warn)."""
    from transformers import AutoModelForCausalLM
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        raise ValueError(f"{directory}: {problems}")
    return model.eval()


@pytest.fixture(scope="module")
def hf_model(exported):
    return load_transformers(exported)


@pytest.fixture(scope="module")
def hf_tok(exported):
    from transformers import AutoTokenizer
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(exported)


def prompts(tok):
    texts = ["The capital of France is", "In 1969, astronauts landed on the moon and", "def add(a, b):\n    return"]
    chat = tok.render_for_completion({"messages": CHAT + [{"role": "assistant", "content": ""}]})
    return [tok.encode(t, prepend="<|bos|>") for t in texts] + [chat]


def test_transformers_logits_equal_ours(trained, hf_model, tok):
    model, _ = trained
    assert model.transformer.h[0].mlp.c_proj.weight.abs().sum() > 0  # trained: the zero-initialized outputs moved
    assert hf_model.config.vocab_size == CONFIG.vocab_size < CONFIG.padded_vocab_size
    assert hf_model.config.rms_norm_eps == torch.finfo(torch.float32).eps
    for ids in prompts(tok):
        x = torch.tensor([ids])
        with torch.no_grad():
            ours, theirs = model(x), hf_model(x).logits
        assert theirs.shape == ours.shape == (1, len(ids), CONFIG.vocab_size)
        assert (ours - theirs).abs().max() < ATOL
        assert ours.std() > 0.5  # not a flat, untrained output that anything would match


def test_transformers_greedy_generation_equals_engine(trained, hf_model, tok):
    model, _ = trained
    for ids in prompts(tok)[:3]:
        ours = Engine(model, tok).generate_batch(ids, max_tokens=32, temperature=0.0)[0][0]
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        theirs = out[0, len(ids):].tolist()
        assert len(ours) == 32 and theirs == ours


def test_exported_tokenizer_gives_our_ids(tok, hf_tok, mirror_dir):
    text = "".join(mirror_texts(mirror_dir, 50_000, shard="shard_00002.parquet")) + " 1234567 ünïcödé 你好 🙂\r\n\n  x"
    ids = tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True) == ids
    assert hf_tok.decode(ids) == tok.decode(ids)
    # tokenizer(text) recognizes special strings (transformers' default); split_special_tokens keeps them text
    special = "a <|assistant_start|> b"
    assert tok.encode_special("<|assistant_start|>") in hf_tok.encode(special, add_special_tokens=False)
    assert hf_tok.encode(special, add_special_tokens=False, split_special_tokens=True) == tok.encode(special)
    # the chat template: a prompt for the next answer, and a whole conversation
    prompt = tok.render_for_completion({"messages": CHAT + [{"role": "assistant", "content": ""}]})
    assert hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"] == prompt
    whole = CHAT + [{"role": "assistant", "content": "You're welcome."}]
    assert hf_tok.apply_chat_template(whole, tokenize=True)["input_ids"] == tok.render_conversation({"messages": whole})[0]
    assert prompt.count(tok.encode_special("<|assistant_start|>")) == 3  # the user's copy stayed ordinary text
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_round_trip_into_our_code(trained, exported, tok):
    from safetensors import safe_open
    model, _ = trained
    with safe_open(exported / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [CONFIG.vocab_size, CONFIG.n_embd]
    back, back_tok, meta = load_for_inference(str(exported))
    assert back_tok.fingerprint() == tok.fingerprint() and back.config == CONFIG
    assert meta["step"] == STEPS and meta["phase"] == "sft" and meta["checkpoint"] == "sft/tiny"
    for ids in prompts(tok):
        x = torch.tensor([ids])
        with torch.no_grad():
            assert torch.equal(back(x), model(x))


def greedy_answer(model, tok, messages, max_tokens):
    prompt = tok.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]})
    return tok.decode(Engine(model, tok).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)[0][0])


def test_chat_cli_and_serve_replica_run_an_exported_dir(trained, exported, tok, capsys):
    """No tokenizer in the (empty) base dir: the exported directory brings its own."""
    from serve_app.engine import EngineReplica
    model, _ = trained
    question = "Why is the sky blue?"
    want = greedy_answer(model, tok, [{"role": "user", "content": question}], 12)
    argv = ["--checkpoint", str(exported), "--prompt", question, "--temperature", "0", "--max-tokens", "12",
            "--device", "cpu"]
    assert chat_cli.main(argv) == 0
    assert capsys.readouterr().out == want + "\n"

    async def serve_one():
        replica = EngineReplica.func_or_class(checkpoint=str(exported), device="cpu")
        request = {"messages": [{"role": "user", "content": question}], "max_tokens": 12, "temperature": 0.0}
        return replica, [event async for event in replica.generate(request)]
    replica, events = asyncio.run(serve_one())
    assert "".join(e.get("text", "") for e in events) == want
    assert replica.info()["checkpoint"]["step"] == STEPS


def rewrite(src, dst, tensors=None, config=None):
    """A copy of an exported dir with its tensors and/or config.json edited."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if tensors:
        save_file(tensors(load_file(src / "model.safetensors")), dst / "model.safetensors")
    if config:
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def test_misnamed_tensor_or_changed_math_fails_to_load(exported, tmp_path, capsys):
    def rename(t):
        t["model.layers.0.mlp.fc_1.weight"] = t.pop("model.layers.0.mlp.fc1.weight")
        return t
    bad = rewrite(exported, tmp_path / "misnamed", tensors=rename)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.fc_1.weight'"):
        load_for_inference(str(bad))
    with pytest.raises(ValueError, match="model.layers.0.mlp.fc1.weight"):
        load_transformers(bad)  # transformers reports it missing: the strict load refuses instead of a random init
    capsys.readouterr()
    assert chat_cli.main(["--checkpoint", str(bad), "--prompt", "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fc_1" in err
    eps = rewrite(exported, tmp_path / "eps", config={"rms_norm_eps": 1e-6})
    with pytest.raises(CheckpointError, match="rms_norm_eps is 1e-06"):
        load_for_inference(str(eps))


def refused_checkpoint(base, tok, change):
    """A checkpoint (sft/odd) of our GPT with one module changed into something the format cannot hold."""
    model = create_model(CONFIG, "cpu")
    change(model.transformer.h[1])
    save_checkpoint(checkpoint_dir("sft", "odd", base), 1, model, tokenizer_fingerprint=tok.fingerprint())


@pytest.mark.parametrize("change, message", [
    (lambda block: setattr(block, "norm_weight", nn.Parameter(torch.ones(64))),
     "tensor 'transformer.h.1.norm_weight' has no place in transformers' NanoChat format"),
    (lambda block: setattr(block.mlp, "c_fc", nn.Linear(64, 192, bias=False)),
     "MLP width 192 (3 x n_embd) in transformer.h.1.mlp.c_fc.weight: our GPT and this export compute only 4 x n_embd = 256"),
    (lambda block: setattr(block.attn, "c_q", nn.Linear(64, 64, bias=True)),
     "tensor 'transformer.h.1.attn.c_q.bias' has no place in transformers' NanoChat format"),
], ids=["norm weight", "mlp ratio", "bias"])
def test_inexpressible_checkpoint_is_refused_in_one_line(trained, tok, change, message, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(trained[1] / "tokenizer", base / "tokenizer")
    refused_checkpoint(base, tok, change)
    out = tmp_path / "out"
    assert export.main(["--checkpoint", "sft/odd", "--out", str(out), "--base-dir", str(base)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert not out.exists() and list(tmp_path.iterdir()) == [base]  # nothing written, no temp dir left
