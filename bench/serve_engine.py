"""The serving engine under chat-like load, in process: the Scheduler + BatchDecoder an engine replica runs
(no HTTP, no Ray), with prefix caching and chunked prefill vs the decoder as it was before them. Prints ONE
JSON line.

    python bench/serve_engine.py --threads 1 --out bench/results/serve_engine_cpu-2core.json

Peers, on one random-weight model (depth --depth, vocab 65536, context 2048) in this process, each one
Scheduler kept for the whole run and warmed up first (as a replica keeps its own), run alternately:
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
descheduled for a while shows as a pause in any peer). Each figure comes twice: "wall", as measured, and
"cpu", from the decode thread's CPU time per step (one torch thread: --threads 1), which is what the steps
take on a core of their own: TTFT = CPU time of the steps from the request's arrival to its first token,
pause = the longest step during the load vs the median step, tokens/s = tokens / CPU time of all steps.
cpu_cores_used says how much CPU this process got in all.
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
parser.add_argument("--prefill-chunk", type=int, default=128, help="the cached peer's chunk in turns and clients")
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
parser.add_argument("--client-rounds", type=int, default=5, help="rounds of the clients scenario per peer")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--scenarios", default="turns,long_prompt,clients", help="which to run, comma-separated")
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


class StepClock:
    """Wraps a scheduler's decoder.step: per step, (wall time at its end, the decode thread's CPU seconds
    in it). With one torch thread the step's compute runs in that thread, so its CPU time is what the step
    takes on a core of its own, whatever the neighbours do to the wall time."""

    def __init__(self, scheduler):
        self.steps = []
        decoder, inner = scheduler.decoder, scheduler.decoder.step

        def step():
            cpu0 = time.thread_time()
            events = inner()
            self.steps.append((time.perf_counter(), time.thread_time() - cpu0))
            return events
        decoder.step = step

    def cpu_between(self, t0, t1):
        """CPU seconds of the steps that ended in (t0, t1]."""
        return [cpu for end, cpu in self.steps if t0 < end <= t1]


async def timed(stream):
    """Drain a token stream: (arrival time of each chunk of tokens, tokens in it)."""
    out = []
    async for tokens in stream:
        out.append((time.perf_counter(), tokens))
    return out


async def serving(model, tokenizer, options):
    """A scheduler as a replica holds it, warmed up (its KV cache allocated, kernels run), with a StepClock."""
    sched = Scheduler(model, tokenizer, args.max_batch, args.seq_len, **options)
    await timed(sched.generate(list(range(5, 300)), 4))
    return sched, StepClock(sched)


async def chat(sched, clock, rng, seed):
    """One chat of --turns turns: per turn (wall TTFT, CPU TTFT), and the last prompt's length."""
    history, ttfts = [0], []  # 0: the <|bos|> stand-in
    for turn in range(args.turns):
        user = torch.randint(5, args.vocab_size, (args.user_tokens,), generator=rng).tolist()
        history += [USER_START, *user, USER_END, ASSISTANT_START]
        t0 = time.perf_counter()
        chunks = await timed(sched.generate(list(history), args.reply_tokens, seed=seed + turn, **SAMPLING))
        t1 = chunks[0][0]
        ttfts.append((t1 - t0, sum(clock.cpu_between(t0, t1))))
        reply = [t for _, tokens in chunks for t in tokens]
        assert len(reply) == args.reply_tokens, "a reply stopped early"
        history += [*reply, ASSISTANT_END]
    return ttfts, len(history)


async def long_prompt(sched, clock, rng):
    """--streams streams, then a long prompt arrives. Wall: the longest gap between two tokens of a stream
    during its load, and their median gap; CPU: the longest step during the load, and the median step."""
    clock.steps.clear()
    prompts = [torch.randint(5, args.vocab_size, (64,), generator=rng).tolist() for _ in range(args.streams)]
    room = args.warm_tokens + 160  # enough for the long prompt to load and decode while they run
    streams = [asyncio.create_task(timed(sched.generate(p, room, seed=i, **SAMPLING))) for i, p in enumerate(prompts)]
    start = sched.stats()["tokens_generated"]  # the scheduler served the other scenarios before
    while sched.stats()["tokens_generated"] < start + args.streams * args.warm_tokens:
        await asyncio.sleep(0.001)
    long = torch.randint(5, args.vocab_size, (args.long_prompt,), generator=rng).tolist()
    t0 = time.perf_counter()
    t1 = (await timed(sched.generate(long, 8, seed=99, **SAMPLING)))[0][0]
    runs = await asyncio.gather(*streams)
    gaps, pause = [], 0.0
    for chunks in runs:
        times = [t for t, _ in chunks]
        for a, b in zip(times, times[1:]):
            gaps.append(b - a)
            if b > t0 and a < t1:  # a gap overlapping the long prompt's load
                pause = max(pause, b - a)
    loading, steps = clock.cpu_between(t0, t1), [cpu for _, cpu in clock.steps]

    def row(pause, median, ttft):
        return {"pause_s": round(pause, 4), "median_itt_s": round(median, 4),
                "pause_vs_median": round(pause / median, 2), "long_prompt_ttft_s": round(ttft, 3)}
    return {"wall": row(pause, statistics.median(gaps), t1 - t0),
            "cpu": row(max(loading), statistics.median(steps), sum(loading))}


async def clients(sched, clock):
    """--clients clients x --requests short prompts each: aggregate completion tokens/s (wall, and per CPU
    second of the decode steps)."""
    async def client(c):
        n = 0
        for k in range(args.requests):
            prompt = [0, USER_START, 100 + c, 200 + k, USER_END, ASSISTANT_START]
            n += sum(len(tokens) for _, tokens in await timed(sched.generate(prompt, args.max_tokens, seed=c * 100 + k,
                                                                               **SAMPLING)))
        return n

    clock.steps.clear()
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[client(c) for c in range(args.clients)]))
    assert tokens == args.clients * args.requests * args.max_tokens, "a request stopped early"
    return {"wall": tokens / (time.perf_counter() - t0), "cpu": tokens / sum(c for _, c in clock.steps)}


def best_runs(runs, key):
    """The run with the smallest pause ratio by `key` (wall or cpu), and the median ratio."""
    return {"best": min(runs, key=lambda r: r[key]["pause_vs_median"]),
            "median_pause_vs_median": statistics.median(r[key]["pause_vs_median"] for r in runs)}


async def scenarios(model, tokenizer):
    serving_peers = {name: await serving(model, tokenizer, options) for name, options in peers().items()}
    wanted, results = args.scenarios.split(","), {}
    if "turns" in wanted:
        results["turns"] = await turns_scenario(serving_peers)
    if "long_prompt" in wanted:
        results["long_prompt"] = await long_prompt_scenario(model, tokenizer, serving_peers)
    if "clients" in wanted:
        results["clients"] = await clients_scenario(serving_peers)
    return results


async def turns_scenario(serving_peers):
    turns = {name: [] for name in peers()}
    for r in range(args.repeats):
        for name, (sched, clock) in serving_peers.items():
            ttfts, history = await chat(sched, clock, torch.Generator().manual_seed(r), r)
            turns[name].append(ttfts)
    ttft = {kind: {name: [round(min(run[i][k] for run in runs), 4) for i in range(args.turns)]
                   for name, runs in turns.items()} for k, kind in enumerate(("wall", "cpu"))}
    return {"history_tokens_at_last_turn": history, "ttft_s": ttft,
            "last_vs_first": {kind: {name: round(t[-1] / t[0], 2) for name, t in by_peer.items()}
                              for kind, by_peer in ttft.items()}, "goal_last_vs_first": 1.5}


async def long_prompt_scenario(model, tokenizer, serving_peers):
    configs = {f"cached_chunk_{c}": peers(int(c))["cached"] for c in args.chunks.split(",")}
    configs["plain"] = serving_peers["plain"]
    long_peers = {name: options if isinstance(options, tuple) else await serving(model, tokenizer, options)
                  for name, options in configs.items()}
    long_runs = {name: [] for name in long_peers}
    for r in range(args.repeats):
        for name, (sched, clock) in long_peers.items():
            long_runs[name].append(await long_prompt(sched, clock, torch.Generator().manual_seed(7 + r)))
    long_summary = {name: {kind: best_runs(runs, kind) for kind in ("wall", "cpu")} | {"runs": runs}
                    for name, runs in long_runs.items()}
    return {**long_summary, "goal_pause_vs_median": 3.0}


async def clients_scenario(serving_peers):
    throughput = {name: [] for name in peers()}
    for _ in range(args.client_rounds):
        for name, (sched, clock) in serving_peers.items():
            throughput[name].append(await clients(sched, clock))
    tokens_per_s = {kind: {name: round(max(run[kind] for run in runs), 1) for name, runs in throughput.items()}
                    for kind in ("wall", "cpu")}
    return {"clients": args.clients, "tokens_per_s": tokens_per_s,
            "runs": {name: [{kind: round(rate, 1) for kind, rate in run.items()} for run in runs]
                     for name, runs in throughput.items()},
            "cached_vs_plain": {kind: round(t["cached"] / t["plain"], 3) for kind, t in tokens_per_s.items()}}


def main():
    wall0, cpu0 = time.perf_counter(), sum(os.times()[:2])
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    device = torch.device(autodetect_device_type())
    config = GPTConfig.from_depth(args.depth, args.vocab_size, sequence_len=args.seq_len)
    torch.manual_seed(0)
    model = cast_for_inference(create_model(config, device))
    results = asyncio.run(scenarios(model, NoStopTokenizer(args.vocab_size)))
    info["cpu_cores_used"] = round((sum(os.times()[:2]) - cpu0) / (time.perf_counter() - wall0), 2)
    info["torch_threads"] = torch.get_num_threads()
    result = {"bench": "serve_engine", "depth": args.depth,
              "config": config.to_dict(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "peers": {"cached": f"prefix cache {args.prefix_cache_mb:g} MB + chunked prefill",
                        "plain": "no prefix cache, whole prompts at once (the decoder before them)"},
              **results, "machine": info}
    emit(result, args.out)


if __name__ == "__main__":
    main()
