"""Midtraining on Ray Train: the base model continues training on conversations, so that it learns the
chat format (special tokens, turns), multiple choice, the calculator tool and who it is.

    python ray_jobs/mid_train.py                        # latest base checkpoint -> checkpoints/mid/<its tag>/
    python ray_jobs/mid_train.py --preset tiny          # CPU, small mixture, minutes

Data: a TaskMixture of SmolTalk, MMLU auxiliary_train, GSM8K, identity conversations (CustomJSON, twice),
SimpleSpelling and SpellingBee, built once by the driver (a malformed row stops the run there, with
its file and line) and shipped to the workers through the object store. Each worker takes its
disjoint share (examples rank, rank + W, ...), renders every conversation with
tokenizer.render_conversation and packs them best-fit into BOS-aligned rows of T+1 tokens, as in
pretraining. The loss is taken on EVERY token of the rows, user turns included: midtraining is still
pretraining-like, on chat-shaped data; restricting the loss to the assistant is SFT's job.

Resume: the data position saved in each checkpoint is this worker's example index (and epoch);
conversations that sat in the packer's buffer when it was saved are skipped on resume. Everything
else (checkpoints on every --save-every steps, worker-loss recovery, SIGTERM stop, NaN guard, the
validation bits per byte on held-out conversations) works as in base_train (ray_jobs/training.TrainLoop).
"""

from ray_jobs.common import run_phase_script
from ray_jobs.training import add_training_flags, apply_preset, examples_only, report_training, train_from_source
from nanochat.common import ArgumentParser

parser = ArgumentParser(description="Midtraining on Ray Train")
parser.add_argument("--preset", choices=["tiny"], default=None, help="tiny: CPU, 2 workers, a small mixture, minutes")
# the model to start from
parser.add_argument("--source-tag", default=None, help="base checkpoint tag (default: the latest)")
parser.add_argument("--source-step", type=int, default=None, help="base checkpoint step (default: its last)")
# data
parser.add_argument("--task-limit", type=int, default=None, help="at most this many examples of each task (default: all)")
parser.add_argument("--identity-file", default=None, help="identity conversations, JSONL (default: tasks/identity_conversations.jsonl)")
parser.add_argument("--val-examples", type=int, default=5000, help="held-out conversations for the validation bpb")
parser.add_argument("--eval-steps", type=int, default=4, help="validation batches per worker per evaluation")
# batch and length (the sequence length is the base model's)
parser.add_argument("--device-batch-size", type=int, default=None,
                    help="rows per worker per micro-step (default: on GPUs the largest that fits, see ray_jobs/plan.py; 32 on CPU)")
parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step (all workers)")
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps; -1: one pass over the mixture")
add_training_flags(parser, eval_every=150, save_every=-1)

TINY = dict(task_limit=150, val_examples=200, eval_steps=4, device_batch_size=8, total_batch_size=4096, eval_every=20,
            save_every=20, num_workers=2, device="cpu", log_every=5)
BUFFER_ROWS = 8  # the packer picks the best fit among about this many rows' worth of conversations


def train_mixture(task_limit=None, identity_file=None):
    from tasks.common import TaskMixture
    from tasks.customjson import IDENTITY_CONVERSATIONS, CustomJSON
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    n = task_limit
    identity = CustomJSON(identity_file or IDENTITY_CONVERSATIONS, stop=n)
    return TaskMixture([
        SmolTalk("train", stop=n),
        MMLU("auxiliary_train", stop=n),
        GSM8K("train", stop=n),
        identity, identity,  # twice: the model's identity matters more than its size suggests
        SimpleSpelling(size=min(200_000, n or 200_000), split="train"),
        SpellingBee(size=min(80_000, n or 80_000), split="train"),
    ])


def val_mixture(num_examples):
    """Held-out conversations of the same kinds (test splits; never used for training here)."""
    from tasks.common import TaskMixture
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk
    return TaskMixture([SmolTalk("test"), MMLU("test", stop=5200), GSM8K("test", stop=420)], stop=num_examples)


def packed_conversation_batches(task, tokenizer, B, T, device="cpu", state=None):
    """Yield (inputs, targets, state) forever: (B, T) tensors cut from rows of T+1 tokens packed best-fit
    from this worker's rendered conversations (each starts with BOS; a conversation longer than a row is
    cropped). state is the position just after the last conversation taken into the packer."""
    import numpy as np
    from nanochat.dataloader import BestFitPacker, rows_to_batch
    from ray_jobs.training import rank_conversations
    conversations = rank_conversations(task, state)
    packer = BestFitPacker(T + 1)
    while True:
        rows = []
        for _ in range(B):
            while packer.num_tokens < BUFFER_ROWS * (T + 1):
                conversation, state = next(conversations)
                packer.add(tokenizer.render_conversation(conversation, max_tokens=T + 1)[0])
            rows.append(packer.pop_row())
        inputs, targets = rows_to_batch(np.stack(rows), device)
        yield inputs, targets, state


def count_tokens(task, tokenizer, T):
    """Tokens of this worker's share of `task`, as packed (each conversation at most T+1 tokens)."""
    from nanochat.common import get_dist_info
    _, rank, _, world = get_dist_info()
    return sum(len(tokenizer.render_conversation(task[i], max_tokens=T + 1)[0]) for i in range(rank, len(task), world))


# ---- the per-worker training loop ----------------------------------------------------------------

def train_loop(config):
    import torch
    import torch.distributed as dist
    from nanochat.common import get_dist_info
    from ray_jobs.training import run_source_loop, source_worker

    w = source_worker(config, "mid")
    c, world = w.c, get_dist_info()[3]
    T, B = w.model.config.sequence_len, c.device_batch_size
    tokens_per_micro = B * T * world  # divides total_batch_size: checked by the driver
    num_iterations = c.num_iterations
    if num_iterations <= 0:  # one pass: every worker counts its share's tokens, all agree on the total
        total = torch.tensor(float(count_tokens(w.train_task, w.tokenizer, T)), device=w.device)
        if world > 1:
            dist.all_reduce(total)
        num_iterations = max(1, int(total.item()) // c.total_batch_size)
    return run_source_loop(w, config, num_iterations, c.total_batch_size // tokens_per_micro,
                           lambda task, state: packed_conversation_batches(task, w.tokenizer, B, T, w.device, state))


# ---- the driver --------------------------------------------------------------------------------

def main(args):
    """Midtrain the latest (or --source-tag/--source-step) base checkpoint; returns rank 0's summary."""
    args = apply_preset(parser, args, TINY if args.preset == "tiny" else {})
    # the batch arithmetic (device batch x T x workers divides --total-batch-size) is the plan's, in train_from_source
    return train_from_source("mid", train_loop, args, ["base"], lambda: (
        examples_only(train_mixture(args.task_limit, args.identity_file)), examples_only(val_mixture(args.val_examples))))


def report_section(summary, args):
    return report_training(summary, args, ("source_phase", "task_limit", "device_batch_size", "total_batch_size",
                                           "num_workers", "device", "matrix_lr", "init_lr_frac"))


if __name__ == "__main__":
    run_phase_script(main, parser, "mid_train", report_section)
