"""Benchmark tokenizer training: our rustbpe vs the rustbpe wheel on PyPI vs HuggingFace tokenizers.

Trains each on the same pretraining text at each vocab size and reports training seconds and
bytes/token on the validation shard (all three encoded by tiktoken from their merges, with the
same split pattern). Prints ONE JSON line.

    NANOCHAT_MIRROR=../shared/datasets python bench/tokenizer.py --repeats 2 --out bench/results/tokenizer_cpu-2core.json

Our rustbpe and PyPI's share a module name, so each trainer runs in its own process: ours
under this interpreter, the peers under a venv that this script creates with uv under
~/.cache/nanochat/bench_venvs (PyPI rustbpe + tokenizers). Runs alternate between trainers,
and with --repeats > 1 the best time counts (shared machines are noisy).
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--max-chars", type=int, default=100_000_000, help="training characters (at most)")
parser.add_argument("--doc-chars", type=int, default=10_000, help="cap on characters per document")
parser.add_argument("--val-chars", type=int, default=10_000_000, help="validation characters for bytes/token")
parser.add_argument("--vocab-sizes", default="65536,8192", help="comma-separated; include the 256 bytes")
parser.add_argument("--trainers", default="ours,pypi,hf", help="comma-separated subset of ours,pypi,hf")
parser.add_argument("--repeats", type=int, default=1, help="runs per trainer and vocab size (best counts)")
parser.add_argument("--pypi-rustbpe", default="0.1.0", help="version of the PyPI rustbpe wheel to compare with")
parser.add_argument("--hf-tokenizers", default="0.23.3", help="version of HuggingFace tokenizers to compare with")
# internal: run one training in this process and write its ranks
parser.add_argument("--out", default=None, help="also write the JSON line to this file")
parser.add_argument("--worker", choices=["rustbpe", "hf"], help=argparse.SUPPRESS)
parser.add_argument("--texts", help=argparse.SUPPRESS)
parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
parser.add_argument("--ranks-out", help=argparse.SUPPRESS)

# nanochat's split pattern (GPT-4's with \p{N}{1,2}); passed explicitly to every trainer.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
VENV_DIR = Path.home() / ".cache" / "nanochat" / "bench_venvs"

# -----------------------------------------------------------------------------
# worker side: stdlib + the trainer only (runs under either interpreter)

def read_texts(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_ranks(path, ranks):
    """One 'base64(token) rank' line per token: plain text, no pickles."""
    with open(path, "w") as f:
        for token, rank in ranks:
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def train_rustbpe(texts, vocab_size):
    import rustbpe
    tok = rustbpe.Tokenizer()
    t0 = time.perf_counter()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=SPLIT_PATTERN)
    seconds = time.perf_counter() - t0
    return seconds, tok.get_mergeable_ranks()


def bytes_to_unicode():
    """GPT-2's byte -> printable char table that HF's ByteLevel uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_hf(texts, vocab_size):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    # same split regex, then bytes -> ByteLevel chars (no regex of its own, no prefix space)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=0, show_progress=False)
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer=trainer)
    seconds = time.perf_counter() - t0
    # merges in order -> byte-level ranks (256 bytes first, like the others)
    decode = {c: b for b, c in bytes_to_unicode().items()}
    merges = json.loads(tok.to_str())["model"]["merges"]
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(decode[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    return seconds, list(ranks.items())


def cpu_seconds():
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb():
    """VmHWM of this process (Linux). Not ru_maxrss: that one keeps the parent's peak across exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def worker(args):
    texts = read_texts(args.texts)
    train = train_rustbpe if args.worker == "rustbpe" else train_hf
    cpu0 = cpu_seconds()
    seconds, ranks = train(texts, args.vocab_size)
    cpu = cpu_seconds() - cpu0  # less sensitive than wall time to other load on the machine
    write_ranks(args.ranks_out, ranks)
    max_rss_mb = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "max_rss_mb": max_rss_mb}))

# -----------------------------------------------------------------------------
# driver side

def load_texts(mirror, shards, max_chars, doc_chars):
    import pyarrow.parquet as pq
    texts, total = [], 0
    for shard in shards:
        for text in pq.read_table(Path(mirror) / "pretrain" / shard, columns=["text"]).column("text").to_pylist():
            text = text[:doc_chars]
            if total + len(text) > max_chars:
                return texts
            texts.append(text)
            total += len(text)
    return texts


def peer_python(pypi_version, hf_version):
    """A venv with the PyPI rustbpe wheel and HF tokenizers, made once with uv."""
    venv = VENV_DIR / f"rustbpe-{pypi_version}_tokenizers-{hf_version}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run(["uv", "venv", "-q", "-p", sys.executable, str(venv)], check=True)
        subprocess.run(["uv", "pip", "install", "-q", "-p", str(python),
                        f"rustbpe=={pypi_version}", f"tokenizers=={hf_version}"], check=True)
    return str(python)


def package_version(python, package):
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def run_worker(python, kind, texts_path, vocab_size, tmp):
    ranks_path = os.path.join(tmp, "ranks.txt")
    cmd = [python, os.path.abspath(__file__), "--worker", kind, "--texts", texts_path,
           "--vocab-size", str(vocab_size), "--ranks-out", ranks_path]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{kind} worker under {python} failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with open(ranks_path) as f:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in f)}
    return result, ranks


def bytes_per_token(ranks, val_texts):
    import tiktoken
    enc = tiktoken.Encoding(name="bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    n_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(val_texts))
    return sum(len(t.encode("utf-8")) for t in val_texts) / n_tokens


def main(args):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the driver side only: workers stay stdlib
    from bench.common import emit, machine_info
    machine = machine_info()  # the load average before the runs (emit adds the one after)
    mirror = os.environ.get("NANOCHAT_MIRROR")
    if not mirror:
        sys.exit("set NANOCHAT_MIRROR to the dataset mirror directory (the one holding pretrain/shard_*.parquet)")
    texts = load_texts(mirror, [f"shard_0000{i}.parquet" for i in range(4)], args.max_chars, args.doc_chars)
    val_texts = load_texts(mirror, ["shard_00004.parquet"], args.val_chars, args.doc_chars)
    trainers = args.trainers.split(",")
    peer = peer_python(args.pypi_rustbpe, args.hf_tokenizers) if {"pypi", "hf"} & set(trainers) else None
    pythons = {"ours": (sys.executable, "rustbpe"), "pypi": (peer, "rustbpe"), "hf": (peer, "hf")}

    results, all_ranks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        texts_path = os.path.join(tmp, "texts.json")
        with open(texts_path, "w", encoding="utf-8") as f:
            json.dump(texts, f)
        for vocab_size in map(int, args.vocab_sizes.split(",")):
            for rep in range(args.repeats):
                order = trainers if rep % 2 == 0 else trainers[::-1]  # alternate who goes first
                for name in order:
                    python, kind = pythons[name]
                    run, ranks = run_worker(python, kind, texts_path, vocab_size, tmp)
                    print(f"{name} vocab {vocab_size}: {run['seconds']:.2f}s wall, {run['cpu_seconds']:.2f}s cpu",
                          file=sys.stderr)
                    r = results.setdefault(f"{name}_{vocab_size}", {"seconds_all": [], "cpu_seconds_all": []})
                    r["seconds_all"].append(round(run["seconds"], 3))
                    r["cpu_seconds_all"].append(round(run["cpu_seconds"], 3))
                    r["seconds"], r["cpu_seconds"] = min(r["seconds_all"]), min(r["cpu_seconds_all"])
                    r["max_rss_mb"] = round(max(r.get("max_rss_mb", 0), run["max_rss_mb"]))
                    if "bytes_per_token" not in r:
                        all_ranks[name] = ranks
                        r["vocab_size"] = len(ranks)
                        r["bytes_per_token"] = round(bytes_per_token(ranks, val_texts), 4)
            ours, pypi = results.get(f"ours_{vocab_size}"), results.get(f"pypi_{vocab_size}")
            if ours and pypi:
                results[f"speedup_vs_pypi_{vocab_size}"] = round(pypi["seconds"] / ours["seconds"], 3)
                results[f"cpu_speedup_vs_pypi_{vocab_size}"] = round(pypi["cpu_seconds"] / ours["cpu_seconds"], 3)
                results[f"same_merges_as_pypi_{vocab_size}"] = all_ranks["ours"] == all_ranks["pypi"]
            all_ranks.clear()

    versions = {"tiktoken": package_version(sys.executable, "tiktoken")}
    if peer:
        versions.update(pypi_rustbpe=package_version(peer, "rustbpe"), hf_tokenizers=package_version(peer, "tokenizers"))
    emit({
        "bench": "tokenizer_training",
        "train_docs": len(texts), "train_chars": sum(map(len, texts)),
        "val_docs": len(val_texts), "val_chars": sum(map(len, val_texts)),
        "doc_chars_cap": args.doc_chars, "pattern": SPLIT_PATTERN,
        "results": results, "versions": versions, "machine": machine,
    }, args.out)


if __name__ == "__main__":
    args = parser.parse_args()
    worker(args) if args.worker else main(args)
