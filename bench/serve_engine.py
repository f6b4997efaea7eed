"""The serving engine under chat-like load, in process: the Scheduler + BatchDecoder an engine replica runs
(no HTTP, no Ray), with prefix caching and chunked prefill vs the decoder as it was before them. Prints ONE
JSON line.

    python bench/serve_engine.py --threads 1 --out bench/results/serve_engine_cpu-2core.json

Peers, on one random-weight model (depth --depth, vocab 65536, context 2048) in this process, each a fresh
Scheduler per scenario, run alternately:
- cached: a --prefix-cache-mb pool and --prefill-chunk tokens per step (the serving defaults);
- plain:  no pool, whole prompts prefilled at once: the decoding path before this change (same sampler).
Scenarios (token ids, no tokenizer: the model's special tokens are never sampled, so every reply runs to
its max_tokens; four fixed ordinary ids stand in for the chat markers):
- turns: a chat of --turns turns, --user-tokens per user turn and --reply-tokens per reply, the whole history
  sent every turn as the chat page and OpenAI clients do (turn 10's prompt holds ~1.2k tokens). Time to first
  token (TTFT) per turn over --repeats chats (each its own random tokens). Goal: turn 10 within 1.5x of
  turn 1 with the cache.
- long_prompt: --streams streams decode; once each has --warm-tokens tokens, a --long-prompt-token prompt
  arrives. Pause: the longest gap between two tokens of a running stream from its arrival to its first
  token, vs the streams' median inter-token time over their whole run. Goal: pause under 3x the median.
  Run for every --chunks value (cached peer) to choose the default chunk, and for the plain peer.
- clients: --clients concurrent clients, each sending --requests short prompts back to back (--max-tokens
  each): aggregate tokens/s. Goal: cached not lower than plain.
Sampling: temperature 1, top-k 50, seeded per request. Every scenario runs --repeats times, the peers
interleaved; the fastest run counts (TTFT per turn, tokens/s) and, for pauses, the run with the smallest
ratio, the median run beside it: on a shared machine the slower runs measure the neighbours (a process
descheduled for a while shows as a pause in any peer). cpu_cores_used says how much CPU this process got.
"""
import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 x depth)")
parser.add_argument("--vocab-size", type=int, default=65536)
parser.add_argument("--seq-len", type=int, default=2048, help="model context")
parser.add_argument("--max-batch", type=int, default=32)
parser.add_argument("--prefix-cache-mb", type=float, default=1024)
parser.add_argument("--prefill-chunk", type=int, default=256, help="the cached peer's chunk in turns and clients")
parser.add_argument("--turns", type=int, default=10)
parser.add_argument("--user-tokens", type=int, default=60)
parser.add_argument("--reply-tokens", type=int, default=60)
parser.add_argument("--repeats", type=int, default=3, help="chats per peer in the turns scenario")
parser.add_argument("--streams", type=int, default=8)
parser.add_argument("--warm-tokens", type=int, default=24, help="tokens each stream has when the long prompt comes")
parser.add_argument("--long-prompt", type=int, default=2000)
parser.add_argument("--chunks", default="64,128,256,512", help="chunk sizes swept in the long-prompt scenario")
parser.add_argument("--clients", type=int, default=32)
parser.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request in the clients scenario")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")
args = parser.parse_args()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout
import torch  # noqa: E402

from bench.common import NoStopTokenizer, emit, machine_info  # noqa: E402
from nanochat.common import autodetect_device_type  # noqa: E402
from nanochat.engine import cast_for_inference  # noqa: E402
from nanochat.gpt import GPTConfig, create_model  # noqa: E402
from serve_app.scheduler import Scheduler  # noqa: E402

USER_START, USER_END, ASSISTANT_START, ASSISTANT_END = 1, 2, 3, 4  # stand-ins for the chat markers
SAMPLING = dict(temperature=1.0, top_k=50)


def peers(chunk=None):
    return {"cached": dict(prefix_cache_mb=args.prefix_cache_mb, prefill_chunk=chunk or args.prefill_chunk),
            "plain": dict(prefix_cache_mb=0, prefill_chunk=None)}


def scheduler(model, tokenizer, options):
    return Scheduler(model, tokenizer, args.max_batch, args.seq_len, **options)


async def timed(stream):
    """Drain a token stream: (arrival time of each chunk of tokens, tokens in it)."""
    out = []
    async for tokens in stream:
        out.append((time.perf_counter(), len(tokens), tokens))
    return out


async def chat(sched, rng, seed):
    """One chat of --turns turns; returns TTFT per turn (seconds) and the last prompt's length."""
    history, ttfts = [0], []  # 0: the <|bos|> stand-in
    for turn in range(args.turns):
        user = torch.randint(5, args.vocab_size, (args.user_tokens,), generator=rng).tolist()
        history += [USER_START, *user, USER_END, ASSISTANT_START]
        t0 = time.perf_counter()
        chunks = await timed(sched.generate(list(history), args.reply_tokens, seed=seed + turn, **SAMPLING))
        ttfts.append(chunks[0][0] - t0)
        reply = [t for _, _, tokens in chunks for t in tokens]
        assert len(reply) == args.reply_tokens, "a reply stopped early"
        history += [*reply, ASSISTANT_END]
    return ttfts, len(history)


async def long_prompt(sched, rng):
    """--streams streams, then a long prompt: (pause, median inter-token time, long prompt's TTFT)."""
    prompts = [torch.randint(5, args.vocab_size, (64,), generator=rng).tolist() for _ in range(args.streams)]
    room = args.warm_tokens + 160  # enough for the long prompt to load and decode while they run
    streams = [asyncio.create_task(timed(sched.generate(p, room, seed=i, **SAMPLING))) for i, p in enumerate(prompts)]
    while sched.stats()["tokens_generated"] < args.streams * args.warm_tokens:
        await asyncio.sleep(0.001)
    long = torch.randint(5, args.vocab_size, (args.long_prompt,), generator=rng).tolist()
    t0 = time.perf_counter()
    long_chunks = await timed(sched.generate(long, 8, seed=99, **SAMPLING))
    t1 = long_chunks[0][0]
    runs = await asyncio.gather(*streams)
    gaps, pause = [], 0.0
    for chunks in runs:
        times = [t for t, _, _ in chunks]
        for a, b in zip(times, times[1:]):
            gaps.append(b - a)
            if b > t0 and a < t1:  # a gap overlapping the long prompt's load
                pause = max(pause, b - a)
    return pause, statistics.median(gaps), t1 - t0


async def clients(sched):
    """--clients clients x --requests short prompts each: aggregate completion tokens/s."""
    async def client(c):
        n = 0
        for k in range(args.requests):
            prompt = [0, USER_START, 100 + c, 200 + k, USER_END, ASSISTANT_START]
            chunks = await timed(sched.generate(prompt, args.max_tokens, seed=c * 100 + k, **SAMPLING))
            n += sum(n_tokens for _, n_tokens, _ in chunks)
        return n

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[client(c) for c in range(args.clients)]))
    assert tokens == args.clients * args.requests * args.max_tokens, "a request stopped early"
    return tokens / (time.perf_counter() - t0)


def main():
    wall0, cpu0 = time.perf_counter(), sum(os.times()[:2])
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    device = torch.device(autodetect_device_type())
    config = GPTConfig.from_depth(args.depth, args.vocab_size, sequence_len=args.seq_len)
    torch.manual_seed(0)
    model = cast_for_inference(create_model(config, device))
    tokenizer = NoStopTokenizer(args.vocab_size)
    warm = scheduler(model, tokenizer, peers()["cached"])
    asyncio.run(timed(warm.generate(list(range(5, 300)), 4)))  # warm-up: kernels, allocator

    turns = {name: [] for name in peers()}
    for r in range(args.repeats):
        for name, options in peers().items():
            rng = torch.Generator().manual_seed(r)
            ttfts, history = asyncio.run(chat(scheduler(model, tokenizer, options), rng, r))
            turns[name].append(ttfts)
    ttft = {name: [round(min(t[i] for t in runs), 4) for i in range(args.turns)] for name, runs in turns.items()}
    ttft_median = {name: [round(statistics.median(t[i] for t in runs), 4) for i in range(args.turns)]
                   for name, runs in turns.items()}

    configs = {f"cached_chunk_{c}": peers(int(c))["cached"] for c in args.chunks.split(",")}
    configs["plain"] = peers()["plain"]
    long_runs = {name: [] for name in configs}
    for r in range(args.repeats):
        for name, options in configs.items():
            pause, median, long_ttft = asyncio.run(long_prompt(scheduler(model, tokenizer, options),
                                                                 torch.Generator().manual_seed(7 + r)))
            long_runs[name].append({"pause_s": round(pause, 4), "median_itt_s": round(median, 4),
                                    "pause_vs_median": round(pause / median, 2),
                                    "long_prompt_ttft_s": round(long_ttft, 3)})
    long_summary = {name: {"best": min(runs, key=lambda run: run["pause_vs_median"]),
                           "median_pause_vs_median": statistics.median(run["pause_vs_median"] for run in runs),
                           "long_prompt_ttft_s": min(run["long_prompt_ttft_s"] for run in runs), "runs": runs}
                    for name, runs in long_runs.items()}

    throughput = {name: [] for name in peers()}
    for _ in range(args.repeats):
        for name, options in peers().items():
            throughput[name].append(asyncio.run(clients(scheduler(model, tokenizer, options))))
    tokens_per_s = {name: round(max(rates), 1) for name, rates in throughput.items()}

    info["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    info["cpu_cores_used"] = round((sum(os.times()[:2]) - cpu0) / (time.perf_counter() - wall0), 2)
    info["torch_threads"] = torch.get_num_threads()
    result = {
        "bench": "serve_engine", "command": "python " + " ".join(sys.argv), "depth": args.depth,
        "config": config.to_dict(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "peers": {"cached": f"prefix cache {args.prefix_cache_mb:g} MB + chunked prefill",
                  "plain": "no prefix cache, whole prompts at once (the decoder before them)"},
        "turns": {"history_tokens_at_last_turn": history, "ttft_s": ttft, "ttft_median_s": ttft_median,
                  "last_vs_first": {name: round(t[-1] / t[0], 2) for name, t in ttft.items()},
                  "goal_last_vs_first": 1.5},
        "long_prompt": {**long_summary, "goal_pause_vs_median": 3.0},
        "clients": {"clients": args.clients, "tokens_per_s": tokens_per_s,
                    "tokens_per_s_runs": {k: [round(x, 1) for x in v] for k, v in throughput.items()},
                    "cached_vs_plain": round(tokens_per_s["cached"] / tokens_per_s["plain"], 3)},
        "machine": info,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
