"""Base pretraining on Ray Train: TorchTrainer workers (GPUs with NCCL, or CPU processes with gloo)
train the GPT on packed rows streamed by Ray Data, with Muon + AdamW doing the gradient sync.

    python ray_jobs/base_train.py --depth 20 --num-workers 8            # 8 GPUs, the d20 model
    python ray_jobs/base_train.py --preset tiny                         # CPU, a few minutes

Fault tolerance: every --save-every steps all ranks write a checkpoint (model, optimizer shards,
data position, step) to <storage>/checkpoints/base/<tag>/. When a worker dies, Ray Train restarts
the group (FailureConfig) and the loop resumes from the last complete checkpoint, also on another
number of workers. SIGTERM to this driver (e.g. `ray job stop`, a spot node going away) makes the
workers write a checkpoint and stop; `--resume` continues a stopped or finished run. A NaN or
infinite loss stops the run with an error naming the step; the last good checkpoint stays.
"""
import argparse
from pathlib import Path

from nanochat.common import ArgumentParser
from ray_jobs.common import run_phase_script
from ray_jobs.training import (TrainLoop, add_training_flags, apply_preset, lr_multiplier, muon_momentum,  # noqa: F401 (schedule re-exported)
                               report_training)

parser = ArgumentParser(description="Base pretraining on Ray Train")
parser.add_argument("--preset", choices=["tiny"], default=None, help="tiny: a small CPU model, a few minutes")
# model
parser.add_argument("--depth", type=int, default=20, help="the one dial: width = 64 * depth")
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--max-seq-len", type=int, default=2048)
# batch and length
parser.add_argument("--device-batch-size", type=int, default=None,
                    help="rows per worker per micro-step (default: on GPUs the largest that fits, see ray_jobs/plan.py; 32 on CPU)")
parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step (all workers)")
parser.add_argument("--num-iterations", type=int, default=-1, help="explicit steps; -1: from --target-param-data-ratio")
parser.add_argument("--target-param-data-ratio", type=float, default=20, help="tokens per parameter (Chinchilla ~20)")
# evaluation, sampling, data pipeline
parser.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per bpb evaluation")
parser.add_argument("--sample-every", type=int, default=2000)
parser.add_argument("--data-actors", type=int, default=None,
                    help="tokenizer actors in all (each worker's pipeline gets its share; default: the plan's, for 1.5x the GPUs' rate)")
parser.add_argument("--data-actor-cpus", type=float, default=1.0)
parser.add_argument("--docs-per-piece", type=int, default=None, help="documents per unit of data work and resume (default: 128)")
# optimization, schedule, eval/save intervals, cluster, --tag/--storage/--resume/--wandb/--seed
add_training_flags(parser)

# tiny: ~400k tokens in ~5 min on 2 cores (the whole speedrun must fit in 15 min there); small batches
# learn more per token at this size than big ones
TINY = dict(depth=4, head_dim=64, max_seq_len=256, device_batch_size=4, total_batch_size=2048, num_iterations=200,
            eval_every=50, eval_tokens=16384, sample_every=-1, save_every=50, num_workers=2, device="cpu", log_every=10,
            data_actors=2, data_actor_cpus=0.5)


# ---- the per-worker training loop ----------------------------------------------------------------

def train_loop(config):
    import ray
    import torch

    from nanochat.checkpoint import checkpoint_dir
    from nanochat.common import get_dist_info, setup_logging
    from nanochat.dataloader import rank_resume_state
    from nanochat.gpt import GPTConfig, create_model
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes, get_tokenizer
    from ray_jobs.training import resume_or_init, worker_device
    from ray_jobs.data import packed_batches, val_batches
    from ray_jobs.metrics import RunMetrics

    log = setup_logging()
    c = argparse.Namespace(**config)
    _, rank, _, world = get_dist_info()
    device = worker_device(c)
    torch.manual_seed(c.seed)

    tokenizer = get_tokenizer(c.tokenizer_dir)
    token_bytes = get_token_bytes(c.tokenizer_dir, device=device)
    model_config = GPTConfig.from_depth(c.depth, tokenizer.get_vocab_size(), c.max_seq_len, head_dim=c.head_dim)
    ckpt_dir = checkpoint_dir("base", c.tag, base_dir=c.storage)
    # resume from the last complete checkpoint (after a worker failure, or --resume), else start fresh
    model, optimizers, start_step, meta = resume_or_init(ckpt_dir, device, c, tokenizer, lambda: create_model(model_config, device),
                                                         expect_config=model_config)

    num_params = model.num_params()["total"]
    flops_per_token = model.estimate_flops()
    grad_accum = c.total_batch_size // (c.device_batch_size * c.max_seq_len * world)  # divides: checked by the driver
    num_iterations = c.num_iterations if c.num_iterations > 0 else round(c.target_param_data_ratio * num_params / c.total_batch_size)
    if rank == 0:
        log.info("model: %s, %s parameters, %.3g FLOPs/token; %d steps of %d tokens (%d micro-steps x %d workers)",
                 model_config.to_dict(), f"{num_params:,}", flops_per_token, num_iterations, c.total_batch_size, grad_accum, world)

    resume = rank_resume_state(meta.get("data_state"), "piece")  # this rank's position: the pipeline starts there
    train_iter = packed_batches(ray.get(c.pieces), c.device_batch_size, c.max_seq_len, c.tokenizer_dir, device, resume,
                                allow_repeat=c.allow_repeat, num_actors=-(-c.data_actors // world), actor_cpus=c.data_actor_cpus,
                                metrics=RunMetrics("base", c.tag, rank))
    val_steps = max(1, c.eval_tokens // (c.device_batch_size * c.max_seq_len * world))

    loop = TrainLoop(config, "base", ckpt_dir, model, optimizers, tokenizer, device, start_step, meta, num_iterations, grad_accum)
    summary = loop.run(
        next_batch=lambda: next(train_iter),
        evaluate=lambda: evaluate_bpb(model, val_batches(c.device_batch_size, c.max_seq_len, c.tokenizer_dir, device), val_steps, token_bytes),
        sample=lambda: _log_samples(model, tokenizer, log), sample_every=c.sample_every)
    return {**summary, "num_params": num_params}


def _log_samples(model, tokenizer, log):
    prompts = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
               "The opposite of hot is", "The planets of the solar system are:"]
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend="<|bos|>")
        out = list(model.generate(ids, max_tokens=16, temperature=0))
        log.info("sample: %s", tokenizer.decode(ids[1:] + out).replace("\n", " "))


# ---- the driver --------------------------------------------------------------------------------

def main(args):
    """Plan (memory, data), build the list of data pieces and the TorchTrainer, run it; rank 0's summary."""
    import ray
    from nanochat.common import get_base_dir
    from nanochat.gpt import GPTConfig
    from nanochat.tokenizer import get_tokenizer, get_tokenizer_dir
    from nanochat.checkpoint import checkpoint_dir
    from ray_jobs.data import DOCS_PER_PIECE, pretrain_pieces
    from ray_jobs.plan import check_data, gpu_tokens_per_s, model_size, plan_data, plan_phase
    from ray_jobs.training import build_trainer, check_resumable, fit, init_training_cluster, prepare_run

    args = apply_preset(parser, args, TINY if args.preset == "tiny" else {})
    args.tag = args.tag or f"d{args.depth}"
    storage = Path(args.storage or get_base_dir())
    # what can be checked without Ray, before it starts: the tokenizer, the memory plan when the device (and
    # on GPUs its memory) is given, every shard, a resume's checkpoint, the data plan
    tokenizer = get_tokenizer()
    model_config = GPTConfig.from_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len, head_dim=args.head_dim)
    known = args.device == "cpu" or (args.device == "cuda" and args.gpu_memory_gb)
    early = plan_phase("base_train", args, model_config) if known else None
    pieces = pretrain_pieces(seed=args.seed, docs_per_piece=args.docs_per_piece or DOCS_PER_PIECE)
    if args.resume:
        check_resumable(checkpoint_dir("base", args.tag, base_dir=storage), model_config, tokenizer)
    num_params, flops_per_token = model_size(model_config)
    # the tokenizer pool keeps up with the GPUs at the assumed MFU (an H100's peak until the GPU is known)
    rate = gpu_tokens_per_s(flops_per_token, args.num_workers) if args.device != "cpu" else 1e5  # CPU: far below an actor
    data = plan_data(args, model_config, num_params, args.num_workers, tokens_per_s=rate)
    check_data(data, args.allow_repeat)
    init_training_cluster(args)
    args.memory_plan = early or plan_phase("base_train", args, model_config, args.gpu)
    args.data_actors = args.data_actors or (data.get("data_actors", 1) if args.device == "cuda" else args.num_workers)
    run_dir = prepare_run("base", args.tag, storage, args.resume)
    config = dict(vars(args), tokenizer_dir=str(get_tokenizer_dir()), storage=str(storage), run_dir=str(run_dir),
                  pieces=ray.put(pieces))
    summary = fit(build_trainer(train_loop, config, "base"), run_dir)
    return {**summary, "plan": {"memory": args.memory_plan, "data": {k: v for k, v in data.items() if k != "sample"}}}


def report_section(summary, args):
    """The report card's base_train section from the run's summary."""
    return report_training(summary, args, ("depth", "max_seq_len", "device_batch_size", "total_batch_size", "num_workers",
                                           "device", "precision", "compile", "data_actors", "matrix_lr", "embedding_lr", "unembedding_lr"))


if __name__ == "__main__":
    run_phase_script(main, parser, "base_train", report_section)
