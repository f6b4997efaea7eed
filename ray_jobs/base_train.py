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
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

parser = argparse.ArgumentParser(description="Base pretraining on Ray Train")
parser.add_argument("--preset", choices=["tiny"], default=None, help="tiny: a small CPU model, a few minutes")
# model
parser.add_argument("--depth", type=int, default=20, help="the one dial: width = 64 * depth")
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--max-seq-len", type=int, default=2048)
# batch and length
parser.add_argument("--device-batch-size", type=int, default=32, help="rows per worker per micro-step")
parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step (all workers)")
parser.add_argument("--num-iterations", type=int, default=-1, help="explicit steps; -1: from --target-param-data-ratio")
parser.add_argument("--target-param-data-ratio", type=float, default=20, help="tokens per parameter (Chinchilla ~20)")
# optimization
parser.add_argument("--embedding-lr", type=float, default=0.2)
parser.add_argument("--unembedding-lr", type=float, default=0.004)
parser.add_argument("--matrix-lr", type=float, default=0.02)
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--warmup-ratio", type=float, default=0.0)
parser.add_argument("--warmdown-ratio", type=float, default=0.2)
parser.add_argument("--final-lr-frac", type=float, default=0.0)
# evaluation, sampling, checkpoints
parser.add_argument("--eval-every", type=int, default=250)
parser.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per bpb evaluation")
parser.add_argument("--sample-every", type=int, default=2000)
parser.add_argument("--save-every", type=int, default=1000, help="checkpoint interval in steps (-1: only at the end)")
parser.add_argument("--log-every", type=int, default=1)
# cluster
parser.add_argument("--num-workers", type=int, default=8)
parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: GPUs if the cluster has them")
parser.add_argument("--cpus-per-worker", type=float, default=None, help="default: 1 on CPU runs, 8 on GPU runs")
parser.add_argument("--data-actors", type=int, default=1, help="tokenizer actors in the Ray Data pipeline")
parser.add_argument("--data-actor-cpus", type=float, default=1.0)
parser.add_argument("--max-failures", type=int, default=3, help="worker failures Ray Train recovers from")
# run bookkeeping
parser.add_argument("--tag", default=None, help="checkpoint tag (default: d<depth>)")
parser.add_argument("--storage", default=None, help="checkpoint storage every node sees (default: $NANOCHAT_BASE_DIR)")
parser.add_argument("--resume", action="store_true", help="continue from the tag's last checkpoint (else start fresh)")
parser.add_argument("--wandb", default=None, help="Weights & Biases run name (off by default)")
parser.add_argument("--seed", type=int, default=42)

TINY = dict(depth=4, head_dim=64, max_seq_len=256, device_batch_size=8, total_batch_size=4096, num_iterations=300,
            eval_every=100, eval_tokens=16384, sample_every=-1, save_every=100, num_workers=2, device="cpu", log_every=10)
STOP_FILE = "STOP"  # written by the driver on SIGTERM; the workers checkpoint and return


def apply_preset(args):
    if args.preset == "tiny":
        defaults = {a.dest: a.default for a in parser._actions}
        for key, value in TINY.items():
            if getattr(args, key) == defaults[key]:  # explicit flags win over the preset
                setattr(args, key, value)
    args.tag = args.tag or f"d{args.depth}"
    return args


# ---- the per-worker training loop ----------------------------------------------------------------

def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, then linear warmdown to final_lr_frac."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step):
    """Momentum warms up from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def train_loop(config):
    import torch
    import torch.distributed as dist
    import ray.train

    from nanochat.checkpoint import build_model, checkpoint_dir, find_last_step, load_optimizers, save_checkpoint
    from nanochat.common import get_dist_info, setup_logging
    from nanochat.gpt import GPTConfig, create_model
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes, get_tokenizer
    from ray_jobs.data import packed_batches, val_batches

    log = setup_logging()
    c = argparse.Namespace(**config)
    _, rank, local_rank, world = get_dist_info()
    if c.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(c.cpus_per_worker)))  # no oversubscription between workers
    torch.manual_seed(c.seed)

    tokenizer = get_tokenizer(c.tokenizer_dir)
    token_bytes = get_token_bytes(c.tokenizer_dir, device=device)
    model_config = GPTConfig.from_depth(c.depth, tokenizer.get_vocab_size(), c.max_seq_len, head_dim=c.head_dim)
    ckpt_dir = checkpoint_dir("base", c.tag, base_dir=c.storage)
    stop_file = Path(c.run_dir) / STOP_FILE

    # resume from the last complete checkpoint (after a worker failure, or --resume), else start fresh
    start_step = find_last_step(ckpt_dir)
    if start_step is not None:
        model, meta = build_model(ckpt_dir, start_step, device, phase="train", expect_config=model_config,
                                  expect_tokenizer=tokenizer.fingerprint())
        optimizers = model.setup_optimizers(c.unembedding_lr, c.embedding_lr, c.matrix_lr, c.weight_decay)
        load_optimizers(optimizers, ckpt_dir, start_step)
        data_state, loop_state = meta.get("data_state"), meta.get("loop_state", {})
        log.info("rank %d: resumed from %s step %d (saved by %s workers, now %d)", rank, ckpt_dir, start_step,
                 meta.get("world_size"), world)
    else:
        model = create_model(model_config, device)
        optimizers = model.setup_optimizers(c.unembedding_lr, c.embedding_lr, c.matrix_lr, c.weight_decay)
        start_step, data_state, loop_state = 0, None, {}

    num_params = model.num_params()["total"]
    flops_per_token = model.estimate_flops()
    tokens_per_micro = c.device_batch_size * c.max_seq_len * world
    if c.total_batch_size % tokens_per_micro:
        raise ValueError(f"--total-batch-size {c.total_batch_size} must be a multiple of device_batch_size * "
                         f"max_seq_len * workers = {tokens_per_micro}")
    grad_accum = c.total_batch_size // tokens_per_micro
    num_iterations = c.num_iterations if c.num_iterations > 0 else round(c.target_param_data_ratio * num_params / c.total_batch_size)
    if rank == 0:
        log.info("model: %s, %s parameters, %.3g FLOPs/token; %d steps of %d tokens (%d micro-steps x %d workers)",
                 model_config.to_dict(), f"{num_params:,}", flops_per_token, num_iterations, c.total_batch_size, grad_accum, world)

    train_iter = packed_batches(ray.train.get_dataset_shard("train"), c.device_batch_size, c.max_seq_len, device, data_state)
    val_steps = max(1, c.eval_tokens // (c.device_batch_size * c.max_seq_len * world))
    peak_flops = _peak_flops(device)
    wandb_run = _init_wandb(c, rank)

    curves = loop_state.get("curves", {"loss": {"x": [], "y": []}, "val_bpb": {"x": [], "y": []}})
    smooth_loss = loop_state.get("smooth_loss", 0.0)
    train_seconds = loop_state.get("train_seconds", 0.0)
    val_bpb = loop_state.get("val_bpb")
    starts = loop_state.get("starts", []) + [start_step]  # every (re)start of the loop, for the record

    def save(step, reason):
        """Checkpoint on every rank; refuses (returns False) when the weights are no longer finite, so the
        last good checkpoint is never replaced by a broken one."""
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            return False
        meta = {"phase": "base", "data_state": data_state, "num_iterations": num_iterations, "val_bpb": val_bpb,
                "loop_state": {"curves": curves, "smooth_loss": smooth_loss, "train_seconds": train_seconds, "val_bpb": val_bpb,
                               "starts": starts},
                "settings": {k: v for k, v in config.items() if k != "env"}}
        save_checkpoint(ckpt_dir, step, model, optimizers, meta, tokenizer_fingerprint=tokenizer.fingerprint())
        ray.train.report({"step": step, "val_bpb": val_bpb, "loss": smooth_loss, "reason": reason})
        if rank == 0:
            log.info("checkpoint step %d saved (%s)", step, reason)
        return True

    step = start_step
    status = "finished"
    while True:
        last = step == num_iterations
        if c.eval_every > 0 and (step % c.eval_every == 0 or last) and (step > start_step or start_step == 0):
            model.eval()
            val_bpb = evaluate_bpb(model, val_batches(c.device_batch_size, c.max_seq_len, c.tokenizer_dir, device), val_steps, token_bytes)
            model.train()
            curves["val_bpb"]["x"].append(step)
            curves["val_bpb"]["y"].append(val_bpb)
            if rank == 0:
                log.info("step %d/%d: validation bpb %.4f", step, num_iterations, val_bpb)
                _wandb_log(wandb_run, {"val/bpb": val_bpb}, step)
        if rank == 0 and c.sample_every > 0 and (step % c.sample_every == 0 or last) and step > 0:
            _log_samples(model, tokenizer, log)
        periodic = step > start_step and c.save_every > 0 and step % c.save_every == 0
        if (last or periodic) and not save(step, "end" if last else "periodic"):
            status = f"error: the weights are not finite at step {step}; last good checkpoint: step {find_last_step(ckpt_dir)} in {ckpt_dir}"
            break
        if last:
            break

        # one optimizer step: grad_accum micro-steps of device_batch_size rows on every worker
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            inputs, targets, data_state = next(train_iter)
            loss = model(inputs, targets) / grad_accum
            loss.backward()
            loss_sum += loss.detach()
        lr_mult = lr_multiplier(step, num_iterations, c.warmup_ratio, c.warmdown_ratio, c.final_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_mult
                if "momentum" in group:
                    group["momentum"] = muon_momentum(step)
            opt.step()
        model.zero_grad(set_to_none=True)
        # one small collective per step: the mean loss, and whether the driver asked us to stop
        flags = torch.stack([loss_sum.float(), torch.tensor(float(rank == 0 and stop_file.exists()), device=device)])
        if world > 1:
            dist.all_reduce(flags)
        step_loss, stop_requested = flags[0].item() / world, flags[1].item() > 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1
        if not math.isfinite(step_loss):
            last_good = find_last_step(ckpt_dir)
            raise_msg = f"loss is {step_loss} at step {step}; stopping. Last good checkpoint: step {last_good} in {ckpt_dir}"
            if rank == 0:
                log.error(raise_msg)
            status = f"error: {raise_msg}"
            break
        if step > start_step + 1:  # the first step after (re)start includes warm-up costs
            train_seconds += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * step_loss  # EMA from 0, debiased below
        debiased = smooth_loss / (1 - 0.9 ** step)
        if rank == 0 and (step % c.log_every == 0 or step == num_iterations):
            tok_per_s = c.total_batch_size / dt
            mfu = f", MFU {100 * flops_per_token * tok_per_s / (peak_flops * world):.1f}%" if peak_flops else ""
            eta = (num_iterations - step) * (train_seconds / max(1, step - start_step - 1)) if step > start_step + 1 else 0
            log.info("step %d/%d: loss %.4f, lr x%.3f, %.0f tokens/s%s, %.2fs/step, ETA %.1f min",
                     step, num_iterations, debiased, lr_mult, tok_per_s, mfu, dt, eta / 60)
            curves["loss"]["x"].append(step)
            curves["loss"]["y"].append(round(debiased, 5))
            _wandb_log(wandb_run, {"train/loss": debiased, "train/lr_mult": lr_mult, "train/tok_per_s": tok_per_s}, step)
        if stop_requested:
            status = "stopped" if save(step, "stop requested") else f"error: the weights are not finite at step {step}"
            break

    if wandb_run is not None:
        wandb_run.finish()
    return {"status": status, "step": step, "num_iterations": num_iterations, "val_bpb": val_bpb,
            "final_loss": smooth_loss, "train_seconds": train_seconds, "num_params": num_params,
            "tokens_trained": step * c.total_batch_size, "starts": starts, "curves": curves, "checkpoint_dir": str(ckpt_dir)}


def _peak_flops(device):
    """bf16 dense peak FLOP/s of the GPU, for MFU; None on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    import torch
    name = torch.cuda.get_device_name(device)
    for key, flops in {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}.items():
        if key in name:
            return flops
    return None


def _log_samples(model, tokenizer, log):
    prompts = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
               "The opposite of hot is", "The planets of the solar system are:"]
    model.eval()
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend="<|bos|>")
        out = list(model.generate(ids, max_tokens=16, temperature=0))
        log.info("sample: %s", tokenizer.decode(ids[1:] + out).replace("\n", " "))
    model.train()


def _init_wandb(c, rank):
    if not c.wandb or rank != 0:
        return None
    import wandb
    return wandb.init(project="nanochat-ray", name=c.wandb, config={k: v for k, v in vars(c).items() if k != "env"})


def _wandb_log(run, data, step):
    if run is not None:
        run.log(data, step=step)


# ---- the driver --------------------------------------------------------------------------------

def main(args):
    """Build the data pipeline and the TorchTrainer, run it, return rank 0's summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from nanochat.checkpoint import checkpoint_dir, find_last_step
    from nanochat.common import get_base_dir, setup_logging
    from nanochat.tokenizer import get_tokenizer_dir
    from ray_jobs.common import init_ray
    from ray_jobs.data import build_pretrain_dataset, pretrain_data_config

    log = setup_logging()
    args = apply_preset(args)
    resources = init_ray()
    if args.device == "auto":
        args.device = "cuda" if resources.get("GPU", 0) >= 1 else "cpu"
    if args.cpus_per_worker is None:
        args.cpus_per_worker = 8 if args.device == "cuda" else 1
    storage = Path(args.storage or get_base_dir())
    ckpt_dir = checkpoint_dir("base", args.tag, base_dir=storage)
    if find_last_step(ckpt_dir) is not None and not args.resume:
        stale = ckpt_dir.with_name(f"{ckpt_dir.name}.old-{int(time.time())}")
        log.warning("checkpoints exist in %s and --resume was not given: moving them to %s and starting fresh", ckpt_dir, stale)
        shutil.move(ckpt_dir, stale)
    run_dir = storage / "runs" / f"base-{args.tag}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOP_FILE).unlink(missing_ok=True)

    config = {k: v for k, v in vars(args).items()}
    config.update(tokenizer_dir=str(get_tokenizer_dir()), storage=str(storage), run_dir=str(run_dir))
    train_ds = build_pretrain_dataset(config["tokenizer_dir"], "train", args.max_seq_len, seed=args.seed,
                                      num_actors=args.data_actors, actor_cpus=args.data_actor_cpus)
    use_gpu = args.device == "cuda"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=f"base-{args.tag}-{time.strftime('%Y%m%d-%H%M%S')}",  # a fresh Ray run each time: our checkpoints carry the state
            storage_path=str(storage / "ray_train"),
            failure_config=FailureConfig(max_failures=args.max_failures, controller_failure_limit=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
        datasets={"train": train_ds},
        dataset_config=pretrain_data_config(),
    )

    # SIGTERM (ray job stop, a spot node going away): ask the workers to checkpoint and stop
    def on_sigterm(signum, frame):
        log.warning("SIGTERM: asking the workers to write a checkpoint and stop")
        (run_dir / STOP_FILE).write_text("stop")
    previous = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None
    t0 = time.time()
    try:
        result = trainer.fit()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    summary = dict(result.return_value or {})
    summary["wall_seconds"] = round(time.time() - t0, 1)
    if str(summary.get("status", "")).startswith("error"):
        raise RuntimeError(summary["status"])
    return summary


def _in_main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


def report_section(summary, args):
    """The report card's base_train section from the run's summary."""
    curves = summary.pop("curves", {})
    return {
        "settings": {k: getattr(args, k) for k in ("depth", "max_seq_len", "device_batch_size", "total_batch_size",
                                                   "num_workers", "device", "matrix_lr", "embedding_lr", "unembedding_lr")},
        "results": {k: v for k, v in summary.items() if k not in ("checkpoint_dir",)},
        "curves": {"loss": {**curves.get("loss", {}), "ylabel": "train loss"},
                   "val_bpb": {**curves.get("val_bpb", {}), "ylabel": "validation bits/byte"}},
        "wall_seconds": summary.get("wall_seconds"),
        "gpu_hours": summary.get("wall_seconds", 0) / 3600 * args.num_workers if args.device == "cuda" else 0,
    }


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    args = parser.parse_args()
    summary = main(args)
    from nanochat.report import get_report
    get_report().log("base_train", report_section(dict(summary), args))
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}))
