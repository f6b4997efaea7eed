"""Chat evaluation of a mid/sft/rl checkpoint on ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and
SpellingBee, spread over Ray tasks, and ChatCORE.

    python ray_jobs/chat_eval.py --phase sft                              # every problem of every task
    python ray_jobs/chat_eval.py --phase mid --max-problems 100 --tasks ARC-Easy,GSM8K
    python ray_jobs/chat_eval.py --phase sft --num-samples 8 --temperature 0.8   # pass@8 on the generative tasks

Categorical tasks (ARC, MMLU; prompts rendered as nanochat renders them, tasks/common.py render_mc): the
prompt is render_for_completion(conversation) (ending with <|assistant_start|>); the model's next-token
logits are restricted to the ids of the conversation's answer letters and the most likely letter is the
answer, whatever the model's favourite token is. Generative tasks (GSM8K, HumanEval, SpellingBee): the
Engine samples --num-samples completions (with the calculator tool) and the problem passes if ANY of them
passes task.evaluate (pass@N). Prompts longer than the model's context keep their most recent tokens
(categorical: the last sequence_len; generative: the last sequence_len - max new tokens, where at most half
the context is left for the answer).

ChatCORE, as nanochat defined it in the release that published d20's 0.0884 after SFT: the mean over
ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval of (accuracy - chance) / (1 - chance), chance 0.25 for
the three multiple-choice tasks and 0 for the two generative ones; reported only when all five were
evaluated. SpellingBee is reported beside it, outside ChatCORE.

Work split: --num-workers Ray tasks, each declaring its CPU (or GPU) share, each loading the model once
and taking problems w, w + W, ... of every task. A problem's outcome depends on that problem alone
(categorical batches are right-padded, which a causal model never sees; generative samples are seeded by
the problem's index), so the counts do not depend on the split, up to float rounding: tests check Ray
workers against one in-process pass, count by count.
"""
from nanochat.common import ArgumentParser, SettingsError

from ray_jobs.common import run_phase_script
from ray_jobs.training import apply_preset

TASK_NAMES = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]

parser = ArgumentParser(description="Chat evaluation (ARC, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE) on Ray")
parser.add_argument("--preset", choices=["tiny"], default=None, help="tiny: CPU, 2 workers, a few problems per task")
parser.add_argument("--phase", choices=["mid", "sft", "rl"], default="sft", help="which phase's checkpoint to evaluate")
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the phase's latest)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the tag's last)")
parser.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated subset of " + ", ".join(TASK_NAMES))
parser.add_argument("--max-problems", type=int, default=None, help="at most this many problems per task (a fair sample: tasks are shuffled)")
parser.add_argument("--spelling-problems", type=int, default=256, help="size of the SpellingBee test split")
# sampling (generative tasks)
parser.add_argument("--num-samples", type=int, default=1, help="samples per problem: a problem passes if any passes (pass@N)")
parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
parser.add_argument("--top-k", type=int, default=50)
parser.add_argument("--max-new-tokens", type=int, default=512)
parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass on the categorical tasks")
# cluster
parser.add_argument("--num-workers", type=int, default=None, help="Ray tasks (default: one per GPU, else 2)")
parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
parser.add_argument("--cpus-per-worker", type=float, default=None, help="default: 1 on CPU runs, 8 on GPU runs")
parser.add_argument("--storage", default=None, help="where the checkpoints are (default: $NANOCHAT_BASE_DIR)")
parser.add_argument("--seed", type=int, default=42)

TINY = dict(max_problems=24, max_new_tokens=64, num_workers=2, device="cpu")


def load_task(name, max_problems=None, spelling_problems=256):
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.mmlu import MMLU
    from tasks.spellingbee import SpellingBee
    n = max_problems
    return {
        "ARC-Easy": lambda: ARC("ARC-Easy", "test", stop=n),
        "ARC-Challenge": lambda: ARC("ARC-Challenge", "test", stop=n),
        "MMLU": lambda: MMLU("test", stop=n),
        "GSM8K": lambda: GSM8K("test", stop=n),
        "HumanEval": lambda: HumanEval(stop=n),
        "SpellingBee": lambda: SpellingBee(size=spelling_problems, split="test", stop=n),
    }[name]()


# chance accuracy of the tasks ChatCORE averages (nanochat's baselines)
CHATCORE_CHANCE = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
CHATCORE_DEFINITION = ("nanochat's ChatCORE: mean over ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval of (acc - chance) / "
                       "(1 - chance), chance 0.25 for the multiple-choice tasks and 0 for the generative ones; compare with "
                       "nanochat d20 SFT 0.0884. SpellingBee is reported beside it, outside ChatCORE")


def chatcore(accuracies: dict):
    """nanochat's ChatCORE from {task: accuracy}: the mean over the five CHATCORE_CHANCE tasks of the
    accuracy centered on chance; other tasks (SpellingBee) are ignored. None unless all five are there."""
    if not all(task in accuracies for task in CHATCORE_CHANCE):
        return None
    return sum((accuracies[t] - c) / (1 - c) for t, c in CHATCORE_CHANCE.items()) / len(CHATCORE_CHANCE)


def letter_id(tokenizer, letter):
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens with this tokenizer, expected 1")
    return ids[0]


def categorical_answers(model, tokenizer, conversations, context, device="cpu", batch_size=8):
    """The letter the model picks for each multiple-choice conversation: the argmax of the next-token
    logits after <|assistant_start|>, among the ids of conversation["letters"] only. Prompts keep their
    last `context` tokens; a batch is right-padded (causal attention: padding never affects a prompt)."""
    import torch
    answers = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        prompts = [tokenizer.render_for_completion(c)[-context:] for c in batch]
        ids = torch.full((len(batch), max(map(len, prompts))), tokenizer.get_bos_token_id(), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        with torch.inference_mode():
            logits = model(ids.to(device))
        last = logits[torch.arange(len(batch)), torch.tensor([len(p) - 1 for p in prompts])]
        for row, conversation in zip(last, batch):
            letters = conversation["letters"]
            choice = int(row[[letter_id(tokenizer, letter) for letter in letters]].argmax())
            answers.append(letters[choice])
    return answers


def generative_pass(engine, tokenizer, task, conversation, context, num_samples=1, max_new_tokens=512,
                    temperature=0.0, top_k=50, seed=42):
    """pass@N: True if any of num_samples completions sampled by the engine passes task.evaluate."""
    max_new = min(max_new_tokens, context // 2)
    prompt = tokenizer.render_for_completion(conversation)[-(context - max_new):]
    token_lists, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new,
                                           temperature=temperature, top_k=top_k, seed=seed)
    return any(task.evaluate(conversation, tokenizer.decode(tokens)) for tokens in token_lists)


def evaluate_share(spec, tasks, worker, num_workers):
    """One Ray task: problems worker, worker + num_workers, ... of every task, with the model loaded once.
    Returns {task name: [passed, ...]} in problem order. (Called in-process with worker 0 of 1, it scores
    everything.)"""
    import torch
    from nanochat.checkpoint import build_model
    from nanochat.common import setup_logging
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer
    log = setup_logging()
    if spec["device"] == "cuda":
        device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this task's GPU
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(spec["cpus_per_worker"])))
    tokenizer = get_tokenizer(spec["tokenizer_dir"])
    model, _ = build_model(spec["ckpt_dir"], spec["step"], device, phase="eval", expect_tokenizer=tokenizer.fingerprint())
    engine, context = Engine(model, tokenizer), model.config.sequence_len
    out = {}
    for name, task in tasks.items():
        indices = range(worker, len(task), num_workers)
        conversations = [task[i] for i in indices]
        if task.eval_type == "categorical":
            answers = categorical_answers(model, tokenizer, conversations, context, device, spec["batch_size"])
            out[name] = [bool(task.evaluate(c, a)) for c, a in zip(conversations, answers)]
        else:
            out[name] = [generative_pass(engine, tokenizer, task, c, context, spec["num_samples"], spec["max_new_tokens"],
                                         spec["temperature"], spec["top_k"], seed=spec["seed"] + i)
                         for i, c in zip(indices, conversations)]
        passed = sum(out[name])
        log.info("chat_eval worker %d/%d: %s %d/%d passed", worker, num_workers, name, passed, len(out[name]))
    return out


def main(args):
    """Evaluate the checkpoint; returns {"ARC-Easy": accuracy, ..., "SpellingBee": accuracy, "ChatCORE": x,
    "passed": {task: problems passed}, "problems": {task: problems}} (the tasks evaluated; ChatCORE only
    when its five tasks are among them)."""
    import ray
    from nanochat.common import get_base_dir, setup_logging
    from ray_jobs.common import init_ray, submit_task
    from ray_jobs.training import find_source

    log = setup_logging()
    args = apply_preset(parser, args, TINY if args.preset == "tiny" else {})
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown or not names:
        raise SettingsError(f"--tasks: unknown tasks {unknown}: choose from {', '.join(TASK_NAMES)}")
    storage = args.storage or str(get_base_dir())
    _, args.tag, args.step, ckpt_dir = find_source([args.phase], args.tag, args.step, storage)
    if args.num_samples > 1 and args.temperature == 0:
        log.warning("--num-samples %d at temperature 0: every sample is the same greedy completion", args.num_samples)
    tasks = {name: load_task(name, args.max_problems, args.spelling_problems) for name in names}  # data errors surface here
    resources = init_ray()
    if args.device == "auto":
        args.device = "cuda" if resources.get("GPU", 0) >= 1 else "cpu"
    args.cpus_per_worker = args.cpus_per_worker or (8 if args.device == "cuda" else 1)
    args.num_workers = args.num_workers or (int(resources.get("GPU", 0)) if args.device == "cuda" else 2)
    spec = worker_spec(args, ckpt_dir)
    log.info("chat_eval: %s step %d, %s, on %d workers", ckpt_dir, args.step,
             ", ".join(f"{n} ({len(t)})" for n, t in tasks.items()), args.num_workers)
    tasks_ref = ray.put(tasks)
    shares = ray.get([submit_task(evaluate_share, spec, tasks_ref, w, args.num_workers, num_cpus=args.cpus_per_worker,
                                  num_gpus=1 if args.device == "cuda" else 0, name=f"chat_eval_{w}")
                      for w in range(args.num_workers)])
    passed = {name: sum(sum(share[name]) for share in shares) for name in names}
    problems = {name: len(tasks[name]) for name in names}
    results = {name: passed[name] / problems[name] for name in names}
    for name in names:
        log.info("%s: %.4f (%d/%d)", name, results[name], passed[name], problems[name])
    score = chatcore(results)
    if score is None:
        log.info("ChatCORE needs all of %s: not computed", ", ".join(CHATCORE_CHANCE))
    else:
        results["ChatCORE"] = score
        log.info("ChatCORE: %.4f", score)
    return {**results, "passed": passed, "problems": problems}


def worker_spec(args, ckpt_dir):
    """What every evaluate_share needs to know: the checkpoint, the device and the sampling settings."""
    from nanochat.tokenizer import get_tokenizer_dir
    return dict(ckpt_dir=str(ckpt_dir), step=args.step, tokenizer_dir=str(get_tokenizer_dir()), device=args.device,
                cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size, num_samples=args.num_samples,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)


def report_section(results, args):
    settings = {k: getattr(args, k) for k in ("phase", "tag", "step", "max_problems", "num_samples", "temperature",
                                              "top_k", "max_new_tokens", "num_workers", "device")}
    return {"settings": settings, "results": results,
            "definitions": {"ChatCORE": CHATCORE_DEFINITION,
                            "tasks": "accuracy (pass@num_samples on GSM8K, HumanEval, SpellingBee); multiple choice "
                                     "rendered as nanochat renders it, answered by the likeliest letter"}}


if __name__ == "__main__":
    args = parser.parse_known_args()[0]  # the section is named after the phase evaluated
    run_phase_script(main, parser, f"chat_eval_{args.phase}", report_section)
