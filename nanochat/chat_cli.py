"""Chat with the model in the terminal, answers streamed as they are generated.

    python -m nanochat.chat_cli                                   # latest chat checkpoint: sft, else mid, else rl
    python -m nanochat.chat_cli --source sft --tag d20 --step 500
    python -m nanochat.chat_cli --checkpoint sft/d20              # or a step dir, or a dir written by nanochat.export
    python -m nanochat.chat_cli --prompt "Why is the sky blue?"   # one answer, then exit

Type `clear` to start a new conversation, `quit` (or Ctrl-D) to leave. The conversation is kept as the
tokens the model saw, its own tool calls and their outputs included: each turn appends
<|user_start|> text <|user_end|> <|assistant_start|>, then the answer and <|assistant_end|>. When it
outgrows the context, the oldest tokens are dropped (the leading <|bos|> stays) so that an answer of
--max-tokens (at most half the context) still fits.
"""
import sys

import torch

from nanochat.checkpoint import CHAT_PHASES, CheckpointError, checkpoint_dir, find_latest_tag, load_for_inference, step_dir
from nanochat.common import ArgumentParser, autodetect_device_type, get_base_dir
from nanochat.engine import Engine, TextStream
from nanochat.tokenizer import TokenizerError


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="step dir, tag dir, path under <base>/checkpoints "
                        "(e.g. sft/d20) or a directory written by nanochat.export (instead of --source/--tag/--step)")
    parser.add_argument("--source", choices=CHAT_PHASES + ("base",), default=None,
                        help="checkpoint phase (default: the first of sft, mid, rl that has one)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest answer, in tokens")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    return parser.parse_args(argv)


def checkpoint_spec(source, tag, step):
    """The checkpoint directory --source/--tag/--step name (defaults: the first chat phase that has one, its
    newest tag, the last step), as a spec for load_for_inference."""
    phase = source or next((p for p in CHAT_PHASES if find_latest_tag(p) is not None), None)
    if phase is None:
        raise CheckpointError(f"no chat checkpoint (sft, mid or rl) under {get_base_dir() / 'checkpoints'}: "
                              f"train one first, or pick one with --source or --checkpoint")
    tag = tag or find_latest_tag(phase)
    if tag is None:
        raise CheckpointError(f"no complete checkpoint under {get_base_dir() / 'checkpoints' / phase}")
    path = checkpoint_dir(phase, tag)
    return path if step is None else step_dir(path, step)


class Chat:
    """The conversation so far, as tokens, and how to answer its next user turn."""

    def __init__(self, engine, max_tokens, temperature, top_k, seed):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.context = engine.model.config.sequence_len
        self.max_tokens = max_tokens
        self.reserve = max(1, min(max_tokens, self.context // 2))  # room always kept for the answer
        self.sampling = dict(temperature=temperature, top_k=top_k or None)
        self.seed = seed
        sp = self.tokenizer.encode_special
        self.user_start, self.user_end = sp("<|user_start|>"), sp("<|user_end|>")
        self.assistant_start, self.assistant_end = sp("<|assistant_start|>"), sp("<|assistant_end|>")
        self.clear()

    def clear(self):
        self.tokens = [self.tokenizer.get_bos_token_id()]

    def answer(self, text, out):
        """Stream the answer to `text` into `out`; returns the answer's text."""
        prompt = self.tokens + [self.user_start, *self.tokenizer.encode(text), self.user_end, self.assistant_start]
        limit = self.context - self.reserve
        if len(prompt) > limit:  # drop the oldest tokens, keep <|bos|>
            print(f"[context full: dropping the oldest {len(prompt) - limit} tokens]", file=sys.stderr)
            prompt = prompt[:1] + prompt[len(prompt) - limit + 1:]
        stream, reply, pieces = TextStream(self.tokenizer), [], []
        self.seed += 1  # a new draw every turn
        max_tokens = min(self.max_tokens, self.context - len(prompt))
        for column, _ in self.engine.generate(prompt, max_tokens=max_tokens, seed=self.seed, **self.sampling):
            token = column[0]
            if token in self.engine.tools.terminal:
                break
            reply.append(token)
            pieces.append(stream.push(token))
            out.write(pieces[-1])
            out.flush()
        pieces.append(stream.flush())
        out.write(pieces[-1] + "\n")
        out.flush()
        self.tokens = prompt + reply + [self.assistant_end]
        return "".join(pieces)


def main(argv=None):
    args = parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        print("error: --prompt is empty", file=sys.stderr)
        return 2
    device = torch.device(args.device or autodetect_device_type())
    if args.checkpoint is not None and (args.source or args.tag or args.step is not None):
        print("error: --checkpoint names the checkpoint: leave out --source, --tag and --step", file=sys.stderr)
        return 2
    try:
        spec = args.checkpoint or checkpoint_spec(args.source, args.tag, args.step)
        model, tokenizer, _ = load_for_inference(spec, device)
    except (CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    chat = Chat(Engine(model, tokenizer), args.max_tokens, args.temperature, args.top_k, args.seed)
    if args.prompt is not None:
        chat.answer(args.prompt, sys.stdout)
        return 0
    print("nanochat: type a message; `clear` starts over, `quit` or Ctrl-D leaves.")
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text in ("quit", "exit"):
            return 0
        if text == "clear":
            chat.clear()
            print("[conversation cleared]")
            continue
        if not text:
            continue
        print("\nAssistant: ", end="", flush=True)
        try:
            chat.answer(text, sys.stdout)
        except KeyboardInterrupt:  # stop this answer, keep chatting
            print("\n[interrupted]")


if __name__ == "__main__":
    sys.exit(main())
