"""The Serve application: engine replicas behind one HTTP ingress, built from command-line style settings.

    serve run serve_app:app                                   # defaults: latest chat checkpoint, 1 replica
    serve run serve_app:build_app checkpoint=sft/d20 replicas=4 gpus_per_replica=1
    python -m serve_app --checkpoint sft/d20 --replicas 4     # same flags, plus --host/--port

Every setting is a flag of `parser()`; `serve run` passes them as key=value (underscores or dashes).
"""
import argparse
import os
from dataclasses import fields

from nanochat.checkpoint import check_for_inference
from nanochat.common import ArgumentParser, get_base_dir
from ray_jobs.metrics import METRICS_ENV
from serve_app.api import ApiConfig, Ingress
from serve_app.engine import EngineReplica

APP_NAME = "nanochat"
PREFILL_CHUNK = 128  # measured on the CPU at depth 4 (bench/results/serve_engine_cpu-2core.json): GPUs want more


def parser():
    p = ArgumentParser(prog="python -m serve_app", description="Serve a nanochat checkpoint on Ray Serve: "
                                "OpenAI-compatible API, Gradio chat page, continuous batching.")
    p.add_argument("--checkpoint", default=None, help="step dir, tag dir, path under <base>/checkpoints (e.g. sft/d20) "
                   "or a dir written by nanochat.export (default: the latest chat checkpoint: sft, else mid, else rl)")
    p.add_argument("--base-dir", default=None,
                   help="nanochat base dir (default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    p.add_argument("--tokenizer-dir", default=None, help="default: <base>/tokenizer")
    # deployment
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (the minimum when autoscaling)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    p.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 if this machine has a GPU, else 0")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests Serve sends one replica at once; past max-batch they wait in its queue for a "
                        "free slot (default: 2 x max-batch; Serve's own default, 5, would starve the batch)")
    # engine
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together per replica (KV slots)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length per slot (default: the model's)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="a request's time limit, queueing included")
    p.add_argument("--device", default=None, help="cpu, cuda (default: the best available in the replica)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                   help="prompt tokens prefilled per decode step at most: a long prompt loads over several steps "
                        "while the running streams keep going (0: whole prompts at once). The default keeps a "
                        "CPU replica's pauses under 3x its inter-token time; GPUs afford more")
    p.add_argument("--prefix-cache-mb", type=float, default=1024,
                   help="memory for the keys/values of recent prompts and chats, reused by prompts that start "
                        "the same way (0: off)")
    p.add_argument("--cuda-graphs", action="store_true", help="decode with the static-shape step captured as "
                   "CUDA graphs (GPU replicas)")
    # HTTP API
    p.add_argument("--model-name", default="nanochat", help="the model id the API reports")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on /v1 and /stats (default: $NANOCHAT_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=4096, help="the most tokens one request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=512)
    p.add_argument("--max-messages", type=int, default=64)
    p.add_argument("--max-message-chars", type=int, default=16_000)
    p.add_argument("--max-total-chars", type=int, default=64_000)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--no-ui", dest="ui", action="store_false", help="no Gradio page")
    p.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help="no Ray metrics from the replicas and the ingress (bench/serve.py measures their cost)")
    return p


def build_app(args=None):
    """The Application for a dict of settings (what `serve run ... key=value` passes), an argparse
    Namespace, or None (every default)."""
    if not isinstance(args, argparse.Namespace):
        argv = []
        for key, value in (args or {}).items():
            flag = "--" + key.replace("_", "-")
            off = str(value).lower() in ("0", "false", "no")
            if flag in ("--ui", "--metrics") and off:
                argv.append(f"--no-{flag[2:]}")
            elif flag == "--cuda-graphs" and not off:  # a switch: no value
                argv.append(flag)
            elif flag not in ("--ui", "--metrics", "--cuda-graphs"):
                argv.append(f"{flag}={value}")
        args = parser().parse_args(argv)
    # a missing checkpoint or tokenizer stops the driver with one line, before any replica starts
    check_for_inference(args.checkpoint, args.base_dir or str(get_base_dir()), args.tokenizer_dir)
    gpus = args.gpus_per_replica
    metrics_off = {} if args.metrics else {"runtime_env": {"env_vars": {METRICS_ENV: "0"}}}
    if gpus is None:
        import torch
        gpus = 1.0 if torch.cuda.is_available() else 0.0
    scaling = {"num_replicas": args.replicas}
    if args.max_replicas and args.max_replicas > args.replicas:
        scaling = {"autoscaling_config": {"min_replicas": args.replicas, "max_replicas": args.max_replicas,
                                          "target_ongoing_requests": args.max_batch}}
    engine = EngineReplica.options(
        **scaling,
        ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": gpus, **metrics_off},
        max_ongoing_requests=args.max_ongoing_requests or 2 * args.max_batch,
        # a replaced replica (redeploy, scale-down) gets this long to finish its streams
        graceful_shutdown_timeout_s=args.timeout_s,
        # a redeploy starts the new replicas first and retires the old ones once those are ready
        max_surge_percent=100,
    ).bind(args.checkpoint, args.base_dir or str(get_base_dir()), args.tokenizer_dir, args.max_batch,
           args.max_seq_len, args.timeout_s, args.device, args.prefill_chunk or None, args.prefix_cache_mb,
           args.cuda_graphs)
    api = ApiConfig(**{f.name: getattr(args, f.name) for f in fields(ApiConfig) if hasattr(args, f.name)})
    # streams mostly wait on the engine: the ingress needs little CPU but many requests in flight
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0, **metrics_off}, max_ongoing_requests=1000)
    return ingress.bind(engine, vars(api))
