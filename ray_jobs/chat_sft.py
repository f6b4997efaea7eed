"""Supervised fine-tuning on Ray Train: the midtrained model (or the base model when there is no mid
checkpoint) is fine-tuned on a curated conversation mixture, with the loss on the assistant's tokens only.

    python ray_jobs/chat_sft.py                         # latest mid (else base) checkpoint -> checkpoints/sft/<tag>/
    python ray_jobs/chat_sft.py --preset tiny           # CPU, small mixture, minutes

Data: ARC-Easy and ARC-Challenge train, GSM8K train, SmolTalk, identity conversations, SimpleSpelling
and SpellingBee, in one TaskMixture built by the driver (a malformed row stops the run there, with its
file and line). Each worker takes its share (examples rank, rank + W, ...). Unlike midtraining, rows
are NOT packed: each row is one conversation (rendered, at most T+1 tokens), a micro-batch is padded
to its longest row, and the targets are -1 (no loss) everywhere but the tokens the mask of
render_conversation marks as the assistant's: user turns, tool outputs and padding teach nothing.
The loss is the mean over a micro-batch's assistant tokens.

Resume, checkpoints, SIGTERM stop, NaN guard: as in base_train (ray_jobs/training.TrainLoop); the data
position saved is this worker's example index (and epoch).
"""

from ray_jobs.common import run_phase_script
from ray_jobs.training import add_training_flags, apply_preset, examples_only, report_training, train_from_source
from nanochat.common import ArgumentParser

parser = ArgumentParser(description="Supervised fine-tuning on Ray Train")
parser.add_argument("--preset", choices=["tiny"], default=None, help="tiny: CPU, 2 workers, a small mixture, minutes")
# the model to start from
parser.add_argument("--source-phase", choices=["mid", "base"], default=None, help="default: mid if it has a checkpoint, else base")
parser.add_argument("--source-tag", default=None, help="default: the source phase's latest tag")
parser.add_argument("--source-step", type=int, default=None, help="default: its last step")
# data
parser.add_argument("--task-limit", type=int, default=None, help="at most this many examples of each task (default: all)")
parser.add_argument("--smoltalk-examples", type=int, default=10_000, help="SmolTalk conversations in the mixture")
parser.add_argument("--identity-file", default=None, help="identity conversations, JSONL (default: tasks/identity_conversations.jsonl)")
parser.add_argument("--val-examples", type=int, default=1000, help="held-out SmolTalk conversations for the validation bpb")
parser.add_argument("--eval-steps", type=int, default=25, help="validation batches per worker per evaluation")
# batch
parser.add_argument("--device-batch-size", type=int, default=None,
                    help="conversations per worker per micro-step (default: on GPUs the largest that fits, see ray_jobs/plan.py; 4 on CPU)")
parser.add_argument("--examples-per-step", type=int, default=32, help="conversations per optimizer step (all workers)")
parser.add_argument("--num-epochs", type=int, default=1)
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps; -1: --num-epochs over the mixture")
add_training_flags(parser, init_lr_frac=0.02, warmdown_ratio=1.0, eval_every=100, save_every=-1)

TINY = dict(task_limit=80, smoltalk_examples=80, val_examples=64, eval_steps=4, device_batch_size=4, examples_per_step=16,
            eval_every=10, save_every=10, num_workers=2, device="cpu", log_every=5)


def train_mixture(task_limit=None, smoltalk_examples=10_000, identity_file=None):
    from tasks.arc import ARC
    from tasks.common import TaskMixture
    from tasks.customjson import IDENTITY_CONVERSATIONS, CustomJSON
    from tasks.gsm8k import GSM8K
    from tasks.smoltalk import SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    n = task_limit
    return TaskMixture([
        ARC("ARC-Easy", "train", stop=n),
        ARC("ARC-Challenge", "train", stop=n),
        GSM8K("train", stop=n),
        SmolTalk("train", stop=min(smoltalk_examples, n or smoltalk_examples)),
        CustomJSON(identity_file or IDENTITY_CONVERSATIONS, stop=n),
        SimpleSpelling(size=min(300, n or 300), split="train"),
        SpellingBee(size=min(300, n or 300), split="train"),
    ])


def sft_batch(examples, pad_id, device="cpu"):
    """(ids, mask) pairs of rendered conversations -> (inputs, targets), (B, L-1) int64 with L the longest
    row. targets[i, t] = ids[t+1] where mask[t+1] is 1 (an assistant token), else -1; past a row's end,
    inputs hold pad_id and targets -1."""
    import torch
    L = max(len(ids) for ids, _ in examples)
    inputs = torch.full((len(examples), L - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), L - 1), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
        inputs[i, :len(ids) - 1] = ids[:-1]
        targets[i, :len(ids) - 1] = torch.where(mask[1:], ids[1:], -1)
    return inputs.to(device), targets.to(device)


def sft_batches(task, tokenizer, B, T, device="cpu", state=None):
    """Yield (inputs, targets, state) forever: B of this worker's conversations per batch, each rendered to
    at most T+1 tokens; a conversation with no assistant token left after that is skipped. state is the
    position just after the batch's last conversation."""
    from ray_jobs.training import rank_conversations
    conversations = rank_conversations(task, state)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    while True:
        examples = []
        while len(examples) < B:
            conversation, state = next(conversations)
            ids, mask = tokenizer.render_conversation(conversation, max_tokens=T + 1)
            if any(mask[1:]):
                examples.append((ids, mask))
        yield *sft_batch(examples, pad_id, device), state


# ---- the per-worker training loop ----------------------------------------------------------------

def train_loop(config):
    from nanochat.common import get_dist_info
    from ray_jobs.training import run_source_loop, source_worker

    w = source_worker(config, "sft")
    c, world = w.c, get_dist_info()[3]
    T, B = w.model.config.sequence_len, c.device_batch_size  # B * world divides examples_per_step: checked by the driver
    num_iterations = c.num_iterations if c.num_iterations > 0 else max(1, len(w.train_task) // c.examples_per_step * c.num_epochs)
    return run_source_loop(w, config, num_iterations, c.examples_per_step // (B * world),
                           lambda task, state: sft_batches(task, w.tokenizer, B, T, w.device, state))


# ---- the driver --------------------------------------------------------------------------------

def main(args):
    """Fine-tune the latest mid checkpoint (else base; or --source-*); returns rank 0's summary."""
    from tasks.smoltalk import SmolTalk
    args = apply_preset(parser, args, TINY if args.preset == "tiny" else {})
    # the batch arithmetic (device batch x workers divides --examples-per-step) is the plan's, in train_from_source
    phases = [args.source_phase] if args.source_phase else ["mid", "base"]
    return train_from_source("sft", train_loop, args, phases, lambda: (
        examples_only(train_mixture(args.task_limit, args.smoltalk_examples, args.identity_file)),
        examples_only(SmolTalk("test", stop=args.val_examples))))


def report_section(summary, args):
    return report_training(summary, args, ("source_phase", "task_limit", "device_batch_size", "examples_per_step",
                                           "num_workers", "device", "init_lr_frac"))


if __name__ == "__main__":
    run_phase_script(main, parser, "chat_sft", report_section)
