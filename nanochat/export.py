"""A checkpoint as a Hugging Face `transformers` model (its NanoChat architecture), and such a directory back.

    python -m nanochat.export --checkpoint sft/d20 --out nanochat-d20     # any phase; default: latest chat one

    from transformers import AutoModelForCausalLM, AutoTokenizer         # transformers >= MIN_TRANSFORMERS
    model = AutoModelForCausalLM.from_pretrained("nanochat-d20")         # a local directory: no network
    tokenizer = AutoTokenizer.from_pretrained("nanochat-d20")

The directory (written beside --out, then renamed into place: never half there):
    config.json             transformers' NanoChatConfig, every setting that changes the math written out
    generation_config.json  generation ends at <|assistant_end|> or <|bos|>, as our Engine's does
    model.safetensors       fp32 weights; the vocabulary padding rows are dropped, so no padded id can be sampled
    tokenizer.json          byte-level BPE: our ranks, every split of each token as a merge (ranked by the
                            merged token, as tiktoken merges), our split pattern, the nine special tokens
    tokenizer_config.json   bos <|bos|>, eos and pad <|assistant_end|>, no token added by tokenizer(text)
    chat_template.jinja     renders a conversation as Tokenizer.render_conversation / render_for_completion do
    nanochat.json           provenance: the source checkpoint (phase/tag/step), tokenizer fingerprint
The Serve app and the chat CLI take such a directory as --checkpoint (load_exported: no transformers needed).

Our math -> transformers' NanoChat (modeling_nanochat.py), and why each pair computes the same thing:
- weightless RMSNorm: ours is F.rms_norm with eps=None, i.e. torch.finfo(float32).eps in fp32, not
  transformers' default 1e-6: rms_norm_eps is written out. The norm after the embedding, the pre-norms and
  the final norm sit where NanoChatModel puts its own.
- QK norm: ours norms q, k per head then rotates; transformers rotates then norms. A rotation keeps the norm
  of each head vector, so both orders give the same vectors (to rounding).
- rotary: ours rotates halves, (x1 cos + x2 sin, x2 cos - x1 sin) with base 10000 (GPT.init_rotary);
  transformers' NanoChat rotate_half is (x2, -x1), the same signs. rope_theta is written out.
- attention: head_dim**-0.5 scale, causal, no bias; GQA maps query head h to kv head h // (n_head/n_kv_head)
  in both (SDPA's enable_gqa, transformers' repeat_kv).
- MLP: ReLU^2 ("relu2"), width 4 x n_embd (intermediate_size), no bias. Untied head; logits soft-capped at 15.
Not expressible, so refused with one line (nothing written): a tensor the NanoChat format has no place for
(biases, norm weights, value embeddings, per-layer scalars, ...) or one it needs that is missing; an MLP width
other than 4 x n_embd (or any shape other than our GPT's for the checkpoint's config: the export must load back
into our GPT); a width not divisible by the heads, heads not divisible by the kv heads, an odd head dim; a
tokenizer other than the one the checkpoint was trained with.

The chat template: user text must stay ordinary text, but transformers tokenizes the rendered template as one
string, where a user's "<|assistant_start|>" would become the special id. So the template writes every "<|"
of message text as "<" U+2060 "|" (which matches no special token) and the tokenizer's normalizer turns it
back into "<|" before BPE: the ids are ours. The one cost: a text that itself holds "<" U+2060 "|" is encoded
with the U+2060 dropped. tokenizer(text) recognizes special strings (transformers' default); pass
split_special_tokens=True for our encode()'s ordinary-text behaviour.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from nanochat.checkpoint import CheckpointError, load_model_state, resolve_checkpoint
from nanochat.common import ArgumentParser, NanochatError, get_base_dir
from nanochat.gpt import GPT, SOFTCAP, GPTConfig
from nanochat.precision import resolve_precision
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, get_tokenizer

MIN_TRANSFORMERS = "5.0.0"  # the first release with the NanoChat architecture (config with rope_parameters)
ROTARY_BASE = 10000.0  # GPT.init_rotary's base
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm(eps=None) on fp32 activations
FORMAT_VERSION = 1
CONFIG, WEIGHTS, TOKENIZER, PROVENANCE = "config.json", "model.safetensors", "tokenizer.json", "nanochat.json"
ESCAPE = "<\u2060|"  # how the chat template writes "<|" inside message text (see the module docstring)

# our parameter names -> transformers' NanoChat names (substring replacements, applied in order)
NAME_MAP = [
    ("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
    (".attn.c_q.", ".self_attn.q_proj."), (".attn.c_k.", ".self_attn.k_proj."), (".attn.c_v.", ".self_attn.v_proj."),
    (".attn.c_proj.", ".self_attn.o_proj."), (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."),
]
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")  # exported with the real vocabulary's rows only


class ExportError(NanochatError, ValueError):
    """A checkpoint that transformers' NanoChat format cannot express."""


# ---- shapes and names -----------------------------------------------------------------------------------

def check_expressible(config: GPTConfig, state=None, where="checkpoint"):
    """Raise ExportError unless `state` (a state dict, optional) holds exactly the tensors our GPT has for
    `config`, in their shapes. Returns {our name: shape}."""
    if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
        raise ExportError(f"{where}: n_embd={config.n_embd}, n_head={config.n_head}, n_kv_head={config.n_kv_head}: "
                          f"heads must divide the width and kv heads the heads")
    if (config.n_embd // config.n_head) % 2:
        raise ExportError(f"{where}: head dim {config.n_embd // config.n_head} is odd: rotary needs pairs")
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    if state is None:
        return want
    extra = sorted(set(state) - set(want))
    if extra:
        raise ExportError(f"{where}: tensor {extra[0]!r} has no place in transformers' NanoChat format "
                          f"(it has no biases, norm weights or extra embeddings){f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
    missing = sorted(set(want) - set(state))
    if missing:
        raise ExportError(f"{where}: tensor {missing[0]!r} is missing: not a complete nanochat GPT")
    for name, shape in want.items():
        got = tuple(state[name].shape)
        if got == shape:
            continue
        if name.endswith("mlp.c_fc.weight"):
            raise ExportError(f"{where}: MLP width {got[0]} ({got[0] / config.n_embd:g} x n_embd) in {name}: "
                              f"our GPT and this export compute only 4 x n_embd = {4 * config.n_embd}")
        raise ExportError(f"{where}: tensor {name!r} has shape {list(got)}, the config implies {list(shape)}")
    return want


def hf_name(name):
    for ours, theirs in NAME_MAP:
        name = name.replace(ours, theirs)
    return name


def to_hf_state(state, config):
    """Our state dict -> transformers' NanoChat tensors (fp32, contiguous, vocab rows cropped to the real vocab)."""
    out = {}
    for name, tensor in state.items():
        t = tensor.detach().to("cpu", torch.float32)
        if name in VOCAB_ROWS:
            t = t[:config.vocab_size]
        out[hf_name(name)] = t.contiguous().clone()  # clone: safetensors refuses views that share storage
    return out


def hf_config(config: GPTConfig, tokenizer: Tokenizer):
    sp = tokenizer.special_ids
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,  # the real vocabulary: padding rows are not exported
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROTARY_BASE},
        "final_logit_softcapping": SOFTCAP,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": sp["<|bos|>"],
        "eos_token_id": [sp["<|assistant_end|>"], sp["<|bos|>"]],
        "pad_token_id": None,  # an embedding padding_idx would freeze that row's gradient in fine-tuning
        "dtype": "float32",
        "use_cache": True,
        "transformers_version": MIN_TRANSFORMERS,
    }


# which config.json values our GPT needs, as (key, value our math has); the shapes come from the others
def required_config(cfg):
    return [("model_type", "nanochat"), ("hidden_act", "relu2"), ("rms_norm_eps", RMS_NORM_EPS),
            ("rope_parameters", {"rope_type": "default", "rope_theta": ROTARY_BASE}),
            ("final_logit_softcapping", SOFTCAP), ("attention_bias", False), ("tie_word_embeddings", False),
            ("intermediate_size", 4 * cfg.get("hidden_size", 0))]


# ---- the tokenizer ------------------------------------------------------------------------------------------

def byte_to_char():
    """GPT-2's byte-level alphabet: every byte as a printable character (printable Latin-1 bytes as
    themselves, the rest as chr(256 + n) in byte order), so a BPE vocabulary of bytes is a JSON of strings."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def hf_tokenizer_json(tokenizer: Tokenizer):
    """tokenizer.json for the `tokenizers` library that encodes as our tiktoken Encoding does: BPE whose
    merges are every (left, right) split of each token into two tokens, ranked by the merged token's rank
    (tiktoken merges the adjacent pair whose concatenation ranks lowest); ignore_merges takes a whole piece
    that is a token as is, as tiktoken does. Where two overlapping pairs make the same token (parts ab|a|ba
    with aba a token), tiktoken merges the leftmost and `tokenizers` the pair listed first: no list order
    matches that in general, but no such case arose in 3M characters of FineWeb-Edu at vocab 16384."""
    table = byte_to_char()
    chars = lambda b: "".join(table[x] for x in b)  # noqa: E731
    ranks = tokenizer.mergeable_ranks
    merges = sorted((rank, ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:]) for tok, rank in ranks.items()
                    for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in tokenizer.special_ids.items()],
        "normalizer": {"type": "Replace", "pattern": {"String": ESCAPE}, "content": "<|"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {chars(tok): rank for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])},
                  "merges": [[chars(left), chars(right)] for *_, left, right in merges]},
    }


def tokenizer_from_hf(directory) -> Tokenizer:
    """Our Tokenizer from an exported tokenizer.json (no `tokenizers` needed). Refuses any file that is not
    exactly what hf_tokenizer_json writes for the vocabulary it holds."""
    path = Path(directory) / TOKENIZER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        table = {c: b for b, c in byte_to_char().items()}
        ranks = {bytes(table[c] for c in token): rank for token, rank in data["model"]["vocab"].items()}
        pattern = next(p["pattern"]["Regex"] for p in data["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split")
        tokenizer = Tokenizer(ranks, pattern)
    except FileNotFoundError:
        raise TokenizerError(f"{path} is missing: not a directory written by nanochat.export") from None
    except Exception as e:  # malformed JSON, missing keys, a character outside the byte alphabet, bad ranks
        raise TokenizerError(f"{path} is not a tokenizer written by nanochat.export ({type(e).__name__}: {e})") from None
    if data != json.loads(json.dumps(hf_tokenizer_json(tokenizer))):
        raise TokenizerError(f"{path} differs from what nanochat.export writes for its vocabulary (special tokens "
                             f"{SPECIAL_TOKENS[0]}..{SPECIAL_TOKENS[-1]} after the ranks, merges, pattern): re-export it")
    return tokenizer


def chat_template():
    """Jinja for transformers' apply_chat_template: the ids of Tokenizer.render_conversation (add_generation_prompt:
    of render_for_completion). A leading system message joins the first user turn after a blank line."""
    def text(expr):  # message text: ordinary text, never a special token (see the module docstring)
        return "(" + expr + ") | replace('<|', '" + ESCAPE.replace("\u2060", "\\u2060") + "')"
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] ~ '\\n\\n' -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "<|bos|>"
        "{%- for message in turns -%}"
        "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
        "{{- raise_exception('roles must alternate user/assistant, after an optional leading system message') -}}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "<|user_start|>{{- " + text("(system if loop.first else '') ~ message['content']") + " -}}<|user_end|>"
        "{%- else -%}<|assistant_start|>"
        "{%- if message['content'] is string -%}{{- " + text("message['content']") + " -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'python' -%}<|python_start|>{{- " + text("part['text']") + " -}}<|python_end|>"
        "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{- " + text("part['text']") + " -}}<|output_end|>"
        "{%- else -%}{{- " + text("part['text']") + " -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}<|assistant_end|>"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
    )


# ---- export ---------------------------------------------------------------------------------------------------

def export(state, config: GPTConfig, tokenizer: Tokenizer, out_dir, provenance=None):
    """Write the transformers directory for a model's state dict (see the module docstring). Returns out_dir."""
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.get_vocab_size()} ids, the model {config.vocab_size}")
    check_expressible(config, state)
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"--out {out_dir} exists and is not an empty directory: pick another or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"  # beside --out: the final rename stays on one disk
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of this pid
    tmp.mkdir()
    try:
        save_file(to_hf_state(state, config), tmp / WEIGHTS, metadata={"format": "pt"})
        sp = tokenizer.special_ids
        files = {
            CONFIG: hf_config(config, tokenizer),
            "generation_config.json": {"bos_token_id": sp["<|bos|>"], "pad_token_id": sp["<|assistant_end|>"],
                                       "eos_token_id": [sp["<|assistant_end|>"], sp["<|bos|>"]]},
            TOKENIZER: hf_tokenizer_json(tokenizer),
            "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
                                      "eos_token": "<|assistant_end|>", "pad_token": "<|assistant_end|>",
                                      "model_max_length": config.sequence_len,
                                      "clean_up_tokenization_spaces": False},
            PROVENANCE: {"format_version": FORMAT_VERSION, "tokenizer": tokenizer.fingerprint(), **(provenance or {})},
        }
        for name, data in files.items():
            (tmp / name).write_text(json.dumps(data, indent=2))  # ASCII (\u escapes): any reader's encoding
        (tmp / "chat_template.jinja").write_text(chat_template())
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above): the rename below takes its place
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def export_checkpoint(spec, out_dir, base_dir=None, tokenizer_dir=None):
    """Export the checkpoint named by `spec` (as the Serve app and the chat CLI name them: "sft/d20", a tag or
    step dir; None = the latest chat checkpoint) with the tokenizer it was trained with. Returns out_dir."""
    ckpt_dir, step = resolve_checkpoint(spec, base_dir)
    state, meta = load_model_state(ckpt_dir, step)
    tokenizer = get_tokenizer(tokenizer_dir or Path(base_dir or get_base_dir()) / "tokenizer")
    if meta.get("tokenizer") and meta["tokenizer"] != tokenizer.fingerprint():
        raise ExportError(f"{ckpt_dir} step {step} was trained with tokenizer {meta['tokenizer']}, but "
                          f"{tokenizer_dir or 'the base dir tokenizer'} is {tokenizer.fingerprint()}: pass --tokenizer-dir")
    root = Path(base_dir or get_base_dir()) / "checkpoints"
    source = ckpt_dir.relative_to(root) if ckpt_dir.is_relative_to(root) else Path(ckpt_dir.name)
    provenance = {"checkpoint": str(source), "step": step, "phase": meta.get("phase")}
    return export(state, GPTConfig(**meta["model_config"]), tokenizer, out_dir, provenance)


# ---- loading an exported directory into our code --------------------------------------------------------------

def is_exported_dir(path):
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def load_exported(directory, device="cpu"):
    """(GPT in eval mode, Tokenizer, meta) from a directory written by export(); needs no transformers.
    Refuses, with one line, a config our GPT cannot compute and any misnamed, missing or extra tensor."""
    from safetensors.torch import load_file
    directory = Path(directory)
    try:
        cfg = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG} is not readable JSON ({e})") from None
    for key, want in required_config(cfg):
        if cfg.get(key) != want:
            raise CheckpointError(f"{directory / CONFIG}: {key} is {cfg.get(key)!r}, but nanochat's GPT computes "
                                  f"{want!r}: this model cannot run here")
    try:
        config = GPTConfig(sequence_len=cfg["max_position_embeddings"], vocab_size=cfg["vocab_size"],
                           n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"],
                           n_kv_head=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], n_embd=cfg["hidden_size"])
    except KeyError as e:
        raise CheckpointError(f"{directory / CONFIG} lacks {e.args[0]!r}") from None
    try:
        want = check_expressible(config, where=str(directory / CONFIG))
    except ExportError as e:
        raise CheckpointError(str(e)) from None
    tokenizer = tokenizer_from_hf(directory)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer.json has {tokenizer.get_vocab_size()} ids, config.json "
                              f"vocab_size {config.vocab_size}")
    try:
        tensors = load_file(directory / WEIGHTS, device=str(device))
    except Exception as e:  # a truncated or foreign file: safetensors' own message, with the file named
        raise CheckpointError(f"{directory / WEIGHTS} is unreadable: {type(e).__name__}: {e}") from None
    ours = {hf_name(name): name for name in want}
    unknown, missing = sorted(set(tensors) - set(ours)), sorted(set(ours) - set(tensors))
    if unknown or missing:
        what = f"unexpected tensor {unknown[0]!r}" if unknown else f"missing tensor {missing[0]!r}"
        raise CheckpointError(f"{directory / WEIGHTS}: {what} ({len(unknown)} unexpected, {len(missing)} missing): "
                              f"not a complete nanochat export")
    state = {}
    for name, tensor in tensors.items():
        name = ours[name]
        if name in VOCAB_ROWS:  # back to the padded vocabulary (the padding rows are never read: logits are cropped)
            tensor = torch.cat([tensor, tensor.new_zeros(want[name][0] - tensor.size(0), tensor.size(1))])
        if tuple(tensor.shape) != want[name]:
            raise CheckpointError(f"{directory / WEIGHTS}: {hf_name(name)} has shape {list(tensor.shape)}, "
                                  f"config.json implies {list(want[name])}")
        state[name] = tensor.float()
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_rotary()
    model.load_state_dict(state, strict=True)
    model.set_precision(resolve_precision(None, torch.device(device).type))
    model.eval()
    provenance = {}
    if (directory / PROVENANCE).is_file():
        provenance = json.loads((directory / PROVENANCE).read_text(encoding="utf-8"))
    meta = {**provenance, "step": provenance.get("step", 0), "model_config": config.to_dict(),
            "tokenizer": tokenizer.fingerprint(), "exported": str(directory)}
    return model, tokenizer, meta


# ---- command line ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = ArgumentParser(description="Export a checkpoint to a Hugging Face transformers directory "
                                "(NanoChat architecture, safetensors, tokenizer, chat template).")
    p.add_argument("--checkpoint", default=None, help="step dir, tag dir, or path under <base>/checkpoints, e.g. "
                   "sft/d20 or base/d20 (default: the latest chat checkpoint: sft, else mid, else rl)")
    p.add_argument("--out", required=True, help="the directory to write (must not exist, or be empty)")
    p.add_argument("--base-dir", default=None, help="nanochat base dir (default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    p.add_argument("--tokenizer-dir", default=None, help="default: <base>/tokenizer")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.base_dir, args.tokenizer_dir)
    except (CheckpointError, ExportError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: load it with transformers >= {MIN_TRANSFORMERS}, AutoModelForCausalLM.from_pretrained"
          f"({str(out)!r}), or serve it with --checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
