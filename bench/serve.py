"""Serving under load: time to first token and total tokens/s for N concurrent streaming clients, through the
whole app (HTTP proxy -> ingress -> engine replica), continuous batching vs one request per replica at a
time. Prints ONE JSON line.

    python bench/serve.py --depth 4 --clients 1,8,32 --out bench/results/serve_cpu-2core.json
    python bench/serve.py --clients 32 --peers continuous,continuous_plain \\
        --out bench/results/serve_32_clients_cpu-2core.json

Peers, deployed side by side in one local Ray (same model, one engine replica each, same settings):
- continuous:       the app as shipped: requests join the running batch (--max-batch slots), prefix cache
                    and chunked prefill at their defaults;
- continuous_plain: the same without prefix cache and chunked prefill (whole prompts at once): the
                    decoder before them;
- one_per_replica:  the app with max batch 1: a replica decodes one request at a time, the rest wait;
- continuous_no_metrics: continuous without Ray metrics (--no-metrics): what the metrics cost.
Each of N clients sends --requests streaming requests back to back (OpenAI chat API, --max-tokens each);
the peers alternate per N (a shared machine drifts). TTFT: request sent -> first content chunk, p50/p90
over all requests; tokens/s: completion tokens of all requests / wall time of the round.
The model has random weights (a byte-pair vocabulary of --vocab-size, no training needed) whose special
tokens are never sampled: every request generates exactly --max-tokens tokens.
"""
import argparse
import asyncio
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 x depth)")
parser.add_argument("--seq-len", type=int, default=512, help="model context")
parser.add_argument("--vocab-size", type=int, default=65536)
parser.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
parser.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
parser.add_argument("--max-batch", type=int, default=32, help="the continuous peer's batch slots")
parser.add_argument("--cpus-per-replica", type=float, default=2.0)
parser.add_argument("--gpus-per-replica", type=float, default=0.0)
parser.add_argument("--peers", default="continuous,one_per_replica", help="comma-separated, from the docstring's list")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")
args = parser.parse_args()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout
import httpx  # noqa: E402

from bench.common import emit, machine_info  # noqa: E402
import ray_jobs  # noqa: E402,F401 (before ray: the Ray settings every phase runs with)
import ray  # noqa: E402
from ray import serve  # noqa: E402

from nanochat.checkpoint import checkpoint_dir  # noqa: E402
from nanochat.gpt import GPTConfig  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402
from serve_app.app import build_app  # noqa: E402
from serve_app.random_model import save_random_checkpoint  # noqa: E402

PEERS = {"continuous": {"max_batch": args.max_batch},
         "continuous_plain": {"max_batch": args.max_batch, "prefix_cache_mb": 0, "prefill_chunk": 0},
         "one_per_replica": {"max_batch": 1},
         "continuous_no_metrics": {"max_batch": args.max_batch, "metrics": False}}
PEERS = {name: PEERS[name] for name in args.peers.split(",")}
TOPICS = ["the sea", "a red fox", "bread", "the moon", "winter", "a train", "old maps", "bees"]


def byte_pair_tokenizer(vocab_size):
    """256 byte tokens, then two-byte tokens, up to vocab_size ids with the special tokens: a valid BPE
    vocabulary (every token's halves are tokens) that needs no training."""
    ranks = {bytes([i]): i for i in range(256)}
    pairs = (bytes([a, b]) for a in range(256) for b in range(256))
    while len(ranks) < vocab_size - len(SPECIAL_TOKENS):
        ranks[next(pairs)] = len(ranks)
    return Tokenizer(ranks)





async def one_request(client, url, i):
    """Stream one chat completion: (seconds to the first content chunk, seconds in all, completion tokens)."""
    body = {"model": "nanochat", "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": args.max_tokens, "temperature": 1.0, "top_k": 50, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, None
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - t0, tokens


async def round_of(url, clients):
    async def client_loop(client, c):
        return [await one_request(client, url, c * args.requests + k) for k in range(args.requests)]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[client_loop(client, c) for c in range(clients)])
        wall = time.perf_counter() - t0
    results = [r for rs in results for r in rs]
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    assert tokens == len(results) * args.max_tokens, "a request stopped early"
    return {"requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p90_s": round(ttft[math.ceil(0.9 * len(ttft)) - 1], 3),  # nearest rank
            "request_s_mean": round(statistics.mean(r[1] for r in results), 2)}


def main():
    info = machine_info()
    base = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    tokenizer = byte_pair_tokenizer(args.vocab_size)
    tokenizer.save(base / "tokenizer")
    config = GPTConfig.from_depth(args.depth, tokenizer.get_vocab_size(), sequence_len=args.seq_len)
    save_random_checkpoint(checkpoint_dir("sft", "bench", base), tokenizer, config)

    ray.init(address="local", num_cpus=max(4, 2 * args.cpus_per_replica), include_dashboard=False,
             log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, peer in PEERS.items():
        settings = {"checkpoint": "sft/bench", "base_dir": str(base), "ui": False, **peer,
                    "cpus_per_replica": args.cpus_per_replica, "gpus_per_replica": args.gpus_per_replica,
                    "max_ongoing_requests": 64}
        serve.run(build_app(settings), name=name, route_prefix=f"/{name}")
    urls = {name: f"http://127.0.0.1:{port}/{name}/v1/chat/completions" for name in PEERS}
    for url in urls.values():  # warm-up: first forward passes, connections
        asyncio.run(round_of(url, 2))

    results = {name: {} for name in PEERS}
    for clients in [int(c) for c in args.clients.split(",")]:
        for name, url in urls.items():
            results[name][str(clients)] = asyncio.run(round_of(url, clients))
    serve.shutdown()
    ray.shutdown()
    first, *others = PEERS
    ratios = {f"{first}_vs_{other}_tokens_per_s": {n: round(results[first][n]["tokens_per_s"] / r["tokens_per_s"], 2)
                                                   for n, r in results[other].items()} for other in others}
    emit({"bench": "serve", "depth": args.depth, "config": config.to_dict(),
          "max_tokens": args.max_tokens, "requests_per_client": args.requests, "max_batch": args.max_batch,
          "cpus_per_replica": args.cpus_per_replica, "peers": PEERS, "results": results, **ratios, "machine": info},
         args.out)


if __name__ == "__main__":
    main()
