"""Inference throughput: prefill and decode tokens/s at batch 1 and 32, the Engine (KV cache) vs the naive
GPT.generate (no cache: the whole sequence re-run for every new token). Prints ONE JSON line.

    python bench/engine.py --depth 4 --device cpu --threads 1 --out bench/results/engine_cpu-2core.json
    python bench/engine.py --depth 20 --device cuda --prompt-len 512 --max-tokens 256   # + bandwidth use

Peers, on one random-weight model in one process:
- engine:  Engine.generate: the prompt prefilled once (batch 1), then N samples decoded together;
- naive:   GPT.generate. At batch N the peer is N sequential runs of it; the runs are identical, so their
           tokens/s is one run's, and one run is timed;
- decoder: BatchDecoder, the serving path: N different prompts of different lengths (P down to P/2), each
           prefilled alone, then decoded in one batch with per-row positions (attention mask on);
- decoder_static: the same with static=True: the fixed-shape decode step (every slot computed, positions
           on the device);
- decoder_graphs: (CUDA) the static step captured as CUDA graphs.
Prefill tokens/s = prompt tokens / time to the first token (its sampling included); decode tokens/s =
the tokens after the first / the time they took. Every case runs --repeats times, the cases interleaved,
and keeps its fastest times: on a shared machine the slower runs measure the neighbours. On a busy CPU
box, --threads 1 is steadier: with 2 threads every op waits for the slower (descheduled) one. The special tokens get ids outside the model's vocab, so
random weights never stop a run early: every run decodes exactly --max-tokens per row.
The model holds its weights as served (cast_for_inference: bf16 on GPUs, fp32 on the CPU). On CUDA,
decode's memory-bandwidth use: bytes read per decode step (the weights as stored, the embedding table aside,
plus the KV cache at its average length) / step time / the GPU's peak bandwidth.
Needs torch only (no ray): runs on a bare GPU box from a checkout.
"""
import argparse
import os
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 x depth)")
parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per row")
parser.add_argument("--batch-sizes", default="1,32", help="comma-separated numbers of rows")
parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary size (the real tokenizer's)")
parser.add_argument("--head-dim", type=int, default=128, help="target head dimension")
parser.add_argument("--repeats", type=int, default=3, help="runs of every case (the fastest counts)")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--peak-bw", type=float, default=None, help="GPU peak memory bandwidth, B/s (default: by name)")
parser.add_argument("--out", default=None, help="also write the JSON line to this file")
args = parser.parse_args()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout, no install needed
import torch  # noqa: E402

from bench.common import NoStopTokenizer, emit, machine_info  # noqa: E402
from nanochat.common import autodetect_device_type, gpu_specs  # noqa: E402
from nanochat.engine import BatchDecoder, Engine, cast_for_inference  # noqa: E402
from nanochat.gpt import GPTConfig, create_model  # noqa: E402



def machine(device):
    return {**machine_info(), "device": device.type, "torch_threads": torch.get_num_threads()}


def timed_stream(stream, device):
    """Drain a generator of steps; returns (seconds to the first step, seconds for the rest, steps)."""
    t0 = time.perf_counter()
    steps, t_first = 0, None
    for _ in stream:
        steps += 1
        if t_first is None:
            t_first = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return t_first - t0, time.perf_counter() - t_first, steps


def rates(prefill_tokens, first_s, rest_s, decode_tokens):
    return {"prefill_tok_s": round(prefill_tokens / first_s, 1), "decode_tok_s": round(decode_tokens / rest_s, 1),
            "first_token_ms": round(1000 * first_s, 2), "decode_step_ms": round(1000 * rest_s / max(1, args.max_tokens - 1), 3)}


def bench_engine(engine, prompt, n, device):
    first, rest, steps = timed_stream(engine.generate(prompt, n, args.max_tokens, temperature=1.0, top_k=50), device)
    assert steps == args.max_tokens
    return len(prompt), first, rest, (steps - 1) * n


def bench_naive(model, prompt, device):
    first, rest, steps = timed_stream(model.generate(prompt, args.max_tokens, temperature=1.0, top_k=50), device)
    return len(prompt), first, rest, steps - 1


def decoder_steps(decoder):
    while decoder.stats()["requests"]:
        yield decoder.step()


def bench_decoder(decoder, lengths, device):
    """N requests with prompts of the given lengths, all added at once, decoded until they finish. The
    decoder is kept from run to run, as a server keeps it (and its captured graphs)."""
    g = torch.Generator().manual_seed(0)
    for i, length in enumerate(lengths):
        decoder.add(i, torch.randint(0, args.vocab_size, (length,), generator=g).tolist(), args.max_tokens,
                    temperature=1.0, top_k=50, seed=i)
    first, rest, steps = timed_stream(decoder_steps(decoder), device)
    assert steps == args.max_tokens
    return sum(lengths), first, rest, (steps - 1) * len(lengths)


def best_of(cases):
    """Run every case --repeats times, interleaved; per case the fastest first-token and decode times, as rates."""
    best = {}
    for _ in range(args.repeats):
        for key, run in cases.items():
            prefill_tokens, first, rest, decode_tokens = run()
            old = best.get(key, (0, first, rest, 0))
            best[key] = (prefill_tokens, min(first, old[1]), min(rest, old[2]), decode_tokens)
    return {key: rates(*timing) for key, timing in best.items()}


def decode_bandwidth(model, result, n):
    """Fraction of peak bandwidth that decode reaches, from bytes read per step (see the docstring)."""
    gpu = torch.cuda.get_device_name()
    peak = args.peak_bw or gpu_specs(gpu)[1]
    if peak is None:
        return None
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "wte" not in name)
    kv_elem = next(model.parameters()).element_size()  # the cache holds keys in the weights' dtype
    avg_len = args.prompt_len + args.max_tokens / 2
    kv = 2 * cfg.n_layer * n * cfg.n_kv_head * (cfg.n_embd // cfg.n_head) * avg_len * kv_elem
    step_s = result["decode_step_ms"] / 1000
    return {"bytes_per_step": int(weights + kv), "achieved_GB_s": round((weights + kv) / step_s / 1e9, 1),
            "peak_GB_s": peak / 1e9, "fraction": round((weights + kv) / step_s / peak, 4)}


def main():
    wall0, cpu0 = time.perf_counter(), sum(os.times()[:2])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(autodetect_device_type() if args.device == "auto" else args.device)
    info = machine(device)
    config = GPTConfig.from_depth(args.depth, args.vocab_size, sequence_len=args.prompt_len + args.max_tokens,
                                  head_dim=args.head_dim)
    torch.manual_seed(0)
    model = cast_for_inference(create_model(config, device))
    tokenizer = NoStopTokenizer(args.vocab_size)
    engine = Engine(model, tokenizer)
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,)).tolist()
    for _ in engine.generate(prompt, 2, 4):  # warm-up: kernels, allocator, rotary tables
        pass
    list(model.generate(prompt, 2))
    decoders = {"decoder": {}, "decoder_static": {"static": True}}
    if device.type == "cuda":
        decoders["decoder_graphs"] = {"cuda_graphs": True}
    for options in decoders.values():
        warm = BatchDecoder(model, tokenizer, max_batch=2, **options)
        for i in range(2):
            warm.add(i, prompt[i:], max_tokens=3, top_k=50)
        for _ in decoder_steps(warm):
            pass
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    ragged = {n: [args.prompt_len - (args.prompt_len // 2) * i // max(1, n - 1) for i in range(n)]  # P down to P/2
              for n in batch_sizes}
    cases = {"naive": lambda: bench_naive(model, prompt, device)}
    for n in batch_sizes:
        cases[f"engine_{n}"] = lambda n=n: bench_engine(engine, prompt, n, device)
        for name, options in decoders.items():
            decoder = BatchDecoder(model, tokenizer, n, args.prompt_len + args.max_tokens, **options)
            cases[f"{name}_{n}"] = lambda n=n, decoder=decoder: bench_decoder(decoder, ragged[n], device)
    timings = best_of(cases)
    result = {"bench": "engine", "depth": args.depth, "params": model.num_params()["total"], "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "vocab_size": args.vocab_size, "sampling": "temperature 1, top-k 50",
              "repeats": args.repeats, "naive_peer": "GPT.generate; at batch N: N sequential runs (identical: one timed)",
              "machine": info, "naive": timings["naive"]}
    for n in batch_sizes:
        row = {"engine": timings[f"engine_{n}"]}
        for name in decoders:
            row[name] = {**timings[f"{name}_{n}"], "prompt_lens": [min(ragged[n]), max(ragged[n])]}
        row["decode_speedup_vs_naive"] = round(row["engine"]["decode_tok_s"] / result["naive"]["decode_tok_s"], 2)
        if device.type == "cuda":
            for name in ("engine", *decoders):
                row[name]["bandwidth"] = decode_bandwidth(model, row[name], n)
        result[f"batch_{n}"] = row
    # on a shared machine, how much CPU this process really got (1.0 per fully used core) says how far to
    # trust the absolute numbers; the ratios between peers, timed side by side, are the ones to keep
    result["machine"]["cpu_cores_used"] = round((sum(os.times()[:2]) - cpu0) / (time.perf_counter() - wall0), 2)
    emit(result, args.out)


if __name__ == "__main__":
    main()
