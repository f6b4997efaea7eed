"""The BPE tokenizer: trained by our Rust crate (`rustbpe`), encoded/decoded by tiktoken.

Saved as plain files (never a pickle), so loading a tokenizer can never run code:
    tokenizer.json     metadata: format version, split pattern, special tokens, vocab size, checksum
    ranks.tiktoken     the mergeable ranks, one "<base64 token> <rank>" line each (tiktoken's own format)
    token_bytes.json   UTF-8 byte length of every token id (0 for special tokens), for bits per byte

Conversations are dicts {"messages": [{"role": ..., "content": ...}, ...]} where an assistant
content is either a string or a list of parts {"type": "text" | "python" | "python_output", "text": ...}.
"""
import base64
import hashlib
import json
from pathlib import Path

import tiktoken

from nanochat.common import NanochatError

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document; also the separator the packer aligns rows on
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python/calculator tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced into the stream (not trained on)
]

# GPT-4's split pattern, but numbers split into runs of at most 2 digits (not 3): smaller vocabs
# waste fewer ids on 3-digit numbers.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

FORMAT_VERSION = 1
META_FILE, RANKS_FILE, TOKEN_BYTES_FILE = "tokenizer.json", "ranks.tiktoken", "token_bytes.json"


class TokenizerError(NanochatError, ValueError):
    """A tokenizer directory that is missing, corrupt, or inconsistent."""


class ConversationError(NanochatError, ValueError):
    """A conversation with wrong roles, empty turns, or a malformed structure."""


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        n = len(mergeable_ranks)
        self.special_ids = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.special_ids
        )
        self.bos_token_id = self.special_ids["<|bos|>"]

    # ---- training, saving, loading ---------------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, texts, vocab_size: int, buffer_size: int = 8192):
        """Train a BPE vocabulary of `vocab_size` ids in total (256 bytes + merges + the special tokens)."""
        import rustbpe  # the Rust trainer; only needed to train, not to encode
        min_size = 256 + len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or vocab_size < min_size:
            raise ValueError(f"vocab_size must be an int >= {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), buffer_size=buffer_size, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    def save(self, directory):
        from nanochat.common import atomic_write_text
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ranks_text = "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]))
        atomic_write_text(directory / RANKS_FILE, ranks_text)
        atomic_write_text(directory / TOKEN_BYTES_FILE, json.dumps(self.token_byte_lengths()))
        meta = {
            "format_version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_ids,
            "vocab_size": self.get_vocab_size(),
            "ranks_sha256": hashlib.sha256(ranks_text.encode()).hexdigest(),
        }
        # metadata last: a directory with tokenizer.json is complete
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_directory(cls, directory):
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"tokenizer directory {str(directory)!r} does not exist (train one with ray_jobs/tok_train.py)")
        meta_path, ranks_path = directory / META_FILE, directory / RANKS_FILE
        for path in (meta_path, ranks_path):
            if not path.is_file():
                raise TokenizerError(f"tokenizer directory {str(directory)!r} is incomplete: {path.name} is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{meta_path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise TokenizerError(f"{meta_path}: unsupported format_version {meta.get('format_version') if isinstance(meta, dict) else None!r} (expected {FORMAT_VERSION})")
        ranks_bytes = ranks_path.read_bytes()
        if hashlib.sha256(ranks_bytes).hexdigest() != meta.get("ranks_sha256"):
            raise TokenizerError(f"{ranks_path} does not match the checksum in {meta_path.name}: the file is corrupt or truncated")
        ranks = {}
        for lineno, line in enumerate(ranks_bytes.decode().splitlines(), 1):
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{ranks_path}:{lineno}: malformed line {line[:80]!r}") from None
        if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
            raise TokenizerError(f"{ranks_path}: ranks must be 0..N-1 with N >= 256, covering every byte")
        if meta.get("special_tokens") != {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}:
            raise TokenizerError(f"{meta_path}: special tokens differ from this code's SPECIAL_TOKENS")
        return cls(ranks, meta["pattern"])

    # ---- encoding ---------------------------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def encode_special(self, name: str) -> int:
        if name not in self.special_ids:
            raise KeyError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self.special_ids[name]

    def _as_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """Encode a string (-> list of ids) or a list of strings (-> list of lists, in threads).
        Special-token strings inside the text are plain text, never special ids.
        `prepend`/`append`: a special token name or id added around each text (e.g. "<|bos|>")."""
        head = [self._as_id(prepend)] if prepend is not None else []
        tail = [self._as_id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, (list, tuple)):
            for i, t in enumerate(text):
                if not isinstance(t, str):
                    raise TypeError(f"encode: item {i} is {type(t).__name__}, expected str")
            return [head + ids + tail for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode([token_id])

    def token_byte_lengths(self) -> list[int]:
        """Bytes per token id (0 for special tokens): bits per byte sums these over the targets."""
        lengths = [0] * self.get_vocab_size()
        for tok, rank in self.mergeable_ranks.items():
            lengths[rank] = len(tok)
        return lengths

    def fingerprint(self) -> str:
        """A short hash of the vocabulary + pattern + specials: checkpoints store it so a model is
        never loaded with a tokenizer it was not trained with."""
        h = hashlib.sha256(self.pattern.encode())
        for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(len(tok).to_bytes(2, "little") + tok)
        h.update(json.dumps(self.special_ids, sort_keys=True).encode())
        return h.hexdigest()[:16]

    # ---- conversations ----------------------------------------------------------------------------

    def render_conversation(self, conversation, max_tokens: int = 2048):
        """Token ids and a loss mask for one conversation. The mask is 1 where the model is trained:
        assistant text, assistant python tool calls (delimiters included) and <|assistant_end|>; 0 on
        BOS, user turns, <|assistant_start|> and tool outputs (the tool produces those, not the model).
        A leading system message is merged into the first user turn. Truncated to max_tokens."""
        messages = validate_conversation(conversation)
        ids, mask = [], []

        def add(token_ids, m):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([m] * len(token_ids))

        sp = self.special_ids
        add(self.bos_token_id, 0)
        for i, message in enumerate(messages):
            if message["role"] == "user":
                add(sp["<|user_start|>"], 0)
                add(self.enc.encode_ordinary(message["content"]), 0)
                add(sp["<|user_end|>"], 0)
            else:
                add(sp["<|assistant_start|>"], 0)
                for part in _assistant_parts(message["content"], i):
                    text_ids = self.enc.encode_ordinary(part["text"])
                    if part["type"] == "text":
                        add(text_ids, 1)
                    elif part["type"] == "python":
                        add(sp["<|python_start|>"], 1)
                        add(text_ids, 1)
                        add(sp["<|python_end|>"], 1)
                    else:  # python_output
                        add(sp["<|output_start|>"], 0)
                        add(text_ids, 0)
                        add(sp["<|output_end|>"], 0)
                add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """The prompt that asks the model for the conversation's last assistant turn (evals, RL):
        everything before it, then <|assistant_start|>."""
        messages = list(conversation["messages"]) if isinstance(conversation, dict) and "messages" in conversation else None
        if not messages or messages[-1].get("role") != "assistant":
            raise ConversationError("render_for_completion needs a conversation whose last message is the assistant's (it is removed and the model completes it)")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=10**9)
        return ids + [self.special_ids["<|assistant_start|>"]]

    def visualize_mask(self, ids, mask) -> str:
        """Debug view: trained tokens in green, others in grey (ANSI)."""
        green, grey, reset = "\033[92m", "\033[90m", "\033[0m"
        return "|".join(f"{green if m else grey}{self.id_to_token(t)}{reset}" for t, m in zip(ids, mask))


def validate_conversation(conversation):
    """Raise ConversationError unless the roles alternate user/assistant (after an optional leading
    system message), no turn is empty and assistant parts are well formed. Returns the messages with
    the system message merged into the first user turn."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ConversationError("a conversation is a dict with a 'messages' list")
    messages = conversation["messages"]
    if not messages:
        raise ConversationError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError(f"message {i} must be a dict with 'role' and 'content'")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ConversationError("a system message must be followed by a user message")
        _check_text(messages[0]["content"], 0, allow_empty=True)
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged] + list(messages[2:])
        offset = 1
    else:
        offset = 0
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ConversationError(f"message {i + offset} has role {m['role']!r}, expected {expected!r} (roles must alternate user/assistant, after an optional leading system message)")
        if m["role"] == "user":
            _check_text(m["content"], i + offset)
        elif isinstance(m["content"], str):
            _check_text(m["content"], i + offset)
        else:
            _assistant_parts(m["content"], i + offset)
    return messages


def _check_text(content, index, allow_empty=False):
    if not isinstance(content, str):
        raise ConversationError(f"message {index}: content must be a string, got {type(content).__name__}")
    if not allow_empty and not content.strip():
        raise ConversationError(f"message {index}: content is empty")


def _assistant_parts(content, index):
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise ConversationError(f"message {index}: assistant content must be a string or a non-empty list of parts")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output") or not isinstance(part.get("text"), str):
            raise ConversationError(f"message {index}, part {j}: expected {{'type': 'text'|'python'|'python_output', 'text': str}}, got {part!r:.100}")
    return content


# ---- the project's tokenizer on disk --------------------------------------------------------------

def get_tokenizer_dir() -> Path:
    from nanochat.common import get_base_dir
    return get_base_dir() / "tokenizer"


def get_tokenizer(directory=None) -> Tokenizer:
    return Tokenizer.from_directory(directory or get_tokenizer_dir())


def get_token_bytes(directory=None, device="cpu"):
    """The token_bytes tensor (int32, bytes per token id, 0 for specials) saved beside the tokenizer."""
    import torch
    path = Path(directory or get_tokenizer_dir()) / TOKEN_BYTES_FILE
    if not path.is_file():
        raise TokenizerError(f"{path} is missing: re-save the tokenizer")
    try:
        lengths = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    return torch.tensor(lengths, dtype=torch.int32, device=device)
