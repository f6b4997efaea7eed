"""Reinforcement learning on GSM8K: rollout actors sample answers, Ray Train workers update the policy.

    python ray_jobs/chat_rl.py                        # latest sft checkpoint -> checkpoints/rl/<tag>/
    python ray_jobs/chat_rl.py --preset tiny          # CPU, simple-arith problems, minutes

Each step, for --examples-per-step training prompts:
1. rollout: rank 0 hands the prompts to the rollout actors (Ray actors, each holding a copy of the
   policy in an Engine: KV cache, calculator tool), which sample --num-samples completions per prompt
   and score them with the task's reward() (GSM8K: the number after "####"). Every result carries the
   weight version it was sampled with; rank 0 refuses one that is not the current version.
2. update: rank 0 broadcasts the samples to every trainer rank (broadcast_object_list); each rank takes
   its share of the prompts. Advantage = reward - the mean reward of the prompt's samples (no reference
   model, no value function: REINFORCE with a per-prompt baseline, as in GRPO). The loss is
   sum(advantage * -log p(token)) over the SAMPLED completion tokens only (mask 1: not the prompt, not
   the calculator's forced output), divided by the number of sampled tokens of the whole step
   (token-level normalization). Our optimizers (Muon + AdamW) average the gradients across ranks.
3. weight sync: rank 0 puts the new state dict in the object store once; every actor loads it and
   answers with its new version before the next rollout.

A rollout actor that dies (a killed process, a lost node) is replaced by a fresh one loaded with the
current weights, and its share of the batch is sampled again (same seeds: the same samples). Every
--eval-every steps the actors sample --eval-samples answers to each of the first --eval-examples test
problems: pass@k is the share of problems with at least one right answer.

Resources: trainer workers as in the other phases (a GPU each, or --cpus-per-worker CPUs); each rollout
actor declares --actor-cpus and --actor-gpus. The defaults fit one 8-GPU node: 6 trainer workers and 2
actors with a GPU each. A fraction (--actor-gpus 0.5) packs several actors on one GPU; sharing a GPU with
a trainer worker would need the trainer to ask for a fraction too (build_trainer asks for whole GPUs).
On CPU, 2 workers at 1 CPU + 2 actors at 0.5 CPU fit a 4-logical-CPU local Ray. Checkpoints, resume
(step, data position, curves), SIGTERM stop and the NaN guard work as in the other training phases; the
sampling seeds derive from (--seed, step, prompt), so a resumed run samples what it would have.
"""
import hashlib
import logging
import os
import time

from nanochat.common import ArgumentParser, SettingsError
from ray_jobs.common import run_phase_script
from ray_jobs.training import add_training_flags, apply_preset, report_training, step_optimizers, train_from_source

logger = logging.getLogger("nanochat.rl")

parser = ArgumentParser(description="RL on GSM8K with Ray rollout actors")
parser.add_argument("--preset", choices=["tiny"], default=None, help="tiny: CPU, 2 workers + 2 actors, simple-arith, minutes")
# the model to start from
parser.add_argument("--source", choices=["sft", "mid", "base"], default="sft", help="the phase whose checkpoint RL starts from")
parser.add_argument("--source-tag", default=None, help="default: the source phase's latest tag")
parser.add_argument("--source-step", type=int, default=None, help="default: its last step")
# task and sampling
parser.add_argument("--task", choices=["gsm8k", "simple-arith"], default="gsm8k",
                    help="simple-arith: one-step word problems in GSM8K's format, learnable by a tiny model")
parser.add_argument("--train-examples", type=int, default=-1, help="use only the first N training problems (-1: all)")
parser.add_argument("--num-steps", type=int, default=-1, help="RL steps; -1: one pass over the training problems")
parser.add_argument("--examples-per-step", type=int, default=16, help="training prompts per step (all workers)")
parser.add_argument("--num-samples", type=int, default=16, help="completions sampled per prompt")
parser.add_argument("--max-new-tokens", type=int, default=256)
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--top-k", type=int, default=50, help="0: sample from the whole distribution")
parser.add_argument("--device-batch-size", type=int, default=None,
                    help="sequences per forward/backward on a worker (default: on GPUs the largest that fits, see ray_jobs/plan.py; 8 on CPU)")
# rollout actors
parser.add_argument("--rollout-actors", type=int, default=2)
parser.add_argument("--actor-cpus", type=float, default=None, help="CPU share of each actor (default: 0.5 on CPU runs, 1 on GPU)")
parser.add_argument("--actor-gpus", type=float, default=None, help="GPU share of each actor (default: 0 on CPU runs, 1 on GPU)")
# evaluation
parser.add_argument("--eval-examples", type=int, default=400, help="test problems in each pass@k evaluation")
parser.add_argument("--eval-samples", type=int, default=8, help="k of pass@k")
# optimization (small learning rates: the policy is already good), intervals, cluster, bookkeeping
add_training_flags(parser, init_lr_frac=0.05, warmdown_ratio=1.0, eval_every=60, save_every=60, num_workers=6)

# tiny: a 2-core CPU box; embeddings barely move (Adam's first steps on noisy RL gradients scramble them)
TINY = dict(task="simple-arith", num_steps=30, examples_per_step=8, num_samples=8, max_new_tokens=48, top_k=0,
            device_batch_size=16, init_lr_frac=0.2, embedding_lr=0.01, eval_every=10, eval_examples=32, eval_samples=4,
            save_every=10, num_workers=2, rollout_actors=2, device="cpu", log_every=1)

TASK_LABELS = {"gsm8k": "GSM8K", "simple-arith": "SimpleArith"}


def build_tasks(task, train_examples=-1):
    """(train, test) of a --task; train_examples > 0 keeps the first N training problems."""
    from tasks.gsm8k import GSM8K
    from tasks.simple_arith import SimpleArith
    cls = GSM8K if task == "gsm8k" else SimpleArith
    return cls("train", stop=train_examples if train_examples > 0 else None), cls("test")


# ---- the policy-gradient loss (plain torch: no Ray) ---------------------------------------------------

def group_advantages(rewards):
    """Advantages of one prompt's samples: each reward minus their mean (the per-prompt baseline)."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def rl_samples(groups):
    """Rollout groups -> (prompt, tokens, mask, advantage) per sampled completion."""
    return [(g["prompt"], tokens, mask, adv) for g in groups
            for tokens, mask, adv in zip(g["tokens"], g["masks"], group_advantages(g["rewards"]))]


def sampled_tokens(samples):
    """The tokens the policy chose (mask 1) in these samples: what the loss is normalized by."""
    return sum(sum(mask) for _, _, mask, _ in samples)


def rl_batch(samples, pad_id, device="cpu"):
    """(prompt, tokens, mask, advantage) samples -> inputs, targets (B, L-1) and advantages (B,), with L the
    longest prompt + completion. targets hold the completion's sampled tokens (mask 1) at the positions
    that predict them and -1 everywhere else: the prompt, the calculator's forced output, the padding."""
    import torch
    L = max(len(prompt) + len(tokens) for prompt, tokens, _, _ in samples)
    inputs = torch.full((len(samples), L - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), L - 1), -1, dtype=torch.long)
    for i, (prompt, tokens, mask, _) in enumerate(samples):
        ids = prompt + tokens
        inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        completion = torch.tensor(tokens, dtype=torch.long)
        targets[i, len(prompt) - 1:len(ids) - 1] = torch.where(torch.tensor(mask, dtype=torch.bool), completion, -1)
    advantages = torch.tensor([adv for _, _, _, adv in samples], dtype=torch.float32)
    return inputs.to(device), targets.to(device), advantages.to(device)


def pg_loss(model, inputs, targets, advantages, num_tokens):
    """sum over sampled tokens of advantage * -log p(token), divided by num_tokens. Minimizing it raises
    the probability of the tokens of better-than-average samples and lowers that of worse ones."""
    nll = model(inputs, targets, loss_reduction="none")  # (B, T); 0 where the target is -1
    return (nll * advantages[:, None]).sum() / num_tokens


def supervised_warmup(model, tokenizer, task, steps, batch_size=32, optimizers=None):
    """A few plain SFT steps (one process, no Ray) on a task's reference answers: supervised learning is
    the policy-gradient loss with advantage 1 on every assistant token. Gives tiny CPU runs (tests,
    benchmarks) a model that sometimes succeeds, so that rewards are not all zero."""
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    optimizers = optimizers or model.setup_optimizers()
    for step in range(steps):
        rendered = [tokenizer.render_conversation(task[(step * batch_size + i) % len(task)]) for i in range(batch_size)]
        samples = [(ids[:1], ids[1:], mask[1:], 1.0) for ids, mask in rendered]
        inputs, targets, advantages = rl_batch(samples, pad_id, next(model.parameters()).device)
        pg_loss(model, inputs, targets, advantages, sampled_tokens(samples)).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return model


def pass_at_k(groups):
    """Share of problems with at least one sample of full reward."""
    return sum(any(r >= 1.0 for r in g["rewards"]) for g in groups) / max(1, len(groups))


def state_checksum(state_dict):
    """SHA-256 of a state dict's tensors (names, dtypes, shapes, bytes): equal iff the weights are equal."""
    import torch
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sample_seed(*parts):
    """A deterministic 31-bit sampling seed from (seed, step, prompt index, ...)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


# ---- rollout actors -----------------------------------------------------------------------------------

class RolloutActor:
    """A copy of the policy that samples completions and scores them: an Engine over a GPT built from the
    model config, with the weights (and their version) loaded by load_weights before any rollout."""

    def __init__(self, model_config, tokenizer_dir, tasks, threads=1):
        import torch
        from nanochat.engine import Engine
        from nanochat.gpt import GPT, GPTConfig
        from nanochat.tokenizer import get_tokenizer
        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU share, or to none when it asked for no GPU
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        with torch.device("meta"):
            model = GPT(GPTConfig(**model_config))
        model.to_empty(device=self.device)
        model.init_rotary()
        self.model = model.eval()
        self.tokenizer = get_tokenizer(tokenizer_dir)
        self.engine = Engine(self.model, self.tokenizer)
        self.tasks = tasks  # {"train": Task, "test": Task}
        self.version = None

    def info(self):
        return {"pid": os.getpid(), "version": self.version}

    def load_weights(self, state_dict, version):
        self.model.load_state_dict(state_dict)
        self.version = version
        return version

    def checksum(self):
        return self.version, state_checksum(self.model.state_dict())

    def rollout(self, split, indices, seeds, num_samples, max_tokens, temperature, top_k):
        """num_samples completions of each of the split's problems `indices`, with their rewards. Returns
        {"version", "seconds", "groups": [{"index", "prompt", "tokens", "masks", "rewards"}, ...]}; a
        completion's tokens exclude the terminal token, masks mark the sampled ones (0: tool output)."""
        assert self.version is not None, "rollout before any weights were loaded"
        t0, task, groups = time.time(), self.tasks[split], []
        for index, seed in zip(indices, seeds):
            conversation = task[index]
            prompt = self.tokenizer.render_for_completion(conversation)
            room = min(max_tokens, self.model.config.sequence_len - len(prompt))
            if room <= 0:
                logger.warning("%s problem %d: the prompt (%d tokens) fills the context; skipped", split, index, len(prompt))
                continue
            tokens, masks = self.engine.generate_batch(prompt, num_samples, room, temperature, top_k, seed)
            rewards = [task.reward(conversation, self.tokenizer.decode(t)) for t in tokens]
            groups.append({"index": index, "prompt": prompt, "tokens": tokens, "masks": masks, "rewards": rewards})
        return {"version": self.version, "seconds": time.time() - t0, "groups": groups}


class RolloutPool:
    """The rollout actors, driven from one process (rank 0 of the trainer, or a test): weight sync through
    the object store, batches split across the actors, dead actors replaced, stale results refused."""

    def __init__(self, num_actors, model_config, tokenizer_dir, tasks, num_cpus=0.5, num_gpus=0, name="rollout",
                 max_retries=3):
        import ray
        from ray_jobs.common import project_env
        self.actor_class = ray.remote(RolloutActor)
        self.options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, runtime_env={"env_vars": project_env()})
        self.args = (model_config, tokenizer_dir, tasks, max(1, int(num_cpus)))
        self.name, self.max_retries = name, max_retries
        self.started, self.replaced, self.refused = 0, 0, 0
        self.state_ref, self.version = None, None
        self.actors = [self._start(slot) for slot in range(num_actors)]

    def _start(self, slot):
        self.started += 1  # a fresh name each time: the dead actor's name may not be released yet
        return self.actor_class.options(name=f"{self.name}-{slot}-{self.started}", **self.options).remote(*self.args)

    def _replace(self, slot, error):
        import ray
        logger.warning("rollout actor %d failed (%s): replacing it", slot, type(error).__name__)
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._start(slot)
        self.replaced += 1

    def _call(self, calls, current=False):
        """calls: {slot: fn(actor) -> ObjectRef}, all started at once. Returns {slot: result}. A dead
        actor is replaced (with the current weights) and its call made again. With current=True, a
        result (a dict with "version") from other weights than the current ones is refused, and the call
        made again after a re-sync."""
        import ray
        from ray.exceptions import RayActorError
        pending = {slot: fn(self.actors[slot]) for slot, fn in calls.items()}
        results = {}
        for slot, ref in pending.items():
            for attempt in range(self.max_retries + 1):
                try:
                    result = ray.get(ref)
                    if current and result["version"] != self.version:
                        self.refused += 1
                        raise StaleRolloutError(f"actor {slot} sampled with weights {result.get('version')}, current {self.version}")
                    results[slot] = result
                    break
                except (RayActorError, StaleRolloutError) as e:
                    if attempt == self.max_retries:
                        raise
                    if isinstance(e, RayActorError):
                        self._replace(slot, e)
                    if self.state_ref is not None:
                        ray.get(self.actors[slot].load_weights.remote(self.state_ref, self.version))
                    ref = calls[slot](self.actors[slot])
        return results

    def _each(self, method, *args):
        """actor.method(*args) on every actor; the results in actor order."""
        results = self._call({slot: lambda a: getattr(a, method).remote(*args) for slot in range(len(self.actors))})
        return [results[slot] for slot in range(len(self.actors))]

    def sync(self, model, version):
        """Every actor gets the model's weights (one object store put) and confirms `version`."""
        import ray
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.state_ref, self.version = ray.put(state), version
        confirmed = self._each("load_weights", self.state_ref, version)
        assert confirmed == [version] * len(self.actors), confirmed

    def checksums(self):
        """(version, weights checksum) of every actor."""
        return self._each("checksum")

    def info(self):
        """{"pid", "version"} of every actor."""
        return self._each("info")

    def rollout(self, split, indices, seeds, **sampling):
        """Sample every problem of `indices` (contiguous chunks, one per actor); groups in input order, plus
        the slowest actor's sampling seconds."""
        n = len(self.actors)
        bounds = [len(indices) * i // n for i in range(n + 1)]
        chunks = {slot: (list(indices[bounds[slot]:bounds[slot + 1]]), list(seeds[bounds[slot]:bounds[slot + 1]]))
                  for slot in range(n) if bounds[slot + 1] > bounds[slot]}
        results = self._call({slot: (lambda a, ix=ix, sd=sd: a.rollout.remote(split, ix, sd, **sampling))
                              for slot, (ix, sd) in chunks.items()}, current=True)
        groups = [g for slot in sorted(results) for g in results[slot]["groups"]]
        return groups, max(r["seconds"] for r in results.values())

    def shutdown(self):
        import ray
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


class StaleRolloutError(RuntimeError):
    """A rollout sampled with other weights than the trainer's current version."""


# ---- the per-worker training loop ----------------------------------------------------------------

def policy_update(model, optimizers, groups, lr_mult, pad_id, device_batch_size):
    """One optimizer step on this rank's share of the step's groups (prompts rank, rank + W, ...), the loss
    normalized by the sampled tokens of ALL groups. Skipped on every rank alike when no sample has a
    nonzero advantage (every rank sees all groups). Returns (this rank's loss, sampled tokens, stepped)."""
    import torch
    from nanochat.common import get_dist_info
    _, rank, _, world = get_dist_info()
    device = next(model.parameters()).device
    num_tokens = max(1, sampled_tokens(rl_samples(groups)))
    mine = [s for s in rl_samples(groups[rank::world]) if s[3] != 0]  # zero advantage: zero gradient
    loss_sum = torch.zeros((), device=device)
    for i in range(0, len(mine), device_batch_size):
        inputs, targets, advantages = rl_batch(mine[i:i + device_batch_size], pad_id, device)
        loss = pg_loss(model, inputs, targets, advantages, num_tokens) * world  # the optimizers average the ranks
        loss.backward()
        loss_sum += loss.detach()
    if not any(adv != 0 for _, _, _, adv in rl_samples(groups)):
        return loss_sum, num_tokens, False
    for p in model.parameters():
        if p.grad is None:  # a rank whose share had no signal still joins the optimizers' collectives
            p.grad = torch.zeros_like(p)
    step_optimizers(model, optimizers, lr_mult)
    return loss_sum, num_tokens, True


def train_loop(config):
    import ray
    import torch
    import torch.distributed as dist
    from nanochat.common import get_dist_info
    from ray_jobs.training import TrainLoop, lr_multiplier, source_worker

    w = source_worker(config, "rl")  # device, tokenizer, tasks, model + optimizers (resumed, or the source's)
    c, model, device = w.c, w.model, w.device
    _, rank, _, world = get_dist_info()
    train_task = w.train_task
    num_steps = c.num_steps if c.num_steps > 0 else max(1, len(train_task) // c.examples_per_step)
    sampling = dict(num_samples=c.num_samples, max_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k or None)
    label = TASK_LABELS[c.task]
    pad_id = w.tokenizer.encode_special("<|assistant_end|>")
    # TrainLoop keeps what a checkpoint saves and a resumed run continues (curves, starts, data position)
    # and writes the checkpoints; the step loop is RL's own
    loop = TrainLoop(config, "rl", w.ckpt_dir, model, w.optimizers, w.tokenizer, device, w.start_step, w.meta,
                     num_steps, 1, metric="pass@k")
    loop.curves.setdefault("reward", {"x": [], "y": []})
    saved = w.meta.get("data_state")  # RL's position is global (rank 0 picks the prompts): every rank saved the same
    loop.data_state = dict((saved[0] if isinstance(saved, list) else saved) or {"example": 0})
    # this process's measurements (a resumed run starts them afresh)
    timing = {"generate_s": 0.0, "update_s": 0.0, "sync_s": 0.0, "eval_s": 0.0, "samples": 0}
    pool = None
    if rank == 0:
        gpu = c.device == "cuda"
        actor_cpus = c.actor_cpus if c.actor_cpus is not None else (1.0 if gpu else 0.5)
        actor_gpus = c.actor_gpus if c.actor_gpus is not None else (1.0 if gpu else 0.0)
        logger.info("RL on %s from %s: %d steps of %d prompts x %d samples, %d trainer ranks, %d rollout actors", label,
                    c.source_dir, num_steps, c.examples_per_step, c.num_samples, world, c.rollout_actors)
        pool = RolloutPool(c.rollout_actors, model.config.to_dict(), c.tokenizer_dir, ray.put({"train": train_task, "test": w.val_task}),
                           num_cpus=actor_cpus, num_gpus=actor_gpus, name=f"rollout-{os.path.basename(c.run_dir)}-{os.getpid()}")
        pool.sync(model, w.start_step)

    def evaluate():
        t0 = time.time()
        indices = range(min(c.eval_examples, len(w.val_task)))
        groups, _ = pool.rollout("test", indices, [sample_seed(c.seed, "eval", i) for i in indices],
                                 **{**sampling, "num_samples": c.eval_samples})
        timing["eval_s"] += time.time() - t0
        mean = sum(sum(g["rewards"]) for g in groups) / max(1, sum(len(g["rewards"]) for g in groups))
        return pass_at_k(groups), mean

    metrics = loop.metrics()  # Ray's metrics (and --wandb on rank 0), tagged rl, the run's tag, the rank
    refused, replaced = (pool.refused, pool.replaced) if pool else (0, 0)
    step, status = w.start_step, "finished"
    try:
        while True:
            last = step == num_steps
            if rank == 0 and c.eval_every > 0 and (step % c.eval_every == 0 or last) and (step > w.start_step or step == 0):
                loop.value, eval_reward = evaluate()
                loop.curves["pass@k"]["x"].append(step)
                loop.curves["pass@k"]["y"].append(loop.value)
                logger.info("step %d/%d: %s pass@%d %.4f (mean reward %.4f) on %d test problems", step, num_steps, label,
                            c.eval_samples, loop.value, eval_reward, min(c.eval_examples, len(w.val_task)))
                metrics.tags["k"] = c.eval_samples
                metrics.log(step, rl_pass_at_k=loop.value)
                del metrics.tags["k"]
            periodic = step > w.start_step and c.save_every > 0 and step % c.save_every == 0
            if (last or periodic) and not loop.save(step, "end" if last else "periodic"):
                status = f"error: the weights are not finite at step {step}"
                break
            if last:
                break

            # 1) rollout: rank 0 asks the actors, every rank gets the samples
            t0 = time.time()
            groups = None
            if rank == 0:
                first = loop.data_state["example"]
                indices = [(first + j) % len(train_task) for j in range(c.examples_per_step)]
                groups, actor_seconds = pool.rollout("train", indices, [sample_seed(c.seed, step, j) for j in range(len(indices))], **sampling)
            if world > 1:
                box = [groups]
                dist.broadcast_object_list(box, src=0)
                groups = box[0]
            loop.data_state = {"example": loop.data_state["example"] + c.examples_per_step}
            t1 = time.time()

            # 2) update: every rank trains on its share of the prompts
            lr_mult = lr_multiplier(step, num_steps, c.warmup_ratio, c.warmdown_ratio, c.final_lr_frac)
            loss_sum, num_tokens, learned = policy_update(model, loop.optimizers, groups, lr_mult, pad_id, c.device_batch_size)
            stop_local = float(rank == 0 and loop.stop_file.exists())
            flags = torch.stack([loss_sum.float(), torch.tensor(stop_local, device=device)])
            if world > 1:
                dist.all_reduce(flags)
            step_loss, stop_requested = flags[0].item() / world, flags[1].item() > 0
            t2 = time.time()
            step += 1
            if not torch.isfinite(torch.tensor(step_loss)):
                status = f"error: loss is {step_loss} at step {step}"
                break

            # 3) weight sync: the next rollout samples with the new weights (version = the step that made them)
            if rank == 0 and learned:
                pool.sync(model, step)
            t3 = time.time()

            rewards = [r for g in groups for r in g["rewards"]]
            mean_reward = sum(rewards) / max(1, len(rewards))
            loop.curves["reward"]["x"].append(step)
            loop.curves["reward"]["y"].append(round(mean_reward, 5))
            loop.curves["loss"]["x"].append(step)
            loop.curves["loss"]["y"].append(round(step_loss, 6))
            loop.tokens_trained += num_tokens
            loop.smooth_loss = 0.9 * loop.smooth_loss + 0.1 * step_loss
            if step > w.start_step + 1:  # the first step after a (re)start includes warm-up costs
                timing["generate_s"] += t1 - t0
                timing["update_s"] += t2 - t1
                timing["sync_s"] += t3 - t2
                timing["samples"] += len(rewards)
                loop.train_seconds += t3 - t0
            if rank == 0:  # a few metric updates per step, the pool's counters as increments
                metrics.log(step, rl_mean_reward=mean_reward, rl_samples_per_s=len(rewards) / (t1 - t0), rl_sync_seconds=t3 - t2,
                            train_loss=step_loss, train_lr_mult=lr_mult, train_step=step, train_tokens_total=num_tokens,
                            rl_rollouts_refused_total=pool.refused - refused, rl_actors_replaced_total=pool.replaced - replaced)
                refused, replaced = pool.refused, pool.replaced
            if rank == 0 and (step % c.log_every == 0 or step == num_steps):
                logger.info("rl step %d/%d: mean reward %.3f, %d sampled tokens, loss %.5f, lr x%.3f; generate %.2fs "
                            "(actors %.2fs), update %.2fs, sync %.2fs", step, num_steps, mean_reward, num_tokens, step_loss,
                            lr_mult, t1 - t0, actor_seconds, t2 - t1, t3 - t2)
            if stop_requested:
                status = "stopped" if loop.save(step, "stop requested") else f"error: the weights are not finite at step {step}"
                break
    finally:
        if pool is not None:
            pool.shutdown()
        if metrics.wandb_run is not None:
            metrics.wandb_run.finish()
    return _summary(loop, step, num_steps, status, timing, c, label, pool)


def _summary(loop, step, num_steps, status, timing, c, label, pool):
    rewards = loop.curves["reward"]["y"]
    window = max(1, min(10, len(rewards) // 4))
    measured = timing["generate_s"] + timing["update_s"] + timing["sync_s"]
    return {
        "status": status, "step": step, "num_iterations": num_steps, "task": label,
        "results": {
            f"{label} pass@k": loop.value, "k": c.eval_samples,
            "mean_reward_first": sum(rewards[:window]) / window if rewards else None,
            "mean_reward_last": sum(rewards[-window:]) / window if rewards else None,
        },
        "curves": loop.curves,
        "timing": {**timing, **({k.replace("_s", "_share"): round(timing[k] / measured, 4) for k in ("generate_s", "update_s", "sync_s")} if measured else {})},
        "samples_per_s": round(timing["samples"] / timing["generate_s"], 2) if timing["generate_s"] else None,
        "actors_replaced": pool.replaced if pool else 0, "rollouts_refused": pool.refused if pool else 0,
        "starts": loop.starts, "start_workers": loop.start_workers, "checkpoint_dir": str(loop.ckpt_dir),
        "source": f"{c.source_phase} {c.source_dir} step {c.source_step}",
    }


# ---- the driver --------------------------------------------------------------------------------

def main(args):
    """RL from the latest --source checkpoint (sft by default); returns rank 0's summary: "results" (pass@k,
    mean reward of the first and last steps), "curves" (reward, pass@k, loss), "timing", "samples_per_s"."""
    args = apply_preset(parser, args, TINY if args.preset == "tiny" else {})
    if args.examples_per_step < args.num_workers:
        raise SettingsError(f"--examples-per-step {args.examples_per_step} leaves some of the {args.num_workers} workers no prompt")

    def check(model_config):
        if args.max_new_tokens >= model_config["sequence_len"]:
            raise SettingsError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the source model's "
                             f"context of {model_config['sequence_len']} tokens")
    return train_from_source("rl", train_loop, args, [args.source], lambda: build_tasks(args.task, args.train_examples), check)


def report_section(summary, args):
    section = report_training(summary, args, ("source", "task", "num_steps", "examples_per_step", "num_samples",
                                              "max_new_tokens", "temperature", "num_workers", "rollout_actors", "device",
                                              "init_lr_frac"))
    section["results"] = {**summary["results"], "samples_per_s": summary.get("samples_per_s"), "step": summary["step"],
                          **{k: v for k, v in summary["timing"].items() if k.endswith("_share")}}
    curves = summary.get("curves", {})
    section["curves"] = {"reward": {**curves.get("reward", {}), "ylabel": "mean reward"},
                         "pass@k": {**curves.get("pass@k", {}), "ylabel": f"pass@{args.eval_samples}"}}
    return section


if __name__ == "__main__":
    run_phase_script(main, parser, "chat_rl", report_section)
