"""The training phases on Ray Train (base, mid, sft, and RL's update): what their drivers and worker
loops share. Driver side: the flags every phase has, presets, the source checkpoint, the run directory,
the TorchTrainer and its SIGTERM stop, the report section. Worker side: device, resume-or-init of model
and optimizers, per-rank conversation shares, and TrainLoop, the optimizer-step loop every worker runs."""
import argparse
import logging
import math
import time
from pathlib import Path

from nanochat.common import NanochatError, SettingsError, get_base_dir, get_dist_info
from ray_jobs.common import init_ray
from ray_jobs.metrics import RunMetrics, Stopwatch

logger = logging.getLogger("nanochat.train")

# ---- training phases on Ray Train (base, mid, sft): what their drivers and worker loops share -----------

STOP_FILE = "STOP"  # written by the driver on SIGTERM; the workers checkpoint and return


class TrainingError(NanochatError, RuntimeError):
    """A run that stopped itself (a non-finite loss or weights): the message names the step and the last
    good checkpoint."""


def add_training_flags(parser, **defaults):
    """The flags every training phase has: optimization and LR schedule, evaluation/checkpoint
    intervals, cluster and run bookkeeping. `defaults` overrides a phase's own (e.g. warmdown_ratio=1.0)."""
    d = dict(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0, init_lr_frac=1.0,
             warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0, eval_every=250, save_every=1000, log_every=1,
             num_workers=8)
    d.update(defaults)
    add = parser.add_argument
    # optimization
    add("--embedding-lr", type=float, default=d["embedding_lr"])
    add("--unembedding-lr", type=float, default=d["unembedding_lr"])
    add("--matrix-lr", type=float, default=d["matrix_lr"])
    add("--weight-decay", type=float, default=d["weight_decay"])
    add("--init-lr-frac", type=float, default=d["init_lr_frac"], help="every learning rate is multiplied by this")
    add("--warmup-ratio", type=float, default=d["warmup_ratio"])
    add("--warmdown-ratio", type=float, default=d["warmdown_ratio"])
    add("--final-lr-frac", type=float, default=d["final_lr_frac"])
    # evaluation, checkpoints
    add("--eval-every", type=int, default=d["eval_every"], help="steps between validation evaluations (-1: never)")
    add("--save-every", type=int, default=d["save_every"], help="checkpoint interval in steps (-1: only at the end)")
    add("--log-every", type=int, default=d["log_every"])
    add("--keep-checkpoints", type=int, default=2, help="periodic checkpoints kept (the newest K) besides the final one")
    # precision, compilation, data
    add("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None,
        help="matmul precision (default: $NANOCHAT_PRECISION, else auto: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the model for training (default: on GPUs, off on CPU)")
    add("--allow-repeat", action="store_true", help="let training start a second pass over its data (else that is an error)")
    # cluster
    add("--num-workers", action=WorkerCount, default=d["num_workers"], metavar="N|MIN-MAX",
        help="train workers; MIN-MAX is elastic: start with as many as the cluster has room for (at least MIN) and "
             "grow to MAX when capacity appears, resuming from the last checkpoint on the new size (the global batch stays)")
    parser.set_defaults(min_workers=None)
    add("--resize-check-s", type=float, default=60.0, help="elastic runs: seconds between checks for room to grow")
    add("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: GPUs if the cluster has them")
    add("--cpus-per-worker", type=float, default=None, help="default: 1 on CPU runs, 8 on GPU runs")
    add("--gpu-memory-gb", type=float, default=None, help="nominal memory of one GPU, for the plan (default: what the cluster's GPUs report)")
    add("--max-failures", type=int, default=3, help="worker failures Ray Train recovers from")
    # run bookkeeping
    add("--tag", default=None, help="checkpoint tag (base: d<depth>; later phases: the source checkpoint's tag)")
    add("--storage", default=None, help="checkpoint storage every node sees (default: $NANOCHAT_BASE_DIR)")
    add("--resume", action="store_true", help="continue from the tag's last checkpoint (else start fresh)")
    add("--wandb", default=None, help="Weights & Biases run name (off by default)")
    add("--seed", type=int, default=42)


class WorkerCount(argparse.Action):
    """--num-workers N, or MIN-MAX for an elastic run: sets num_workers (the most) and min_workers (None: fixed)."""

    def __call__(self, parser, namespace, value, option_string=None):
        low, dash, high = str(value).partition("-")
        try:
            low, high = int(low), int(high if dash else low)
        except ValueError:
            parser.error(f"{option_string} {value}: give a number of workers (8) or a range MIN-MAX (4-8)")
        if not 0 <= low <= high or (dash and low == 0):
            parser.error(f"{option_string} {value}: a range needs 1 <= MIN <= MAX")
        namespace.num_workers, namespace.min_workers = high, (low if dash else None)


def worker_range(args):
    """(fewest, most) workers of a run's --num-workers: equal unless it is elastic."""
    return (getattr(args, "min_workers", None) or args.num_workers), args.num_workers


def apply_preset(parser, args, preset: dict):
    """Set the preset's values on the flags left at their defaults: explicit flags win."""
    defaults = {a.dest: a.default for a in parser._actions}
    for key, value in preset.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)
    return args


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


def find_source(phases, tag=None, step=None, base_dir=None):
    """The checkpoint a phase starts from or evaluates: the first of `phases` that has one (e.g. ("mid",
    "base") for SFT), its latest tag unless `tag`, its last step unless `step`. Returns (phase, tag, step,
    directory); raises CheckpointError saying what is missing."""
    from nanochat.checkpoint import CheckpointError, checkpoint_dir, find_last_step, find_latest_tag
    for phase in phases:
        found_tag = tag or find_latest_tag(phase, base_dir)
        directory = checkpoint_dir(phase, found_tag, base_dir) if found_tag else None
        last = find_last_step(directory) if directory else None
        if last is not None:
            return phase, found_tag, last if step is None else step, directory
    root = Path(base_dir or get_base_dir()) / "checkpoints"
    raise CheckpointError(f"no complete checkpoint for phase {' or '.join(phases)}"
                          f"{f' with tag {tag!r}' if tag else ''} under {root}: run the previous phase first")


def prepare_run(phase, tag, storage, resume):
    """Driver side, before a training run: without --resume, earlier checkpoints of the tag move aside
    (kept, not deleted) and the run starts fresh. Returns the run's directory (STOP file cleared)."""
    from nanochat.checkpoint import checkpoint_dir, find_last_step
    ckpt_dir = checkpoint_dir(phase, tag, base_dir=storage)
    if find_last_step(ckpt_dir) is not None and not resume:
        stale = ckpt_dir.with_name(f"{ckpt_dir.name}.old-{int(time.time())}")
        logger.warning("checkpoints exist in %s and --resume was not given: moving them to %s and starting fresh", ckpt_dir, stale)
        ckpt_dir.rename(stale)
    run_dir = Path(storage) / "runs" / f"{phase}-{tag}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    return run_dir


def check_resumable(ckpt_dir, model_config, tokenizer):
    """Driver side, before a --resume: the last checkpoint there must be for this model and tokenizer
    (CheckpointError saying what differs), rather than a worker finding out after Ray Train started."""
    from nanochat.checkpoint import check_meta, find_last_step, load_meta, step_dir
    step = find_last_step(ckpt_dir)
    if step is not None:
        check_meta(load_meta(ckpt_dir, step), model_config, tokenizer.fingerprint(), where=str(step_dir(ckpt_dir, step)))


def init_training_cluster(args):
    """Connect to (or start) Ray, then settle --device auto and --cpus-per-worker from its resources, and
    learn the cluster's GPU (args.gpu: {"name", "memory_bytes", "bf16"}, None on CPU runs) for the plan."""
    from ray_jobs.common import check_shared_storage
    resources = init_ray()
    check_shared_storage(args.storage or get_base_dir(), get_base_dir())  # checkpoints; the tokenizer and data
    if args.device == "auto":
        args.device = "cuda" if resources.get("GPU", 0) >= 1 else "cpu"
    if args.device == "cuda" and resources.get("GPU", 0) < 1:
        raise SettingsError("--device cuda, but the Ray cluster has no GPUs: use --device cpu (or auto), or add GPU nodes")
    if args.cpus_per_worker is None:
        args.cpus_per_worker = 8 if args.device == "cuda" else 1
    args.gpu = cluster_gpu() if args.device == "cuda" else None
    return resources


def _gpu_properties():
    import torch
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_bytes": props.total_memory, "bf16": torch.cuda.is_bf16_supported()}


def cluster_gpu():
    """The GPU a Ray task gets on this cluster (before the training run takes them all)."""
    from ray_jobs.common import run_task
    return run_task(_gpu_properties, num_cpus=0, num_gpus=1, name="gpu_properties")


def build_trainer(train_loop, config, phase, datasets=None, dataset_config=None):
    """The TorchTrainer of a phase: config["num_workers"] workers (a GPU each with NCCL, or CPU processes
    with gloo), a fresh Ray run name each time (our own checkpoints carry the state, not Ray's), and
    FailureConfig restarts after a worker loss (the loop resumes from its last complete checkpoint).
    Elastic (min_workers < num_workers): Ray Train starts with as many workers as fit, at least the minimum,
    and every resize_check_s seconds restarts the group on more when they fit; each (re)start resumes from
    the last checkpoint on the new size (optimizer shards and data positions are mapped onto it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    use_gpu = config["device"] == "cuda"
    fewest, most = worker_range(argparse.Namespace(**config))
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=(fewest, most) if fewest < most else most, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config["cpus_per_worker"], **({"GPU": 1} if use_gpu else {})},
                                     elastic_resize_monitor_interval_s=config.get("resize_check_s", 60.0)),
        run_config=RunConfig(
            name=f"{phase}-{config['tag']}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(config["storage"]) / "ray_train"),
            failure_config=FailureConfig(max_failures=config["max_failures"], controller_failure_limit=config["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
        **({"datasets": datasets} if datasets else {}),
        **({"dataset_config": dataset_config} if dataset_config else {}),
    )


def fit(trainer, run_dir):
    """trainer.fit(), with SIGTERM (ray job stop, a spot node going away) asking the workers to write a
    checkpoint and stop. Returns rank 0's summary plus wall_seconds; raises RuntimeError on an error status."""
    import signal
    import threading

    def on_sigterm(signum, frame):
        logger.warning("SIGTERM: asking the workers to write a checkpoint and stop")
        (Path(run_dir) / STOP_FILE).write_text("stop")
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    t0 = time.time()
    try:
        result = trainer.fit()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    summary = dict(result.return_value or {})
    summary["wall_seconds"] = round(time.time() - t0, 1)
    if str(summary.get("status", "")).startswith("error"):
        raise TrainingError(summary["status"][len("error: "):])
    return summary


def worker_device(c):
    """In a train worker: its GPU, or the CPU with as many threads as the worker's CPU share."""
    import torch
    if c.device == "cuda":
        device = torch.device("cuda", get_dist_info()[2])
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(max(1, int(c.cpus_per_worker)))  # no oversubscription between workers
    return torch.device("cpu")


def setup_optimizers(model, c):
    f = c.init_lr_frac
    return model.setup_optimizers(c.unembedding_lr * f, c.embedding_lr * f, c.matrix_lr * f, c.weight_decay)


def resume_or_init(ckpt_dir, device, c, tokenizer, init, expect_config=None):
    """(model, optimizers, start_step, meta) on a train worker. From the last complete checkpoint in
    ckpt_dir when there is one (a restart after a worker failure, or --resume; also on another number of
    workers), else init() gives the model (a new one, or the previous phase's weights) with fresh
    optimizers at step 0 and meta {}."""
    import torch
    from nanochat.checkpoint import build_model, find_last_step, load_optimizers
    from nanochat.precision import resolve_precision
    precision = resolve_precision(getattr(c, "precision", None), torch.device(device).type)
    start_step = find_last_step(ckpt_dir)
    if start_step is None:
        model = init().set_precision(precision)
        return model, setup_optimizers(model, c), 0, {}
    model, meta = build_model(ckpt_dir, start_step, device, phase="train", expect_config=expect_config,
                              expect_tokenizer=tokenizer.fingerprint(), precision=precision)
    optimizers = setup_optimizers(model, c)
    load_optimizers(optimizers, ckpt_dir, start_step)
    logger.info("rank %d: resumed from %s step %d (saved by %s workers, now %d)", get_dist_info()[1], ckpt_dir,
                start_step, meta.get("world_size"), get_dist_info()[3])
    return model, optimizers, start_step, meta


def rank_conversations(task, state=None):
    """This worker's conversations of `task` (examples rank, rank + world, ...: disjoint across workers),
    epoch after epoch, each with the position just after it, {"epoch": e, "example": i} (i counts this
    worker's examples). Pass a saved position as `state` to continue from it."""
    _, rank, _, world = get_dist_info()
    indices = range(rank, len(task), world)
    if not indices:
        raise SettingsError(f"{len(task)} examples cannot be shared by {world} workers: use more data or fewer --num-workers")
    state = dict(state or {"epoch": 0, "example": 0})
    while True:
        for i in indices[state["example"]:]:
            state["example"] += 1
            yield task[i], dict(state)
        state = {"epoch": state["epoch"] + 1, "example": 0}
        # conversation mixtures are small and curated: passes over them are expected (SFT's --num-epochs, a
        # packer's lookahead at the end of midtraining), but never silent
        logger.warning("rank %d: starting pass %d over its %d conversations", rank, state["epoch"] + 1, len(indices))


def _peak_flops(device):
    """bf16 dense peak FLOP/s of the GPU, for MFU; None on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    import torch
    from nanochat.common import gpu_specs
    return gpu_specs(torch.cuda.get_device_name(device))[0]


def optimizer_step(model, optimizers, next_batch, grad_accum, lr_mult, momentum, forward=None, scaler=None):
    """One optimizer step: grad_accum forward/backwards on next_batch() -> (inputs, targets), through
    `forward` (default: the model; e.g. its torch.compile'd wrapper), then every optimizer at its initial
    LR x lr_mult (Muon groups also at this momentum). With an fp16 LossScaler, backward runs on the scaled
    loss and a step whose gradients overflowed is skipped. Returns the summed loss and the count of trained
    tokens as tensors on the model's device (no host sync here, but for fp16's overflow check)."""
    import torch
    forward = forward or model
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    for _ in range(grad_accum):
        inputs, targets = next_batch()
        loss = forward(inputs, targets) / grad_accum
        (scaler.scale_loss(loss) if scaler else loss).backward()
        loss_sum += loss.detach()
        tokens += (targets >= 0).sum()
    if scaler is not None and not scaler.unscale(model.parameters()):
        model.zero_grad(set_to_none=True)  # overflow: skip this step on every rank, with a smaller scale
        return loss_sum, tokens
    step_optimizers(model, optimizers, lr_mult, momentum)
    return loss_sum, tokens


def step_optimizers(model, optimizers, lr_mult, momentum=None):
    """Step every optimizer at its initial LR x lr_mult (Muon groups at `momentum` when given), then
    clear the gradients."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if momentum is not None and "momentum" in group:
                group["momentum"] = momentum
        opt.step()
    model.zero_grad(set_to_none=True)


def compiled(model, c, device):
    """The forward the loop trains through: torch.compile'd (static shapes) when --compile, which defaults
    to on for GPUs; the plain model otherwise. Evaluation and sampling use the plain model (other shapes)."""
    import torch
    use = c.compile if c.compile is not None else device.type == "cuda"
    return torch.compile(model, dynamic=False) if use else model


def prune_checkpoints(ckpt_dir, keep):
    """Delete all but the newest `keep` complete checkpoints in ckpt_dir (and incomplete ones older than the
    newest complete one: leftovers of a crash). meta.json goes first, so a reader never takes a checkpoint
    being deleted for a complete one."""
    import re
    import shutil
    from nanochat.checkpoint import META
    steps = sorted((int(m.group(1)), d) for d in Path(ckpt_dir).glob("step_*") if (m := re.fullmatch(r"step_(\d+)", d.name)))
    complete = [s for s in steps if (s[1] / META).is_file()]
    if not complete:
        return
    newest_kept = {s for s, _ in complete[-keep:]} if keep > 0 else set()
    for step, d in steps:
        if step in newest_kept or step > complete[-1][0]:  # keep, or still being written
            continue
        (d / META).unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)


class TrainLoop:
    """The optimizer-step loop of every training phase, on each worker. The phase brings the model and
    optimizers (resume_or_init), a batch source and an evaluation; the loop does the rest alike for all:
    LR schedule and Muon momentum, gradient accumulation, ONE small all_reduce per step (the loss, the
    trained-token count and the driver's STOP request), a NaN guard that stops with the step, periodic
    evaluation and checkpoints (save_checkpoint on every rank + ray.train.report), per-step logs, and the
    state a resumed run continues from (curves, smoothed loss, data position, every (re)start)."""

    def __init__(self, config, phase, ckpt_dir, model, optimizers, tokenizer, device, start_step, meta,
                 num_iterations, grad_accum, metric="val_bpb"):
        self.config, self.c, self.phase, self.ckpt_dir = config, argparse.Namespace(**config), phase, ckpt_dir
        self.model, self.optimizers, self.tokenizer, self.device = model, optimizers, tokenizer, device
        self.start_step, self.num_iterations, self.grad_accum, self.metric = start_step, num_iterations, grad_accum, metric
        self.rank, self.world = get_dist_info()[1], get_dist_info()[3]
        self.stop_file = Path(self.c.run_dir) / STOP_FILE
        state = meta.get("loop_state", {})
        self.data_state = None  # this rank's data position, from next_batch(); every rank's goes in checkpoints
        self.forward = compiled(model, self.c, device)
        from nanochat.precision import LossScaler, resolve_precision
        self.scaler = LossScaler(resolve_precision(self.c.precision, device.type) == "fp16")
        if "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
        self.timed_tokens = state.get("timed_tokens", 0)  # tokens of the steps train_seconds counts
        self.curves = state.get("curves", {"loss": {"x": [], "y": []}, metric: {"x": [], "y": []}})
        self.smooth_loss = state.get("smooth_loss", 0.0)
        self.train_seconds = state.get("train_seconds", 0.0)
        self.tokens_trained = state.get("tokens_trained", 0)
        self.value = state.get(metric)  # the latest validation value
        self.starts = state.get("starts", []) + [start_step]  # every (re)start of the loop, for the record
        self.start_workers = state.get("start_workers", []) + [self.world]  # and the workers it (re)started on

    def metrics(self):
        """This rank's RunMetrics (Ray's metrics, and --wandb on rank 0), tagged phase, run (the tag), rank."""
        wandb_run = _init_wandb(self.config) if self.c.wandb and self.rank == 0 else None
        metrics = RunMetrics(self.phase, self.c.tag, self.rank, wandb_run)
        if len(self.starts) > 1 and self.rank == 0:  # this start is a restart (a worker lost, a resize, --resume)
            metrics.log(train_restarts_total=1)
        return metrics

    def save(self, step, reason):
        """Checkpoint on every rank; refuses (returns False) when the weights are no longer finite, so the
        last good checkpoint is never replaced by a broken one."""
        import torch
        import ray.train
        from nanochat.checkpoint import save_checkpoint
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            return False
        loop_state = {"curves": self.curves, "smooth_loss": self.smooth_loss, "train_seconds": self.train_seconds,
                      "tokens_trained": self.tokens_trained, self.metric: self.value, "starts": self.starts,
                      "start_workers": self.start_workers,
                      "timed_tokens": self.timed_tokens, "loss_scaler": self.scaler.state_dict()}
        data_states = [self.data_state]
        if self.world > 1:  # every rank's position (they differ: each reads its own share)
            import torch.distributed as dist
            data_states = [None] * self.world
            dist.all_gather_object(data_states, self.data_state)
        meta = {"phase": self.phase, "data_state": data_states, "num_iterations": self.num_iterations,
                self.metric: self.value, "loop_state": loop_state,
                "settings": {k: v for k, v in self.config.items() if isinstance(v, (str, int, float, bool, type(None)))}}
        save_checkpoint(self.ckpt_dir, step, self.model, self.optimizers, meta, tokenizer_fingerprint=self.tokenizer.fingerprint())
        if self.rank == 0 and self.c.keep_checkpoints >= 0:  # the final one is kept besides the K newest periodic ones
            prune_checkpoints(self.ckpt_dir, self.c.keep_checkpoints + (reason == "end"))
        ray.train.report({"step": step, self.metric: self.value, "loss": self.smooth_loss, "reason": reason})
        if self.rank == 0:
            logger.info("checkpoint step %d saved (%s)", step, reason)
        return True

    def run(self, next_batch, evaluate=None, sample=None, sample_every=-1):
        """Train until num_iterations (or a STOP request, or a non-finite loss). next_batch() -> (inputs,
        targets, data_state) with targets -1 where no loss is taken; evaluate() -> the validation metric
        (called on every rank); sample() logs a few generations (rank 0). Returns the run's summary."""
        import torch
        import torch.distributed as dist
        from nanochat.checkpoint import find_last_step
        c, model, device = self.c, self.model, self.device
        flops_per_token, peak_flops = model.estimate_flops(), _peak_flops(device)
        metrics = self.metrics()
        step, start_step, num_iterations, status = self.start_step, self.start_step, self.num_iterations, "finished"
        while True:
            last = step == num_iterations
            if evaluate and c.eval_every > 0 and (step % c.eval_every == 0 or last) and (step > start_step or start_step == 0):
                model.eval()
                self.value = evaluate()
                model.train()
                self.curves[self.metric]["x"].append(step)
                self.curves[self.metric]["y"].append(self.value)
                if self.rank == 0:
                    logger.info("step %d/%d: %s %.4f", step, num_iterations, self.metric, self.value)
                    metrics.log(step, train_val_metric=self.value)
            if sample and self.rank == 0 and sample_every > 0 and (step % sample_every == 0 or last) and step > 0:
                model.eval()
                sample()
                model.train()
            periodic = step > start_step and c.save_every > 0 and step % c.save_every == 0
            if (last or periodic) and not self.save(step, "end" if last else "periodic"):
                status = f"error: the weights are not finite at step {step}; last good checkpoint: step {find_last_step(self.ckpt_dir)} in {self.ckpt_dir}"
                break
            if last:
                break

            # one optimizer step: grad_accum micro-steps on every worker
            t0, data_wait = time.time(), Stopwatch()

            def next_batch_keeping_state():
                with data_wait:
                    inputs, targets, self.data_state = next_batch()
                return inputs, targets
            lr_mult = lr_multiplier(step, num_iterations, c.warmup_ratio, c.warmdown_ratio, c.final_lr_frac)
            loss_sum, tokens = optimizer_step(model, self.optimizers, next_batch_keeping_state, self.grad_accum, lr_mult,
                                              muon_momentum(step), forward=self.forward, scaler=self.scaler)
            # one small collective per step: the loss, the tokens trained on, whether the driver asked us to stop
            stop_local = float(self.rank == 0 and self.stop_file.exists())
            flags = torch.stack([loss_sum.float(), tokens.float(), torch.tensor(stop_local, device=device)])
            if self.world > 1:
                dist.all_reduce(flags)
            step_loss, step_tokens, stop_requested = flags[0].item() / self.world, int(flags[1].item()), flags[2].item() > 0
            dt = time.time() - t0
            step += 1
            if not math.isfinite(step_loss):
                message = f"loss is {step_loss} at step {step}; stopping. Last good checkpoint: step {find_last_step(self.ckpt_dir)} in {self.ckpt_dir}"
                if self.rank == 0:
                    logger.error(message)
                status = f"error: {message}"
                break
            if step > start_step + 1:  # the first step after (re)start includes warm-up (and compile) costs
                self.train_seconds += dt
                self.timed_tokens += step_tokens
            self.tokens_trained += step_tokens
            self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * step_loss  # EMA from 0, debiased below
            debiased = self.smooth_loss / (1 - 0.9 ** step)
            tok_per_s = step_tokens / dt
            step_mfu = flops_per_token * tok_per_s / (peak_flops * self.world) if peak_flops else None
            # every rank its own step and data-wait times, rank 0 the global numbers (a few calls a step)
            own = dict(train_step_seconds=dt, train_data_wait_seconds=data_wait.take())
            if self.rank == 0:
                own.update(train_loss=debiased, train_lr_mult=lr_mult, train_tokens_per_s=tok_per_s, train_mfu=step_mfu,
                           train_step=step, train_tokens_total=step_tokens)
            metrics.log(step, **own)
            if self.rank == 0 and (step % c.log_every == 0 or step == num_iterations):
                mfu = f", MFU {100 * step_mfu:.1f}%" if step_mfu is not None else ""
                eta = (num_iterations - step) * (self.train_seconds / max(1, step - start_step - 1)) if step > start_step + 1 else 0
                logger.info("%s step %d/%d: loss %.4f, lr x%.3f, %.0f tokens/s%s, %.2fs/step, ETA %.1f min",
                            self.phase, step, num_iterations, debiased, lr_mult, tok_per_s, mfu, dt, eta / 60)
                self.curves["loss"]["x"].append(step)
                self.curves["loss"]["y"].append(round(debiased, 5))
            if stop_requested:
                status = "stopped" if self.save(step, "stop requested") else f"error: the weights are not finite at step {step}"
                break
        if metrics.wandb_run is not None:
            metrics.wandb_run.finish()
        final_loss = self.smooth_loss / (1 - 0.9 ** step) if step else 0.0
        # steady-state throughput: the steps after each (re)start's first, whose time includes warm-up and compiling
        tokens_per_s = self.timed_tokens / self.train_seconds if self.train_seconds else None
        mfu = flops_per_token * tokens_per_s / (peak_flops * self.world) if peak_flops and tokens_per_s else None
        return {"status": status, "step": step, "num_iterations": num_iterations, self.metric: self.value,
                "final_loss": final_loss, "train_seconds": self.train_seconds, "tokens_trained": self.tokens_trained,
                "tokens_per_s": tokens_per_s, "mfu": mfu, "loss_scale_skipped_steps": self.scaler.skipped,
                "starts": self.starts, "start_workers": self.start_workers, "curves": self.curves,
                "checkpoint_dir": str(self.ckpt_dir)}


def _init_wandb(config):
    """A Weights & Biases run named --wandb (WANDB_MODE=offline works: it writes under ./wandb to sync later)."""
    import wandb
    return wandb.init(project="nanochat-ray", name=config["wandb"],
                      config={k: v for k, v in config.items() if isinstance(v, (str, int, float, bool, type(None)))})


# ---- phases that continue an earlier phase's checkpoint on conversations (mid, sft) ---------------------

PLAN_NAMES = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl"}  # checkpoint phase -> script


def train_from_source(phase, train_loop, args, source_phases, build_data, check=None):
    """Driver of mid/sft/rl: find the source checkpoint (the first of source_phases that has one, or
    --source-tag/--source-step), let check(its model config) refuse bad settings, make the phase's plan
    (the device batch that fits, the batch arithmetic), build the (train, validation) tasks with build_data()
    here, so that a malformed row fails in the driver with its file and line rather than deep in a worker,
    ship them to the workers through the object store, run the TorchTrainer. Returns rank 0's summary."""
    import ray
    from nanochat.checkpoint import load_meta
    from nanochat.gpt import GPTConfig
    from nanochat.tokenizer import get_tokenizer_dir
    from ray_jobs.plan import plan_phase
    storage = args.storage or str(get_base_dir())
    source_phase, source_tag, source_step, source_dir = find_source(source_phases, args.source_tag, args.source_step, storage)
    args.source_phase, args.tag = source_phase, args.tag or source_tag
    model_config = load_meta(source_dir, source_step)["model_config"]
    if check is not None:  # settings against the source model: refused before Ray starts
        check(model_config)
    init_training_cluster(args)
    args.memory_plan = plan_phase(PLAN_NAMES[phase], args, GPTConfig(**model_config), args.gpu)
    train_task, val_task = build_data()
    logger.info("%s: %d training conversations, %d held out; from %s step %d", phase, len(train_task), len(val_task),
                source_dir, source_step)
    run_dir = prepare_run(phase, args.tag, storage, args.resume)
    config = dict(vars(args), tokenizer_dir=str(get_tokenizer_dir()), storage=storage, run_dir=str(run_dir),
                  source_dir=str(source_dir), source_step=source_step, data=ray.put((train_task, val_task)))
    return fit(build_trainer(train_loop, config, phase), run_dir)


def examples_only(task):
    """The task's conversations (after its slicing and mixing) as a plain list-backed Task: what training
    workers need, without the rest of the source files that a slice of a dataset still holds."""
    from tasks.common import Task
    examples = Task()
    examples.conversations = list(task)
    return examples


def source_worker(config, phase):
    """Worker side of mid/sft, before the loop: device, tokenizer, the tasks from the driver, and model +
    optimizers (resumed from this phase's last checkpoint, else the source's weights, fresh optimizers)."""
    import ray
    import torch
    from nanochat.checkpoint import build_model, checkpoint_dir
    from nanochat.common import setup_logging
    from nanochat.tokenizer import get_token_bytes, get_tokenizer
    setup_logging()
    c = argparse.Namespace(**config)
    device = worker_device(c)
    torch.manual_seed(c.seed)
    tokenizer = get_tokenizer(c.tokenizer_dir)
    train_task, val_task = ray.get(c.data)
    ckpt_dir = checkpoint_dir(phase, c.tag, base_dir=c.storage)

    def from_source():
        return build_model(c.source_dir, c.source_step, device, phase="train", expect_tokenizer=tokenizer.fingerprint())[0]
    model, optimizers, start_step, meta = resume_or_init(ckpt_dir, device, c, tokenizer, from_source)
    return argparse.Namespace(c=c, phase=phase, device=device, tokenizer=tokenizer, train_task=train_task, val_task=val_task,
                              ckpt_dir=ckpt_dir, model=model, optimizers=optimizers, start_step=start_step, meta=meta,
                              token_bytes=get_token_bytes(c.tokenizer_dir, device=device))


def run_source_loop(w, config, num_iterations, grad_accum, batches):
    """The TrainLoop of mid/sft: batches(task, state) yields (inputs, targets, state) of a task's share,
    for training (from the saved data position) and for the validation bits per byte (the first
    --eval-steps batches of the held-out task)."""
    from nanochat.loss_eval import evaluate_bpb
    c = w.c
    if get_dist_info()[1] == 0:
        logger.info("%s from %s step %d: %d conversations, %d steps (%d micro-steps x %d workers)", w.phase, c.source_dir,
                    c.source_step, len(w.train_task), num_iterations, grad_accum, get_dist_info()[3])
    from nanochat.dataloader import rank_resume_state
    train_iter = batches(w.train_task, rank_resume_state(w.meta.get("data_state"), "example"))
    loop = TrainLoop(config, w.phase, w.ckpt_dir, w.model, w.optimizers, w.tokenizer, w.device, w.start_step, w.meta,
                     num_iterations, grad_accum)
    summary = loop.run(next_batch=lambda: next(train_iter),
                       evaluate=lambda: evaluate_bpb(w.model, batches(w.val_task, None), c.eval_steps, w.token_bytes))
    return {**summary, "source": f"{c.source_phase} {c.source_dir} step {c.source_step}", "num_conversations": len(w.train_task)}


def report_training(summary, args, settings):
    """A training phase's report section: the named settings, the results, the loss and val bpb curves."""
    summary = dict(summary)
    curves = summary.pop("curves", {})
    fewest, most = worker_range(args)
    shown = {k: (f"{fewest}-{most}" if k == "num_workers" and fewest < most else getattr(args, k)) for k in settings}
    starts = summary.get("starts") or []
    if len(starts) > 1:  # the run was resumed (a worker or node lost, an elastic resize, --resume): from where, on how many
        summary["restarts"] = "; ".join(f"step {s} on {w} workers" for s, w in zip(starts[1:], summary.get("start_workers", [])[1:]))
    return {
        "settings": shown,
        "results": {k: v for k, v in summary.items() if k != "checkpoint_dir"},
        "curves": {"loss": {**curves.get("loss", {}), "ylabel": "train loss"},
                   "val_bpb": {**curves.get("val_bpb", {}), "ylabel": "validation bits/byte"}},
        "wall_seconds": summary.get("wall_seconds"),
        "gpu_hours": summary.get("wall_seconds", 0) / 3600 * args.num_workers if args.device == "cuda" else 0,
    }
