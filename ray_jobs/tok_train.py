"""Train the BPE tokenizer (Rust, rustbpe) on the first characters of the local training shards.

    python ray_jobs/tok_train.py --max-chars 2000000000 --vocab-size 65536

Writes the tokenizer to $NANOCHAT_BASE_DIR/tokenizer (or --out). Needs the training shards
(python -m nanochat.dataset -n 8). The speedrun runs main() as a Ray task.
"""
import json
import time

from nanochat.common import ArgumentParser, setup_logging

parser = ArgumentParser(description="Train the BPE tokenizer")
parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size, special tokens included")
parser.add_argument("--out", type=str, default=None, help="output directory (default: $NANOCHAT_BASE_DIR/tokenizer)")


def training_texts(max_chars, doc_cap):
    """Documents from the train shards, each cropped to doc_cap, until max_chars are given."""
    from nanochat.dataset import parquets_iter_batched
    total = 0
    for batch in parquets_iter_batched("train"):
        for text in batch:
            text = text[:doc_cap]
            yield text
            total += len(text)
            if total >= max_chars:
                return


def main(args):
    from nanochat.dataset import list_shard_paths
    from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
    log = setup_logging()
    list_shard_paths("train")  # no shards: say so before the trainer starts reading
    out = args.out or get_tokenizer_dir()
    t0 = time.time()
    counted = {"chars": 0, "docs": 0}

    def counting(texts):
        for t in texts:
            counted["chars"] += len(t)
            counted["docs"] += 1
            yield t

    tokenizer = Tokenizer.train_from_iterator(counting(training_texts(args.max_chars, args.doc_cap)), args.vocab_size)
    train_seconds = time.time() - t0
    tokenizer.save(out)
    result = {
        "vocab_size": tokenizer.get_vocab_size(), "train_chars": counted["chars"], "train_docs": counted["docs"],
        "doc_cap": args.doc_cap, "train_seconds": round(train_seconds, 2), "out": str(out),
    }
    log.info("tokenizer trained: %s", json.dumps(result))
    return result


if __name__ == "__main__":
    from nanochat.common import one_line_errors
    args = parser.parse_args()
    with one_line_errors("tok_train"):
        print(json.dumps(main(args)))
